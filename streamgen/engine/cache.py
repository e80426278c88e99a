"""The KV cache of one stream: a small explicit object, budgeted and accounted.

FAR keeps two kinds of context. The latest `full_chunk_limit - 1` finished chunks are *full* context (2x2 patches,
what the current chunk sees in detail); older chunks are *compressed* context (1x4x4 patches, 4x fewer tokens).
Keys are stored before RoPE, so positions are assigned when the context is assembled: that is what lets a window
slide forever without running off the RoPE table.

Each finished chunk keeps its clean latents too: a full chunk is re-encoded when the compressed context under it
changes, a demoted chunk is encoded at compressed resolution, and a prompt switch re-encodes everything retained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SinkWindow:
    """Eviction policy `sink + window`: keep the first `sink` and the latest `window` compressed chunks.

    `window=None` never evicts, which reproduces the reference pipeline exactly (and grows without bound).
    """

    sink: int = 0
    window: int | None = None

    name = "sink+window"

    def __post_init__(self) -> None:
        if self.sink < 0 or (self.window is not None and self.window < 1):
            raise ValueError(f"sink must be >= 0 and window >= 1 or None, got sink={self.sink}, window={self.window}")

    @property
    def capacity(self) -> int | None:
        return None if self.window is None else self.sink + self.window

    def evict(self, num_chunks: int) -> list[int]:
        """Indices of compressed chunks to drop so that `num_chunks` fits (the oldest after the sinks go first)."""
        if self.capacity is None or num_chunks <= self.capacity:
            return []
        return list(range(self.sink, self.sink + num_chunks - self.capacity))


@dataclass(eq=False)  # identity, not tensor comparison
class CachedChunk:
    """One finished chunk: its clean latents and, per layer, its keys/values (pre-RoPE, `(B, heads, L, dim)`)."""

    latents: torch.Tensor  # (B, F, C, h, w), normalised latent space
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return self.latents.shape[1]

    @property
    def nbytes(self) -> int:
        tensors = [self.latents, *self.keys, *self.values]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LayerContext:
    """What one layer's self-attention sees besides the tokens being computed: rotated keys and values."""

    keys: torch.Tensor
    values: torch.Tensor
    reference_padding: bool = False  # see StreamingEngine(reference_padding=...)
    # Filled during a cache-writing forward with the new tokens' pre-RoPE keys/values.
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None


class KVCache:
    """Compressed and full-resolution context of one stream, with its eviction policy and byte count.

    The engine fills it (`StreamingEngine.commit`); the cache only stores, evicts and assembles.
    """

    def __init__(
        self, policy: SinkWindow, full_chunks: int, latent_size: tuple[int, int], max_chunk_frames: int
    ) -> None:
        self.policy = policy
        self.full_limit = full_chunks  # how many finished chunks stay at full resolution
        self.latent_size = latent_size  # (h, w) of every chunk of this stream
        self.max_chunk_frames = max_chunk_frames
        self.compressed: list[CachedChunk] = []
        self.full: list[CachedChunk] = []
        self.chunks_committed = 0
        self.chunks_evicted = 0
        # Per layer, the assembled (rotated) context; rebuilt once per committed chunk.
        self.layers: list[LayerContext] = []

    @property
    def context_frames(self) -> int:
        return sum(c.frames for c in self.compressed) + sum(c.frames for c in self.full)

    @property
    def nbytes(self) -> int:
        """Bytes held: stored chunks plus the assembled context (what a budget must count)."""
        stored = sum(c.nbytes for c in (*self.compressed, *self.full))
        assembled = sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers)
        return stored + assembled

    def evict(self) -> None:
        for index in reversed(self.policy.evict(len(self.compressed))):
            del self.compressed[index]
            self.chunks_evicted += 1

    def clear(self) -> None:
        self.compressed.clear()
        self.full.clear()
        self.layers.clear()
