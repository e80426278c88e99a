"""Training targets against their definitions, on a tiny model and hand-picked times (not just "a loss drops")."""

from __future__ import annotations

import pytest
import torch

from streamgen.engine import TextCondition
from streamgen.models import far_from_wan
from streamgen_train import components as C
from streamgen_train.losses import TEACHER_STEPS, causal_velocity, flowmap_target, shifted_sigmas

TINY = C.Sizes(height=32, width=32, vae_base_dim=4, vae_decoder_base_dim=4, text_dim=32, heads=2, head_dim=16, layers=2, ffn_dim=64)
PARTITION = (1, 3, 3, 3)  # with full_chunk_limit 3 the first chunk is compressed context


def per_frame(values: list[float]) -> torch.Tensor:
    return torch.tensor([values]).repeat_interleave(torch.tensor(PARTITION), dim=1)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flowmap_target_is_a_teacher_step_then_the_models_jump(guidance: float):
    """Jumping t -> r with the target lands where one teacher Euler step t -> s and the model's own jump s -> r
    land (the flow map's semigroup identity); where r is within a teacher step of t the target is the teacher's
    velocity itself, and where r = t too. The teacher's step is classifier-free guided against the empty
    caption; the model's jump is the prompt's alone."""
    torch.manual_seed(0)
    teacher = C.causal_teacher(C.build_teacher(TINY))
    model = far_from_wan(C.build_teacher(TINY)).eval()  # its own weights: its jumps differ from the teacher's
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, sum(PARTITION), 16, 4, 4, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    text, negative = torch.randn(2, 1, 8, TINY.text_dim, generator=gen)
    condition = TextCondition(text, negative, guidance)
    # Per chunk: compressed context (clean), a long jump, one shorter than a teacher step, no jump.
    t, r = per_frame([0.0, 0.9, 0.6, 0.5]), per_frame([0.0, 0.2, 0.59, 0.5])
    target = flowmap_target(model, teacher, z, x0, t, r, condition, PARTITION)
    assert target.shape == (1, sum(PARTITION[1:]), 16, 4, 4)

    s = torch.maximum(r, t - 1 / TEACHER_STEPS)  # one teacher step at most
    with torch.no_grad():
        v_uncond = causal_velocity(teacher, z, x0, t, t, negative, PARTITION)
        v = v_uncond + guidance * (causal_velocity(teacher, z, x0, t, t, text, PARTITION) - v_uncond)
        z_s = torch.cat([z[:, :1], z[:, 1:] - (t - s)[:, 1:, None, None, None] * v], dim=1)
        u_s = causal_velocity(model, z_s, x0, s, r, text, PARTITION)
    long = slice(0, 3)  # the long jump's frames (after the compressed one), from t = 0.9 to r = 0.2
    landed = z[:, 1:][:, long] - (0.9 - 0.2) * target[:, long]
    expected = z_s[:, 1:][:, long] - (0.9 - 1 / TEACHER_STEPS - 0.2) * u_s[:, long]
    torch.testing.assert_close(landed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target[:, 3:], v[:, 3:])  # within one teacher step, and at r = t: the teacher
    assert (target[:, long] - v[:, long]).abs().max() > 1e-3  # the long jump is not the teacher's velocity


def test_training_times_follow_the_schedulers_shift():
    """Training draws t with the very map the sampler's scheduler applies to its schedule."""
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shifted_sigmas(u), C.build_scheduler().apply_shift(u))
    assert shifted_sigmas(torch.tensor([0.5])).item() == pytest.approx(C.SHIFT * 0.5 / (1 + (C.SHIFT - 1) * 0.5))
