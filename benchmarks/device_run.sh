#!/usr/bin/env bash
# One device call: build fastpeft._C in place, report the backends, run the GPU tests and every
# benchmark, and leave logs, JSON, Markdown tables and plots under $OUT (default ./device_out).
#
#   bash benchmarks/device_run.sh            # everything (about 8-10 minutes on an H100)
#   QUICK=1 bash benchmarks/device_run.sh    # the ANCHORS subsets only
#
# Each step runs even if an earlier one failed; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
quick=${QUICK:+--quick}
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the first failure
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "    exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 40 "$OUT/$name.log"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

step build    env FASTPEFT_FORCE_CUDA=1 FASTPEFT_CUDA_ARCH_LIST=9.0 "$PYTHON" setup.py build_ext --inplace
step info     "$PYTHON" -m fastpeft.info
step gpu-tests "$PYTHON" -m pytest -q -m gpu tests -rs
step lora     "$PYTHON" benchmarks/bench_lora.py $quick --out "$OUT/lora.json"
step ia3      "$PYTHON" benchmarks/bench_ia3.py $quick --out "$OUT/ia3.json"
step prefix   "$PYTHON" benchmarks/bench_prefix_attention.py $quick --out "$OUT/prefix_attention.json"
step prompt   "$PYTHON" benchmarks/bench_soft_prompt.py $quick --out "$OUT/soft_prompt.json"
step suite    "$PYTHON" -m fastpeft.bench $quick --out "$OUT/suite"
for method in lora prefix prompt; do
  step "train-$method" "$PYTHON" -m fastpeft train --method "$method" --model bench --out "$OUT/train-$method" \
    --steps 50 --dtype bf16 --device cuda
done
echo "first failure: $status" | tee -a "$OUT/summary.txt"
exit $status
