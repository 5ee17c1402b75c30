"""Training features: a regular 5-minute grid with gaps left null, exact insulin and carb totals, static rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from data_contracts import vocabulary as v
from data_contracts.schema import SCHEMA_VERSION, TABLES
from flows.features import (
    FEATURES_VERSION,
    GRID_COLUMNS,
    GRID_SCHEMA,
    STATIC_COLUMNS,
    STATIC_SCHEMA,
    FeatureSet,
    build_features,
    read_features,
    write_features,
)

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
BIN = timedelta(minutes=5)
CGM = v.MEASUREMENTS["cgm_glucose"].concept_id
WEIGHT, HEIGHT, HBA1C = (v.MEASUREMENTS[k].concept_id for k in ("weight", "height", "hba1c"))
IMAGE = {name: concept_id for name, (concept_id, _) in v.IMAGE_FEATURES.items()}
INPUT_TABLES = ("person", "measurement", "drug_exposure", "observation", "image_feature")


def at(minutes: float) -> datetime:
    """T0 plus `minutes`."""
    return T0 + timedelta(minutes=minutes)


def table(name: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> pl.DataFrame:
    """A harmonized table in the schema's exact shape: `rows` for `columns`, sequential keys, nulls elsewhere."""
    schema = TABLES[name].polars_schema
    given_frame = pl.DataFrame(list(rows), schema={c: schema[c] for c in columns}, orient="row")
    key = TABLES[name].key
    filled = given_frame.with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(key) if key not in columns else pl.col(key),
        *(pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in columns and c != key),
    )
    return TABLES[name].conform(filled)


def persons(*rows: tuple[int, int, int]) -> pl.DataFrame:
    """Person rows: (person_id, gender_concept_id, year_of_birth)."""
    return table("person", ["person_id", "gender_concept_id", "year_of_birth"], rows)


def measurements(*rows: tuple[int, int, datetime, float]) -> pl.DataFrame:
    """Measurement rows: (person_id, concept, when, value)."""
    columns = ["person_id", "measurement_concept_id", "measurement_datetime", "value_as_number"]
    return table("measurement", columns, rows)


def cgm(person_id: int, *readings: tuple[float, float]) -> list[tuple[int, int, datetime, float]]:
    """CGM measurement rows for one person from (minutes after T0, mg/dL)."""
    return [(person_id, CGM, at(minute), value) for minute, value in readings]


def drugs(*rows: tuple[int, str, datetime, datetime, float]) -> pl.DataFrame:
    """Drug exposure rows: (person_id, basal|bolus, start, end, units)."""
    columns = ["person_id", "drug_source_value", "drug_exposure_start_datetime", "drug_exposure_end_datetime"]
    return table("drug_exposure", [*columns, "quantity"], rows)


def carbs(*rows: tuple[int, int, datetime, float]) -> pl.DataFrame:
    """Observation rows: (person_id, carb concept, when, grams)."""
    columns = ["person_id", "observation_concept_id", "observation_datetime", "value_as_number"]
    return table("observation", columns, rows)


def images(*rows: tuple[int, int, datetime, float]) -> pl.DataFrame:
    """Image feature rows: (person_id, feature concept, alg_datetime, value)."""
    columns = ["person_id", "image_feature_concept_id", "alg_datetime", "value_as_number"]
    return table("image_feature", columns, rows)


