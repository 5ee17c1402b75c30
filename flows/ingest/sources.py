"""What each kind of source contributes: the fields it reads, what it derives, its raw checks and its table rows.

A source is one file of a drop named by the site's mapping. Its rows are read as text
(flows/ingest/readers.py), derived into typed columns here without rejecting anything (a value
that cannot be read becomes null), checked by the raw-layer contract, and the rows that pass are
shaped into rows of their harmonized table. Every output row carries its provenance
(source_file, source_position, record_key), so a harmonized check that fails can quarantine the
source row it came from, whichever table it failed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl
from great_expectations.expectations.row_conditions import Column

from data_contracts import vocabulary as v
from data_contracts.contracts import Check
from data_contracts.schema import (
    CONDITION_OCCURRENCE,
    DEVICE_EXPOSURE,
    DRUG_EXPOSURE,
    MEASUREMENT,
    OBSERVATION,
    Table,
)
from flows.ingest.mapping import (
    ConditionSource,
    DeviceSource,
    DrugSource,
    EventSource,
    MeasurementSource,
    ObservationSource,
    SiteFormat,
    SiteMapping,
)
from flows.ingest.pseudonym import DEVICE_PREFIX, PERSON_PREFIX, pseudonymize, stable_row_ids
from flows.ingest.readers import PARSE_ERROR, POSITION
from flows.ingest.transform import measurement_candidates, parse_time

Source = EventSource
PROVENANCE = ("source_file", POSITION, "record_key")
FREE_TEXT_FINDING = "free_text_identifier"
TYPE_CONCEPTS = {"device": v.TYPE_DEVICE, "ehr": v.TYPE_EHR, "lab": v.TYPE_LAB}
ROUTE = "subcutaneous"


@dataclass(frozen=True)
class Readable:
    """A derived column that must not be null where its source field is present."""

    column: str
    field: str
    reason: str


@dataclass(frozen=True)
class SourceContext:
    """What deriving a source's rows needs beyond the rows: the site, its secret, its people, its identifiers."""

    mapping: SiteMapping
    secret: bytes
    person_ids: Mapping[str, int]  # person pseudonym -> person_id
    identifiers: tuple[str, ...]  # exact identifier strings free text is screened for (lower case)


def primary_table(source: Source) -> Table:
    """The harmonized table each source row becomes one row of."""
    return {
        MeasurementSource: MEASUREMENT,
        DrugSource: DRUG_EXPOSURE,
        ObservationSource: OBSERVATION,
        ConditionSource: CONDITION_OCCURRENCE,
        DeviceSource: DEVICE_EXPOSURE,
    }[type(source)]


def source_fields(source: Source) -> dict[str, str]:
    """The fields to read from the file: {name: column or JSONPath}."""
    names: tuple[str, ...]
    if isinstance(source, MeasurementSource):
        names = ("time", "value", "unit", *(("code",) if source.code is not None else ()))
    elif isinstance(source, DrugSource):
        names = ("time", "rate", "end", "duration_min", "dose", "carb_input")
    elif isinstance(source, ObservationSource):
        names = ("time", "value", "free_text")
    elif isinstance(source, ConditionSource):
        names = ("date", "code")
    else:
        names = ("kind", "serial", "manufacturer", "model", "free_text")
    fields = {"record_key": source.record_key, "patient": source.patient}
    fields |= {name: getattr(source, name) for name in names if getattr(source, name) is not None}
    return fields


def optional_fields(source: Source) -> set[str]:
    """Fields a row may leave empty."""
    if isinstance(source, DrugSource):
        return {"carb_input"}
    if isinstance(source, ObservationSource | DeviceSource):
        return {"free_text"}
    return set()


