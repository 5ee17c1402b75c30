#!/usr/bin/env bash
# Stop every process the scripts here started (server and workers, with their flow runs), by the recorded pids.
#   infra/prefect/stop.sh [--run-dir build/prefect]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m flows.deploy stop "$@"
