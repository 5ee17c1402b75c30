#!/usr/bin/env bash
# Create the process work pools (`prefect work-pool create NAME --type process`): one per hospital and `federation`.
#   infra/prefect/create-pools.sh [--pool NAME ...] [--run-dir build/prefect]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m flows.deploy pools "$@"
