"""Test-wide settings: no phoning home from Flower or Prefect, no writes to the user's home."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="twinfed-flwr-home-"))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="twinfed-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: the model is small, and on a shared 2-core runner two threads contend badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
