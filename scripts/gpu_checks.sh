#!/bin/bash
# Device checks (not CI), most wanted first: Tolaria's overhead bench on CUDA (TOLARIA_HIDDEN_WIDTH is at
# most 4096), where the trainer's step time goes (scripts/gpu_step_profile.py), the CUDA tests, Tamiyo's
# compile path. About 7 min on an H200.
# Prepared by scripts/gpu_prepare.sh; run from the repo root on the GPU machine: OUT=$OUT bash scripts/gpu_checks.sh
# (PY, DEVICE, WIDTHS, KWIDTHS, ROUNDS, DEEP, PROFILE_WIDTHS, TESTS, SKIP_PIP and the *_S time limits for a dry run elsewhere)
set -u
T0=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
el() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
if [ -z "${SKIP_PIP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  PV=$($PY -c 'import pytest; print(pytest.__version__.split(".")[0])' 2>/dev/null || echo 0)
  if [ "$PV" -lt 9 ]; then $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/pytest/*.whl; fi
fi
SRC=$(ls -d $PWD/libs/*/src $PWD/services/*/src | paste -sd:)
export PYTHONPATH=/tmp/site:$SRC:$PWD PYTHONUNBUFFERED=1 ESPER_REDIS_SERVER_BIN=$PWD/.gpu/redis-server
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; nproc; df -h /tmp | tail -1
$PY -c "import torch, torch_geometric, google.protobuf, pydantic, redis, pytest; print(torch.__version__, torch.cuda.is_available(), torch_geometric.__version__, google.protobuf.__version__, pytest.__version__)"
el bench
# The deep host of docs/benchmarks.md ("GPU"): 16 layers, batch 512, a synthetic 16384 x 1024 dataset.
DEEP=${DEEP:---scale-layers 16 --scale-batch 512 --scale-samples 16384 --scale-features 1024}
timeout ${BENCH_S:-330} $PY bench/tolaria_bench.py --device ${DEVICE:-cuda} --widths ${WIDTHS:-1024 2048 4096} \
  --kernel-widths ${KWIDTHS:-1024} --rounds ${ROUNDS:-2} --answered-rounds 1 --scale-epochs 3 $DEEP --out "$OUT/tolaria_cuda.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -v "^20[0-9][0-9]-" "$OUT/bench.log" | grep -iv warn | tail -24
el profile
for w in ${PROFILE_WIDTHS:-32 4096}; do
  if [ "$w" = 32 ]; then P=""; else P="--layers 16 --batch 512 --samples 16384 --features 1024"; fi
  timeout ${PROFILE_S:-120} $PY scripts/gpu_step_profile.py --device ${DEVICE:-cuda} --width $w $P \
    --out "$OUT/profile_w$w.json" > "$OUT/profile_w$w.log" 2>&1
  echo "profile w$w rc=$?"; cat "$OUT/profile_w$w.json" 2>/dev/null
done
el tests
timeout ${TESTS_S:-150} $PY -m pytest -q -p no:cacheprovider -W default --maxfail=10 --timeout 60 ${TESTS:-tests/tolaria tests/tamiyo/test_gnn.py tests/tamiyo/test_policy.py} > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
el tamiyo
timeout ${TAMIYO_S:-100} $PY bench/tamiyo_cuda_bench.py --out "$OUT/tamiyo_cuda.json" > "$OUT/tamiyo.log" 2>&1
echo "tamiyo rc=$?"; tail -20 "$OUT/tamiyo.log"
el done
