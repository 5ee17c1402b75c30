#!/usr/bin/env bash
# Make whatever is missing of the CA, the SuperLink's TLS certificate and each hospital's SuperNode key pair
# (default folder infra/secrets/, git-ignored). Existing files are kept. Extra arguments go to the command, e.g.
#   infra/flower/make-credentials.sh --hostname superlink.example.org --address 10.0.0.5
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m federated.deploy credentials "$@"
