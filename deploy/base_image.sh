#!/usr/bin/env bash
# A Debian bookworm base image made from Debian's packages alone (debootstrap, then `podman import`), for
# building the Dockerfile where no image registry can be reached. It holds what the Dockerfile expects of
# python:3.11-slim-bookworm: python (Debian's 3.11), pip, and apt with Debian's sources.
#   deploy/base_image.sh [IMAGE]      (default localhost/adapter-server-base:bookworm; needs root)
set -euo pipefail
IMAGE=${1:-localhost/adapter-server-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ENGINE=${ENGINE:-podman}
for tool in debootstrap "$ENGINE"; do
  command -v "$tool" >/dev/null || { echo "needs $tool (Debian: apt-get install podman debootstrap)" >&2; exit 2; }
done
root=$(mktemp -d /var/tmp/adapter-server-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
  bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# pip installs into the system interpreter, as it does in the python image (PEP 668's marker removed)
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar --numeric-owner -C "$root" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "$IMAGE: $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") bytes"
