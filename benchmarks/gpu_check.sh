#!/usr/bin/env bash
# GPU check: the peer suite, the whole-step compiled trainer and the floor ratio on CUDA,
# in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]    # the same steps on the CPU, tiny sizes
#
# Partial results survive a timeout: every row is printed (and tee'd) as soon as it is measured.
# Needs a CUDA build of torch and the [bench] extra (zuko, nflows, normflows). Measures training
# throughput at batch 1024 for MAF, NSF and RealNVP at D = 64 (plus log_prob and sampling at
# batch 8192), every library interleaved round by round: zuko and exactflow under
# torch.compile(mode="reduce-overhead") (CUDA graphs), and exactflow's Trainer(compile=True)
# step (compiled forward and backward replayed as CUDA graphs, fused Adam, the finiteness
# guard) as `exactflow-trainer`. Step 3 prints each step's fraction of the bare-MLP floor, the
# compiled floor (CUDA graphs, fused Adam) for the compiled contenders. Each step has its own
# time limit so the whole script stays below 5 minutes even if a compile is slow.
set -uo pipefail
cd "$(dirname "$0")/.."
# use this checkout's exactflow even where it is not pip-installed
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
out="${1:-${OUT:-/tmp/exactflow-gpu-check}}"
mkdir -p "$out"

if ((dry)); then
    # the same commands on the CPU at D = 2 with one round: checks the script, not speed
    device=cpu
    dims=2
    speed=(--rounds 1 --target 0.02 --threads 2 --models realnvp)
    floor=(--rounds 1 --target 0.02 --threads 2 --models realnvp)
    slow=4  # CPU compiles are slower: longer limits (the dry run is not held to 5 minutes)
    echo "dry run on the CPU (D = $dims, RealNVP only): the numbers mean nothing"
else
    device=cuda
    dims=64
    speed=()
    floor=()
    slow=1
    python - <<'PY' || exit 1
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch; this script is for GPU machines (or --dry-run)")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
for lib in ("zuko", "nflows", "normflows", "exactflow.models"):
    try:
        mod = importlib.import_module(lib)
        print(lib, getattr(mod, "__version__", ""))
    except Exception as exc:
        print(f"{lib}: not importable ({exc}); peers.py will skip it (pip install -e .[bench])")
PY
fi

status=0
# 1) training throughput, the acceptance rows; most of it is compilation             ~170 s
timeout $((180 * slow)) python benchmarks/peers.py --device "$device" --dims "$dims" --tasks train \
    --rounds 5 --target 0.2 "${speed[@]}" --json "$out/peers_train.json" \
    | tee "$out/peers_train.txt" || status=$?
# 2) log_prob and sampling; compiled autoregressive sampling is skipped by the time limit
#    if its unrolled D-pass graph compiles too slowly                                 ~55 s
timeout $((60 * slow)) python benchmarks/peers.py --device "$device" --dims "$dims" --tasks log_prob sample \
    --libs zuko nflows normflows zuko+compile exactflow exactflow+compile \
    --rounds 3 --target 0.1 "${speed[@]}" --json "$out/peers_eval.json" \
    | tee "$out/peers_eval.txt" || status=$?
# 3) each step's fraction of the bare-MLP floor (compiled floor for compiled steps)   ~50 s
timeout $((55 * slow)) python benchmarks/overhead.py --device "$device" --dims "$dims" --rounds 5 \
    --target 0.1 --libs exactflow exactflow-trainer zuko+compile "${floor[@]}" \
    | tee "$out/overhead.txt" || status=$?
echo "results in $out (exit status $status)"
exit "$status"
