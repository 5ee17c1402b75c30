"""The DuckDB marts: site mart contents, atomic publishing, the share, the federation mart's small cells, the CLI."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mart_reader import signature
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from data_contracts import vocabulary as v
from flows.marts.cli import app
from flows.marts.federation import FEDERATION_MODELS, build_federation_mart
from flows.marts.layout import MIN_CELL_PATIENTS, SiteMartLayout, federation_mart_path
from flows.marts.query import QueryError, check_read_only, connect_read_only, documented_queries, run_query
from flows.marts.runner import SQL_DIR, MartBuildError, set_variables
from flows.marts.site import SITE_MODELS, build_site_mart
from flows.marts.synthetic import START, SyntheticSite, write_batch, write_registry, write_site
from models.glucose_metrics import consensus_metrics, expected_time_in_range, probability_in_range

K = MIN_CELL_PATIENTS
READER = Path(__file__).with_name("mart_reader.py")
MAIN = "database_name = current_database() AND schema_name = 'main'"  # the mart's own tables, not the catalog's
runner = CliRunner()
# mart_patient_daily column -> models.glucose_metrics.consensus_metrics key
DAILY_METRICS = {
    "mean_mg_dl": "mean_mg_dl",
    "cv_pct": "cv_percent",
    "gmi_pct": "gmi_percent",
    "tir_70_180_pct": "tir_70_180_percent",
    "tbr_below_70_pct": "tbr_below_70_percent",
    "tbr_below_54_pct": "tbr_below_54_percent",
    "tar_above_180_pct": "tar_above_180_percent",
    "tar_above_250_pct": "tar_above_250_percent",
}

# 60 patients: 12 test patients (one in five), enough for the registry's per-site evaluation to be published.
# Sex: 3 unknown (primary suppression) protected by suppressing female (complementary); age: 6 adolescents
# (primary) protected by suppressing the 20 children.
TESTSITE = SyntheticSite("testsite", sexes=["M"] * 30 + ["F"] * 27 + [""] * 3, ages=[8] * 20 + [15] * 6 + [40] * 34,
                         forecast_every_min=60)  # fmt: skip
SMALLTON = SyntheticSite("smallton", sexes=["M", "F"] * 4, ages=[30] * 8, seed=1, forecast_every_min=60)


@dataclass(frozen=True)
class Built:
    """A data folder with two site marts and the federation mart built from them."""

    data_dir: Path
    federation_dir: Path
    person_ids: list[int]

    def site(self, site_id: str = "testsite") -> Path:
        """A site mart's file."""
        return SiteMartLayout.under(self.data_dir, site_id).database

    @property
    def federation(self) -> Path:
        """The federation mart's file."""
        return federation_mart_path(self.federation_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    data_dir = tmp_path_factory.mktemp("marts")
    person_ids = write_site(data_dir, TESTSITE) + write_site(data_dir, SMALLTON)
    write_registry(data_dir / "federation", ["testsite", "smallton"], refuse="smallton")
    for site in ("testsite", "smallton"):
        build_site_mart(data_dir, site)
    build_federation_mart(data_dir, data_dir / "federation")
    return Built(data_dir, data_dir / "federation", person_ids)


def small_site(data_dir: Path, site_id: str = "tiny") -> SiteMartLayout:
    """A 12-patient, one-day site written to `data_dir` (a fast store for tests that rebuild)."""
    write_site(data_dir, SyntheticSite(site_id, sexes=["M", "F"] * 6, ages=[30] * 12, days=1, forecast_every_min=60,
                                       forecast_from_day=0, batches=1, seed=3))  # fmt: skip
    return SiteMartLayout.under(data_dir, site_id)


def copy_batch(
    layout: SiteMartLayout, batch_id: str, *, model_version: str = "twin-0001", passed: bool = True,
    folder_name: str | None = None, change: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
) -> Path:  # fmt: skip
    """A second batch made of the site's first one, relabelled (and its forecast changed by `change`)."""
    original = sorted(layout.predictions.iterdir())[0]
    issued = START + timedelta(days=2)
    tables = {}
    for name in ("forecast", "whatif"):
        frame = pl.read_parquet(original / f"{name}.parquet").with_columns(
            batch_id=pl.lit(batch_id),
            model_version=pl.lit(model_version),
            issued_at=pl.lit(issued).dt.cast_time_unit("us"),
        )
        tables[name] = (change(frame) if change is not None and name == "forecast" else frame).to_arrow()
    return write_batch(layout, batch_id=batch_id, forecast=tables["forecast"], whatif=tables["whatif"],
                       model_version=model_version, issued_at=issued, passed=passed,
                       folder_name=folder_name)  # fmt: skip


def read(path: Path, sql: str) -> pl.DataFrame:
    """A query's result from a mart opened read-only."""
    con = connect_read_only(path)
    try:
        return pl.from_arrow(run_query(con, sql))  # type: ignore[return-value]
    finally:
        con.close()


def digest(path: Path) -> str:
    """SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- site mart ---------------------------------------------------------------------------------------------------


def test_site_mart_publishes_exactly_the_declared_tables_each_commented(built: Built) -> None:
    """The site mart holds one table per published model, and every table and column carries a comment."""
    tables = read(built.site(), f"SELECT table_name, comment FROM duckdb_tables() WHERE {MAIN}")
    assert set(tables["table_name"]) == {m.name for m in SITE_MODELS if m.published}
    assert all(c and c.strip() for c in tables["comment"])
    columns = read(built.site(), f"SELECT table_name, column_name, comment FROM duckdb_columns() WHERE {MAIN}")
    uncommented = columns.filter(pl.col("comment").is_null() | (pl.col("comment").str.strip_chars() == ""))
    assert uncommented.is_empty(), uncommented
    assert len(columns) > 150


def test_site_mart_keys_are_unique_and_present(built: Built) -> None:
    """Every published table's declared key identifies its rows: never null, never repeated."""
    for model in (m for m in SITE_MODELS if m.published):
        keys = ", ".join(model.key)
        stats = read(built.site(), f"SELECT count(*) AS n, count(DISTINCT ({keys})) AS distinct_keys FROM {model.name}")
        assert stats["n"][0] == stats["distinct_keys"][0], model.name


def test_dim_patient_is_pseudonymous_and_carries_the_cohorts(built: Built) -> None:
    """dim_patient has one row per patient, no source identifier, and the sex and age bands of the person table."""
    patients = read(built.site(), "FROM dim_patient")
    assert len(patients) == TESTSITE.patients
    assert not {"person_source_value", "year_of_birth", "gender_source_value"} & set(patients.columns)
    counts = dict(patients.group_by("age_band").len().iter_rows())
    assert counts == {"0-12": 20, "13-17": 6, "18+": 34}
    assert dict(patients.group_by("sex").len().iter_rows()) == {"male": 30, "female": 27, "unknown": 3}
    assert patients["birth_year_band"].str.contains(r"^\d{4}-\d{4}$").all()


def test_daily_metrics_match_the_consensus_functions(built: Built) -> None:
    """mart_patient_daily equals models.glucose_metrics.consensus_metrics on the day's harmonized CGM readings."""
    layout = SiteMartLayout.under(built.data_dir, "testsite")
    cgm = pl.read_parquet(layout.store.table_path("measurement")).filter(
        pl.col("measurement_concept_id") == v.MEASUREMENTS["cgm_glucose"].concept_id
    )
    daily = read(built.site(), "FROM mart_patient_daily ORDER BY person_id, day")
    assert len(daily) == TESTSITE.patients * TESTSITE.days
    for row in daily.sample(6, seed=1).iter_rows(named=True):
        values = cgm.filter(
            (pl.col("person_id") == row["person_id"]) & (pl.col("measurement_datetime").dt.date() == row["day"])
        )["value_as_number"].to_numpy()
        expected = consensus_metrics(values)
        assert row["readings"] == len(values)
        for column, key in DAILY_METRICS.items():
            assert row[column] == pytest.approx(float(expected[key]), abs=1e-9), column
        bins = values.size  # one synthetic reading per 5-minute bin at most
        assert row["coverage_pct"] == pytest.approx(100 * bins / 288)


def test_forecasts_are_scored_against_their_target_bin(built: Built) -> None:
    """Forecasts are scored against the mean CGM of their target bin, and mart_forecast_accuracy sums those errors.

    observed_mg_dl is the bin starting at target_time, persistence_mg_dl the last history bin; both are recomputed
    here with polars from the harmonized readings and the batch files.
    """
    layout = SiteMartLayout.under(built.data_dir, "testsite")
    bins = (
        pl.read_parquet(layout.store.table_path("measurement"))
        .with_columns(bin_start=pl.col("measurement_datetime").dt.truncate("5m").cast(pl.Datetime("us", "UTC")))
        .group_by("person_id", "bin_start")
        .agg(cgm=pl.col("value_as_number").mean())
    )
    forecasts = pl.concat([pl.read_parquet(p) for p in sorted(layout.predictions.glob("*/forecast.parquet"))])
    scored = forecasts.join(
        bins.rename({"bin_start": "target_time", "cgm": "observed"}), on=["person_id", "target_time"], how="left"
    ).join(
        bins.with_columns(input_cutoff=pl.col("bin_start") + timedelta(minutes=5)).drop("bin_start")
        .rename({"cgm": "persistence"}), on=["person_id", "input_cutoff"], how="left",
    )  # fmt: skip
    fact = read(built.site(), "SELECT person_id, input_cutoff, horizon_min, observed_mg_dl, persistence_mg_dl "
                              "FROM fct_glucose_forecast")  # fmt: skip
    both = scored.join(fact, on=["person_id", "input_cutoff", "horizon_min"], how="inner")
    assert len(both) == len(forecasts) == len(fact)
    assert (both["observed"].is_null() == both["observed_mg_dl"].is_null()).all()
    assert np.allclose(both["observed"].drop_nulls(), both["observed_mg_dl"].drop_nulls())
    assert np.allclose(both["persistence"].drop_nulls(), both["persistence_mg_dl"].drop_nulls())
    accuracy = read(built.site(), "FROM mart_forecast_accuracy WHERE horizon_min = 30")
    at30 = scored.filter((pl.col("horizon_min") == 30) & pl.col("observed").is_not_null())
    error = (at30["q50"] - at30["observed"]).to_numpy()
    assert accuracy["n_scored"][0] == len(at30)
    assert accuracy["rmse_mg_dl"][0] == pytest.approx(math.sqrt(np.mean(error**2)))
    assert accuracy["mae_mg_dl"][0] == pytest.approx(np.mean(np.abs(error)))
    assert accuracy["bias_mg_dl"][0] == pytest.approx(np.mean(error))
    inside = ((at30["q05"] <= at30["observed"]) & (at30["observed"] <= at30["q95"])).mean()
    assert accuracy["coverage_90_pct"][0] == pytest.approx(100 * inside)
    paired = at30.filter(pl.col("persistence").is_not_null())
    persistence = (paired["persistence"] - paired["observed"]).to_numpy()
    assert accuracy["persistence_rmse_mg_dl"][0] == pytest.approx(math.sqrt(np.mean(persistence**2)))


def test_a_mart_built_after_a_batch_records_a_later_time_than_the_batch(tmp_path: Path) -> None:
    """built_at keeps its microseconds: a batch issued in the same second, just before the build, is not newer.

    (Truncated to the second it was, and `twinfed run` then took a mart built right after its batch as stale.)
    """
    layout = small_site(tmp_path)
    issued = datetime.now(UTC)
    build_site_mart(tmp_path, "tiny")
    built = datetime.fromisoformat(json.loads((layout.share / "manifest.json").read_text())["built_at"])
    assert built >= issued


def test_whatif_per_patient_is_the_expected_time_in_range_of_the_batch_files(built: Built) -> None:
    """mart_whatif_patient equals models.glucose_metrics on the batch files, one row per what-if forecast.

    The mean change of the medians, and the change in expected time in range against the batch's own forecast
    (SQL's normal CDF against scipy's).
    """
    layout = SiteMartLayout.under(built.data_dir, "testsite")
    keys = ["batch_id", "person_id", "input_cutoff", "horizon_min"]
    forecasts = pl.concat([pl.read_parquet(p) for p in sorted(layout.predictions.glob("*/forecast.parquet"))])
    whatifs = pl.concat([pl.read_parquet(p) for p in sorted(layout.predictions.glob("*/whatif.parquet"))])
    joined = whatifs.join(forecasts.select(*keys, base05="q05", base50="q50", base95="q95"), on=keys, how="inner").sort(
        "horizon_min"
    )
    assert len(joined) == len(whatifs)
    expected = {}
    for key, rows in joined.group_by("batch_id", "scenario_id", "person_id", "input_cutoff"):
        under = expected_time_in_range(*(rows[c].to_numpy() for c in ("q05", "q50", "q95")))
        without = expected_time_in_range(*(rows[c].to_numpy() for c in ("base05", "base50", "base95")))
        expected[key] = (float((rows["q50"] - rows["base50"]).mean()), float(under), float(under - without))  # type: ignore[arg-type]
    mart = read(built.site(), "FROM mart_whatif_patient")
    assert len(mart) == len(expected) > 0 and (mart["n_horizons"] == 24).all()
    assert mart["change_expected_tir_pct"].abs().max() > 1.0  # the synthetic scenarios do move the expectation
    for row in mart.iter_rows(named=True):
        change, tir, tir_change = expected[(row["batch_id"], row["scenario_id"], row["person_id"], row["input_cutoff"])]
        assert row["change_mean_mg_dl"] == pytest.approx(change, abs=1e-9)
        assert row["expected_tir_pct"] == pytest.approx(tir, abs=1e-4)
        assert row["change_expected_tir_pct"] == pytest.approx(tir_change, abs=1e-4)


def test_a_whatif_without_its_baseline_forecast_reports_no_change(tmp_path: Path) -> None:
    """A what-if cut-off whose baseline forecast lacks a bin gets no mart_whatif_patient row; the others all do."""
    layout = small_site(tmp_path)
    folder = sorted(layout.predictions.iterdir())[0]
    whatif = pl.read_parquet(folder / "whatif.parquet")
    person, cutoff = whatif["person_id"][0], whatif["input_cutoff"][0]
    forecast = pl.read_parquet(folder / "forecast.parquet")
    gap = (pl.col("person_id") == person) & (pl.col("input_cutoff") == cutoff) & (pl.col("horizon_min") == 60)
    forecast.filter(~gap).write_parquet(folder / "forecast.parquet")
    build_site_mart(tmp_path, "tiny")
    rows = read(layout.database, "SELECT person_id, input_cutoff FROM mart_whatif_patient")
    groups = whatif.select("scenario_id", "person_id", "input_cutoff").unique()
    missing = groups.filter((pl.col("person_id") == person) & (pl.col("input_cutoff") == cutoff))
    assert len(missing) >= 1 and len(rows) == len(groups) - len(missing)
    assert rows.filter((pl.col("person_id") == person) & (pl.col("input_cutoff") == cutoff)).is_empty()


def test_the_marts_probability_in_range_is_the_python_one() -> None:
    """The SQL macros (normal CDF by Abramowitz and Stegun) against models.glucose_metrics (scipy).

    On random quantiles and on the edge cases: a median on a bound with one half of zero width, a zero-width interval.
    """
    con = duckdb.connect()
    set_variables(con, {"range_low": 70.0, "range_high": 180.0})
    sql = (SQL_DIR / "site" / "int_whatif_in_range.sql").read_text()
    con.execute(sql[: sql.index("CREATE OR REPLACE TEMP TABLE")])
    rng = np.random.default_rng(4)
    median = rng.uniform(30.0, 300.0, 500)
    lower = median - rng.uniform(0.0, 80.0, 500) * (rng.random(500) < 0.9)
    upper = median + rng.uniform(0.0, 80.0, 500) * (rng.random(500) < 0.9)
    edges = np.array([[50, 70, 70], [70, 70, 90], [70, 70, 70], [69.9, 69.9, 69.9], [150, 180, 180], [180, 180, 200],
                      [180.1, 180.1, 180.1]])  # fmt: skip
    quantiles = np.vstack([np.column_stack([lower, median, upper]), edges])
    con.register("q", pl.DataFrame(quantiles, schema=["q05", "q50", "q95"], orient="row").to_arrow())
    got = np.array([row[0] for row in con.execute("SELECT whatif_p_in_range(q05, q50, q95) FROM q").fetchall()])
    np.testing.assert_allclose(got, probability_in_range(*quantiles.T), atol=2e-7)
    assert con.execute("SELECT whatif_p_in_range(NULL, 100, 120), whatif_p_in_range(130, 120, 140)").fetchone() == (
        None,
        None,
    )


def test_data_quality_and_privacy_come_from_the_run_records_and_ledger(built: Built) -> None:
    """mart_data_quality balances every file of the run record; mart_privacy_ledger has the ledger's rounds."""
    files = read(built.site(), "FROM mart_data_quality")
    assert len(files) == 3 and files["balanced"].all()
    assert (files["rows_in"] == files["rows_accepted"] + files["rows_quarantined"] + files["exact_duplicates"]).all()
    checks = read(built.site(), "SELECT status, count(*) AS n FROM mart_data_quality_checks GROUP BY status")
    assert dict(checks.iter_rows()) == {"Failed": 1, "Passed": 1, "IsError": 1}
    ledger = read(built.site(), "FROM mart_privacy_ledger ORDER BY ledger_position")
    assert ledger["epsilon_after"].to_list() == [3.6, 5.0]
    assert ledger["epsilon_remaining"].to_list() == pytest.approx([4.4, 3.0])


def test_only_batches_whose_contract_passed_are_published(tmp_path: Path) -> None:
    """A batch whose batch.json says the contract failed is listed as not published and none of its rows appear."""
    layout = small_site(tmp_path)
    published = build_site_mart(tmp_path, "tiny").rows["fct_glucose_forecast"]
    copy_batch(layout, "tiny-held-back", passed=False)
    summary = build_site_mart(tmp_path, "tiny")
    assert summary.rows["fct_glucose_forecast"] == published
    assert summary.sources.batches_held_back == 1
    batches = read(layout.database, "SELECT batch_folder, published, forecast_rows FROM dim_prediction_batch")
    assert dict(zip(batches["batch_folder"], batches["published"], strict=True))["tiny-held-back"] is False


def test_a_forecast_issued_again_by_a_later_batch_is_kept_but_scored_once(tmp_path: Path) -> None:
    """A later batch of the same model re-forecasting the same cut-offs supersedes the older rows in the scores."""
    layout = small_site(tmp_path)
    (original,) = (p.name for p in layout.predictions.iterdir())
    first = build_site_mart(tmp_path, "tiny")
    before = read(layout.database, "FROM mart_forecast_accuracy ORDER BY horizon_min")
    copy_batch(layout, "tiny-again")
    again = build_site_mart(tmp_path, "tiny")
    assert again.rows["fct_glucose_forecast"] == 2 * first.rows["fct_glucose_forecast"]
    superseded = read(layout.database, "SELECT batch_id, count(*) AS n FROM fct_glucose_forecast WHERE superseded "
                                       "GROUP BY batch_id")  # fmt: skip
    assert superseded.rows() == [(original, first.rows["fct_glucose_forecast"])]
    after = read(layout.database, "FROM mart_forecast_accuracy ORDER BY horizon_min")
    assert_frame_equal(after, before, check_exact=False)


def test_a_site_without_predictions_or_ledger_builds_with_empty_facts(tmp_path: Path) -> None:
    """Before the first prediction batch and privacy round (the demo data today) the mart still builds, facts empty."""
    layout = small_site(tmp_path)
    shutil.rmtree(layout.predictions)
    layout.privacy_ledger.unlink()
    summary = build_site_mart(tmp_path, "tiny")
    assert summary.rows["fct_glucose_forecast"] == 0 and summary.rows["mart_privacy_ledger"] == 0
    assert summary.rows["mart_patient_daily"] == 12 and summary.rows["dim_patient"] == 12
    share = read(layout.database, "FROM share_site")
    assert share["n_patients"][0] == 12 and share["epsilon_spent"][0] is None


# --- publishing --------------------------------------------------------------------------------------------------


def test_a_reader_holding_the_mart_sees_the_old_one_whole_and_a_new_reader_the_new_one(tmp_path: Path) -> None:
    """A reader holding the mart during a publish sees the old mart whole; a fresh reader sees the new one whole.

    The holder (another process) does not block the build; a second process opening and closing the mart in a
    loop through the publish only ever sees one whole build, old or new.
    """
    layout = small_site(tmp_path)
    build_site_mart(tmp_path, "tiny")
    with duckdb.connect(str(layout.database), read_only=True) as con:
        old = json.loads(json.dumps(signature(con)))
    holder = subprocess.Popen([sys.executable, str(READER), "hold", str(layout.database)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, str(READER), "poll", str(layout.database), str(stop)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert json.loads(holder.stdout.readline()) == old  # the holder has the mart open
        copy_batch(layout, "tiny-second", model_version="twin-0002")
        build_site_mart(tmp_path, "tiny")  # completes while the holder still has the old file open
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert json.loads(holder.stdout.readline()) == old
        with duckdb.connect(str(layout.database), read_only=True) as con:
            new = json.loads(json.dumps(signature(con)))
        assert new != old and new["fct_glucose_forecast"] == 2 * old["fct_glucose_forecast"]
    finally:
        stop.touch()
        seen_out, _ = poller.communicate(timeout=60)
        holder.kill()
        holder.wait(timeout=10)
    seen = [json.loads(line) for line in seen_out.splitlines()]
    assert seen and all(s in (old, new) for s in seen), [s for s in seen if s not in (old, new)][:1]
    assert not list(layout.mart_dir.glob(".*building*"))


@pytest.mark.parametrize("fault", ["missing_column", "duplicate_batch_id", "wrong_target_bin"])
def test_a_failed_build_leaves_the_previous_mart_and_share_live(tmp_path: Path, fault: str) -> None:
    """A failed build raises MartBuildError naming the problem and leaves the live mart and share byte for byte.

    Faults: a batch file without a declared column, a repeated key, a failed singular test.
    """
    layout = small_site(tmp_path)
    build_site_mart(tmp_path, "tiny")
    before = {p.name: digest(p) for p in [layout.database, *layout.share.iterdir()]}
    original = sorted(layout.predictions.iterdir())[0]
    if fault == "missing_column":
        copy_batch(layout, "tiny-bad", change=lambda frame: frame.drop("q95"))
        expected = "forecast.parquet: no column q95"
    elif fault == "duplicate_batch_id":  # the first batch's id again, in a second folder
        copy_batch(layout, original.name, folder_name="tiny-copy")
        expected = "dim_prediction_batch: 1 keys"
    else:
        copy_batch(layout, "tiny-shifted", change=lambda frame: frame.with_columns(
            pl.col("target_time") + timedelta(minutes=5)))  # fmt: skip
        expected = "forecast_target_is_its_horizon_bin"
    with pytest.raises(MartBuildError, match=expected):
        build_site_mart(tmp_path, "tiny")
    assert {p.name: digest(p) for p in [layout.database, *layout.share.iterdir()]} == before
    assert not list(layout.mart_dir.glob(".*building*")) and not list(layout.share.glob(".*partial"))


# --- share and federation ----------------------------------------------------------------------------------------


def test_the_share_lists_each_file_with_its_hash_and_an_altered_file_is_refused(built: Built, tmp_path: Path) -> None:
    """manifest.json lists every share file with its SHA-256; the federation build refuses a file that differs."""
    share = SiteMartLayout.under(built.data_dir, "testsite").share
    manifest = json.loads((share / "manifest.json").read_text())
    assert manifest["min_cell_patients"] == K
    for entry in manifest["tables"].values():
        assert digest(share / entry["file"]) == entry["sha256"]
    copy = tmp_path / "data"
    shutil.copytree(built.data_dir / "sites", copy / "sites")
    (copy / "sites/testsite/mart/share/share_model_quality.parquet").write_bytes(b"PAR1 not the shared file")
    with pytest.raises(MartBuildError, match="does not match its manifest"):
        build_federation_mart(copy, built.federation_dir)


def test_no_federation_table_has_a_person_level_column_or_a_cell_under_k(built: Built) -> None:
    """No federation table has a person-level column or a cell of fewer than k = 11 patients.

    Every table is a declared aggregate; every patient count is at least k or null; a suppressed row shows no
    statistic; and no site's person id appears as any value of any column.
    """
    tables = read(built.federation, f"SELECT table_name FROM duckdb_tables() WHERE {MAIN}")["table_name"].to_list()
    assert set(tables) == {m.name for m in FEDERATION_MODELS if m.published}
    columns = read(built.federation, f"SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE {MAIN}")
    person_like = columns.filter(pl.col("column_name").str.contains(r"(?i)person|patient_id|mrn|birth|name$")
                                 & ~pl.col("column_name").is_in(["check_name", "table_name"]))  # fmt: skip
    assert person_like.is_empty(), person_like
    ids = {str(p) for p in built.person_ids}
    suppressed_cells = 0
    for table in tables:
        frame = read(built.federation, f"FROM {table}")
        for column in frame.columns:
            if "patients" in column and frame[column].dtype.is_numeric():
                published = frame[column].drop_nulls()
                assert (published >= K).all(), (table, column, published.min())
            values = {str(x) for x in frame[column].drop_nulls().to_list()}
            assert not values & ids, (table, column)
        flags = [c for c in frame.columns if c.endswith("suppressed") and c != "sites_suppressed"]
        for flag in flags:
            statistics = [c for c in frame.columns if c.endswith(("_mg_dl", "_pct")) or c.startswith(("sum_", "n_"))]
            hidden = frame.filter(pl.col(flag)).select(statistics)
            if flag == "n_patients_suppressed":
                hidden = frame.filter(pl.col(flag)).select("n_patients")
            suppressed_cells += len(hidden)
            assert all(hidden[c].null_count() == len(hidden) for c in hidden.columns), (table, flag)
    assert suppressed_cells > 0  # the fixture has small cells: the test is not vacuous


def test_complementary_suppression_leaves_no_small_cell_derivable_from_the_total(built: Built) -> None:
    """Complementary suppression: no small cell can be derived as the published total minus the published cells.

    In each site's partition (model version x horizon x cohort dimension) with a suppressed cell, at least two are
    suppressed and the total minus the published cells is at least k patients.
    """
    cells = read(built.federation, "FROM fct_model_quality")
    totals = cells.filter(pl.col("cohort_dimension") == "all").select(
        "site_id", "model_version", "horizon_min", total=pl.col("n_patients")
    )
    parts = (
        cells.filter(pl.col("cohort_dimension") != "all")
        .group_by("site_id", "model_version", "horizon_min", "cohort_dimension")
        .agg(hidden=pl.col("suppressed").sum(), shown=pl.col("n_patients").sum())
        .join(totals, on=["site_id", "model_version", "horizon_min"])
        .filter((pl.col("hidden") > 0) & pl.col("total").is_not_null())
    )
    assert len(parts) > 0
    assert (parts["hidden"] >= 2).all()
    assert ((parts["total"] - parts["shown"]) >= K).all()
    testsite = cells.filter((pl.col("site_id") == "testsite") & (pl.col("horizon_min") == 30))
    shown = dict(zip(testsite["cohort_value"], testsite["suppressed"], strict=True))
    assert shown == {"all": False, "male": False, "female": True, "unknown": True, "0-12": True, "13-17": True,
                     "18+": False}  # fmt: skip


@functools.cache
def scratch_connection() -> duckdb.DuckDBPyConnection:
    """One in-memory DuckDB for the property test's examples, with the variables the share SQL reads."""
    con = duckdb.connect()
    con.execute("SET VARIABLE site_id = 'any'; SET VARIABLE min_cell_patients = ?", [K])
    return con


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=5), min_size=1, max_size=4))
def test_the_suppression_rule_protects_every_partition(partitions: list[list[int]]) -> None:
    """For any cohort cells, share_model_quality publishes no cell under k and protects every suppressed one.

    Once it suppresses a cell of a partition whose total it publishes, it suppresses at least two cells holding
    at least k patients together.
    """
    rows = []
    for horizon, counts in enumerate(partitions, start=1):
        rows.append(("v", horizon, "all", "all", sum(counts)))
        rows += [("v", horizon, "sex", f"value{i}", n) for i, n in enumerate(counts)]
    columns = ["model_version", "horizon_min", "cohort_dimension", "cohort_value", "n_patients"]
    cells = pl.DataFrame(rows, schema=columns, orient="row")
    con = scratch_connection()
    con.execute("CREATE OR REPLACE TEMP TABLE int_model_quality_cell AS SELECT *, 10 AS n_scored, 1.0 AS sum_error, "
                "1.0 AS sum_abs_error, 1.0 AS sum_sq_error, 5 AS n_covered, 1.0 AS sum_interval_width, "
                "5 AS n_persistence, 1.0 AS sum_sq_error_persistence FROM cells")  # fmt: skip
    con.execute((SQL_DIR / "site" / "share_model_quality.sql").read_text())
    result = con.execute("SELECT horizon_min, cohort_dimension, suppressed, n_patients FROM share_model_quality")
    types = {"horizon_min": pl.Int64, "cohort_dimension": pl.String, "suppressed": pl.Boolean, "n_patients": pl.Int64}
    shared = pl.DataFrame(result.fetchall(), schema=types, orient="row")
    assert (shared["n_patients"].drop_nulls() >= K).all()
    for horizon, counts in enumerate(partitions, start=1):
        total_published = sum(counts) >= K
        cells = shared.filter((pl.col("horizon_min") == horizon) & (pl.col("cohort_dimension") == "sex"))
        hidden = cells.filter(pl.col("suppressed"))
        if total_published and len(hidden):
            assert len(hidden) >= 2
            assert sum(counts) - cells["n_patients"].drop_nulls().sum() >= K


