"""Session 18: finer latents (4x instead of 8x, transformer patch 4, same token count).

  python runs/train_v18.py vae RUN [--encoder-base 16] --minutes M   # a 4x VAE from scratch (the vae stage)
  python runs/train_v18.py rehead RUN [--vae-scale 8]                # the shipped teacher's body, new patch in/out
  python runs/train_v18.py latents RUN [--vae-scale 8]               # encode the teacher's latent set ahead
"""

import argparse
import sys
from pathlib import Path

import torch

from streamgen_train import components as C, stages
from streamgen_train.cli import run_stage


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["vae", "rehead", "latents"])
    p.add_argument("run", type=Path)
    p.add_argument("--encoder-base", type=int, default=8)
    p.add_argument("--vae-scale", type=int, default=4)
    p.add_argument("--minutes", type=float)
    p.add_argument("--lr", type=float, help="the vae stage's rate (also on resume)")
    p.add_argument("--steps", type=int, default=100000)
    a = p.parse_args()
    torch.set_num_threads(1)
    patch = 2 if a.vae_scale == 8 else 4  # 4x4 tokens a 64x64 frame either way
    sizes = C.Sizes(vae_scale=a.vae_scale, patch=patch, layers=12, vae_base_dim=a.encoder_base)
    recipe = stages.Recipe(root=a.run, sizes=sizes, minutes=a.minutes, vae_lr=a.lr)
    if a.what == "vae":
        run_stage(recipe, "vae", a.steps)
    elif a.what == "latents":
        stages.latent_set(recipe)
    else:
        rehead(recipe)


def rehead(recipe: stages.Recipe) -> None:
    """runs/<run>/teacher/final: the shipped teacher's blocks and text encoder, a fresh patch embedding and output
    projection for patch 4 (a warm start for the teacher stage; the token grid is the same 4x4 a frame)."""
    from streamgen.models import load_transformer, wan_from_far
    from transformers import UMT5EncoderModel, AutoTokenizer

    model = stages.DEFAULT_MODEL
    old = wan_from_far(load_transformer(model / "transformer"))
    new = C.build_teacher(recipe.sizes)
    keep = {k: v for k, v in old.state_dict().items() if not k.startswith(("patch_embedding.", "proj_out."))}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    print("fresh:", missing, "unexpected:", unexpected)
    final = recipe.run("teacher").final
    new.save_pretrained(final / "teacher")
    UMT5EncoderModel.from_pretrained(model / "text_encoder").save_pretrained(final / "text_encoder")
    AutoTokenizer.from_pretrained(model / "tokenizer").save_pretrained(final / "tokenizer")


if __name__ == "__main__":
    sys.exit(main())
