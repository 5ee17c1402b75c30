"""The data contracts: built from the schema, GX and the row-level flags agree, Data Docs carry no patient values."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from great_expectations.expectations.row_conditions import Column as GxColumn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts import vocabulary as v
from data_contracts.contracts import MAP_EXPECTATIONS, Check, harmonized_checks
from data_contracts.gx_runner import FAILED_CHECKS, ROW_INDEX, ContractRun, run_contract
from data_contracts.schema import MEASUREMENT, TABLES, UTC_DATETIME

# Sub-millisecond on purpose: the bound must be compared at DuckDB's microsecond precision on both sides.
EXPORT = datetime(2026, 4, 7, 6, 0, 0, 500, tzinfo=UTC)
SENSOR_INTERVAL_MIN = 5
CHECKS = harmonized_checks(export_time_utc=EXPORT, sensor_interval_min=SENSOR_INTERVAL_MIN)
MEASUREMENT_CHECKS = [c for c in CHECKS if c.table == "measurement"]
CGM = v.MEASUREMENTS["cgm_glucose"]
HBA1C = v.MEASUREMENTS["hba1c"]
WEIGHT = v.MEASUREMENTS["weight"]
FIRST_READING = datetime(2026, 4, 6, tzinfo=UTC)
BIRTH_YEARS = {1: 2010, 2: 1985, 3: 1990}

# Values planted in the batch that must never reach the Data Docs.
OUT_OF_RANGE_GLUCOSE = 1234.5
PLANTED_SOURCE_RECORD = "drop/northbridge/cgm-7781.csv#L4711"
PLANTED_PSEUDONYM = "pseudo-3f9a71c2"


def _cgm_id(person: int, reading: int) -> int:
    return 1000 + (person - 1) * 12 + reading


def _measurements() -> pl.DataFrame:
    rows = [
        (_cgm_id(p, i), p, CGM.concept_id, FIRST_READING + timedelta(minutes=5 * i), 100.0 + i, CGM.unit_concept_id)
        for p in (1, 2, 3)
        for i in range(12)
    ]
    rows += [
        (1040, 2, HBA1C.concept_id, datetime(2026, 4, 1, 9, tzinfo=UTC), 7.1, HBA1C.unit_concept_id),
        (1041, 3, WEIGHT.concept_id, datetime(2026, 4, 1, 9, tzinfo=UTC), 70.0, WEIGHT.unit_concept_id),
    ]
    ids, persons, concepts, times, values, units = zip(*rows, strict=True)
    return MEASUREMENT.conform(
        pl.DataFrame(
            {
                "measurement_id": ids,
                "person_id": persons,
                "measurement_concept_id": concepts,
                "measurement_datetime": times,
                "value_as_number": values,
                "unit_concept_id": units,
                "measurement_type_concept_id": [v.TYPE_DEVICE] * len(rows),
                "measurement_source_value": ["99504-3"] * len(rows),
                "unit_source_value": ["mg/dL"] * len(rows),
                "value_source_value": [str(x) for x in values],
                "source_record": [f"cgm.csv:{i}" for i in ids],
            }
        )
    )


def _conform(name: str, columns: dict[str, list[object]]) -> pl.DataFrame:
    return TABLES[name].conform(pl.DataFrame(columns))


def clean_batch() -> dict[str, pl.DataFrame]:
    """A small harmonized batch of every table that passes every check."""
    start, end = datetime(2026, 4, 6, 7, tzinfo=UTC), datetime(2026, 4, 6, 8, tzinfo=UTC)
    return {
        "person": _conform(
            "person",
            {
                "person_id": [1, 2, 3],
                "gender_concept_id": [8507, 8532, 0],
                "year_of_birth": [BIRTH_YEARS[p] for p in (1, 2, 3)],
                "person_source_value": ["pseudo-1", "pseudo-2", PLANTED_PSEUDONYM],
                "gender_source_value": ["M", "F", None],
            },
        ),
        "observation_period": _conform(
            "observation_period",
            {
                "observation_period_id": [1, 2, 3],
                "person_id": [1, 2, 3],
                "observation_period_start_date": [date(2026, 3, 23)] * 3,
                "observation_period_end_date": [date(2026, 4, 6)] * 3,
                "period_type_concept_id": [v.TYPE_DEVICE] * 3,
            },
        ),
        "measurement": _measurements(),
        "drug_exposure": _conform(
            "drug_exposure",
            {
                "drug_exposure_id": [1, 2],
                "person_id": [1, 2],
                "drug_concept_id": [v.INSULIN_ASPART] * 2,
                "drug_exposure_start_datetime": [start, start],
                "drug_exposure_end_datetime": [end, start],
                "quantity": [0.9, 4.5],
                "drug_type_concept_id": [v.TYPE_DEVICE] * 2,
                "drug_source_value": ["basal", "bolus"],
                "route_source_value": ["subcutaneous"] * 2,
                "source_record": ["pump.csv:1", "pump.csv:2"],
            },
        ),
        "device_exposure": _conform(
            "device_exposure",
            {
                "device_exposure_id": [1, 2],
                "person_id": [1, 1],
                "device_concept_id": [v.CGM_DEVICE, v.INSULIN_PUMP],
                "device_exposure_start_datetime": [start, None],
                "device_exposure_end_datetime": [end, None],
                "device_type_concept_id": [v.TYPE_DEVICE] * 2,
                "unique_device_id": ["dev-a", "dev-b"],
                "device_source_value": ["Dexcom G6", "Insulet Omnipod"],
            },
        ),
        "observation": _conform(
            "observation",
            {
                "observation_id": [1, 2],
                "person_id": [1, 2],
                "observation_concept_id": [v.CARBOHYDRATE_INTAKE, v.BOLUS_CARB_INPUT],
                "observation_datetime": [start, end],
                "value_as_number": [45.0, 30.0],
                "unit_concept_id": [v.UNIT_CONCEPTS["g"]] * 2,
                "observation_type_concept_id": [v.TYPE_PATIENT_REPORTED, v.TYPE_DEVICE],
                "observation_source_value": ["meal_carbs_g", "bolus_carbs_g"],
                "source_record": ["meals.csv:1", "pump.csv:3"],
            },
        ),
        "condition_occurrence": _conform(
            "condition_occurrence",
            {
                "condition_occurrence_id": [1, 2, 3],
                "person_id": [1, 2, 3],
                "condition_concept_id": [v.TYPE_1_DIABETES] * 3,
                "condition_start_date": [date(2015, 5, 1), date(2001, 2, 3), date(2020, 1, 1)],
                "condition_type_concept_id": [v.TYPE_EHR] * 3,
                "condition_source_value": ["E10.9"] * 3,
                "source_record": ["dx.csv:1", "dx.csv:2", "dx.csv:3"],
            },
        ),
        "image_occurrence": _conform(
            "image_occurrence",
            {
                "image_occurrence_id": [1],
                "person_id": [3],
                "image_occurrence_date": [date(2026, 3, 30)],
                "image_study_uid": ["2.25.1"],
                "image_series_uid": ["2.25.2"],
                "modality_source_value": ["CT"],
                "local_path": ["series/1"],
            },
        ),
        "image_feature": _conform(
            "image_feature",
            {
                "image_feature_id": [1, 2],
                "person_id": [3, 3],
                "image_occurrence_id": [1, 1],
                "image_feature_concept_id": [
                    v.IMAGE_FEATURES["visceral_fat_area_cm2"][0],
                    v.IMAGE_FEATURES["muscle_attenuation_hu"][0],
                ],
                "value_as_number": [120.0, 35.0],
                "unit_concept_id": [v.UNIT_CONCEPTS["cm2"], v.UNIT_CONCEPTS["[hnsf'U]"]],
                "alg_system": ["l3seg 1.2"] * 2,
                "alg_datetime": [start, start],
                "image_feature_source_value": ["visceral_fat_area_cm2", "muscle_attenuation_hu"],
            },
        ),
    }


def _set(frame: pl.DataFrame, measurement_id: int, **values: object) -> pl.DataFrame:
    hit = pl.col("measurement_id") == measurement_id
    return frame.with_columns(
        pl.when(hit).then(pl.lit(value, dtype=frame.schema[name])).otherwise(pl.col(name)).alias(name)
        for name, value in values.items()
    )


def planted_batch() -> tuple[dict[str, pl.DataFrame], dict[tuple[str, int], set[str]]]:
    """The clean batch with one violation per kind planted, and the (table, row) -> check names each must raise."""
    batch = clean_batch()
    m = batch["measurement"]
    m = _set(m, _cgm_id(1, 0), measurement_datetime=datetime(2000, 1, 1, tzinfo=UTC))  # sensor clock reset
    m = _set(m, _cgm_id(1, 1), source_record=None)
    m = _set(m, _cgm_id(2, 1), measurement_concept_id=999)
    m = _set(m, _cgm_id(2, 3), unit_concept_id=v.UNIT_CONCEPTS["mmol/L"], value_as_number=6.1)
    m = _set(m, _cgm_id(2, 5), value_as_number=OUT_OF_RANGE_GLUCOSE, value_source_value=str(OUT_OF_RANGE_GLUCOSE))
    m = _set(m, _cgm_id(2, 5), source_record=PLANTED_SOURCE_RECORD)
    m = _set(m, _cgm_id(2, 8), unit_concept_id=None)
    m = _set(m, _cgm_id(3, 11), measurement_datetime=EXPORT + timedelta(days=1))
    crowding = m.filter(pl.col("measurement_id") == _cgm_id(1, 5)).with_columns(
        measurement_id=pl.lit(1100, dtype=pl.Int64()),
        measurement_datetime=pl.col("measurement_datetime") + timedelta(minutes=1),
    )
    duplicate = m.filter(pl.col("measurement_id") == 1040).with_columns(source_record=pl.lit("lab.csv:9"))
    batch["measurement"] = pl.concat([m, crowding, duplicate])
    drugs = batch["drug_exposure"]
    batch["drug_exposure"] = drugs.with_columns(
        drug_exposure_end_datetime=pl.when(pl.col("drug_exposure_id") == 2)
        .then(pl.col("drug_exposure_start_datetime") - timedelta(minutes=10))
        .otherwise(pl.col("drug_exposure_end_datetime"))
    )
    planted = {
        _cgm_id(1, 0): "measurement.measurement_datetime.after_birth",
        _cgm_id(1, 1): "measurement.source_record.required",
        _cgm_id(2, 1): "measurement.measurement_concept_id.valid_concept",
        _cgm_id(2, 3): "measurement.unit_concept_id.canonical_unit.cgm_glucose",
        _cgm_id(2, 5): "measurement.value_as_number.plausible_range.cgm_glucose",
        _cgm_id(2, 8): "measurement.unit_concept_id.present",
        _cgm_id(3, 11): "measurement.measurement_datetime.temporal",
        1100: "measurement.measurement_datetime.cgm_cadence",
        1040: "measurement.measurement_id.unique",
    }
    ids = batch["measurement"]["measurement_id"].to_list()
    expected = {("measurement", row): {planted[key]} for row, key in enumerate(ids) if key in planted}
    expected[("drug_exposure", 1)] = {"drug_exposure.drug_exposure_end_datetime.after_start"}
    return batch, expected


def flagged(run: ContractRun) -> dict[tuple[str, int], set[str]]:
    """The run's row flags as (table, row index) -> check names."""
    return {
        (table, row[ROW_INDEX]): set(row[FAILED_CHECKS])
        for table, frame in run.row_flags.items()
        for row in frame.iter_rows(named=True)
    }


