"""The nightly site flow: a hospital's drop in, trustworthy de-identified harmonized tables and features out.

One Prefect flow per site run (`site_ingest`): fingerprint the drop, harmonize the record and
device files that changed since the last run (raw contract, harmonization, harmonized contract,
quarantine), de-identify and measure the images, upsert everything into the site's store by
stable keys, rebuild the training features, and report: a table artifact with every source's
ledger, a markdown artifact with each check's pass rate and the Data Docs link. Tasks that touch
the disk retry. Task results are never persisted and the artifacts and logs carry counts, check
names and file names only, never a patient row. A drop already harmonized with the same mapping
changes nothing; a drop with new or changed files is processed incrementally.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from data_contracts.contracts import CONTRACT_VERSION
from data_contracts.gx_runner import ContractRun
from data_contracts.schema import SCHEMA_VERSION, TABLES
from flows.features import build_features, write_features
from flows.ingest.dicom_deid import DeidOptions
from flows.ingest.imaging import ImagingBatch, ingest_imaging
from flows.ingest.ledger import QUARANTINE_SCHEMA, SourceLedger
from flows.ingest.mapping import DEFAULT_MAPPINGS_DIR, SiteMapping, mapping_for
from flows.ingest.pseudonym import load_or_create_secret
from flows.ingest.records import RecordBatch, device_spans, export_time, ingest_records, observation_periods
from flows.site_store import (
    SiteStore,
    fingerprint_files,
    fingerprint_text,
    upsert,
    write_json_atomic,
    write_parquet_atomic,
)

DEFAULT_DATA_DIR = Path("data")
# Row ids are polars hashes of site, file and record key (flows/ingest/pseudonym.py): stable for one polars version.
ID_SCHEME = f"polars-{pl.__version__}"
IMAGING_PREFIX = "imaging/"
# Harmonized tables a run upserts; observation_period and device spans are rebuilt from the merged store.
UPSERTED = ("person", "measurement", "drug_exposure", "observation", "condition_occurrence", "device_exposure")
IMAGE_TABLES = ("image_occurrence", "image_feature")
# Every task below hands patient rows around in memory: no cache keys on frames, no persisted results.


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def fingerprint_drop(drop: Path) -> dict[str, str]:
    """SHA-256 of every file in the drop."""
    if not drop.is_dir():
        raise FileNotFoundError(f"{drop}: no drop here (expected ehr/ and imaging/ from the hospital's export)")
    return fingerprint_files(drop)


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, persist_result=False)
def harmonize_records(
    drop: Path, mapping: SiteMapping, secret: bytes, workdir: Path, skip: frozenset[str], lookback_days: int,
    build_docs: bool,
) -> RecordBatch:  # fmt: skip
    """Raw contract, harmonization and harmonized contract over the record and device files."""
    return ingest_records(drop, mapping, secret=secret, workdir=workdir, lookback_days=lookback_days,
                          build_docs=build_docs, skip_files=skip)  # fmt: skip


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, persist_result=False)
def harmonize_images(
    drop: Path, mapping: SiteMapping, secret: bytes, store: SiteStore, records: RecordBatch
) -> ImagingBatch:
    """De-identify every DICOM file (PS3.15 Annex E) and measure each series' body composition."""
    options = DeidOptions(**mapping.imaging.model_dump())
    return ingest_imaging(drop, site_id=mapping.site.id, secret=secret, store=store.root, patients=records.imaging_ids,
                          options=options, measured_at=export_time(drop))  # fmt: skip


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def publish_tables(store: SiteStore, site_id: str, records: RecordBatch, images: ImagingBatch | None) -> dict[str, int]:
    """Merge the run's rows into the store's tables; return row counts.

    Rows upsert by key. A record this run quarantined withdraws the row an earlier drop harmonized under its key;
    patients no longer on the site's patient list (or now failing its checks) leave every table; the device list
    is replaced whole; a series whose de-identified files are gone (quarantined now) leaves the image tables.
    Observation periods and device spans are rebuilt from the merged store.
    """
    merged = store.read_tables()
    roster = records.tables["person"].select("person_id")
    for table in UPSERTED:
        kept = merged[table]
        if table in records.retracted:
            kept = kept.filter(~pl.col(TABLES[table].key).is_in(records.retracted[table].implode()))
        if table == "device_exposure" and records.device_sources_read:
            kept = kept.clear()
        merged[table] = upsert(kept, records.tables[table], table)
    if images is not None:
        merged["image_occurrence"] = (
            TABLES["image_occurrence"].conform(images.image_occurrence).sort("image_occurrence_id")
        )
        merged["image_feature"] = TABLES["image_feature"].conform(images.image_feature).sort("image_feature_id")
    for table, frame in merged.items():
        if "person_id" in frame.columns:
            merged[table] = frame.join(roster, on="person_id", how="semi")
    merged["device_exposure"] = device_spans(merged)
    merged["observation_period"] = observation_periods(merged, site_id)
    for table, frame in merged.items():
        write_parquet_atomic(TABLES[table].conform(frame), store.table_path(table))
    return {table: frame.height for table, frame in merged.items()}


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def publish_features(store: SiteStore) -> dict[str, int]:
    """Rebuild the twin's training features from the whole harmonized store."""
    features = build_features(store.read_tables())
    write_features(features, store.features)
    return {"grid_rows": features.grid.height, "patients": features.static.height}


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def write_quarantine(
    store: SiteStore, run_id: str, drop: Path, quarantine: pl.DataFrame, duplicates: pl.DataFrame
) -> Path | None:
    """The run's quarantine at the site: every entry with its raw line, each whole file rejected, duplicates removed."""
    if quarantine.is_empty() and duplicates.is_empty():
        return None
    folder = store.quarantine(run_id)
    entries = quarantine.with_columns(raw_content=_raw_content(drop, quarantine))
    write_parquet_atomic(entries, folder / "entries.parquet")
    write_parquet_atomic(duplicates, folder / "duplicates_removed.parquet")
    whole_file = pl.col("source_position").is_null() | pl.col("source_file").str.starts_with(IMAGING_PREFIX)
    whole = quarantine.filter(whole_file)
    for file in whole["source_file"].unique().to_list():
        target = folder / "files" / file
        target.parent.mkdir(parents=True, exist_ok=True)
        if (drop / file).is_file():
            shutil.copy2(drop / file, target)
    return folder


