"""Issue 11, session 9: is the teacher's learning rate what holds its fit back? Every teacher since session 4 trained
at AdamW 3e-4 (`Recipe.teacher_lr`); the memorisation probe says the teacher underfits, and a 12-layer teacher fits
only 3-4% better than a 6-layer one on the same batches. Here session 6's run (v5: warm from the shipped teacher,
4096 clips, caption dropout) is repeated with the learning rate LR: the batches are v5's, in v5's order, so the two
`log.jsonl` compare step by step. Same VAE, decoder and latent set (links made here); the teacher stage only.

    OMP_NUM_THREADS=1 nohup python runs/train_v9.py LR MINUTES [STEPS] > runs/train_v9_LR.log 2>&1 &

STEPS (v5 trained 14700) ends the stage there, for a checkpoint that compares with v5's at the same step.
"""

import sys
from pathlib import Path

from streamgen_train import cli, stages

LR, MINUTES = float(sys.argv[1]), float(sys.argv[2])
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
RUN = Path(f"runs/v9_lr{sys.argv[1]}")
RUN.mkdir(parents=True, exist_ok=True)
for name, target in (("vae", "../v4/vae"), ("decoder", "../v4/decoder"), ("latents.pt", "../v5/latents.pt")):
    if not (RUN / name).exists():
        (RUN / name).symlink_to(target)
recipe = stages.Recipe(root=RUN, clips=4096, warm_start=Path("runs/v4"), minutes=MINUTES, teacher_lr=LR)
cli.run_stage(recipe, "teacher", STEPS)