def tables(**frames: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The input tables, empty where not given."""
    return {name: frames.get(name, TABLES[name].empty()) for name in INPUT_TABLES}


def test_grid_is_regular_with_gaps_null() -> None:
    """Every 5-minute bin between first and last reading is present once; a gap is null with count 0."""
    measurement = measurements(
        *cgm(2, (2, 200.0), (12, 210.0)),
        *cgm(1, (1, 100.0), (3, 110.0), (6, 120.0), (26, 130.0), (34, 140.0)),
        (1, WEIGHT, at(-600), 70.0),  # not CGM: must not stretch the grid
    )
    grid = build_features(tables(person=persons((1, 8507, 1980), (2, 8532, 1990)), measurement=measurement)).grid

    assert grid.schema == GRID_SCHEMA
    assert grid["person_id"].to_list() == [1] * 7 + [2] * 3
    one = grid.filter(pl.col("person_id") == 1)
    assert one["bin_start"].to_list() == [at(m) for m in range(0, 35, 5)]
    assert one["cgm_mg_dl"].to_list() == [105.0, 120.0, None, None, None, 130.0, 140.0]
    assert one["cgm_count"].to_list() == [2, 1, 0, 0, 0, 1, 1]
    assert grid.filter(pl.col("person_id") == 2)["cgm_mg_dl"].to_list() == [200.0, None, 210.0]
    steps = grid.select(pl.col("bin_start").diff().over("person_id").drop_nulls().unique())
    assert steps.to_series().to_list() == [BIN]
    assert not grid.select("person_id", "bin_start").is_duplicated().any()


def test_insulin_and_carbs_land_in_their_bins() -> None:
    """Basal is pro-rated by overlap minutes, boluses and both carb kinds sit in their bins, outside the span drops."""
    drug_exposure = drugs(
        (1, "basal", at(2), at(62), 1.2),  # 3, 11 x 5 and 2 minutes of 60
        (1, "basal", at(100), at(160), 0.6),  # straddles the span's end (125): 25 of 60 minutes inside
        (1, "basal", at(70), at(70), 0.3),  # zero length: all in its start bin
        (1, "basal", at(-60), at(0), 5.0),  # ends where the span starts: nothing inside
        (1, "bolus", at(47), at(47), 3.0),
        (1, "bolus", at(200), at(200), 9.0),  # after the span
        (2, "bolus", at(10), at(10), 4.0),  # person without CGM
    )
    observation = carbs(
        (1, v.CARBOHYDRATE_INTAKE, at(44), 40.0),
        (1, v.CARBOHYDRATE_INTAKE, at(44.5), 10.0),
        (1, v.BOLUS_CARB_INPUT, at(46), 30.0),
        (1, v.BOLUS_CARB_INPUT, at(-1), 99.0),  # before the span
    )
    grid = build_features(
        tables(
            measurement=measurements(*cgm(1, (0, 100.0), (120, 150.0))),
            drug_exposure=drug_exposure,
            observation=observation,
        )
    ).grid

    assert grid.height == 25 and set(grid["person_id"]) == {1}
    basal = dict(zip(grid["bin_start"], grid["basal_u"], strict=True))
    expected = {at(m): 0.0 for m in range(0, 125, 5)}
    expected[at(0)] = 1.2 * 3 / 60
    for m in range(5, 60, 5):
        expected[at(m)] = 1.2 * 5 / 60
    expected[at(60)] = 1.2 * 2 / 60
    expected[at(70)] += 0.3
    for m in range(100, 125, 5):
        expected[at(m)] += 0.6 * 5 / 60
    assert basal == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sum(1 for m in range(0, 65, 5) if basal[at(m)] > 0) == 13
    assert grid["basal_u"].sum() == pytest.approx(1.2 + 0.6 * 25 / 60 + 0.3, rel=1e-12)
    nonzero = grid.filter(pl.col("bolus_u") + pl.col("carbs_logged_g") + pl.col("carbs_bolus_g") > 0)
    assert nonzero.select("bin_start", "bolus_u", "carbs_logged_g", "carbs_bolus_g").rows() == [
        (at(40), 0.0, 50.0, 0.0),
        (at(45), 3.0, 0.0, 30.0),
    ]


def test_static_rows() -> None:
    """Latest body measurements and imaging per person, BMI, age, grid summaries; people without data get nulls."""
    measurement = measurements(
        *cgm(1, (0, 100.0), (5, 110.0), (15, 120.0)),  # 4 bins (0-20 min), 3 with a reading
        *cgm(2, (0, 90.0)),
        (1, WEIGHT, at(-10 * 1440), 72.0),  # latest weight, listed before the older one
        (1, WEIGHT, at(-100 * 1440), 70.0),
        (1, HEIGHT, at(-300 * 1440), 175.0),
        (1, HEIGHT, at(-200 * 1440), 180.0),
        (1, HBA1C, at(-30 * 1440), 6.8),
        (1, HBA1C, at(-90 * 1440), 7.1),
        (2, WEIGHT, at(-5 * 1440), 60.0),
    )
    image_feature = images(
        (1, IMAGE["visceral_fat_area_cm2"], at(-20 * 1440), 130.0),
        (1, IMAGE["visceral_fat_area_cm2"], at(-400 * 1440), 120.0),
        (1, IMAGE["subcutaneous_fat_area_cm2"], at(-20 * 1440), 200.0),
        (1, IMAGE["skeletal_muscle_area_cm2"], at(-20 * 1440), 150.0),
        (1, IMAGE["muscle_attenuation_hu"], at(-20 * 1440), 40.0),
    )
    features = build_features(
        tables(
            person=persons((3, 0, 2000), (1, 8507, 1980), (2, 8532, 1990)),
            measurement=measurement,
            drug_exposure=drugs((1, "bolus", at(1), at(1), 2.0)),
            observation=carbs((1, v.CARBOHYDRATE_INTAKE, at(2), 10.0), (1, v.BOLUS_CARB_INPUT, at(2), 50.0)),
            image_feature=image_feature,
        )
    )
    static = features.static
    assert static.schema == STATIC_SCHEMA
    assert static["person_id"].to_list() == [1, 2, 3]
    one, two, three = static.to_dicts()
    days = 20 / 1440
    assert one == pytest.approx(
        {
            "person_id": 1,
            "gender_concept_id": 8507,
            "year_of_birth": 1980,
            "age_years": 45,
            "weight_kg": 72.0,
            "height_cm": 180.0,
            "bmi": 72.0 / 1.8**2,
            "hba1c_percent": 6.8,
            "mean_daily_insulin_u": 2.0 / days,
            "mean_daily_carbs_g": 10.0 / days,
            "cgm_days": days,
            "cgm_coverage": 0.75,
            "visceral_fat_area_cm2": 130.0,
            "subcutaneous_fat_area_cm2": 200.0,
            "skeletal_muscle_area_cm2": 150.0,
            "muscle_attenuation_hu": 40.0,
        },
        rel=1e-12,
    )
    checked = ("age_years", "weight_kg", "height_cm", "bmi", "cgm_coverage")
    assert {name: two[name] for name in checked} == dict(zip(checked, (35, 60.0, None, None, 1.0), strict=True))
    assert all(two[name] is None for name in IMAGE)
    assert three["gender_concept_id"] == 0 and three["year_of_birth"] == 2000
    assert all(
        value is None
        for name, value in three.items()
        if name not in ("person_id", "gender_concept_id", "year_of_birth")
    )


def _small_features() -> FeatureSet:
    """A two-person feature set with both CGM and static values."""
    return build_features(
        tables(
            person=persons((1, 8507, 1980), (2, 8532, 1990)),
            measurement=measurements(*cgm(1, (0, 100.0), (22, 130.0)), (2, WEIGHT, at(0), 60.0)),
            drug_exposure=drugs((1, "basal", at(0), at(60), 1.0)),
        )
    )


def test_write_read_round_trip(tmp_path: Path) -> None:
    """What write_features writes reads back equal, features.json describes it, and a rewrite replaces it cleanly."""
    folder = tmp_path / "site" / "features"
    first = _small_features()
    paths = write_features(first, folder)

    assert {p.name for p in paths.values()} == {"grid.parquet", "static.parquet", "features.json"}
    back = read_features(folder)
    assert_frame_equal(back.grid, first.grid)
    assert_frame_equal(back.static, first.static)
    manifest = orjson.loads((folder / "features.json").read_bytes())
    assert manifest["features_version"] == FEATURES_VERSION and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["grid_columns"] == GRID_COLUMNS and list(manifest["grid_columns"]) == list(GRID_SCHEMA)
    assert manifest["static_columns"] == STATIC_COLUMNS and list(manifest["static_columns"]) == list(STATIC_SCHEMA)
    assert manifest["rows"] == {"grid": first.grid.height, "static": 2}

    second = FeatureSet(grid=first.grid.head(2), static=first.static.head(1))
    write_features(second, folder)
    again = read_features(folder)
    assert_frame_equal(again.grid, second.grid)
    assert_frame_equal(again.static, second.static)
    assert sorted(p.name for p in folder.iterdir()) == ["features.json", "grid.parquet", "static.parquet"]


def test_read_rejects_other_version(tmp_path: Path) -> None:
    """Features written by another features version are refused, naming the file."""
    write_features(_small_features(), tmp_path)
    manifest = orjson.loads((tmp_path / "features.json").read_bytes())
    (tmp_path / "features.json").write_bytes(orjson.dumps({**manifest, "features_version": "0.9.0"}))
    with pytest.raises(ValueError, match="features.json.*0.9.0"):
        read_features(tmp_path)


def test_empty_tables_give_typed_results() -> None:
    """With no events the grid is empty but typed, and every person still has a static row."""
    features = build_features(tables(person=persons((5, 8532, 1970), (4, 8507, 1960))))
    assert features.grid.is_empty() and features.grid.schema == GRID_SCHEMA
    assert features.static.schema == STATIC_SCHEMA
    assert features.static["person_id"].to_list() == [4, 5]
    derived = features.static.drop("person_id", "gender_concept_id", "year_of_birth")
    assert derived.null_count().row(0) == (2,) * derived.width

    nothing = build_features(tables())
    assert nothing.grid.schema == GRID_SCHEMA and nothing.static.schema == STATIC_SCHEMA
    assert nothing.grid.is_empty() and nothing.static.is_empty()


def test_missing_table_is_named() -> None:
    """A missing input table is named in the error."""
    incomplete = tables()
    del incomplete["observation"]
    with pytest.raises(KeyError, match="observation"):
        build_features(incomplete)


# Property test: event times in ms around a 10-hour window; CGM defines each person's span.
HOUR_MS = 3_600_000
BIN_MS = 300_000
event_ms = st.integers(-2 * HOUR_MS, 12 * HOUR_MS)
units = st.floats(0.0, 20.0, allow_nan=False)


@st.composite
def person_events(draw: st.DrawFn) -> dict[str, list]:
    """Random readings, boluses, carbs and basal periods of one person, all as epoch-offset milliseconds."""
    return {
        "readings": draw(st.lists(st.integers(0, 10 * HOUR_MS), max_size=40)),
        "boluses": draw(st.lists(st.tuples(event_ms, units), max_size=10)),
        "carbs": draw(
            st.lists(st.tuples(event_ms, st.sampled_from([v.CARBOHYDRATE_INTAKE, v.BOLUS_CARB_INPUT]), units))
        ),
        "basal": draw(st.lists(st.tuples(event_ms, st.integers(-HOUR_MS, 3 * HOUR_MS), units), max_size=15)),
    }


def _overlap(start: int, end: int, lo: int, hi: int) -> int:
    return max(0, min(end, hi) - max(start, lo))


@settings(max_examples=60, deadline=None)
@given(people=st.lists(person_events(), min_size=1, max_size=3), offset_ms=st.integers(0, 10 * 86_400_000))
def test_totals_inside_span_match_input(people: list[dict[str, list]], offset_ms: int) -> None:
    """Per person, grid totals of bolus, carbs and basal equal the input events' amounts inside the CGM span."""
    base = T0 + timedelta(milliseconds=offset_ms)

    def when(ms: int) -> datetime:
        return base + timedelta(milliseconds=ms)

    measurement_rows, drug_rows, carb_rows = [], [], []
    for pid, events in enumerate(people, start=1):
        measurement_rows += [(pid, CGM, when(ms), 100.0) for ms in events["readings"]]
        drug_rows += [(pid, "bolus", when(ms), when(ms), q) for ms, q in events["boluses"]]
        drug_rows += [(pid, "basal", when(ms), when(ms + length), q) for ms, length, q in events["basal"]]
        carb_rows += [(pid, concept, when(ms), g) for ms, concept, g in events["carbs"]]
    grid = build_features(
        tables(
            measurement=measurements(*measurement_rows), drug_exposure=drugs(*drug_rows), observation=carbs(*carb_rows)
        )
    ).grid

    base_ms = (base - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    for pid, events in enumerate(people, start=1):
        mine = grid.filter(pl.col("person_id") == pid)
        if not events["readings"]:
            assert mine.is_empty()
            continue
        lo = (base_ms + min(events["readings"])) // BIN_MS * BIN_MS - base_ms
        hi = (base_ms + max(events["readings"])) // BIN_MS * BIN_MS + BIN_MS - base_ms
        assert mine.height == (hi - lo) // BIN_MS
        assert mine["cgm_count"].sum() == len(events["readings"])
        inside = [(ms, q) for ms, q in events["boluses"] if lo <= ms < hi]
        assert mine["bolus_u"].sum() == pytest.approx(sum(q for _, q in inside), rel=1e-9, abs=1e-9)
        for concept, column in ((v.CARBOHYDRATE_INTAKE, "carbs_logged_g"), (v.BOLUS_CARB_INPUT, "carbs_bolus_g")):
            grams = sum(g for ms, c, g in events["carbs"] if c == concept and lo <= ms < hi)
            assert mine[column].sum() == pytest.approx(grams, rel=1e-9, abs=1e-9)
        basal = sum(
            q * _overlap(ms, ms + length, lo, hi) / length if length > 0 else (q if lo <= ms < hi else 0.0)
            for ms, length, q in events["basal"]
        )
        assert mine["basal_u"].sum() == pytest.approx(basal, rel=1e-9, abs=1e-9)
