"""The one configuration of a stream: every stream-level constant lives here and nowhere else.

The model's own constants (patch sizes, `full_chunk_limit`, layers) live in the diffusers `config.json` of the
transformer; the VAE's strides in the VAE's. What is left is how a stream is cut and paced, which is this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# Wan2.1 / AnyFlow-FAR conventions (NVIDIA's checkpoints): 16 fps video, first chunk 1 latent frame, then 3.
DEFAULT_FPS = 16
DEFAULT_FIRST_CHUNK_FRAMES = 1
DEFAULT_CHUNK_FRAMES = 3
DEFAULT_STEPS = 4
DEFAULT_HEIGHT = 480
DEFAULT_WIDTH = 832
# A compressed-context window that keeps a stream bounded: LongLive keeps 3 sink + 12 local latent frames.
DEFAULT_SINK_CHUNKS = 1
DEFAULT_WINDOW_CHUNKS = 4
MAX_STEPS = 64


@dataclass(frozen=True)
class StreamConfig:
    """How one stream is generated: resolution, chunking, pacing, step budget and cache policy.

    `window=None` keeps every compressed chunk (the reference pipeline's behaviour, unbounded memory);
    an integer keeps the first `sink` and the latest `window` compressed chunks.
    """

    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    fps: int = DEFAULT_FPS
    first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    steps: int = DEFAULT_STEPS
    sink: int = DEFAULT_SINK_CHUNKS
    window: int | None = DEFAULT_WINDOW_CHUNKS
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0 or self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be positive multiples of 16, got {self.height}x{self.width}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.first_chunk_frames < 1 or self.chunk_frames < 1:
            raise ValueError("chunk sizes must be at least one latent frame")
        check_steps(self.steps)
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None (unbounded), got {self.window}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    def chunk_size(self, index: int) -> int:
        """Latent frames in chunk `index` of a stream (the first is an image, the rest are clips)."""
        return self.first_chunk_frames if index == 0 else self.chunk_frames

    def partition(self, chunks: int) -> list[int]:
        """Latent frames of each of a stream's first `chunks` chunks (diffusers' `chunk_partition`)."""
        return [self.chunk_size(index) for index in range(chunks)]

    @property
    def max_chunk_frames(self) -> int:
        """Latent frames of a stream's largest chunk."""
        return max(self.first_chunk_frames, self.chunk_frames)

    def replace(self, **changes) -> "StreamConfig":
        return replace(self, **changes)


def check_steps(steps: int) -> int:
    """A step budget is any integer from 1 to MAX_STEPS; anything else is a caller's mistake."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return steps
