"""Issue 11, session 8: is the teacher's 0.61 a capacity limit? A memorisation probe (the shipped teacher trained on
the 8 evaluation clips alone) reached the VAE's ceiling, so sampling, the causal layout and decoding are sound and
the teacher fails to fit the whole world. Here the shipped 6-layer teacher is deepened to LAYERS layers without
changing its function: each old block is followed by copies of itself whose output projections (self-attention,
cross-attention, feed-forward) are zero, so the new blocks start as the identity and learn what the old ones could
not hold. Same VAE, decoder and 4096-clip latent set as v5/v6 (links made here); the teacher stage only.
With LR (session 9, after `runs/train_v9.py` found 1e-4 fitting better than 3e-4), resumed steps use that learning
rate (the recipe's `teacher_lr`; the checkpoint keeps the optimizer's moments).

    OMP_NUM_THREADS=1 nohup python runs/train_v7.py LAYERS MINUTES [LR] > runs/train_v7_LAYERS.log 2>&1 &
"""

import shutil
import sys
from pathlib import Path

import torch

from streamgen_train import cli, stages
from streamgen_train import components as C

LAYERS, MINUTES = int(sys.argv[1]), float(sys.argv[2])
LR = float(sys.argv[3]) if len(sys.argv) > 3 else stages.Recipe.teacher_lr
SOURCE = stages.Recipe(root=Path("runs/v4"))
INIT, RUN = Path(f"runs/v7init_{LAYERS}"), Path(f"runs/v7_{LAYERS}")
SIZES = C.Sizes(layers=LAYERS)
ZEROED = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")  # the residual branches' last linear layers


def deepen() -> None:
    old = stages.load_teacher(SOURCE)
    new = C.build_teacher(SIZES)
    copies = LAYERS // len(old.blocks)
    weights = {k: v for k, v in old.state_dict().items() if not k.startswith("blocks.")}
    for i, block in enumerate(old.blocks):
        for j in range(copies):
            for key, value in block.state_dict().items():
                zero = j > 0 and key.startswith(ZEROED)
                weights[f"blocks.{i * copies + j}.{key}"] = torch.zeros_like(value) if zero else value
    new.load_state_dict(weights)
    final = INIT / "teacher" / "final"
    new.save_pretrained(final / "teacher")
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(SOURCE.require("teacher") / part, final / part, dirs_exist_ok=True)


if LAYERS % C.Sizes().layers:
    sys.exit(f"LAYERS must be a multiple of {C.Sizes().layers}")
if not (INIT / "teacher" / "final" / "teacher").is_dir():
    deepen()
RUN.mkdir(parents=True, exist_ok=True)
for name, target in (("vae", "../v4/vae"), ("decoder", "../v4/decoder"), ("latents.pt", "../v5/latents.pt")):
    if not (RUN / name).exists():
        (RUN / name).symlink_to(target)
recipe = stages.Recipe(root=RUN, sizes=SIZES, clips=4096, warm_start=INIT, minutes=MINUTES, teacher_lr=LR)
cli.run_stage(recipe, "teacher", 1_000_000)
