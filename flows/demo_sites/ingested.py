"""Demo hospitals generated and run through their site flows in one call: the benchmarks' shared set-up."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from flows.demo_sites.generate import generate_sites
from flows.demo_sites.profile import load_profiles


def generate_and_ingest(
    data_dir: Path, sites: Sequence[str], *, patients: int, days: int, fixed_secrets: str | None = None
) -> dict[str, float]:
    """Wipe `data_dir`, generate the sites' drops and run each site flow (no Data Docs); return the seconds each took.

    `fixed_secrets` (demo data only) derives each site's pseudonym key from that label, so every fresh run splits
    the same patients; without it each site flow makes its own random key. The flows run against a temporary
    Prefect server whose home is under `data_dir` unless PREFECT_HOME is set.
    """
    from prefect.testing.utilities import prefect_test_harness  # noqa: PLC0415 (slow to import)

    from flows.site_flow import site_ingest  # noqa: PLC0415

    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    for site in sites if fixed_secrets else ():
        secret = data_dir / "sites" / site / "secret.key"
        secret.parent.mkdir(parents=True)
        secret.write_text(hashlib.sha256(f"{fixed_secrets} {site}".encode()).hexdigest() + "\n")
        secret.chmod(0o600)
    started = time.perf_counter()
    profiles = [p.with_overrides(patients=patients, days=days) for p in load_profiles() if p.site.id in sites]
    generate_sites(profiles, data_dir, workers=2)
    generated = time.perf_counter() - started
    os.environ.setdefault("PREFECT_HOME", str(data_dir / "prefect_home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=60):
        for site in sites:
            site_ingest(site, data_dir=data_dir, build_docs=False)
    return {"generate_seconds": round(generated, 1), "ingest_seconds": round(time.perf_counter() - started, 1)}