def assert_flags_match_gx(run: ContractRun) -> None:
    """Every check that ran flags exactly as many rows as GX counts unexpected, and none could not run."""
    per_check: dict[str, int] = {}
    for frame in run.row_flags.values():
        for names in frame[FAILED_CHECKS].to_list():
            for name in names:
                per_check[name] = per_check.get(name, 0) + 1
    errors = {r.check.name: r.error for r in run.results if r.status == "IsError"}
    assert not errors
    for result in run.results:
        assert per_check.get(result.check.name, 0) == result.violating, result.check.name


def assert_statuses_follow_thresholds(run: ContractRun) -> None:
    """Each status follows from the counts and threshold, and GX's own verdict (via 'mostly') agrees."""
    for result in run.results:
        if result.status == "IsError":
            continue
        if result.rows == 0:
            assert result.status == "NotApplicable", result.check.name
            continue
        assert result.violating_pct == pytest.approx(100.0 * result.violating / result.rows)
        expected = "Failed" if result.violating_pct > result.check.threshold_pct else "Passed"
        assert result.status == expected, result.check.name
        assert result.gx_success == (expected == "Passed"), result.check.name


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ContractRun, dict, Path, Path]]:
    """One contract run (with Data Docs) over the planted batch, from an empty working directory and home."""
    batch, expected = planted_batch()
    workdir = tmp_path_factory.mktemp("planted")
    cwd, home = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("HOME", str(home))
        # Given relative (as `twinfed demo`'s default data folder is), yet outside cwd: GX needs it made absolute.
        relative = Path(os.path.relpath(workdir, cwd))
        run = run_contract(batch, CHECKS, site_id="northbridge", suite_name="harmonized", workdir=relative)
    yield run, expected, cwd, home


