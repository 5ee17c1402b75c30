"""Ingest a site's record and device sources: raw contract, harmonize, harmonized contract, quarantine, ledger.

Every source the mapping names (patient list, measurements, insulin, carbohydrates, diagnoses,
devices) is read losing no line, exact duplicates are removed and counted, the raw-layer contract
(one GX run over all sources) decides which rows can be read, the readable rows are shaped into
the harmonized tables, and the harmonized contract (one GX run over all tables) decides which of
them are kept. For every source file:

    rows in = rows harmonized + rows quarantined + exact duplicates removed

A quarantined row keeps its file, position, record key, the checks it failed and why; a file that
cannot be read is quarantined whole and the other sources go on. Files the mapping withholds
(free-text letters) are listed with the reason and never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from data_contracts import vocabulary as v
from data_contracts.contracts import Check, export_window_check, harmonized_checks
from data_contracts.gx_runner import FAILED_CHECKS, ROW_INDEX, ContractRun, run_contract
from data_contracts.schema import DEVICE_EXPOSURE, OBSERVATION_PERIOD, PERSON, TABLES
from flows.ingest.ledger import QUARANTINE_SCHEMA, SourceLedger, empty_quarantine, whole_file_quarantine
from flows.ingest.mapping import DeviceSource, DrugSource, SiteMapping
from flows.ingest.pseudonym import PERSON_PREFIX, pseudonym_id, pseudonymize, stable_row_ids
from flows.ingest.readers import PARSE_ERROR, POSITION, ROW_HASH, RawRead, read_source
from flows.ingest.sources import (
    PROVENANCE,
    Readable,
    Source,
    SourceContext,
    derive,
    optional_fields,
    primary_table,
    raw_checks,
    source_fields,
    table_rows,
)

PATIENTS = "patients"
EVENT_TABLES = ("measurement", "drug_exposure", "observation", "condition_occurrence", "device_exposure")
# Device and pump data of a drop must fall inside its look-back window; diagnoses and devices have no such bound.
WINDOWED = {
    "measurement": "measurement_datetime",
    "drug_exposure": "drug_exposure_start_datetime",
    "observation": "observation_datetime",
}
BIRTH_DATE_FORMATS = ("%d/%m/%Y", "%m/%d/%Y", "%Y-%m-%d", "%d-%m-%Y", "%d.%m.%Y")


@dataclass(frozen=True)
class RecordBatch:
    """The harmonized tables of a site's drop, what was quarantined or withheld, and the accounting."""

    tables: dict[str, pl.DataFrame]  # person, observation_period and the event tables, schema-conformed
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    duplicates: pl.DataFrame  # source_file, source_position of each exact copy removed
    ledgers: list[SourceLedger]
    contracts: list[ContractRun]
    withheld: dict[str, str]  # file -> why it was not read
    # The identifier DICOM's PatientID carries -> (person_id, pseudonym), for linking images; kept in memory only.
    imaging_ids: dict[str, tuple[int, str]]
    # Row ids, per table, of records this run quarantined: a row an earlier drop harmonized under the same key is
    # withdrawn from the store.
    retracted: dict[str, pl.Series]
    device_sources_read: bool  # the device list is a full list: the store's devices are replaced by this run's


@dataclass
class _Read:
    name: str
    source: Source | None  # None: the patient list
    read: RawRead
    duplicates: pl.DataFrame
    frame: pl.DataFrame | None  # deduplicated rows with derived columns, for the raw contract
    readable: list[Readable]


def export_time(drop: Path) -> datetime:
    """When the hospital made the export, from its bulk-export or extract manifest."""
    fhir, extract = drop / "ehr" / "manifest.json", drop / "ehr" / "extract_manifest.json"
    if fhir.exists():
        stamp = json.loads(fhir.read_text())["transactionTime"]
    elif extract.exists():
        stamp = json.loads(extract.read_text())["extracted_at"]
    else:
        raise FileNotFoundError(f"{drop / 'ehr'}: neither manifest.json (FHIR bulk export) nor extract_manifest.json")
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        raise ValueError(f"{drop}: export time {stamp!r} has no UTC offset")
    return moment.astimezone(UTC)


