"""Build a site's mart (data/sites/<site>/mart/site.duckdb) and export the aggregates it shares with the federation.

The mart holds the site's patient-level facts and never leaves the site. The share (`share_*` tables) is built in
the same run, checked (no cell under k patients, no person-level column), written to mart/share/*.parquet and
listed in mart/share/manifest.json with each file's SHA-256: that folder is all the federation ever reads from
the site. The share files are replaced only after the mart itself was published, so a failed build leaves both
the previous mart and the previous share in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from data_contracts import vocabulary as v
from flows.features import GRID_MINUTES
from flows.marts.layout import MIN_CELL_PATIENTS, SHARE_FORMAT, SHARE_MANIFEST, SiteMartLayout
from flows.marts.runner import MartBuildError, Model, check_models, publish_database, run_models, set_variables
from flows.marts.sources import SourceSummary, declare_site_sources
from flows.site_store import write_json_atomic
from models.glucose_metrics import RANGE_HIGH, RANGE_HIGH_SEVERE, RANGE_LOW, RANGE_LOW_SEVERE, gmi_percent

LOG = logging.getLogger(__name__)
MART = "site"

# Dependency order. Published tables declare their key (unique, never null: checked on every build).
SITE_MODELS: tuple[Model, ...] = (
    Model("stg_person"),
    Model("stg_observation_period"),
    Model("stg_condition_occurrence"),
    Model("stg_device_exposure"),
    Model("stg_measurement"),
    Model("stg_prediction_batch"),
    Model("stg_scenario"),
    Model("stg_forecast"),
    Model("stg_whatif"),
    Model("stg_run"),
    Model("stg_privacy_round"),
    Model("int_patient_cohort"),
    Model("int_cgm_reading"),
    Model("int_cgm_bin"),
    Model("int_run_ledger"),
    Model("int_run_check"),
    Model("dim_patient", ("person_id",)),
    Model("dim_prediction_batch", ("batch_id",)),
    Model("dim_scenario", ("batch_id", "scenario_id")),
    Model("fct_glucose_forecast", ("batch_id", "person_id", "input_cutoff", "horizon_min")),
    Model("fct_whatif", ("batch_id", "scenario_id", "person_id", "input_cutoff", "horizon_min")),
    Model("mart_patient_daily", ("person_id", "day")),
    Model("int_forecast_patient_horizon"),
    Model("mart_forecast_accuracy", ("model_version", "horizon_min")),
    Model("mart_forecast_accuracy_patient", ("model_version", "person_id", "horizon_min")),
    Model("mart_forecast_accuracy_hourly", ("model_version", "horizon_min", "hour_utc")),
    Model("mart_whatif_effect", ("batch_id", "scenario_id", "horizon_min")),
    Model("int_whatif_in_range"),
    Model("mart_whatif_patient", ("batch_id", "scenario_id", "person_id", "input_cutoff")),
    Model("mart_data_quality", ("run_id", "source_file")),
    Model("mart_data_quality_checks", ("run_id", "check_name")),
    Model("mart_privacy_ledger", ("round_id",)),
    Model("int_model_quality_cell"),
    Model("share_site", ("site_id",)),
    Model("share_model_quality", ("site_id", "model_version", "cohort_dimension", "cohort_value", "horizon_min")),
    Model("share_data_quality", ("site_id", "run_id", "source_file")),
    Model("share_data_quality_checks", ("site_id", "run_id", "check_name")),
    Model("share_privacy_ledger", ("site_id", "round_id")),
)
SHARE_TABLES: tuple[str, ...] = tuple(m.name for m in SITE_MODELS if m.name.startswith("share_"))


@dataclass(frozen=True)
class SiteMartSummary:
    """What one site mart build published (counts only)."""

    site_id: str
    database: Path
    seconds: float
    bytes: int
    rows: dict[str, int]
    sources: SourceSummary


def site_variables(site_id: str, built_at: datetime) -> dict[str, Any]:
    """The values the site SQL reads with getvariable(), from the modules that define them."""
    return {
        "site_id": site_id,
        "built_at": built_at.isoformat(),
        "min_cell_patients": MIN_CELL_PATIENTS,
        "bin_minutes": GRID_MINUTES,
        "bin_us": GRID_MINUTES * 60_000_000,
        "cgm_concept_id": v.MEASUREMENTS["cgm_glucose"].concept_id,
        "type_1_diabetes_concept_id": v.TYPE_1_DIABETES,
        "cgm_device_concept_id": v.CGM_DEVICE,
        "pump_device_concept_id": v.INSULIN_PUMP,
        "male_concept_id": v.GENDER["M"],
        "female_concept_id": v.GENDER["F"],
        "gmi_intercept": float(gmi_percent(0.0)),
        "gmi_slope": round(float(gmi_percent(1.0)) - float(gmi_percent(0.0)), 10),
        "range_low_severe": RANGE_LOW_SEVERE,
        "range_low": RANGE_LOW,
        "range_high": RANGE_HIGH,
        "range_high_severe": RANGE_HIGH_SEVERE,
    }


def build_site_mart(data_dir: Path, site_id: str) -> SiteMartSummary:
    """Build, check and publish one site's mart, then its share; raise MartBuildError leaving both as they were."""
    layout = SiteMartLayout.under(data_dir, site_id)
    if not layout.store.harmonized.is_dir():
        raise MartBuildError(f"{layout.store.harmonized}: no harmonized tables; run `twinfed ingest {site_id}` first")
    started = time.perf_counter()
    built_at = datetime.now(UTC)  # to the microsecond: a batch issued just before must read as older (pipeline)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged: dict[str, Path] = {}
    outcome: dict[str, Any] = {}

    def build(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("SET TimeZone = 'UTC'")
        set_variables(con, site_variables(site_id, built_at))
        outcome["sources"] = declare_site_sources(con, layout)
        run_models(con, MART, SITE_MODELS)
        check_models(con, MART, SITE_MODELS)
        outcome["rows"] = _row_counts(con)
        staged.update(_stage_share(con, layout.share, token))

    try:
        publish_database(layout.database, build)
        _publish_share(layout, staged, built_at)
    finally:
        for partial in staged.values():
            partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    LOG.info("site mart %s published in %.1f s (%s)", site_id, seconds, outcome["sources"])
    return SiteMartSummary(site_id, layout.database, seconds, layout.database.stat().st_size, outcome["rows"],
                           outcome["sources"])  # fmt: skip


def _row_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    counts = {}
    for model in (m for m in SITE_MODELS if m.published):
        row = con.execute(f"SELECT count(*) FROM {model.name}").fetchone()
        counts[model.name] = int(row[0]) if row else 0
    return counts


def _stage_share(con: duckdb.DuckDBPyConnection, share: Path, token: str) -> dict[str, Path]:
    """Write each share_* table to a partial Parquet file beside its final place."""
    share.mkdir(parents=True, exist_ok=True)
    staged = {}
    for table in SHARE_TABLES:
        partial = share / f".{table}.{token}.partial"
        staged[table] = partial
        quoted = str(partial).replace("'", "''")
        con.execute(f"COPY {table} TO '{quoted}' (FORMAT parquet)")
    return staged


def _publish_share(layout: SiteMartLayout, staged: dict[str, Path], built_at: datetime) -> None:
    """Rename the share's files into place, then write the manifest that lists them with their hashes."""
    files = {}
    for table, partial in staged.items():
        final = layout.share / f"{table}.parquet"
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        os.replace(partial, final)
        files[table] = {"file": final.name, "sha256": digest}
    manifest = {
        "share_format": SHARE_FORMAT,
        "site_id": layout.site_id,
        "built_at": built_at.isoformat(),
        "min_cell_patients": MIN_CELL_PATIENTS,
        "tables": files,
    }
    write_json_atomic(manifest, layout.share / SHARE_MANIFEST)
