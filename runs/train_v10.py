"""Issue 11, session 9: stage 1 of the 12-layer teacher guided at GUIDANCE. Classifier-free guidance 2 lifted the
12-layer teacher (`runs/v7_12`, trained with caption dropout) from 0.61 to 0.70 at 4 steps on 16 held-out prompts
(docs/training.md, session 9), where guidance 3 had not helped session 6's 6-layer teacher. Here the FAR student
learns the flow map of that guided teacher (`Recipe.teacher_guidance` = GUIDANCE), so it can
stream it unguided at one forward per jump. Same VAE, decoder and 4096-clip latent set (links made here); the
teacher is `runs/v7_12`'s finished one. STAGE (default `student`) may also be `consistency`: the baseline
distilled from the same guided teacher on the same data, run beside stage 1 on the other core (session 10); or
`export`, which writes the finished stage 1 as a model to `runs/v10/model`. Each resumes from its `state.pt`.

    OMP_NUM_THREADS=1 nohup python runs/train_v10.py GUIDANCE MINUTES [STAGE] > runs/train_v10.log 2>&1 &
"""

import sys
from pathlib import Path

from streamgen_train import cli, stages
from streamgen_train import components as C

GUIDANCE = float(sys.argv[1])
MINUTES = float(sys.argv[2])
STAGE = sys.argv[3] if len(sys.argv) > 3 else "student"
RUN = Path("runs/v10")
RUN.mkdir(parents=True, exist_ok=True)
for name, target in (("vae", "../v4/vae"), ("decoder", "../v4/decoder"), ("latents.pt", "../v5/latents.pt"),
                     ("teacher", "../v7_12/teacher")):
    if not (RUN / name).exists():
        (RUN / name).symlink_to(target)
recipe = stages.Recipe(root=RUN, sizes=C.Sizes(layers=12), clips=4096, minutes=MINUTES, export_to=RUN / "model",
                       teacher_guidance=GUIDANCE)
cli.run_stage(recipe, STAGE, 1_000_000)
