#!/usr/bin/env bash
# Run the app on Flower's simulation runtime (one virtual SuperNode per hospital), then stop the local SuperLink.
#   infra/flower/simulate.sh DATA_DIR ['key=value ...' run config overrides]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
DATA_DIR="${1:?usage: $0 DATA_DIR ['key=value ...']}"
exec "$PYTHON" -m federated.deploy simulate --data-dir "$DATA_DIR" --run-config "${2:-}"
