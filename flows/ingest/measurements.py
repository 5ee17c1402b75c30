"""Ingest a site's measurement sources: raw contract, harmonize, harmonized contract, quarantine, ledger.

For every source file: rows in = rows harmonized + rows quarantined + exact duplicates removed.
A quarantined row keeps its file, position, record key, the checks it failed and why; a file that
cannot be read is quarantined whole and the other sources go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from great_expectations.expectations.row_conditions import Column

from data_contracts import vocabulary as v
from data_contracts.contracts import Check, export_window_check, harmonized_checks
from data_contracts.gx_runner import FAILED_CHECKS, ROW_INDEX, ContractRun, run_contract
from data_contracts.schema import MEASUREMENT, PERSON
from flows.ingest.mapping import MeasurementSource, SiteMapping
from flows.ingest.pseudonym import PERSON_PREFIX, pseudonym_id, pseudonymize, stable_row_ids
from flows.ingest.readers import PARSE_ERROR, POSITION, ROW_HASH, RawRead, read_source
from flows.ingest.transform import measurement_candidates

RAW_TABLE = "raw_measurement"
TYPE_CONCEPTS = {"device": v.TYPE_DEVICE, "ehr": v.TYPE_EHR, "lab": v.TYPE_LAB}
QUARANTINE_SCHEMA = {
    "source_file": pl.String,
    "source_position": pl.Int64,
    "record_key": pl.String,
    "failed_checks": pl.String,
    "reason": pl.String,
}


@dataclass(frozen=True)
class SourceLedger:
    """Row accounting for one source file of one run."""

    file: str
    rows_in: int
    exact_duplicates: int
    quarantined: int
    harmonized: int
    file_error: str | None

    @property
    def balanced(self) -> bool:
        """Whether every row read is accounted for."""
        return self.rows_in == self.exact_duplicates + self.quarantined + self.harmonized


@dataclass(frozen=True)
class MeasurementBatch:
    """The harmonized measurements of a site's drop, what was quarantined, and the accounting."""

    person: pl.DataFrame
    measurement: pl.DataFrame
    quarantine: pl.DataFrame
    duplicates: pl.DataFrame  # source_file, source_position of each exact copy removed
    ledgers: list[SourceLedger]
    contracts: list[ContractRun]


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


def read_persons(drop: Path, mapping: SiteMapping, secret: bytes) -> pl.DataFrame:
    """The person table: pseudonymized, sex as a concept, year of birth only."""
    source = mapping.patients
    fields = {"patient": source.patient, "sex": source.sex, "birth_date": source.birth_date}
    read = read_source(drop, source.file, fields, mapping.site.format)
    if read.file_error is not None:
        raise ValueError(f"the patient list cannot be read: {read.file_error}")
    frame = read.frame.filter(pl.col(PARSE_ERROR).is_null())
    pseudonyms = pseudonymize(secret, PERSON_PREFIX, frame["patient"])
    return PERSON.conform(
        frame.with_columns(pseudonyms.alias("person_source_value")).select(
            pl.col("person_source_value").map_elements(pseudonym_id, return_dtype=pl.Int64).alias("person_id"),
            pl.col("sex")
            .replace_strict(source.sex_codes, default=None)
            .replace_strict(v.GENDER, default=0, return_dtype=pl.Int32)
            .alias("gender_concept_id"),
            pl.col("birth_date").str.to_date(mapping.site.date_format, strict=False).dt.year().alias("year_of_birth"),
            "person_source_value",
            pl.col("sex").alias("gender_source_value"),
        )
    ).unique(subset="person_id", keep="first", maintain_order=True)


