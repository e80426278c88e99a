"""What users pass to `start_session` and `streamgen generate`: the types people use, clips at their real speed
and read from their end, damaged and empty files, and arguments checked up front with messages that name them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clips
from streamgen import StreamingPipeline
from streamgen.cli import main
from streamgen.media import MediaError, read_clip

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def model(pipe: StreamingPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model at 64x64, 1 step, saved for the CLI."""
    directory = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(directory)
    return directory


def shown(frames: np.ndarray) -> list[int]:
    return [clips.frame_index(frame) for frame in frames]


# -- the types people pass --------------------------------------------------------------------------------------
def as_png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def image_inputs(tmp_path: Path) -> dict[str, object]:
    """One image (frame 5) as every type a user might hold it in."""
    frame = clips.indexed_frame(5)
    path = tmp_path / "frame.png"
    path.write_bytes(as_png(frame))
    chw = torch.from_numpy(frame).permute(2, 0, 1)
    return {
        "PIL image": Image.fromarray(frame),
        "(H, W, 3) uint8 array": frame,
        "(1, H, W, 3) array": frame[None],
        "(H, W, 4) RGBA array": np.concatenate([frame, np.full_like(frame[..., :1], 255)], -1),
        "(H, W) grey array": frame[..., 0],
        "(H, W, 3) float array in [0, 1]": frame / 255.0,
        "(3, H, W) float tensor": chw.float() / 255,
        "(3, H, W) uint8 tensor": chw,
        "(H, W, 3) uint8 tensor": torch.from_numpy(frame),
        "list of one PIL image": [Image.fromarray(frame)],
        "path": path,
        "str path": str(path),
        "bytes": path.read_bytes(),
        "file object": io.BytesIO(path.read_bytes()),
    }


def test_an_image_in_every_type_people_use(pipe: StreamingPipeline, tmp_path: Path) -> None:
    for kind, value in image_inputs(tmp_path).items():
        with pipe.start_session("x", image=value, keep_input=True) as session:
            assert session.context_frames.shape == (1, 64, 64, 3), kind
            assert shown(session.context_frames) == [5], kind
            assert session.next_chunk().shape == (12, 64, 64, 3), kind


