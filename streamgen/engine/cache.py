"""The KV cache of one stream: a small explicit object, budgeted and accounted.

FAR keeps two kinds of context. The latest `full_chunk_limit - 1` finished chunks are *full* context (2x2 patches,
what the current chunk sees in detail); older chunks are *compressed* context (1x4x4 patches, 4x fewer tokens).

The context is held once: per layer, one keys and one values tensor with every retained chunk's tokens in order
(compressed, then full), keys before RoPE. Positions are assigned when a forward reads the context (rotation on
read, `LayerContext`), compactly from 0: that is what lets a window slide forever without running off the RoPE
table, and why evicting a chunk only moves the tokens behind it. A bounded policy's tensors are slabs allocated
once at the window's capacity plus one chunk, so memory is known when a stream opens (`capacity_bytes`).

Each finished chunk keeps its clean latents too: a full chunk is re-encoded when the compressed context under it
changes, a demoted chunk is encoded at compressed resolution, and a prompt switch re-encodes everything retained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .positions import rotate


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
    """One finished chunk: its clean latents; its keys/values live in its cache's one copy of the context."""

    latents: torch.Tensor  # (B, F, C, h, w), normalised latent space
    cache: "KVCache | None" = field(default=None, repr=False)

    @property
    def frames(self) -> int:
        return self.latents.shape[1]

    @property
    def nbytes(self) -> int:
        return self.latents.numel() * self.latents.element_size()

    @property
    def keys(self) -> list[torch.Tensor]:
        """A copy of this chunk's pre-RoPE keys per layer `(B, heads, L, dim)` (for inspection: it is no state)."""
        return self._tokens(0)

    @property
    def values(self) -> list[torch.Tensor]:
        return self._tokens(1)

    def _tokens(self, which: int) -> list[torch.Tensor]:
        start, end = self.cache.span(self)
        return [layer[which][:, :, start:end].clone() for layer in self.cache.storage]


