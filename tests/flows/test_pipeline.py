"""`twinfed run`: the pipeline as one parent flow; a failed stage says what to do; a second run changes nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from federated.baselines import TrainingBudget, pooled
from federated.privacy import PrivacyLedger
from federated.registry import Registry
from flows.demo_sites.generate import generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import read_features
from flows.marts.layout import SiteMartLayout
from flows.marts.query import connect_read_only, mart_path, run_query
from flows.marts.synthetic import write_registry
from flows.pipeline import (
    ROUND_LINE,
    StageFailed,
    data_version,
    federation_mart_stale,
    site_mart_stale,
    sites_short_of_budget,
    trained_on,
    training_needed,
    twinfed_run,
)
from flows.predict_flow import read_batches
from flows.site_store import SiteStore, write_json_atomic
from models.twin import Normalizer, TwinSurrogate, build_windows, split_patients
from models.twin.windows import NORMALIZED

SITES = ["aurelia", "lakeside", "northbridge"]
TWO_SITES = ["aurelia", "lakeside"]  # the default suite's run: two hospitals keep it quick, the slow test runs three
README_QUERIES = [  # what `twinfed demo` prints and the README shows
    (
        "aurelia",
        "SELECT horizon_min, rmse_mg_dl, persistence_rmse_mg_dl, coverage_90_pct FROM mart_forecast_accuracy "
        "ORDER BY horizon_min",
    ),
    ("aurelia", "SELECT scenario_id, horizon_min, median_change_mg_dl FROM mart_whatif_effect WHERE horizon_min = 120"),
    ("federation", "SELECT site_id, round_id, epsilon_after, epsilon_budget FROM fct_privacy_ledger"),
]


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A temporary Prefect API for the module's flow runs."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def drops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small demo hospitals' raw drops (5 patients x 2 days each)."""
    folder = tmp_path_factory.mktemp("pipeline")
    profiles = [p.with_overrides(patients=5, days=2) for p in load_profiles() if p.site.id in TWO_SITES]
    generate_sites(profiles, folder, workers=2)
    return folder