def test_training_evaluation_is_suppressed_where_a_site_has_few_test_patients(built: Built) -> None:
    """Registry evaluation is suppressed for a site with fewer than k test patients and for rounds pooled over it.

    smallton (8 patients) never shows its evaluation, nor does a round pooled over it; testsite (12 test patients)
    does, and so does the round smallton refused. Participation and privacy are per site and round.
    """
    rounds = read(built.federation, "FROM fct_site_round ORDER BY round, site_id")
    small = rounds.filter(pl.col("site_id") == "smallton")
    assert small["rmse_30_mg_dl"].null_count() == len(small)
    assert small.filter(pl.col("status") == "trained")["evaluation_suppressed"].all()
    assert rounds.filter(pl.col("site_id") == "testsite")["rmse_30_mg_dl"].null_count() == 0
    assert small["status"].to_list() == ["trained", "trained", "refused"]
    pooled = read(built.federation, "FROM fct_round ORDER BY round")
    assert pooled["evaluation_suppressed"].to_list() == [True, True, False]
    assert pooled["sites_refused"].to_list() == [0, 0, 1]
    ledger = read(built.federation, "SELECT site_id, count(*) AS rounds FROM fct_privacy_ledger GROUP BY site_id")
    assert dict(ledger.iter_rows()) == {"testsite": 2, "smallton": 2}
    sites = read(built.federation, "SELECT site_id, n_patients, n_patients_suppressed FROM dim_site ORDER BY site_id")
    assert sites.rows() == [("smallton", None, True), ("testsite", 60, False)]


