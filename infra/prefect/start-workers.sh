#!/usr/bin/env bash
# Start one worker per pool in the background (`prefect worker start --pool NAME --type process`); their flow runs
# work in this checkout (TWINFED_CHECKOUT, read by the pull step of infra/prefect.yaml) with this .venv.
#   infra/prefect/start-workers.sh POOL [POOL ...] [--run-dir build/prefect]   e.g. aurelia northbridge lakeside federation
set -euo pipefail
source "$(dirname "$0")/_env.sh"
args=()
while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do args+=(--pool "$1"); shift; done
[ ${#args[@]} -gt 0 ] || { echo "usage: $0 POOL [POOL ...] [--run-dir DIR]" >&2; exit 2; }
exec "$PYTHON" -m flows.deploy worker "${args[@]}" "$@"
