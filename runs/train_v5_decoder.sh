#!/bin/bash
# Issue 11, session 6: the base-16 decoder (v4: 1750 steps, loss still falling) continues on the frozen v4 encoder
# beside the teacher for 60 min; the latent space does not move, so the transformers are unaffected.
export OMP_NUM_THREADS=1
cd /work/train5
export PYTHONPATH=/work/train5:/work/train5/train
python -c 'import sys; from streamgen_train.cli import main; sys.exit(main(sys.argv[1:]))' decoder --steps 100000 --minutes 60 --out /work/main/runs/v5 --threads 1 --clips 4096