def test_a_video_in_every_type_keeps_its_last_frames(pipe: StreamingPipeline) -> None:
    frames = np.stack([clips.indexed_frame(i) for i in range(40)])
    tensors = torch.from_numpy(frames).permute(0, 3, 1, 2)
    videos = {
        "(T, H, W, 3) array": frames,
        "(T, 3, H, W) float tensor": tensors.float() / 255,
        "list of arrays": list(frames),
        "PIL images of two sizes": [Image.fromarray(f).resize((64 << i % 2,) * 2) for i, f in enumerate(frames)],
        "list of (3, H, W) tensors": list(tensors),
    }  # fmt: skip
    for kind, value in videos.items():
        with pipe.start_session("x", video=value, keep_input=True, max_context_frames=9) as session:
            assert shown(session.context_frames) == list(range(31, 40)), kind  # the end is what is extended
            assert session.context.seconds == 9 / 16 and session.context.source_seconds == 40 / 16, kind


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": 3}, TypeError, "image must be a path, bytes"),
        ({"image": "/no/such/file.png"}, MediaError, "cannot open"),
        ({"image": np.zeros((0, 0, 3), np.uint8)}, ValueError, "image has no pixels"),
        ({"image": np.zeros((8, 8, 3), np.int64)}, TypeError, "image must hold uint8 values or floats"),
        ({"image": np.full((8, 8, 3), np.nan)}, ValueError, r"image: floating-point frames must hold values in \[0, 1"),
        ({"image": np.zeros((8, 8, 5), np.uint8)}, ValueError, "image must be frames shaped"),
        ({"video": []}, ValueError, "video is an empty list"),
        ({"video": [np.zeros((8, 8, 3), np.uint8), "frame.png"]}, TypeError, r"video\[1\] must be a PIL image"),
        ({"image": b"x", "video": b"y"}, ValueError, "not both"),
        ({"height": 64.0}, TypeError, "height must be an integer"),
        ({"width": "64"}, TypeError, "width must be an integer"),
        ({"width": 112}, ValueError, "width must be a multiple of 32"),
        ({"height": 0}, ValueError, "height must be an integer at least 32"),
        ({"window": 1.5}, TypeError, "window must be an integer"),
        ({"window": 10**9}, ValueError, "window must be an integer from 1 to"),
        ({"sink": -1}, ValueError, "sink must be an integer from 0"),
        ({"seed": 2**64}, ValueError, "seed must be an integer from 0 to"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed must be an integer"),
        ({"steps": "4"}, TypeError, "steps must be an integer"),
        ({"guidance_scale": "2"}, TypeError, "guidance_scale must be a number"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
        ({"target_fps": 0}, ValueError, "target_fps must be a finite number"),
        ({"negative_prompt": None}, TypeError, "negative_prompt must be a string"),
        ({"video": b"x", "max_context_frames": 0}, ValueError, "max_context_frames must be an integer at least 1"),
        ({"keep_input": "yes"}, TypeError, "keep_input must be True or False"),
    ],
)
def test_bad_arguments_are_named(pipe: StreamingPipeline, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        pipe.start_session("x", **kwargs)


def test_prompts_and_tensors_are_checked(pipe: StreamingPipeline) -> None:
    dim = pipe.transformer.config.text_dim
    with pytest.raises(ValueError, match="prompt must be valid Unicode text"):
        pipe.start_session("\ud800")
    with pytest.raises(TypeError, match="prompt must be a string"):
        pipe.start_session(3)
    with pytest.raises(ValueError, match="prompt_embeds holds NaN"):
        pipe.start_session(prompt_embeds=torch.full((1, 4, dim), float("nan")))
    with pytest.raises(ValueError, match=rf"prompt_embeds must have shape \(1, tokens, {dim}\)"):
        pipe.start_session(prompt_embeds=torch.zeros(1, 4, dim + 1))
    with pytest.raises(TypeError, match="prompt_embeds must be a torch tensor or numpy array"):
        pipe.start_session(prompt_embeds=[[0.0] * dim])
    embeds = np.random.default_rng(0).standard_normal((1, 4, dim)).astype(np.float32)  # numpy: converted
    with pipe.start_session(prompt_embeds=embeds, seed=2**64 - 1) as session:
        shape = (1, 1, pipe.engine.config.in_channels, *session.latent_size)
        with pytest.raises(ValueError, match="noise for chunk 0 holds NaN"):
            session.next_chunk(noise=torch.full(shape, float("nan")))
        with pytest.raises(ValueError, match=r"noise for chunk 0 must have shape"):
            session.next_chunk(noise=np.zeros((1, 2, 3), np.float32))
        assert session.next_chunk(noise=np.zeros(shape, np.float32)).shape == (1, 64, 64, 3)


# -- clips from files: real speed, their end, damage ----------------------------------------------------------
def test_clips_play_at_their_real_speed(pipe: StreamingPipeline) -> None:
    """A 60 fps clip is resampled to the stream's 16 fps, not played 3.75x slower; so is a variable-rate one."""
    with pipe.start_session("x", video=clips.clip(240, 60), keep_input=True) as session:  # 4 s at 60 fps
        indices = shown(session.context_frames)
        assert session.context.fps == 16 and len(indices) == 33 and session.context.source_seconds == 4.0
        assert indices[-1] == 239  # the clip's very last frame, then the generated continuation
        steps = np.diff(indices)
        assert steps.min() >= 3 and steps.max() <= 5 and abs(steps[:-1].mean() - 60 / 16) < 0.1

    times = np.cumsum([0.0] + [0.02, 0.1] * 30)[:60]  # alternating 50 and 10 fps
    clip = read_clip(clips.clip(60, 30, times=times), height=64, width=64, fps=16, max_frames=100)
    slots = range(round(times[-1] * 16) + 1)
    expected = [max(i for i, t in enumerate(times) if round(t * 16) <= slot) for slot in slots]
    assert shown(clip.frames) == expected  # each 1/16 s shows the frame on screen then


def test_a_long_clip_is_read_from_its_end(pipe: StreamingPipeline) -> None:
    """Only the part used is decoded: a seek to its end, then a second or two."""
    long = clips.clip(16 * 60, 16, gop=16, side=32)  # one minute
    reads: list[tuple[float, float]] = []
    with pipe.start_session("x", video=long, keep_input=True, progress=lambda *p: reads.append(p)) as session:
        assert shown(session.context_frames) == [i % 256 for i in range(16 * 60 - 33, 16 * 60)]
    assert reads and reads[-1][1] < 5  # seconds read: the end, not the minute


def test_damaged_and_truncated_clips_keep_what_decodes(pipe: StreamingPipeline) -> None:
    whole = clips.clip(48, 16, gop=8)
    with pipe.start_session("x", video=clips.damaged(whole), keep_input=True, max_context_frames=100) as session:
        assert "damaged packet" in session.context.damaged
        assert 20 <= len(session.context_frames) and shown(session.context_frames)[-1] == 47
    cut = whole[: len(whole) * 2 // 3]
    with pipe.start_session("x", video=cut, keep_input=True, max_context_frames=100) as session:
        assert "truncated" in session.context.damaged  # the frames before the cut are kept
        indices = shown(session.context_frames)
        assert len(indices) >= 5 and indices == list(range(indices[0], indices[0] + len(indices)))


# -- the CLI ----------------------------------------------------------------------------------------------------
def generate(model: Path, out: Path, *args: str) -> int:
    return main(["generate", "--model", str(model), "--prompt", "x", "--seconds", "0.5", "-o", str(out), *args])


def test_cli_extends_the_end_of_a_clip_at_its_speed(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    video = tmp_path / "in.mp4"
    video.write_bytes(clips.clip(300, 30, gop=30))  # 10 s at 30 fps
    out = tmp_path / "out.mp4"
    assert generate(model, out, "--video", str(video), "--context-seconds", "1", "--keep-input") == 0
    assert "extending the last 1.06 s of the 10.00 s clip" in capsys.readouterr().out
    frames = read_clip(out, height=64, width=64).frames
    assert len(frames) == 17 + 12  # 1 s of context (1 + 4k frames), then one chunk past 0.5 s
    first = shown(frames[:17])
    assert first[-1] == 299 % 256 and abs(np.diff(first).mean() - 30 / 16) < 0.1


def test_cli_warns_of_damage_and_names_empty_files(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    damaged, empty = tmp_path / "damaged.mp4", tmp_path / "empty.mp4"
    damaged.write_bytes(clips.damaged(clips.clip(48, 16, gop=8)))
    empty.write_bytes(b"")
    assert generate(model, tmp_path / "a.mp4", "--video", str(damaged)) == 0
    assert "warning: the video is damaged: " in capsys.readouterr().err
    assert generate(model, tmp_path / "b.mp4", "--video", str(empty)) == 2
    assert capsys.readouterr().err.strip().endswith("error: the file is empty")
    assert generate(model, tmp_path / "c.mp4", "--width", "112") == 2
    assert "width must be a multiple of 32" in capsys.readouterr().err


def test_a_prepared_clip_opens_the_same_session(pipe: StreamingPipeline) -> None:
    """`prepare` does the VAE work beforehand (a server, on its upload threads); the stream is the same."""
    clip = np.stack([clips.indexed_frame(i) for i in range(20)])
    extension = pipe.prepare(video=clip)
    with pipe.start_session("x", video=extension, seed=3) as prepared, pipe.start_session("x", video=clip, seed=3) as d:
        np.testing.assert_array_equal(prepared.context_frames, d.context_frames)
        np.testing.assert_array_equal(prepared.next_chunk(), d.next_chunk())
    with pytest.raises(ValueError, match="extends one session only"):
        pipe.start_session("x", video=extension)
    with pytest.raises(ValueError, match="was prepared at"):
        pipe.start_session("x", video=pipe.prepare(image=clip[0]), height=32)


def test_cli_keeps_a_variable_rate_clip_at_its_timing(model: Path, tmp_path: Path) -> None:
    times = np.cumsum([0.0] + [0.02, 0.1] * 15)[:30]  # frames alternately 20 and 100 ms apart
    video = tmp_path / "vfr.mp4"
    video.write_bytes(clips.clip(30, 30, times=times))
    out = tmp_path / "out.mp4"
    assert generate(model, out, "--video", str(video), "--keep-input") == 0
    slots = range(round(times[-1] * 16) + 1)
    expected = [max(i for i, t in enumerate(times) if round(t * 16) <= slot) for slot in slots]
    expected = expected[(len(expected) - 1) % 4 :]  # the last 1 + 4k
    assert shown(read_clip(out, height=64, width=64).frames[: len(expected)]) == expected
