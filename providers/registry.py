"""Resolves ``provider/model`` names to adapters."""

from __future__ import annotations

from collections.abc import Callable

from providers.base import Attachment, Provider, ProviderRequest, ProviderStream, UnknownModel, check_model_id


class ProviderRegistry:
    def __init__(self, providers: list[Provider]) -> None:
        self._providers = {provider.name: provider for provider in providers}

    def resolve(self, model: str) -> tuple[Provider, str]:
        """The adapter for ``model`` and the model's name at that provider, once the provider has checked
        the name (UnknownModel, InvalidModelOptions)."""
        name, _, model_name = model.partition("/")
        provider = self._providers.get(name)
        if provider is None or not model_name:
            raise UnknownModel(
                f"Unknown model {model!r}: known providers are {', '.join(sorted(self._providers))}"
            )
        provider.check_model(model_name)
        return provider, model_name

    def get(self, name: str) -> Provider:
        return self._providers[name]

    def names(self) -> list[str]:
        return sorted(self._providers)

    def preload(self) -> None:
        """Build now every vendor adapter that has credentials, rather than on its first call."""
        for provider in self._providers.values():
            if isinstance(provider, LazyProvider) and provider.has_credentials:
                provider.load()

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


class LazyProvider:
    """A vendor adapter built on its first call: each SDK costs tens of MiB to import, and a gateway that
    never calls that vendor should not pay for it. Name, models and credentials are known up front."""

    def __init__(self, name: str, models: tuple[str, ...], has_credentials: bool,
                 build: Callable[[], Provider]) -> None:
        self.name = name
        self.models = models
        self.has_credentials = has_credentials
        self._build = build
        self._adapter: Provider | None = None

    @property
    def loaded(self) -> bool:
        return self._adapter is not None

    def load(self) -> Provider:
        if self._adapter is None:
            self._adapter = self._build()
        return self._adapter

    def stream(self, request: ProviderRequest) -> ProviderStream:
        return self.load().stream(request)

    def check_model(self, model: str) -> None:
        check_model_id(model)  # every vendor's rule: no need to load its SDK to apply it

    def accepts(self, attachment: Attachment) -> bool:
        return self.load().accepts(attachment)

    @property
    def response_formats(self) -> frozenset[str]:
        return self.load().response_formats

    async def aclose(self) -> None:
        if self._adapter is not None:
            await self._adapter.aclose()
