"""Media made on the spot for the input tests and `benchmarks/robustness.py`: clips whose frames tell their own
index, clips at any frame rate or with variable timing, and the hostile files of the upload corpus (playlists,
decompression bombs, bad metadata, damaged and truncated data). Each is a few KB, built in milliseconds."""

from __future__ import annotations

import io
import shutil
import tempfile
from fractions import Fraction
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

SIDE = 64  # frames are SIDE x SIDE
BARS = 8  # a frame's index is written in binary as BARS black/white bars


def indexed_frame(index: int, side: int = SIDE) -> np.ndarray:
    """A frame whose index (mod 2**BARS) survives lossy coding and resizing: BARS wide vertical bars, white = 1."""
    bits = [(index >> (BARS - 1 - bit)) & 1 for bit in range(BARS)]
    row = np.repeat(np.array(bits, np.uint8) * 255, side // BARS)
    return np.repeat(np.repeat(row[None, :, None], side, axis=0), 3, axis=2)


def frame_index(frame: np.ndarray) -> int:
    """The index `indexed_frame` wrote, read back from the bars' centres (any size)."""
    height, width = frame.shape[:2]
    centres = [(2 * bit + 1) * width // (2 * BARS) for bit in range(BARS)]
    bits = [int(frame[height // 2, x].mean() > 127) for x in centres]
    return int("".join(map(str, bits)), 2)


def clip(
    count: int,
    fps: int = 16,
    *,
    times: Sequence[float] | None = None,
    container: str = "mp4",
    gop: int | None = None,
    side: int = SIDE,
    title: str | None = None,
) -> bytes:
    """An H.264 clip of `count` indexed frames at `fps`, or at the given `times` in seconds (variable frame rate).
    `gop`: frames between keyframes; `title`: container metadata."""
    scale = 1000  # time base 1/(fps*1000): exact for constant rates, millisecond-fine for `times`
    # A named file, so MP4's index can be moved to the front (as cameras and phones write it): a cut file still reads.
    path = Path(tempfile.mkdtemp()) / f"clip.{container}"
    options = {"movflags": "+faststart"} if container == "mp4" else {}
    with av.open(str(path), "w", format=container, options=options) as c:
        if title is not None:
            c.metadata["title"] = title
        stream = c.add_stream("libx264", rate=fps, options={"crf": "12", **({"g": str(gop)} if gop else {})})
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, fps * scale)
        for i in range(count):
            video_frame = av.VideoFrame.from_ndarray(indexed_frame(i, side), format="rgb24")
            video_frame.pts = round((times[i] if times is not None else i / fps) * fps * scale)
            video_frame.time_base = stream.time_base
            c.mux(stream.encode(video_frame))
        c.mux(stream.encode(None))
    data = path.read_bytes()
    shutil.rmtree(path.parent)
    return data


def image(width: int, height: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(out, fmt)
    return out.getvalue()


def png_bomb(side: int = 16000) -> bytes:
    """A 1-bit PNG of side x side (31 KB for 16000): gigabytes once converted to RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte, then the packed bits
    data = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose header declares `width` x `height` (its start-of-frame sizes rewritten)."""
    data = bytearray(image(16, 16, "JPEG"))
    at = data.index(b"\xff\xc0") + 5  # SOF0: marker, length (2), precision (1), then height and width
    data[at : at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def bad_metadata(container: str = "matroska") -> bytes:
    """A clip whose title is invalid UTF-8 (written as a placeholder, then overwritten in place)."""
    placeholder = "TITLEPLACEHOLDER"
    data = clip(5, title=placeholder, container=container)
    return data.replace(placeholder.encode(), b"\xff\xfe\xc3\x28" * 4)


def ffconcat(path: str) -> bytes:
    """A concat playlist naming a local file: FFmpeg's probing would open it, relative to the reader's directory."""
    return f"ffconcat version 1.0\nfile {path}\n".encode()


def damaged(data: bytes, seed: int = 0) -> bytes:
    """`data` with a tenth of its frames' bytes overwritten by noise (after the index that MP4 puts first)."""
    rng = np.random.default_rng(seed)
    start, length = len(data) * 7 // 10, len(data) // 10
    return data[:start] + rng.integers(0, 256, length, dtype=np.uint8).tobytes() + data[start + length :]
