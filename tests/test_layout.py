"""The layout's rules: one source for each setting, read from the model's own configs where they exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from streamgen import StreamingPipeline
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
