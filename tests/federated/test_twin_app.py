"""The Flower app in simulation: three hospitals train the twin with patient-level DP and keep their ledgers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.simulation import run_simulation

from data_contracts.schema import IMAGE_FEATURE
from federated.privacy import PrivacyLedger
from federated.twin_app import DEFAULT_SITES, DEFAULTS, client, server
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


@pytest.mark.slow  # Ray start-up and two federated rounds: about 90 s
def test_three_sites_train_two_rounds_and_a_site_out_of_budget_refuses(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rounds of FedAvg over three simulated hospitals; one near its budget refuses and the others go on."""
    monkeypatch.setenv("TWINFED_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TWINFED_MODEL_DIR", str(data_dir / "federation"))
    budget, delta = DEFAULTS["epsilon-budget"], DEFAULTS["delta"]
    # An earlier study spent 7.6 of lakeside's 8: one more round (4 steps) would reach 8.5, so it must refuse.
    spent = ledger("lakeside", data_dir).record_round("an earlier study", noise_multiplier=1.5, sample_rate=0.5,
                                                      steps=18)  # fmt: skip
    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip
    model = np.load(data_dir / "federation" / "global_model.npz")
    assert len(model.files) > 0 and all(np.isfinite(model[name]).all() for name in model.files)
    for site in ("aurelia", "northbridge"):
        summary = ledger(site, data_dir).summary()
        assert summary["rounds"] == 2 and 0 < float(summary["epsilon_spent"]) <= budget
    refused = ledger("lakeside", data_dir).summary()
    assert refused["rounds"] == 1 and float(refused["epsilon_spent"]) == pytest.approx(spent) and spent <= budget
    assert delta == refused["delta"]


def ledger(site: str, data_dir: Path) -> PrivacyLedger:
    """A site's privacy ledger with the app's default budget."""
    return PrivacyLedger(data_dir / "sites" / site / "privacy_ledger.json", site_id=site,
                         epsilon_budget=DEFAULTS["epsilon-budget"], delta=DEFAULTS["delta"])  # fmt: skip