def derive(frame: pl.DataFrame, source: Source, context: SourceContext) -> tuple[pl.DataFrame, list[Readable]]:
    """Add the typed columns of the source's kind and person_id; list the columns that must be readable."""
    site = context.mapping.site
    frame = frame.with_columns(_person_ids(frame, site, context).alias("person_id"))
    readable = [Readable("person_id", "patient", "the patient must be in the site's patient list")]
    when = "the timestamp must parse in the site's format and exist in its time zone"
    if isinstance(source, MeasurementSource):
        frame = measurement_candidates(frame, source, site, context.mapping.units)
        readable += [
            Readable("time_utc", "time", when),
            Readable("value_number", "value", "the value must be a number"),
            Readable("ucum_unit", "unit", "the unit must be one the site's mapping declares"),
            Readable("concept", "code" if source.code is not None else "value",
                     "the code must be one the site's mapping declares"),
        ]  # fmt: skip
    elif isinstance(source, DrugSource):
        frame, more = _derive_drug(frame, source, site)
        readable += [Readable("time_utc", "time", when), *more]
    elif isinstance(source, ObservationSource):
        frame = frame.with_columns(
            parse_time("time", site).alias("time_utc"),
            pl.col("value").cast(pl.Float64, strict=False).alias("value_number"),
            _identifier_finding(pl.col("free_text") if source.free_text else None, context).alias(FREE_TEXT_FINDING),
        )
        readable += [
            Readable("time_utc", "time", when),
            Readable("value_number", "value", "the value must be a number"),
        ]
    elif isinstance(source, ConditionSource):
        frame = frame.with_columns(
            _parse_date("date", site).alias("start_date"),
            pl.col("code").replace_strict(source.codes, default=None, return_dtype=pl.String).alias("concept"),
        )
        readable += [
            Readable("start_date", "date", "the date must parse in the site's date format"),
            Readable("concept", "code", "the diagnosis code must be one the site's mapping declares"),
        ]
    else:
        frame = frame.with_columns(
            pl.col("kind").replace_strict(source.kinds, default=None, return_dtype=pl.String).alias("concept"),
            pseudonymize(context.secret, DEVICE_PREFIX, frame["serial"]).alias("device_pseudonym"),
            _identifier_finding(pl.col("free_text") if source.free_text else None, context).alias(FREE_TEXT_FINDING),
        )
        readable += [Readable("concept", "kind", "the device kind must be one the site's mapping declares")]
    return frame, readable


def raw_checks(table: str, fields: Mapping[str, str], optional: set[str], readable: list[Readable]) -> list[Check]:
    """The raw-layer contract of one source: parseable lines, fields present, values readable, no leaked identifiers."""
    checks = [
        Check(f"{table}.parseable", table, "conformance", "ExpectColumnValuesToBeNull",
              {"column": PARSE_ERROR}, 0.0, "the line must be a complete record of the export format"),
    ]  # fmt: skip
    parsed = Column(PARSE_ERROR).is_null()
    for field in fields:
        if field in optional:
            continue
        checks.append(
            Check(f"{table}.{field}.present", table, "completeness", "ExpectColumnValuesToNotBeNull",
                  {"column": field, "row_condition": parsed}, 0.0, f"the record must have a {field}")
        )  # fmt: skip
    for item in readable:
        checks.append(
            Check(f"{table}.{item.column}.readable", table, "conformance", "ExpectColumnValuesToNotBeNull",
                  {"column": item.column, "row_condition": Column(item.field).is_not_null()}, 0.0, item.reason)
        )  # fmt: skip
    if "free_text" in fields:
        checks.append(
            Check(f"{table}.free_text.no_identifiers", table, "conformance", "ExpectColumnValuesToBeNull",
                  {"column": FREE_TEXT_FINDING}, 0.0,
                  "free text must not contain a patient identifier (name, MRN, phone, address or birth date): "
                  "the export leaks identifiers into a free-text field; the record is held for review")
        )  # fmt: skip
    return checks


