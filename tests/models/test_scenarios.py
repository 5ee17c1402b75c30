"""What-if scenarios rewrite the plan only, as declared; forecast windows reach each patient's newest reading."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from flows.features import BIN_MS, FeatureSet
from models.twin import HISTORY_STEPS, HORIZON_STEPS, Windows, build_windows
from models.twin.forecast import forecast_windows
from models.twin.scenarios import BASAL, BOLUS, CARBS, CATALOGUE, Scenario, apply_scenario, scenario
from models.twin.windows import FUTURE_CHANNELS, HISTORY_CHANNELS, STATIC_CHANNELS


def windows_with_plan(plan: np.ndarray) -> Windows:
    """Windows whose only meaningful part is the plan (n, HORIZON_STEPS, 3)."""
    n = plan.shape[0]
    return Windows(
        history=np.zeros((n, HISTORY_STEPS, len(HISTORY_CHANNELS)), np.float32),
        future_inputs=plan.astype(np.float32),
        static=np.zeros((n, len(STATIC_CHANNELS)), np.float32),
        target=np.zeros((n, HORIZON_STEPS), np.float32),
        last_cgm=np.full(n, 120.0, np.float32),
        person_id=np.arange(n, dtype=np.int64),
        t0=np.zeros(n, dtype="datetime64[ms]"),
    )


def plan_with_meal(meal_bin: int | None, carbs: float = 60.0, bolus: float = 6.0) -> np.ndarray:
    """Basal 0.1 U each bin, a correction bolus of 1 U at bin 20, and a meal with its bolus at `meal_bin`."""
    plan = np.zeros((HORIZON_STEPS, len(FUTURE_CHANNELS)))
    plan[:, BASAL] = 0.1
    plan[20, BOLUS] = 1.0
    if meal_bin is not None:
        plan[meal_bin, CARBS] = carbs
        plan[meal_bin - 1, BOLUS] = bolus  # pre-bolused 5 minutes before the meal
    return plan


def test_meal_scenarios_change_the_next_meal_and_its_bolus_only() -> None:
    """Skip the meal bolus: only the bolus near the meal goes; later meal: meal and bolus move 30 min; bigger: x1.5."""
    base = windows_with_plan(np.stack([plan_with_meal(6), plan_with_meal(None)]))
    skipped, applies = apply_scenario(base, scenario("skip_meal_bolus"))
    assert applies.tolist() == [True, False]
    assert skipped.future_inputs[0, 5, BOLUS] == 0 and skipped.future_inputs[0, 20, BOLUS] == 1.0
    np.testing.assert_array_equal(skipped.future_inputs[0, :, CARBS], base.future_inputs[0, :, CARBS])
    later, _ = apply_scenario(base, scenario("later_meal"))
    assert later.future_inputs[0, 12, CARBS] == 60.0 and later.future_inputs[0, 11, BOLUS] == 6.0
    assert later.future_inputs[0, 6, CARBS] == 0 and later.future_inputs[0, 5, BOLUS] == 0
    bigger, _ = apply_scenario(base, scenario("larger_meal"))
    assert bigger.future_inputs[0, 6, CARBS] == pytest.approx(90.0) and bigger.future_inputs[0, 5, BOLUS] == 6.0
    for changed in (skipped, later, bigger):  # nothing but the plan changes
        np.testing.assert_array_equal(changed.history, base.history)
        np.testing.assert_array_equal(changed.future_inputs[..., BASAL], base.future_inputs[..., BASAL])


def test_insulin_scenarios_scale_every_window() -> None:
    """Bolus +20% and basal -10% apply to all windows, meal or not; the original windows are untouched."""
    base = windows_with_plan(np.stack([plan_with_meal(6), plan_with_meal(None)]))
    before = base.future_inputs.copy()
    more, applies = apply_scenario(base, scenario("bolus_plus_20"))
    assert applies.all()
    np.testing.assert_allclose(more.future_inputs[..., BOLUS], 1.2 * before[..., BOLUS], rtol=1e-6)
    less, _ = apply_scenario(base, scenario("basal_minus_10"))
    np.testing.assert_allclose(less.future_inputs[..., BASAL], 0.9 * before[..., BASAL], rtol=1e-6)
    np.testing.assert_array_equal(base.future_inputs, before)


def test_a_meal_moved_past_the_horizon_leaves_the_plan() -> None:
    """A meal in the last bins delayed by 30 minutes falls outside the two-hour plan."""
    delayed, applies = apply_scenario(windows_with_plan(plan_with_meal(22)[None]), scenario("later_meal"))
    assert applies.all() and delayed.future_inputs[0, :, CARBS].sum() == 0


def test_catalogue_ids_are_unique_and_bad_scenarios_refused() -> None:
    """Each scenario is addressable by id; impossible factors fail at declaration."""
    assert len({s.scenario_id for s in CATALOGUE}) == len(CATALOGUE)
    with pytest.raises(KeyError, match="skip_meal_bolus"):
        scenario("nope")
    with pytest.raises(ValueError, match="bolus_factor"):
        Scenario("x", "negative insulin", bolus_factor=-1.0)


def grid(person_bins: dict[int, int], gap: tuple[int, int] | None = None) -> FeatureSet:
    """A FeatureSet of persons with the given number of 5-minute bins, CGM a ramp (absent in `gap` bins)."""
    rows = []
    start = np.datetime64("2026-03-01T00:00", "ms").astype(np.int64)
    for person, bins in person_bins.items():
        for i in range(bins):
            missing = gap is not None and gap[0] <= i < gap[1]
            rows.append({"person_id": person, "bin_start": start + i * BIN_MS,
                         "cgm_mg_dl": None if missing else 100.0 + i, "basal_u": 0.05 + 0.001 * (i == bins - 1),
                         "bolus_u": 0.0, "carbs_logged_g": 0.0})  # fmt: skip
    frame = pl.DataFrame(rows).with_columns(pl.from_epoch("bin_start", time_unit="ms").dt.replace_time_zone("UTC"))
    static = pl.DataFrame({"person_id": list(person_bins)}).with_columns(
        pl.lit(None, dtype=pl.Int64).alias("gender_concept_id"),
        *[pl.lit(None, dtype=pl.Float64).alias(c) for c in ("age_years", "weight_kg", "height_cm", "bmi",
          "hba1c_percent", "mean_daily_insulin_u", "mean_daily_carbs_g", "visceral_fat_area_cm2",
          "subcutaneous_fat_area_cm2", "skeletal_muscle_area_cm2", "muscle_attenuation_hu")],
    )  # fmt: skip
    return FeatureSet(grid=frame, static=static)


def test_forecast_windows_end_at_each_patients_newest_reading() -> None:
    """The newest origin is each patient's last CGM bin; after the grid the plan is last basal, no bolus or meal."""
    features = grid({1: 100, 2: 60}, gap=None)
    windows = forecast_windows(features, every_bins=12)
    for person, bins in ((1, 100), (2, 60)):
        mine = windows.select(np.flatnonzero(windows.person_id == person))
        newest = int(np.argmax(mine.t0))
        assert mine.last_cgm[newest] == 100.0 + bins - 1  # the last bin's reading
        assert np.isnan(mine.target[newest]).all()  # nothing recorded after it yet
        np.testing.assert_allclose(mine.future_inputs[newest, :, BASAL], 0.051, rtol=1e-6)
        assert mine.future_inputs[newest, :, [BOLUS, CARBS]].sum() == 0
        assert sorted(np.diff(np.sort(mine.t0)).astype(np.int64).tolist()) == [12 * BIN_MS] * (len(mine) - 1)


def test_forecast_windows_agree_with_training_windows_where_both_exist() -> None:
    """For an origin both kinds of window have, history, plan, covariates and target are identical."""
    features = grid({7: 120})
    forecast = forecast_windows(features, every_bins=1)
    training = build_windows(features, stride=1)
    common, in_forecast, in_training = np.intersect1d(forecast.t0, training.t0, return_indices=True)
    assert len(common) == len(training) > 0
    for name in ("history", "future_inputs", "static", "target", "last_cgm"):
        np.testing.assert_array_equal(getattr(forecast, name)[in_forecast], getattr(training, name)[in_training])


def test_forecast_origins_need_a_reading_at_the_origin() -> None:
    """No forecast starts from a bin without CGM (a sensor gap); the newest starts at the last reading before it."""
    features = grid({3: 100}, gap=(60, 100))
    windows = forecast_windows(features, every_bins=1)
    first = np.datetime64("2026-03-01T00:00", "ms").astype(np.int64)
    origin_bin = (windows.t0.astype(np.int64) - first) // BIN_MS
    assert len(windows) > 0 and origin_bin.max() == 59 and not np.isin(origin_bin, np.arange(60, 100)).any()
