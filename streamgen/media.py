"""Video in and out with PyAV: reading clips and images for conditioning, writing MP4 files, live fragmented MP4.

The live encoder builds its own `moof`/`mdat` fragments. FFmpeg's mp4 muxer only cuts a fragment when the packet
*after* it arrives (`frag_keyframe`, `frag_duration`, `frag_every_frame` alike), and PyAV cannot call
`av_write_frame(ctx, NULL)`, the one way to force the cut; so a chunk's frames would reach a viewer only once the
next chunk is generated. Here FFmpeg writes the init segment (`ftyp` + `moov` with `empty_moov`) and libx264 the
packets; each `encode()` call turns its packets into complete fragments at once, so latency is one chunk.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

import av
import numpy as np
from PIL import Image, ImageOps

from streamgen.config import DEFAULT_FPS

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
Progress = Callable[[float, float], None]  # (seconds of the input read, seconds to read)

# Demuxers an input may be read with: image and video containers whose streams are known from their header (so
# the pixel cap applies before anything is decoded). Never playlists or protocols (concat, hls, image2 patterns):
# they open files or URLs named inside the data, which for an upload means the server's own files.
DEMUXERS = (
    "mov", "matroska", "avi", "gif", "apng", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe",
)  # fmt: skip
FORMATS_READ = "MP4/MOV, MKV/WebM, AVI, GIF, PNG, JPEG, WebP, BMP, TIFF"  # the same list, for people
# Declared frame sizes above this are refused before decoding: a 31 KB PNG can declare 16000x16000.
MAX_PIXELS = 4096 * 4096
_MAX_BAD_PACKETS = 64  # consecutive undecodable packets after which a damaged input is read no further
_SEEK_MARGIN = 1.0  # seconds read before the used end of a clip: keyframe distance and timestamp slack


class MediaError(ValueError):
    """Input media that cannot be read: empty, corrupt, unsupported, too large, or without a single video frame.

    The message is worded for people and never quotes FFmpeg, whose texts can reveal local paths."""


@dataclass(frozen=True)
class Clip:
    """Frames read from an image or video, fitted to the stream's size and resampled to its frame rate."""

    frames: np.ndarray  # uint8 (T, H, W, 3), the last ones of the input (or its first, for an image)
    fps: float  # rate of `frames`: the one asked for, else the input's own
    source_seconds: float | None  # duration of the whole input, when its container states it
    damaged: str | None = None  # what could not be decoded, for a warning; `frames` are those that could

    @property
    def seconds(self) -> float:
        """Duration of the input that `frames` cover."""
        return len(self.frames) / self.fps


