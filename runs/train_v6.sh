#!/bin/bash
# Issue 11, session 7: the patch-1 teacher (runs/train_v6.py), then stage 1 and the consistency baseline side by side.
export OMP_NUM_THREADS=1
cd /work/main
T=${1:-55}; S=${2:-25}
python runs/train_v6.py $T $S student > runs/train_v6_student.log 2>&1 &
until [ -f runs/v6/teacher/final/tokenizer/tokenizer_config.json ]; do sleep 20; done
sleep 20
python runs/train_v6.py $T $S consistency > runs/train_v6_consistency.log 2>&1
wait
