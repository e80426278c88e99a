"""The wire protocol, version 1 (docs/protocol.md): what clients may send, checked here, and what they receive.

Pure functions and data, no sockets and no event loop, so any transport (the websockets adapter, an ASGI
websocket) and the tests share one definition of a valid message and one list of error codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from streamgen.config import check_steps
from streamgen.inputs import DEFAULT_CONTEXT_FRAMES
from streamgen.media import MAX_PIXELS
from streamgen.runtime import AUTO

PROTOCOL_VERSION = 1
MODES = ("t2v", "i2v", "v2v")  # text, image or video to video; i2v and v2v are followed by one binary upload
# What an i2v/v2v stream shows of its upload before the generated chunks: the VAE's reconstruction (what the model
# continues) or the uploaded frames themselves, resized (what the uploader recognises).
CONTEXTS = ("reconstruction", "original")
MAX_SEED = 2**53 - 1  # integers JavaScript reads exactly, so a browser can replay a stream's seed
MAX_TRANSITION_CHUNKS = 32  # the longest prompt transition (`prompt` message), about 24 s at 16 fps
MAX_TARGET_FPS = 240.0  # the most an "auto" step budget may be asked to hold


class ErrorCode(StrEnum):
    """Every failure a client can be told about; each reaches it as `{"type": "error", "code", "message"}`."""

    BAD_JSON = "bad_json"  # not JSON, not an object, or nested too deep
    BAD_MESSAGE = "bad_message"  # missing, unknown or mistyped fields
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    OUT_OF_RANGE = "out_of_range"  # a value of the right type outside its range (steps, seed, prompt length)
    TOO_LARGE = "too_large"  # a control message or an announced upload over its limit
    RATE_LIMITED = "rate_limited"
    NO_SESSION = "no_session"  # a command for a session this connection does not have
    SESSION_EXISTS = "session_exists"  # a second start while one is live: one session per connection
    UNEXPECTED_BINARY = "unexpected_binary"  # binary data with no upload announced
    BAD_UPLOAD = "bad_upload"  # an upload whose size differs from the announced one
    BAD_MEDIA = "bad_media"  # an upload the media library cannot decode
    SERVER_FULL = "server_full"  # every session slot busy and the waiting queue full
    TOO_MANY_SESSIONS = "too_many_sessions"  # this client address holds `max_sessions_per_client` sessions already
    UNAUTHORIZED = "unauthorized"  # handshake without the server's token (HTTP 401)
    FORBIDDEN_ORIGIN = "forbidden_origin"  # handshake from a page of another site (HTTP 403)
    FORBIDDEN_HOST = "forbidden_host"  # a Host the server is not reachable as: DNS rebinding (HTTP 403)
    NOT_FOUND = "not_found"  # HTTP route that does not exist; a watch link of no live stream (HTTP 404)
    WRONG_KEY = "wrong_key"  # a watch link with the wrong key (HTTP 403)
    WATCH_ONLY = "watch_only"  # a message from a viewer, who cannot control the stream it watches
    METHOD_NOT_ALLOWED = "method_not_allowed"  # HTTP method other than GET (and HEAD for pages) (HTTP 405)
    BAD_REQUEST = "bad_request"  # HTTP request with a missing or repeated Host, or a repeated Origin (HTTP 400)
    INTERNAL = "internal"  # a failure of the server itself; the session ends, the connection stays


class ProtocolError(Exception):
    """A request the server refuses; the connection answers it with an `error` message and stays open."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the server. Documented in docs/protocol.md and announced in `ready`."""

    max_message_bytes: int = 64 * 1024  # one JSON control message
    max_upload_bytes: int = 16 * 1024 * 1024  # one image or clip to extend
    max_context_frames: int = DEFAULT_CONTEXT_FRAMES  # the last frames of an uploaded clip, at the stream's fps
    max_pixels: int = MAX_PIXELS  # frames of an upload declaring more are refused before decoding
    max_prompt_chars: int = 2000
    messages_per_second: float = 50.0  # sustained rate of client messages...
    message_burst: int = 200  # ...with bursts up to this many
    max_queued: int = 32  # sessions waiting for a slot
    max_connections: int = 128
    max_sessions_per_client: int = 4  # live sessions (holding a slot or queued) of one client IP address
    max_pause_seconds: float = 60.0  # a session paused longer is stopped (reason "idle"), freeing its slot
    chunk_buffer: int = 2  # encoded chunks waiting per session before its generation waits for the client
    max_viewers_per_session: int = 32  # watchers of one stream (audience.py)
    max_viewers: int = 96  # watchers of all streams together (each is a connection too)
    viewer_buffer: int = 2  # chunks queued for a viewer before it is dropped to the next key frame

    def announce(self) -> dict[str, Any]:
        """The limits a client must respect, as sent in `ready`."""
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_upload_bytes": self.max_upload_bytes,
            "max_context_frames": self.max_context_frames,
            "max_pixels": self.max_pixels,
            "max_prompt_chars": self.max_prompt_chars,
            "messages_per_second": self.messages_per_second,
            "message_burst": self.message_burst,
            "max_sessions_per_client": self.max_sessions_per_client,
            "max_pause_seconds": self.max_pause_seconds,
        }


