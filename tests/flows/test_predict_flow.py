"""The prediction flow: forecasts and what-ifs of the registered twin, validated; a failing batch is never published."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

import flows.predict_flow as predict_flow
from data_contracts.schema import IMAGE_FEATURE
from federated.registry import Registry
from flows.cli import app
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import build_features, read_features, write_features
from flows.ingest.mapping import mapping_for
from flows.ingest.records import ingest_records
from flows.predict_flow import PredictionContractFailed, read_batches, site_predict
from flows.site_store import SiteStore, write_parquet_atomic
from models.twin import Normalizer, TwinSurrogate, build_windows, fit_local, predict, split_patients, window_moments
from models.twin.forecast import forecast_windows
from models.twin.scenarios import CATALOGUE

SITE = "aurelia"


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A temporary Prefect API for the module's flow runs."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small site's harmonized measurements and features, and a briefly trained twin registered for it."""
    folder = tmp_path_factory.mktemp("predict")
    profile = next(p for p in load_profiles() if p.site.id == SITE).with_overrides(patients=8, days=3)
    generate_sites([profile], folder, workers=1)
    batch = ingest_records(SitePaths.under(folder, SITE).drop, mapping_for(SITE), secret=bytes(range(32)),
                           workdir=folder / "work", build_docs=False)  # fmt: skip
    store = SiteStore.under(folder, SITE)
    for name, table in batch.tables.items():
        write_parquet_atomic(table, store.table_path(name))
    write_features(build_features(batch.tables | {"image_feature": IMAGE_FEATURE.empty()}), store.features)
    torch.manual_seed(0)
    train = split_patients(build_windows(read_features(store.features))).train
    model = TwinSurrogate(Normalizer.fit_from_moments(window_moments(train)))
    fit_local(model, train, epochs=2, lr=3e-3, batch_size=128, seed=0)
    Registry(folder / "federation").register(model, {"rounds": 0, "sites": {}})
    return folder


def test_batch_has_every_patient_horizon_and_scenario(data_dir: Path, harness: None) -> None:
    """Each forecast window gives 24 rows with version and cut-off; what-ifs only where the scenario applies."""
    summary = site_predict(SITE, data_dir=data_dir, every_min=60, days=1.0)
    assert summary["contract"]["passed"] and summary["model_version"] == "twin-0001"
    personal = summary["personalization"]  # calibrated per patient by default; only counts and spreads recorded
    assert personal["enabled"] and 1 <= personal["patients_with_evidence"] <= 8
    assert set(personal) == {"enabled", "method", "prior_sd", "patients_with_evidence"}  # 8 patients: no spread
    folder = SiteStore.under(data_dir, SITE).root / "predictions" / summary["batch_id"]
    forecast = pl.read_parquet(folder / "forecast.parquet")
    whatif = pl.read_parquet(folder / "whatif.parquet")
    assert json.loads((folder / "batch.json").read_text())["rows"] == {"forecast": forecast.height,
                                                                       "whatif": whatif.height}  # fmt: skip
    features = read_features(SiteStore.under(data_dir, SITE).features)
    windows = forecast_windows(features, every_bins=12)
    recent = windows.t0 >= windows.t0.max() - np.timedelta64(1, "D")
    assert forecast.height == 24 * int(recent.sum()) and summary["patients"] == len(np.unique(windows.person_id))
    assert forecast["model_version"].unique().to_list() == ["twin-0001"]
    per_window = forecast.group_by("person_id", "input_cutoff").agg(pl.col("horizon_min").sort())
    assert all(h == list(range(5, 121, 5)) for h in per_window["horizon_min"].to_list())
    assert (forecast["q05"] <= forecast["q50"]).all() and (forecast["q50"] <= forecast["q95"]).all()
    assert (
        (forecast["target_time"] - forecast["input_cutoff"]).dt.total_minutes() == forecast["horizon_min"] - 5
    ).all()
    live = forecast.filter(pl.col("live"))
    assert live["person_id"].n_unique() == live.group_by("person_id").agg(pl.col("input_cutoff").n_unique()).height
    assert set(whatif["scenario_id"].unique()) == {s.scenario_id for s in CATALOGUE}
    joined = whatif.join(forecast, on=["person_id", "input_cutoff", "horizon_min"], suffix="_base")
    assert joined.height == whatif.height and (joined["baseline_q50"] == joined["q50_base"]).all()
    insulin = whatif.filter(pl.col("scenario_id") == "bolus_plus_20")
    assert insulin.height == forecast.height  # applies to every window
    assert (insulin["q50"] <= insulin["baseline_q50"] + 1e-6).all()  # more insulin never raises the forecast
    meals = whatif.filter(pl.col("scenario_id") == "larger_meal")
    assert 0 < meals.height < forecast.height and (meals["q50"] >= meals["baseline_q50"] - 1e-6).all()
    assert read_batches(data_dir, SITE)[-1]["batch_id"] == summary["batch_id"]
    with duckdb.connect(summary["mart"], read_only=True) as mart:  # published to the site's mart
        count = mart.execute("SELECT count(*) FROM fct_glucose_forecast WHERE batch_id = ?", [summary["batch_id"]])
        assert count.fetchone() == (forecast.height,)