@task(cache_policy=NO_CACHE, persist_result=False)
def report(site_id: str, run: dict[str, Any]) -> None:
    """A table artifact of every source's ledger and a markdown artifact of the run (counts and checks only)."""
    key = f"{site_id}-ingest"
    create_table_artifact(
        key=f"{key}-ledger",
        table=[{k: v for k, v in ledger.items() if k != "balanced"} for ledger in run["ledgers"]],
        description=f"{site_id}: rows in, harmonized, quarantined and exact duplicates per source file",
    )
    create_markdown_artifact(key=f"{key}-report", markdown=run_markdown(run), description=f"{site_id} ingest run")


def run_markdown(run: dict[str, Any]) -> str:
    """The run report: what came in, what was kept and rejected, how each check did, where the Data Docs are."""
    lines = [
        f"# {run['site']}: ingest run {run['run_id']}",
        "",
        f"Drop: {run['files_processed']} file(s) processed, "
        f"{len(run['files_skipped']) + run['imaging_files_skipped']} unchanged and skipped, "
        f"{len(run['withheld'])} withheld. Took {run['seconds']['total']:.1f} s "
        f"(contracts {run['seconds']['contracts']:.1f} s).",
        "",
        "| source | rows in | harmonized | quarantined | exact duplicates | balanced |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for ledger in run["ledgers"]:
        lines.append(
            f"| {ledger['file']} | {ledger['rows_in']} | {ledger['harmonized']} | {ledger['quarantined']} | "
            f"{ledger['exact_duplicates']} | {'yes' if ledger['balanced'] else 'NO'} |"
        )
    for file, reason in run["withheld"].items():
        lines.append(f"| {file} | withheld: {reason} | | | | |")
    lines += ["", "## Checks", "", "| check | category | status | rows | violating | pass rate |",
              "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for check in sorted(run["checks"], key=lambda c: (c["status"] != "Failed", -c["violating"], c["name"])):
        if check["rows"] == 0 and check["status"] != "Failed":
            continue
        rate = 100.0 - check["violating_pct"]
        lines.append(f"| {check['name']} | {check['category']} | {check['status']} | {check['rows']} | "
                     f"{check['violating']} | {rate:.2f}% |")  # fmt: skip
    docs = run.get("data_docs")
    lines += ["", f"Data Docs: {Path(docs).resolve().as_uri() if docs else 'not built'}", ""]
    return "\n".join(lines)


@flow(name="site-ingest", persist_result=False, log_prints=False)
def site_ingest(
    site: str,
    data_dir: Path = DEFAULT_DATA_DIR,
    drop: Path | None = None,
    store_dir: Path | None = None,
    mappings_dir: Path = DEFAULT_MAPPINGS_DIR,
    lookback_days: int = 90,
    build_docs: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Harmonize one site's drop into its store; return the run's counts (no patient rows).

    `drop` defaults to data_dir/drops/<site>, the store to data_dir/sites/<site>. `force` reprocesses
    files already harmonized (the outcome is the same: rows upsert by stable keys).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    drop = Path(drop) if drop is not None else Path(data_dir) / "drops" / site
    store = SiteStore(Path(store_dir)) if store_dir is not None else SiteStore.under(Path(data_dir), site)
    mapping_file = Path(mappings_dir) / f"{site}.toml"
    mapping = mapping_for(site, Path(mappings_dir))
    run_id = _run_id()
    prints_by_path = fingerprint_drop(drop)
    secret = load_or_create_secret(store.secret)
    # DICOM folders are named by accession number, an identifier: the state keeps keyed hashes of the paths.
    prints = {_state_key(secret, file): digest for file, digest in prints_by_path.items()}
    state = store.read_state()
    versions = drop_versions(mapping_file, mapping, prints_by_path)
    _check_id_scheme(state, store)  # fmt: skip
    changed = changed_files(prints_by_path, state, versions, secret, force=force)
    if not changed:
        logger.info("%s: every file of %s was harmonized before (run %s); nothing to do", site, drop, state["last_run"])
        return {"site": site, "run_id": run_id, "skipped": True, "previous_run": state["last_run"]}
    skip = frozenset(prints_by_path) - changed
    stages: dict[str, float] = {}
    with _stage(stages, "records"):
        records = harmonize_records(drop, mapping, secret, store.gx, skip, lookback_days, build_docs)
    imaging_changed = any(f.startswith(IMAGING_PREFIX) for f in changed)
    with _stage(stages, "imaging"):
        images = harmonize_images(drop, mapping, secret, store, records) if imaging_changed else None
    quarantine = pl.concat([records.quarantine, *([images.quarantine] if images else [])]).cast(QUARANTINE_SCHEMA)
    with _stage(stages, "publish"):
        counts = publish_tables(store, site, records, images)
    records.tables.clear()  # published: free millions of rows before the features are built
    with _stage(stages, "features"):
        feature_counts = publish_features(store)
    with _stage(stages, "quarantine"):
        quarantine_dir = write_quarantine(store, run_id, drop, quarantine, records.duplicates)
    ledgers = [*records.ledgers, *([_imaging_ledger(images.ledgers)] if images else [])]
    run = _run_record(site, run_id, records, ledgers, counts, feature_counts, quarantine_dir, prints_by_path, skip,
                      started, stages)  # fmt: skip
    write_json_atomic(run, store.runs / f"{run_id}.json")
    write_json_atomic({"version": state["version"], "versions": versions, "files": prints, "last_run": run_id},
                      store.state)  # fmt: skip
    report(site, run)
    totals = {k: sum(entry[k] for entry in run["ledgers"]) for k in ("rows_in", "harmonized", "quarantined")}
    logger.info("%s: %d rows in, %d harmonized, %d quarantined, %d exact duplicates removed (%.1f s)", site,
                totals["rows_in"], totals["harmonized"], totals["quarantined"],
                sum(e["exact_duplicates"] for e in run["ledgers"]), run["seconds"]["total"])  # fmt: skip
    return run


def drop_versions(mapping_file: Path, mapping: SiteMapping, prints_by_path: dict[str, str]) -> dict[str, Any]:
    """What the drop was harmonized with: mapping, schema, contract, patient list and row-id scheme.

    Any of these changing reprocesses every file of the drop: a new patient list can link records quarantined
    before as "patient not in the list", a new mapping or contract can judge rows differently.
    """
    return {
        "mapping": fingerprint_text(mapping_file.read_text()),
        "schema": SCHEMA_VERSION,
        "contract": CONTRACT_VERSION,
        "patients": prints_by_path.get(mapping.patients.file),
        "ids": ID_SCHEME,
    }


def changed_files(
    prints_by_path: dict[str, str], state: dict[str, Any], versions: dict[str, Any], secret: bytes, *, force: bool
) -> set[str]:
    """Drop files not yet harmonized as they are now (every file when forced or when `versions` changed)."""
    known = state["files"] if (not force and state.get("versions") == versions) else {}
    return {f for f in prints_by_path if known.get(_state_key(secret, f)) != prints_by_path[f]}


@contextmanager
def _stage(stages: dict[str, float], name: str) -> Iterator[None]:
    """Time one stage of the run into `stages`."""
    started = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - started


def _check_id_scheme(state: dict[str, Any], store: SiteStore) -> None:
    """Refuse to mix row ids of two polars versions in one store: reruns would then duplicate rows."""
    before = (state.get("versions") or {}).get("ids")
    if before not in (None, ID_SCHEME):
        raise RuntimeError(
            f"{store.root}: its row ids were made with {before}, this install makes them with {ID_SCHEME}, and a "
            "rerun would add every re-exported record again under a new id. Pin polars to the store's version, or "
            f"rebuild the store: remove {store.harmonized} and {store.state} and run the flow on the latest drop."
        )


def _state_key(secret: bytes, file: str) -> str:
    return hmac.new(secret, b"drop-file\x1f" + file.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def _imaging_ledger(ledgers: list[SourceLedger]) -> SourceLedger:
    """All series folders as one ledger line: the folders are named by accession number."""
    return SourceLedger(
        file=f"imaging/ ({len(ledgers)} series folders)",
        rows_in=sum(entry.rows_in for entry in ledgers),
        exact_duplicates=sum(entry.exact_duplicates for entry in ledgers),
        quarantined=sum(entry.quarantined for entry in ledgers),
        harmonized=sum(entry.harmonized for entry in ledgers),
        file_error=None,
    )


def _run_id() -> str:
    current = flow_run.get_id()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{(current or uuid.uuid4().hex)[:8]}"


def _run_record(
    site: str,
    run_id: str,
    records: RecordBatch,
    ledgers: list[SourceLedger],
    counts: dict[str, int],
    feature_counts: dict[str, int],
    quarantine_dir: Path | None,
    prints: dict[str, str],
    skip: frozenset[str],
    started: float,
    stages: dict[str, float],
) -> dict[str, Any]:
    contracts: list[ContractRun] = records.contracts
    docs = next((c.data_docs_index for c in reversed(contracts) if c.data_docs_index is not None), None)
    return {
        "site": site,
        "run_id": run_id,
        "skipped": False,
        "files_processed": len(prints) - len(skip),
        # Imaging paths carry accession numbers: counted, never listed.
        "files_skipped": sorted(f for f in skip if not f.startswith(IMAGING_PREFIX)),
        "imaging_files_skipped": sum(f.startswith(IMAGING_PREFIX) for f in skip),
        "withheld": records.withheld,
        "ledgers": [asdict(ledger) | {"balanced": ledger.balanced} for ledger in ledgers],
        "tables": counts,
        "features": feature_counts,
        "quarantine": str(quarantine_dir) if quarantine_dir else None,
        "checks": [
            {
                "name": r.check.name,
                "table": r.check.table,
                "category": r.check.category,
                "status": r.status,
                "threshold_pct": r.check.threshold_pct,
                "rows": r.rows,
                "violating": r.violating,
                "violating_pct": r.violating_pct,
                "description": r.check.description,
            }
            for contract in contracts
            for r in contract.results
        ],  # fmt: skip
        "data_docs": str(docs) if docs else None,
        "versions": {"schema": SCHEMA_VERSION, "contract": CONTRACT_VERSION},
        "seconds": {
            "total": time.perf_counter() - started,
            "contracts": sum(c.seconds for c in contracts),
            "gx": sum(c.gx_seconds for c in contracts),
            "row_flags": sum(c.row_flag_seconds for c in contracts),
            **stages,
        },
    }


def _raw_content(drop: Path, quarantine: pl.DataFrame) -> pl.Series:
    """The quarantined rows as the hospital sent them: the text line, or the Parquet row as JSON."""
    content: dict[tuple[str, int], str] = {}
    rows = quarantine.filter(pl.col("source_position").is_not_null())
    for file, positions in rows.group_by("source_file").agg("source_position").iter_rows():
        path = drop / file
        if file.startswith(IMAGING_PREFIX) or not path.is_file():
            continue
        if path.suffix == ".parquet":
            table = pl.read_parquet(path).with_row_index("_position")
            picked = table.filter(pl.col("_position").is_in(positions))
            for row in picked.iter_rows(named=True):
                position = row.pop("_position")
                content[(file, position)] = json.dumps(row, default=str)
        else:
            lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
            for position in positions:
                if 1 <= position <= len(lines):
                    content[(file, position)] = lines[position - 1]
    return pl.Series(
        "raw_content",
        [content.get((f, p)) for f, p in zip(quarantine["source_file"], quarantine["source_position"], strict=True)],
        dtype=pl.String,
    )
