"""Build a site's training features for the glucose twin from its harmonized OMOP-shaped tables.

The twin learns glucose dynamics on a regular time grid, so each patient's CGM, insulin and carbohydrate
records are put on 5-minute bins (`grid`), and the covariates that change slowly or not at all (sex,
age, body size, HbA1c, CT body composition, insulin and carbohydrate habits) go in one row per patient
(`static`). Both stay inside the site's folder; only model updates leave the site.

Rules the twin relies on:

- A patient's grid runs from the bin of their first CGM reading to the bin of their last, every bin
  present. Bins are floored to 5 minutes in UTC and hold what happened in [bin_start, bin_start + 5 min).
- A bin with no CGM reading has cgm_mg_dl null and cgm_count 0: sensor gaps are never interpolated, the
  model decides what to do with them.
- Insulin and carbohydrate outside a patient's CGM span are not on the grid (they have no glucose to
  explain); a basal period straddling either end contributes only its share inside the span.
- A basal period spreads its units over the bins it overlaps in proportion to the time it overlaps
  each, so per patient the grid's basal total equals the basal delivered within the span. A period
  whose end is not after its start (or is missing) delivers all its units in the bin of its start.
- `static` has exactly the persons of the person table, with nulls where they have no data; `grid` has
  the persons with CGM readings.
- Insulin rows are told apart by drug_source_value ("basal" or "bolus"); the harmonized contracts
  already restrict drug_concept_id to insulin, so it is not filtered again here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
import polars as pl

from data_contracts import vocabulary as v
from data_contracts.schema import SCHEMA_VERSION, TABLES, UTC_DATETIME
from flows.site_store import replace_atomically

GRID_MINUTES = 5
FEATURES_VERSION = "1.0.0"

BIN_MS = GRID_MINUTES * 60_000
MINUTES_PER_DAY = 24 * 60
CGM = v.MEASUREMENTS["cgm_glucose"].concept_id
# Static columns holding the latest value of a measurement: column -> measurement concept id.
LATEST_MEASUREMENTS: dict[str, int] = {
    "weight_kg": v.MEASUREMENTS["weight"].concept_id,
    "height_cm": v.MEASUREMENTS["height"].concept_id,
    "hba1c_percent": v.MEASUREMENTS["hba1c"].concept_id,
}
IMAGE_FEATURE_CONCEPTS: dict[str, int] = {name: concept_id for name, (concept_id, _) in v.IMAGE_FEATURES.items()}

# The harmonized columns the features are built from, per table.
COLUMNS_READ: dict[str, list[str]] = {
    "person": ["person_id", "gender_concept_id", "year_of_birth"],
    "measurement": ["person_id", "measurement_id", "measurement_concept_id", "measurement_datetime", "value_as_number"],
    "drug_exposure": [
        "person_id",
        "drug_source_value",
        "quantity",
        "drug_exposure_start_datetime",
        "drug_exposure_end_datetime",
    ],
    "observation": ["person_id", "observation_concept_id", "observation_datetime", "value_as_number"],
    "image_feature": ["person_id", "image_feature_id", "image_feature_concept_id", "value_as_number", "alg_datetime"],
}

GRID_FILE, STATIC_FILE, MANIFEST_FILE = "grid.parquet", "static.parquet", "features.json"

GRID_COLUMNS: dict[str, str] = {
    "person_id": "Pseudonymous person key",
    "bin_start": f"Bin start, UTC, floored to {GRID_MINUTES} min; the bin spans [bin_start, +{GRID_MINUTES} min)",
    "cgm_mg_dl": "Mean of the CGM readings in the bin, mg/dL; null when the bin has none (a gap, never interpolated)",
    "cgm_count": "Number of CGM readings in the bin",
    "basal_u": "Basal insulin delivered in the bin, units: each basal period pro-rated by the time it overlaps the bin",
    "bolus_u": "Bolus insulin, units: sum of the boluses given in the bin",
    "carbs_logged_g": "Carbohydrate the patient logged in the bin, grams (0 when none)",
    "carbs_bolus_g": "Carbohydrate entered into the pump's bolus wizard in the bin, grams (0 when none)",
}
GRID_SCHEMA = pl.Schema(
    {
        "person_id": pl.Int64(),
        "bin_start": UTC_DATETIME,
        "cgm_mg_dl": pl.Float64(),
        "cgm_count": pl.UInt32(),
        "basal_u": pl.Float64(),
        "bolus_u": pl.Float64(),
        "carbs_logged_g": pl.Float64(),
        "carbs_bolus_g": pl.Float64(),
    }
)

STATIC_COLUMNS: dict[str, str] = {
    "person_id": "Pseudonymous person key; every person of the person table has a row",
    "gender_concept_id": "8507 male, 8532 female, 0 unknown",
    "year_of_birth": "Year of birth",
    "age_years": "Calendar year of the first grid bin minus year of birth; null without CGM",
    "weight_kg": "Latest body weight, kg; null if never measured",
    "height_cm": "Latest body height, cm; null if never measured",
    "bmi": "weight_kg / (height_cm / 100)^2, kg/m2; null if either is missing",
    "hba1c_percent": "Latest HbA1c, % (NGSP); null if never measured",
    "mean_daily_insulin_u": "Basal plus bolus units on the grid divided by cgm_days; null without CGM",
    "mean_daily_carbs_g": "Logged carbohydrate grams on the grid divided by cgm_days; null without CGM",
    "cgm_days": f"Length of the grid span in days (number of bins x {GRID_MINUTES} min); null without CGM",
    "cgm_coverage": "Fraction of the grid's bins holding at least one CGM reading; null without CGM",
    "visceral_fat_area_cm2": "Visceral fat area at L3 on CT, cm2; latest by alg_datetime, null without imaging",
    "subcutaneous_fat_area_cm2": "Subcutaneous fat area at L3 on CT, cm2; latest by alg_datetime, null without imaging",
    "skeletal_muscle_area_cm2": "Skeletal muscle area at L3 on CT, cm2; latest by alg_datetime, null without imaging",
    "muscle_attenuation_hu": "Skeletal muscle attenuation at L3 on CT, HU; latest by alg_datetime, null if no imaging",
}
STATIC_SCHEMA = pl.Schema(
    {
        "person_id": pl.Int64(),
        "gender_concept_id": pl.Int32(),
        "year_of_birth": pl.Int32(),
        "age_years": pl.Int32(),
        **{name: pl.Float64() for name in list(STATIC_COLUMNS)[4:]},
    }
)


@dataclass(frozen=True)
class FeatureSet:
    """A site's training features: the 5-minute grid and the per-person covariates."""

    grid: pl.DataFrame  # one row per person per 5-minute bin, GRID_SCHEMA, sorted by person_id, bin_start
    static: pl.DataFrame  # one row per person, STATIC_SCHEMA, sorted by person_id


