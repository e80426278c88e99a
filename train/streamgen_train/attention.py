"""Training's self-attention: diffusers' FAR training forward with a dense mask and plain SDPA.

diffusers builds the FAR training mask as a flex-attention `BlockMask`, which has no backward on CPU;
`losses.far_mask` evaluates the very same `mask_mod` into a dense boolean mask, which this processor hands to SDPA
(differentiable everywhere). It sits under the engine's processor, so the engine still runs the same model
(stage 2 samples the student through it).
"""

from __future__ import annotations

import torch

from streamgen.diffusers_adapter import apply_rotary_emb
from streamgen.engine import attention


class DenseAttnProcessor:
    """Self-attention over a dense boolean `attention_mask` and diffusers' rotary dict, as `_forward_train` calls it."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: dict[str, torch.Tensor] | None = None,
        kv_cache: object = None,
        kv_cache_flag: object = None,
    ) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError("the training processor runs diffusers' training forward, which has no KV cache")
        q, k, v = attention.project(attn, hidden_states)
        if rotary_emb is not None:
            q, k = apply_rotary_emb(q, rotary_emb["query"]), apply_rotary_emb(k, rotary_emb["key"])
        return attention.output(attn, attention.attend(q, k, v, attention_mask).type_as(q))


DENSE = DenseAttnProcessor()


def install(model: torch.nn.Module) -> None:
    """Make `model` trainable on any device: the engine's processor over the dense one (idempotent)."""
    attention.install(model, base=DENSE)
