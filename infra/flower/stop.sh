#!/usr/bin/env bash
# Stop every process the rehearsal started (by the pids recorded in its run folder).
#   infra/flower/stop.sh [--run-dir build/federation]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m federated.deploy stop "$@"