def tree(folder: Path) -> dict[str, str]:
    """Every file under the folder with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def register_outside_pipeline(data_dir: Path) -> None:
    """A briefly trained pooled twin registered as a deployed federation would (no pipeline record of its data)."""
    splits = {s: split_patients(build_windows(read_features(SiteStore.under(data_dir, s).features))) for s in TWO_SITES}
    torch.manual_seed(0)
    model, _ = pooled(splits, TrainingBudget(epochs=1, lr=3e-3, batch_size=256, seed=0))
    written = write_registry(data_dir / "scratch", TWO_SITES, rounds=1)  # metadata as federated.twin_app writes it
    metadata = json.loads((written / "metadata.json").read_text())
    shutil.rmtree(data_dir / "scratch")
    Registry(data_dir / "federation").register(model, {k: v for k, v in metadata.items() if k != "version"})
    for site in TWO_SITES:  # and each hospital's ledger recorded the round it trained
        ledger = PrivacyLedger(data_dir / "sites" / site / "privacy_ledger.json", site_id=site, epsilon_budget=8.0,
                               delta=1e-4)  # fmt: skip
        ledger.record_round("run-1-round-1", noise_multiplier=1.5, sample_rate=0.5, steps=4)


def test_run_fails_without_a_model_then_publishes_and_a_second_run_changes_nothing(drops: Path, harness: None) -> None:
    """No model: the site flows run and the run fails naming `twinfed train`. With one: every mart; then idempotent."""
    with pytest.raises(StageFailed, match="twinfed train"):
        twinfed_run(str(drops), TWO_SITES, train="never", build_docs=False)
    for site in TWO_SITES:  # the site stage ran and kept its outputs although a later stage failed
        assert data_version(drops, site) is not None and (SiteStore.under(drops, site).features).is_dir()
        assert not (drops / "sites" / site / "mart").exists()

    register_outside_pipeline(drops)
    assert training_needed(drops, drops / "federation", TWO_SITES) is None  # a model trained elsewhere is the live one
    summary = twinfed_run(str(drops), TWO_SITES, train="auto", build_docs=False)
    assert summary["trained"] is None and summary["model_version"] == "twin-0001"
    for site in TWO_SITES:
        assert summary["sites"][site]["ingest"] == "unchanged" and summary["sites"][site]["predicted"]
        (batch,) = read_batches(drops, site)
        assert batch["model_version"] == "twin-0001" and batch["data_version"] == data_version(drops, site)
        with duckdb.connect(str(drops / "sites" / site / "mart" / "site.duckdb"), read_only=True) as mart:
            versions = mart.execute("SELECT DISTINCT model_version FROM fct_glucose_forecast").fetchall()
            assert versions == [("twin-0001",)]
        assert (drops / "sites" / site / "report" / "index.html").is_file()
    # The README's example queries answer from the published marts.
    for target, sql in README_QUERIES:
        path = mart_path(target, data_dir=drops, federation_dir=drops / "federation")
        with connect_read_only(path) as con:
            assert run_query(con, sql).num_rows > 0, sql
    assert (drops / "federation" / "report" / "index.html").is_file()

    before = tree(drops)
    again = twinfed_run(str(drops), TWO_SITES, train="auto", build_docs=False)
    assert tree(drops) == before  # the same drop again: no new batch, mart, model or report, not one byte
    assert again["trained"] is None and again["federation"] == "unchanged"
    assert all(again["sites"][s] == {"ingest": "unchanged", "predicted": None, "mart": "unchanged"} for s in TWO_SITES)


def write_feature_files(data_dir: Path, site: str, content: bytes) -> None:
    """Stand-in feature files: the data version is a hash of their bytes, whatever they hold."""
    folder = SiteStore.under(data_dir, site).features
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grid.parquet").write_bytes(content)
    (folder / "static.parquet").write_bytes(b"static")


def test_training_is_needed_only_for_no_model_or_new_data(tmp_path: Path) -> None:
    """No model: train. The live model trained on the current data: not. A site's features changed since: train."""
    for site in SITES:
        write_feature_files(tmp_path, site, f"{site} week 1".encode())
    federation = tmp_path / "federation"
    assert training_needed(tmp_path, federation, SITES) == "no model is registered yet"
    torch.manual_seed(0)
    normalizer = Normalizer(mean=np.zeros(len(NORMALIZED)), std=np.ones(len(NORMALIZED)))
    Registry(federation).register(TwinSurrogate(normalizer), {"rounds": 1, "sites": {}})
    write_json_atomic({"model_version": "twin-0001", "data_versions": {s: data_version(tmp_path, s) for s in SITES}},
                      federation / "trained_on.json")  # fmt: skip
    assert trained_on(federation) is not None and training_needed(tmp_path, federation, SITES) is None
    write_feature_files(tmp_path, "aurelia", b"aurelia week 1")  # rewritten, same bytes (a forced re-ingest)
    assert training_needed(tmp_path, federation, SITES) is None
    write_feature_files(tmp_path, "lakeside", b"lakeside week 2")
    assert training_needed(tmp_path, federation, SITES) == "new data at lakeside since twin-0001 was trained"


def test_a_site_out_of_budget_is_named_before_training(tmp_path: Path) -> None:
    """A ledger that cannot pay one more round of the planned training is named; one with room, or none, is not."""
    spent = PrivacyLedger(tmp_path / "sites" / "lakeside" / "privacy_ledger.json", site_id="lakeside",
                          epsilon_budget=8.0, delta=1e-4)  # fmt: skip
    spent.record_round("earlier", noise_multiplier=2.0, sample_rate=0.5, steps=36)  # 7.57 of 8; 4 more: 8.04
    fresh = PrivacyLedger(tmp_path / "sites" / "aurelia" / "privacy_ledger.json", site_id="aurelia",
                          epsilon_budget=8.0, delta=1e-4)  # fmt: skip
    fresh.record_round("earlier", noise_multiplier=2.0, sample_rate=0.5, steps=4)
    short = sites_short_of_budget(tmp_path, ["aurelia", "lakeside", "northbridge"], None)
    assert list(short) == ["lakeside"] and "lakeside" in short["lakeside"]
    assert sites_short_of_budget(tmp_path, ["lakeside"], {"dp": False}) == {}  # non-private spends nothing


