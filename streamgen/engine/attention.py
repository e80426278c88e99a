"""Self-attention for the FAR blocks, installed on the diffusers model's `attn1` modules.

diffusers' causal processor needs flex attention with a `BlockMask`, which has no backward on CPU and cannot read
a cache laid out our way. This processor serves three callers, all through the model's own block `forward`:

* the streaming engine: `kv_cache` is a `LayerContext` (or `batch.BatchContext`) that joins the context's
  pre-RoPE keys/values with the new tokens' and rotates them, `rotary_emb` the new tokens' frequencies,
  `attention_mask` a dense chunk-causal mask or None; after a cache-writing forward (`kv_cache_flag=True`) the
  joined keys/values are the cache's new context;
* training: dense boolean `attention_mask` and diffusers' rotary dict, plain SDPA (differentiable on CPU);
* diffusers' own FAR paths (a `BlockMask` or its dict cache): handed unchanged to diffusers' processor, so the
  reference pipeline still runs on the very same model object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from ..diffusers_adapter import AnyFlowCausalAttnProcessor, apply_rotary_emb
from .cache import LayerContext
from .positions import rotate

try:  # optional extra `flash`; SDPA is the fallback everywhere
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on `(B, heads, L, dim)`: flash-attn on CUDA half precision, else SDPA."""
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class StreamingAttnProcessor:
    """Stateless: everything a call needs arrives as arguments, so one model serves many sessions."""

    def __init__(self) -> None:
        self._diffusers = AnyFlowCausalAttnProcessor()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | BlockMask | None = None,
        rotary_emb: torch.Tensor | dict[str, torch.Tensor] | None = None,
        kv_cache: LayerContext | dict | None = None,  # or a `batch.BatchContext`
        kv_cache_flag: bool | dict | None = None,
    ) -> torch.Tensor:
        if isinstance(attention_mask, BlockMask) or isinstance(kv_cache, dict):
            return self._diffusers(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kv_cache, kv_cache_flag
            )
        dtype = hidden_states.dtype
        q = attn.norm_q(attn.to_q(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)

        if kv_cache is not None:  # a `LayerContext` (or a batch of them): keys are cached before RoPE
            q = rotate(q, rotary_emb)
            k, v = self.keys_values(kv_cache, k, v, rotary_emb, kv_cache_flag)
        elif rotary_emb is not None:
            q, k = apply_rotary_emb(q, rotary_emb["query"]), apply_rotary_emb(k, rotary_emb["key"])

        out = attend(q, k, v, attention_mask).transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def keys_values(
        self, context: LayerContext, keys: torch.Tensor, values: torch.Tensor, freqs: torch.Tensor, write: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the computed tokens attend to: the context followed by their own `keys` (rotated) and `values`.
        `write`: a cache-writing forward (a subclass may attend differently there)."""
        return context.with_tokens(keys, values, freqs)


def install(transformer: torch.nn.Module, processor: type[StreamingAttnProcessor] = StreamingAttnProcessor) -> None:
    """Put `processor` on every block's self-attention (idempotent): the engine's, or a variant of it such as the
    comparison tests' reproduction of diffusers' padding (`tests/reference.py`)."""
    for block in transformer.blocks:
        if type(block.attn1.processor) is not processor:
            block.attn1.set_processor(processor())