def ingest_records(
    drop: Path,
    mapping: SiteMapping,
    *,
    secret: bytes,
    workdir: Path,
    lookback_days: int = 90,
    build_docs: bool = True,
    skip_files: frozenset[str] = frozenset(),
) -> RecordBatch:
    """Run every record and device source of the mapping through contracts and harmonization.

    Sources whose file is in `skip_files` (unchanged since they were last harmonized) are not read;
    the patient list always is, since every record links through it.
    """
    export = export_time(drop)
    site = mapping.site.id
    patients = _read_patients(drop, mapping, secret)
    reads = [patients]
    raw_tables: dict[str, pl.DataFrame] = {}
    checks: list[Check] = []
    person_frame = patients.frame if patients.frame is not None else pl.DataFrame()
    person_ids = _person_ids(person_frame)
    context = SourceContext(mapping, secret, person_ids, _identifier_strings(person_frame, mapping))
    listing = patients.frame
    if listing is not None:  # identifiers are for the screen and image linking only; the contract never sees them
        patients.frame = listing.drop(_IDENTIFIER_COLUMNS, strict=False)
    for name, source in mapping.sources.items():
        if source.file not in skip_files:
            reads.append(_read_events(drop, mapping, name, source, context))
    reads += [_unmapped(file) for file in unmapped_files(drop, mapping) if file not in skip_files]
    for item in reads:
        if item.frame is not None:
            table = f"raw_{item.name}"
            raw_tables[table] = item.frame
            fields = _patient_fields(mapping) if item.source is None else source_fields(item.source)
            checks += raw_checks(table, fields, set() if item.source is None else optional_fields(item.source),
                                 item.readable)  # fmt: skip
    raw = run_contract(raw_tables, checks, site_id=site, suite_name="raw", workdir=workdir,
                       keys=dict.fromkeys(raw_tables, POSITION), build_docs=build_docs)  # fmt: skip
    raw_reasons = {r.check.name: r.check.description for r in raw.results}
    del raw_tables  # the frames live on in `reads` until each is shaped into table rows below
    quarantine = [whole_file_quarantine(i.read.file, i.read.file_error) for i in reads if i.read.file_error]
    candidates: dict[str, list[pl.DataFrame]] = {}
    person_rows = PERSON.empty().with_columns(pl.lit(None, pl.Int64).alias(POSITION))
    for item in reads:
        if item.frame is None:
            continue
        flags = raw.row_flags[f"raw_{item.name}"]
        indexed = item.frame.with_row_index(ROW_INDEX)
        failed = indexed.join(flags.select(ROW_INDEX, FAILED_CHECKS), on=ROW_INDEX)
        passed = indexed.join(flags.select(ROW_INDEX), on=ROW_INDEX, how="anti")
        failed = failed.with_columns(pl.lit(item.read.file).alias("source_file"))
        if "record_key" not in failed.columns:  # the patient list: the row position is its key
            failed = failed.with_columns(pl.lit(None, pl.String).alias("record_key"))
        quarantine.append(_quarantine_rows(failed, raw_reasons))
        if item.source is None:
            person_rows = _person_rows(passed)
            item.frame = None
            continue
        for table, rows in table_rows(passed, item.source, context).items():
            candidates.setdefault(table, []).append(rows)
        item.frame = None  # millions of device rows: free each source's raw frame once shaped
    events = {t: pl.concat(candidates[t]) if t in candidates else _no_rows(t) for t in EVENT_TABLES}
    person = PERSON.conform(person_rows)
    harmonized_input = {t: TABLES[t].conform(frame) for t, frame in events.items()} | {"person": person}
    harmonized_checks_ = [
        c for c in harmonized_checks(export_time_utc=export, sensor_interval_min=None) if c.table in harmonized_input
    ]
    harmonized_checks_ += [export_window_check(export, lookback_days, t, column) for t, column in WINDOWED.items()]
    harmonized = run_contract(harmonized_input, harmonized_checks_, site_id=site, suite_name="harmonized",
                              workdir=workdir, build_docs=build_docs)  # fmt: skip
    reasons = {r.check.name: r.check.description for r in harmonized.results}
    failed_persons = person_rows.with_row_index(ROW_INDEX).join(
        harmonized.row_flags["person"].select(ROW_INDEX, FAILED_CHECKS), on=ROW_INDEX
    )
    quarantine.append(_quarantine_rows(_patient_provenance(failed_persons, patients), reasons))
    person = person.join(failed_persons.select("person_id"), on="person_id", how="anti")
    failed_events = _failed_event_rows(events, harmonized, person)
    quarantine.append(_quarantine_rows(failed_events, reasons | _PERSON_REASON))
    accepted = {
        t: TABLES[t].conform(frame.join(failed_events.select(PROVENANCE[:2]), on=list(PROVENANCE[:2]), how="anti"))
        for t, frame in events.items()
    }
    accepted["device_exposure"] = device_spans(accepted)
    tables = {"person": person, "observation_period": observation_periods(accepted, site), **accepted}
    all_quarantine = pl.concat(quarantine) if quarantine else empty_quarantine()
    ledgers = _ledgers(reads, all_quarantine, events, person, failed_events)
    return RecordBatch(
        tables=tables,
        quarantine=all_quarantine,
        duplicates=pl.concat([i.duplicates for i in reads]),
        ledgers=ledgers,
        contracts=[raw, harmonized],
        withheld=dict(mapping.withheld),
        imaging_ids=_imaging_ids(listing, person),
        retracted=_retracted(all_quarantine, mapping),
        device_sources_read=any(
            i.source is not None and primary_table(i.source).name == "device_exposure" and i.read.file_error is None
            for i in reads
        ),
    )


