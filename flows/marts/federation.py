"""Build the federation mart (<federation-dir>/mart/federation.duckdb): aggregates only, never a patient row.

It reads two things and nothing else: each site's share (data/sites/<site>/mart/share/, the `share_*` tables the
site mart build already suppressed, verified against the share's manifest) and the model registry's metadata
(rounds, participation, epsilon per site and round, training-time evaluation). Tables: model quality per site,
cohort and horizon (and pooled over the published cells), data quality per site and run, privacy spent per site
and round, and participation per round. The registry's per-site evaluation is on each site's held-out test
patients (one patient in `TEST_EVERY`); a site whose share does not show at least k * TEST_EVERY patients has its
evaluation suppressed, and so has the pooled evaluation of every round it took part in (pooled minus the other
sites would give it away).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from federated.registry import Registry
from flows.marts.layout import MIN_CELL_PATIENTS, SHARE_FORMAT, SHARE_MANIFEST, SiteMartLayout, federation_mart_path
from flows.marts.runner import MartBuildError, Model, check_models, publish_database, run_models, set_variables
from flows.marts.site import SHARE_TABLES
from models.twin.windows import TEST_EVERY

LOG = logging.getLogger(__name__)
MART = "federation"
# Per-site evaluation keys of the registry (federated.twin_app.pooled_metrics) -> columns.
EVALUATION_METRICS = {
    "rmse-30": "rmse_30",
    "persistence-rmse-30": "persistence_rmse_30",
    "rmse-60": "rmse_60",
    "persistence-rmse-60": "persistence_rmse_60",
    "coverage-90": "coverage_90",
}

FEDERATION_MODELS: tuple[Model, ...] = (
    Model("stg_share_site"),
    Model("stg_share_model_quality"),
    Model("stg_share_data_quality"),
    Model("stg_share_data_quality_checks"),
    Model("stg_share_privacy_ledger"),
    Model("stg_registry_model"),
    Model("stg_registry_model_site"),
    Model("stg_registry_site_round"),
    Model("stg_registry_evaluation"),
    Model("int_site_evaluation"),
    Model("dim_site", ("site_id",)),
    Model("dim_model_version", ("model_version",)),
    Model("fct_model_quality", ("site_id", "model_version", "cohort_dimension", "cohort_value", "horizon_min")),
    Model("mart_model_quality_pooled", ("model_version", "cohort_dimension", "cohort_value", "horizon_min")),
    Model("fct_data_quality", ("site_id", "run_id", "source_file")),
    Model("fct_data_quality_checks", ("site_id", "run_id", "check_name")),
    Model("mart_site_data_quality", ("site_id",)),
    Model("fct_site_round", ("model_version", "round", "site_id")),
    Model("fct_round", ("model_version", "round")),
    Model("fct_privacy_ledger", ("site_id", "round_id")),
)

REGISTRY_SCHEMAS: dict[str, pa.Schema] = {
    "src_registry_model": pa.schema([
        ("model_version", pa.string()), ("registered_at", pa.string()), ("rounds", pa.int64()),
        ("strategy", pa.string()), ("private", pa.bool_()), ("privacy_unit", pa.string()), ("examples", pa.int64()),
        ("epsilon_budget", pa.float64()), ("delta", pa.float64()),
    ]),
    "src_registry_model_site": pa.schema([
        ("model_version", pa.string()), ("site_id", pa.string()), ("examples", pa.int64()),
        ("rounds_trained", pa.int64()), ("rounds_refused", pa.int64()), ("rounds_failed", pa.int64()),
        ("rounds_absent", pa.int64()), ("epsilon_spent", pa.float64()), ("epsilon_budget", pa.float64()),
        ("delta", pa.float64()),
    ]),
    "src_registry_site_round": pa.schema([
        ("model_version", pa.string()), ("round", pa.int64()), ("site_id", pa.string()), ("status", pa.string()),
        ("examples", pa.int64()), ("epsilon_spent", pa.float64()), ("private", pa.bool_()),
        ("train_loss", pa.float64()), ("reason", pa.string()),
    ]),
    "src_registry_evaluation": pa.schema([
        ("model_version", pa.string()), ("round", pa.int64()), ("site_id", pa.string()),
        *((column, pa.float64()) for column in EVALUATION_METRICS.values()),
    ]),
}  # fmt: skip


@dataclass(frozen=True)
class FederationMartSummary:
    """What one federation mart build published (counts only)."""

    database: Path
    seconds: float
    bytes: int
    sites: list[str]
    model_versions: list[str]
    rows: dict[str, int]


def read_share(layout: SiteMartLayout) -> dict[str, pa.Table]:
    """A site's share tables, each checked against the SHA-256 the manifest lists (one read of each file)."""
    manifest_path = layout.share / SHARE_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise MartBuildError(f"{manifest_path}: unreadable share manifest ({error}); rebuild the site mart") from error
    if manifest.get("share_format") != SHARE_FORMAT:
        raise MartBuildError(f"{manifest_path}: share format {manifest.get('share_format')!r}, expected {SHARE_FORMAT}")
    tables = {}
    for table in SHARE_TABLES:
        entry = manifest["tables"].get(table)
        if entry is None:
            raise MartBuildError(f"{manifest_path}: no {table}; rebuild the site mart with this twinfed version")
        content = (layout.share / entry["file"]).read_bytes()
        if hashlib.sha256(content).hexdigest() != entry["sha256"]:
            raise MartBuildError(
                f"{layout.share / entry['file']}: does not match its manifest (the site mart is being rebuilt, or the "
                "file was altered); build the federation mart again once the site's build has finished"
            )
        tables[table] = pq.read_table(io.BytesIO(content))
    return tables


