"""Issue 11, session 11: raise the VAE's ceiling, then re-seat the 12-layer teacher on the new latents.

`benchmarks/vae_ceiling.py` found the world's round trip through the shipped VAE at 23.5 dB (semantic 0.85, shape
0.49), while the scorer still gives 1.00 to the true frames blurred by 1.5 pixels (about 31 dB): the VAE, trained
30 minutes in session 5 (plus 100 minutes of decoder), caps every model below issue 11's 0.9. So the VAE trains on,
in one of three arms (ARM; each its own run):

    warm  runs/v12   end to end, warm from the shipped VAE (base-8 encoder, base-16 decoder), at the stage's 1e-3
    fine  runs/v12f  the same at 1e-4: is the fresh optimizer's noise at 1e-3 what holds the warm arm back?
    wide  runs/v12w  a base-16 encoder (twice as wide; the encoder does not run in the live loop) from scratch

The latent space moves, so the teacher is then re-seated on the chosen arm's latents warm from the 12-layer teacher
of `runs/v7_12` (session 5 did the same for the 6-layer in 40 minutes); stage 1, its baseline and the export follow
as in `runs/train_v10.py`, distilling the teacher guided at 2 (session 11's sweep: 3 scores the same, 4 lower).
Each stage resumes from its `state.pt`.

    OMP_NUM_THREADS=1 nohup python runs/train_v12.py ARM STAGE MINUTES > runs/train_v12_ARM_STAGE.log 2>&1 &
"""

import sys
from pathlib import Path

from streamgen_train import cli, stages
from streamgen_train import components as C

ARM, STAGE, MINUTES = sys.argv[1], sys.argv[2], float(sys.argv[3])
ROOT, VAE_LR, ENCODER_BASE, WARM_VAE = {
    "warm": ("runs/v12", 1e-3, 8, True),
    "fine": ("runs/v12f", 1e-4, 8, True),
    "wide": ("runs/v12w", 1e-3, 16, False),
}[ARM]
RUN = Path(ROOT)
# Warm starts, as runs whose stage has a `final/`: the shipped VAE is session 5's encoder with its base-16 decoder.
INIT = Path("runs/v12init/vae/final")
if not INIT.exists():
    INIT.mkdir(parents=True)
    (INIT / "vae").symlink_to(Path("../../../v4/decoder/final/vae"))
WARM = {"vae": INIT.parent.parent if WARM_VAE else None, "teacher": Path("runs/v7_12")}
recipe = stages.Recipe(root=RUN, sizes=C.Sizes(layers=12, vae_base_dim=ENCODER_BASE), clips=4096, minutes=MINUTES,
                       export_to=RUN / "model", vae_lr=VAE_LR, teacher_guidance=2.0, warm_start=WARM.get(STAGE))
cli.run_stage(recipe, STAGE, 1_000_000)
