#!/bin/bash
# Issue 11, session 6: every figure of the runs/v5 model, with main's benchmark scripts.
set -x
export OMP_NUM_THREADS=1
cd /work/main
R=/work/main/runs/v5
Q="python benchmarks/quality.py --run $R --prompts 8 --drift 10"
$Q --models teacher-euler,"anyflow (stage 1)" --out $R/quality-a > $R/quality-a.log 2>&1 &
( $Q --models "teacher-euler unguided",consistency --out $R/quality-b > $R/quality-b.log 2>&1
  python benchmarks/continuation.py --model $R/model --label issue11-v5 > $R/continuation.log 2>&1
  python benchmarks/footage.py --model $R/model --label issue11-v5 --sheet docs/footage.png > $R/footage.log 2>&1
  python benchmarks/strip.py --model $R/model --out docs/what_it_draws.png > $R/strip.log 2>&1 )
wait
python benchmarks/quality.py --merge $R/quality-a.json $R/quality-b.json --out benchmarks/results/quality
