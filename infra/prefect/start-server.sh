#!/usr/bin/env bash
# Start a Prefect server in the background (`prefect server start`), with its own PREFECT_HOME and sqlite database
# under the run folder (default build/prefect/), on a free port; prints the PREFECT_API_URL to export.
#   infra/prefect/start-server.sh [--port 4200] [--run-dir build/prefect]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m flows.deploy server "$@"
