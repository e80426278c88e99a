"""Session 20: the wide 4x teacher warm-started from the narrow one, widened so that it computes the same function.

  python runs/train_v20.py check                                # the widened teacher's output against the narrow one's
  python runs/train_v20.py widen RUN --from runs/v18-t4 --minutes M [--threads 2]

Session 19's wide teacher (8 heads, ffn 1024) learnt from random blocks: lower loss than the narrow one at every
step, but no motion yet after 4913 steps (direction 0.16 against the narrow teacher's 0.38). This starts the same wide
shape from the narrow teacher's step-11629 snapshot, every hidden channel doubled (Net2Net's function-preserving
widening): the copy of channel c is channel c + width, so head h's copy is head h + heads and each head keeps its
32 channels and rotary frequencies. A matrix reading doubled channels splits each weight between the two copies,
a share `a` and `1 - a`, so that the sum is unchanged. With an even split (a = 1/2, plus a little noise) the copies
get near-equal gradients and, Adam's steps being scale-free, near-equal updates: after 1200 steps the loss had
not moved from the narrow teacher's (1.24). A random share per weight (a ~ N(1/2, spread), both signs) keeps the
function exact and gives the two copies different gradients from the first step.
"""

import argparse
import sys
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from streamgen_train import components as C, stages
from streamgen_train.cli import run_stage
from train_v19 import WIDE, copy_text_encoder, link_latents

SNAPSHOT = "final-11629"


def widen(narrow: WanTransformer3DModel, spread: float, seed: int = 0) -> WanTransformer3DModel:
    """A WIDE teacher that computes what `narrow` does, each hidden channel doubled (see the module's docstring)."""
    width, wide = narrow.config.num_attention_heads * narrow.config.attention_head_dim, C.build_teacher(WIDE)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, small in narrow.state_dict().items():
        big = wide.state_dict()[name]
        value = small
        if name.startswith("condition_embedder.time_proj."):
            # six modulation vectors of the model's width, stacked: double each one
            value = value.unflatten(0, (6, width))
            value = torch.cat([value, value], dim=1).flatten(0, 1)
        for dim in range(value.ndim):
            if big.shape[dim] == 2 * value.shape[dim]:
                if value.ndim == 2 and dim == 1:  # a Linear's input: the two copies' weights add up to the old one
                    share = 0.5 + spread * torch.randn(value.shape, generator=generator)
                    value = torch.cat([value * share, value * (1 - share)], dim=1)
                else:
                    value = torch.cat([value, value], dim=dim)
        assert value.shape == big.shape, (name, value.shape, big.shape)
        state[name] = value
    wide.load_state_dict(state)
    return wide


def check(source: Path) -> None:
    narrow = WanTransformer3DModel.from_pretrained(source / "teacher" / SNAPSHOT / "teacher").eval()
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 16, 16)
    t = torch.tensor([300.0, 800.0])
    text = torch.randn(2, 8, narrow.config.text_dim)
    with torch.no_grad():
        want = narrow(x, t, text).sample
        for spread in (0.0, 0.5):
            got = widen(narrow, spread).eval()(x, t, text).sample
            err = (got - want).norm() / want.norm()
            print(f"spread {spread}: relative difference {err:.2e}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["check", "widen"])
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--from", dest="source", type=Path, default=Path("runs/v18-t4"))
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--minutes", type=float)
    p.add_argument("--threads", type=int, default=1, help="2 when it runs alone on the two cores")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "check":
        check(a.source)
        return
    init = a.run / "init"
    if not (init / "teacher" / "final").is_dir():
        snapshot = a.source / "teacher" / SNAPSHOT
        narrow = WanTransformer3DModel.from_pretrained(snapshot / "teacher")
        widen(narrow, a.spread).save_pretrained(init / "teacher" / "final" / "teacher")
        copy_text_encoder(snapshot, init)
    link_latents(a.source, a.run)
    recipe = stages.Recipe(root=a.run, sizes=WIDE, clips=4096, minutes=a.minutes, warm_start=init)
    run_stage(recipe, "teacher", 100_000)


if __name__ == "__main__":
    sys.exit(main())