def build_features(tables: Mapping[str, pl.DataFrame]) -> FeatureSet:
    """Build the grid and static features from harmonized tables (person, measurement, drug_exposure, ...).

    Any table may be empty; the result is then empty but typed, and still has a static row per person.
    """
    measurement = _columns(tables, "measurement")
    grid = _grid(
        cgm=measurement.filter(pl.col("measurement_concept_id") == CGM),
        drugs=_columns(tables, "drug_exposure"),
        carbs=_columns(tables, "observation"),
    )
    static = _static(
        grid=grid,
        person=_columns(tables, "person").collect(),
        measurement=measurement.filter(pl.col("measurement_concept_id").is_in(list(LATEST_MEASUREMENTS.values()))),
        image_feature=_columns(tables, "image_feature"),
    )
    return FeatureSet(grid=grid, static=static)


def features_version(folder: Path) -> str | None:
    """A hash of the feature files' bytes (None if there are none): equal features, equal version, however built."""
    files = [folder / GRID_FILE, folder / STATIC_FILE]
    if not all(f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def write_features(features: FeatureSet, folder: Path) -> dict[str, Path]:
    """Write grid.parquet, static.parquet and features.json into `folder`, each atomically; return their paths.

    Each file is written under a temporary name in the same folder and renamed over the old one, so a
    reader never sees half a file. features.json goes last: it describes the Parquet files beside it.
    """
    _check_schema(features.grid, GRID_SCHEMA, "grid")
    _check_schema(features.static, STATIC_SCHEMA, "static")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "features_version": FEATURES_VERSION,
        "schema_version": SCHEMA_VERSION,
        "grid_minutes": GRID_MINUTES,
        "grid_columns": GRID_COLUMNS,
        "static_columns": STATIC_COLUMNS,
        "rows": {"grid": features.grid.height, "static": features.static.height},
    }
    paths = {"grid": folder / GRID_FILE, "static": folder / STATIC_FILE, "features": folder / MANIFEST_FILE}
    replace_atomically(paths["grid"], features.grid.write_parquet)
    replace_atomically(paths["static"], features.static.write_parquet)
    replace_atomically(paths["features"], lambda p: p.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2)))
    return paths


