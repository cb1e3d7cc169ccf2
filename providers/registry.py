"""Resolves ``provider/model`` names to adapters."""

from __future__ import annotations

from providers.base import Provider, UnknownModel


class ProviderRegistry:
    def __init__(self, providers: list[Provider]) -> None:
        self._providers = {provider.name: provider for provider in providers}

    def resolve(self, model: str) -> tuple[Provider, str]:
        """The adapter for ``model`` and the model's name at that provider."""
        name, _, model_name = model.partition("/")
        provider = self._providers.get(name)
        if provider is None or not model_name:
            raise UnknownModel(
                f"Unknown model {model!r}: known providers are {', '.join(sorted(self._providers))}"
            )
        return provider, model_name

    def get(self, name: str) -> Provider:
        return self._providers[name]

    def names(self) -> list[str]:
        return sorted(self._providers)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
