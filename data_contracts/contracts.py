"""The data contracts: every check a site flow runs, declared once as a GX expectation with a DQD category.

A `Check` names a Great Expectations (GX 1.x) expectation class and its kwargs; `data_contracts.gx_runner` compiles
the same declaration into a GX ExpectationSuite (official results, Data Docs) and into a row-level predicate (polars;
a SQL check's own query in DuckDB) that flags the failing rows for quarantine. Categories follow the OHDSI Data
Quality Dashboard: conformance, completeness, plausibility.
Each issue is reported by one check only: a missing value is a completeness failure and nothing else (the unit and
range checks ignore nulls, and a value's range is checked only in its canonical unit).
"""

from __future__ import annotations

import os

# The first GX import of the package happens here: no usage statistics from a hospital's flow (gx_runner's context
# config says so too).
os.environ["GX_ANALYTICS_ENABLED"] = "False"

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, get_args

import polars as pl
from great_expectations.expectations.row_conditions import (
    AndCondition,
    Column,
    ComparisonCondition,
    NullityCondition,
    OrCondition,
)

from data_contracts import vocabulary as v
from data_contracts.schema import TABLES, UTC_DATETIME, Table

CONTRACT_VERSION = "1.0.0"

Category = Literal["conformance", "completeness", "plausibility"]
CATEGORIES: tuple[str, ...] = get_args(Category)

# Expectations whose row-level predicate gx_runner compiles exactly; any other type would break the guarantee that the
# row-level flags count what GX counts, so a Check refuses it.
MAP_EXPECTATIONS = frozenset(
    {
        "ExpectColumnValuesToNotBeNull",
        "ExpectColumnValuesToBeNull",
        "ExpectColumnValuesToBeInSet",
        "ExpectColumnValuesToNotBeInSet",
        "ExpectColumnValuesToBeBetween",
        "ExpectColumnValuesToBeUnique",
        "ExpectColumnPairValuesAToBeGreaterThanB",
    }
)
ROW_QUERY_EXPECTATION = "UnexpectedRowsExpectation"
SUPPORTED_EXPECTATIONS = MAP_EXPECTATIONS | {ROW_QUERY_EXPECTATION}
ROW_CONDITION_TYPES = (ComparisonCondition, NullityCondition, AndCondition, OrCondition)

_REQUIRED_KWARGS: dict[str, tuple[str, ...]] = {
    "ExpectColumnValuesToNotBeNull": ("column",),
    "ExpectColumnValuesToBeNull": ("column",),
    "ExpectColumnValuesToBeInSet": ("column", "value_set"),
    "ExpectColumnValuesToNotBeInSet": ("column", "value_set"),
    "ExpectColumnValuesToBeBetween": ("column",),
    "ExpectColumnValuesToBeUnique": ("column",),
    "ExpectColumnPairValuesAToBeGreaterThanB": ("column_A", "column_B", "ignore_row_if"),
    ROW_QUERY_EXPECTATION: ("unexpected_rows_query",),
}
# Everything else (mostly, result_format, description, ...) is set by threshold_pct, the run or the Check itself, and
# a kwarg the row-level compiler does not read would make the two sides disagree.
_OPTIONAL_KWARGS: dict[str, tuple[str, ...]] = {
    "ExpectColumnValuesToBeBetween": ("min_value", "max_value", "strict_min", "strict_max"),
    "ExpectColumnPairValuesAToBeGreaterThanB": ("or_equal",),
}


