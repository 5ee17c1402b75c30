"""What a site mart reads, declared as DuckDB views named src_*: the only place the mart touches the site's files.

Sources (the SQL models read nothing else):

- src_<table> for the harmonized tables the mart uses (person, observation_period, condition_occurrence,
  device_exposure, measurement): the Parquet file, or an empty table with the canonical schema before the first run;
- src_prediction_batch, src_forecast, src_whatif: the prediction batches under predictions/<batch_id>/. Every
  batch is listed (with its contract flag) but only the rows of batches whose batch.json says the prediction
  contract passed are read; a folder without batch.json is a batch still being written and is left alone;
- src_run: one row per run record (runs/<run>.json) with its ledgers and checks as nested lists;
- src_privacy_round: the rounds of the site's privacy ledger (privacy_ledger.json), when it has one.

The prediction batch's columns (`FORECAST_SCHEMA`, `WHATIF_SCHEMA`) are what the prediction flow writes and the
marts rely on. Timing convention (the twin's windows, models/twin/windows.py): input_cutoff is the end of the last
history bin (t0 + 5 min); the forecast at horizon h minutes is for the CGM bin starting h - 5 minutes after the
cut-off, and target_time is that bin's start. The mart scores it against the CGM bin holding target_time and
compares it with persistence, the CGM of the last history bin [input_cutoff - 5 min, input_cutoff).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.schema import TABLES
from flows.marts.layout import BATCH_FILE, FORECAST_FILE, WHATIF_FILE, SiteMartLayout
from flows.marts.runner import MartBuildError

HARMONIZED_SOURCES = ("person", "observation_period", "condition_occurrence", "device_exposure", "measurement")
LEDGER_FORMAT = 1  # federated.privacy.LEDGER_FORMAT (not imported: that module loads Opacus)

UTC_US = pa.timestamp("us", tz="UTC")
FORECAST_SCHEMA = pa.schema(
    [
        ("site_id", pa.string()),
        ("person_id", pa.int64()),
        ("model_version", pa.string()),
        ("batch_id", pa.string()),
        ("input_cutoff", UTC_US),
        ("issued_at", UTC_US),
        ("horizon_min", pa.int16()),
        ("target_time", UTC_US),
        ("q05", pa.float64()),
        ("q50", pa.float64()),
        ("q95", pa.float64()),
    ]
)
WHATIF_SCHEMA = FORECAST_SCHEMA.append(pa.field("scenario_id", pa.string())).append(
    pa.field("baseline_q50", pa.float64())
)
FILENAME = pa.field("filename", pa.string())  # the file a row came from (read_parquet's filename = true)
SCENARIO = pa.struct([("scenario_id", pa.string()), ("description", pa.string())])
BATCH_SCHEMA = pa.schema(
    [
        ("batch_id", pa.string()),
        ("folder", pa.string()),
        ("site", pa.string()),
        ("model_version", pa.string()),
        ("issued_at", UTC_US),
        ("input_cutoff_max", UTC_US),
        ("rows", pa.int64()),  # forecast rows declared (batch.json rows, or its rows.forecast)
        ("contract_passed", pa.bool_()),
        ("scenarios", pa.list_(SCENARIO)),
    ]
)
LEDGER = pa.struct(
    [
        ("file", pa.string()),
        ("rows_in", pa.int64()),
        ("harmonized", pa.int64()),
        ("quarantined", pa.int64()),
        ("exact_duplicates", pa.int64()),
        ("balanced", pa.bool_()),
        ("file_error", pa.string()),
    ]
)
CHECK = pa.struct(
    [
        ("name", pa.string()),
        ("table", pa.string()),
        ("category", pa.string()),
        ("description", pa.string()),
        ("status", pa.string()),
        ("rows", pa.int64()),
        ("violating", pa.int64()),
        ("violating_pct", pa.float64()),
        ("threshold_pct", pa.float64()),
    ]
)
RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("site", pa.string()),
        ("skipped", pa.bool_()),
        ("versions", pa.struct([("contract", pa.string()), ("schema", pa.string())])),
        ("files_processed", pa.int64()),
        ("ledgers", pa.list_(LEDGER)),
        ("checks", pa.list_(CHECK)),
    ]
)
PRIVACY_ROUND_SCHEMA = pa.schema(
    [
        ("site_id", pa.string()),
        ("privacy_unit", pa.string()),
        ("epsilon_budget", pa.float64()),
        ("delta", pa.float64()),
        ("round_id", pa.string()),
        ("ledger_position", pa.int64()),
        ("noise_multiplier", pa.float64()),
        ("sample_rate", pa.float64()),
        ("steps", pa.int64()),
        ("epsilon_after", pa.float64()),
    ]
)


@dataclass(frozen=True)
class SourceSummary:
    """What a site mart build read (counts only, for logs and the CLI)."""

    batches_published: int
    batches_held_back: int
    runs: int
    privacy_rounds: int


def declare_site_sources(con: duckdb.DuckDBPyConnection, layout: SiteMartLayout) -> SourceSummary:
    """Create the src_* views of one site (see the module docstring)."""
    for table in HARMONIZED_SOURCES:
        path = layout.store.table_path(table)
        _declare_table(con, f"src_{table}", path, TABLES[table].empty().to_arrow().schema)
    batches = read_batches(layout)
    published = [b for b in batches if b["contract_passed"]]
    folders = [layout.predictions / b["folder"] for b in published]
    missing = [f / FORECAST_FILE for f in folders if not (f / FORECAST_FILE).is_file()]
    if missing:
        raise MartBuildError(f"{missing[0]}: a batch whose contract passed has no forecast; rerun its prediction")
    con.register("src_prediction_batch", pa.Table.from_pylist(batches, schema=BATCH_SCHEMA))
    # A batch without rows of a kind (no scenario asked for) may write that file without its columns: skip it.
    forecasts = [f / FORECAST_FILE for f in folders if pq.read_metadata(f / FORECAST_FILE).num_rows]
    whatifs = [
        f / WHATIF_FILE for f in folders if (f / WHATIF_FILE).is_file() and pq.read_metadata(f / WHATIF_FILE).num_rows
    ]
    _check_columns(forecasts, FORECAST_SCHEMA)
    _check_columns(whatifs, WHATIF_SCHEMA)
    _declare(con, "src_forecast", forecasts, FORECAST_SCHEMA.append(FILENAME))
    _declare(con, "src_whatif", whatifs, WHATIF_SCHEMA.append(FILENAME))
    runs = [_read_json(path) for path in sorted(layout.store.runs.glob("*.json"))]
    con.register("src_run", pa.Table.from_pylist(runs, schema=RUN_SCHEMA))
    rounds = read_privacy_rounds(layout.privacy_ledger)
    con.register("src_privacy_round", pa.Table.from_pylist(rounds, schema=PRIVACY_ROUND_SCHEMA))
    return SourceSummary(len(published), len(batches) - len(published), len(runs), len(rounds))


def read_batches(layout: SiteMartLayout) -> list[dict[str, Any]]:
    """Every prediction batch with a batch.json, as BATCH_SCHEMA rows, in folder order."""
    if not layout.predictions.is_dir():
        return []
    folders = sorted(p for p in layout.predictions.iterdir() if (p / BATCH_FILE).is_file())
    return [_batch_row(folder, _read_json(folder / BATCH_FILE)) for folder in folders]


def _batch_row(folder: Path, batch: Mapping[str, Any]) -> dict[str, Any]:
    path = folder / BATCH_FILE
    missing = [
        k for k in ("batch_id", "site", "model_version", "issued_at", "input_cutoff_max", "contract") if k not in batch
    ]
    if missing:
        raise MartBuildError(f"{path}: missing {missing}; the prediction flow writes them (see flows/marts/sources.py)")
    return {
        "batch_id": str(batch["batch_id"]),
        "folder": folder.name,
        "site": str(batch["site"]),
        "model_version": str(batch["model_version"]),
        "issued_at": _utc(batch["issued_at"], path, "issued_at"),
        "input_cutoff_max": _utc(batch["input_cutoff_max"], path, "input_cutoff_max"),
        "rows": rows.get("forecast") if isinstance(rows := batch.get("rows"), dict) else rows,
        "contract_passed": bool(batch["contract"].get("passed", False)),
        "scenarios": list(batch.get("scenarios", [])),
    }


def read_privacy_rounds(path: Path) -> list[dict[str, Any]]:
    """The rounds a site's privacy ledger recorded, each with the ledger's budget; none without a ledger."""
    if not path.exists():
        return []
    ledger = _read_json(path)
    if ledger.get("format") != LEDGER_FORMAT:
        raise MartBuildError(f"{path}: privacy ledger format {ledger.get('format')!r}, expected {LEDGER_FORMAT}")
    common = {key: ledger.get(key) for key in ("site_id", "privacy_unit", "epsilon_budget", "delta")}
    return [{**common, **entry, "ledger_position": i} for i, entry in enumerate(ledger.get("rounds", []), start=1)]


def _declare_table(con: duckdb.DuckDBPyConnection, name: str, path: Path, schema: pa.Schema) -> None:
    """A view over one harmonized table, or an empty table with its schema before the first run."""
    if not path.exists():
        con.register(name, schema.empty_table())
        return
    con.execute(f"SET VARIABLE {name}_files = ?", [[str(path)]])
    con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS FROM read_parquet(getvariable('{name}_files'))")


def _check_columns(files: Iterable[Path], schema: pa.Schema) -> None:
    """Refuse a Parquet file that lacks a declared column (a multi-file read would fill it with nulls)."""
    for path in files:
        missing = sorted(set(schema.names) - set(pq.read_schema(path).names))
        if missing:
            raise MartBuildError(
                f"{path}: no column {', '.join(missing)}; a prediction batch has the columns of "
                "flows/marts/sources.py (FORECAST_SCHEMA, WHATIF_SCHEMA): rerun its prediction or move it away"
            )


def _declare(con: duckdb.DuckDBPyConnection, name: str, files: Iterable[Path], schema: pa.Schema) -> None:
    """A view over Parquet files (with the file each row came from), or an empty table of `schema` without files."""
    paths = [str(p) for p in files]
    if not paths:
        con.register(name, schema.empty_table())
        return
    con.execute(f"SET VARIABLE {name}_files = ?", [paths])
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW {name} AS "
        f"FROM read_parquet(getvariable('{name}_files'), union_by_name = true, filename = true)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MartBuildError(f"{path}: unreadable ({error}); restore it or move it away") from error
    if not isinstance(loaded, dict):
        raise MartBuildError(f"{path}: expected a JSON object")
    return loaded


def _utc(value: Any, path: Path, field: str) -> datetime | None:
    if value is None:  # a batch without forecast rows has no cut-off
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError as error:
        raise MartBuildError(f"{path}: {field} {value!r} is not an ISO 8601 timestamp") from error
    if parsed.tzinfo is None:
        raise MartBuildError(f"{path}: {field} {value!r} has no time zone; write it in UTC with +00:00")
    return parsed
