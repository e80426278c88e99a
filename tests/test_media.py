"""PyAV helpers: reading, MP4 writing and the live fragmented-MP4 encoder, round-tripped through PyAV itself."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import clips
from streamgen.media import (
    MAX_PIXELS,
    FragmentedMp4Encoder,
    MediaError,
    Mp4Writer,
    read_clip,
    read_frames,
    trim_to_clip_length,
    write_mp4,
)


def moving_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """A bright square sliding over a gradient: compressible, but every frame differs."""
    y, x = np.mgrid[:height, :width]
    frames = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        frames[t] = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 64)], -1)
        frames[t, 8:24, 4 * t % (width - 16) : 4 * t % (width - 16) + 16] = 255
    return frames


def top_level_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    boxes, at = [], 0
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        boxes.append((kind, data[at : at + size]))
        at += size
    return boxes


def sample_count(fragment: bytes) -> int:
    """Samples in a moof + mdat fragment, read from its trun box."""
    at = fragment.find(b"trun") + 8  # past type, version and flags
    return struct.unpack(">I", fragment[at : at + 4])[0]


def decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as container:
        return list(container.decode(video=0))


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = moving_frames(17)
    path = tmp_path / "clip.mp4"
    assert write_mp4(path, (frames[i : i + 4] for i in range(0, 17, 4)), fps=16) == 17
    read = read_frames(path, height=64, width=96)
    assert read.shape == (17, 64, 96, 3) and read.dtype == np.uint8
    assert np.abs(read.astype(int) - frames).mean() < 4  # lossy, but colours survive (BT.601 tagged both ways)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 16
    assert read_frames(path.read_bytes(), height=32, width=32, max_frames=5).shape == (5, 32, 32, 3)


def test_mp4_writer_streams_chunks_and_checks_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = Path("data:1.mp4")  # relative: FFmpeg alone would take it for its read-only "data" protocol
    with Mp4Writer(path, fps=8) as writer:
        writer.write(moving_frames(3))
        writer.write(moving_frames(1)[0])
        with pytest.raises(ValueError, match="differs"):
            writer.write(moving_frames(1, height=32))
        with pytest.raises(ValueError, match="even"):
            writer.write(np.zeros((1, 63, 96, 3), np.uint8))
    assert len(read_frames(path, height=64, width=96)) == 4


def test_read_resizes_by_cover_and_centre_crop() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # a white centre half as wide as the image: exactly the crop of a square target
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    png.seek(0)
    frames = read_frames(png, height=40, width=40)
    assert frames.shape == (1, 40, 40, 3)
    assert frames[:, :, 2:-2].min() > 240
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG")
    assert read_frames(jpeg.getvalue(), height=64, width=32).shape == (1, 64, 32, 3)


def test_read_applies_rotation_metadata(tmp_path: Path) -> None:
    """A phone-style clip: stored landscape, displayed portrait. FFmpeg's own autorotation puts the stored left
    half at the bottom; so must we."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = 255
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames = read_frames(path, height=64, width=32)
    assert frames[0, :28].max() < 16 and frames[0, 36:].min() > 240


def test_paths_are_files_not_ffmpeg_urls(tmp_path: Path) -> None:
    path = tmp_path / "file:%03d.png"  # FFmpeg alone would see a protocol and an image-sequence pattern
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, "PNG")
    assert read_frames(path, height=8, width=8).shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a video" * 50,
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        b"\x00\x00\x00\x18ftypmp42" + bytes(100),
        clips.clip(48, gop=8)[:349],  # cut inside its index: a stream with no codec parameters
    ],
)
def test_unreadable_input_raises_media_error(data: bytes) -> None:
    with pytest.raises(MediaError):
        read_frames(data, height=32, width=32)