def test_a_mart_older_than_its_inputs_is_stale(tmp_path: Path) -> None:
    """A batch issued after the share was built (a publish that failed halfway) makes the site mart stale."""
    share = SiteMartLayout.under(tmp_path, "lakeside").share
    share.mkdir(parents=True)
    assert site_mart_stale(tmp_path, "lakeside")  # no manifest: never published
    write_json_atomic({"built_at": "2026-04-06T03:00:00+00:00"}, share / "manifest.json")
    assert not site_mart_stale(tmp_path, "lakeside")  # no batch yet: nothing newer
    batch = SiteStore.under(tmp_path, "lakeside").root / "predictions" / "b1"
    batch.mkdir(parents=True)
    write_json_atomic({"batch_id": "b1", "issued_at": "2026-04-06T04:00:00+00:00"}, batch / "batch.json")
    assert site_mart_stale(tmp_path, "lakeside")
    write_json_atomic({"built_at": "2026-04-06T05:00:00+00:00"}, share / "manifest.json")
    assert not site_mart_stale(tmp_path, "lakeside")
    assert federation_mart_stale(tmp_path, tmp_path / "federation", ["lakeside"])  # never built


def test_training_progress_lines_are_read_from_flowers_log() -> None:
    """Round starts and pooled evaluations are picked out of flwr's log (the time-stamped copy of each line)."""
    log = [
        "\x1b[92mINFO \x1b[0m:      [ROUND 2/6]",
        "11/29/2026 23:19:22:INFO:[ROUND 2/6]",
        "11/29/2026 23:19:22:INFO:configure_train: Sampled 3 nodes (out of 3)",
        "11/29/2026 23:19:37:INFO:round 2 evaluation: {'examples': 15141.0, 'rmse-30': 27.2}",
    ]
    found = [m.group(1) for line in log if (m := ROUND_LINE.match(line.strip()))]
    assert found == ["[ROUND 2/6]", "round 2 evaluation: {'examples': 15141.0, 'rmse-30': 27.2}"]


def test_stage_failures_stay_one_per_line() -> None:
    """Each failure keeps its own hint, even when its message has semicolons."""
    failure = StageFailed(["lakeside predictions: a; b; c -> `twinfed run lakeside`", "training: x -> `twinfed train`"])
    assert len(failure.failures) == 2 and "2 stage(s) failed" in str(failure)


@pytest.mark.slow
def test_run_trains_by_simulation_once_and_the_marts_show_the_privacy_spent(
    tmp_path: Path, harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No model: `twinfed run` trains by Flower simulation with DP, then predicts; run again, it does not train."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    profiles = [p.with_overrides(patients=5, days=2) for p in load_profiles() if p.site.id in SITES]
    generate_sites(profiles, tmp_path, workers=2)
    tiny = {"num-server-rounds": 1, "steps-per-round": 2}
    summary = twinfed_run(str(tmp_path), SITES, run_config=tiny, build_docs=False)
    assert summary["trained"] == "twin-0001" == summary["model_version"]
    record = trained_on(tmp_path / "federation")
    assert record == {"model_version": "twin-0001", "data_versions": {s: data_version(tmp_path, s) for s in SITES}}
    with connect_read_only(mart_path("federation", data_dir=tmp_path, federation_dir=tmp_path / "federation")) as con:
        ledger = run_query(con, "SELECT site_id, epsilon_after, epsilon_budget FROM fct_privacy_ledger").to_pylist()
    assert sorted(row["site_id"] for row in ledger) == sorted(SITES)
    assert all(0 < row["epsilon_after"] <= row["epsilon_budget"] for row in ledger)
    again = twinfed_run(str(tmp_path), SITES, run_config=tiny, build_docs=False)
    assert again["trained"] is None and Registry(tmp_path / "federation").versions() == ["twin-0001"]