_IDENTIFIER_COLUMNS = ["imaging_id", "given_name", "family_name", *(f"identifier_{i}" for i in range(32))]
_PERSON_REASON = {"person.quarantined": "the row's patient failed the person checks and was quarantined"}


MANIFESTS = ("ehr/manifest.json", "ehr/extract_manifest.json")


def unmapped_files(drop: Path, mapping: SiteMapping) -> list[str]:
    """Record files of the drop that the mapping neither reads nor withholds (a new export the site must map)."""
    known = {s.file for s in mapping.sources.values()} | {mapping.patients.file} | set(mapping.withheld)
    present = sorted(p.relative_to(drop).as_posix() for p in (drop / "ehr").rglob("*") if p.is_file())
    return [f for f in present if f not in known and f not in MANIFESTS]


def _unmapped(file: str) -> _Read:
    reason = f"{file}: the site's mapping neither reads nor withholds this file; add it to the mapping"
    return _Read(file, None, RawRead(file, pl.DataFrame(), 0, reason), _no_duplicates(), None, [])


def _retracted(quarantine: pl.DataFrame, mapping: SiteMapping) -> dict[str, pl.Series]:
    """Ids the quarantined records would have had in their tables (a bolus's wizard carbs included)."""
    tables: dict[str, list[pl.Series]] = {}
    keyed = quarantine.filter(pl.col("record_key").is_not_null() & pl.col("source_position").is_not_null())
    for source in mapping.sources.values():
        rows = keyed.filter(pl.col("source_file") == source.file)
        if rows.is_empty() or isinstance(source, DeviceSource):  # devices are replaced as a whole list
            continue
        ids = rows.select(stable_row_ids(mapping.site.id, source.file, pl.col("record_key"))).to_series()
        names = [primary_table(source).name] + (["observation"] if isinstance(source, DrugSource) else [])
        for name in names:
            tables.setdefault(name, []).append(ids)
    return {name: pl.concat(parts) for name, parts in tables.items()}


def _patient_fields(mapping: SiteMapping) -> dict[str, str]:
    source = mapping.patients
    fields = {"patient": source.patient, "sex": source.sex, "birth_date": source.birth_date}
    if source.imaging_id is not None:
        fields["imaging_id"] = source.imaging_id
    for i, field in enumerate(source.identifiers):
        fields[f"identifier_{i}"] = field
    if source.full_name is not None:
        fields["given_name"], fields["family_name"] = source.full_name
    return fields


def _read_patients(drop: Path, mapping: SiteMapping, secret: bytes) -> _Read:
    source = mapping.patients
    read = read_source(drop, source.file, _patient_fields(mapping), mapping.site.format)
    if read.file_error is not None:
        raise ValueError(f"the patient list cannot be read, so no record can be linked: {read.file_error}")
    first = read.frame[ROW_HASH].is_first_distinct()
    frame = read.frame.filter(first)
    frame = frame.with_columns(
        pseudonymize(secret, PERSON_PREFIX, frame["patient"]).alias("person_source_value"),
        pl.col("sex").replace_strict(source.sex_codes, default=None).alias("sex_code"),
        pl.col("birth_date").str.slice(0, 10).str.to_date(mapping.site.date_format, strict=False).alias("birth"),
    ).with_columns(
        pl.col("person_source_value").map_elements(pseudonym_id, return_dtype=pl.Int64).alias("person_id"),
        pl.col("person_source_value").is_first_distinct().alias("first_listing"),
    )
    readable = [
        Readable("sex_code", "sex", "the sex must be one the site's mapping declares"),
        Readable("birth", "birth_date", "the birth date must parse in the site's date format"),
    ]
    return _Read(PATIENTS, None, read, _duplicates(read, first), frame, readable)