def test_pooled_quality_pools_only_the_published_cells_exactly(built: Built) -> None:
    """mart_model_quality_pooled's RMSE is the exact pooled RMSE of the published cells (smallton's are not)."""
    cells = read(built.federation, "FROM fct_model_quality WHERE cohort_dimension = 'all' AND horizon_min = 60")
    pooled = read(
        built.federation, "FROM mart_model_quality_pooled WHERE cohort_dimension = 'all' AND horizon_min = 60"
    )
    published = cells.filter(~pl.col("suppressed"))
    assert pooled["sites_pooled"][0] == 1 and pooled["sites_suppressed"][0] == 1
    expected = math.sqrt(published["sum_sq_error"].sum() / published["n_scored"].sum())
    assert pooled["rmse_mg_dl"][0] == pytest.approx(expected)
    assert pooled["n_patients"][0] == published["n_patients"].sum() == TESTSITE.patients


# --- analyst interface -------------------------------------------------------------------------------------------


def test_every_documented_query_runs_on_a_built_mart(built: Built) -> None:
    """docs/marts.md documents at least five queries per mart, and each runs read-only on a built mart."""
    examples = documented_queries()
    for mart in ("site", "federation"):
        assert len([q for q in examples if q.mart == mart]) >= 5
    assert len({(q.mart, q.name) for q in examples}) == len(examples)
    for example in examples:
        path = built.site() if example.mart == "site" else built.federation
        result = read(path, example.sql)
        assert result.width > 0, example.name


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO dim_patient SELECT * FROM dim_patient", "INSERT statements are refused"),
        ("DROP TABLE dim_patient", "DROP statements are refused"),
        ("COPY dim_patient TO 'x.csv'", "COPY statements are refused"),
        ("ATTACH 'other.duckdb'", "ATTACH statements are refused"),
        ("SELECT 1; SELECT 2", "exactly one statement"),
    ],
)
def test_a_statement_that_is_not_a_read_is_refused(sql: str, message: str) -> None:
    """Only one SELECT or EXPLAIN statement is accepted; anything else is refused with a message saying so."""
    with pytest.raises(QueryError, match=message):
        check_read_only(sql)


