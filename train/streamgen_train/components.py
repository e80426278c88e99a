"""The default model's components at toy scale, and the few helpers every training stage shares.

Every class is the one NVIDIA's checkpoints use (Wan VAE, UMT5, Wan teacher, AnyFlow-FAR student), only smaller,
so the shipped model runs through exactly the code path of the real weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMapEulerDiscreteScheduler,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from streamgen.models import far_from_wan
from .world.grammar import vocabulary

# Wan shifts its training and sampling times towards noise by 5 at 480p; our 8x8 latents carry far less
# redundancy per frame, so a milder shift (the SD3 resolution rule moves it down with the token count).
SHIFT = 3.0
MAX_SEQUENCE_LENGTH = 32  # the longest grammar caption (two objects) is 23 words
TEXT_POSITION_BUCKETS = 32  # the text encoder's relative-position buckets, both directions together
# Classifier-free guidance, as Wan samples and AnyFlow distils: the teacher learns the empty caption on
# CAPTION_DROPOUT of its world clips (footage is captioned "" anyway), and the causal models regress its velocity
# guided at TEACHER_GUIDANCE, so they would follow the prompt as the guided teacher does while streaming unguided.
# Guidance 3 did not help the 6-layer teacher (docs/training.md, session 6), so the recipe distils it unguided;
# the shipped 12-layer student distils its teacher guided at 2 (`Recipe.teacher_guidance`, session 10).
CAPTION_DROPOUT = 0.1
TEACHER_GUIDANCE = 1.0
PAD, UNK = "<pad>", "<unk>"


@dataclass(frozen=True)
class Sizes:
    """Every size of the toy model in one place (the tests use a tinier instance)."""

    height: int = 64
    width: int = 64
    vae_base_dim: int = 8
    # The decoder draws every frame the stream shows: at base 8 the round trip lost the objects' colour, count and
    # speed far more often than at 16 (docs/training.md); twice the width about doubles the decode.
    vae_decoder_base_dim: int = 16
    # Pixels per latent pixel, 8 (Wan's) or 4. At 8 a small object (11 pixels) is 1.4 latent pixels and comes back
    # round from every VAE trained here (docs/training.md, sessions 16-17); 4 with `patch` 4 keeps the token count.
    vae_scale: int = 8
    text_dim: int = 64
    heads: int = 4
    head_dim: int = 32
    layers: int = 6
    ffn_dim: int = 512
    patch: int = 2  # latent pixels per token side: at `vae_scale` 8, 2 gives a 64x64 frame 4x4 tokens, 1 gives it 8x8
    clip_latent_frames: int = 13  # 49 video frames, like a short Wan clip


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A closed word-level tokenizer over the caption grammar; any other word maps to <unk>, so any prompt encodes."""
    vocab = {PAD: 0, UNK: 1} | {word: i + 2 for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_text_encoder(sizes: Sizes, vocab_size: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=sizes.text_dim,
        d_kv=sizes.text_dim // 4,
        d_ff=2 * sizes.text_dim,
        num_layers=2,
        num_heads=4,
        # A distinct bias for every offset up to 7 and fine bins beyond, over the longest caption. With T5's 8
        # buckets up to 128 offsets 2-15 share one bias, and an encoder taught to read each object's direction
        # from its colour word learned it slower (session 14, docs/training.md).
        relative_attention_num_buckets=TEXT_POSITION_BUCKETS,
        relative_attention_max_distance=MAX_SEQUENCE_LENGTH,
        dropout_rate=0.0,
        pad_token_id=0,
    )
    return UMT5EncoderModel(config)


def load_text_encoder_weights(target: UMT5EncoderModel, source: UMT5EncoderModel) -> None:
    """Copy `source` into `target`, whose relative-position buckets may differ: each of `target`'s buckets starts
    with the bias of `source`'s bucket for the same offsets (up to `MAX_SEQUENCE_LENGTH`), so an encoder trained
    with coarser buckets keeps its function where the finer ones refine its bins."""
    state = source.state_dict()
    offsets = torch.arange(1 - MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH)
    for name, module in target.named_modules():
        if getattr(module, "has_relative_attention_bias", False):
            old = source.get_submodule(name)
            index = torch.zeros(module.relative_attention_num_buckets, dtype=torch.long)
            index[module._relative_position_bucket(offsets)] = old._relative_position_bucket(offsets)
            key = f"{name}.relative_attention_bias.weight"
            state[key] = state[key][index]
    target.load_state_dict(state)


# Per `Sizes.vae_scale`: the VAE's channel multipliers and which of its downsamplings also halve time (4x in all).
VAE_LEVELS = {8: ([1, 1, 2, 2], [False, True, True]), 4: ([1, 2, 2], [True, True])}


def build_vae(sizes: Sizes) -> AutoencoderKLWan:
    """Wan's causal VAE (8x or 4x space, 4x time, 16 channels) with few channels: its decoder runs in the live
    loop."""
    if sizes.vae_scale not in VAE_LEVELS:
        raise ValueError(f"vae_scale must be one of {sorted(VAE_LEVELS)}, got {sizes.vae_scale}")
    dim_mult, temporal = VAE_LEVELS[sizes.vae_scale]
    return AutoencoderKLWan(
        base_dim=sizes.vae_base_dim,
        decoder_base_dim=sizes.vae_decoder_base_dim,
        z_dim=16,
        dim_mult=dim_mult,
        num_res_blocks=1,
        temperal_downsample=temporal,
        dropout=0.0,
        scale_factor_spatial=sizes.vae_scale,
    )


def build_teacher(sizes: Sizes) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, sizes.patch, sizes.patch),
        num_attention_heads=sizes.heads,
        attention_head_dim=sizes.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=sizes.text_dim,
        freq_dim=64,
        ffn_dim=sizes.ffn_dim,
        num_layers=sizes.layers,
        rope_max_seq_len=1024,
    )


