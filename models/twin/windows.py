"""Forecast windows for the twin surrogate: fixed-length slices of a site's 5-minute grid, and how they are scaled.

A window is what the surrogate sees at one forecast origin t0, the start of the last history bin: two hours of
CGM, insulin and carbohydrate up to and including t0's bin, the insulin and carbohydrate planned for the two hours
after it, and the patient's static covariates. Its target is the CGM of those two hours, bin k (1..24) being the
bin that starts 5k minutes after t0. Because the planned inputs are inputs, changing them asks a what-if question.

Rules the model and its tests rely on:

- History holds nothing after t0's bin. A CGM gap inside it is forward-filled from within the history (a gap at
  its start takes the history's first reading, which is still before t0) and flagged by the observed channel.
- A window is kept only if t0's bin has a CGM value and at least half of its target bins do. Target bins without
  CGM stay NaN; they are never filled.
- Carbohydrate is what the patient logged (carbs_logged_g), at the time eaten. The pump's bolus-wizard entry
  repeats the same meal at the bolus time, so it is left out rather than counted twice.
- Missing static covariates are imputed with fixed reference values, not site statistics, so imputation is the
  same at every hospital and needs no data; an indicator per source (body measurements, HbA1c, CT) says so.
- Windows are built per site and never leave it. The `Normalizer` that scales them travels with the model; in
  federation it is fitted from `Moments` (counts, sums and sums of squares) summed over sites, not from rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import polars as pl

from flows.features import BIN_MS, FeatureSet

HISTORY_STEPS = 24  # 2 h of 5-minute bins, t0's bin last
HORIZON_STEPS = 24  # 120 min ahead
QUANTILES = (0.05, 0.5, 0.95)

HISTORY_CHANNELS = ("cgm_mg_dl", "cgm_observed", "basal_u", "bolus_u", "carbs_g")
FUTURE_CHANNELS = ("basal_u", "bolus_u", "carbs_g")

# Columns of FeatureSet.static the surrogate uses.
STATIC_FEATURES: tuple[str, ...] = (
    "gender_concept_id",
    "age_years",
    "weight_kg",
    "height_cm",
    "bmi",
    "hba1c_percent",
    "mean_daily_insulin_u",
    "mean_daily_carbs_g",
    "visceral_fat_area_cm2",
    "subcutaneous_fat_area_cm2",
    "skeletal_muscle_area_cm2",
    "muscle_attenuation_hu",
)
# Typical adult type-1 values used in place of a missing covariate; the missing indicators carry the absence.
STATIC_REFERENCE: dict[str, float] = {
    "age_years": 35.0,
    "weight_kg": 72.0,
    "height_cm": 170.0,
    "bmi": 25.0,
    "hba1c_percent": 7.5,
    "mean_daily_insulin_u": 45.0,
    "mean_daily_carbs_g": 180.0,
    "visceral_fat_area_cm2": 90.0,
    "subcutaneous_fat_area_cm2": 160.0,
    "skeletal_muscle_area_cm2": 140.0,
    "muscle_attenuation_hu": 40.0,
}
# One indicator per source of covariates that a site may lack: 1.0 when any of the group's columns is missing.
MISSING_INDICATORS: dict[str, tuple[str, ...]] = {
    "body_missing": ("weight_kg", "height_cm", "bmi"),
    "hba1c_missing": ("hba1c_percent",),
    "imaging_missing": (
        "visceral_fat_area_cm2",
        "subcutaneous_fat_area_cm2",
        "skeletal_muscle_area_cm2",
        "muscle_attenuation_hu",
    ),
}
# Columns of Windows.static: sex as 1 female / 0 male / 0.5 unknown, the imputed covariates, the indicators.
STATIC_CHANNELS: tuple[str, ...] = ("female", *STATIC_REFERENCE, *MISSING_INDICATORS)
# Quantities the Normalizer scales, in its order.
NORMALIZED: tuple[str, ...] = ("cgm_mg_dl", "basal_u", "bolus_u", "carbs_g", *STATIC_CHANNELS)

FEMALE, MALE = 8532, 8507
MIN_STD = 1e-6  # below this a quantity is constant (e.g. no site has CT) and is only centred


@dataclass(frozen=True)
class Windows:
    """Forecast windows as numpy arrays, one row per window (see the module docstring for the rules)."""

    history: np.ndarray  # (n, HISTORY_STEPS, len(HISTORY_CHANNELS)) float32, t0's bin last
    future_inputs: np.ndarray  # (n, HORIZON_STEPS, len(FUTURE_CHANNELS)) float32, planned insulin and carbs
    static: np.ndarray  # (n, len(STATIC_CHANNELS)) float32, imputed, no NaN
    target: np.ndarray  # (n, HORIZON_STEPS) float32 CGM mg/dL, NaN where the bin has no reading
    last_cgm: np.ndarray  # (n,) float32 CGM of t0's bin, mg/dL: the persistence forecast
    person_id: np.ndarray  # (n,) int64
    t0: np.ndarray  # (n,) datetime64[ms], UTC start of the last history bin

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def select(self, index: np.ndarray) -> Windows:
        """The windows at `index` (integer positions or a boolean mask)."""
        return Windows(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass(frozen=True)
class PatientSplit:
    """A site's windows split by patient: no patient is in two parts."""

    train: Windows
    calibration: Windows  # site-local held-out patients for conformal calibration
    test: Windows  # held-out patients for evaluation


