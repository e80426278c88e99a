"""Issue 11, session 14: the stream moves objects the wrong way, two-object prompts most (direction right for 0.26 of
their objects against 0.54 for one-object prompts, `benchmarks/direction.py`). The text encoder's relative-position
buckets (T5's 8 up to offset 128) gave offsets 2-15 one bias: it could not tell which object's clause a direction
word sits in. Two arms, one core each, both continuing session 13's teacher (`runs/v13`, step 6300) on its 4096
clips at 1e-4 with a fresh AdamW, the text encoder training with it as always: `control` (started before the change:
8 buckets) and `buckets` (`components.TEXT_POSITION_BUCKETS`, 32 up to offset 32, warm-started function-preservingly
by `load_text_encoder_weights`). A third arm, `causal` (the teacher trained only with every chunk but the last
clean), ran 13 minutes beside `control` and was stopped for `buckets`.

    OMP_NUM_THREADS=1 nohup python runs/train_v14.py ARM STAGE MINUTES > runs/train_v14_ARM_STAGE.log 2>&1 &
"""

import sys
from pathlib import Path

from streamgen_train import cli, stages
from streamgen_train import components as C

ARM, STAGE, MINUTES = sys.argv[1], sys.argv[2], float(sys.argv[3])
# `buckets-textlr`: the `buckets` arm continued with its text encoder at 1e-3 (`Recipe.text_lr`), 10x the teacher's.
RUN, SOURCE = Path(f"runs/v14{ARM}"), Path("runs/v14buckets" if ARM == "buckets-textlr" else "runs/v13")
for shared in ("latents.pt", "vae"):  # the same data and VAE as the teacher continued
    if not (RUN / shared).exists():
        RUN.mkdir(parents=True, exist_ok=True)
        (RUN / shared).symlink_to(Path("runs/v13").resolve() / shared)
recipe = stages.Recipe(root=RUN, sizes=C.Sizes(layers=12), clips=4096, minutes=MINUTES, teacher_lr=1e-4,
                       teacher_guidance=2.0, warm_start=SOURCE, export_to=RUN / "model",
                       text_lr=1e-3 if ARM.endswith("textlr") else None)
cli.run_stage(recipe, STAGE, 1_000_000)
