"""The Flower app in simulation: three hospitals train the twin with patient-level DP and keep their ledgers."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.simulation import run_simulation

from data_contracts.schema import IMAGE_FEATURE, SCHEMA_VERSION
from federated.privacy import PrivacyLedger
from federated.registry import Checkpoint, Checkpoints, Registry
from federated.twin_app import (
    DEFAULT_SITES,
    DEFAULTS,
    _ledger,
    _strategy,
    client,
    planned_noise,
    pooled_metrics,
    server_app,
)
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import build_features, write_features
from flows.ingest.mapping import mapping_for
from flows.ingest.records import ingest_records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small sites' training features, as each site flow would have written them."""
    folder = tmp_path_factory.mktemp("federation")
    generate_sites([p.with_overrides(patients=6, days=2) for p in load_profiles()], folder, workers=2)
    for site in DEFAULT_SITES:
        batch = ingest_records(SitePaths.under(folder, site).drop, mapping_for(site), secret=bytes(range(32)),
                               workdir=folder / "work" / site, build_docs=False)  # fmt: skip
        features = build_features(batch.tables | {"image_feature": IMAGE_FEATURE.empty()})
        write_features(features, folder / "sites" / site / "features")
    return folder


def test_pyproject_run_config_is_the_apps_defaults() -> None:
    """`flwr run` reads [tool.flwr.app.config]; in-process runs read DEFAULTS: the two must agree key by key."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == DEFAULTS
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "federated.twin_app:server", "clientapp": "federated.twin_app:client"}


def test_pooled_metrics_are_exact_over_sites() -> None:
    """Pooling sites' error sums gives the RMSE of all their windows together, not a mean of site RMSEs."""
    rng = np.random.default_rng(0)
    errors = [rng.normal(0, 10, 50), rng.normal(0, 30, 5)]  # a big site with small errors, a small one with large
    naive = [rng.normal(0, 20, 50), rng.normal(0, 20, 5)]
    sums = [{"num-examples": len(e), "n-30": len(e), "sse-30": float((e**2).sum()),
             "persistence-sse-30": float((p**2).sum()), "n-60": 0, "sse-60": 0.0, "persistence-sse-60": 0.0,
             "covered-90": 0.9 * len(e), "raw-covered-90": 0.5 * len(e), "n-90": len(e)}
            for e, p in zip(errors, naive, strict=True)]  # fmt: skip
    pooled = pooled_metrics(sums)
    everything, persistence = np.concatenate(errors), np.concatenate(naive)
    assert pooled["rmse-30"] == pytest.approx(float(np.sqrt(np.mean(everything**2))))
    assert pooled["rmse-ratio-30"] == pytest.approx(np.sqrt(np.mean(everything**2) / np.mean(persistence**2)))
    assert pooled["rmse-60"] is None and pooled["coverage-90"] == pytest.approx(0.9)
    assert pooled["raw-coverage-90"] == pytest.approx(0.5)


