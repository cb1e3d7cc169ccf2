"""The layers of the README's Layout: every import, lazy ones too, runs from a higher layer to a lower one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Highest first. A module may import its own unit and any unit of a lower rank, nothing else.
RANKS = {
    "gateway.cli": 8,
    "gateway.__main__": 9,
    "bench": 7,  # tools, no part of a server: the CLI offers them
    "gateway.app": 6,
    "gateway.api": 5,
    "gateway.services": 4,
    "gateway.streaming": 3,
    "gateway.edge": 2,
    "gateway.embedded": 1,
    "gateway.settings": 0,
    "providers": 0,
    "storage": 0,
}


def unit(module: str) -> str | None:
    """The layer a module belongs to (None: not ours)."""
    parts = module.split(".")
    if parts[0] != "gateway":
        return parts[0] if parts[0] in RANKS else None
    if len(parts) == 1:
        return "gateway"
    name = ".".join(parts[:2])
    return name if name in RANKS else None


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_every_module_belongs_to_a_layer() -> None:
    for package in ("gateway", "providers", "storage", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            assert module == "gateway.__init__" or unit(module) in RANKS, module


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    upward = []
    for package in ("gateway", "providers", "storage", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            source = unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
            if source not in RANKS:
                continue
            for module in imports(path):
                target = unit(module)
                if target is None or target == source:
                    continue
                if target not in RANKS or RANKS[target] >= RANKS[source]:
                    upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert upward == []
