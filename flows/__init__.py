"""Prefect flows and the `twinfed` command line.

Importing the package turns off what would phone home or write to a shared database unasked:
the embedded Prefect server's usage analytics (its heartbeat also fails on SQLite under load with
"database is locked") and Flower's telemetry. It also gives the temporary local Prefect server 120 s
instead of 20 s to start: on a busy 2-core machine it took longer, and every flow failed without running.
An explicit setting in the environment wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
