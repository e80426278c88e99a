"""Several sessions' chunks denoised in one transformer call per step, as LLM servers batch requests.

Sessions on one device take turns chunk by chunk. One chunk's forward leaves a large accelerator underused;
running several together reads the weights once and fills the matrix units. A batch needs the same number of
tokens per sample, so chunks are grouped by shape (latent frames and size); within a group:

* contexts of different lengths are padded with zero keys/values to the longest, and the padding is masked;
  each layer's padded batch is built as the layer reads it (`BatchContext`), so batching holds no second copy
  of the sessions' contexts, only one layer's at a time;
* each chunk has its own RoPE positions (it starts after its own context): per-sample frequencies;
* different budgets run the same step index together with per-sample `(t, r)` (the model embeds timesteps per
  sample and frame, `(B, F)`); a session whose steps are done leaves the batch;
* classifier-free guidance doubles a session's rows, combined per session as `StreamingEngine.denoise` does.

Each session gets what `StreamingEngine.denoise` alone would give it, up to float rounding (`tests/test_batch.py`).
Cache updates stay per session: their shapes differ from stream to stream and they cost one forward per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import KVCache, LayerContext
from .positions import rotate
from .engine import StreamingEngine, TextCondition, _Piece


@dataclass(frozen=True)
class DenoiseRequest:
    """One session's chunk: what `StreamingEngine.denoise` takes."""

    cache: KVCache
    noise: torch.Tensor  # (B, F, C, h, w)
    text: TextCondition
    steps: int


@torch.no_grad()
def denoise_batch(engine: StreamingEngine, requests: list[DenoiseRequest]) -> list[torch.Tensor]:
    """Denoise every request's chunk; the result's order is the requests'."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        engine._check_latents(request.cache, request.noise, request.text)
        groups.setdefault(tuple(request.noise.shape[1:]), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(requests)
    for members in groups.values():
        # Longest budget first, so the sessions still denoising at any step index are a prefix of the batch.
        members.sort(key=lambda i: -len(engine.schedule(requests[i].steps)))
        for index, latents in zip(members, _denoise_group(engine, [requests[i] for i in members])):
            out[index] = latents
    return out


class BatchContext:
    """One layer's context for a batch: each session's cached keys rotated at its own positions, padded to the
    longest, then the chunks' tokens. The sessions still denoising are a prefix of the batch; how many rows a
    call computes says which."""

    def __init__(self, layers: list[LayerContext], rows: list[int], longest: int) -> None:
        self.layers, self.rows, self.longest = layers, rows, longest

    def with_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, freqs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context_keys, context_values, computed = [], [], 0
        for layer, rows in zip(self.layers, self.rows):
            if computed == keys.shape[0]:
                break
            pad = (0, 0, 0, self.longest - layer.keys.shape[2])
            context_keys.append(F.pad(rotate(layer.keys, layer.freqs), pad))
            context_values.append(F.pad(layer.values, pad))
            computed += rows
        rotated = torch.cat([*context_keys], dim=0)
        return (
            torch.cat([rotated, rotate(keys, freqs)], dim=2),
            torch.cat([torch.cat(context_values, dim=0), values], dim=2),
        )


def _denoise_group(engine: StreamingEngine, requests: list[DenoiseRequest]) -> list[torch.Tensor]:
    plans = [engine.schedule(request.steps) for request in requests]
    rows = [request.text.model_input.shape[0] for request in requests]
    frames = requests[0].noise.shape[1]
    freqs = [engine.rope(r.cache, r.cache.context_frames, frames, False) for r in requests]
    layers, mask = _context(engine, requests, rows)
    if all(f is freqs[0] for f in freqs):  # same positions (windows full): broadcast one table
        freqs = freqs[0]
    else:
        freqs = torch.cat([f.expand(n, *f.shape[1:]) for f, n in zip(freqs, rows)])
    embeds = torch.cat([request.text.model_input for request in requests])

    z = [request.noise for request in requests]
    for k in range(len(plans[0])):
        active = sum(len(plan) > k for plan in plans)
        n = sum(rows[:active])
        steps = [plan[k] for plan in plans[:active]]
        x = torch.cat([request.text.batch(latents) for request, latents in zip(requests, z[:active])])
        t = torch.cat([step.t.expand(m, frames) for step, m in zip(steps, rows)])
        r = torch.cat([step.r.expand(m, frames) for step, m in zip(steps, rows)])
        u = engine._forward(
            layers,
            [_Piece(x, False)],
            t,
            r,
            TextCondition(embeds[:n]),
            freqs if freqs.shape[0] == 1 else freqs[:n],
            None if mask is None else mask[:n],
            False,
        )
        for i, (step, velocity) in enumerate(zip(steps, u.split(rows[:active]))):
            z[i] = step.jump(z[i], requests[i].text.combine(velocity))
    return z


def _context(
    engine: StreamingEngine, requests: list[DenoiseRequest], rows: list[int]
) -> tuple[list[BatchContext], torch.Tensor | None]:
    """Per layer, all sessions' contexts, to be padded to the longest; the mask hides the padding (None when
    every context has the same length, so attention keeps its fastest kernels)."""
    contexts = []
    for request in requests:
        cache = request.cache
        table = engine.context_freqs(cache, cache.chunks)
        contexts.append([LayerContext(k, v, table) for k, v in engine.cached(cache, request.text)])
    lengths = [request.cache.length for request in requests]
    longest = max(lengths)
    layers = [BatchContext(list(per_session), rows, longest) for per_session in zip(*contexts)]
    if len(set(lengths)) == 1:
        return layers, None
    tokens = requests[0].noise.shape[1] * requests[0].cache.tokens_per_frame[0]
    mask = torch.ones(sum(rows), 1, 1, longest + tokens, dtype=torch.bool, device=engine.device)
    start = 0
    for length, count in zip(lengths, rows):
        mask[start : start + count, ..., length:longest] = False
        start += count
    return layers, mask