def table_rows(passed: pl.DataFrame, source: Source, context: SourceContext) -> dict[str, pl.DataFrame]:
    """The harmonized rows of the rows that passed the raw contract, each with its provenance columns."""
    site_id = context.mapping.site.id
    row_id = stable_row_ids(site_id, source.file, pl.col("record_key"))
    provenance = [pl.lit(source.file).alias("source_file"), pl.col(POSITION), pl.col("record_key")]
    source_record = pl.concat_str(pl.lit(f"{source.file}#"), pl.col("record_key")).alias("source_record")
    if isinstance(source, MeasurementSource):
        rows = passed.select(
            row_id.alias("measurement_id"),
            "person_id",
            pl.col("concept_id").alias("measurement_concept_id"),
            pl.col("time_utc").alias("measurement_datetime"),
            pl.col("value_canonical").alias("value_as_number"),
            "unit_concept_id",
            pl.lit(TYPE_CONCEPTS[source.type], dtype=pl.Int32).alias("measurement_type_concept_id"),
            (pl.col("code") if source.code is not None else pl.lit(source.concept)).alias("measurement_source_value"),
            pl.col("unit").alias("unit_source_value"),
            pl.col("value").alias("value_source_value"),
            source_record,
            *provenance,
        )
        return {"measurement": rows}
    if isinstance(source, DrugSource):
        return _drug_rows(passed, source, row_id, source_record, provenance)
    if isinstance(source, ObservationSource):
        rows = passed.select(
            row_id.alias("observation_id"),
            "person_id",
            pl.lit(v.OBSERVATIONS[source.concept], dtype=pl.Int32).alias("observation_concept_id"),
            pl.col("time_utc").alias("observation_datetime"),
            pl.col("value_number").alias("value_as_number"),
            pl.lit(v.UNIT_CONCEPTS["g"], dtype=pl.Int32).alias("unit_concept_id"),
            pl.lit(v.TYPE_PATIENT_REPORTED, dtype=pl.Int32).alias("observation_type_concept_id"),
            pl.lit(source.concept).alias("observation_source_value"),
            source_record,
            *provenance,
        )
        return {"observation": rows}
    if isinstance(source, ConditionSource):
        rows = passed.select(
            row_id.alias("condition_occurrence_id"),
            "person_id",
            pl.col("concept").replace_strict(v.CONDITIONS, return_dtype=pl.Int32).alias("condition_concept_id"),
            pl.col("start_date").alias("condition_start_date"),
            pl.lit(v.TYPE_EHR, dtype=pl.Int32).alias("condition_type_concept_id"),
            pl.col("code").alias("condition_source_value"),
            source_record,
            *provenance,
        )
        return {"condition_occurrence": rows}
    rows = passed.select(
        # Keyed by the serial's pseudonym: a device's record key is often its serial, which an unkeyed hash exposes.
        stable_row_ids(site_id, source.file, pl.col("device_pseudonym")).alias("device_exposure_id"),
        "person_id",
        pl.col("concept").replace_strict(v.DEVICES, return_dtype=pl.Int32).alias("device_concept_id"),
        pl.lit(None, dtype=DEVICE_EXPOSURE.polars_schema["device_exposure_start_datetime"]).alias(
            "device_exposure_start_datetime"
        ),
        pl.lit(None, dtype=DEVICE_EXPOSURE.polars_schema["device_exposure_end_datetime"]).alias(
            "device_exposure_end_datetime"
        ),
        pl.lit(v.TYPE_EHR, dtype=pl.Int32).alias("device_type_concept_id"),
        pl.col("device_pseudonym").alias("unique_device_id"),
        pl.concat_str(pl.col("manufacturer"), pl.col("model"), separator=" ").alias("device_source_value"),
        *provenance,
    )
    return {"device_exposure": rows}


def _person_ids(frame: pl.DataFrame, site: SiteFormat, context: SourceContext) -> pl.Series:
    patient = frame["patient"]
    if site.format == "fhir":
        patient = patient.str.replace(r"^Patient/", "")
    return pseudonymize(context.secret, PERSON_PREFIX, patient).replace_strict(
        dict(context.person_ids), default=None, return_dtype=pl.Int64
    )


