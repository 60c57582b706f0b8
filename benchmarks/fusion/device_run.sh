#!/usr/bin/env bash
# The fused bi-attention kernel's GPU check in one call: environment, a subset of the kernel tests on CUDA, then
# gpu_bench.py (bf16 gate, bf16 timing table, one fp32 row). Every phase has a hard time limit that includes Triton's
# compile and autotune time; what each phase measured is kept when a later one runs out of time.
#
# On a lent GPU machine (torch, triton and pytest installed, no package index, no hatchling: glip-fusion goes on
# PYTHONPATH; about 7 minutes of wall time in all, within the run tool's 600 s limit):
#
#   run(command="bash benchmarks/fusion/device_run.sh", timeout_s=540)
#
# On CPU, in CI (tiny shapes under the Triton interpreter, every phase; about 50 s on 2 cores, at most about
# 4 minutes by the phase limits):
#
#   OUT=out/device_smoke bash benchmarks/fusion/device_run.sh --smoke
#
# Writes at most 4 files to $OUT (default out/device_run): device_env.txt, device_tests.txt, gpu_bench.log and
# fusion_<device>_<date>.json (partial results are written after every measurement). Exit status: 0 when the tests
# passed and the benchmark ran every phase without crashing (in --smoke also: the fused kernel passed its gate and
# was timed); 1 otherwise. Time limits (seconds) can be changed through the environment:
#   TEST_TIMEOUT_S   pytest subset                     (GPU 75, smoke 60)
#   GATE_BUDGET_S    gpu_bench bf16 correctness gate   (GPU 100, smoke 30)
#   TIME_BUDGET_S    gpu_bench bf16 timing table       (GPU 210, smoke 60)
#   FP32_BUDGET_S    gpu_bench fp32 gate and row       (GPU 45, smoke 20)
set -uo pipefail

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "device_run.sh: unknown argument '$arg' (only --smoke)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/../.." || exit 2
REPO="$PWD"
OUT="${OUT:-$REPO/out/device_run}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export OUT
export PYTHONPATH="$REPO/packages/glip-fusion/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python

# The CUDA subset: real bf16/fp16 tensor-core dots (the interpreter cannot do bf16), Philox dropout and masks on the
# GPU, split partials. Small head dims and fixed tiles keep the compile count low (~24 variants); the autotuned path
# at head dim 256 is what gpu_bench times. Most valuable first: a timeout keeps what ran.
TESTS=(
  "packages/glip-fusion/tests/test_fusion_triton_kernels.py::test_low_precision_inputs"
  "packages/glip-fusion/tests/test_fusion_triton_dropout.py::test_forward_and_grads_match_reference_using_the_kernels_masks"
  "packages/glip-fusion/tests/test_fusion_triton_kernels.py::test_forward_and_grads_match_fp64_reference[odd_shapes_small_tiles_splits]"
)

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
  TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-60}"
  GATE_BUDGET_S="${GATE_BUDGET_S:-30}"
  TIME_BUDGET_S="${TIME_BUDGET_S:-60}"
  FP32_BUDGET_S="${FP32_BUDGET_S:-20}"
  BENCH_ARGS=(--smoke)
else
  unset TRITON_INTERPRET
  TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-75}"
  GATE_BUDGET_S="${GATE_BUDGET_S:-100}"
  TIME_BUDGET_S="${TIME_BUDGET_S:-210}"
  FP32_BUDGET_S="${FP32_BUDGET_S:-45}"
  BENCH_ARGS=()
fi
# gpu_bench enforces each phase budget itself; this outer limit (phases + start-up and table) is the last resort.
BENCH_LIMIT_S=$(( GATE_BUDGET_S + TIME_BUDGET_S + FP32_BUDGET_S + 45 ))

echo "== environment (smoke=$SMOKE, OUT=$OUT)"
timeout 60 "$PY" - >"$OUT/device_env.txt" 2>&1 <<'EOF'
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
EOF
env_rc=$?
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 20 nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
    >>"$OUT/device_env.txt" 2>&1
fi
cat "$OUT/device_env.txt"
if [ "$env_rc" != 0 ]; then
  echo "device_run.sh: python/torch not usable (exit $env_rc)"
  exit 1
fi

echo "== kernel tests (${#TESTS[@]} node ids, limit ${TEST_TIMEOUT_S} s)"
start=$SECONDS
timeout -k 10 "$TEST_TIMEOUT_S" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >"$OUT/device_tests.txt" 2>&1
tests_rc=$?
tail -n 15 "$OUT/device_tests.txt"
[ "$tests_rc" = 124 ] && echo "tests: stopped by the ${TEST_TIMEOUT_S} s limit (the lines above show what ran)"
echo "tests exit code $tests_rc after $(( SECONDS - start )) s"

echo "== gpu_bench.py (phase budgets gate ${GATE_BUDGET_S} s, timing ${TIME_BUDGET_S} s, fp32 ${FP32_BUDGET_S} s)"
start=$SECONDS
timeout -k 20 "$BENCH_LIMIT_S" "$PY" benchmarks/fusion/gpu_bench.py "${BENCH_ARGS[@]}" --out "$OUT" \
  --gate-budget-s "$GATE_BUDGET_S" --time-budget-s "$TIME_BUDGET_S" --fp32-budget-s "$FP32_BUDGET_S" \
  >"$OUT/gpu_bench.log" 2>&1
bench_rc=$?
grep -v -e '^USDT:' -e 'gpuGetDeviceCount' "$OUT/gpu_bench.log" | tail -n 45
echo "gpu_bench exit code $bench_rc after $(( SECONDS - start )) s"

# What the run produced, checked from the JSON (not from exit codes alone).
"$PY" - "$OUT" "$SMOKE" <<'EOF'
import glob, json, sys
out, smoke = sys.argv[1], sys.argv[2] == "1"
files = sorted(glob.glob(f"{out}/fusion_*.json"))
if not files:
    sys.exit("device_run.sh: gpu_bench wrote no JSON")
data = json.load(open(files[-1]))
problems = [f"phase {k}: {v['status']}" for k, v in data.get("phases", {}).items() if v["status"].startswith("crash")]
missing = {"gate-bf16", "time-bf16", "fp32"} - set(data.get("phases", {}))
if missing:
    problems.append(f"phases never started: {sorted(missing)}")
if smoke:
    if not all(v["ok"] for k, v in data.get("gate", {}).items() if k.startswith("triton")):
        problems.append("the fused kernel failed its gate")
    if not any(r["provider"] == "triton" and r.get("status") == "ok" for r in data.get("rows", [])):
        problems.append("no timed row of the fused kernel")
print(f"{files[-1]}: {len(data.get('rows', []))} rows; phases " +
      ", ".join(f"{k} {v['status']} ({v['seconds']} s)" for k, v in data.get("phases", {}).items()))
if problems:
    sys.exit("device_run.sh: " + "; ".join(problems))
EOF
check_rc=$?
echo "tests exit code $tests_rc, gpu_bench exit code $bench_rc, result check $check_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || check_rc != 0 ))