TEST_EVERY = 5  # patients 0, 5, 10, ... (in pseudonymous id order) are test patients
CALIBRATION_EVERY = 10  # patients 1, 11, 21, ... calibrate the intervals; the rest train


def split_patients(windows: Windows) -> PatientSplit:
    """Split by position in the sorted pseudonymous person ids, the same way at every site and in every baseline.

    Pseudonyms are keyed hashes, so sorted order is a random order of the patients that is fixed for a site:
    about 70% train, 10% calibrate and 20% test. A site needs at least 3 patients to fill every part.
    """
    people = np.unique(windows.person_id)
    if len(people) < 3:
        raise ValueError(f"a site needs 3 patients to split into train, calibration and test; has {len(people)}")
    position = np.arange(len(people))
    test = people[position % TEST_EVERY == 0]
    calibration = people[position % CALIBRATION_EVERY == 1]
    part = np.where(np.isin(windows.person_id, test), 2, np.where(np.isin(windows.person_id, calibration), 1, 0))
    return PatientSplit(*(windows.select(np.flatnonzero(part == k)) for k in range(3)))


def build_windows(features: FeatureSet, *, stride: int = 3) -> Windows:
    """Cut every person's grid into windows whose origins are `stride` bins apart, keeping those the rules allow."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1 bin, got {stride}")
    grid = features.grid.sort("person_id", "bin_start")
    person_id = grid["person_id"].to_numpy()
    bin_ms = grid["bin_start"].dt.epoch("ms").to_numpy()
    cgm = grid["cgm_mg_dl"].fill_null(np.nan).to_numpy().astype(np.float32)
    inputs = np.stack([grid[c].to_numpy() for c in ("basal_u", "bolus_u", "carbs_logged_g")], axis=1).astype(np.float32)

    origin = _origins(person_id, bin_ms, stride)
    observed = ~np.isnan(cgm)
    cumulative = np.concatenate([[0], np.cumsum(observed)])
    target_observed = cumulative[origin + HORIZON_STEPS + 1] - cumulative[origin + 1]
    origin = origin[observed[origin] & (2 * target_observed >= HORIZON_STEPS)]

    past = origin[:, None] + np.arange(1 - HISTORY_STEPS, 1)
    ahead = origin[:, None] + np.arange(1, HORIZON_STEPS + 1)
    filled, seen = _fill_within(cgm[past])
    history = np.concatenate([filled[..., None], seen[..., None], inputs[past]], axis=2)
    return Windows(
        history=history,
        future_inputs=inputs[ahead],
        static=_static_rows(features.static, person_id[origin]),
        target=cgm[ahead],
        last_cgm=cgm[origin],
        person_id=person_id[origin].astype(np.int64),
        t0=bin_ms[origin].astype("datetime64[ms]"),
    )


def _origins(person_id: np.ndarray, bin_ms: np.ndarray, stride: int) -> np.ndarray:
    """Grid rows that can end a history: a full history before and a full horizon after, within one person."""
    rows = len(person_id)
    first = np.flatnonzero(np.r_[True, person_id[1:] != person_id[:-1]]) if rows else np.zeros(0, dtype=np.int64)
    length = np.diff(np.r_[first, rows])
    broken = (np.diff(bin_ms) != BIN_MS) & (person_id[1:] == person_id[:-1])
    if broken.any():
        row = int(np.flatnonzero(broken)[0])
        raise ValueError(
            f"grid: person {person_id[row]} jumps from bin {np.datetime64(int(bin_ms[row]), 'ms')} to "
            f"{np.datetime64(int(bin_ms[row + 1]), 'ms')} UTC; the grid must hold every 5-minute bin of a "
            "person's span (rebuild it with flows.features.build_features)"
        )
    position = np.arange(rows) - np.repeat(first, length)
    remaining = np.repeat(length, length) - position - 1
    keep = (position >= HISTORY_STEPS - 1) & (remaining >= HORIZON_STEPS)
    keep &= (position - (HISTORY_STEPS - 1)) % stride == 0
    return np.flatnonzero(keep)


def _fill_within(cgm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward-fill each row's NaNs from earlier in the row (leading NaNs take the row's first value); and the mask."""
    seen = ~np.isnan(cgm)
    steps = np.arange(cgm.shape[1])
    latest = np.maximum.accumulate(np.where(seen, steps, -1), axis=1)
    first = np.argmax(seen, axis=1)[:, None]
    source = np.where(latest < 0, first, latest)
    filled = np.take_along_axis(cgm, source, axis=1)
    return filled, seen.astype(cgm.dtype)