def build_scheduler(shift: float = SHIFT) -> FlowMapEulerDiscreteScheduler:
    return FlowMapEulerDiscreteScheduler(shift=shift)


def causal_teacher(teacher: WanTransformer3DModel) -> torch.nn.Module:
    """The teacher in the student's causal layout, as a velocity field: `far_from_wan` with the r-gate closed.

    With gate 0 the model ignores r, so a flow-map "jump" t -> r through it is exactly an Euler step of the
    teacher's ODE: the streaming engine then samples the teacher, and training reads its velocity in one call.
    """
    far = far_from_wan(teacher).to(teacher.device)
    far.register_to_config(
        gate_value=0.0
    )  # so a saved copy (the consistency baseline) reloads r-blind too
    far.condition_embedder.delta_emb_gate.zero_()
    return far.requires_grad_(False).eval()


def encode_captions(
    tokenizer: PreTrainedTokenizerFast,
    text_encoder: UMT5EncoderModel,
    captions: list[str],
) -> torch.Tensor:
    """`(B, MAX_SEQUENCE_LENGTH, dim)` embeddings, zero past each caption's tokens, differentiable.

    Batched twin of `streamgen.text.PromptEncoder.encode` (which is single-prompt, cached and no-grad): training
    must see exactly the embeddings inference will.
    """
    inputs = tokenizer(
        captions,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    mask = inputs.attention_mask.to(text_encoder.device)
    states = text_encoder(
        inputs.input_ids.to(text_encoder.device), mask
    ).last_hidden_state
    return states * mask[..., None].to(states.dtype)


def shifted_sigmas(u: torch.Tensor) -> torch.Tensor:
    """Wan's training-time distribution: uniform u pushed towards noise by the scheduler's own shift map."""
    return _SHIFT_MAP.apply_shift(u)


_SHIFT_MAP = build_scheduler()  # read for its shift only (`set_timesteps` is never called on it)
