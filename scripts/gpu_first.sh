#!/usr/bin/env bash
# First GPU call of a session: install, name the card, the SDPA yardstick draw, the sync-focused tests, the
# whole-step sync counts, then the whole CUDA suite (issue 16 run 1). Everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 60 python3 scripts/sdpa_draw.py 2>&1 | tail -30 | tee "$OUT/sdpa_draw.txt"
timeout 150 python3 -m pytest -p no:cacheprovider --device cuda -n 6 -q -rfE parity_tests/test_host_meta.py parity_tests/test_attention.py 2>&1 | tail -30 | tee "$OUT/pytest-focus.txt"
timeout ${BENCH_S:-150} python3 benchmarks/model_step.py --models qwen2_5_vl qwen3_vl --mixes mixed --methods ours ours-nohost ours+compile padded --warmup 2 --iters 3 --out "$OUT/syncs.json" 2>&1 | tail -30 | tee "$OUT/syncs.txt"
timeout ${SUITE_S:-200} python3 -m pytest -p no:cacheprovider --device cuda -n 6 -q -rfE parity_tests 2>&1 | tail -60 | tee "$OUT/suite1.txt"
