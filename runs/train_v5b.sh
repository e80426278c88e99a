#!/bin/bash
# Issue 11, session 6, continued: probes of the teacher at steps 8400 and 14500 (guided 0.62 / 0.63, unguided
# 0.57 / 0.55 on 16 held-out prompts) said more teacher steps no longer moved it, so its 75-minute box was cut at
# step 14700 (finished from its checkpoint) and stage 1 and the consistency baseline get 28-minute boxes instead.
set -x
export OMP_NUM_THREADS=1
cd /work/train5
export PYTHONPATH=/work/train5:/work/train5/train
train() { python -c 'import sys; from streamgen_train.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
W="--out /work/main/runs/v5 --threads 1 --clips 4096"
train teacher --steps 14700 $W > /work/main/runs/train_v5_teacher_finish.log 2>&1
train student --steps 100000 --minutes 28 $W > /work/main/runs/train_v5_student.log 2>&1 &
train consistency --steps 100000 --minutes 28 $W > /work/main/runs/train_v5_consistency.log 2>&1
wait
while [ ! -d /work/main/runs/v5/decoder/final ]; do sleep 10; done
train export --export-to /work/main/runs/v5/model $W