def registry_rows(federation_dir: Path) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """Every registered version's metadata flattened into rows of REGISTRY_SCHEMAS (versions, rows by source)."""
    registry = Registry(federation_dir)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in REGISTRY_SCHEMAS}
    versions = registry.versions()
    for version in versions:
        _flatten(version, registry.get(version).metadata, rows)
    return versions, rows


def _flatten(version: str, metadata: Mapping[str, Any], rows: dict[str, list[dict[str, Any]]]) -> None:
    config = metadata.get("config", {})
    rows["src_registry_model"].append({
        "model_version": version, "registered_at": metadata.get("registered_at"), "rounds": metadata.get("rounds"),
        "strategy": metadata.get("strategy"), "private": metadata.get("private"),
        "privacy_unit": metadata.get("privacy_unit"), "examples": metadata.get("examples"),
        "epsilon_budget": config.get("epsilon-budget"), "delta": config.get("delta"),
    })  # fmt: skip
    known = dict(metadata.get("sites", {}))
    for site_id, site in known.items():
        rows["src_registry_model_site"].append({"model_version": version, "site_id": site_id, **site})
    for entry in metadata.get("history", []):
        replied = entry.get("sites", {})
        for site_id in sorted(set(known) | set(replied)):
            part = replied.get(site_id, {"status": "absent"})
            rows["src_registry_site_round"].append(
                {"model_version": version, "round": entry["round"], "site_id": site_id, **part}
            )
        evaluation = entry.get("evaluation", {})
        scopes = [
            *evaluation.get("sites", {}).items(),
            *([(None, evaluation["pooled"])] if "pooled" in evaluation else []),
        ]
        for site_id, metrics in scopes:
            named = {column: metrics.get(key) for key, column in EVALUATION_METRICS.items()}
            rows["src_registry_evaluation"].append(
                {"model_version": version, "round": entry["round"], "site_id": site_id, **named}
            )


def build_federation_mart(
    data_dir: Path, federation_dir: Path, sites: list[str] | None = None
) -> FederationMartSummary:
    """Build, check and publish the federation mart from the sites' shares and the registry."""
    started = time.perf_counter()
    chosen = sites if sites is not None else _sites_with_share(data_dir)
    if not chosen:
        raise MartBuildError(f"no site under {Path(data_dir) / 'sites'} has a share; run `twinfed marts build` first")
    shares = [read_share(SiteMartLayout.under(data_dir, site)) for site in chosen]
    versions, registry = registry_rows(federation_dir)
    rows: dict[str, int] = {}

    def build(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("SET TimeZone = 'UTC'")
        set_variables(con, {"min_cell_patients": MIN_CELL_PATIENTS, "test_every": TEST_EVERY})
        for table in SHARE_TABLES:
            con.register(
                f"src_{table}", pa.concat_tables([share[table] for share in shares], promote_options="permissive")
            )
        for name, schema in REGISTRY_SCHEMAS.items():
            con.register(name, pa.Table.from_pylist(registry[name], schema=schema))
        run_models(con, MART, FEDERATION_MODELS)
        check_models(con, MART, FEDERATION_MODELS)
        for model in (m for m in FEDERATION_MODELS if m.published):
            counted = con.execute(f"SELECT count(*) FROM {model.name}").fetchone()
            rows[model.name] = int(counted[0]) if counted else 0

    live = federation_mart_path(federation_dir)
    publish_database(live, build)
    seconds = time.perf_counter() - started
    LOG.info("federation mart published in %.1f s: %d sites, %d model versions", seconds, len(chosen), len(versions))
    return FederationMartSummary(live, seconds, live.stat().st_size, list(chosen), versions, rows)


def _sites_with_share(data_dir: Path) -> list[str]:
    sites = Path(data_dir) / "sites"
    if not sites.is_dir():
        return []
    return sorted(p.name for p in sites.iterdir() if (p / "mart" / "share" / SHARE_MANIFEST).is_file())
