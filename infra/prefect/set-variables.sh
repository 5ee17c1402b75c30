#!/usr/bin/env bash
# Set the Prefect Variables infra/prefect.yaml reads when it is deployed (`prefect variable set`): the data folder,
# the federation folder (default DATA_DIR/federation) and the operator's FLWR_HOME (its config.toml connects `flwr`
# to the SuperLink; build/federation/homes/operator once infra/flower/start-rehearsal.sh has run).
#   infra/prefect/set-variables.sh DATA_DIR OPERATOR_HOME [--federation-dir DIR] [--run-dir build/prefect]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
DATA_DIR="${1:?usage: $0 DATA_DIR OPERATOR_HOME [options]}"
OPERATOR_HOME="${2:?usage: $0 DATA_DIR OPERATOR_HOME [options]}"
shift 2
exec "$PYTHON" -m flows.deploy variables --data-dir "$DATA_DIR" --operator-home "$OPERATOR_HOME" "$@"