def read_features(folder: Path) -> FeatureSet:
    """Read what write_features wrote in `folder`, checking its features version and columns."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: no features manifest; build the site's features first")
    version = orjson.loads(manifest_path.read_bytes()).get("features_version")
    if version != FEATURES_VERSION:
        raise ValueError(f"{manifest_path}: features version {version!r}, expected {FEATURES_VERSION}; rebuild them")
    grid, static = pl.read_parquet(folder / GRID_FILE), pl.read_parquet(folder / STATIC_FILE)
    _check_schema(grid, GRID_SCHEMA, str(folder / GRID_FILE))
    _check_schema(static, STATIC_SCHEMA, str(folder / STATIC_FILE))
    return FeatureSet(grid=grid, static=static)


def _columns(tables: Mapping[str, pl.DataFrame], name: str) -> pl.LazyFrame:
    """The columns the features read from one harmonized table, cast to the schema's dtypes."""
    if name not in tables:
        raise KeyError(f"build_features needs the harmonized {name!r} table; got {sorted(tables)}")
    frame, columns = tables[name], COLUMNS_READ[name]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}; see data_contracts.schema.TABLES[{name!r}]")
    schema = TABLES[name].polars_schema
    return frame.lazy().select(pl.col(c).cast(schema[c]) for c in columns)


def _bin(column: str) -> pl.Expr:
    """Index of the grid bin holding a timestamp: epoch milliseconds floored to the bin width."""
    return pl.col(column).dt.epoch("ms") // BIN_MS