def test_harmonized_checks_cover_the_schema() -> None:
    """Every table and required column of the schema has its checks: not-null, key, concepts, units, ranges, times."""
    by_table: dict[str, list[Check]] = {}
    for check in CHECKS:
        by_table.setdefault(check.table, []).append(check)
    assert set(by_table) == set(TABLES)
    assert len({c.name for c in CHECKS}) == len(CHECKS)
    for table in TABLES.values():
        checks = by_table[table.name]
        null_checks = {c.kwargs["column"]: c for c in checks if c.expectation == "ExpectColumnValuesToNotBeNull"}
        assert set(null_checks) == {c.name for c in table.columns if c.required}
        assert {c.category for c in null_checks.values()} <= {"conformance", "completeness"}
        assert any(c.expectation == "ExpectColumnValuesToBeUnique" and c.kwargs["column"] == table.key for c in checks)
        assert any(c.name == f"{table.name}.datatype" for c in checks)
        for column in table.columns:
            if column.name.endswith("_concept_id"):
                assert any(
                    c.expectation == "ExpectColumnValuesToBeInSet" and c.kwargs["column"] == column.name for c in checks
                ), f"{table.name}.{column.name}"
            if column.dtype in (UTC_DATETIME, pl.Date()):
                assert f"{table.name}.{column.name}.temporal" in {c.name for c in checks}
    for concept in v.MEASUREMENTS.values():
        names = {c.name for c in by_table["measurement"]}
        assert f"measurement.value_as_number.plausible_range.{concept.key}" in names
        assert f"measurement.unit_concept_id.canonical_unit.{concept.key}" in names
    assert "measurement.measurement_datetime.cgm_cadence" in {c.name for c in CHECKS}
    assert not any("cadence" in c.name for c in harmonized_checks(export_time_utc=EXPORT, sensor_interval_min=None))


