#!/usr/bin/env bash
# Download, here, the wheels the project needs that the GPU machine's image lacks (it has no network).
# They land in .whl/ (ignored by git); the device call carries that folder. Python 3.12, x86_64.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 sse-starlette==3.7.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions python-multipart==0.0.34 gguf==0.19.0 \
  opentelemetry-api importlib-metadata llguidance==1.9.1
du -sh .whl
