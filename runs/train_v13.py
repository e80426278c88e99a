"""Issue 11, session 12: fine-tune the shipped VAE's decoder alone, so the shipped transformer keeps its latents;
and continue the teacher, recovered from the shipped model.

Session 11 raised the VAE's round trip of the world from 0.85 to 0.90 (23.5 -> 25.4 dB) by fine-tuning the whole
VAE at 1e-4, but a new encoder moves the latent space, and the teacher, stage 1 and their baseline would all have
to be trained again (and that session's runs did not survive it). The decoder stage trains the decoder on the
frozen encoder's latents: whatever it gains the shipped model shows at once, at the same cost per chunk. So the
shipped VAE is this run's vae stage, and the decoder stage fine-tunes it at session 11's rate.

The 12-layer teacher of `runs/v7_12` was lost with its run, but the shipped student is that teacher's weights plus
the FAR-only modules a Wan model ignores: read back as a Wan model and guided at 2 it scores 0.72 at 4 steps on 32
held-out prompts, as the lost teacher did (0.70). The teacher stage continues it from there (warm from the shipped
model, at session 9's continuing rate, on 4096 clips encoded by the shipped encoder): does more teacher training
still pay? (Session 12: 0.72 / 0.72 / 0.70 -> 0.73 / 0.74 / 0.75 at 4 / 8 / 16 steps in 31 minutes.) Stage 1
and its baseline then distil it, side by side, guided at 2 as in `runs/train_v10.py`, and `export` writes stage 1
to `runs/v13/model` with the run's VAE: the shipped one, unless the decoder stage ran (session 12 did not ship it:
it lifts the VAE's round trip, not the stream). Session 13 ran `student 80` and `consistency 80` side by side on the
teacher at step 3400, then `export 0`, and shipped the model: 0.71 at 4 steps on 64 prompts as session 10's, 0.72 at 16
(0.69).

    OMP_NUM_THREADS=1 nohup python runs/train_v13.py STAGE MINUTES > runs/train_v13_STAGE.log 2>&1 &
    # STAGE: decoder | teacher | student | consistency | export
"""

import shutil
import sys
from pathlib import Path

from streamgen_train import cli, stages
from streamgen_train import components as C

RUN = Path("runs/v13")
VAE = RUN / "vae" / "final" / "vae"
if not VAE.exists():
    shutil.copytree(stages.DEFAULT_MODEL / "vae", VAE)
STAGE, MINUTES = sys.argv[1], float(sys.argv[2])
recipe = stages.Recipe(root=RUN, sizes=C.Sizes(layers=12), clips=4096, minutes=MINUTES, vae_lr=1e-4, teacher_lr=1e-4,
                       teacher_guidance=2.0, warm_start=stages.DEFAULT_MODEL, export_to=RUN / "model")
cli.run_stage(recipe, STAGE, 1_000_000)