def test_planted_violations_are_flagged_exactly(planted_run: tuple[ContractRun, dict, Path, Path]) -> None:
    """Exactly the planted rows are flagged, by the right checks; counts equal GX's; statuses follow thresholds."""
    run, expected, _, _ = planted_run
    assert flagged(run) == expected
    assert_flags_match_gx(run)
    assert_statuses_follow_thresholds(run)
    failed = {r.check.name for r in run.results if r.status == "Failed"}
    assert failed == {name for names in expected.values() for name in names}
    key_of_duplicates = run.row_flags["measurement"].filter(
        pl.col(FAILED_CHECKS).list.contains("measurement.measurement_id.unique")
    )
    assert key_of_duplicates["measurement_id"].to_list() == [1040, 1040]


def test_missing_unit_is_a_completeness_failure_only(planted_run: tuple[ContractRun, dict, Path, Path]) -> None:
    """A missing unit is reported by the completeness check alone: not by the unit conformance or range checks."""
    run, _, _, _ = planted_run
    flags = run.row_flags["measurement"].filter(pl.col("measurement_id") == _cgm_id(2, 8))
    assert flags[FAILED_CHECKS].to_list() == [["measurement.unit_concept_id.present"]]
    results = {r.check.name: r for r in run.results}
    assert results["measurement.unit_concept_id.present"].check.category == "completeness"
    assert results["measurement.unit_concept_id.present"].violating == 1
    assert results["measurement.unit_concept_id.canonical_unit.cgm_glucose"].violating == 1  # the mmol/L row only