# -- client -> server -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    prompt: str
    mode: str = "t2v"
    seed: int | None = None
    steps: int | str | None = None  # an integer, "auto", or None: the server's default
    target_fps: float | None = None  # "auto" steps: the rate to hold (default: the stream's fps)
    upload_bytes: int = 0  # i2v/v2v: size of the binary message that must follow
    realtime: bool = True  # pace generation to playback speed (a viewer) or run flat out (a recorder)
    context: str = CONTEXTS[0]  # i2v/v2v: what is shown of the upload (CONTEXTS)


@dataclass(frozen=True)
class SetPrompt:
    prompt: str
    transition: int = 0  # chunks over which the new prompt is blended in; 0: a cut


@dataclass(frozen=True)
class SetSteps:
    steps: int | str  # an integer or "auto"
    target_fps: float | None = None


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Command = Start | SetPrompt | SetSteps | Pause | Resume | Stop


def parse(text: str, limits: Limits) -> Command:
    """Validate one text message into a command, or raise `ProtocolError` saying what is wrong with it."""
    if len(text.encode()) > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"control messages are limited to {limits.max_message_bytes} bytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a message must be a JSON object")
    kind = data.pop("type", None)
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message needs a string field 'type'")
    if kind not in _FIELDS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}; known: {list(_FIELDS)}")
    allowed, required = _FIELDS[kind]
    unknown = sorted(data.keys() - allowed)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: unknown field(s) {unknown[:5]}")
    missing = sorted(required - data.keys())
    if missing:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: missing field(s) {missing}")
    if kind == "start":
        return _start(data, limits)
    if kind == "prompt":
        transition = _integer(data.get("transition", 0), "transition", 0, MAX_TRANSITION_CHUNKS)
        return SetPrompt(_prompt(data["prompt"], limits), transition)
    if kind == "steps":
        return SetSteps(_steps(data["steps"]), _target_fps(data))
    return {"pause": Pause, "resume": Resume, "stop": Stop}[kind]()


# type -> (allowed fields, required fields)
_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "start": (
        {"protocol", "mode", "prompt", "seed", "steps", "target_fps", "upload_bytes", "realtime", "context"},
        {"prompt"},
    ),
    "prompt": ({"prompt", "transition"}, {"prompt"}),
    "steps": ({"steps", "target_fps"}, {"steps"}),
    "pause": (set(), set()),
    "resume": (set(), set()),
    "stop": (set(), set()),
}


def _start(data: dict[str, Any], limits: Limits) -> Start:
    version = data.get("protocol", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"this server speaks protocol {PROTOCOL_VERSION}")
    mode = data.get("mode", "t2v")
    if mode not in MODES:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: mode must be one of {list(MODES)}")
    upload = data.get("upload_bytes", 0)
    if mode == "t2v":
        if upload:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: t2v takes no upload")
    elif "upload_bytes" not in data:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"start: {mode} needs upload_bytes, the size of the upload to follow"
        )
    else:
        if isinstance(upload, int) and upload > limits.max_upload_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"start: uploads are limited to {limits.max_upload_bytes} bytes")
        if upload == 0 and not isinstance(upload, bool):
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "start: the file is empty (upload_bytes 0)")
        upload = _integer(upload, "upload_bytes", 1, limits.max_upload_bytes)
    context = data.get("context", CONTEXTS[0])
    if context not in CONTEXTS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: context must be one of {list(CONTEXTS)}")
    realtime = data.get("realtime", True)
    if not isinstance(realtime, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: realtime must be true or false")
    seed = data.get("seed")
    return Start(
        prompt=_prompt(data["prompt"], limits),
        mode=mode,
        seed=None if seed is None else _integer(seed, "seed", 0, MAX_SEED),
        steps=None if data.get("steps") is None else _steps(data["steps"]),
        target_fps=_target_fps(data),
        upload_bytes=upload,
        realtime=realtime,
        context=context,
    )


def _prompt(value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "prompt must be a non-empty string")
    if len(value) > limits.max_prompt_chars:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"prompt is limited to {limits.max_prompt_chars} characters")
    try:
        value.encode()  # JSON can spell a lone surrogate ("\ud800"), which no text encoder takes
    except UnicodeEncodeError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "prompt must be valid Unicode text (no lone surrogates)") from None
    return value


def _steps(value: Any) -> int | str:
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f'steps must be an integer or "auto", got {json.dumps(value)[:40]}'
        )
    try:
        return check_steps(value)
    except ValueError as e:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, str(e)) from None


def _target_fps(data: dict[str, Any]) -> float | None:
    """The rate an "auto" budget holds: only with `steps: "auto"`, a number in (0, MAX_TARGET_FPS]."""
    value = data.get("target_fps")
    if value is None:
        return None
    if data.get("steps") != AUTO:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, 'target_fps goes with steps "auto"')
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"target_fps must be a number, got {json.dumps(value)[:40]}")
    if not 0 < value <= MAX_TARGET_FPS:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"target_fps must be above 0 and at most {MAX_TARGET_FPS}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} must be an integer from {low} to {high}")
    return value


# -- server -> client -----------------------------------------------------------------------------------------
def event(kind: str, /, **fields: Any) -> dict[str, Any]:
    """One server message; serialized with `encode` when it is sent."""
    return {"type": kind, **fields}


def segment(kind: str, *, nbytes: int, **fields: Any) -> dict[str, Any]:
    """The `segment` message that announces a binary media message of `nbytes` bytes (`kind`: init, context,
    chunk; `fields`: chunk, first_frame, frames, keyframe for media)."""
    return event("segment", kind=kind, **fields, bytes=nbytes)


def error(code: ErrorCode, message: str) -> dict[str, Any]:
    return event("error", code=str(code), message=message)


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