# Everything on the grid is keyed by one integer, its row: each person's bins are consecutive rows, so an event's
# row is its bin plus a per-person shift. Polars sorts and groups a single sorted Int64 many times faster than
# (person_id, bin), and the per-row results are scattered into the grid's columns instead of joined.
def _grid(*, cgm: pl.LazyFrame, drugs: pl.LazyFrame, carbs: pl.LazyFrame) -> pl.DataFrame:
    """Every bin of every person's CGM span, with glucose, insulin and carbohydrate per bin."""
    readings = cgm.filter(
        pl.col("person_id").is_not_null()
        & pl.col("measurement_datetime").is_not_null()
        & pl.col("value_as_number").is_not_null()
        & pl.col("value_as_number").is_not_nan()
    ).select("person_id", "value_as_number", bin=_bin("measurement_datetime"))
    spans = (
        readings.group_by("person_id")
        .agg(first_bin=pl.col("bin").min(), last_bin=pl.col("bin").max())
        .sort("person_id")
        .with_columns(bins=pl.col("last_bin") - pl.col("first_bin") + 1)
        .with_columns(first_row=pl.col("bins").cum_sum() - pl.col("bins"))
        .collect()
    )
    glucose = (
        _on_grid(readings, spans).group_by("row").agg(cgm_mg_dl=pl.col("value_as_number").mean(), cgm_count=pl.len())
    )
    boluses = drugs.filter(pl.col("drug_source_value") == "bolus").select(
        "person_id", "quantity", bin=_bin("drug_exposure_start_datetime")
    )
    bolus = _on_grid(boluses, spans).group_by("row").agg(bolus_u=pl.col("quantity").sum())
    grams, concept = pl.col("value_as_number"), pl.col("observation_concept_id")
    meals = carbs.filter(concept.is_in([v.CARBOHYDRATE_INTAKE, v.BOLUS_CARB_INPUT])).select(
        "person_id", "value_as_number", "observation_concept_id", bin=_bin("observation_datetime")
    )
    carbohydrate = (
        _on_grid(meals, spans)
        .group_by("row")
        .agg(
            carbs_logged_g=grams.filter(concept == v.CARBOHYDRATE_INTAKE).sum(),
            carbs_bolus_g=grams.filter(concept == v.BOLUS_CARB_INPUT).sum(),
        )
    )
    rows = int(spans["bins"].sum())
    return (
        spans.select("person_id", bin=pl.int_ranges("first_bin", pl.col("last_bin") + 1))
        .explode("bin")
        .select(
            "person_id",
            bin_start=(pl.col("bin") * BIN_MS).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
            cgm_mg_dl=_scatter(glucose, "cgm_mg_dl", rows, None),
            cgm_count=_scatter(glucose, "cgm_count", rows, 0),
            basal_u=_scatter(_basal(drugs, spans), "basal_u", rows, 0.0),
            bolus_u=_scatter(bolus, "bolus_u", rows, 0.0),
            carbs_logged_g=_scatter(carbohydrate, "carbs_logged_g", rows, 0.0),
            carbs_bolus_g=_scatter(carbohydrate, "carbs_bolus_g", rows, 0.0),
        )
        .cast(GRID_SCHEMA)
    )


SPAN_COLUMNS = ("first_bin", "last_bin", "bins", "first_row")


def _on_grid(events: pl.LazyFrame, spans: pl.DataFrame) -> pl.DataFrame:
    """Events with a `bin` column that fall inside their person's span, as their grid `row` sorted, and values."""
    return (
        events.join(spans.lazy(), on="person_id", how="inner")
        .filter(pl.col("bin").is_between("first_bin", "last_bin"))
        .select(
            pl.exclude("person_id", "bin", *SPAN_COLUMNS), row=pl.col("first_row") + pl.col("bin") - pl.col("first_bin")
        )
        .sort("row")  # the caller's group-by then takes polars' sorted-key path, ~10x faster on millions of rows
        .collect()
    )


def _scatter(per_row: pl.DataFrame, column: str, rows: int, fill: float | None) -> pl.Series:
    """A grid column of `rows` values: `per_row`'s value at each of its rows, `fill` elsewhere."""
    dense = pl.repeat(fill, rows, dtype=per_row.schema[column], eager=True)
    return dense.scatter(per_row["row"], per_row[column])


