"""AnyFlow's causal training forward and losses, through diffusers' own `AnyFlowFARTransformer3DModel.forward`.

The layout is the FAR training layout: every chunk appears noisy (to be denoised) and clean (as context for later
chunks, "teacher forcing"); chunks beyond `full_chunk_limit` are clean compressed context. diffusers builds its
mask as a flex-attention `BlockMask`, which has no backward on CPU; we evaluate the very same `mask_mod` on an index
grid instead and hand the dense boolean mask to the SDPA processor of `attention`.

Times are sigmas in [0, 1] here (z_t = (1 - t) x0 + t noise, v = noise - x0); the model takes them x1000.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel, WanTransformer3DModel

from streamgen.diffusers_adapter import compressed_frames
from streamgen.engine import TextCondition

from . import attention
from .components import shifted_sigmas
from .data import CHUNKS
from .world.grammar import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, word_objects

_SCALE = 1000.0  # the scheduler's num_train_timesteps
# Teacher Euler steps over [0, 1] in distillation targets: stage 1's teacher step is at most 1 / TEACHER_STEPS, and
# the consistency baseline's grid has as many steps.
TEACHER_STEPS = 32
# Latent positions that stand out from their frame's background count this much more in every regression loss:
# the shapes the captions describe cover ~10% of a world frame's latents, and an unweighted loss left the teacher
# drawing the background right and the objects at chance (docs/training.md). Same factor as the VAE's pixel loss.
OBJECT_WEIGHT = 5.0
_OBJECT_THRESHOLD = 0.4  # of the frame's largest deviation from its median latent


@lru_cache(maxsize=64)
def far_mask(
    model: AnyFlowFARTransformer3DModel, partition: tuple[int, ...], h: int, w: int
) -> torch.Tensor:
    """diffusers' FAR training mask (with clean context) as a dense `(L, L)` bool, cropped to the real tokens."""
    block = model.build_attention_mask(
        chunk_partition=list(partition),
        height=h,
        width=w,
        has_clean_context=True,
        device=torch.device("cpu"),
    )
    cfg = model.config
    compressed = compressed_frames(model, partition)
    length = (
        compressed
        * (h // cfg.compressed_patch_size[1])
        * (w // cfg.compressed_patch_size[2])
    )
    length += (
        2
        * (sum(partition) - compressed)
        * (h // cfg.patch_size[1])
        * (w // cfg.patch_size[2])
    )
    index = torch.arange(length)
    return block.mask_mod(0, 0, index[:, None], index[None, :]).to(model.device)



def causal_velocity(
    model: AnyFlowFARTransformer3DModel,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    text: torch.Tensor,
    partition: tuple[int, ...],
) -> torch.Tensor:
    """u(z_t, t, r) for every full-resolution frame, each chunk seeing the clean chunks before it.

    Args:
        noisy, clean: `(B, F, C, h, w)` over the partition's frames; compressed frames are taken from `clean`.
        t, r: `(B, F)` sigmas per frame (compressed frames are forced to 0, as they are clean).
    Returns:
        `(B, F_full, C, h, w)`, F_full being the frames after the compressed context.
    """
    attention.install(model)
    c = compressed_frames(model, partition)
    hidden = torch.cat([clean[:, :c], noisy[:, c:]], dim=1)
    zero = torch.zeros_like(t[:, :c])
    h, w = noisy.shape[-2:]
    return model(
        hidden_states=hidden,
        timestep=torch.cat([zero, t[:, c:]], dim=1) * _SCALE,
        r_timestep=torch.cat([zero, r[:, c:]], dim=1) * _SCALE,
        encoder_hidden_states=text,
        chunk_partition=list(partition),
        clean_hidden_states=clean[:, c:],
        clean_timestep=torch.zeros_like(t[:, c:]),
        attention_mask=far_mask(model, partition, h, w),
    ).sample


def teacher_velocity(
    teacher: AnyFlowFARTransformer3DModel,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    t: torch.Tensor,
    text: TextCondition,
    partition: tuple[int, ...],
) -> torch.Tensor:
    """The teacher's velocity (`causal_velocity` at r = t), classifier-free guided as `text` says: prompt and empty
    caption ride in one batch, as the engine samples a guided stream."""
    v = causal_velocity(
        teacher, text.batch(noisy), text.batch(clean), text.batch(t), text.batch(t), text.model_input, partition
    )
    return text.combine(v)


def object_weights(x0: torch.Tensor) -> torch.Tensor:
    """`(B, F, 1, h, w)` loss weights from clean latents `(B, F, C, h, w)`: OBJECT_WEIGHT where a position's mean
    absolute deviation from its frame's per-channel median exceeds `_OBJECT_THRESHOLD` of the frame's largest, else
    1. A world frame's flat background sits at the median, its shapes stand out; footage spreads the weight."""
    deviation = (x0 - x0.flatten(3).median(dim=3).values[..., None, None]).abs().mean(2, keepdim=True)
    largest = deviation.flatten(3).amax(dim=3)[..., None, None]
    return 1 + (OBJECT_WEIGHT - 1) * (deviation > _OBJECT_THRESHOLD * largest).float()


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared error with `object_weights(x0)` (x0: the clean latents of the same frames)."""
    return (object_weights(x0) * (prediction - target).square()).mean()


def teacher_loss(
    teacher: WanTransformer3DModel,
    x0: torch.Tensor,
    text: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow loss of the bidirectional teacher on a stream prefix whose first chunks may be clean.

    Wan's T2V teacher only ever sees whole noisy clips. Ours also sees clips cut at a chunk end with a clean prefix
    (per-token timesteps 0, Wan 2.2's mechanism), so that it can continue a stream chunk by chunk: it is then the
    reference the causal student is measured against, and the score stage 2 distils.
    """
    device = x0.device
    ends = torch.tensor(CHUNKS).cumsum(0)
    end = int(ends[torch.randint(len(ends), (1,), generator=gen)])
    starts = [0, *[int(e) for e in ends if e < end]]
    context = (
        starts[int(torch.randint(len(starts), (1,), generator=gen))]
        if torch.rand(1, generator=gen) < 0.5
        else 0
    )
    x = x0[:, :end]
    noise = torch.randn(x.shape, generator=gen).to(device)
    sigma = shifted_sigmas(torch.rand(x.shape[0], 1, generator=gen)).to(device)
    t = torch.cat(
        [
            torch.zeros(x.shape[0], context, device=device),
            sigma.expand(-1, end - context),
        ],
        dim=1,
    )
    z = (1 - _b(t)) * x + _b(t) * noise
    cfg = teacher.config
    tokens = (x.shape[-2] // cfg.patch_size[1]) * (x.shape[-1] // cfg.patch_size[2])
    timestep = (t * _SCALE).repeat_interleave(tokens, dim=1)
    v = teacher(z.permute(0, 2, 1, 3, 4), timestep, text).sample.permute(0, 2, 1, 3, 4)
    return weighted_mse(v[:, context:], (noise - x)[:, context:], x[:, context:])


# What each word of an object's clause learns to carry in the binding loss: every attribute of its object.
BINDING_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "direction": tuple(DIRECTIONS),
    "speed": tuple(SPEEDS),
}
BINDING_CLASSES = sum(len(names) for names in BINDING_ATTRIBUTES.values())


def binding_labels(captions: list[str], length: int) -> torch.Tensor:
    """`(B, length, attributes)` class indices of each word's object (-100: a word of no object's clause)."""
    labels = torch.full((len(captions), length, len(BINDING_ATTRIBUTES)), -100)
    for row, caption in enumerate(captions):
        for word, obj in enumerate(word_objects(caption)[:length]):
            if obj is not None:  # the attributes are named as `ObjectSpec`'s fields
                classes = [names.index(getattr(obj, key)) for key, names in BINDING_ATTRIBUTES.items()]
                labels[row, word] = torch.tensor(classes)
    return labels


def binding_loss(head: torch.nn.Linear, states: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Cross-entropy of every attribute of each word's object, read linearly from the word's encoding.

    A stand-in for the language pretraining a real UMT5 brings: the teacher's cross-attention sees no text
    positions, only what the encoder mixed into each token, and its diffusion loss alone did not teach the toy
    encoder which direction belongs to which object (session 14, docs/training.md)."""
    labels = binding_labels(captions, states.shape[1]).to(states.device)
    if not (labels >= 0).any():
        return states.new_zeros(())
    logits = head(states).split([len(names) for names in BINDING_ATTRIBUTES.values()], dim=-1)
    losses = [F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten()) for k, lg in enumerate(logits)]
    return torch.stack(losses).mean()


def per_frame(values: torch.Tensor, partition: tuple[int, ...]) -> torch.Tensor:
    """`(B, chunks)` -> `(B, frames)`: one value per chunk, repeated over its frames."""
    return values.repeat_interleave(
        torch.tensor(partition, device=values.device), dim=1
    )


def sample_times(
    batch: int, partition: tuple[int, ...], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk (t, r): t from Wan's shifted distribution; r = t (plain flow matching, keeps the velocity),
    r = 0 (the one-jump endpoint) or uniform in [0, t] (every budget in between), a quarter/quarter/half mix."""
    shape = (batch, len(partition))
    t = shifted_sigmas(torch.rand(shape, generator=gen))
    kind = torch.rand(shape, generator=gen)
    r = torch.where(
        kind < 0.25,
        t,
        torch.where(
            kind < 0.5, torch.zeros_like(t), t * torch.rand(shape, generator=gen)
        ),
    )
    return per_frame(t, partition), per_frame(r, partition)


def _b(x: torch.Tensor) -> torch.Tensor:
    return x[..., None, None, None]


def flowmap_loss(
    model: AnyFlowFARTransformer3DModel,
    teacher: AnyFlowFARTransformer3DModel,
    x0: torch.Tensor,
    text: TextCondition,
    partition: tuple[int, ...],
    gen: torch.Generator,
) -> torch.Tensor:
    """Stage-1 forward flow-map loss on teacher-forced data chunks, distilling the teacher's flow map.

    The target is the flow map's semigroup identity, the finite form of MeanFlow's u = v - (t - r) du/dt: jumping
    t -> s -> r equals jumping t -> r, so u(z_t, t, r) = ((t - s) v(z_t, t) + (s - r) u(z_s, s, r)) / (t - r)
    with the first piece one teacher Euler step (`teacher` is `components.causal_teacher`, same layout) of at
    most 1 / TEACHER_STEPS, s = max(r, t - 1 / TEACHER_STEPS), and the rest the model's own jump, without
    gradient: consistency distillation's target, for every r instead of r = 0 only. Jumps shorter than the step
    regress the teacher's velocity itself, so many small jumps follow the teacher's ODE: what makes quality rise
    with the step count. Weaker links to the teacher lost that (docs/training.md): the velocity at r = t alone,
    or half the targets composed of two of the model's own jumps, converged to a flow map of a field of its own.
    The derivative form, with du/dt a finite difference of the model, diverged.
    """
    device = x0.device
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t, r = (x.to(device) for x in sample_times(x0.shape[0], partition, gen))
    z = (1 - _b(t)) * x0 + _b(t) * noise
    u = causal_velocity(model, z, x0, t, r, text.embeds, partition)
    target = flowmap_target(model, teacher, z, x0, t, r, text, partition)
    return weighted_mse(u, target, x0[:, compressed_frames(model, partition) :])


@torch.no_grad()
def flowmap_target(
    model: AnyFlowFARTransformer3DModel,
    teacher: AnyFlowFARTransformer3DModel,
    z: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    text: TextCondition,
    partition: tuple[int, ...],
) -> torch.Tensor:
    """`flowmap_loss`'s target for u(z_t, t, r) on every full-resolution frame: one teacher Euler step t -> s,
    s = max(r, t - 1 / TEACHER_STEPS), then the model's own jump s -> r, as one jump t -> r; the teacher's
    velocity where t and r (almost) meet. `t`, `r`: `(B, frames)`."""
    c = compressed_frames(model, partition)
    s = torch.maximum(r, t - 1 / TEACHER_STEPS)
    velocity = teacher_velocity(teacher, z, x0, t, text, partition)
    z_s = torch.cat([z[:, :c], z[:, c:] - _b(t - s)[:, c:] * velocity], dim=1)
    rest = causal_velocity(model, z_s, x0, s, r, text.embeds, partition)
    t, s, r = (_b(x[:, c:]) for x in (t, s, r))
    composed = ((t - s) * velocity + (s - r) * rest) / (t - r).clamp_min(1e-6)
    return torch.where(t - r > 1e-4, composed, velocity)


def flow_matching_loss(
    model: AnyFlowFARTransformer3DModel,
    x0: torch.Tensor,
    clean: torch.Tensor,
    text: torch.Tensor,
    partition: tuple[int, ...],
    gen: torch.Generator,
) -> torch.Tensor:
    """Plain velocity regression (r = t) of the last chunk of `x0` given `clean` context: the fake score's loss."""
    device = x0.device
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = per_frame(
        shifted_sigmas(torch.rand(x0.shape[0], len(partition), generator=gen)),
        partition,
    ).to(device)
    z = (1 - _b(t)) * x0 + _b(t) * noise
    last = partition[-1]
    u = causal_velocity(model, z, clean, t, t, text, partition)[:, -last:]
    return F.mse_loss(u, (noise - x0)[:, -last:])


def consistency_loss(
    model: AnyFlowFARTransformer3DModel,
    teacher: AnyFlowFARTransformer3DModel,
    x0: torch.Tensor,
    text: TextCondition,
    partition: tuple[int, ...],
    gen: torch.Generator,
    grid: torch.Tensor,
) -> torch.Tensor:
    """Consistency distillation of the endpoint map f(z_t, t) = z_t - t u(z_t, t, 0), same architecture.

    Adjacent times (t, t') of the teacher's sampling `grid`; z_t' is one teacher Euler step from z_t, and f at
    (z_t', t') under stop-gradient is the target (iCT style, no EMA copy).
    """
    device = x0.device
    batch, chunks = x0.shape[0], len(partition)
    index = torch.randint(len(grid) - 1, (batch, chunks), generator=gen)
    t, t_next = (per_frame(grid[i], partition).to(device) for i in (index, index + 1))
    noise = torch.randn(x0.shape, generator=gen).to(device)
    z = (1 - _b(t)) * x0 + _b(t) * noise
    c = compressed_frames(model, partition)
    zero = torch.zeros_like(t)
    with torch.no_grad():
        v = teacher_velocity(teacher, z, x0, t, text, partition)
        z_next = z[:, c:] - _b(t - t_next)[:, c:] * v
        moved = torch.cat([z[:, :c], z_next], dim=1)
        target = z_next - _b(t_next)[:, c:] * causal_velocity(
            model, moved, x0, t_next, zero, text.embeds, partition
        )
    estimate = z[:, c:] - _b(t)[:, c:] * causal_velocity(
        model, z, x0, t, zero, text.embeds, partition
    )
    return weighted_mse(estimate, target, x0[:, c:])
