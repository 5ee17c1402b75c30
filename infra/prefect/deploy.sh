#!/usr/bin/env bash
# Create or update every deployment of infra/prefect.yaml (`prefect deploy --all --prefect-file infra/prefect.yaml`,
# from the repository root), after checking that the Prefect Variables it reads are set.
#   infra/prefect/deploy.sh [--run-dir build/prefect]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m flows.deploy deploy "$@"
