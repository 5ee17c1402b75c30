"""The deployment rehearsed on localhost: Prefect server, site work pools and workers, SuperLink and SuperNodes.

One slow test stands up everything infra/README.md describes, on this machine: a Prefect server (temporary
PREFECT_HOME, sqlite, free port), one process work pool and worker per hospital and one for the federation, the
deployments of infra/prefect.yaml, a TLS SuperLink with SuperNode authentication and three hospitals' SuperNodes.
It then runs one scheduled cycle by hand (the sites' ingestion and the federation round started as their schedules
would start them) and lets the deployment triggers run the rest. Every process is stopped, pass or fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from federated.credentials import make_credentials
from federated.deploy import Federation, is_running, start_federation
from federated.registry import Registry
from flows.demo_sites.generate import generate_sites
from flows.demo_sites.profile import load_profiles
from flows.deploy import FEDERATION_POOL, SITES, PrefectStack, run_cycle

# Tiny on purpose: the test is about the processes and their wiring, not the model.
PATIENTS, DAYS = 6, 2
ROUND_CONFIG = {"num-server-rounds": 1, "steps-per-round": 2}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Three hospitals' raw drops (6 patients x 2 days each) under data/drops/<site>, nothing ingested yet."""
    data = tmp_path / "data"
    generate_sites([p.with_overrides(patients=PATIENTS, days=DAYS) for p in load_profiles()], data, workers=2)
    return data


@pytest.fixture
def federation(tmp_path: Path, data_dir: Path) -> Iterator[Federation]:
    """A TLS SuperLink with SuperNode authentication and the three hospitals' SuperNodes online."""
    credentials = make_credentials(tmp_path / "secrets", SITES)
    started = start_federation(tmp_path / "flower", credentials, dict.fromkeys(SITES, data_dir))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def stack(tmp_path: Path, data_dir: Path, federation: Federation) -> Iterator[PrefectStack]:
    """A Prefect server, a process pool and a worker per hospital and for the federation, infra/prefect.yaml deployed.

    The server's scheduler is off, so no schedule starts a run while the test runs its cycle by hand.
    """
    started = PrefectStack.start(tmp_path / "prefect", scheduler=False)
    try:
        pools = [*SITES, FEDERATION_POOL]
        started.create_pools(pools)
        started.set_variables({"twinfed_data_dir": str(data_dir),
                               "twinfed_federation_dir": str(tmp_path / "federation"),
                               "twinfed_operator_home": str(federation.operator.home)})  # fmt: skip
        # Deploy before the workers start polling: on sqlite, four polling workers and `prefect deploy` writing
        # eight deployments contend for the database lock (one run hung past 300 s doing it the other way round).
        started.deploy()
        for pool in pools:
            started.start_worker(pool, query_seconds=2)
        yield started
    finally:
        started.stop()


@pytest.mark.slow
def test_one_scheduled_cycle_runs_on_localhost_and_every_process_stops(
    stack: PrefectStack, federation: Federation, data_dir: Path, tmp_path: Path
) -> None:
    """Ingest, a federated round over TLS, then triggered publishes: all complete, marts hold the new model's rows."""
    began = time.monotonic()
    with stack.client() as client:
        deployments = {d.name: d for d in client.read_deployments()}
    assert {d.work_pool_name for name, d in deployments.items() if name.endswith("-aurelia")} == {"aurelia"}
    assert {deployments[name].work_pool_name for name in ("federation-round", "federation-publish")} == {"federation"}
    assert all(deployments[f"ingest-{site}"].schedules for site in SITES) and deployments["federation-round"].schedules

    # GX Data Docs off: they cost time and show nothing here.
    runs = run_cycle(stack, ingest_parameters={"build_docs": False}, round_parameters={"run_config": ROUND_CONFIG},
                     timeout=900)  # fmt: skip
    print(f"cycle: {time.monotonic() - began:.0f} s;", ", ".join(f"{r.deployment} {r.seconds:.0f} s" for r in runs))

    assert [r.state for r in runs] == ["COMPLETED"] * len(runs)
    assert {r.deployment for r in runs if r.started_by == "trigger"} == {
        *(f"publish-{site}" for site in SITES),
        "federation-publish",
    }
    model = Registry(tmp_path / "federation").latest()
    assert model is not None and set(model.metadata["sites"]) == set(SITES)
    for site in SITES:
        with duckdb.connect(str(data_dir / "sites" / site / "mart" / "site.duckdb"), read_only=True) as mart:
            versions = mart.execute("SELECT DISTINCT model_version FROM fct_glucose_forecast").fetchall()
        assert versions == [(model.version,)], site
    assert (tmp_path / "federation" / "mart" / "federation.duckdb").is_file()

    processes = [*stack.processes.values(), *federation.processes.values()]
    stack.stop()
    federation.stop()
    assert not [p.name for p in processes if is_running(p)]
