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

    keys: torch.Tensor  # (B, heads, L, dim)
    values: torch.Tensor
    reference_padding: bool = False  # see StreamingEngine(reference_padding=...)
    # A preallocated slab `(B, heads, capacity, dim)` per keys and values whose first L tokens are `keys`/`values`
    # (see `KVCache.place`): the chunk's own tokens are written in place right after the context.
    room: tuple[torch.Tensor, torch.Tensor] | None = None
    # Filled during a cache-writing forward with the new tokens' pre-RoPE keys/values.
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None

    def with_tokens(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context followed by the computed tokens' (rotated) keys and values.

        In a slab this copies only the new tokens, at fixed addresses, instead of the whole context on every step
        of every layer: the gpt-fast static cache, which a CUDA graph can replay."""
        start, end = self.keys.shape[2], self.keys.shape[2] + keys.shape[2]
        if self.room is None or end > self.room[0].shape[2]:
            return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        slab_keys, slab_values = self.room
        slab_keys[:, :, start:end] = keys
        slab_values[:, :, start:end] = values
        return slab_keys[:, :, :end], slab_values[:, :, :end]


def concatenated(
    keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]], reference_padding: bool
) -> list[LayerContext]:
    """Per layer, the chunks' rotated keys and values joined into one context."""
    return [LayerContext(torch.cat(k, dim=2), torch.cat(v, dim=2), reference_padding) for k, v in zip(keys, values)]


class KVCache:
    """Compressed and full-resolution context of one stream, with its eviction policy and byte count.

    The engine fills it (`StreamingEngine.commit`); the cache only stores, evicts and assembles.
    """

    def __init__(
        self,
        policy: SinkWindow,
        full_chunks: int,
        latent_size: tuple[int, int],
        max_chunk_frames: int,
        tokens_per_frame: tuple[int, int],
    ) -> None:
        self.policy = policy
        self.full_limit = full_chunks  # how many finished chunks stay at full resolution
        self.latent_size = latent_size  # (h, w) of every chunk of this stream
        self.max_chunk_frames = max_chunk_frames
        self.tokens_per_frame = tokens_per_frame  # (full, compressed) resolution
        # Per layer, preallocated (keys, values) of `capacity_tokens` for a bounded policy (see `place`).
        self.slabs: list[tuple[torch.Tensor, torch.Tensor]] = []
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
    def capacity_tokens(self) -> int | None:
        """Most keys a denoising forward attends to: the retained context at its largest plus the chunk itself
        (None when the policy never evicts)."""
        if self.policy.capacity is None:
            return None
        full, compressed = self.tokens_per_frame
        return self.max_chunk_frames * (self.policy.capacity * compressed + (self.full_limit + 1) * full)

    @property
    def nbytes(self) -> int:
        """Bytes held: stored chunks plus the assembled context or its slabs (what a budget must count)."""
        stored = sum(c.nbytes for c in (*self.compressed, *self.full))
        if self.slabs:
            return stored + sum(k.numel() * k.element_size() * 2 for k, _ in self.slabs)
        return stored + sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers)

    def place(self, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]], reference_padding: bool) -> None:
        """Store the assembled context: per layer, the chunks' rotated keys and values in order.

        A bounded policy's context goes into slabs allocated once at `capacity_tokens`: once the window is full,
        every chunk's forward sees tensors of the same shape at the same addresses (static shapes for
        `torch.compile`, replayable CUDA graphs) and memory stays at its budget. An unbounded one is concatenated.
        """
        capacity = self.capacity_tokens
        if capacity is None:
            self.layers = concatenated(keys, values, reference_padding)
            return
        first = keys[0][0]
        shape = (*first.shape[:2], capacity, first.shape[3])
        if not self.slabs or self.slabs[0][0].shape != shape or self.slabs[0][0].dtype != first.dtype:
            self.slabs = [(first.new_empty(shape), first.new_empty(shape)) for _ in keys]
        self.layers = []
        for (slab_keys, slab_values), layer_keys, layer_values in zip(self.slabs, keys, values):
            end = 0
            for k, v in zip(layer_keys, layer_values):
                slab_keys[:, :, end : end + k.shape[2]] = k
                slab_values[:, :, end : end + k.shape[2]] = v
                end += k.shape[2]
            self.layers.append(
                LayerContext(slab_keys[:, :, :end], slab_values[:, :, :end], reference_padding, (slab_keys, slab_values))
            )

    def evict(self) -> None:
        for index in reversed(self.policy.evict(len(self.compressed))):
            del self.compressed[index]
            self.chunks_evicted += 1

    def clear(self) -> None:
        self.compressed.clear()
        self.full.clear()
        self.layers.clear()
        self.slabs.clear()
