#!/usr/bin/env bash
# Submit a run to the started federation and wait until it finishes; prints the run's logs if it fails.
#   infra/flower/submit-run.sh ['key=value key=value' run config overrides] [more options of `... submit`]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
RUN_CONFIG="${1:-}"
shift || true
exec "$PYTHON" -m federated.deploy submit --run-config "$RUN_CONFIG" "$@"
