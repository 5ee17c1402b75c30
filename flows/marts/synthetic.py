"""Synthetic site stores, prediction batches and registry metadata of the documented shapes, for mart tests and bench.

Nothing here is real or derived from real data: CGM is a smooth daily curve plus noise, forecasts are that curve
plus noise with an interval around it. The shapes are the contract the marts read: harmonized tables conformed
to data_contracts.schema, a run record like flows/site_flow.py writes, a privacy ledger like
federated.privacy.PrivacyLedger saves, prediction batches as flows/marts/sources.py describes, and registry
metadata as federated.twin_app registers it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts import vocabulary as v
from data_contracts.schema import TABLES
from flows.features import GRID_MINUTES
from flows.marts.layout import BATCH_FILE, FORECAST_FILE, WHATIF_FILE, SiteMartLayout
from flows.marts.sources import FORECAST_SCHEMA, LEDGER_FORMAT, WHATIF_SCHEMA

START = datetime(2026, 3, 23, tzinfo=UTC)
HORIZONS = np.arange(GRID_MINUTES, 121, GRID_MINUTES, dtype=np.int16)
BIN_US = GRID_MINUTES * 60 * 1_000_000
SCENARIOS = (("bolus_plus_20", "Next meal bolus 20% larger"), ("carbs_minus_30", "Next meal 30 g less carbohydrate"))


@dataclass(frozen=True)
class SyntheticSite:
    """What to synthesize for one site: its patients (sex and age each), days of CGM and prediction cadence."""

    site_id: str
    sexes: Sequence[str]  # 'M', 'F' or '' (unknown), one per patient
    ages: Sequence[int]  # age in years at START, one per patient
    days: int = 2
    forecast_every_min: int = 30
    forecast_from_day: int = 1  # forecasts start on this day (0-based) and run to the end of the CGM
    batches: int = 2  # the forecast days are split over this many batches
    whatif_every_min: int = 120
    model_version: str = "twin-0001"
    gap_fraction: float = 0.03
    seed: int = 0
    privacy_rounds: Sequence[float] = field(default_factory=lambda: (3.6, 5.0))  # epsilon after each round

    @property
    def patients(self) -> int:
        """Number of patients."""
        return len(self.sexes)


def write_site(data_dir: Path, site: SyntheticSite) -> list[int]:
    """Write the site's store (harmonized tables, a run record, a privacy ledger, prediction batches); person ids."""
    layout = SiteMartLayout.under(data_dir, site.site_id)
    rng = np.random.default_rng(site.seed)
    # Pseudonym-like ids: distinct, unordered with respect to anything about the patient.
    person_ids = np.sort(10**15 + rng.choice(10**12, size=site.patients, replace=False))
    glucose = _glucose(rng, site.patients, site.days)
    _write_harmonized(layout, site, person_ids, glucose, rng)
    _write_run(layout, site)
    _write_ledger(layout, site)
    _write_batches(layout, site, person_ids, glucose, rng)
    return [int(p) for p in person_ids]


def _glucose(rng: np.random.Generator, patients: int, days: int) -> np.ndarray:
    """(patients, bins) CGM mg/dL on the 5-minute grid from START: a daily curve, meals and noise."""
    bins = days * 24 * 60 // GRID_MINUTES
    hours = np.arange(bins) * GRID_MINUTES / 60.0
    phase = rng.uniform(0, 2 * np.pi, size=(patients, 1))
    level = rng.uniform(110, 190, size=(patients, 1))
    swing = rng.uniform(30, 90, size=(patients, 1))
    noise = np.cumsum(rng.normal(0, 2.0, size=(patients, bins)), axis=1) * 0.3
    curve = level + swing * np.sin(2 * np.pi * hours / 24.0 + phase) + 25 * np.sin(2 * np.pi * hours / 5.0)
    return np.clip(curve + noise, 40.0, 400.0)


