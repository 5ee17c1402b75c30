"""The canonical harmonized schema: OMOP CDM v5.4-shaped tables plus the imaging extension.

Harmonization, contracts, features and marts all import these definitions; nothing else spells a
column list. Timestamps are UTC. Identifiers are site pseudonyms, never source identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

SCHEMA_VERSION = "1.0.0"
UTC_DATETIME = pl.Datetime("ms", "UTC")


@dataclass(frozen=True)
class Column:
    """One column: name, type, whether a value is required, and what it means."""

    name: str
    dtype: pl.DataType
    required: bool
    description: str


@dataclass(frozen=True)
class Table:
    """One harmonized table; the first column is its primary key."""

    name: str
    description: str
    columns: tuple[Column, ...]

    @property
    def key(self) -> str:
        """The primary-key column."""
        return self.columns[0].name

    @property
    def column_names(self) -> list[str]:
        """Columns in schema order."""
        return [c.name for c in self.columns]

    @property
    def polars_schema(self) -> pl.Schema:
        """The table's polars schema."""
        return pl.Schema({c.name: c.dtype for c in self.columns})

    def empty(self) -> pl.DataFrame:
        """An empty frame with the table's schema."""
        return pl.DataFrame(schema=self.polars_schema)

    def conform(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Select and cast `frame` to this table's columns, in order; name any missing column."""
        missing = [c for c in self.column_names if c not in frame.columns]
        if missing:
            raise ValueError(f"{self.name}: missing columns {missing}")
        return frame.select([pl.col(c.name).cast(c.dtype) for c in self.columns])

    def duckdb_ddl(self) -> str:
        """CREATE TABLE statement for DuckDB, with NOT NULL and the primary key."""
        lines = []
        for column in self.columns:
            null = " NOT NULL" if column.required else ""
            lines.append(f"    {column.name} {_duckdb_type(column.dtype)}{null}")
        lines.append(f"    PRIMARY KEY ({self.key})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n" + ",\n".join(lines) + "\n);"


def _duckdb_type(dtype: pl.DataType) -> str:
    if dtype == UTC_DATETIME:
        return "TIMESTAMPTZ"
    return {pl.Int64: "BIGINT", pl.Int32: "INTEGER", pl.Float64: "DOUBLE", pl.String: "VARCHAR", pl.Date: "DATE"}[
        dtype.base_type()
    ]


def _c(name: str, dtype: pl.DataType, required: bool, description: str) -> Column:
    return Column(name, dtype, required, description)


I64, I32, F64, STR, DATE = pl.Int64(), pl.Int32(), pl.Float64(), pl.String(), pl.Date()
PERSON_ID = _c("person_id", I64, True, "Pseudonymous person key: HMAC of the source identifier with the site secret")
SOURCE_RECORD = _c("source_record", STR, True, "Where the row came from: drop file and record key (provenance)")

PERSON = Table("person", "One row per patient.", (
    PERSON_ID,
    _c("gender_concept_id", I32, True, "8507 male, 8532 female, 0 unknown"),
    _c("year_of_birth", I32, True, "Year of birth (the full date is not carried forward)"),
    _c("person_source_value", STR, True, "The site pseudonym (never the MRN)"),
    _c("gender_source_value", STR, False, "Sex as the source wrote it"),
))  # fmt: skip

OBSERVATION_PERIOD = Table("observation_period", "Span during which the site holds the patient's device data.", (
    _c("observation_period_id", I64, True, "Key"),
    PERSON_ID,
    _c("observation_period_start_date", DATE, True, "First day with data"),
    _c("observation_period_end_date", DATE, True, "Last day with data"),
    _c("period_type_concept_id", I32, True, "Provenance type concept"),
))  # fmt: skip

MEASUREMENT = Table("measurement", "CGM readings, labs and vitals, in canonical units.", (
    _c("measurement_id", I64, True, "Key: hash of site, source file and record key (stable across reruns)"),
    PERSON_ID,
    _c("measurement_concept_id", I32, True, "Measurement concept (see data_contracts.vocabulary)"),
    _c("measurement_datetime", UTC_DATETIME, True, "When measured, UTC"),
    _c("value_as_number", F64, True, "Value in the concept's canonical unit"),
    _c("unit_concept_id", I32, True, "Canonical unit concept"),
    _c("measurement_type_concept_id", I32, True, "Provenance: EHR, lab or device"),
    _c("measurement_source_value", STR, True, "Source code (LOINC or the site's own)"),
    _c("unit_source_value", STR, True, "Unit as the source wrote it"),
    _c("value_source_value", STR, True, "Value as the source wrote it"),
    SOURCE_RECORD,
))  # fmt: skip

DRUG_EXPOSURE = Table("drug_exposure", "Insulin delivered by the pump: basal per period and each bolus.", (
    _c("drug_exposure_id", I64, True, "Key"),
    PERSON_ID,
    _c("drug_concept_id", I32, True, "Insulin concept"),
    _c("drug_exposure_start_datetime", UTC_DATETIME, True, "Start of delivery, UTC"),
    _c("drug_exposure_end_datetime", UTC_DATETIME, True, "End of delivery, UTC"),
    _c("quantity", F64, True, "Units of insulin delivered"),
    _c("drug_type_concept_id", I32, True, "Provenance type concept"),
    _c("drug_source_value", STR, True, "basal or bolus"),
    _c("route_source_value", STR, True, "subcutaneous"),
    SOURCE_RECORD,
))  # fmt: skip

DEVICE_EXPOSURE = Table("device_exposure", "The CGM and pump each patient wore.", (
    _c("device_exposure_id", I64, True, "Key"),
    PERSON_ID,
    _c("device_concept_id", I32, True, "CGM or insulin pump concept"),
    _c("device_exposure_start_datetime", UTC_DATETIME, False, "First reading or delivery, UTC"),
    _c("device_exposure_end_datetime", UTC_DATETIME, False, "Last reading or delivery, UTC"),
    _c("device_type_concept_id", I32, True, "Provenance type concept"),
    _c("unique_device_id", STR, True, "Pseudonymous device key (HMAC of the serial number)"),
    _c("device_source_value", STR, True, "Manufacturer and model"),
))  # fmt: skip

OBSERVATION = Table("observation", "Carbohydrate the patient logged or entered into the pump.", (
    _c("observation_id", I64, True, "Key"),
    PERSON_ID,
    _c("observation_concept_id", I32, True, "Carbohydrate intake or bolus carb input"),
    _c("observation_datetime", UTC_DATETIME, True, "When, UTC"),
    _c("value_as_number", F64, True, "Grams of carbohydrate"),
    _c("unit_concept_id", I32, True, "Gram"),
    _c("observation_type_concept_id", I32, True, "Provenance type concept"),
    _c("observation_source_value", STR, True, "Source field"),
    SOURCE_RECORD,
))  # fmt: skip

CONDITION_OCCURRENCE = Table("condition_occurrence", "Diagnoses.", (
    _c("condition_occurrence_id", I64, True, "Key"),
    PERSON_ID,
    _c("condition_concept_id", I32, True, "Condition concept"),
    _c("condition_start_date", DATE, True, "Onset or diagnosis date"),
    _c("condition_type_concept_id", I32, True, "Provenance type concept"),
    _c("condition_source_value", STR, True, "Source code (ICD-10 or SNOMED)"),
    SOURCE_RECORD,
))  # fmt: skip

IMAGE_OCCURRENCE = Table("image_occurrence", "One row per de-identified imaging series (MI-CDM).", (
    _c("image_occurrence_id", I64, True, "Key"),
    PERSON_ID,
    _c("image_occurrence_date", DATE, True, "Study date (shifted if the site's date option says so)"),
    _c("image_study_uid", STR, True, "Remapped StudyInstanceUID"),
    _c("image_series_uid", STR, True, "Remapped SeriesInstanceUID"),
    _c("modality_source_value", STR, True, "DICOM modality"),
    _c("local_path", STR, True, "De-identified series folder, relative to the site's store"),
))  # fmt: skip

IMAGE_FEATURE = Table("image_feature", "Features extracted from a series (MI-CDM).", (
    _c("image_feature_id", I64, True, "Key"),
    PERSON_ID,
    _c("image_occurrence_id", I64, True, "The series it was measured on"),
    _c("image_feature_concept_id", I32, True, "Feature concept"),
    _c("value_as_number", F64, True, "Feature value"),
    _c("unit_concept_id", I32, True, "Unit concept"),
    _c("alg_system", STR, True, "Algorithm that measured it, with version"),
    _c("alg_datetime", UTC_DATETIME, True, "When it was measured"),
    _c("image_feature_source_value", STR, True, "Feature name"),
))  # fmt: skip

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        PERSON, OBSERVATION_PERIOD, MEASUREMENT, DRUG_EXPOSURE, DEVICE_EXPOSURE, OBSERVATION,
        CONDITION_OCCURRENCE, IMAGE_OCCURRENCE, IMAGE_FEATURE,
    )
}  # fmt: skip
