"""The engine's self-attention, installed on the diffusers model's `attn1` modules over the processor they had.

diffusers' causal processor needs flex attention with a `BlockMask` and reads its own dict cache, so it cannot read
a cache laid out our way. The engine's calls carry a `StreamContext` as `kv_cache` (a `LayerContext`, or a batch of
them, `batch.BatchContext`) that joins the context's pre-RoPE keys/values with the new tokens' and rotates them;
`rotary_emb` is the new tokens' frequencies, `attention_mask` a dense chunk-causal mask or None. Every other call
goes to the processor this one was installed over: diffusers' own, so the reference pipeline still runs on the
very same model object (or, in training, the dense one of `streamgen_train.attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .cache import LayerContext
from .positions import rotate

try:  # optional extra `flash`; SDPA is the fallback everywhere
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


@runtime_checkable
class StreamContext(Protocol):
    """What the engine passes a layer as `kv_cache`: the context its computed tokens attend to."""

    def with_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, freqs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on `(B, heads, L, dim)`: flash-attn on CUDA half precision, else SDPA."""
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def project(attn: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values `(B, heads, L, dim)` of self-attention, normalised as diffusers' processors do."""
    dtype = hidden_states.dtype
    q = attn.norm_q(attn.to_q(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    k = attn.norm_k(attn.to_k(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    return q, k, v


def output(attn: torch.nn.Module, attended: torch.Tensor) -> torch.Tensor:
    """The layer's output from attention's `(B, heads, L, dim)`: heads folded back, then the output projection."""
    return attn.to_out[1](attn.to_out[0](attended.transpose(1, 2).flatten(2, 3)))


class StreamingAttnProcessor:
    """Stateless: everything a call needs arrives as arguments, so one model serves many sessions."""

    def __init__(self, base: Callable[..., torch.Tensor]) -> None:
        self.base = base  # answers the calls that are not the engine's

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        kv_cache: StreamContext | None = None,
        kv_cache_flag: bool | None = None,
    ) -> torch.Tensor:
        if not isinstance(kv_cache, StreamContext):
            return self.base(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kv_cache, kv_cache_flag
            )
        q, k, v = project(attn, hidden_states)
        k, v = self.keys_values(kv_cache, k, v, rotary_emb, kv_cache_flag)
        return output(attn, attend(rotate(q, rotary_emb), k, v, attention_mask).type_as(q))

    def keys_values(
        self, context: LayerContext, keys: torch.Tensor, values: torch.Tensor, freqs: torch.Tensor, write: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the computed tokens attend to: the context followed by their own `keys` (rotated) and `values`.
        `write`: a cache-writing forward (a subclass may attend differently there)."""
        return context.with_tokens(keys, values, freqs)


def install(
    transformer: torch.nn.Module,
    processor: type[StreamingAttnProcessor] = StreamingAttnProcessor,
    base: Callable[..., torch.Tensor] | None = None,
) -> None:
    """Put `processor` (the engine's, or a variant such as the comparison tests' `tests/reference.py`) on every
    block's self-attention, over `base` or else the processor the layer had (idempotent)."""
    for block in transformer.blocks:
        current = block.attn1.processor
        under = base or (current.base if isinstance(current, StreamingAttnProcessor) else current)
        if type(current) is not processor or current.base is not under:
            block.attn1.set_processor(processor(under))
