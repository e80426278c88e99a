"""Issue 11, session 15: the teacher stage with the binding loss (`losses.binding_loss`: every word of an object's
clause predicts that object's attributes from its encoding, weight 0.1), so the encoder binds each direction to its
object and the teacher learns to read it. Both arms continue session 14's `buckets-textlr` teacher (32 text
buckets, encoder at 1e-3) on session 13's 4096 clips with a fresh AdamW, one core each: `bind` (teacher at 1e-4)
and `bind-fast` (teacher at 3e-4, to follow the encoder's new embeddings sooner). `bind` was continued to step 12215,
whose teacher moved to `runs/v15bind-12215` (ARM `bind-12215`: its later stages, from that teacher).

    OMP_NUM_THREADS=1 nohup python runs/train_v15.py ARM STAGE MINUTES > runs/train_v15_ARM_STAGE.log 2>&1 &
"""

import sys
from pathlib import Path

from streamgen_train import cli, stages
from streamgen_train import components as C

ARM, STAGE, MINUTES = sys.argv[1], sys.argv[2], float(sys.argv[3])
RUN = Path(f"runs/v15{ARM}")
for shared in ("latents.pt", "vae"):  # the same data and VAE as the teacher continued
    if not (RUN / shared).exists():
        RUN.mkdir(parents=True, exist_ok=True)
        (RUN / shared).symlink_to(Path("runs/v13").resolve() / shared)
recipe = stages.Recipe(root=RUN, sizes=C.Sizes(layers=12), clips=4096, minutes=MINUTES,
                       teacher_lr=3e-4 if ARM == "bind-fast" else 1e-4, text_lr=1e-3, binding_weight=0.1,
                       teacher_guidance=2.0, warm_start=Path("runs/v14buckets-textlr"), export_to=RUN / "model")
cli.run_stage(recipe, STAGE, 1_000_000)
