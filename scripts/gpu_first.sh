#!/usr/bin/env bash
# One GPU call of a session (<= 600 s): install, name the card, the whole CUDA suite (issue 16; ~240 s on an H100
# with -n 6 on 2026-12-08, so SUITE_RUNS=2 fits one call; its JUnit XML holds
# each family's host-sync sites), the whole-step sync table at 8 text layers and, time
# permitting, the full-depth Qwen2.5-VL-3B rows (issue 19). Everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ -n "${FOCUS_ONLY:-}" ]; then  # little device time left: the sync test, the float32 yardsticks, the loss
  timeout ${FOCUS_S:-150} python3 -m pytest -p no:cacheprovider --device cuda -n 6 -q -rfE -o junit_family=xunit1 --junitxml "$OUT/focus.xml" \
    parity_tests/test_host_meta.py parity_tests/test_attention.py parity_tests/test_fused_loss.py ${FOCUS_MORE:-} >"$OUT/focus-full.txt" 2>&1
  tail -30 "$OUT/focus-full.txt" | cut -c1-600
  [ -n "${FOCUS_BENCH_S:-}" ] && timeout $FOCUS_BENCH_S python3 benchmarks/model_step.py --models qwen2_5_vl --mixes mixed \
    --methods ours ours+compile+fusedce ours+compile+graphs --warmup 2 --iters 3 --out "$OUT/syncs.json" 2>&1 | tail -6 | tee "$OUT/syncs.txt"
  exit 0
fi
# streamed to a file: a run cut short by the device's time limit still leaves its progress and failures there.
# SUITE_RUNS=3: issue 16's three runs in a row (stops at the first that fails; its failures are then in its file)
for run in $(seq 1 ${SUITE_RUNS:-1}); do
  start=$(date +%s)
  timeout ${SUITE_S:-280} python3 -m pytest -p no:cacheprovider --device cuda -n 6 -q -rfE -o junit_family=xunit1 --junitxml "$OUT/suite$run.xml" parity_tests >"$OUT/suite$run-full.txt" 2>&1
  rc=$?
  echo "suite run $run: exit $rc in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/suite$run-full.txt")" | tee -a "$OUT/suite-runs.txt"
  [ $rc -ne 0 ] && { tail -40 "$OUT/suite$run-full.txt"; break; }
done
[ -n "${SUITE_ONLY:-}" ] && exit 0
timeout ${BENCH_S:-200} python3 benchmarks/model_step.py --models qwen2_5_vl qwen3_vl --mixes mixed \
  --methods ours ours+compile ours+compile+fusedce ours+compile+graphs padded --warmup 2 --iters 3 --out "$OUT/syncs.json" 2>&1 | tail -14 | tee "$OUT/syncs.txt"
timeout ${FULL_S:-150} python3 benchmarks/model_step.py --models qwen2_5_vl --mixes images-12x448 --text-layers 0 \
  --methods ours ours+compile+fusedce ours+compile padded --warmup 2 --iters 3 --out "$OUT/full-depth.json" 2>&1 | tail -10 | tee "$OUT/full-depth.txt"
# Optional, where the call has time left (issue 19's auto table at the vision towers' shapes; fp32 weights under
# bf16 autocast on the GPU, the case that crashed every family on 5.25 before the dispatch cast q, k, v):
[ -n "${ATTN_S:-}" ] && timeout $ATTN_S python3 benchmarks/attention_bench.py --bidirectional --head-dim 80 --heads 16 \
  --kv-heads 16 --tokens 8192 32768 --docs 12 48 --out "$OUT/attention-vision80.json" 2>&1 | tail -14 | tee "$OUT/attention-vision80.txt"
[ -n "${AUTOCAST_S:-}" ] && timeout $AUTOCAST_S qwenvl verify --device cuda --dtype autocast-bf16 --packing_convention upstream \
  --no-golden --json "$OUT/verify-autocast.json" 2>&1 | tail -6 | tee "$OUT/verify-autocast.txt"
exit 0
