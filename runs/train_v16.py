"""Issue 11, session 16: a decoder that draws the objects' shape (the shipped latents, so the transformers stay).

The shipped VAE turns every small triangle and most small squares into a round blob (`benchmarks/vae_ceiling.py`:
shape 0.49 on its round trip). The shipped encoder's latents carry an object's shape about as well as 8x8 average
pooling does (a probe reads a small object's shape back 0.71 of the time, chance 0.33), but the decoder, trained by
L1 + L2, draws the average of what the latent leaves open: a blob. So the decoder alone is fine-tuned on the frozen
shipped encoder with an adversarial term (`Recipe.decoder_adversarial`, `adversarial.py`), in two arms of weight W:

    OMP_NUM_THREADS=1 nohup python runs/train_v16.py W MINUTES > runs/train_v16_W.log 2>&1 &

Run `runs/v16-W`; it starts from the shipped VAE (copied into its `vae/final/vae`). It measured no gain in the
stream (docs/training.md, session 16), so the adversarial term was removed from the recipe afterwards: this driver
runs at commit c1fc870, where `train/streamgen_train/adversarial.py` and `--decoder-adversarial` live.
"""

import shutil
import sys
from pathlib import Path

from streamgen.pipeline import DEFAULT_MODEL
from streamgen_train import cli, stages
from streamgen_train import components as C

WEIGHT, MINUTES = float(sys.argv[1]), float(sys.argv[2])
RUN = Path(f"runs/v16-{WEIGHT:g}")
if not (RUN / "vae" / "final" / "vae").is_dir():
    shutil.copytree(DEFAULT_MODEL / "vae", RUN / "vae" / "final" / "vae")
recipe = stages.Recipe(root=RUN, sizes=C.Sizes(layers=12), vae_lr=1e-4, decoder_adversarial=WEIGHT, minutes=MINUTES)
cli.run_stage(recipe, "decoder", 1_000_000)
