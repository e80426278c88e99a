"""The streaming forward: denoise one chunk against the cache, then fold the clean chunk into the cache.

Read top to bottom: `denoise` runs `steps` flow-map jumps `z_r = z_t - (t - r) * u(z_t, t, r)` on the chunk's
tokens, attending to the cached context; `commit` adds the finished chunk. The reference pipeline re-encodes the
whole clean prefix after every chunk. Its cache pass is chunk-causal (a compressed chunk sees only earlier
compressed chunks; a full chunk sees all compressed context and earlier full chunks), so it is enough to encode
the chunk that just left the full-resolution window, at compressed resolution, and re-encode the few full chunks:
the same keys and values, at constant cost per chunk.

The model is diffusers' `AnyFlowFARTransformer3DModel`, used as is: its patch embeddings, condition embedder,
blocks and output head, called through `streamgen.diffusers_adapter` (they are private to diffusers); only
self-attention gets our processor (`attention.py`).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from diffusers import FlowMapEulerDiscreteScheduler

from .. import diffusers_adapter as adapter
from ..config import check_steps
from . import attention
from .cache import CachedChunk, KVCache, LayerContext, SinkWindow
from .positions import rope_frequencies


@dataclass
class TextCondition:
    """Prompt embeddings for a stream; with `guidance_scale > 1` the negative ones ride in the same batch."""

    embeds: torch.Tensor  # (B, tokens, text_dim)
    negative: torch.Tensor | None = None
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.embeds.ndim != 3:
            raise ValueError(f"prompt embeddings must be (batch, tokens, dim), got shape {tuple(self.embeds.shape)}")
        if self.guided and (self.negative is None or self.negative.shape != self.embeds.shape):
            raise ValueError("guidance_scale > 1 needs negative embeddings of the same shape as the prompt's")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def model_input(self) -> torch.Tensor:
        return torch.cat([self.negative, self.embeds]) if self.guided else self.embeds

    def batch(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents, latents]) if self.guided else latents

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class FlowStep:
    """One flow-map jump from `t` to `r` (timesteps in scheduler units, sigmas in [0, 1]; float64 like diffusers)."""

    t: torch.Tensor
    r: torch.Tensor
    sigma_t: torch.Tensor
    sigma_r: torch.Tensor

    def to(self, device: torch.device) -> "FlowStep":
        return FlowStep(*(x.to(device) for x in (self.t, self.r, self.sigma_t, self.sigma_r)))

    def jump(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """`z_r = z_t - (sigma_t - sigma_r) * u`, in the velocity's dtype."""
        view = (1,) * u.ndim
        return (z - (self.sigma_t.view(view) - self.sigma_r.view(view)) * u).to(u.dtype)


def flow_schedule(scheduler: FlowMapEulerDiscreteScheduler, steps: int) -> list[FlowStep]:
    """The (t, r) pairs of an `steps`-step budget, with the scheduler's shift; `t == r` jumps are skipped."""
    scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates; sessions share the pipeline's scheduler
    scheduler.set_timesteps(check_steps(steps), device="cpu")
    scale = scheduler.config.num_train_timesteps
    plan = []
    for i, t in enumerate(scheduler.timesteps):
        r = scheduler.sigmas[i + 1] * scale
        if t != r:
            plan.append(FlowStep(t, r, scheduler.sigmas[i], scheduler.sigmas[i + 1]))
    return plan


# RoPE tables kept per engine: a sink+window stream uses about a dozen; an unbounded one (the reference mode) about
# one per chunk, up to the end of the RoPE table, and recomputing them costs more than its whole forward.
_FREQS_CACHE_SIZE = 1024


@dataclass
class _Piece:
    """Tokens being computed in one forward: one chunk's latents at full or compressed resolution."""

    latents: torch.Tensor  # (B, F, C, h, w)
    compressed: bool


