"""Session 19: the chain on the 4x latents of session 18's `enc16` VAE (runs/v18-t4), and a wider teacher.

  python runs/train_v19.py latents RUN --clips 4096     # grow RUN's latent set (clip i is the same whatever the size)
  python runs/train_v19.py wide RUN --from runs/v18-t4 --minutes M [--threads 2]   # a teacher of 8 heads, ffn 1024, on its latents

At 4x with patch 4 a token is 16 channels x 4x4 = 256 latent values, through a transformer 128 wide (4 heads of 32):
the output projection can only move a 128-dimensional slice of each token's noise (`runs/probe_v19_rank.py`). `wide`
trains a 256-wide teacher (8 heads, ffn 1024) on the same latents, its blocks from scratch, its text encoder from the
narrow teacher's snapshot in `--from` (`teacher/final-6400`), to compare against the narrow one at equal wall time.

The narrow teacher itself runs through the CLI with the 4x sizes:
  streamgen train teacher --out runs/v18-t4 --vae-scale 4 --patch 4 --layers 12 --warm-start runs/v18-init \
      --clips 4096 --steps 40000 --minutes M
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from streamgen_train import components as C, stages
from streamgen_train.cli import run_stage

NARROW = C.Sizes(vae_scale=4, patch=4, layers=12, vae_base_dim=16)
WIDE = replace(NARROW, heads=8, ffn_dim=1024)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["latents", "wide"])
    p.add_argument("run", type=Path)
    p.add_argument("--clips", type=int, default=4096)
    p.add_argument("--from", dest="source", type=Path, default=Path("runs/v18-t4"))
    p.add_argument("--minutes", type=float)
    p.add_argument("--threads", type=int, default=1, help="2 when it runs alone on the two cores")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "latents":
        stages.latent_set(stages.Recipe(root=a.run, sizes=NARROW, clips=a.clips))
        return
    init = a.run / "init"
    if not (init / "teacher" / "final").is_dir():
        start(a.source, init)
    link_latents(a.source, a.run)
    recipe = stages.Recipe(root=a.run, sizes=WIDE, clips=a.clips, minutes=a.minutes, warm_start=init)
    run_stage(recipe, "teacher", 100_000)


def start(source: Path, init: Path) -> None:
    """`init/teacher/final`: a fresh wide teacher beside the narrow snapshot's text encoder and tokenizer."""
    torch.manual_seed(0)
    C.build_teacher(WIDE).save_pretrained(init / "teacher" / "final" / "teacher")
    copy_text_encoder(source / "teacher" / "final-6400", init)


def link_latents(source: Path, run: Path) -> None:
    """`run` shares `source`'s VAE and encoded latent set (872 MB at 4096 clips) through symlinks."""
    for name in ("vae", "latents.pt"):
        if not (run / name).exists():
            (run / name).symlink_to((source / name).resolve())


def copy_text_encoder(snapshot: Path, init: Path) -> None:
    """The snapshot's text encoder and tokenizer beside the teacher in `init/teacher/final`."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    final = init / "teacher" / "final"
    UMT5EncoderModel.from_pretrained(snapshot / "text_encoder").save_pretrained(final / "text_encoder")
    AutoTokenizer.from_pretrained(snapshot / "tokenizer").save_pretrained(final / "tokenizer")


if __name__ == "__main__":
    sys.exit(main())