def _write_harmonized(
    layout: SiteMartLayout, site: SyntheticSite, person_ids: np.ndarray, glucose: np.ndarray, rng: np.random.Generator
) -> None:
    n, bins = glucose.shape
    end = START + timedelta(days=site.days)
    frames: dict[str, pl.DataFrame] = {}
    frames["person"] = pl.DataFrame({
        "person_id": person_ids,
        "gender_concept_id": [v.GENDER.get(s, 0) for s in site.sexes],
        "year_of_birth": [START.year - a for a in site.ages],
        "person_source_value": [f"p{i:05d}" for i in range(n)],
        "gender_source_value": list(site.sexes),
    })  # fmt: skip
    frames["observation_period"] = pl.DataFrame({
        "observation_period_id": np.arange(n) + 1, "person_id": person_ids,
        "observation_period_start_date": [START.date()] * n, "observation_period_end_date": [end.date()] * n,
        "period_type_concept_id": [v.TYPE_DEVICE] * n,
    })  # fmt: skip
    frames["condition_occurrence"] = pl.DataFrame({
        "condition_occurrence_id": np.arange(n) + 1, "person_id": person_ids,
        "condition_concept_id": [v.TYPE_1_DIABETES] * n, "condition_start_date": [START.date()] * n,
        "condition_type_concept_id": [v.TYPE_EHR] * n, "condition_source_value": ["E10.9"] * n,
        "source_record": [f"synthetic:{i}" for i in range(n)],
    })  # fmt: skip
    devices = np.repeat(person_ids, 2)
    frames["device_exposure"] = pl.DataFrame({
        "device_exposure_id": np.arange(2 * n) + 1, "person_id": devices,
        "device_concept_id": [v.CGM_DEVICE, v.INSULIN_PUMP] * n,
        "device_exposure_start_datetime": [START] * (2 * n), "device_exposure_end_datetime": [end] * (2 * n),
        "device_type_concept_id": [v.TYPE_DEVICE] * (2 * n), "unique_device_id": [f"d{i}" for i in range(2 * n)],
        "device_source_value": ["Dexcom G6", "Insulet Omnipod DASH"] * n,
    })  # fmt: skip
    kept = rng.random((n, bins)) >= site.gap_fraction
    person_index, bin_index = np.nonzero(kept)
    # Readings at random seconds inside their bin, as a sensor's clock would put them.
    offset_us = rng.integers(0, GRID_MINUTES * 60, size=person_index.size) * 1_000_000
    time_us = int(START.timestamp() * 1e6) + bin_index.astype(np.int64) * BIN_US + offset_us
    values = np.round(glucose[person_index, bin_index], 1)
    cgm = v.MEASUREMENTS["cgm_glucose"]
    frames["measurement"] = pl.DataFrame({
        "measurement_id": np.arange(person_index.size, dtype=np.int64) + 1,
        "person_id": person_ids[person_index],
        "measurement_concept_id": np.full(person_index.size, cgm.concept_id, dtype=np.int32),
        "measurement_datetime": pl.Series(time_us // 1000).cast(pl.Datetime("ms", "UTC")),
        "value_as_number": values,
        "unit_concept_id": np.full(person_index.size, cgm.unit_concept_id, dtype=np.int32),
        "measurement_type_concept_id": np.full(person_index.size, v.TYPE_DEVICE, dtype=np.int32),
        "measurement_source_value": pl.repeat(cgm.loinc, person_index.size, eager=True),
        "unit_source_value": pl.repeat("mg/dL", person_index.size, eager=True),
        "value_source_value": pl.Series(values).cast(pl.String),
        "source_record": pl.repeat("synthetic", person_index.size, eager=True),
    })  # fmt: skip
    layout.store.harmonized.mkdir(parents=True, exist_ok=True)
    for table, frame in frames.items():
        TABLES[table].conform(frame).write_parquet(layout.store.table_path(table))


def _write_run(layout: SiteMartLayout, site: SyntheticSite) -> None:
    n = site.patients
    readings = n * site.days * 288
    run = {
        "run_id": "20260406T020000Z-5e1f0a2b",
        "site": site.site_id,
        "skipped": False,
        "files_processed": 3,
        "versions": {"contract": "1.0.0", "schema": "1.0.0"},
        "ledgers": [
            {"file": "ehr/patients.csv", "rows_in": n, "harmonized": n, "quarantined": 0, "exact_duplicates": 0,
             "balanced": True, "file_error": None},
            {"file": "ehr/cgm.csv", "rows_in": readings + 12, "harmonized": readings, "quarantined": 9,
             "exact_duplicates": 3, "balanced": True, "file_error": None},
            {"file": "ehr/notes.bin", "rows_in": 0, "harmonized": 0, "quarantined": 0, "exact_duplicates": 0,
             "balanced": True, "file_error": "not a record file the mapping reads"},
        ],
        "checks": [
            {"name": "raw_cgm.parseable", "table": "raw_cgm", "category": "conformance", "status": "Failed",
             "description": "the line must be a complete record", "rows": readings + 9, "violating": 9,
             "violating_pct": 100 * 9 / (readings + 9), "threshold_pct": 0.0},
            {"name": "measurement.value_as_number.plausible", "table": "measurement", "category": "plausibility",
             "status": "Passed", "description": "CGM within the sensor's range", "rows": readings, "violating": 0,
             "violating_pct": 0.0, "threshold_pct": 0.0},
            {"name": "raw_patients.imaging_id.present", "table": "raw_patients", "category": "completeness",
             "status": "IsError", "description": "the record must have an imaging_id", "rows": 0, "violating": 0,
             "violating_pct": 0.0, "threshold_pct": 0.0},
        ],
    }  # fmt: skip
    layout.store.runs.mkdir(parents=True, exist_ok=True)
    (layout.store.runs / f"{run['run_id']}.json").write_text(json.dumps(run, indent=2))


def _write_ledger(layout: SiteMartLayout, site: SyntheticSite) -> None:
    rounds = [
        {"round_id": f"7:{i}", "noise_multiplier": 1.5, "sample_rate": 0.5, "steps": 4, "epsilon_after": eps}
        for i, eps in enumerate(site.privacy_rounds, start=1)
    ]
    ledger = {
        "format": LEDGER_FORMAT, "mechanism": "rdp", "site_id": site.site_id, "privacy_unit": "patient",
        "epsilon_budget": 8.0, "delta": 1e-4, "history": [[1.5, 0.5, 4]] * len(rounds), "rounds": rounds,
    }  # fmt: skip
    layout.privacy_ledger.parent.mkdir(parents=True, exist_ok=True)
    layout.privacy_ledger.write_text(json.dumps(ledger, indent=2))


def _write_batches(
    layout: SiteMartLayout, site: SyntheticSite, person_ids: np.ndarray, glucose: np.ndarray, rng: np.random.Generator
) -> None:
    bins = glucose.shape[1]
    step = site.forecast_every_min // GRID_MINUTES
    # A cut-off is the end of a history bin: cut-off bin c means history up to bin c - 1; forecasts run to the end.
    first = max(site.forecast_from_day * 288, 24)
    cutoffs = np.arange(first, bins + 1, step)
    for number, chunk in enumerate(np.array_split(cutoffs, site.batches), start=1):
        batch_id = f"{site.site_id}-batch-{number:03d}"
        issued = START + timedelta(minutes=int(chunk[-1]) * GRID_MINUTES, seconds=30)
        forecast = _forecast_table(site, batch_id, issued, person_ids, glucose, chunk, rng)
        whatif_chunk = chunk[(chunk * GRID_MINUTES) % site.whatif_every_min == 0]
        whatif = _whatif_table(site, batch_id, issued, person_ids, glucose, whatif_chunk, rng)
        write_batch(layout, batch_id=batch_id, forecast=forecast, whatif=whatif, model_version=site.model_version,
                    issued_at=issued, passed=True)  # fmt: skip


def write_batch(
    layout: SiteMartLayout, *, batch_id: str, forecast: pa.Table, whatif: pa.Table, model_version: str,
    issued_at: datetime, passed: bool, folder_name: str | None = None,
) -> Path:  # fmt: skip
    """Write one prediction batch folder: forecast.parquet, whatif.parquet, then batch.json (last, as a flow would)."""
    folder = layout.predictions / (folder_name or batch_id)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(forecast, folder / FORECAST_FILE, row_group_size=1 << 20)
    pq.write_table(whatif, folder / WHATIF_FILE, row_group_size=1 << 20)
    cutoff = pc.max(forecast["input_cutoff"]).as_py() if forecast.num_rows else issued_at
    batch = {
        "batch_id": batch_id, "site": layout.site_id, "model_version": model_version,
        "issued_at": issued_at.isoformat(), "input_cutoff_max": cutoff.isoformat(),
        "rows": {"forecast": forecast.num_rows, "whatif": whatif.num_rows},
        "scenarios": [{"scenario_id": s, "description": d} for s, d in SCENARIOS],
        "contract": {"passed": passed, "checks": 7, "failed": [] if passed else ["forecast.q05_le_q50"]},
    }  # fmt: skip
    (folder / BATCH_FILE).write_text(json.dumps(batch, indent=2))
    return folder


def _grid(
    person_ids: np.ndarray, glucose: np.ndarray, cutoffs: np.ndarray, rng: np.random.Generator, spread: float
) -> dict[str, np.ndarray]:
    """Columns of forecasts for every patient x cut-off x horizon (patient-major), with noisy medians."""
    n = person_ids.size
    p, c, h = np.meshgrid(np.arange(n), cutoffs, HORIZONS, indexing="ij")
    p, c, h = p.ravel(), c.ravel(), h.ravel()
    target_bin = c + h // GRID_MINUTES - 1
    bins = glucose.shape[1]
    truth = glucose[p, np.minimum(target_bin, bins - 1)]
    median = truth + rng.normal(0, 1, size=p.size) * (4 + 0.25 * h)
    width = spread * (8 + 0.5 * h)
    start_us = int(START.timestamp() * 1e6)
    return {
        "person_id": person_ids[p],
        "input_cutoff": start_us + c.astype(np.int64) * BIN_US,
        "horizon_min": h.astype(np.int16),
        "target_time": start_us + (c.astype(np.int64) + h // GRID_MINUTES - 1) * BIN_US,
        "q05": median - width,
        "q50": median,
        "q95": median + width,
    }


def _forecast_table(
    site: SyntheticSite, batch_id: str, issued: datetime, person_ids: np.ndarray, glucose: np.ndarray,
    cutoffs: np.ndarray, rng: np.random.Generator,
) -> pa.Table:  # fmt: skip
    columns = _grid(person_ids, glucose, cutoffs, rng, spread=1.0)
    return _table(columns, site, batch_id, issued, FORECAST_SCHEMA)


def _whatif_table(
    site: SyntheticSite, batch_id: str, issued: datetime, person_ids: np.ndarray, glucose: np.ndarray,
    cutoffs: np.ndarray, rng: np.random.Generator,
) -> pa.Table:  # fmt: skip
    parts = []
    for number, (scenario_id, _) in enumerate(SCENARIOS):
        columns = _grid(person_ids, glucose, cutoffs, rng, spread=1.0)
        change = (-1) ** number * 0.3 * columns["horizon_min"].astype(float)
        columns["baseline_q50"] = columns["q50"].copy()
        for q in ("q05", "q50", "q95"):
            columns[q] = columns[q] - change
        columns["scenario_id"] = np.full(columns["q50"].size, scenario_id)
        parts.append(_table(columns, site, batch_id, issued, WHATIF_SCHEMA))
    return pa.concat_tables(parts) if parts else WHATIF_SCHEMA.empty_table()


def _table(
    columns: dict[str, Any], site: SyntheticSite, batch_id: str, issued: datetime, schema: pa.Schema
) -> pa.Table:
    rows = len(columns["q50"])
    full = {
        "site_id": pa.repeat(site.site_id, rows),
        "model_version": pa.repeat(site.model_version, rows),
        "batch_id": pa.repeat(batch_id, rows),
        "issued_at": pa.repeat(pa.scalar(issued, pa.timestamp("us", tz="UTC")), rows),
        **columns,
    }
    return pa.table({f.name: pa.array(full[f.name], type=f.type) for f in schema}, schema=schema)


def write_registry(federation_dir: Path, sites: Sequence[str], *, version: str = "twin-0001", rounds: int = 3,
                   refuse: str | None = None) -> Path:  # fmt: skip
    """Registry metadata of one version as federated.twin_app registers it (no model arrays: the marts read none)."""
    history = []
    for number in range(1, rounds + 1):
        parts: dict[str, dict[str, Any]] = {}
        for i, site in enumerate(sites):
            if site == refuse and number == rounds:
                parts[site] = {"status": "refused", "reason": "privacy budget: 9.1 planned > 8.0"}
            else:
                parts[site] = {"status": "trained", "examples": 4000 + 100 * i, "private": True,
                               "epsilon_spent": 3.6 + 0.7 * (number - 1), "train_loss": 4.0 / number}  # fmt: skip
        metrics = {"rmse-30": 21.0 - number, "persistence-rmse-30": 24.0, "rmse-60": 33.0 - number,
                   "persistence-rmse-60": 38.0, "coverage-90": 0.89, "raw-coverage-90": 0.8,
                   "examples": 900.0}  # fmt: skip
        evaluated = [s for s in sites if parts[s]["status"] == "trained"]
        history.append({"round": number, "trained": len(evaluated), "sites": parts,
                        "evaluation": {"sites": {s: metrics for s in evaluated}, "pooled": metrics}})  # fmt: skip
    metadata = {
        "format": 1, "version": version, "registered_at": "2026-04-06T03:00:00+00:00", "rounds": rounds,
        "strategy": "fedavg", "private": True, "privacy_unit": "patient",
        "sites": {site: {"examples": 4000 + 100 * i, "rounds_trained": rounds - (site == refuse),
                         "rounds_refused": int(site == refuse), "rounds_failed": 0, "rounds_absent": 0,
                         "epsilon_spent": 5.0, "epsilon_budget": 8.0, "delta": 1e-4,
                         "contracts": {"schema-version": "1.0.0"}} for i, site in enumerate(sites)},
        "examples": sum(4000 + 100 * i for i in range(len(sites))), "metrics": {}, "metrics_by_site": {},
        "history": history, "config": {"epsilon-budget": 8.0, "delta": 1e-4}, "run_ids": [7],
    }  # fmt: skip
    folder = Path(federation_dir) / "registry" / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return folder