def raw_checks(has_code: bool) -> list[Check]:
    """The raw-layer contract of a measurement source: parseable, fields present, values readable."""
    checks = [
        Check(f"{RAW_TABLE}.parseable", RAW_TABLE, "conformance", "ExpectColumnValuesToBeNull",
              {"column": PARSE_ERROR}, 0.0, "the line must be a complete record of the export format"),
    ]  # fmt: skip
    parsed = Column(PARSE_ERROR).is_null()
    for field in ("record_key", "patient", "time", "value", "unit", *(["code"] if has_code else [])):
        checks.append(
            Check(
                f"{RAW_TABLE}.{field}.present",
                RAW_TABLE,
                "completeness",
                "ExpectColumnValuesToNotBeNull",
                {"column": field, "row_condition": parsed},
                0.0,
                f"the record must have a {field}",
            )  # fmt: skip
        )
    readable = {
        "time_utc": ("time", "the timestamp must parse in the site's format and exist in its time zone"),
        "value_number": ("value", "the value must be a number"),
        "ucum_unit": ("unit", "the unit must be one the site's mapping declares"),
        "concept": ("code" if has_code else "value", "the code must be one the site's mapping declares"),
        "person_id": ("patient", "the patient must be in the site's patient list"),
    }
    for column, (source_field, reason) in readable.items():
        checks.append(
            Check(
                f"{RAW_TABLE}.{column}.readable",
                RAW_TABLE,
                "conformance",
                "ExpectColumnValuesToNotBeNull",
                {"column": column, "row_condition": Column(source_field).is_not_null()},
                0.0,
                reason,
            )  # fmt: skip
        )
    return checks


def ingest_measurements(
    drop: Path, mapping: SiteMapping, *, secret: bytes, workdir: Path, lookback_days: int = 90, build_docs: bool = True
) -> MeasurementBatch:
    """Run every measurement source of the mapping through contracts and harmonization."""
    export = export_time(drop)
    person = read_persons(drop, mapping, secret)
    person_ids = dict(zip(person["person_source_value"], person["person_id"], strict=True))
    parts = [
        _ingest_source(drop, mapping, name, source, person_ids, workdir, secret, build_docs)
        for name, source in mapping.measurements.items()
    ]
    candidates = pl.concat([p[0] for p in parts])
    checks = [
        c
        for c in harmonized_checks(export_time_utc=export, sensor_interval_min=None)
        if c.table in ("measurement", "person")
    ]
    checks.append(export_window_check(export, lookback_days))
    harmonized = run_contract(
        {"measurement": MEASUREMENT.conform(candidates), "person": person},
        checks, site_id=mapping.site.id, suite_name="harmonized_measurement", workdir=workdir, build_docs=build_docs,
    )  # fmt: skip
    flags = harmonized.row_flags["measurement"]
    failed_rows = candidates.with_row_index(ROW_INDEX).join(flags.select(ROW_INDEX, FAILED_CHECKS), on=ROW_INDEX)
    reasons = {r.check.name: r.check.description for r in harmonized.results}
    quarantine = pl.concat([p[1] for p in parts] + [_quarantine_rows(failed_rows, reasons)])
    accepted = MEASUREMENT.conform(
        candidates.with_row_index(ROW_INDEX).join(flags.select(ROW_INDEX), on=ROW_INDEX, how="anti")
    )
    ledgers = [_ledger(p[3], p[2], quarantine, accepted) for p in parts]
    return MeasurementBatch(
        person=person,
        measurement=accepted,
        quarantine=quarantine,
        duplicates=pl.concat([p[2] for p in parts]),
        ledgers=ledgers,
        contracts=[*[p[4] for p in parts if p[4] is not None], harmonized],
    )