def read_clip(
    source: Source,
    *,
    height: int,
    width: int,
    fps: float | None = None,
    max_frames: int | None = None,
    first: bool = False,
    max_pixels: int = MAX_PIXELS,
    progress: Progress | None = None,
) -> Clip:
    """Decode an image or video to RGB frames of exactly `(height, width)`.

    Frames are scaled (by swscale, straight from the decoder's format: a large source is never held as full-size
    RGB) to cover the target keeping their aspect ratio, then centre-cropped, so inputs of any shape fill the
    stream's frame without distortion. Rotation metadata (phone videos) is applied.

    Args:
        source: a path, the file's bytes, or a binary file-like object. Only the container formats of `DEMUXERS`
            are read, never playlists or protocols.
        fps: resample to this rate by timestamp (the nearest earlier frame fills each slot), so a 60 fps or
            variable-rate clip keeps its real speed; `None` keeps every decoded frame.
        max_frames: keep only the last this many frames. The end of a long clip is found by seeking, so the part
            before it is not decoded.
        first: the first frame only (an image to extend).
        max_pixels: refuse frames larger than this, from their declared size, before decoding.
        progress: called as frames are decoded with (seconds read, seconds to read).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with contextlib.ExitStack() as stack:
        file = _open(source)
        if file is not source:
            stack.callback(file.close)
        at = file.tell() if file.seekable() else None
        if at is not None:
            if not file.read(1):
                at_end = "no bytes left to read (a file object left at its end?)"
                raise MediaError("the file is empty" if at == 0 else at_end)
            file.seek(at)
        reader = _Reader(file, height, width, fps, 1 if first else max_frames, first, max_pixels, progress)
        try:
            clip = reader.read(seek=max_frames is not None and not first and at is not None)
            if clip is None:  # the seek landed too late (or the stated duration was wrong): from the start
                file.seek(at)
                clip = reader.read(seek=False)
        except av.FFmpegError as e:
            unreadable = f"cannot decode the input: it is damaged, or not one of the formats read ({FORMATS_READ})"
            raise MediaError(unreadable) from e
        except OSError as e:  # PyAV's reads and seeks on the file object
            raise MediaError(f"the input could not be read: {e.strerror or type(e).__name__}") from e
    return clip


def read_frames(source: Source, *, height: int, width: int, max_frames: int | None = None) -> np.ndarray:
    """Every decoded frame of an image or video (the last `max_frames`), fitted like `read_clip` does."""
    return read_clip(source, height=height, width=width, max_frames=max_frames).frames


class _Reader:
    """One pass of `read_clip` over an opened file: demux, decode packet by packet (a damaged packet is skipped,
    as the ffmpeg tool does, not the end of the input), resample to the frame rate, keep the last frames."""

    def __init__(
        self, file: BinaryIO, height: int, width: int, fps: float | None, keep: int | None, first: bool,
        max_pixels: int, progress: Progress | None,
    ) -> None:  # fmt: skip
        self.file, self.height, self.width, self.fps, self.keep, self.first = file, height, width, fps, keep, first
        self.max_pixels, self.progress = max_pixels, progress

    def read(self, seek: bool) -> Clip | None:
        """The clip, or None when a seek towards the end left fewer than `keep` frames to read."""
        options = {"format_whitelist": ",".join(DEMUXERS), "protocol_whitelist": "none"}
        decoder = {"max_pixels": str(self.max_pixels), "threads": "1"}
        # `options` also reach the decoders that probe the streams' parameters: they refuse oversized frames too.
        file = _Unnamed(self.file)
        with av.open(file, options=options | decoder, metadata_errors="replace") as container:
            if not container.streams.video:
                raise MediaError("the input has no video or image stream")
            stream = container.streams.video[0]
            if stream.codec_context is None:  # a codec FFmpeg has no decoder for, or a header cut before it
                raise MediaError("the input's video is in a format streamgen cannot decode")
            declared = stream.codec_context.width * stream.codec_context.height
            if declared > self.max_pixels:
                raise MediaError(
                    f"frames of {stream.codec_context.width}x{stream.codec_context.height} are over the limit of "
                    f"{self.max_pixels} pixels"
                )
            stream.codec_context.options = decoder
            total = container.duration / av.time_base if container.duration else None
            rate = self.fps or float(stream.average_rate or stream.guessed_rate or 0) or None
            begin = 0.0
            if seek and total is not None and rate is not None:
                begin = max(0.0, total - self.keep / rate - _SEEK_MARGIN)
                if begin > 0:
                    container.seek(int(begin * av.time_base), backward=True)
            frames, damaged = self._decode(container, stream, begin, total)
        if begin > 0 and len(frames) < self.keep:
            return None
        if not frames:
            raise MediaError(
                "no frame could be decoded: the data is damaged, or its frames are over the limit of "
                f"{self.max_pixels} pixels"
            )
        return Clip(np.stack(frames), rate or 1.0, total, damaged)

    def _decode(
        self, container: av.container.InputContainer, stream: av.VideoStream, begin: float, total: float | None
    ) -> tuple[deque[np.ndarray], str | None]:
        kept: deque[np.ndarray] = deque(maxlen=self.keep)
        pending: av.VideoFrame | None = None  # the latest frame of the current slot, fitted when the slot closes
        slot = 0
        origin: float | None = None  # time of the first frame: slot k holds time origin + k / fps
        last: float | None = None  # time of the latest frame
        bad = consecutive = 0
        for packet in _packets(container, stream):
            try:
                decoded = stream.decode(packet)
                consecutive = 0
            except av.FFmpegError:
                bad += 1
                consecutive += 1
                if consecutive > _MAX_BAD_PACKETS:
                    break
                continue
            for frame in decoded:
                last = frame.time if frame.time is not None else last
                if self.fps is None:
                    kept.append(self._fit(frame))
                    continue
                time = frame.time if frame.time is not None else (origin or 0.0) + (slot + 1) / self.fps
                origin = time if origin is None else origin
                now = round((time - origin) * self.fps)
                if pending is not None and now > slot:  # the slot before is final; empty ones repeat it
                    kept.append(self._fit(pending))
                    gap = now - slot - 1
                    kept.extend([kept[-1]] * min(gap, self.keep or gap))
                if pending is None or now >= slot:  # a timestamp going back (damage) is not a new slot
                    slot, pending = now, frame
                if self.progress is not None and frame.time is not None and total:
                    self.progress(max(0.0, frame.time - begin), total - begin)
            if self.first and (kept or pending is not None):
                break
        if pending is not None:
            kept.append(self._fit(pending))
        problems = [f"{bad} damaged packet(s) could not be decoded"] if bad else []
        if not self.first and total and last is not None and last < total - _SEEK_MARGIN:
            problems.append(f"it ends at {last:.2f} s of the {total:.2f} s it states (truncated?)")
        return kept, "; ".join(problems) or None

    def _fit(self, frame: av.VideoFrame) -> np.ndarray:
        """Scale to cover the target straight from the decoder's pixel format, rotate for display, centre-crop."""
        turned = frame.rotation % 180 != 0
        shown_w, shown_h = (frame.height, frame.width) if turned else (frame.width, frame.height)
        scale = max(self.width / shown_w, self.height / shown_h)
        w, h = max(self.width, round(shown_w * scale)), max(self.height, round(shown_h * scale))
        if turned:
            w, h = h, w
        image = frame.reformat(width=w, height=h, format="rgb24", interpolation="LANCZOS").to_ndarray()
        image = np.rot90(image, frame.rotation // 90) if frame.rotation else image
        top, left = (image.shape[0] - self.height) // 2, (image.shape[1] - self.width) // 2
        return np.ascontiguousarray(image[top : top + self.height, left : left + self.width])


class _Unnamed(io.RawIOBase):
    """A file object's bytes without its name: FFmpeg guesses formats from names too (image2 reads `x.png` as an
    image-sequence pattern), and an input's format must come from its bytes alone."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def _packets(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.Packet]:
    """The stream's packets, then the empty one that flushes the decoder; a demuxing error ends them early (a
    truncated file), keeping what came before."""
    try:
        for packet in container.demux(stream):
            yield packet
    except av.FFmpegError:
        yield av.Packet()  # flush what the decoder holds
        return


def _fit(image: Image.Image, height: int, width: int) -> np.ndarray:
    return np.asarray(ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS))


def fit_frames(frames: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """Frames already in memory (uint8 `(T, H, W, 3)`) scaled and centre-cropped like `read_clip` does."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise MediaError(f"frames must be uint8 (T>0, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([_fit(Image.fromarray(frame), height, width) for frame in frames])


def _open(source: Source) -> BinaryIO:
    """A file object for `source`. Paths are opened here, not by FFmpeg, which would read `http:` or `concat:`
    as protocols and `%03d` as an image-sequence pattern."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        try:
            return open(source, "rb")
        except OSError as e:
            raise MediaError(f"cannot open {os.fspath(source)!r}: {e.strerror}") from e
    return source


def trim_to_clip_length(frames: np.ndarray, stride: int) -> np.ndarray:
    """The last 1 + stride * k frames: the frame counts a causal video VAE of that temporal `stride` (the Wan
    VAE's is 4) encodes without dropping a remainder. The end is kept because it is what a stream continues."""
    if len(frames) == 0:
        raise MediaError("no frames to trim")
    return frames[(len(frames) - 1) % stride :]


def _as_frames(frames: np.ndarray) -> np.ndarray:
    """Validate frames for H.264: uint8 `(T, H, W, 3)` (or one `(H, W, 3)` frame) with even sides (yuv420p)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    return frames


def _add_h264(
    container: av.container.OutputContainer, width: int, height: int, fps: int, options: dict[str, str]
) -> av.VideoStream:
    """A libx264 yuv420p stream at constant `fps`, tagged with the BT.601 limited-range matrix swscale converts
    RGB with, so players convert back with the same matrix instead of guessing."""
    stream = container.add_stream("libx264", rate=fps, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M (BT.601)
    stream.codec_context.color_range = 1  # AVCOL_RANGE_MPEG (limited)
    return stream


def _video_frame(frame: np.ndarray, index: int) -> av.VideoFrame:
    video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
    video_frame.pts = index  # in the stream's 1/fps time base: constant frame rate
    return video_frame


class Mp4Writer:
    """H.264 MP4 file written chunk by chunk, so a generator can stream frames to disk without holding them.

    A writer closed before any frame was written leaves an empty file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: int = DEFAULT_FPS, crf: int = 18) -> None:
        # Absolute, so FFmpeg cannot read a relative name like "data:1.mp4" as a protocol.
        url = os.path.abspath(path)
        self._container = av.open(url, "w", format="mp4", options={"movflags": "+faststart"})
        self._fps = fps
        self._crf = crf
        self._stream: av.VideoStream | None = None
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 `(T, H, W, 3)` frames (or one `(H, W, 3)` frame); the size is fixed by the first call."""
        if self._container is None:
            raise RuntimeError("Mp4Writer is closed")
        frames = _as_frames(frames)
        if self._stream is None:
            options = {"crf": str(self._crf)}
            self._stream = _add_h264(self._container, frames.shape[2], frames.shape[1], self._fps, options)
        elif frames.shape[1:3] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size {frames.shape[1:3]} differs from {(self._stream.height, self._stream.width)}")
        for frame in frames:
            self._container.mux(self._stream.encode(_video_frame(frame, self.frames_written)))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (moves the index to the front: `+faststart`)."""
        if self._container is None:
            return
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        self._container.close()
        self._container = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray | Iterable[np.ndarray], fps: int = DEFAULT_FPS) -> int:
    """Write frames (one uint8 `(T, H, W, 3)` array, or an iterable of chunks or single frames) to an H.264 MP4.

    Returns the number of frames written.
    """
    with Mp4Writer(path, fps=fps) as writer:
        for chunk in [frames] if isinstance(frames, np.ndarray) else frames:
            writer.write(chunk)
        return writer.frames_written