def _person_ids(patients: pl.DataFrame) -> dict[str, int]:
    if patients.is_empty():
        return {}
    listed = patients.filter(pl.col(PARSE_ERROR).is_null() & pl.col("first_listing"))
    return dict(zip(listed["person_source_value"], listed["person_id"], strict=True))


def _person_rows(passed: pl.DataFrame) -> pl.DataFrame:
    """The person rows, with the patient list position of each (for quarantine)."""
    return passed.select(
        "person_id",
        pl.col("sex_code").replace_strict(v.GENDER, default=0, return_dtype=pl.Int32).alias("gender_concept_id"),
        pl.col("birth").dt.year().alias("year_of_birth"),
        "person_source_value",
        pl.col("sex").alias("gender_source_value"),
        POSITION,
    )


def _patient_provenance(failed: pl.DataFrame, patients: _Read) -> pl.DataFrame:
    return failed.select(
        pl.lit(patients.read.file).alias("source_file"), POSITION, pl.lit(None, pl.String).alias("record_key"),
        FAILED_CHECKS,
    )  # fmt: skip


def _imaging_ids(patients: pl.DataFrame | None, person: pl.DataFrame) -> dict[str, tuple[int, str]]:
    if patients is None:
        return {}
    column = "imaging_id" if "imaging_id" in patients.columns else "patient"
    linked = patients.join(person.select("person_id"), on="person_id", how="semi").drop_nulls(column)
    return {
        key: (person_id, pseudonym)
        for key, person_id, pseudonym in zip(
            linked[column], linked["person_id"], linked["person_source_value"], strict=True
        )
    }


def _identifier_strings(patients: pl.DataFrame, mapping: SiteMapping) -> tuple[str, ...]:
    """Every direct identifier of the patient list, lower case, as free text might contain it."""
    if patients.is_empty():
        return ()
    found: set[str] = set()
    for column in [c for c in patients.columns if c.startswith("identifier_")] + ["patient"]:
        found.update(x.strip().lower() for x in patients[column].drop_nulls().to_list())
    if mapping.patients.full_name is not None:
        names = patients.select(pl.concat_str("given_name", "family_name", separator=" ")).to_series()
        found.update(x.lower() for x in names.drop_nulls().to_list())
    for fmt in {*BIRTH_DATE_FORMATS, mapping.site.date_format}:
        found.update(patients["birth"].drop_nulls().dt.strftime(fmt).to_list())
    # Short strings (a house number, a two-letter name) would match ordinary words.
    return tuple(sorted(x for x in found if len(x) >= 5))


def _read_events(drop: Path, mapping: SiteMapping, name: str, source: Source, context: SourceContext) -> _Read:
    read = read_source(drop, source.file, source_fields(source), mapping.site.format)
    if read.file_error is not None:
        return _Read(name, source, read, _no_duplicates(), None, [])
    first = read.frame[ROW_HASH].is_first_distinct()
    frame, readable = derive(read.frame.filter(first), source, context)
    return _Read(name, source, read, _duplicates(read, first), frame, readable)


def _duplicates(read: RawRead, first: pl.Series) -> pl.DataFrame:
    return read.frame.filter(~first).select(
        pl.lit(read.file).alias("source_file"), pl.col(POSITION).alias("source_position")
    )


def _failed_event_rows(events: dict[str, pl.DataFrame], run: ContractRun, person: pl.DataFrame) -> pl.DataFrame:
    """Provenance and failed checks of every source row with an output row that failed, or whose person did."""
    parts = []
    for table, frame in events.items():
        flagged = frame.with_row_index(ROW_INDEX).join(run.row_flags[table].select(ROW_INDEX, FAILED_CHECKS),
                                                       on=ROW_INDEX)  # fmt: skip
        orphaned = frame.join(person.select("person_id"), on="person_id", how="anti").with_columns(
            pl.lit(["person.quarantined"]).alias(FAILED_CHECKS)
        )
        parts += [flagged.select(*PROVENANCE, FAILED_CHECKS), orphaned.select(*PROVENANCE, FAILED_CHECKS)]
    failed = pl.concat(parts)
    # One entry per source row, however many of its output rows (a bolus and its carbs) failed.
    return failed.group_by(PROVENANCE[:2], maintain_order=True).agg(
        pl.col("record_key").first(),
        pl.col(FAILED_CHECKS).list.explode(keep_nulls=False, empty_as_null=False).unique(maintain_order=True),
    )


