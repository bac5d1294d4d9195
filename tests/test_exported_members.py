"""Each package exports a deliberate, short public surface."""

from __future__ import annotations

import importlib

import pytest

import engine
import landscape
import plugins


@pytest.mark.parametrize("module", [engine, plugins, landscape])
def test_all_names_exist_and_are_public(module: object) -> None:
    exported = module.__all__  # type: ignore[attr-defined]
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n))
    for name in exported:
        assert not name.startswith("_")
        assert hasattr(module, name), f"{module.__name__}.{name} is listed but missing"


@pytest.mark.parametrize("module", [engine, plugins, landscape])
def test_public_objects_claim_a_public_home(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        obj = getattr(module, name)
        home = getattr(obj, "__module__", None)
        if home is None or not isinstance(obj, type):
            continue
        top = home.split(".")[0]
        assert top == module.__name__, f"{name} comes from {home}"  # type: ignore[attr-defined]
        importlib.import_module(home)


def test_engine_surface() -> None:
    assert {"Pipeline", "RunResult", "ConfigError", "LedgerflowError"} <= set(engine.__all__)


def test_landscape_surface() -> None:
    assert {"Landscape", "Outcome", "canonical_hash"} <= set(landscape.__all__)
