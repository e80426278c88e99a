"""diffusers' private API that `streamgen.diffusers_adapter` relies on is still where it was, with the parameters
we pass: a diffusers upgrade that moves any of it fails here, naming what moved."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from streamgen import diffusers_adapter
from streamgen.diffusers_adapter import PRIVATE_API

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("module", "name", "parameters"), PRIVATE_API, ids=[name for _, name, _ in PRIVATE_API])
def test_private_diffusers_api_is_where_the_adapter_expects(module: str, name: str, parameters: tuple) -> None:
    found = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(found, part), f"diffusers moved {module}.{name}: streamgen/diffusers_adapter.py must follow"
        found = getattr(found, part)
    if parameters:
        have = list(inspect.signature(found).parameters)
        missing = [p for p in parameters if p not in have]
        assert not missing, f"{module}.{name} lost parameter(s) {missing} (has {have}): update the adapter"


def test_only_the_adapter_reaches_into_diffusers_internals() -> None:
    """Outside the adapter, streamgen imports only diffusers' public top level."""
    offenders = []
    for path in (ROOT / "streamgen").rglob("*.py"):
        if path.name == "diffusers_adapter.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers."):
                offenders.append(f"{path.relative_to(ROOT)}: from {node.module}")
    assert not offenders, offenders


def test_the_adapter_lists_what_it_imports() -> None:
    """Every private diffusers module the adapter imports from is one that `PRIVATE_API` checks."""
    tree = ast.parse(Path(diffusers_adapter.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("diffusers.")}
    assert imported <= {module for module, _, _ in PRIVATE_API}
