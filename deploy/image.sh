#!/usr/bin/env bash
# Builds the CPU image with podman (`make image`), where no image registry can be reached: the base from
# Debian's packages (deploy/base_image.sh, once), the pinned torch CPU wheel from local disk when there
# is one (the wheel `make install` takes), the package and its dependencies from PyPI, the embedded model
# converted at build time. Prints the image's size and the build's time.
#   deploy/image.sh [IMAGE]     (default localhost/adapter-server:cpu)
# Environment: BASE_IMAGE (default: the Debian-built one; python:3.11-slim-bookworm where Docker Hub
# answers), TORCH_VERSION, TORCH_WHEELS (a folder holding torch-$TORCH_VERSION*.whl; default: pip's
# find-links), PIP_CERT (a CA bundle for the build's downloads; default: pip's `cert`), ENGINE (podman).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-localhost/adapter-server:cpu}
ENGINE=${ENGINE:-podman}
BASE_IMAGE=${BASE_IMAGE:-localhost/adapter-server-base:bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
command -v "$ENGINE" >/dev/null || { echo "needs $ENGINE (Debian: apt-get install podman)" >&2; exit 2; }
start=$(date +%s)
if [ "$BASE_IMAGE" = localhost/adapter-server-base:bookworm ] && ! "$ENGINE" image exists "$BASE_IMAGE"; then
  deploy/base_image.sh "$BASE_IMAGE"
fi
# shellcheck source=deploy/podman_args.sh
. deploy/podman_args.sh "$BASE_IMAGE"  # RUNTIME_ARGS: what this machine's podman needs to start a container
args=("${RUNTIME_ARGS[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION")
wheels=${TORCH_WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}
if [ -n "$wheels" ] && compgen -G "$wheels/torch-${TORCH_VERSION}*.whl" >/dev/null; then
  # the local CPU wheel (its version, 2.13.0+cpu, ranks above PyPI's CUDA 2.13.0), torch's own
  # dependencies from PyPI
  args+=(--volume "$wheels:/wheels:ro" --build-arg TORCH_INDEX_URL=https://pypi.org/simple
         --build-arg TORCH_FIND_LINKS=/wheels)
fi
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  # a CA bundle pip is told to trust here (a proxy's, say) stands in for the base's during the build
  # only (Debian's pip reads the system bundle); the image keeps its own
  args+=(--volume "$cert:/etc/ssl/certs/ca-certificates.crt:ro")
fi
# --format docker keeps the HEALTHCHECK (OCI images have no field for it); the build's RUN steps reach
# Debian and PyPI through the host's network
"$ENGINE" build --format docker --network host "${args[@]}" -t "$IMAGE" . >&2
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
echo "$IMAGE: $((size / 1000000)) MB, built in $(($(date +%s) - start)) s"
