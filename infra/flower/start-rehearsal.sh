#!/usr/bin/env bash
# Start the localhost rehearsal in the background: a TLS SuperLink with SuperNode authentication and one SuperNode
# per hospital (aurelia, northbridge, lakeside), each reading <DATA_DIR>/sites/<its site>/features only.
#   infra/flower/start-rehearsal.sh DATA_DIR [more options of `python -m federated.deploy start`]
# State and logs: build/federation/ (override with --run-dir). Stop with infra/flower/stop.sh.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
DATA_DIR="${1:?usage: $0 DATA_DIR [options]}"
shift
exec "$PYTHON" -m federated.deploy start --data-dir "$DATA_DIR" \
  --site aurelia --site northbridge --site lakeside "$@"
