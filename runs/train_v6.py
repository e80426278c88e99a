"""Issue 11, session 7: does a teacher with finer tokens draw the objects? Patch 1 gives a 64x64 frame 8x8 tokens
(patch 2: 4x4, each 16x16 pixels, as large as an object). The v4 (shipped) teacher is converted to patch 1 and
trained on, so only the token grid is new: the patch embedding sums its 2x2 kernel (a flat 2x2 area embeds as
before) and the output projection averages its four sub-positions. Same VAE, decoder and 4096-clip latent set as
v4/v5 (runs/v6 links v4's vae and decoder stages and v5's latents.pt). Then stage 1 (or the stage given third),
and the export after stage 1. Session 7 ran the teacher for 55 minutes and stopped there: it scored below the
shipped teacher (docs/training.md).

    OMP_NUM_THREADS=1 nohup python runs/train_v6.py TEACHER_MINUTES STUDENT_MINUTES [student|consistency] &
"""

import shutil
import sys
from pathlib import Path

import torch

from streamgen_train import cli, stages
from streamgen_train import components as C

INIT, RUN = Path("runs/v6init"), Path("runs/v6")
SIZES = C.Sizes(patch=1)
TEACHER_MINUTES, STUDENT_MINUTES = float(sys.argv[1]), float(sys.argv[2])


def convert() -> None:
    source = stages.Recipe(root=Path("runs/v4"))
    old = stages.load_teacher(source)
    new = C.build_teacher(SIZES)
    weights = old.state_dict()
    weights["patch_embedding.weight"] = weights["patch_embedding.weight"].sum((3, 4), keepdim=True)
    out = new.config.out_channels
    for key in ("proj_out.weight", "proj_out.bias"):  # rows ordered (p_t, p_h, p_w, channel)
        w = weights[key]
        weights[key] = w.reshape(-1, out, *w.shape[1:]).mean(0)
    new.load_state_dict(weights)
    final = INIT / "teacher" / "final"
    new.save_pretrained(final / "teacher")
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(source.require("teacher") / part, final / part, dirs_exist_ok=True)


if not (INIT / "teacher" / "final" / "teacher").is_dir():
    convert()
recipe = stages.Recipe(root=RUN, sizes=SIZES, clips=4096, warm_start=INIT, minutes=TEACHER_MINUTES)
cli.run_stage(recipe, "teacher", 100_000)
recipe.minutes = STUDENT_MINUTES
stage = sys.argv[3] if len(sys.argv) > 3 else "student"
cli.run_stage(recipe, stage, 100_000)
if stage == "student":
    recipe.export_to = RUN / "model"
    cli.run_stage(recipe, "export", 0)
