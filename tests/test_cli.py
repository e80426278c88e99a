"""`streamgen generate` end to end on tiny models saved in diffusers' layouts."""

from __future__ import annotations

import json

import av
import pytest
import torch
from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel

from streamgen import StreamConfig, StreamingPipeline, presets
from streamgen.cli import main
from streamgen.media import write_mp4


def frame_count(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def far_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("far")
    pipe = StreamingPipeline(**presets.build("tiny"), config=StreamConfig(height=64, width=64, steps=1))
    pipe.save_pretrained(directory)
    return directory


def test_generate_writes_an_mp4_of_the_requested_length(far_dir, tmp_path):
    out = tmp_path / "t2v.mp4"
    assert main(["generate", "--model", str(far_dir), "--prompt", "a red circle", "--seconds", "2", "-o", str(out)]) == 0
    # 2 s at 16 fps = 32 frames, rounded up to whole chunks: 1 + 12 + 12 + 12.
    assert frame_count(out) == 37


def test_generate_extends_a_video(far_dir, tmp_path):
    clip = tmp_path / "in.mp4"
    write_mp4(clip, torch.randint(0, 255, (9, 64, 64, 3), dtype=torch.uint8).numpy(), fps=16)
    out = tmp_path / "v2v.mp4"
    code = main(["generate", "--model", str(far_dir), "--prompt", "x", "--seconds", "1", "--video", str(clip), "-o", str(out)])
    assert code == 0 and frame_count(out) == 9 + 24  # the clip, then two chunks past 1 s


def test_generate_reports_bad_input_clearly(far_dir, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage")
    assert main(["generate", "--model", str(far_dir), "--prompt", "x", "--video", str(bad), "-o", str(tmp_path / "o.mp4")]) == 2
    assert "cannot decode" in capsys.readouterr().err


def test_bidirectional_anyflow_renders_whole_clip_and_refuses_to_stream(tmp_path):
    components = presets.build("tiny")
    torch.manual_seed(0)
    components["transformer"] = AnyFlowTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=48, num_layers=2, freq_dim=32
    )
    AnyFlowPipeline(**components).save_pretrained(tmp_path / "bidi")
    assert json.loads((tmp_path / "bidi" / "model_index.json").read_text())["_class_name"] == "AnyFlowPipeline"
    with pytest.raises(ValueError, match="not causal"):
        StreamingPipeline.from_pretrained(tmp_path / "bidi")
    out = tmp_path / "bidi.mp4"
    args = ["generate", "--model", str(tmp_path / "bidi"), "--prompt", "x", "--seconds", "0.5", "--steps", "2"]
    assert main([*args, "--height", "64", "--width", "64", "-o", str(out)]) == 0
    assert frame_count(out) == 9