@dataclass(frozen=True)
class Check:
    """One data-quality check: a GX expectation on one table, with its DQD category, threshold and reason text."""

    name: str  # unique, e.g. "measurement.value_as_number.plausible_range.cgm_glucose"
    table: str  # a table name from data_contracts.schema.TABLES, or a raw-layer table name
    category: Category
    expectation: str  # GX expectation class name, e.g. "ExpectColumnValuesToBeBetween"
    kwargs: dict[str, Any]  # its kwargs (column, min_value, ...; row_condition as a GX Condition)
    threshold_pct: float  # % of violating rows allowed before the status is Failed (DQD style; 0 = none allowed)
    description: str  # human-readable: what must hold; used as the quarantine reason

    def __post_init__(self) -> None:
        problem = _declaration_problem(self)
        if problem:
            raise ValueError(f"check {self.name!r} on table {self.table!r}: {problem}")

    @property
    def is_row_query(self) -> bool:
        """Whether the check is a SQL query returning its violating rows (UnexpectedRowsExpectation)."""
        return self.expectation == ROW_QUERY_EXPECTATION

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the kwargs name (a row query's SQL is not parsed, so it names none)."""
        named = [self.kwargs[k] for k in ("column", "column_A", "column_B") if k in self.kwargs]
        condition = self.kwargs.get("row_condition")
        return tuple(dict.fromkeys(named + (_condition_columns(condition) if condition is not None else [])))


def _condition_columns(condition: Any) -> list[str]:
    """The columns a GX row condition refers to, in order of appearance."""
    if isinstance(condition, AndCondition | OrCondition):
        return [name for part in condition.conditions for name in _condition_columns(part)]
    return [condition.column.name]


def _declaration_problem(check: Check) -> str | None:
    if not check.name.strip():
        return "the name is empty"
    if check.category not in CATEGORIES:
        return f"category {check.category!r} is not one of {CATEGORIES}"
    if check.expectation not in SUPPORTED_EXPECTATIONS:
        supported = sorted(SUPPORTED_EXPECTATIONS)
        return f"expectation {check.expectation!r} has no row-level compilation; use one of {supported}"
    if not 0.0 <= check.threshold_pct <= 100.0:
        return f"threshold_pct {check.threshold_pct} is outside 0..100"
    missing = [k for k in _REQUIRED_KWARGS[check.expectation] if k not in check.kwargs]
    if missing:
        return f"{check.expectation} needs kwargs {missing}"
    known = (*_REQUIRED_KWARGS[check.expectation], *_OPTIONAL_KWARGS.get(check.expectation, ()), "row_condition")
    unknown = sorted(k for k in check.kwargs if k not in known)
    if unknown:
        return f"kwargs {unknown} are not compiled to the row level (thresholds go in threshold_pct)"
    return _kwargs_problem(check)


def _kwargs_problem(check: Check) -> str | None:
    kwargs = check.kwargs
    condition = kwargs.get("row_condition")
    if condition is not None and not isinstance(condition, ROW_CONDITION_TYPES):
        return "row_condition must be a GX Condition object (e.g. Column('x') == 1), not a string"
    if check.expectation == "ExpectColumnValuesToBeBetween" and kwargs.get("min_value") is None:
        if kwargs.get("max_value") is None:
            return "ExpectColumnValuesToBeBetween needs min_value or max_value"
    if check.expectation == "ExpectColumnPairValuesAToBeGreaterThanB":
        if kwargs.get("ignore_row_if") != "either_value_is_missing":
            return "ignore_row_if must be 'either_value_is_missing' (a missing value is a completeness issue)"
    if check.is_row_query:
        if "{batch}" not in str(kwargs["unexpected_rows_query"]):
            return "unexpected_rows_query must read the batch as {batch}"
        if check.threshold_pct != 0.0:
            # GX fails an UnexpectedRowsExpectation on any row (it has no 'mostly'); a threshold would disagree.
            return "an UnexpectedRowsExpectation fails on any row in GX, so threshold_pct must be 0"
        if "row_condition" in kwargs:
            return "an UnexpectedRowsExpectation filters in its query, not with row_condition"
    return None


# Type concepts (where a record came from), allowed in every *_type_concept_id column.
TYPE_CONCEPTS: tuple[int, ...] = (v.TYPE_EHR, v.TYPE_LAB, v.TYPE_PATIENT_REPORTED, v.TYPE_DEVICE)

# The vocabulary's concepts per concept column ("table.column"); unit columns are checked per concept below.
CONCEPT_SETS: dict[str, tuple[int, ...]] = {
    "person.gender_concept_id": (*v.GENDER.values(), 0),  # 0: unknown, as the schema allows
    "observation_period.period_type_concept_id": TYPE_CONCEPTS,
    "measurement.measurement_concept_id": tuple(m.concept_id for m in v.MEASUREMENTS.values()),
    "measurement.measurement_type_concept_id": TYPE_CONCEPTS,
    "drug_exposure.drug_concept_id": (v.INSULIN_ASPART,),
    "drug_exposure.drug_type_concept_id": TYPE_CONCEPTS,
    "device_exposure.device_concept_id": (v.CGM_DEVICE, v.INSULIN_PUMP),
    "device_exposure.device_type_concept_id": TYPE_CONCEPTS,
    "observation.observation_concept_id": (v.CARBOHYDRATE_INTAKE, v.BOLUS_CARB_INPUT),
    "observation.observation_type_concept_id": TYPE_CONCEPTS,
    "condition_occurrence.condition_concept_id": (v.TYPE_1_DIABETES,),
    "condition_occurrence.condition_type_concept_id": TYPE_CONCEPTS,
    "image_feature.image_feature_concept_id": tuple(cid for cid, _ in v.IMAGE_FEATURES.values()),
}


# Largest plausible carbohydrate in one entry and insulin in one delivery record (a bolus, or one basal period).
MAX_CARBS_G = 500.0
MAX_INSULIN_U = 100.0


@dataclass(frozen=True)
class UnitRule:
    """The canonical unit of one concept in a table whose unit_concept_id depends on the row's concept."""

    key: str  # short concept name, used in check names
    concept_id: int
    unit: str  # UCUM
    low: float | None = None  # plausible range in the canonical unit, when the vocabulary gives one
    high: float | None = None

    @property
    def unit_concept_id(self) -> int:
        """The OMOP concept of the canonical unit."""
        return v.UNIT_CONCEPTS[self.unit]


# Per table with a unit_concept_id: the column holding the concept that decides the unit, and each concept's rule.
UNIT_RULES: dict[str, tuple[str, tuple[UnitRule, ...]]] = {
    "measurement": (
        "measurement_concept_id",
        tuple(
            UnitRule(m.key, m.concept_id, m.unit, m.plausible_low, m.plausible_high) for m in v.MEASUREMENTS.values()
        ),
    ),
    "observation": (
        "observation_concept_id",
        (
            UnitRule("carbohydrate_intake", v.CARBOHYDRATE_INTAKE, "g", 0.0, MAX_CARBS_G),
            UnitRule("bolus_carb_input", v.BOLUS_CARB_INPUT, "g", 0.0, MAX_CARBS_G),
        ),
    ),
    "image_feature": (
        "image_feature_concept_id",
        tuple(UnitRule(key, cid, unit) for key, (cid, unit) in v.IMAGE_FEATURES.items()),
    ),
}

# DuckDB's typeof() name for each schema dtype: the datatype check compares the loaded column types with these.
DUCKDB_TYPE_NAMES: dict[pl.DataType, str] = {
    pl.Int64(): "BIGINT",
    pl.Int32(): "INTEGER",
    pl.Float64(): "DOUBLE",
    pl.String(): "VARCHAR",
    pl.Date(): "DATE",
    UTC_DATETIME: "TIMESTAMP WITH TIME ZONE",
}

EARLIEST_PLAUSIBLE = datetime(1900, 1, 1, tzinfo=UTC)
MEASUREMENT_TABLE = "measurement"
# Sensor value glitches happen; like DQD's plausible-value checks, 1% of a concept's rows may fail before the check
# does (the rows are flagged for quarantine either way). Every other check allows none.
VALUE_RANGE_THRESHOLD_PCT = 1.0
# Sensor clocks jitter by seconds around the nominal interval, so only a reading closer than half an interval to the
# previous one is certainly a second reading in the same slot (a duplicate, a replayed or merged export).
CADENCE_TOLERANCE = 0.5


def harmonized_checks(*, export_time_utc: datetime, sensor_interval_min: int | None) -> list[Check]:
    """The harmonized-layer contract for all tables of data_contracts.schema, built from the schema.

    Required -> not null, key -> unique, concept ids -> in the vocabulary's set, unit_concept_id -> the concept's
    canonical unit, value -> plausible range per measurement concept (one check per concept, via row_condition on
    measurement_concept_id), datetimes -> not after export_time_utc and not before 1900, nor before the person's
    year of birth; end not before start; with a sensor interval, CGM readings not closer than the sensor allows.
    """
    if export_time_utc.tzinfo is None:
        raise ValueError(f"export_time_utc must be timezone-aware, got naive {export_time_utc.isoformat()}")
    export = export_time_utc.astimezone(UTC)
    checks: list[Check] = []
    for table in TABLES.values():
        checks += _conformance_checks(table)
        checks += _completeness_checks(table)
        checks += _plausibility_checks(table, export)
    if sensor_interval_min is not None:
        checks.append(_cgm_cadence_check(sensor_interval_min))
    duplicates = sorted({c.name for c in checks if [d.name for d in checks].count(c.name) > 1})
    if duplicates:
        raise ValueError(f"check names must be unique: {duplicates}")
    return checks


def _conformance_checks(table: Table) -> list[Check]:
    checks = [_datatype_check(table), _unique_key_check(table)]
    for column in table.columns:
        if column.required and _presence_kind(column.name) is None:
            checks.append(
                Check(
                    f"{table.name}.{column.name}.required",
                    table.name,
                    "conformance",
                    "ExpectColumnValuesToNotBeNull",
                    {"column": column.name},
                    0.0,
                    f"{table.name}.{column.name} is required ({column.description})",
                )
            )
        if column.name.endswith("_concept_id") and column.name != "unit_concept_id":
            checks.append(_valid_concept_check(table, column.name))
    if "unit_concept_id" in table.column_names:
        checks += _canonical_unit_checks(table)
    return checks


def _datatype_check(table: Table) -> Check:
    expected = {c.name: DUCKDB_TYPE_NAMES[c.dtype] for c in table.columns}
    mismatch = " OR ".join(f"typeof({_quoted(name)}) <> '{type_name}'" for name, type_name in expected.items())
    return Check(
        f"{table.name}.datatype",
        table.name,
        "conformance",
        ROW_QUERY_EXPECTATION,
        # typeof() is constant per column, so DuckDB folds this query: it costs nothing whatever the row count.
        {"unexpected_rows_query": f"SELECT * FROM {{batch}} WHERE {mismatch}"},
        0.0,
        f"{table.name} columns must have their contract types: "
        + ", ".join(f"{name} {type_name}" for name, type_name in expected.items()),
    )


def _unique_key_check(table: Table) -> Check:
    return Check(
        f"{table.name}.{table.key}.unique",
        table.name,
        "conformance",
        "ExpectColumnValuesToBeUnique",
        {"column": table.key},
        0.0,
        f"{table.name}.{table.key} is the primary key and must be unique",
    )


def _valid_concept_check(table: Table, column: str) -> Check:
    qualified = f"{table.name}.{column}"
    if qualified not in CONCEPT_SETS:
        raise ValueError(f"{qualified}: no concept set declared in data_contracts.contracts.CONCEPT_SETS")
    concepts = list(CONCEPT_SETS[qualified])
    return Check(
        f"{qualified}.valid_concept",
        table.name,
        "conformance",
        "ExpectColumnValuesToBeInSet",
        {"column": column, "value_set": concepts},
        0.0,
        f"{qualified} must be a concept the vocabulary defines for it: {concepts}",
    )


def _canonical_unit_checks(table: Table) -> list[Check]:
    if table.name not in UNIT_RULES:
        raise ValueError(f"{table.name}.unit_concept_id: no unit rules declared in data_contracts.contracts.UNIT_RULES")
    concept_column, rules = UNIT_RULES[table.name]
    return [
        Check(
            f"{table.name}.unit_concept_id.canonical_unit.{rule.key}",
            table.name,
            "conformance",
            "ExpectColumnValuesToBeInSet",
            {
                "column": "unit_concept_id",
                "value_set": [rule.unit_concept_id],
                "row_condition": Column(concept_column) == rule.concept_id,
            },
            0.0,
            f"{table.name} rows of {rule.key} ({concept_column} {rule.concept_id}) must be in its canonical unit "
            f"{rule.unit} (unit_concept_id {rule.unit_concept_id})",
        )
        for rule in rules
    ]


def _presence_kind(column: str) -> str | None:
    """What a required column carries when its presence is a completeness question (DQD), else None."""
    if column == "unit_concept_id":
        return "unit"
    if column.endswith("_concept_id"):
        return "concept"
    if column in ("value_as_number", "quantity"):
        return "value"
    if column.endswith("_source_value"):
        return "source value"
    return None


def _completeness_checks(table: Table) -> list[Check]:
    checks = []
    for column in table.columns:
        kind = _presence_kind(column.name)
        if column.required and kind is not None:
            checks.append(
                Check(
                    f"{table.name}.{column.name}.present",
                    table.name,
                    "completeness",
                    "ExpectColumnValuesToNotBeNull",
                    {"column": column.name},
                    0.0,
                    f"{table.name}.{column.name} must be present: the row's {kind} ({column.description})",
                )
            )
    return checks


def _plausibility_checks(table: Table, export: datetime) -> list[Check]:
    checks = _value_range_checks(table)
    for column in table.columns:
        if column.dtype in (UTC_DATETIME, pl.Date()):
            checks.append(_temporal_check(table, column.name, column.dtype, export))
            if table.name != "person" and "person_id" in table.column_names:
                checks.append(_after_birth_check(table, column.name, column.dtype))
        if "_end_" in column.name and column.name.replace("_end_", "_start_") in table.column_names:
            checks.append(_end_after_start_check(table, column.name.replace("_end_", "_start_"), column.name))
    if table.name == "person":
        checks.append(_year_of_birth_check(export))
    if table.name == "drug_exposure":
        checks.append(
            Check("drug_exposure.quantity.plausible_range", table.name, "plausibility", "ExpectColumnValuesToBeBetween",
                  {"column": "quantity", "min_value": 0.0, "max_value": MAX_INSULIN_U}, 0.0,
                  f"insulin delivered in one record must lie within 0..{MAX_INSULIN_U:g} U")
        )  # fmt: skip
    return checks


def _value_range_checks(table: Table) -> list[Check]:
    if table.name not in UNIT_RULES:
        return []
    concept_column, rules = UNIT_RULES[table.name]
    return [
        Check(
            f"{table.name}.value_as_number.plausible_range.{rule.key}",
            table.name,
            "plausibility",
            "ExpectColumnValuesToBeBetween",
            {
                "column": "value_as_number",
                "min_value": rule.low,
                "max_value": rule.high,
                # Only rows in the canonical unit: a wrong or missing unit is reported by its own check, not here too.
                "row_condition": (Column(concept_column) == rule.concept_id)
                & (Column("unit_concept_id") == rule.unit_concept_id),
            },
            VALUE_RANGE_THRESHOLD_PCT,
            f"{rule.key} must lie within {rule.low:g}..{rule.high:g} {rule.unit}",
        )
        for rule in rules
        if rule.low is not None and rule.high is not None
    ]


def _temporal_check(table: Table, column: str, dtype: pl.DataType, export: datetime) -> Check:
    low: date | datetime = EARLIEST_PLAUSIBLE
    high: date | datetime = export
    if dtype == pl.Date():
        low, high = EARLIEST_PLAUSIBLE.date(), export.date()
    return Check(
        f"{table.name}.{column}.temporal",
        table.name,
        "plausibility",
        "ExpectColumnValuesToBeBetween",
        {"column": column, "min_value": low, "max_value": high},
        0.0,
        f"{table.name}.{column} must lie between {low.isoformat()} and the site's export time {high.isoformat()}",
    )


def _after_birth_check(table: Table, column: str, dtype: pl.DataType) -> Check:
    # The JOIN keyword makes GX leave {batch} unaliased, so the query names it itself. A person appearing twice is
    # the person key check's failure; here the earliest birth year counts, so such a row is not reported twice.
    if dtype == pl.Date():
        value, birth = f"b.{_quoted(column)}", "make_date(p.year_of_birth, 1, 1)"
    else:
        # Instants in epoch ms: the comparison does not depend on the session's time zone.
        value, birth = f"epoch_ms(b.{_quoted(column)})", "epoch_ms(make_timestamp(p.year_of_birth, 1, 1, 0, 0, 0))"
    query = (
        "SELECT b.* FROM {batch} AS b "
        "JOIN (SELECT person_id, min(year_of_birth) AS year_of_birth FROM person GROUP BY person_id) AS p "
        f"ON b.person_id = p.person_id WHERE {value} < {birth}"
    )
    return Check(
        f"{table.name}.{column}.after_birth",
        table.name,
        "plausibility",
        ROW_QUERY_EXPECTATION,
        {"unexpected_rows_query": query},
        0.0,
        f"{table.name}.{column} must not be before the person's year of birth (person.year_of_birth)",
    )


def _end_after_start_check(table: Table, start: str, end: str) -> Check:
    return Check(
        f"{table.name}.{end}.after_start",
        table.name,
        "plausibility",
        "ExpectColumnPairValuesAToBeGreaterThanB",
        {"column_A": end, "column_B": start, "or_equal": True, "ignore_row_if": "either_value_is_missing"},
        0.0,
        f"{table.name}.{end} must not be before {start}",
    )


def _year_of_birth_check(export: datetime) -> Check:
    return Check(
        "person.year_of_birth.plausible_range",
        "person",
        "plausibility",
        "ExpectColumnValuesToBeBetween",
        {"column": "year_of_birth", "min_value": EARLIEST_PLAUSIBLE.year, "max_value": export.year},
        0.0,
        f"person.year_of_birth must lie between {EARLIEST_PLAUSIBLE.year} and the export year {export.year}",
    )


def _cgm_cadence_check(sensor_interval_min: int) -> Check:
    if sensor_interval_min <= 0:
        raise ValueError(f"sensor_interval_min must be positive, got {sensor_interval_min}")
    cgm = v.MEASUREMENTS["cgm_glucose"].concept_id
    min_gap_ms = round(sensor_interval_min * CADENCE_TOLERANCE * 60_000)
    # The window runs on (person, epoch ms) only and the flagged readings are joined back, which keeps the sort
    # narrow; DISTINCT keeps a reading joined once however many earlier readings crowd it.
    query = (
        "SELECT b.* FROM {batch} AS b JOIN ("
        "SELECT DISTINCT person_id, reading_ms FROM ("
        "SELECT person_id, epoch_ms(measurement_datetime) AS reading_ms, "
        "epoch_ms(measurement_datetime) - lag(epoch_ms(measurement_datetime)) "
        "OVER (PARTITION BY person_id ORDER BY measurement_datetime) AS gap_ms "
        f"FROM {{batch}} WHERE measurement_concept_id = {cgm}) AS readings WHERE gap_ms < {min_gap_ms}"
        ") AS crowded ON b.person_id = crowded.person_id AND epoch_ms(b.measurement_datetime) = crowded.reading_ms "
        f"WHERE b.measurement_concept_id = {cgm}"
    )
    return Check(
        "measurement.measurement_datetime.cgm_cadence",
        "measurement",
        "plausibility",
        ROW_QUERY_EXPECTATION,
        {"unexpected_rows_query": query},
        0.0,
        f"CGM readings of one person must be at least {min_gap_ms / 60_000:g} min apart "
        f"(half the sensor's {sensor_interval_min}-min interval)",
    )


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def export_window_check(
    export: datetime, lookback_days: int, table: str = MEASUREMENT_TABLE, column: str = "measurement_datetime"
) -> Check:
    """Device and EHR rows of a drop must fall in the export's look-back window (catches clock resets)."""
    start = export - timedelta(days=lookback_days)
    return Check(
        f"{table}.{column}.in_export_window",
        table,
        "plausibility",
        "ExpectColumnValuesToBeBetween",
        {"column": column, "min_value": start, "max_value": export},
        0.0,
        f"{column} must lie in the drop's window: {lookback_days} days before the export to the export",
    )
