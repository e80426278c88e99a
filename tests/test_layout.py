"""The layout's rules: one source for each setting, read from the model's own configs where they exist."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

from streamgen import StreamingPipeline
from streamgen.cli import main
from streamgen.models import NotCausalError, is_bidirectional, load_transformer


def test_a_model_without_stream_config_streams_in_its_own_chunk_partition(model_dir: Path, tmp_path: Path) -> None:
    """NVIDIA's directories have no stream config: the chunking is the transformer config's `chunk_partition`."""
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    first, chunk = config["chunk_partition"][:2]
    pipe = StreamingPipeline.from_pretrained(model_dir, device="cpu")
    assert (pipe.config.first_chunk_frames, pipe.config.chunk_frames) == (first, chunk)

    other = Path(shutil.copytree(model_dir, tmp_path / "other"))  # a tiny model: the fixture stays as it is
    (other / "transformer" / "config.json").write_text(json.dumps(config | {"chunk_partition": [2, 4, 4]}))
    pipe = StreamingPipeline.from_pretrained(other, device="cpu")
    assert pipe.config.partition(3) == [2, 4, 4]
    (other / "stream_config.json").write_text(json.dumps({"chunk_frames": 1}))  # ours: the stream config wins
    assert StreamingPipeline.from_pretrained(other, device="cpu").config.partition(3) == [2, 1, 1]


def test_the_bidirectional_model_is_recognised_by_one_check(model_dir: Path, tmp_path: Path) -> None:
    assert not is_bidirectional(model_dir) and not is_bidirectional(model_dir / "transformer")
    bidi = tmp_path / "bidi"
    bidi.mkdir()
    (bidi / "config.json").write_text(json.dumps({"_class_name": "AnyFlowTransformer3DModel"}))
    assert is_bidirectional(bidi)
    with pytest.raises(NotCausalError, match="not causal"):
        load_transformer(bidi)


# -- imports only point down -----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # import name -> its folder
    "streamgen": ROOT / "streamgen",
    "streamgen_server": ROOT / "server" / "streamgen_server",
    "streamgen_client": ROOT / "clients" / "python" / "streamgen_client",
    "streamgen_train": ROOT / "train" / "streamgen_train",
}
# Layers, bottom up: a module may import its own layer's modules (without cycles) and those of layers below. The
# `streamgen` command is the top: it wires the library, the server and the training recipe together.
LAYERS = {
    "streamgen": 0,  # the library
    "streamgen_train": 1,
    "streamgen_server": 1,
    "streamgen.cli": 2,
    "streamgen_client": 0,  # talks to the server over the wire only
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules that `name` imports anywhere in it (also inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            # `from package import module` imports the module; `from module import name`, the module
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {t for t in targets if t in modules and t != name}


def _layer(module: str) -> tuple[str, int]:
    group = max((g for g in LAYERS if module == g or module.startswith(g + ".")), key=len)
    return group, LAYERS[group]


def test_imports_only_point_down() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    wrong = []
    for name, targets in graph.items():
        group, layer = _layer(name)
        for target in targets:
            other, other_layer = _layer(target)
            if other_layer > layer or (other != group and other_layer == layer and other != "streamgen"):
                wrong.append(f"{name} -> {target}")
            elif group == "streamgen_client" and other != group:
                wrong.append(f"{name} -> {target}")
    assert not wrong, f"imports that point up or sideways: {wrong}"

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for target in graph[start]:
            if target in path:
                return [*path[path.index(target) :], target]
            if (found := cycle_from(target, [*path, target])) is not None:
                return found
        return None

    for name in graph:
        assert (cycle := cycle_from(name, [name])) is None, f"import cycle: {' -> '.join(cycle)}"


def test_streamgen_train_without_the_recipe_says_what_to_install(monkeypatch, capsys) -> None:
    """The runtime ships without training: `streamgen train` then fails in one line that names the extra."""
    # As if the train extra were not installed: its already-imported modules too (test modules import them).
    for name in {"streamgen_train", *(n for n in sys.modules if n.startswith("streamgen_train."))}:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["train", "all"]) == 2
    assert "pip install 'streamgen[train]'" in capsys.readouterr().err
