#!/usr/bin/env bash
# GPU benchmarks in one short run (about 5 minutes on an H100 or H200): `streamgen bench` on the preset shaped
# like Wan2.1-1.3B at 832x480 (eager, then with torch.compile) and batching across sessions. Writes to $OUT.
#
# The GPU machine has PyTorch but no network, so the two packages it lacks travel as wheels:
#   bash benchmarks/gpu.sh fetch    # here, with PyPI: downloads them into build/wheels (git-ignored)
#   bash benchmarks/gpu.sh          # there, with build/wheels carried along
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/wheels

if [[ "${1:-}" == fetch ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" diffusers==0.42.1 av==18.1.0
    exit
fi

OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
# Install only what is missing, from the carried wheels: the machine's own torch/transformers stay.
if ! python3 -c 'import diffusers, av' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c 'import diffusers, av, transformers, accelerate, safetensors, matplotlib
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "av", av.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Each step has its own time limit and may fail without stopping the others (one run of the device is precious).
step() { local limit=$1 log=$2; shift 2; timeout "$limit" "$@" 2>&1 | tee "$OUT/$log" || echo "FAILED or timed out: $*"; }
PRESET=${PRESET:-wan-1.3b} DEVICE=${DEVICE:-cuda}  # PRESET=tiny DEVICE=cpu: a dry run anywhere
bench="python3 -m streamgen.bench --preset $PRESET --device $DEVICE --chunks 6"
# Eager: budgets 1, 2, 4 and the adaptive budget under 1, 2 and 4 sessions at the model's 16 fps.
step 170 bench_gpu.txt $bench --steps 1,2,4 --json "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png"
# torch.compile of the transformer blocks, compiled during the warm-up: does it pay once warm?
step 180 bench_gpu_compile.txt $bench --steps 1,4 --sessions '' --compile --json "$OUT/bench_gpu_compile.json"
step 150 batching_gpu.txt python3 benchmarks/batching.py --preset $PRESET --device $DEVICE --out "$OUT/batching_gpu"