def device_spans(accepted: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Each device's exposure: a CGM from the patient's first to last reading, a pump over its deliveries."""
    cgm = v.MEASUREMENTS["cgm_glucose"].concept_id
    readings = (
        accepted["measurement"].filter(pl.col("measurement_concept_id") == cgm).group_by("person_id")
        .agg(pl.col("measurement_datetime").min().alias("start"), pl.col("measurement_datetime").max().alias("end"))
        .with_columns(pl.lit(v.CGM_DEVICE, pl.Int32).alias("device_concept_id"))
    )  # fmt: skip
    deliveries = (
        accepted["drug_exposure"].group_by("person_id")
        .agg(pl.col("drug_exposure_start_datetime").min().alias("start"),
             pl.col("drug_exposure_end_datetime").max().alias("end"))
        .with_columns(pl.lit(v.INSULIN_PUMP, pl.Int32).alias("device_concept_id"))
    )  # fmt: skip
    spans = pl.concat([readings, deliveries])
    devices = accepted["device_exposure"].drop("device_exposure_start_datetime", "device_exposure_end_datetime")
    joined = devices.join(spans, on=["person_id", "device_concept_id"], how="left")
    return DEVICE_EXPOSURE.conform(
        joined.rename({"start": "device_exposure_start_datetime", "end": "device_exposure_end_datetime"})
    )


def observation_periods(accepted: dict[str, pl.DataFrame], site_id: str) -> pl.DataFrame:
    """One period per person: the first to the last day with device data (CGM, insulin or carbohydrate)."""
    stamps = pl.concat([
        accepted["measurement"].filter(pl.col("measurement_type_concept_id") == v.TYPE_DEVICE)
        .select("person_id", pl.col("measurement_datetime").alias("at")),
        accepted["drug_exposure"].select("person_id", pl.col("drug_exposure_start_datetime").alias("at")),
        accepted["observation"].select("person_id", pl.col("observation_datetime").alias("at")),
    ])  # fmt: skip
    periods = stamps.group_by("person_id").agg(
        pl.col("at").min().dt.date().alias("observation_period_start_date"),
        pl.col("at").max().dt.date().alias("observation_period_end_date"),
    )
    return OBSERVATION_PERIOD.conform(
        periods.sort("person_id").with_columns(
            stable_row_ids(site_id, "observation_period", pl.col("person_id").cast(pl.String)).alias(
                "observation_period_id"
            ),
            pl.lit(v.TYPE_DEVICE, pl.Int32).alias("period_type_concept_id"),
        )
    )


def _quarantine_rows(failed: pl.DataFrame, reasons: dict[str, str]) -> pl.DataFrame:
    return failed.select(
        "source_file",
        pl.col(POSITION).alias("source_position"),
        "record_key",
        pl.col(FAILED_CHECKS).list.join("; ").alias("failed_checks"),
        pl.col(FAILED_CHECKS)
        .list.eval(pl.element().replace_strict(reasons, default=pl.element()))
        .list.join("; ")
        .alias("reason"),
    ).cast(QUARANTINE_SCHEMA)


def _ledgers(
    reads: list[_Read],
    quarantine: pl.DataFrame,
    events: dict[str, pl.DataFrame],
    person: pl.DataFrame,
    failed_events: pl.DataFrame,
) -> list[SourceLedger]:
    """Per source file: rows in, exact duplicates, rows quarantined (each position once) and rows harmonized."""
    quarantined = dict(
        quarantine.filter(pl.col("source_position").is_not_null())
        .group_by("source_file").agg(pl.col("source_position").n_unique()).iter_rows()
    )  # fmt: skip
    failed = dict(failed_events.group_by("source_file").len().iter_rows())
    harmonized = {}  # source rows shaped into their primary table and not failed, per file
    for item in reads:
        file = item.read.file
        if item.frame is None and item.read.file_error is not None:  # unreadable or unmapped: quarantined whole
            harmonized[file] = 0
        elif item.source is None:
            harmonized[file] = person.height
        else:
            produced = events[primary_table(item.source).name].filter(pl.col("source_file") == file).height
            harmonized[file] = produced - failed.get(file, 0)
    return [
        SourceLedger(
            file=item.read.file,
            rows_in=item.read.rows_in,
            exact_duplicates=item.duplicates.height,
            quarantined=quarantined.get(item.read.file, 0),
            harmonized=harmonized[item.read.file],
            file_error=item.read.file_error,
        )
        for item in reads
    ]


def _no_rows(table: str) -> pl.DataFrame:
    schema = dict(TABLES[table].polars_schema) | {"source_file": pl.String, POSITION: pl.Int64, "record_key": pl.String}
    return pl.DataFrame(schema=schema)


def _no_duplicates() -> pl.DataFrame:
    return pl.DataFrame(schema={"source_file": pl.String, "source_position": pl.Int64})
