"""Issue 11, session 8: does resuming a finished teacher with a fresh optimizer cost it its score? Every teacher
warm-started from the shipped one (v5: more clips and caption dropout; v6: patch 1; v7: deeper) scored below it
(0.53-0.59 against 0.61). Here the shipped teacher simply continues under its own conditions (its 512-clip latent
set, no caption dropout), with a new AdamW, for STEPS steps: if its score drops, the restart itself is what those
runs paid for. With WARMUP > 0 the learning rate ramps up linearly over that many steps instead.

    OMP_NUM_THREADS=1 nohup python runs/train_v8.py NAME STEPS [WARMUP] > runs/train_v8_NAME.log 2>&1 &
"""

import sys
from pathlib import Path

from streamgen_train import cli, stages
from streamgen_train import components as C

NAME, STEPS = sys.argv[1], int(sys.argv[2])
WARMUP = int(sys.argv[3]) if len(sys.argv) > 3 else 0
RUN = Path(f"runs/v8_{NAME}")
C.CAPTION_DROPOUT = 0.0  # as the shipped teacher trained (session 5, before caption dropout)
RUN.mkdir(parents=True, exist_ok=True)
for name, target in (("vae", "../v4/vae"), ("decoder", "../v4/decoder"), ("latents.pt", "../v4/latents.pt")):
    if not (RUN / name).exists():
        (RUN / name).symlink_to(target)
if WARMUP:
    optimize, calls = stages.optimize, [0]

    def warmed_up(optimizer, loss):
        calls[0] += 1
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * min(1.0, calls[0] / WARMUP)
        optimize(optimizer, loss)

    stages.optimize = warmed_up
recipe = stages.Recipe(root=RUN, clips=512, warm_start=Path("runs/v4"))
cli.run_stage(recipe, "teacher", STEPS)
