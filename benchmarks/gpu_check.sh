#!/usr/bin/env bash
# GPU check: the peer suite and the overhead ratio on CUDA, in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Partial results survive a timeout: every row is printed (and tee'd) as soon as it is measured.
# Needs a CUDA build of torch and the [bench] extra (zuko, nflows, normflows). Measures the
# acceptance rows of issue 10: training throughput at batch 1024 for MAF, NSF and RealNVP at
# D = 64 (plus log_prob and sampling at batch 8192), every library interleaved round by round,
# zuko also under torch.compile(mode="reduce-overhead"). Each step has its own time limit so
# the whole script stays below 5 minutes even if a compile is slow; results go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
# use this checkout's exactflow even where it is not pip-installed
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${1:-${OUT:-/tmp/exactflow-gpu-check}}"
mkdir -p "$out"

python - <<'PY' || exit 1
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch; this script is for GPU machines")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
for lib in ("zuko", "nflows", "normflows", "exactflow.models"):
    try:
        mod = importlib.import_module(lib)
        print(lib, getattr(mod, "__version__", ""))
    except Exception as exc:
        print(f"{lib}: not importable ({exc}); peers.py will skip it (pip install -e .[bench])")
PY

status=0
# 1) training throughput, the acceptance rows (D = 64); most of it is compilation  ~150 s
timeout 170 python benchmarks/peers.py --device cuda --dims 64 --tasks train \
    --rounds 5 --target 0.2 --json "$out/peers_train.json" | tee "$out/peers_train.txt" \
    || status=$?
# 2) log_prob and sampling at D = 64; compiled autoregressive sampling is skipped by the
#    time limit if its unrolled D-pass graph compiles too slowly                    ~80 s
timeout 85 python benchmarks/peers.py --device cuda --dims 64 --tasks log_prob sample \
    --rounds 3 --target 0.1 --json "$out/peers_eval.json" | tee "$out/peers_eval.txt" \
    || status=$?
# 3) flow / bare-MLP floor ratio                                                     ~30 s
timeout 40 python benchmarks/overhead.py --device cuda --dims 64 --rounds 5 --target 0.1 \
    | tee "$out/overhead.txt" || status=$?
echo "results in $out (exit status $status)"
exit "$status"
