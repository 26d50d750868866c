#!/usr/bin/env bash
# One call on a GPU machine that has CUDA, torch and transformers but no network: install the carried
# wheels (made here by tests/gpu/wheels.sh), run the CUDA tests, then the GPU benchmark (BENCH_LORA=1 first runs
# benchmarks/gpu_lora.py, the segmented LoRA kernels against the per-row hooks; BENCH_ATTN=1
# benchmarks/gpu_attention.py, the paged decode attention kernel against gathered pages and SDPA).
#   device: run(command="bash tests/gpu/device_run.sh", carry=[".whl"])
# Stages are bounded by STAGE_S so partial results still come back; logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
TESTS=${TESTS:-tests/gpu tests/engine tests/adapters/test_segments.py}
timeout "${TEST_S:-240}" python3 -m pytest -q -s -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/test-gpu.log" | grep -E "^(f32|bf16)|passed|failed|Error|error" | tail -60
echo "tests rc=${PIPESTATUS[0]}"
if [ "${BENCH_LORA:-0}" = 1 ]; then  # LoRA's segmented kernels against the per-row hooks (benchmarks/gpu_lora.py)
  timeout "${BENCH_LORA_S:-270}" python3 -m benchmarks.gpu_lora --out "$OUT/gpu_lora.json" ${BENCH_LORA_ARGS:-} > "$OUT/bench-lora.log" 2>&1
  echo "bench-lora rc=$?"; grep -E " b[0-9]+ |profile " "$OUT/bench-lora.log" | cut -c1-300 | tail -20
fi
if [ "${BENCH_ATTN:-0}" = 1 ]; then  # the paged decode attention kernel against gathered pages and SDPA
  timeout "${BENCH_ATTN_S:-200}" python3 -m benchmarks.gpu_attention --out "$OUT/gpu_attention.json" ${BENCH_ATTN_ARGS:-} > "$OUT/bench-attn.log" 2>&1
  echo "bench-attn rc=$?"; grep -E " b[0-9]+: |layer " "$OUT/bench-attn.log" | cut -c1-200 | tail -20
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout "${BENCH_S:-300}" python3 -m benchmarks.gpu --out "$OUT/gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-gpu.log" | grep -vE "^ |^\{|^\}" | tail -40
  echo "bench rc=${PIPESTATUS[0]}"
fi