def test_missing_and_empty_files_raise_media_error(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    for path in [tmp_path / "missing.mp4", tmp_path / "empty.mp4"]:
        with pytest.raises(MediaError):
            read_frames(path, height=32, width=32)
        with pytest.raises(MediaError):
            read_frames(str(path), height=32, width=32)
    with pytest.raises(MediaError, match="empty"):
        read_frames(tmp_path / "empty.mp4", height=32, width=32)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
    with pytest.raises(MediaError, match="at its end"):
        read_frames(png, height=8, width=8)


def test_trim_to_clip_length() -> None:
    assert [len(trim_to_clip_length(np.zeros((n, 2, 2, 3)), 4)) for n in [1, 4, 5, 8, 9, 12]] == [1, 1, 5, 5, 9, 9]
    assert [len(trim_to_clip_length(np.zeros((n, 2, 2, 3)), 2)) for n in [1, 2, 4, 5]] == [1, 1, 3, 5]
    with pytest.raises(MediaError):
        trim_to_clip_length(np.zeros((0, 2, 2, 3)), 4)


def test_fragmented_stream_delivers_each_chunk_at_once(tmp_path: Path) -> None:
    frames = moving_frames(37)
    encoder = FragmentedMp4Encoder(96, 64, fps=16, keyframe_interval=8)
    init = encoder.init_segment
    assert [kind for kind, _ in top_level_boxes(init)] == [b"ftyp", b"moov"]
    assert encoder.codec.startswith("avc1.")

    segments, start = [], 0
    for size in [1, 12, 12, 12]:  # the stream's chunks: 1 latent frame, then 3 (x4 video frames)
        out = encoder.encode(frames[start : start + size])
        if start == 0:
            assert out[0] == init and out[0].init
            out = out[1:]
        assert sum(sample_count(fragment) for fragment in out) == size  # every frame of the chunk, right now
        assert all(not f.init and [k for k, _ in top_level_boxes(f)] == [b"moof", b"mdat"] for f in out)
        segments += out
        start += size
    assert encoder.flush() == b""

    # Fragments break at every keyframe (every 8 frames) and every chunk.
    firsts = np.cumsum([0] + [sample_count(f) for f in segments])[:-1]
    assert [int(first) for first, f in zip(firsts, segments) if f.keyframe] == [0, 8, 16, 24, 32]

    stream = init + b"".join(segments)
    decoded = decode(stream)
    assert len(decoded) == 37
    assert [frame.time for frame in decoded] == [float(Fraction(i, 16)) for i in range(37)]
    pixels = np.stack([frame.to_ndarray(format="rgb24") for frame in decoded])
    assert np.abs(pixels.astype(int) - frames).mean() < 6

    # A late joiner gets the init segment, then fragments from a keyframe on.
    join = next(i for i, f in enumerate(segments) if f.keyframe and firsts[i] == 16)
    assert len(decode(init + b"".join(segments[join:]))) == 37 - 16

    path = tmp_path / "live.mp4"
    path.write_bytes(stream)
    if shutil.which("ffprobe"):
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
             "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert probe.stderr == "" and probe.stdout.strip() == "37"


def test_fragmented_encoder_rejects_bad_frames() -> None:
    encoder = FragmentedMp4Encoder(96, 64)
    with pytest.raises(ValueError, match="differs"):
        encoder.encode(moving_frames(1, height=32))
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(np.zeros((1, 64, 96, 3), np.float32))
    encoder.flush()
    with pytest.raises(RuntimeError):
        encoder.encode(moving_frames(1))
    with pytest.raises(ValueError, match="even"):
        FragmentedMp4Encoder(95, 64)


# -- untrusted input --------------------------------------------------------------------------------------------
def test_playlists_and_protocols_are_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FFmpeg's probing would take these for playlists and open the files they name (here, next to them)."""
    monkeypatch.chdir(tmp_path)
    write_mp4("red.mp4", np.full((5, 32, 32, 3), (255, 0, 0), np.uint8))
    playlists = {
        "list.ffconcat": clips.ffconcat("red.mp4"),
        "list.m3u8": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nred.mp4\n#EXT-X-ENDLIST\n",
        "frames%03d.png": b"file:red.mp4",
    }
    for name, data in playlists.items():
        (tmp_path / name).write_bytes(data)
        for source in (data, io.BytesIO(data), tmp_path / name, open(tmp_path / name, "rb")):
            with pytest.raises(MediaError, match="cannot decode the input") as refused:
                read_frames(source, height=32, width=32)
            assert "red.mp4" not in str(refused.value)


def test_sizes_over_the_pixel_limit_are_refused_before_decoding() -> None:
    with pytest.raises(MediaError, match="frames of 64x64 are over the limit of 1024 pixels"):
        read_clip(clips.clip(3), height=32, width=32, max_pixels=32 * 32)
    with pytest.raises(MediaError, match=f"over the limit of {MAX_PIXELS} pixels"):
        read_clip(clips.png_bomb(), height=32, width=32, first=True)
    # Peak memory of a fresh process reading the 16000x16000 bomb, against one reading a small image: the bomb is
    # refused before its 768 MB of RGB exist.
    script = (
        "import resource, sys; sys.path.insert(0, 'tests'); import clips; from streamgen.media import read_clip\n"
        "data = clips.png_bomb() if sys.argv[1] == 'bomb' else clips.image(64, 64)\n"
        "try: read_clip(data, height=32, width=32, first=True)\nexcept ValueError: pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    root = Path(__file__).parent.parent
    peak = {kind: int(subprocess.run([sys.executable, "-c", script, kind], cwd=root, capture_output=True, text=True,
                                     check=True).stdout) for kind in ("bomb", "small")}  # fmt: skip
    assert peak["bomb"] - peak["small"] < 64 * 1024  # KiB


def test_bad_utf8_metadata_is_read() -> None:
    for container in ("matroska", "mp4"):
        assert read_clip(clips.bad_metadata(container), height=32, width=32).frames.shape == (5, 32, 32, 3)


def test_large_video_frames_are_scaled_straight_from_the_decoder() -> None:
    """A 1920x1080 clip read to 32x32 keeps its colours and aspect (centre crop), with no full-size RGB frame."""
    frames = np.zeros((3, 1080, 1920, 3), np.uint8)
    frames[:, :, 420:1500] = (0, 200, 0)  # a green centre square band, 1080 wide: the crop of a square target
    data = io.BytesIO()
    with av.open(data, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = i
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    read = read_clip(data.getvalue(), height=32, width=32)
    assert read.frames.shape == (3, 32, 32, 3)
    assert np.abs(read.frames[:, 2:-2, 2:-2].astype(int) - (0, 200, 0)).max() < 24