def _static_rows(static: pl.DataFrame, person_id: np.ndarray) -> np.ndarray:
    """Each window's static channels, looked up by person."""
    row = (
        pl.DataFrame({"person_id": person_id}, schema={"person_id": pl.Int64()})
        .join(static.select("person_id").with_row_index("row"), on="person_id", how="left", maintain_order="left")
        .get_column("row")
    )
    if row.null_count():
        raise ValueError(
            f"static: no row for person {person_id[row.is_null().to_numpy()][0]} of the grid; static must hold "
            "every person of the grid (rebuild the features with flows.features.build_features)"
        )
    return encode_static(static)[row.to_numpy()]


def encode_static(static: pl.DataFrame) -> np.ndarray:
    """The STATIC_CHANNELS of each row of a FeatureSet.static frame, float32, missing values imputed."""
    absent = [c for c in ("person_id", *STATIC_FEATURES) if c not in static.columns]
    if absent:
        raise ValueError(f"static: missing columns {absent}; see flows.features.STATIC_COLUMNS")
    gender = static["gender_concept_id"]
    female = pl.select(
        pl.when(gender == FEMALE).then(1.0).when(gender == MALE).then(0.0).otherwise(0.5).alias("female")
    ).to_series()
    values = [female.to_numpy()]
    values += [static[c].cast(pl.Float64).fill_null(STATIC_REFERENCE[c]).to_numpy() for c in STATIC_REFERENCE]
    values += [static.select(pl.any_horizontal(pl.col(list(g)).is_null())).to_series().to_numpy() for g in
               MISSING_INDICATORS.values()]  # fmt: skip
    return np.stack(values, axis=1).astype(np.float32).reshape(static.height, len(STATIC_CHANNELS))


@dataclass(frozen=True)
class Moments:
    """Counts, sums and sums of squares of each NORMALIZED quantity: what a site may share to fit a Normalizer."""

    count: np.ndarray  # (len(NORMALIZED),) float64
    total: np.ndarray
    total_sq: np.ndarray

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    def to_arrays(self) -> list[np.ndarray]:
        """The three arrays in field order, as Flower ships them."""
        return [self.count, self.total, self.total_sq]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> Moments:
        """The inverse of to_arrays."""
        count, total, total_sq = (np.asarray(a, dtype=np.float64) for a in arrays)
        return cls(count, total, total_sq)


def window_moments(windows: Windows) -> Moments:
    """Moments of the windows' observed history CGM, history insulin and carbohydrate, and static channels.

    Static channels are counted once per window, so a patient weighs by how many windows they have, as in training.
    """
    observed = windows.history[..., 1] > 0
    columns = [
        windows.history[..., 0][observed],
        *(windows.history[..., HISTORY_CHANNELS.index(c)].ravel() for c in ("basal_u", "bolus_u", "carbs_g")),
        *windows.static.T,
    ]
    values = [np.asarray(c, dtype=np.float64) for c in columns]
    return Moments(
        count=np.array([v.size for v in values], dtype=np.float64),
        total=np.array([v.sum() for v in values]),
        total_sq=np.array([(v * v).sum() for v in values]),
    )


@dataclass(frozen=True)
class Normalizer:
    """Mean and standard deviation of each NORMALIZED quantity, fitted on training data; travels with a model.

    In federation a Normalizer must be built with `fit_from_moments` from Moments summed over sites (each site
    sharing only its `window_moments`), never from pooled rows; `fit` is the single-site shortcut.
    """

    mean: np.ndarray  # (len(NORMALIZED),) float64
    std: np.ndarray  # (len(NORMALIZED),) float64, >= MIN_STD; 1.0 for a constant quantity

    @classmethod
    def fit(cls, windows: Windows) -> Normalizer:
        """Fit on one site's training windows."""
        return cls.fit_from_moments(window_moments(windows))

    @classmethod
    def fit_from_moments(cls, moments: Moments) -> Normalizer:
        """Fit from (summed) moments; a quantity nobody observed gets mean 0 and std 1."""
        count = np.maximum(moments.count, 1.0)
        mean = np.where(moments.count > 0, moments.total / count, 0.0)
        variance = np.maximum(moments.total_sq / count - mean**2, 0.0)
        std = np.sqrt(variance)
        return cls(mean=mean, std=np.where(std < MIN_STD, 1.0, std))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """JSON-ready {quantity: {"mean": ..., "std": ...}}."""
        pairs = zip(NORMALIZED, self.mean, self.std, strict=True)
        return {name: {"mean": float(mean), "std": float(std)} for name, mean, std in pairs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, float]]) -> Normalizer:
        """The inverse of to_dict; every NORMALIZED quantity must be present."""
        absent = [name for name in NORMALIZED if name not in data]
        if absent:
            raise ValueError(f"normalizer: no mean/std for {absent}; it was saved by another version of the twin")
        return cls(
            mean=np.array([data[n]["mean"] for n in NORMALIZED], dtype=np.float64),
            std=np.array([data[n]["std"] for n in NORMALIZED], dtype=np.float64),
        )
