#!/usr/bin/env bash
# flash-linear-attention with its Hopper backward (tilelang) on the GPU machine, in two back-to-back calls: the
# wheels (tilelang 0.1.15, its tvm-ffi and dlpack helpers, z3-solver, fla 0.6.0) are ~80 MB, more than one call
# carries with the tree. The tilelang wheel travels split in two (split -b 40000000):
#   PART=a  carry .whl_fa (tilelang.part.aa, apache-tvm-ffi, torch-c-dlpack-ext): kept under /tmp/fla-wheels
#   PART=b  carry .whl_fb (tilelang.part.ab, z3-solver, fla-core, flash-linear-attention): joined, installed into
#           /tmp/fla-site, then the fla parity tests, qwenvl verify with fla in training, the compilation counts
#           and the Qwen3.5 step table, with and without fla.
#   PART=c  (a third call while the machine is warm; nothing carried) benchmarks/fla_shapes.py: the compilation
#           counts over varied rows per rounding, each from empty caches (tilelang's first compile takes minutes).
# The two folders are git-excluded; to make them again, here (pip works here, not there):
#   echo /.whl_fa/ >> .git/info/exclude; echo /.whl_fb/ >> .git/info/exclude; mkdir -p .whl_fa .whl_fb /tmp/w
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d /tmp/w tilelang==0.1.15 \
#     apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0 fla-core==0.6.0 flash-linear-attention==0.6.0
#   split -b 40000000 /tmp/w/tilelang-*.whl .whl_fa/tilelang.part. && mv .whl_fa/tilelang.part.ab .whl_fb/
#   cp /tmp/w/apache_tvm_ffi-* /tmp/w/torch_c_dlpack_ext-* .whl_fa/ && cp /tmp/w/z3_solver-* /tmp/w/fla_core-* /tmp/w/flash_linear_attention-* .whl_fb/
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT" /tmp/fla-wheels
if [ "${PART:-a}" = c ]; then
  export PYTHONPATH=/tmp/fla-site PYTHONUNBUFFERED=1
  timeout ${SHAPES_S:-540} python3 benchmarks/fla_shapes.py --steps ${STEPS:-30} --pad-to ${PAD_TO:-8192 512 0} --out "$OUT/fla-shapes.json" 2>&1 | tail -8 | tee "$OUT/fla-shapes.txt"
  exit 0
fi
if [ "${PART:-a}" = a ]; then
  cp .whl_fa/* /tmp/fla-wheels/ && ls -la /tmp/fla-wheels
  exit 0
fi
cp .whl_fb/* /tmp/fla-wheels/
cat /tmp/fla-wheels/tilelang.part.* > /tmp/fla-wheels/tilelang-0.1.15-cp39-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
rm /tmp/fla-wheels/tilelang.part.*
python3 -m pip install -q --no-index --no-deps --target /tmp/fla-site /tmp/fla-wheels/*.whl >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
export PYTHONPATH=/tmp/fla-site PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export TILELANG_CACHE_DIR=/tmp/tilelang-cache  # kept between the steps below: the JIT's first-use cost is paid once
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "from qwenvl.patches._linear import fla_problem; import torch; print('fla_problem(backward):', fla_problem(torch.device('cuda'), backward=True))" | tee -a "$OUT/gpu.txt"
timeout ${TEST_S:-320} python3 -m pytest -p no:cacheprovider --device cuda -q -rA \
  "parity_tests/test_models.py::test_fla_in_training_equals_each_sample_alone" \
  "parity_tests/test_models.py::test_fla_forward_equals_each_sample_alone" 2>&1 | grep -v "^PASSED" | tail -20 | tee "$OUT/pytest-fla.txt"
timeout ${VERIFY_S:-90} qwenvl verify --device cuda --family qwen3_5 --linear_backend fla --json "$OUT/verify-fla.json" 2>&1 | tail -15 | tee "$OUT/verify-fla.txt"
timeout ${BENCH_S:-150} python3 benchmarks/model_step.py --models qwen3_5 --mixes text-8k mixed \
  --methods ours ours+fusedce ours+compile ours+compile+fusedce padded \
  --warmup 2 --iters 3 --out "$OUT/qwen3_5.json" 2>&1 | tail -14 | tee "$OUT/qwen3_5.txt"