def _derive_drug(frame: pl.DataFrame, source: DrugSource, site: SiteFormat) -> tuple[pl.DataFrame, list[Readable]]:
    frame = frame.with_columns(parse_time("time", site).alias("time_utc"))
    if source.kind == "bolus":
        frame = frame.with_columns(
            pl.col("dose").cast(pl.Float64, strict=False).alias("dose_number"),
            (pl.col("carb_input").cast(pl.Float64, strict=False) if source.carb_input else pl.lit(None, pl.Float64))
            .alias("carb_number"),
        )  # fmt: skip
        readable = [Readable("dose_number", "dose", "the dose must be a number of units")]
        if source.carb_input:
            readable.append(Readable("carb_number", "carb_input", "the carbohydrate entered must be a number"))
        return frame, readable
    rate = pl.col("rate").cast(pl.Float64, strict=False)
    if source.end is not None:
        end = parse_time("end", site)
        end_field = "end"
    else:
        minutes = pl.col("duration_min").cast(pl.Float64, strict=False)
        end = pl.col("time_utc") + pl.duration(milliseconds=(minutes * 60_000).round().cast(pl.Int64))
        end_field = "duration_min"
    frame = frame.with_columns(rate.alias("rate_number")).with_columns(end.alias("end_utc"))
    frame = frame.with_columns(
        (pl.col("rate_number") * (pl.col("end_utc") - pl.col("time_utc")).dt.total_milliseconds() / 3_600_000).alias(
            "dose_number"
        )
    )
    return frame, [
        Readable("rate_number", "rate", "the basal rate must be a number of units per hour"),
        Readable("end_utc", end_field, "the period's end must parse (a timestamp, or a duration in minutes)"),
    ]


def _drug_rows(
    passed: pl.DataFrame, source: DrugSource, row_id: pl.Expr, source_record: pl.Expr, provenance: list[pl.Expr]
) -> dict[str, pl.DataFrame]:
    end = pl.col("end_utc") if source.kind == "basal" else pl.col("time_utc")
    drugs = passed.select(
        row_id.alias("drug_exposure_id"),
        "person_id",
        pl.lit(v.DRUGS["insulin"], dtype=pl.Int32).alias("drug_concept_id"),
        pl.col("time_utc").alias("drug_exposure_start_datetime"),
        end.alias("drug_exposure_end_datetime"),
        pl.col("dose_number").alias("quantity"),
        pl.lit(v.TYPE_DEVICE, dtype=pl.Int32).alias("drug_type_concept_id"),
        pl.lit(source.kind).alias("drug_source_value"),
        pl.lit(ROUTE).alias("route_source_value"),
        source_record,
        *provenance,
    )
    out = {"drug_exposure": drugs}
    if source.kind == "bolus" and source.carb_input:
        carbs = passed.filter(pl.col("carb_number") > 0).select(
            row_id.alias("observation_id"),
            "person_id",
            pl.lit(v.BOLUS_CARB_INPUT, dtype=pl.Int32).alias("observation_concept_id"),
            pl.col("time_utc").alias("observation_datetime"),
            pl.col("carb_number").alias("value_as_number"),
            pl.lit(v.UNIT_CONCEPTS["g"], dtype=pl.Int32).alias("unit_concept_id"),
            pl.lit(v.TYPE_DEVICE, dtype=pl.Int32).alias("observation_type_concept_id"),
            pl.lit("bolus_carb_input").alias("observation_source_value"),
            source_record,
            *provenance,
        )
        out["observation"] = carbs
    return out


def _parse_date(column: str, site: SiteFormat) -> pl.Expr:
    # FHIR dates may be dateTimes; Parquet date columns arrive as ISO text.
    text = pl.col(column).str.slice(0, 10) if site.format == "fhir" else pl.col(column)
    return text.str.to_date(site.date_format, strict=False)


def _identifier_finding(text: pl.Expr | None, context: SourceContext) -> pl.Expr:
    """Null, or the words 'patient identifier' when the text contains one of the site's identifier strings.

    Exact matching (case-insensitive) of every patient's MRN, phone, address, postcode, full name
    and birth date as the site writes it: a detector of leaks into fields twinfed never carries
    forward, not a privacy control of its own. The finding names no identifier, so it can be shown.
    """
    if text is None or not context.identifiers:
        return pl.lit(None, dtype=pl.String)
    found = text.str.to_lowercase().str.contains_any(list(context.identifiers), ascii_case_insensitive=True)
    return pl.when(found.fill_null(False)).then(pl.lit("patient identifier")).otherwise(None)