class Segment(bytes):
    """Bytes of one fragmented-MP4 segment, tagged so a server can start a late joiner at a keyframe.

    `init`: the init segment (ftyp + moov); every viewer needs it first.
    `keyframe`: a media fragment (moof + mdat) whose first frame is an IDR frame: decodable right after `init`.
    `frames`: how many frames a media fragment holds (0 for `init`).
    """

    init: bool
    keyframe: bool
    frames: int

    def __new__(cls, data: bytes, *, init: bool = False, keyframe: bool = False, frames: int = 0) -> Segment:
        segment = super().__new__(cls, data)
        segment.init, segment.keyframe, segment.frames = init, keyframe, frames
        return segment


class _Sink(io.RawIOBase):
    """Unseekable in-memory output, so FFmpeg writes the init segment once and never seeks back into it."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags) + payload)


_START_CODE = re.compile(b"\x00\x00\x01")
_TRACK_ID = 1  # FFmpeg's mp4 muxer numbers its only track 1
_SYNC_SAMPLE = 0x02000000  # sample_depends_on = 2: an IDR frame
_NON_SYNC_SAMPLE = 0x01010000  # sample_depends_on = 1, sample_is_non_sync_sample
_TICKS_PER_FRAME = 1000  # track timescale = fps * this: integer durations at any integer fps


def _annexb_to_avcc(data: bytes) -> bytes:
    """libx264's start-code-delimited NAL units to the 4-byte length prefixes MP4 samples carry.

    A NAL unit never contains 00 00 01 (emulation prevention); trailing zeros belong to the next 4-byte start code.
    """
    nals = (nal.rstrip(b"\x00") for nal in _START_CODE.split(data))
    return b"".join(struct.pack(">I", len(nal)) + nal for nal in nals if nal)


class FragmentedMp4Encoder:
    """Low-latency live H.264 encoder for one stream, producing fragmented MP4 in memory for MSE playback.

    libx264 runs with preset ultrafast, tune zerolatency (no lookahead, no B-frames: each frame's packet comes out
    of `encode` at once) and an IDR frame every `keyframe_interval` frames. Fragments are cut at every `encode`
    call and at every keyframe, so each fragment flagged `keyframe` is a join point for a late viewer.
    """

    def __init__(
        self, width: int, height: int, *, fps: int = DEFAULT_FPS, keyframe_interval: int | None = None, crf: int = 23
    ) -> None:
        """`keyframe_interval` in frames defaults to one second; smaller lets late joiners start sooner, at the
        cost of bitrate."""
        interval = keyframe_interval or fps
        if interval < 1 or fps < 1:
            raise ValueError(f"fps and keyframe_interval must be positive, got {fps} and {interval}")
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even height and width, got {height}x{width}")
        self._sink = _Sink()
        self._container = av.open(
            self._sink,
            "w",
            format="mp4",
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof",
                "video_track_timescale": str(fps * _TICKS_PER_FRAME),
            },
        )
        x264_params = f"keyint={interval}:min-keyint={interval}:scenecut=0:bframes=0"
        options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(crf), "x264-params": x264_params}
        self._stream = _add_h264(self._container, width, height, fps, options)
        self._container.start_encoding()  # writes ftyp + moov at once: with empty_moov it lists no samples
        self._init = Segment(bytes(self._sink.data), init=True)
        self._init_sent = False
        self._frames = 0  # frames handed to the encoder
        self._samples = 0  # frames already in fragments: their total duration is the next fragment's start
        self._sequence = 0
        self._closed = False

    @property
    def init_segment(self) -> Segment:
        """ftyp + moov: what a viewer must receive before any fragment, also when joining late."""
        return self._init

    @property
    def codec(self) -> str:
        """RFC 6381 codec string for MSE, e.g. `avc1.42c01e` (profile, constraints and level from the avcC box)."""
        at = self._init.find(b"avcC") + 5
        return "avc1." + self._init[at : at + 3].hex()

    def encode(self, frames: np.ndarray) -> list[Segment]:
        """Encode uint8 `(T, H, W, 3)` frames; returns the init segment (first call only) then complete fragments
        holding exactly these frames."""
        if self._closed:
            raise RuntimeError("FragmentedMp4Encoder is flushed")
        frames = _as_frames(frames)
        if frames.shape[1:3] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size {frames.shape[1:3]} differs from {(self._stream.height, self._stream.width)}")
        packets: list[av.Packet] = []
        for frame in frames:
            packets += self._stream.encode(_video_frame(frame, self._frames))
            self._frames += 1
        return self._segments(packets)

    def flush(self) -> bytes:
        """End the stream: whatever the encoder still held, as fragments (with zerolatency, normally nothing)."""
        if self._closed:
            return b""
        segments = self._segments(self._stream.encode(None))
        self._closed = True
        self._container.close()  # its trailer goes to the sink and is dropped: fragments need no index
        return b"".join(segments)

    def _segments(self, packets: list[av.Packet]) -> list[Segment]:
        segments = [] if self._init_sent else [self._init]
        self._init_sent = True
        starts = [i for i, packet in enumerate(packets) if i == 0 or packet.is_keyframe]
        for start, end in zip(starts, starts[1:] + [len(packets)]):
            segments.append(self._fragment(packets[start:end]))
        return segments

    def _fragment(self, packets: list[av.Packet]) -> Segment:
        """One moof + mdat: per-sample sizes and sync flags, constant duration, start time from the frame count."""
        self._sequence += 1
        start = self._samples * _TICKS_PER_FRAME
        self._samples += len(packets)
        samples = [_annexb_to_avcc(bytes(packet)) for packet in packets]
        entries = b"".join(
            struct.pack(">II", len(sample), _SYNC_SAMPLE if packet.is_keyframe else _NON_SYNC_SAMPLE)
            for sample, packet in zip(samples, packets)
        )

        def moof(data_offset: int) -> bytes:
            mfhd = _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence))
            # tfhd flags: default-base-is-moof | default-sample-duration | default-sample-flags.
            tfhd = _full_box(
                b"tfhd", 0, 0x020028, struct.pack(">III", _TRACK_ID, _TICKS_PER_FRAME, _NON_SYNC_SAMPLE)
            )
            tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", start))
            # trun flags: data-offset | sample-size | sample-flags.
            trun = _full_box(b"trun", 0, 0x000601, struct.pack(">Ii", len(samples), data_offset) + entries)
            return _box(b"moof", mfhd + _box(b"traf", tfhd + tfdt + trun))

        header = moof(0)
        mdat = _box(b"mdat", b"".join(samples))
        return Segment(moof(len(header) + 8) + mdat, keyframe=packets[0].is_keyframe, frames=len(packets))
