#!/usr/bin/env bash
# One call on a lent GPU machine: the fused kernel's correctness tests on CUDA, then gpu_bench.py (correctness gate,
# timing table, JSON).  Everything it writes goes to $OUT (the device tool brings it back) or benchmarks/results/.
#
# The lent machines hold torch, triton, transformers, timm and pytest but no package index and no hatchling, so
# glip-fusion is put on PYTHONPATH instead of being pip-installed (it needs nothing beyond torch and triton).
#
#   run(command="bash benchmarks/fusion/device_run.sh", timeout_s=560)
#   BENCH_BUDGET_S=200 TEST_TIMEOUT_S=120 bash benchmarks/fusion/device_run.sh     # a shorter run
#
# The two phases share one call's 600 s limit: tests get TEST_TIMEOUT_S (default 180), the benchmark stops starting
# new cells after BENCH_BUDGET_S (default 300) seconds of its own and writes what it measured after every cell.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/packages/glip-fusion/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  2>&1 | tee "$OUT/device_env.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1 | tee -a "$OUT/device_env.txt"

echo "== kernel tests on CUDA (timeout ${TEST_TIMEOUT_S:-180} s)"
timeout "${TEST_TIMEOUT_S:-180}" python3 -m pytest -q -p no:cacheprovider \
  packages/glip-fusion/tests/test_fusion_triton_kernels.py packages/glip-fusion/tests/test_fusion_triton_dropout.py \
  packages/glip-fusion/tests/test_fusion_attention.py > "$OUT/device_tests.txt" 2>&1
tests_rc=$?
tail -n 15 "$OUT/device_tests.txt"
echo "tests exit code: $tests_rc"

echo "== gpu_bench.py (budget ${BENCH_BUDGET_S:-300} s)"
python3 benchmarks/fusion/gpu_bench.py --budget-s "${BENCH_BUDGET_S:-300}" --out "$OUT" > "$OUT/gpu_bench.log" 2>&1
bench_rc=$?
tail -n 45 "$OUT/gpu_bench.log"
echo "tests exit code: $tests_rc, gpu_bench exit code: $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
