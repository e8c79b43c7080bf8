#!/usr/bin/env bash
# One batched GPU session (H100/H200): install the checkout, run the CUDA parity suite, `qwenvl verify` on
# CUDA, and the kernel benchmark. Results land in $OUT (or ./out). Used to produce docs/gpu-parity.md.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
  echo "editable install failed; linking reference/ and fixtures/ into the package"
  ln -sfn ../reference qwenvl/reference && ln -sfn ../fixtures qwenvl/fixtures
  export PYTHONPATH=$PWD
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
QWENVL_PARITY_REPORT="$OUT/parity-rows.json" timeout 300 python3 -m pytest -p no:cacheprovider --device cuda -q \
  parity_tests/test_packing.py parity_tests/test_attention.py parity_tests/test_masks.py ${GPU_EXTRA_TESTS:-} 2>&1 | tail -40 | tee "$OUT/pytest-gpu.txt"
timeout 240 python3 -m pytest -p no:cacheprovider --device cuda -q -rA parity_tests/test_models.py -k "packed_equals or fp32_activations or host_syncs or reference" \
  2>&1 | tail -15 | tee "$OUT/pytest-models-gpu.txt"
timeout 200 qwenvl verify --device cuda --json "$OUT/verify-cuda.json" 2>&1 | tail -60 | tee "$OUT/verify.txt" \
  || timeout 200 python3 -m qwenvl.cli verify --device cuda --json "$OUT/verify-cuda.json" 2>&1 | tail -60 | tee "$OUT/verify.txt"
[ -n "${SKIP_BENCH:-}" ] || timeout 200 python3 benchmarks/attention_bench.py --out "$OUT/bench-attention.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