def _ingest_source(
    drop: Path,
    mapping: SiteMapping,
    name: str,
    source: MeasurementSource,
    person_ids: dict[str, int],
    workdir: Path,
    secret: bytes,
    build_docs: bool,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, RawRead, ContractRun | None]:
    fields = {k: getattr(source, k) for k in ("record_key", "patient", "time", "value", "unit")}
    if source.code is not None:
        fields["code"] = source.code
    read = read_source(drop, source.file, fields, mapping.site.format)
    if read.file_error is not None:
        whole = pl.DataFrame(
            [{"source_file": source.file, "source_position": None, "record_key": None,
              "failed_checks": "raw.file.readable", "reason": read.file_error}],
            schema=QUARANTINE_SCHEMA,
        )  # fmt: skip
        return _no_candidates(), whole, _no_duplicates(), read, None
    first = read.frame[ROW_HASH].is_first_distinct()
    duplicates = read.frame.filter(~first).select(
        pl.lit(source.file).alias("source_file"), pl.col(POSITION).alias("source_position")
    )
    frame = measurement_candidates(read.frame.filter(first), source, mapping.site, mapping.units)
    patient = pl.col("patient").str.replace(r"^Patient/", "") if mapping.site.format == "fhir" else pl.col("patient")
    pseudo = pseudonymize(secret, PERSON_PREFIX, frame.select(patient).to_series())
    frame = frame.with_columns(
        pseudo.replace_strict(person_ids, default=None, return_dtype=pl.Int64).alias("person_id")
    )
    raw = run_contract({RAW_TABLE: frame}, raw_checks(source.code is not None), site_id=mapping.site.id,
                       suite_name=f"raw_{name}", workdir=workdir, keys={RAW_TABLE: POSITION},
                       build_docs=build_docs)  # fmt: skip
    reasons = {r.check.name: r.check.description for r in raw.results}
    flags = raw.row_flags[RAW_TABLE]
    failed = frame.with_row_index(ROW_INDEX).join(flags.select(ROW_INDEX, FAILED_CHECKS), on=ROW_INDEX)
    passed = frame.with_row_index(ROW_INDEX).join(flags.select(ROW_INDEX), on=ROW_INDEX, how="anti")
    candidates = passed.select(
        stable_row_ids(mapping.site.id, source.file, pl.col("record_key")).alias("measurement_id"),
        "person_id",
        pl.col("concept_id").alias("measurement_concept_id"),
        pl.col("time_utc").alias("measurement_datetime"),
        pl.col("value_canonical").alias("value_as_number"),
        "unit_concept_id",
        pl.lit(TYPE_CONCEPTS[source.type], dtype=pl.Int32).alias("measurement_type_concept_id"),
        (pl.col("code") if source.code is not None else pl.lit(source.concept)).alias("measurement_source_value"),
        pl.col("unit").alias("unit_source_value"),
        pl.col("value").alias("value_source_value"),
        pl.concat_str(pl.lit(f"{source.file}#"), pl.col("record_key")).alias("source_record"),
        pl.lit(source.file).alias("source_file"),
        POSITION,
        "record_key",
    )
    return (
        candidates,
        _quarantine_rows(failed.with_columns(pl.lit(source.file).alias("source_file")), reasons),
        duplicates,
        read,
        raw,
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
    ).cast(QUARANTINE_SCHEMA)  # type: ignore[arg-type]


def _ledger(read: RawRead, duplicates: pl.DataFrame, quarantine: pl.DataFrame, accepted: pl.DataFrame) -> SourceLedger:
    file = read.file
    return SourceLedger(
        file=file,
        rows_in=read.rows_in,
        exact_duplicates=duplicates.height,
        quarantined=quarantine.filter((pl.col("source_file") == file) & pl.col("source_position").is_not_null()).height,
        harmonized=accepted.filter(pl.col("source_record").str.starts_with(f"{file}#")).height,
        file_error=read.file_error,
    )


def _no_candidates() -> pl.DataFrame:
    schema = dict(MEASUREMENT.polars_schema) | {"source_file": pl.String, POSITION: pl.Int64, "record_key": pl.String}
    return pl.DataFrame(schema=schema)


def _no_duplicates() -> pl.DataFrame:
    return pl.DataFrame(schema={"source_file": pl.String, "source_position": pl.Int64})
