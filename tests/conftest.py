"""Test-wide settings: no phoning home from Flower or Prefect, no writes to the user's home."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="twinfed-flwr-home-"))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="twinfed-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