def test_is_error_and_not_applicable(tmp_path: Path) -> None:
    """A check on a missing column is IsError; an empty table, an absent table or an empty domain is NotApplicable."""
    batch = clean_batch()
    tables = {"measurement": batch["measurement"], "person": TABLES["person"].empty()}
    checks = [
        Check(
            "m.nope.required", "measurement", "conformance", "ExpectColumnValuesToNotBeNull", {"column": "nope"}, 0, "x"
        ),
        Check(
            "p.id.required", "person", "conformance", "ExpectColumnValuesToNotBeNull", {"column": "person_id"}, 0, "x"
        ),
        Check(
            "d.id.required",
            "drug_exposure",
            "conformance",
            "ExpectColumnValuesToNotBeNull",
            {"column": "person_id"},
            0,
            "x",
        ),
        Check(
            "m.hr.range",
            "measurement",
            "plausibility",
            "ExpectColumnValuesToBeBetween",
            {
                "column": "value_as_number",
                "min_value": 20,
                "max_value": 250,
                "row_condition": GxColumn("measurement_concept_id") == 3027018,
            },
            1.0,
            "x",
        ),
        # Half the CGM values are above 105: with a 60% threshold the check passes, yet each such row is flagged.
        Check(
            "m.cgm.tight",
            "measurement",
            "plausibility",
            "ExpectColumnValuesToBeBetween",
            {
                "column": "value_as_number",
                "max_value": 105,
                "row_condition": GxColumn("measurement_concept_id") == CGM.concept_id,
            },
            60.0,
            "CGM at most 105",
        ),
    ]
    run = run_contract(tables, checks, site_id="s", suite_name="h", workdir=tmp_path, build_docs=False)
    results = {r.check.name: r for r in run.results}
    assert results["m.nope.required"].status == "IsError"
    assert "nope" in (results["m.nope.required"].error or "")
    assert results["p.id.required"].status == "NotApplicable"
    assert results["d.id.required"].status == "NotApplicable"
    assert results["m.hr.range"].status == "NotApplicable"
    tight = results["m.cgm.tight"]
    assert (tight.status, tight.gx_success, tight.violating) == ("Passed", True, 3 * 6)
    assert run.row_flags["measurement"].height == 18
    assert run.row_flags["person"].is_empty()


def test_data_docs_have_counts_but_no_data_values(planted_run: tuple[ContractRun, dict, Path, Path]) -> None:
    """Data Docs exist under the workdir and carry counts, never a planted value; GX wrote nothing outside workdir."""
    run, _, cwd, home = planted_run
    assert run.data_docs_index is not None and run.data_docs_index.is_file()
    docs = run.data_docs_index.parent
    text = "\n".join(p.read_text(errors="replace") for p in docs.rglob("*") if p.suffix in (".html", ".json", ".js"))
    assert "unexpected" in text and "must lie within" in text
    for value in (str(OUT_OF_RANGE_GLUCOSE), PLANTED_SOURCE_RECORD, PLANTED_PSEUDONYM, "cgm.csv:1002", "lab.csv:9"):
        assert value not in text, value
    assert not any(cwd.iterdir()) and not any(home.iterdir())