class StreamingEngine:
    """Stateless over sessions: each stream's state is its `KVCache`; the engine only owns the model."""

    def __init__(self, transformer: torch.nn.Module, scheduler: FlowMapEulerDiscreteScheduler) -> None:
        attention.install(transformer)
        self.transformer = transformer
        self.scheduler = scheduler
        self.config = transformer.config
        self.model_calls = 0  # transformer forwards so far: denoising steps plus cache updates
        # Device-resident per-call constants, so that a chunk's steps copy nothing from the host.
        self._schedules: dict[tuple[int, torch.device], list[FlowStep]] = {}
        self._freqs: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def new_cache(self, latent_size: tuple[int, int], max_chunk_frames: int, policy: SinkWindow) -> KVCache:
        h, w = latent_size
        down = self.config.compressed_patch_size
        if h <= 0 or w <= 0 or h % down[1] or w % down[2]:
            raise ValueError(f"latent size {h}x{w} must be positive multiples of {down[1]}x{down[2]}")
        tokens = tuple(a * b for a, b in (self._grid((h, w), False), self._grid((h, w), True)))
        return KVCache(policy, self.config.full_chunk_limit - 1, (h, w), max_chunk_frames, tokens)

    def schedule(self, steps: int) -> list[FlowStep]:
        key = (steps, self.device)
        if key not in self._schedules:
            self._schedules[key] = [step.to(self.device) for step in flow_schedule(self.scheduler, steps)]
        return self._schedules[key]

    def rope(self, cache: KVCache, start: int, frames: int, compressed: bool) -> torch.Tensor:
        """RoPE frequencies of frames `start .. start + frames - 1`, cached on the device: once a stream's window is
        full, every chunk asks for the same few."""
        grid = self._grid(cache.latent_size, compressed)
        key = (start, frames, compressed, grid, self.device)
        if key not in self._freqs:
            if len(self._freqs) >= _FREQS_CACHE_SIZE:  # a bound, should many resolutions share the engine
                self._freqs.clear()
            positions = torch.arange(start, start + frames)
            self._freqs[key] = rope_frequencies(self.transformer.rope, positions, grid, compressed, self.device)
        return self._freqs[key]

    def compile(self, **options) -> None:
        """`torch.compile` each transformer block (regional compilation: the blocks share their code, so the
        compiled code is reused across them). Shapes are dynamic: the context grows until the window is full."""
        for block in self.transformer.blocks:
            block.compile(**{"dynamic": True} | options)

    @torch.no_grad()
    def denoise(
        self, cache: KVCache, noise: torch.Tensor, text: TextCondition, steps: int, start: int = 0
    ) -> torch.Tensor:
        """Denoise one chunk from its initial `noise` `(B, F, C, h, w)` in `steps` flow-map jumps; from the
        `start`-th jump on, `noise` is latents already at that jump's `sigma_t` (SDEdit)."""
        self._check_latents(cache, noise, text)
        freqs = self.rope(cache, cache.context_frames, noise.shape[1], False)
        layers = self.context(cache, text, freqs)
        z = noise
        for step in self.schedule(steps)[start:]:
            x = text.batch(z)
            t = step.t.expand(x.shape[0], x.shape[1])
            r = step.r.expand(x.shape[0], x.shape[1])
            z = step.jump(z, text.combine(self._forward(layers, [_Piece(x, False)], t, r, text, freqs, None, False)))
        return z

    def context(self, cache: KVCache, text: TextCondition, freqs: torch.Tensor) -> list[LayerContext]:
        """What a chunk's tokens, whose RoPE table is `freqs`, attend to besides themselves, per layer (an empty
        context before the first commit)."""
        table = torch.cat([self.context_freqs(cache, cache.chunks), freqs], dim=2)
        return self._layers(cache, cache.length, table, text)

    def context_freqs(self, cache: KVCache, chunks: list[CachedChunk]) -> torch.Tensor:
        """The RoPE table of retained `chunks` laid out in order at compact positions 0, 1, ..."""
        tables, start = [], 0
        for chunk in chunks:
            tables.append(self.rope(cache, start, chunk.frames, chunk in cache.compressed))
            start += chunk.frames
        if not tables:
            return self.rope(cache, 0, 1, False)[:, :, :0]
        return torch.cat(tables, dim=2)

    def cache_bytes(self, cache: KVCache, rows: int) -> int:
        """The most bytes `cache` will hold for a stream of `rows` batch rows (2 with guidance): its capacity."""
        cfg = self.config
        layers = len(self.transformer.blocks)
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        return cache.capacity_bytes(layers, rows, heads, head_dim, self.dtype, cfg.in_channels)

    @torch.no_grad()
    def commit(self, cache: KVCache, latents: torch.Tensor, text: TextCondition) -> None:
        """Append a finished chunk's clean latents: demote, evict, encode the new keys/values (one forward)."""
        self._check_latents(cache, latents, text)
        cache.full.append(CachedChunk(latents, cache))
        demoted = cache.full[: -cache.full_limit] if cache.full_limit else cache.full[:]
        cache.full = cache.full[len(demoted) :]
        cache.compressed.extend(CachedChunk(chunk.latents, cache) for chunk in demoted)  # re-encoded compressed
        cache.evict()
        self._encode(cache, text)
        cache.chunks_committed += 1

    @torch.no_grad()
    def recache(self, cache: KVCache, text: TextCondition) -> None:
        """Re-encode every retained chunk under new text (LongLive's KV re-cache for a prompt switch)."""
        cache.encoded = 0
        if cache.chunks:
            self._encode(cache, text)

    def _encode(self, cache: KVCache, text: TextCondition) -> None:
        """Encode at t = r = 0 the compressed chunks not yet encoded and all full chunks, against the rest; their
        keys/values land in the cache right behind the encoded context."""
        context = cache.compressed[: cache.encoded]
        chunks = cache.compressed[cache.encoded :] + cache.full
        pieces = [_Piece(text.batch(c.latents), c in cache.compressed) for c in chunks]

        start = sum(c.frames for c in context)
        freqs, chunk_ids = [], []
        for index, (chunk, piece) in enumerate(zip(chunks, pieces)):
            freqs.append(self.rope(cache, start, chunk.frames, piece.compressed))
            start += chunk.frames
            chunk_ids.append(torch.full((freqs[-1].shape[2],), index, device=self.device))
        ids = torch.cat(chunk_ids)
        prefix = sum(cache.tokens(c) for c in context)
        table = torch.cat([self.context_freqs(cache, context), *freqs], dim=2)
        layers = self._layers(cache, prefix, table, text, write=True)
        visible = torch.ones(len(ids), prefix, dtype=torch.bool, device=self.device)
        mask = torch.cat([visible, ids[:, None] >= ids[None, :]], dim=1)

        frames = sum(c.frames for c in chunks)
        zeros = torch.zeros(pieces[0].latents.shape[0], frames, dtype=torch.float64, device=self.device)
        self._forward(layers, pieces, zeros, zeros, text, torch.cat(freqs, dim=2), mask, True)
        cache.stored(prefix + sum(cache.tokens(c) for c in chunks))

    def cached(
        self, cache: KVCache, text: TextCondition, prefix: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the first `prefix` tokens (default: all) of the cached context, pre-RoPE keys and values;
        empty before the first commit."""
        if cache.storage:
            return cache.context(prefix)
        cfg, batch = self.config, text.model_input.shape[0]
        shape = (batch, cfg.num_attention_heads, 0, cfg.attention_head_dim)
        empty = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return [(empty, empty)] * len(self.transformer.blocks)

    def _layers(
        self, cache: KVCache, prefix: int, table: torch.Tensor, text: TextCondition, write: bool = False
    ) -> list[LayerContext]:
        """Per layer, the first `prefix` context tokens as a forward reads them; `table`: RoPE of the context and
        of the tokens the forward computes. `write`: the forward's keys and values go into the cache."""
        context = self.cached(cache, text, prefix)
        slabs = cache.slabs(context[0][0], len(context)) or [None] * len(context)
        layers = []
        for index, ((keys, values), room) in enumerate(zip(context, slabs)):
            keep = functools.partial(cache.keep, index) if write else None
            if room is not None:
                keys, values = room[0][:, :, :prefix], room[1][:, :, :prefix]
            layers.append(LayerContext(keys, values, table, room, keep))
        return layers

    def _forward(
        self,
        layers: list[LayerContext],
        pieces: list[_Piece],
        t: torch.Tensor,
        r: torch.Tensor,
        text: TextCondition,
        freqs: torch.Tensor,
        mask: torch.Tensor | None,
        write: bool,
    ) -> torch.Tensor | None:
        """One transformer call over `pieces` (compressed ones first); returns the velocity unless writing."""
        model = self.transformer
        self.model_calls += 1
        hidden = torch.cat([adapter.embed(model, p.latents, p.compressed) for p in pieces], dim=1)
        size = tuple(pieces[0].latents.shape[-2:])
        full = sum(p.latents.shape[1] for p in pieces if not p.compressed)
        temb, modulation, text_states = adapter.condition(model, t, r, text.model_input, full, size)
        for block, layer in zip(model.blocks, layers):
            hidden = adapter.run_block(block, hidden, text_states, modulation, freqs, mask, layer, write)
        if write:
            return None
        return adapter.output_head(model, hidden, temb, pieces[0].latents.shape[1], size)

    def _grid(self, latent_size: tuple[int, int], compressed: bool) -> tuple[int, int]:
        """Tokens per frame along height and width at full or compressed resolution."""
        patch = self.config.compressed_patch_size if compressed else self.config.patch_size
        return latent_size[0] // patch[1], latent_size[1] // patch[2]

    def _check_latents(self, cache: KVCache, latents: torch.Tensor, text: TextCondition) -> None:
        """Reject what would otherwise fail deep inside the model, or silently compute nonsense."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"chunk latents must be a 5-d tensor (batch, frames, channels, h, w), got {shape}")
        batch, frames, channels, h, w = latents.shape
        expected = (text.embeds.shape[0], self.config.in_channels, *cache.latent_size)
        if (batch, channels, h, w) != expected:
            raise ValueError(
                f"chunk latents of shape {tuple(latents.shape)} do not match this stream: expected "
                f"(batch={expected[0]}, frames, channels={expected[1]}, h={expected[2]}, w={expected[3]})"
            )
        if not 1 <= frames <= cache.max_chunk_frames:
            raise ValueError(f"a chunk has 1 to {cache.max_chunk_frames} latent frames, got {frames}")
        if latents.dtype != self.dtype or latents.device != self.device:
            raise ValueError(
                f"chunk latents are {latents.dtype} on {latents.device}, the model is {self.dtype} on {self.device}"
            )
        if text.embeds.device != self.device:
            raise ValueError(f"prompt embeddings are on {text.embeds.device}, the model is on {self.device}")
