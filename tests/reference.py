"""Reproducing diffusers' `AnyFlowFARPipeline` bit for bit, for the tests that compare the engine against it.

NVIDIA's own inference code (NVlabs/AnyFlow, `_forward_inference`) attends a chunk's tokens to the cached context
and to themselves with plain SDPA. diffusers' port runs the same path through flex attention, whose `BlockMask`
works in blocks of 128 tokens: it pads the chunk's queries, keys and values with zeros to a multiple of 128 and,
with no mask on that path, the real queries attend to the zero keys too (each adds exp(0) to the softmax). The
engine does what NVIDIA's code does; a comparison with diffusers installs `ReferencePaddingAttnProcessor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from streamgen.engine import attention
from streamgen.engine.cache import LayerContext

BLOCK = 128  # flex attention's block size, to which diffusers pads


class ReferencePaddingAttnProcessor(attention.StreamingAttnProcessor):
    """The engine's self-attention plus diffusers' unmasked zero padding on denoising (not cache-writing) calls."""

    def keys_values(
        self, context: LayerContext, keys: torch.Tensor, values: torch.Tensor, freqs: torch.Tensor, write: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().keys_values(context, keys, values, freqs, write)
        if write:
            return keys, values
        tokens = freqs.shape[2]  # the computed tokens, whose count diffusers pads
        pad = keys.new_zeros(*keys.shape[:2], -tokens % BLOCK, keys.shape[3])
        return torch.cat([keys, pad], dim=2), torch.cat([values, pad], dim=2)


@contextlib.contextmanager
def padded_like_diffusers(transformer: torch.nn.Module) -> Iterator[None]:
    """Within the block, the engine on `transformer` attends as diffusers' pipeline does."""
    attention.install(transformer, ReferencePaddingAttnProcessor)
    try:
        yield
    finally:
        attention.install(transformer)