_INSTANTS = [
    None,
    datetime(1899, 12, 31, 23, 59, tzinfo=UTC),
    datetime(1995, 6, 1, tzinfo=UTC),  # before person 1's birth year, after the others'
    FIRST_READING,
    FIRST_READING + timedelta(minutes=1),
    FIRST_READING + timedelta(minutes=2, seconds=29, milliseconds=999),
    FIRST_READING + timedelta(minutes=5),
    EXPORT.replace(microsecond=0),
    EXPORT.replace(microsecond=1000),
]
_VALUES = [None, math.nan, 5.5, CGM.plausible_low - 0.01, CGM.plausible_low, 100.0, CGM.plausible_high,
           CGM.plausible_high + 0.01, 7.1, OUT_OF_RANGE_GLUCOSE]  # fmt: skip
_UNITS = [None, CGM.unit_concept_id, HBA1C.unit_concept_id, v.UNIT_CONCEPTS["mmol/L"]]
_CONCEPTS = [None, CGM.concept_id, CGM.concept_id, HBA1C.concept_id, 999]
_measurement_rows = st.lists(
    st.tuples(
        st.sampled_from([None, 1, 2, 3, 4, 5, 6]),  # measurement_id: duplicates and nulls are likely
        st.sampled_from([None, 1, 2, 3, 9]),  # person 9 has no person row
        st.sampled_from(_CONCEPTS),
        st.sampled_from(_INSTANTS),
        st.sampled_from(_VALUES),
        st.sampled_from(_UNITS),
        st.sampled_from([None, "99504-3"]),
    ),
    max_size=30,
)


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(rows=_measurement_rows)
def test_row_flags_equal_gx_counts_on_random_batches(rows: list[tuple], tmp_path: Path) -> None:
    """For random measurement batches, each check flags exactly as many rows as GX counts unexpected."""
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(7)]
    ids, persons, concepts, times, values, units, sources = columns
    frame = MEASUREMENT.conform(
        pl.DataFrame(
            {
                "measurement_id": pl.Series(ids, dtype=pl.Int64()),
                "person_id": pl.Series(persons, dtype=pl.Int64()),
                "measurement_concept_id": pl.Series(concepts, dtype=pl.Int32()),
                "measurement_datetime": pl.Series(times, dtype=UTC_DATETIME),
                "value_as_number": pl.Series(values, dtype=pl.Float64()),
                "unit_concept_id": pl.Series(units, dtype=pl.Int32()),
                "measurement_type_concept_id": pl.Series([v.TYPE_DEVICE] * len(rows), dtype=pl.Int32()),
                "measurement_source_value": pl.Series(sources, dtype=pl.String()),
                "unit_source_value": pl.Series(["mg/dL"] * len(rows), dtype=pl.String()),
                "value_source_value": pl.Series(["x"] * len(rows), dtype=pl.String()),
                "source_record": pl.Series(sources, dtype=pl.String()),
            }
        )
    )
    tables = {"measurement": frame, "person": clean_batch()["person"]}  # person: for the birth-year check
    run = run_contract(tables, MEASUREMENT_CHECKS, site_id="s", suite_name="h", workdir=tmp_path, build_docs=False)
    assert_flags_match_gx(run)
    assert_statuses_follow_thresholds(run)


