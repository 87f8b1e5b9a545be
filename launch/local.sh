#!/usr/bin/env bash
# Start N processes of a command on this machine as one JAX distributed run (CPU devices, gloo).
#   launch/local.sh 2 -- python -m jaxlayouts.bench --mesh dp=2,fsdp=2,tp=2
# If any process fails, the others are stopped and the exit code is non-zero.
set -euo pipefail
if [ $# -lt 3 ] || [ "$2" != "--" ]; then
  echo "usage: launch/local.sh N -- COMMAND..." >&2
  exit 2
fi
n=$1
shift 2
exec python -m jaxlayouts.launch "$n" -- "$@"
