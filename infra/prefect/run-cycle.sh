#!/usr/bin/env bash
# Run one cycle now: the three sites' ingestion and then the federation round (what their schedules start), then wait
# for the runs their triggers start (each site's publish, then the federation publish). Prints every run's state.
#   infra/prefect/run-cycle.sh ['{"num-server-rounds": 1}' run config overrides of the round, JSON] [--timeout S]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
RUN_CONFIG="${1:-}"
shift || true
[ -n "$RUN_CONFIG" ] || RUN_CONFIG="{}"
exec "$PYTHON" -m flows.deploy cycle --run-config "$RUN_CONFIG" "$@"