@pytest.mark.parametrize(("name", "kind"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_strategy_is_selected_by_run_config(name: str, kind: type) -> None:
    """FedAvg weighted by examples unless the run config asks for FedProx (its mu) or FedAdam (its server lr)."""
    strategy = _strategy(DEFAULTS | {"strategy": name, "proximal-mu": 0.2, "server-lr": 0.05, "quorum": 2})
    assert type(strategy) is kind and strategy.weighted_by_key == "num-examples"
    assert strategy.min_available_nodes == 2 and strategy.min_train_nodes == 1
    if kind is FedProx:
        assert strategy.proximal_mu == 0.2  # type: ignore[attr-defined]
    if kind is FedAdam:
        assert strategy.eta == 0.05  # type: ignore[attr-defined]


@pytest.mark.slow  # Ray start-up twice and three federated rounds: about 3 minutes
def test_training_resumes_after_a_crash_and_registers_the_model(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three simulated hospitals, two rounds; the server dies after round 1 and a restart finishes from round 1.

    Lakeside is near its budget and refuses both rounds; its ledger never moves and the federation goes on.
    The registered model records both rounds, every site's epsilon (equal to its ledger), and the resume.
    """
    budget = DEFAULTS["epsilon-budget"]
    # An earlier study spent 7.6 of lakeside's 8: one more round (4 steps) would reach 8.5, so it must refuse.
    spent = ledger("lakeside", data_dir).record_round("an earlier study", noise_multiplier=1.5, sample_rate=0.5,
                                                      steps=18)  # fmt: skip
    federation = data_dir / "federation"
    overrides = {
        "num-server-rounds": 2,
        "steps-per-round": 4,
        "noise-multiplier": 1.5,
        "target-epsilon": 0.0,
        "data-dir": str(data_dir),
        "federation-dir": str(federation),
    }
    save = Checkpoints.save

    def crash_after_round_one(self: Checkpoints, checkpoint: Checkpoint) -> Path:
        save(self, checkpoint)
        raise RuntimeError(f"the server dies after saving round {checkpoint.completed_rounds}")

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save", crash_after_round_one)
        with pytest.raises(RuntimeError, match="dies after saving round 1"):  # the in-process server's crash
            simulate(overrides)
    assert Registry(federation).latest() is None
    after_crash = Checkpoints(federation).latest()
    assert after_crash is not None and after_crash.completed_rounds == 1
    assert ledger("aurelia", data_dir).summary()["rounds"] == 1

    simulate(overrides)
    registered = Registry(federation).latest()
    assert registered is not None and registered.version == "twin-0001"
    meta = registered.metadata
    assert meta["rounds"] == 2 and meta["resumed_after_round"] == 1 and len(meta["run_ids"]) == 2
    assert [entry["round"] for entry in meta["history"]] == [1, 2]
    for site in ("aurelia", "northbridge"):
        summary = ledger(site, data_dir).summary()
        assert summary["rounds"] == 2 and 0 < float(summary["epsilon_spent"]) <= budget
        assert meta["sites"][site]["epsilon_spent"] == pytest.approx(float(summary["epsilon_spent"]))
        assert meta["sites"][site]["rounds_trained"] == 2 and meta["sites"][site]["examples"] > 0
        assert meta["sites"][site]["contracts"]["schema-version"] == SCHEMA_VERSION
    lakeside = meta["sites"]["lakeside"]
    assert lakeside["rounds_refused"] == 2 and lakeside["rounds_trained"] == 0
    assert lakeside["epsilon_spent"] == pytest.approx(spent) and spent <= budget
    assert ledger("lakeside", data_dir).summary()["rounds"] == 1  # the earlier study only
    assert meta["metrics"]["rmse-30"] > 0 and 0 <= meta["metrics"]["coverage-90"] <= 1
    assert Checkpoints(federation).latest() is None  # cleared once registered
    model = registered.model()
    assert all(np.isfinite(a).all() for a in registered.arrays()) and model.normalizer().std.min() > 0


def simulate(overrides: dict[str, Any]) -> None:
    """One in-process Flower simulation of the three sites with the app's server and client."""
    run_simulation(server_app=server_app(overrides), client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip


def ledger(site: str, data_dir: Path) -> PrivacyLedger:
    """A site's privacy ledger with the app's default budget."""
    return PrivacyLedger(data_dir / "sites" / site / "privacy_ledger.json", site_id=site,
                         epsilon_budget=DEFAULTS["epsilon-budget"], delta=DEFAULTS["delta"])  # fmt: skip


def test_a_deployed_hospital_sets_its_own_budget(tmp_path: Path) -> None:
    """The site's node config decides its budget and delta; the server's run config cannot raise them."""
    deployed = Context(run_id=1, node_id=1, node_config={"site": "lakeside", "data-dir": str(tmp_path),
                       "epsilon-budget": 2.0, "delta": 1e-6}, state=RecordDict(), run_config={})  # fmt: skip
    greedy = DEFAULTS | {"epsilon-budget": 50.0, "delta": 1e-3}
    ledger = _ledger("lakeside", tmp_path, deployed, greedy)
    assert (ledger.epsilon_budget, ledger.delta) == (2.0, 1e-6)
    simulated = Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                        run_config={})  # fmt: skip
    assert _ledger("aurelia", tmp_path, simulated, greedy).epsilon_budget == 50.0


def test_noise_is_planned_so_the_whole_training_spends_the_target_epsilon(tmp_path: Path) -> None:
    """target-epsilon > 0 sets the noise: a ledger taking every planned round ends at the target, not past it."""
    config = DEFAULTS | {"target-epsilon": 3.0, "num-server-rounds": 5, "steps-per-round": 6}
    planned = planned_noise(config)
    assert planned["noise-multiplier"] != config["noise-multiplier"] and planned["target-epsilon"] == 3.0
    ledger = PrivacyLedger(tmp_path / "ledger.json", site_id="lakeside", epsilon_budget=3.0, delta=config["delta"])
    for round_number in range(5):
        ledger.record_round(f"r{round_number}", noise_multiplier=planned["noise-multiplier"],
                            sample_rate=config["patient-sample-rate"], steps=6)  # fmt: skip
    assert 0.97 * 3.0 <= ledger.epsilon_spent() <= 3.0
    assert planned_noise(config | {"target-epsilon": 0.0}) == config | {"target-epsilon": 0.0}  # off: as configured
    assert planned_noise(config | {"dp": False})["noise-multiplier"] == config["noise-multiplier"]
