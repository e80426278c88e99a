#!/bin/bash
# Issue 11, session 5: the VAE was the weak link (708 steps; round trip lost positions, motion and shapes).
# VAE end to end, warm from the session-4 VAE (base 8, its tuned decoder), 30 min; then the teacher (warm from
# session 4's, on the new latents) beside a base-16 decoder trained anew on the frozen encoder; then stage 1 and
# the consistency baseline side by side with equal boxes; export.
set -x
export OMP_NUM_THREADS=1
cd /work/train4
export PYTHONPATH=/work/train4:/work/train4/train
train() { python -c 'import sys; from streamgen_train.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
W="--out /work/main/runs/v4 --threads 1"
python -c '
import torch; torch.set_num_threads(1)
from pathlib import Path
from streamgen_train import stages, components as C, cli
r = stages.Recipe(root=Path("/work/main/runs/v4"), sizes=C.Sizes(vae_decoder_base_dim=8), minutes=30,
                  warm_start=Path("/work/main/runs/v3warm"))
cli.run_stage(r, "vae", 100000)'
train decoder --steps 100000 --minutes 40 $W > /work/main/runs/train_v4_decoder.log 2>&1 &
train teacher --steps 100000 --minutes 40 --warm-start /work/main/runs/v3warm $W > /work/main/runs/train_v4_teacher.log 2>&1
wait
train student --steps 100000 --minutes 18 $W > /work/main/runs/train_v4_student.log 2>&1 &
train consistency --steps 100000 --minutes 18 $W > /work/main/runs/train_v4_consistency.log 2>&1
wait
train export --export-to /work/main/runs/v4/model $W