def test_a_query_cannot_read_other_files(built: Built) -> None:
    """The analyst connection reads the mart and nothing else on disk."""
    layout = SiteMartLayout.under(built.data_dir, "testsite")
    with pytest.raises(QueryError, match="disabled by configuration"):
        read(built.site(), f"FROM read_parquet('{layout.store.table_path('person')}')")


def test_query_command_prints_a_table_and_exports_csv_and_parquet(built: Built, tmp_path: Path) -> None:
    """`query SITE SQL --csv --parquet` prints the rows and writes all of them to both files."""
    csv, parquet = tmp_path / "out.csv", tmp_path / "out.parquet"
    sql = "SELECT horizon_min, rmse_mg_dl FROM mart_forecast_accuracy ORDER BY horizon_min"
    result = runner.invoke(app, ["query", "testsite", sql, "--data-dir", str(built.data_dir), "--csv", str(csv),
                                 "--parquet", str(parquet), "--limit", "5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "horizon_min" in result.output and "24 rows (first 5 shown" in result.output
    assert pl.read_csv(csv)["horizon_min"].to_list() == list(range(5, 121, 5))
    assert pl.read_parquet(parquet).equals(read(built.site(), sql))


@pytest.mark.parametrize(
    ("target", "sql", "message"),
    [
        ("atlantis", "SELECT 1", "unknown site 'atlantis'"),
        ("testsite", "DELETE FROM dim_patient", "DELETE statements are refused"),
        ("testsite", "FROM no_such_table", "no_such_table"),
    ],
)
def test_query_command_errors_are_clear(built: Built, target: str, sql: str, message: str) -> None:
    """An unknown site, a write statement or a bad query exits 2 with a message naming the problem."""
    args = ["query", target, sql, "--data-dir", str(built.data_dir), "--federation-dir", str(built.federation_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_describe_and_examples_commands(built: Built) -> None:
    """`describe` lists a mart's tables or a table's columns with comments; `examples` prints the documented SQL."""
    args = ["--data-dir", str(built.data_dir), "--federation-dir", str(built.federation_dir)]
    tables = runner.invoke(app, ["describe", "federation", *args], terminal_width=200)
    assert tables.exit_code == 0 and "fct_model_quality" in tables.output and "suppressed" in tables.output
    columns = runner.invoke(app, ["describe", "testsite", "fct_glucose_forecast", *args], terminal_width=200)
    assert columns.exit_code == 0 and "observed_mg_dl" in columns.output
    examples = runner.invoke(app, ["examples", "federation"], terminal_width=200)
    assert examples.exit_code == 0 and "fct_round" in examples.output and "dim_patient" not in examples.output


def test_build_command_publishes_site_and_federation_marts(tmp_path: Path) -> None:
    """`build` builds each site's mart and the federation mart and reports them; an unknown site exits 2."""
    small_site(tmp_path)
    write_registry(tmp_path / "federation", ["tiny"])
    args = ["--data-dir", str(tmp_path), "--federation-dir", str(tmp_path / "federation")]
    result = runner.invoke(app, ["build", *args], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert SiteMartLayout.under(tmp_path, "tiny").database.is_file()
    assert federation_mart_path(tmp_path / "federation").is_file()
    assert runner.invoke(app, ["build", "atlantis", *args]).exit_code == 2


@pytest.mark.parametrize("command", [["--help"], ["build", "--help"], ["query", "--help"], ["describe", "--help"],
                                     ["examples", "--help"]])  # fmt: skip
def test_every_marts_command_has_help(command: list[str]) -> None:
    """Each command answers --help."""
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.slow  # starts a Prefect test server (~10-30 s here); CI runs it (make test-slow)
def test_the_prefect_flow_publishes_every_mart_and_keeps_a_failed_one(tmp_path: Path) -> None:
    """publish_marts publishes each site's mart and the federation mart; a failing site fails the run, mart kept."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.marts.flow import publish_marts

    small_site(tmp_path, "tiny")
    small_site(tmp_path, "other")
    write_registry(tmp_path / "federation", ["tiny", "other"])
    with prefect_test_harness(server_startup_timeout=60):
        published = publish_marts(data_dir=tmp_path, federation_dir=tmp_path / "federation")
        assert sorted(published) == ["federation", "other", "tiny"]
        other = SiteMartLayout.under(tmp_path, "other")
        before = digest(other.database)
        copy_batch(other, "other-bad", change=lambda frame: frame.drop("q50"))
        with pytest.raises(MartBuildError, match="other"):
            publish_marts(data_dir=tmp_path, federation_dir=tmp_path / "federation")
        assert digest(other.database) == before
