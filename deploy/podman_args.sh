# Sourced by the image scripts: sets RUNTIME_ARGS to what `podman run` / `podman build` need on this
# machine to start a container from image $1. Where the default runtime starts one, nothing. In sandboxes
# like the one this was built in (cgroup v1 with an empty v2 hierarchy beside it, which crun refuses; rlimits
# that may not be raised to podman's defaults), runc with the limits kept under the hard ones.
RUNTIME_ARGS=()
if ! "${ENGINE:-podman}" run --rm --network none --entrypoint /bin/true "$1" >/dev/null 2>&1; then
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ] && nofile=65536
  [ "$nproc" = unlimited ] || [ "$nproc" -gt 65536 ] && nproc=65536
  nproc=$((nproc / 2))  # the runtime's own limit sits below the shell's here (measured: half passes)
  RUNTIME_ARGS=(--runtime runc --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
  if ! "${ENGINE:-podman}" run "${RUNTIME_ARGS[@]}" --rm --network none --entrypoint /bin/true "$1" >/dev/null 2>&1; then
    echo "podman cannot start a container here (tried the default runtime, then: ${RUNTIME_ARGS[*]})" >&2
    return 3 2>/dev/null || exit 3
  fi
fi