def test_a_batch_failing_its_contract_is_quarantined_not_published(
    data_dir: Path, harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model gone wrong (a NaN median for one window): quarantined with the reason; published unchanged."""
    published = read_batches(data_dir, SITE)
    mart = SiteStore.under(data_dir, SITE).root / "mart" / "site.duckdb"
    mart_before = mart.read_bytes()
    real_forecast = predict_flow._personal

    def broken(model: TwinSurrogate, windows: object, factors: object) -> np.ndarray:
        out = real_forecast(model, windows, factors)  # type: ignore[arg-type]
        out[0, 10, 1] = np.nan  # clipping to the sensor range cannot mend this
        return out

    monkeypatch.setattr(predict_flow, "_personal", broken)
    with pytest.raises(PredictionContractFailed, match="q50.plausible_range.*not published"):
        site_predict(SITE, data_dir=data_dir, every_min=60, days=1.0, scenarios=["bolus_plus_20"])
    assert read_batches(data_dir, SITE) == published and mart.read_bytes() == mart_before  # the old mart stays
    quarantined = list((SiteStore.under(data_dir, SITE).root / "quarantine" / "predictions").iterdir())
    assert len(quarantined) == 1
    batch = json.loads((quarantined[0] / "batch.json").read_text())
    failed = {f["check"]: f for f in batch["contract"]["failed"]}
    assert not batch["contract"]["passed"] and failed["forecast.q50.plausible_range"]["violating"] >= 1
    assert "between 20 and 600" in failed["forecast.q50.plausible_range"]["reason"]
    flags = pl.read_parquet(quarantined[0] / "forecast.flags.parquet")
    assert flags.height >= 1  # the offending rows are named


def test_forecasts_use_each_patients_own_dose_effects_unless_told_not_to(data_dir: Path, harness: None) -> None:
    """The same cut-offs with and without per-patient calibration: the medians differ.

    Without it, the medians are the registered model's own forecast (its calibrated interval aside).
    """
    shared = site_predict(SITE, data_dir=data_dir, every_min=60, days=1.0, personalize=False, publish=False)
    personal = site_predict(SITE, data_dir=data_dir, every_min=60, days=1.0, publish=False)
    assert shared["personalization"] == {"enabled": False}
    root = SiteStore.under(data_dir, SITE).root / "predictions"
    frames = [pl.read_parquet(root / run["batch_id"] / "forecast.parquet") for run in (shared, personal)]
    keys = ["person_id", "input_cutoff", "horizon_min"]
    both = frames[0].join(frames[1], on=keys, suffix="_personal")
    assert both.height == frames[0].height == frames[1].height
    assert (both["q50"] - both["q50_personal"]).abs().max() > 0.1  # type: ignore[operator]
    features = read_features(SiteStore.under(data_dir, SITE).features)
    windows = forecast_windows(features, every_bins=12)
    model = Registry(data_dir / "federation").latest().model()  # type: ignore[union-attr]
    median = np.clip(predict(model, windows)[..., 1], 39.0, 600.0)
    expected = pl.DataFrame({"person_id": np.repeat(windows.person_id, 24),
                             "input_cutoff": np.repeat(windows.t0 + np.timedelta64(5, "m"), 24),
                             "horizon_min": np.tile(np.arange(5, 121, 5), len(windows)).astype(np.int16),
                             "expected": median.reshape(-1)})  # fmt: skip
    expected = expected.with_columns(pl.col("input_cutoff").dt.replace_time_zone("UTC").dt.cast_time_unit("us"))
    checked = frames[0].join(expected, on=keys)
    assert checked.height == frames[0].height
    np.testing.assert_allclose(checked["q50"], checked["expected"], rtol=1e-5)


def test_an_unknown_model_version_is_a_clear_error(data_dir: Path, harness: None) -> None:
    """Asking for a version the registry does not hold names the versions it does."""
    with pytest.raises(KeyError, match="twin-0001"):
        site_predict(SITE, data_dir=data_dir, model_version="twin-0042")


def test_cli_predicts_and_reports_failures(data_dir: Path, harness: None) -> None:
    """`twinfed predict` publishes a batch per site and exits 2, naming the site, when one cannot predict."""
    before = len(read_batches(data_dir, SITE))
    done = CliRunner().invoke(app, ["predict", SITE, "--data-dir", str(data_dir), "--days", "0.5", "--scenario",
                                    "basal_minus_10"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert len(read_batches(data_dir, SITE)) == before + 1 and "passed" in done.output
    missing = CliRunner().invoke(app, ["predict", SITE, "--data-dir", str(data_dir), "--model-version", "twin-0042"])
    assert missing.exit_code == 2 and "twin-0042" in missing.output