def _raw_checks() -> list[Check]:
    """Checks on a raw-layer table using every supported expectation, bound option and row-condition operator."""
    a, b, s, t = GxColumn("a"), GxColumn("b"), GxColumn("s"), GxColumn("t")
    instant = datetime(2026, 4, 6, 12, 0, 0, 500, tzinfo=UTC)
    declared: list[tuple[str, dict[str, object]]] = [
        ("ExpectColumnValuesToNotBeNull", {"column": "a", "row_condition": s.is_not_null()}),
        ("ExpectColumnValuesToBeNull", {"column": "s", "row_condition": a > 3}),
        ("ExpectColumnValuesToBeInSet", {"column": "s", "value_set": ["x", "y"], "row_condition": a != 1.5}),
        ("ExpectColumnValuesToNotBeInSet", {"column": "id", "value_set": [1, 2], "row_condition": s.is_in(["x", "z"])}),
        ("ExpectColumnValuesToBeInSet", {"column": "b", "value_set": [0, 1.5, 2], "row_condition": s.is_not_in(["y"])}),
        ("ExpectColumnValuesToBeBetween", {"column": "a", "min_value": 0, "max_value": 10, "strict_min": True}),
        ("ExpectColumnValuesToBeBetween", {"column": "b", "max_value": 2, "strict_max": True, "row_condition": a <= 5}),
        ("ExpectColumnValuesToBeBetween", {"column": "a", "min_value": 1.5, "row_condition": (b >= 0) & (a < 9)}),
        (
            "ExpectColumnValuesToBeBetween",
            {"column": "t", "min_value": instant, "max_value": instant + timedelta(hours=1)},
        ),
        (
            "ExpectColumnValuesToBeBetween",
            {"column": "d", "min_value": date(2026, 4, 6), "max_value": date(2026, 4, 7)},
        ),
        ("ExpectColumnValuesToBeUnique", {"column": "id", "row_condition": (a > 0) | s.is_null()}),
        ("ExpectColumnValuesToBeUnique", {"column": "a"}),
        (
            "ExpectColumnPairValuesAToBeGreaterThanB",
            {"column_A": "t2", "column_B": "t", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
        ),
        (
            "ExpectColumnPairValuesAToBeGreaterThanB",
            {"column_A": "b", "column_B": "a", "ignore_row_if": "either_value_is_missing"},
        ),
        ("UnexpectedRowsExpectation", {"unexpected_rows_query": "SELECT * FROM {batch} WHERE a > b OR t > t2"}),
        ("ExpectColumnValuesToNotBeNull", {"column": "b", "row_condition": t == instant}),
    ]
    return [
        Check(
            f"raw.{i}.{name}", "raw", "conformance", name, kwargs, 0.0 if name.startswith("Unexpected") else 10.0, name
        )
        for i, (name, kwargs) in enumerate(declared)
    ]


_raw_rows = st.lists(
    st.tuples(
        st.sampled_from([None, 1, 2, 3]),
        st.sampled_from([None, math.nan, -1.0, 0.0, 1.5, 3.0, 10.0, 11.0]),
        st.sampled_from([None, math.nan, 0.0, 1.5, 2.0, 12.0]),
        st.sampled_from([None, "x", "y", "z"]),
        st.sampled_from([None, datetime(2026, 4, 6, 12, tzinfo=UTC), datetime(2026, 4, 6, 12, 0, 0, 1000, tzinfo=UTC)]),
        st.sampled_from([None, datetime(2026, 4, 6, 12, tzinfo=UTC), datetime(2026, 4, 6, 13, 0, 1, tzinfo=UTC)]),
        st.sampled_from([None, date(2026, 4, 5), date(2026, 4, 6), date(2026, 4, 8)]),
    ),
    max_size=25,
)


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(rows=_raw_rows)
def test_every_expectation_and_condition_flags_what_gx_counts(rows: list[tuple], tmp_path: Path) -> None:
    """On a random raw-layer table, every supported expectation and row-condition operator flags what GX counts."""
    names = ["id", "a", "b", "s", "t", "t2", "d"]
    dtypes = [pl.Int64(), pl.Float64(), pl.Float64(), pl.String(), UTC_DATETIME, UTC_DATETIME, pl.Date()]
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
    frame = pl.DataFrame([pl.Series(n, c, dtype=d) for n, c, d in zip(names, columns, dtypes, strict=True)])
    run = run_contract({"raw": frame}, _raw_checks(), site_id="s", suite_name="raw", workdir=tmp_path, build_docs=False)
    assert_flags_match_gx(run)
    assert_statuses_follow_thresholds(run)


def _cgm_frame(rows: int, patients: int = 100) -> pl.DataFrame:
    """`rows` clean CGM readings of `patients` people, every 5 minutes each."""
    index = np.arange(rows)
    return MEASUREMENT.conform(
        pl.DataFrame(
            {
                # Hash-like keys in no order, as the harmonized ids are: multiplying by an odd constant is a bijection.
                "measurement_id": (index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64),
                "person_id": index % patients + 1,
                "measurement_concept_id": np.full(rows, CGM.concept_id, dtype=np.int32),
                "measurement_datetime": pl.Series(
                    np.datetime64("2026-01-01T00:00:00", "ms") + (index // patients) * np.timedelta64(5, "m")
                ).dt.replace_time_zone("UTC"),
                "value_as_number": 40.0 + index % 360,
                "unit_concept_id": np.full(rows, CGM.unit_concept_id, dtype=np.int32),
                "measurement_type_concept_id": np.full(rows, v.TYPE_DEVICE, dtype=np.int32),
                "measurement_source_value": pl.repeat("99504-3", rows, eager=True),
                "unit_source_value": pl.repeat("mg/dL", rows, eager=True),
                "value_source_value": (40 + pl.Series(index) % 360).cast(pl.String()),
                "source_record": "cgm.csv:" + pl.Series(index).cast(pl.String()),
            }
        )
    )


def _timed_run(rows: int, workdir: Path) -> ContractRun:
    people = pl.DataFrame(
        {
            "person_id": np.arange(1, 101),
            "gender_concept_id": [8507] * 100,
            "year_of_birth": [1980] * 100,
            "person_source_value": [f"pseudo-{i}" for i in range(100)],
            "gender_source_value": ["M"] * 100,
        }
    )
    tables = {"measurement": _cgm_frame(rows), "person": TABLES["person"].conform(people)}
    export = datetime(2030, 1, 1, tzinfo=UTC)
    checks = harmonized_checks(export_time_utc=export, sensor_interval_min=SENSOR_INTERVAL_MIN)
    run = run_contract(tables, checks, site_id="bench", suite_name="harmonized", workdir=workdir, build_docs=False)
    print(
        f"\ncontract on {rows:,} measurement rows: {run.seconds:.2f} s total, GX {run.gx_seconds:.2f} s, "
        f"row flags {run.row_flag_seconds:.2f} s"
    )
    assert not [r.check.name for r in run.results if r.status not in ("Passed", "NotApplicable")]
    assert run.row_flags["measurement"].is_empty()
    return run


def test_timing_on_one_million_rows(tmp_path: Path) -> None:
    """A clean million-row measurement batch passes; the run time is printed, not asserted."""
    _timed_run(1_000_000, tmp_path)


@pytest.mark.slow
def test_timing_on_five_million_rows(tmp_path: Path) -> None:
    """A clean five-million-row measurement batch passes; the run time is printed, not asserted."""
    _timed_run(5_000_000, tmp_path)


def test_check_declarations_refuse_what_cannot_be_compiled() -> None:
    """A Check refuses expectations without a row-level predicate, string row conditions and thresholds GX ignores."""
    with pytest.raises(ValueError, match="m.x.*ExpectColumnValuesToMatchRegex"):
        Check(
            "m.x", "measurement", "conformance", "ExpectColumnValuesToMatchRegex", {"column": "a", "regex": "b"}, 0, "x"
        )
    with pytest.raises(ValueError, match="row_condition"):
        Check(
            "m.x",
            "measurement",
            "conformance",
            "ExpectColumnValuesToNotBeNull",
            {"column": "a", "row_condition": "a>1"},
            0,
            "x",
        )
    with pytest.raises(ValueError, match="threshold_pct must be 0"):
        query = {"unexpected_rows_query": "SELECT * FROM {batch}"}
        Check("m.x", "measurement", "plausibility", "UnexpectedRowsExpectation", query, 5.0, "x")
    with pytest.raises(ValueError, match="naive"):
        harmonized_checks(export_time_utc=datetime(2026, 1, 1), sensor_interval_min=5)
    assert all(c.expectation in MAP_EXPECTATIONS or c.is_row_query for c in CHECKS)
    assert os.environ["GX_ANALYTICS_ENABLED"] == "False"
