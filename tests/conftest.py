"""Fixtures shared by the server, client and browser tests: a tiny random model in diffusers' layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AnyFlowFARPipeline

from streamgen import StreamConfig, StreamingPipeline, presets


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """On a loaded 2-core machine, OpenMP threads spinning against other processes make chunks 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    AnyFlowFARPipeline(**presets.build("tiny")).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """Every stage of `streamgen train all`, one step each, on a tiny model, in order: its `Recipe` (the run in
    `root`, the export in `root/model`). Needs the train extra (imported here, so that runtime-only tests do not)."""
    from streamgen_train import cli, stages
    from streamgen_train import components as C

    sizes = C.Sizes(height=32, width=32, vae_base_dim=4, vae_decoder_base_dim=4, text_dim=32, heads=2, head_dim=16,
                    layers=2, ffn_dim=64)  # fmt: skip
    out = tmp_path_factory.mktemp("tiny-run")
    recipe = stages.Recipe(root=out, sizes=sizes, batch=4, clips=6, export_to=out / "model")
    for stage in cli.ALL:
        cli.run_stage(recipe, stage, steps=1)
    return recipe


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> StreamingPipeline:
    """Shared by the servers of this module, which never generate at the same time (tests run one by one)."""
    pipe = StreamingPipeline.from_pretrained(model_dir)
    pipe.config = StreamConfig(height=64, width=64, steps=1)
    return pipe
