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


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> StreamingPipeline:
    """Shared by the servers of this module, which never generate at the same time (tests run one by one)."""
    pipe = StreamingPipeline.from_pretrained(model_dir)
    pipe.config = StreamConfig(height=64, width=64, steps=1)
    return pipe