@dataclass(frozen=True, eq=False)
class LayerContext:
    """What one layer's self-attention sees besides the tokens being computed: the cached context's pre-RoPE keys
    and values, and the RoPE table of the context followed by the computed tokens (compact positions).

    Keys are rotated as they are read, so the cache holds one copy of them; the rotation is elementwise, small
    next to the attention that reads the same keys."""

    keys: torch.Tensor  # (B, heads, L, dim), pre-RoPE
    values: torch.Tensor
    freqs: torch.Tensor  # (1, 1, L + computed tokens, dim / 2, 2): see `positions.rotate`
    # The stream's slabs `(B, heads, capacity, dim)` whose first L tokens are `keys`/`values` (bounded policies):
    # the computed tokens are written in place right after the context instead of concatenated.
    room: tuple[torch.Tensor, torch.Tensor] | None = None
    # A cache-writing forward's: takes the context followed by the computed tokens, pre-RoPE (`KVCache.keep`).
    keep: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def with_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, freqs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context followed by the computed tokens' pre-RoPE `keys` and `values`, keys rotated (`freqs`, the
        computed tokens' own table, is already the tail of `self.freqs`).

        In a slab this copies only the new tokens, at fixed addresses (the gpt-fast static cache, which a CUDA
        graph can replay); a cache-writing forward leaves them there, where they belong."""
        start, end = self.keys.shape[2], self.keys.shape[2] + keys.shape[2]
        if self.room is None or end > self.room[0].shape[2]:
            joined = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        else:
            slab_keys, slab_values = self.room
            slab_keys[:, :, start:end] = keys
            slab_values[:, :, start:end] = values
            joined = slab_keys[:, :, :end], slab_values[:, :, :end]
        if self.keep is not None:
            self.keep(*joined)
        return rotate(joined[0], self.freqs), joined[1]


class KVCache:
    """Compressed and full-resolution context of one stream, with its eviction policy and byte count.

    The engine fills it (`StreamingEngine.commit`); the cache only stores, evicts and accounts.
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
        self.compressed: list[CachedChunk] = []
        self.full: list[CachedChunk] = []
        # Per layer, (keys, values) `(B, heads, T, dim)`, keys pre-RoPE: the first `length` tokens are the
        # context, the first `encoded` compressed chunks' tokens first. Slabs of `capacity_tokens` for a bounded
        # policy, exactly `length` tokens for an unbounded one.
        self.storage: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = 0
        self.encoded = 0  # compressed chunks whose tokens are in `storage` (the rest were just demoted)
        self.chunks_committed = 0
        self.chunks_evicted = 0

    @property
    def chunks(self) -> list[CachedChunk]:
        """Retained chunks in context order."""
        return [*self.compressed, *self.full]

    @property
    def context_frames(self) -> int:
        return sum(c.frames for c in self.chunks)

    def tokens(self, chunk: CachedChunk) -> int:
        """Tokens of a retained chunk at its resolution in the context."""
        return chunk.frames * self.tokens_per_frame[chunk in self.compressed]

    def span(self, chunk: CachedChunk) -> tuple[int, int]:
        """Where a retained, encoded chunk's tokens lie in `storage`."""
        start = 0
        for other in self.chunks:
            if other is chunk:
                return start, start + self.tokens(chunk)
            start += self.tokens(other)
        raise ValueError("the chunk is not retained by this cache")

    @property
    def capacity_tokens(self) -> int | None:
        """Most keys a denoising forward attends to: the retained context at its largest plus the chunk itself
        (None when the policy never evicts)."""
        if self.policy.capacity is None:
            return None
        full, compressed = self.tokens_per_frame
        return self.max_chunk_frames * (self.policy.capacity * compressed + (self.full_limit + 1) * full)

    def capacity_bytes(
        self, layers: int, rows: int, heads: int, head_dim: int, dtype: torch.dtype, channels: int
    ) -> int:
        """The most bytes this cache holds (`nbytes` never exceeds it), known before anything is cached: the
        slabs and the retained chunks' latents at their largest. Raises for a policy that never evicts."""
        tokens = self.capacity_tokens
        if tokens is None:
            raise ValueError("a cache that never evicts (window=None) has no capacity: give it a window")
        size = torch.empty((), dtype=dtype).element_size()
        slabs = layers * 2 * rows * heads * tokens * head_dim * size
        chunks = self.policy.capacity + self.full_limit
        latents = chunks * self.max_chunk_frames * channels * self.latent_size[0] * self.latent_size[1] * size
        return slabs + latents

    @property
    def nbytes(self) -> int:
        """Bytes held: the chunks' latents and the one copy of the context (what a budget must count)."""
        stored = sum(c.nbytes for c in self.chunks)
        return stored + sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.storage)

    def context(self, prefix: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, views of the first `prefix` tokens (default: the whole context), pre-RoPE."""
        end = self.length if prefix is None else prefix
        return [(k[:, :, :end], v[:, :, :end]) for k, v in self.storage]

    def slabs(self, like: torch.Tensor, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The bounded policy's per-layer slabs for keys shaped like `like` `(B, heads, L, dim)`, allocated on
        first use; None for an unbounded policy (its context is concatenated)."""
        capacity = self.capacity_tokens
        if capacity is None:
            return None
        shape = (*like.shape[:2], capacity, like.shape[3])
        if not self.storage or self.storage[0][0].shape != shape or self.storage[0][0].dtype != like.dtype:
            self.storage = [(like.new_empty(shape), like.new_empty(shape)) for _ in range(layers)]
        return self.storage

    def keep(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """What a cache-writing forward computed for `layer`: its context followed by the encoded chunks' tokens,
        pre-RoPE, the layer's context from now on. A bounded policy's slabs hold them already (written in place)."""
        if self.policy.capacity is None:
            self.storage[layer : layer + 1] = [(keys, values)]

    def stored(self, length: int) -> None:
        """After a cache-writing forward: every retained chunk is encoded, the context is `length` tokens."""
        self.length = length
        self.encoded = len(self.compressed)

    def evict(self) -> None:
        """Drop the compressed chunks the policy evicts; the encoded tokens behind them move up to stay a prefix."""
        drop = self.policy.evict(len(self.compressed))
        if not drop:
            return
        first, last = drop[0], drop[-1] + 1
        start = sum(self.tokens(c) for c in self.compressed[:first])
        gap = sum(self.tokens(c) for c in self.compressed[first:last])
        end = sum(self.tokens(c) for c in self.compressed[: self.encoded])
        if end > start + gap:
            for keys, values in self.storage:
                for tensor in (keys, values):
                    tensor[:, :, start : end - gap] = tensor[:, :, start + gap : end].clone()
        self.encoded -= max(0, min(self.encoded, last) - first)
        for index in reversed(drop):
            del self.compressed[index]
            self.chunks_evicted += 1

    def clear(self) -> None:
        self.compressed.clear()
        self.full.clear()
        self.storage.clear()
        self.length = self.encoded = 0
