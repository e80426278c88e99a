#!/bin/bash
# Issue 11, session 5 trial: the base-8 decoder continued (v4a) against a base-16 decoder from scratch (v4b), 15 min each.
export OMP_NUM_THREADS=1
cd /work/train4
PYTHONPATH=/work/train4:/work/train4/train python -c '
import torch; torch.set_num_threads(1)
from pathlib import Path
from streamgen_train import stages, components as C
r = stages.Recipe(root=Path("/work/main/runs/v4a"), sizes=C.Sizes(vae_decoder_base_dim=8), minutes=15)
print(stages.train_decoder(r, 100000))' > /work/main/runs/train_v4a.log 2>&1 &
PYTHONPATH=/work/train4:/work/train4/train python -c 'import sys; from streamgen_train.cli import main; sys.exit(main(sys.argv[1:]))' decoder --steps 100000 --minutes 15 --out /work/main/runs/v4b --threads 1 > /work/main/runs/train_v4b.log 2>&1
wait