def _basal(drugs: pl.LazyFrame, spans: pl.DataFrame) -> pl.DataFrame:
    """Basal units per grid row: each period expanded to the bins it overlaps inside the span, weighted by overlap."""
    start, end = pl.col("start"), pl.col("end")
    instant = end <= start  # zero-length or reversed: all units in the start bin
    bin_start = pl.col("bin") * BIN_MS
    overlap = pl.min_horizontal(end, bin_start + BIN_MS) - pl.max_horizontal(start, bin_start)
    units = pl.col("quantity") * overlap.cast(pl.Float64) / (end - start).cast(pl.Float64)
    expanded = (
        drugs.filter((pl.col("drug_source_value") == "basal") & pl.col("drug_exposure_start_datetime").is_not_null())
        .select(
            "person_id",
            "quantity",
            start=pl.col("drug_exposure_start_datetime").dt.epoch("ms"),
            end=pl.coalesce("drug_exposure_end_datetime", "drug_exposure_start_datetime").dt.epoch("ms"),
        )
        .join(spans.lazy(), on="person_id", how="inner")
        # Clip to the span before expanding, so a long period costs only the bins that are on the grid.
        .with_columns(
            lo=pl.max_horizontal(start // BIN_MS, "first_bin"),
            hi=pl.min_horizontal(pl.when(instant).then(start).otherwise(end - 1) // BIN_MS, "last_bin"),
        )
        .filter(pl.col("lo") <= pl.col("hi"))
        .select("quantity", "start", "end", "first_bin", "first_row", bin=pl.int_ranges("lo", pl.col("hi") + 1))
        .explode("bin")
        .select(
            row=pl.col("first_row") + pl.col("bin") - pl.col("first_bin"),
            units=pl.when(instant).then(pl.col("quantity")).otherwise(units),
        )
        .sort("row")
        .collect()
    )
    return expanded.group_by("row").agg(basal_u=pl.col("units").sum())


def _static(
    *, grid: pl.DataFrame, person: pl.DataFrame, measurement: pl.LazyFrame, image_feature: pl.LazyFrame
) -> pl.DataFrame:
    """One row per person: demographics, latest body measurements and imaging, and summaries of the grid."""
    duplicated = person.filter(pl.col("person_id").is_duplicated())["person_id"].unique().sort()
    if not duplicated.is_empty():
        raise ValueError(f"person: person_id is not unique ({duplicated.head(5).to_list()} repeat)")
    spans = (
        grid.lazy()
        .group_by("person_id")
        .agg(
            first_bin=pl.col("bin_start").min(),
            bins=pl.len(),
            covered=(pl.col("cgm_count") > 0).sum(),
            insulin=(pl.col("basal_u") + pl.col("bolus_u")).sum(),
            carbs=pl.col("carbs_logged_g").sum(),
        )
        .with_columns(cgm_days=pl.col("bins") * GRID_MINUTES / MINUTES_PER_DAY)
    )
    latest_measurements = _latest_by_concept(
        measurement, "measurement_concept_id", ["measurement_datetime", "measurement_id"], LATEST_MEASUREMENTS
    )
    latest_images = _latest_by_concept(
        image_feature, "image_feature_concept_id", ["alg_datetime", "image_feature_id"], IMAGE_FEATURE_CONCEPTS
    )
    weight, height = pl.col("weight_kg"), pl.col("height_cm")
    return (
        person.lazy()
        .join(spans, on="person_id", how="left")
        .join(latest_measurements, on="person_id", how="left")
        .join(latest_images, on="person_id", how="left")
        .select(
            "person_id",
            "gender_concept_id",
            "year_of_birth",
            age_years=pl.col("first_bin").dt.year() - pl.col("year_of_birth"),
            weight_kg=weight,
            height_cm=height,
            bmi=weight / (height / 100.0) ** 2,
            hba1c_percent="hba1c_percent",
            mean_daily_insulin_u=pl.col("insulin") / pl.col("cgm_days"),
            mean_daily_carbs_g=pl.col("carbs") / pl.col("cgm_days"),
            cgm_days="cgm_days",
            cgm_coverage=pl.col("covered") / pl.col("bins"),
            **{name: name for name in IMAGE_FEATURE_CONCEPTS},
        )
        .sort("person_id")
        .collect()
        .cast(STATIC_SCHEMA)
    )


def _latest_by_concept(
    frame: pl.LazyFrame, concept_column: str, order: list[str], concepts: dict[str, int]
) -> pl.LazyFrame:
    """Per person, one column per concept holding its latest non-null value (by `order`; later id breaks ties)."""
    latest = (
        frame.filter(pl.col(concept_column).is_in(list(concepts.values())) & pl.col("value_as_number").is_not_null())
        .group_by("person_id", concept_column)
        .agg(value=pl.col("value_as_number").sort_by(order, nulls_last=False).last())
    )
    return latest.group_by("person_id").agg(
        **{name: pl.col("value").filter(pl.col(concept_column) == cid).first() for name, cid in concepts.items()}
    )


def _check_schema(frame: pl.DataFrame, expected: pl.Schema, what: str) -> None:
    """Raise naming `what` and the differing columns when `frame` does not have the expected schema."""
    if frame.schema != expected:
        differ = sorted(set(frame.schema.items()) ^ set(expected.items()), key=str)
        raise ValueError(f"{what}: columns differ from features version {FEATURES_VERSION}: {differ}")
