"""Per-patient dose-effect calibration: recovers a patient's own effect sizes, never looks ahead, keeps the sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.twin import HISTORY_STEPS, HORIZON_STEPS, Normalizer, TwinSurrogate, Windows, predict
from models.twin.model import predict_parts
from models.twin.personal import (
    MULTIPLIER_RANGE,
    cutoffs,
    evidence,
    multipliers,
    overlap,
    personal_predict,
)
from models.twin.windows import NORMALIZED, STATIC_CHANNELS


def twin() -> TwinSurrogate:
    torch.manual_seed(1)
    return TwinSurrogate(Normalizer(mean=np.full(len(NORMALIZED), 1.0), std=np.full(len(NORMALIZED), 2.0)))


def meal_windows(people: list[int], per_person: int, seed: int = 0) -> Windows:
    """Windows 2 h apart per patient, each with a random bolus and meal in its plan (so both effects vary)."""
    rng = np.random.default_rng(seed)
    n = len(people) * per_person
    history = np.zeros((n, HISTORY_STEPS, 5), np.float32)
    history[..., 0] = rng.uniform(90, 200, (n, 1))
    history[..., 1], history[..., 2] = 1.0, 0.1
    plan = np.zeros((n, HORIZON_STEPS, 3), np.float32)
    plan[..., 0] = 0.1
    plan[np.arange(n), rng.integers(0, 6, n), 1] = rng.uniform(0.5, 6.0, n)  # boluses
    plan[np.arange(n), rng.integers(0, 6, n), 2] = rng.uniform(10.0, 90.0, n)  # meals
    start = np.datetime64("2026-01-01T00:00", "ms")
    t0 = start + np.tile(np.arange(per_person), len(people)) * np.timedelta64(125, "m")
    return Windows(
        history=history,
        future_inputs=plan,
        static=np.ones((n, len(STATIC_CHANNELS)), np.float32),
        target=np.full((n, HORIZON_STEPS), np.nan, np.float32),
        last_cgm=history[:, -1, 0].copy(),
        person_id=np.repeat(np.array(people, dtype=np.int64), per_person),
        t0=t0,
    )


def with_own_effects(model: TwinSurrogate, windows: Windows, own: dict[int, tuple[float, float]]) -> Windows:
    """Targets of patients whose carbohydrate and insulin effects are `own[person]` times the shared model's."""
    quantiles, carbs, insulin = predict_parts(model, windows)
    factor = np.array([own[int(p)] for p in windows.person_id])
    target = quantiles[..., 1] + (factor[:, :1] - 1) * carbs - (factor[:, 1:] - 1) * insulin
    return Windows(**{**windows.__dict__, "target": target.astype(np.float32)})


def test_parts_add_up_to_the_forecast() -> None:
    model = twin()
    windows = meal_windows([1], 5)
    quantiles, carbs, insulin = predict_parts(model, windows)
    np.testing.assert_allclose(quantiles, predict(model, windows), rtol=1e-6)
    assert (carbs > 0).any() and (insulin > 0).any()  # both effects act in these plans


def test_multipliers_recover_each_patients_own_effect_sizes() -> None:
    """With weeks of a patient's records, the fit lands near the patient's own sizes; the shrinkage pulls to 1."""
    model = twin()
    own = {7: (1.6, 0.5), 8: (0.7, 2.5)}
    found = evidence(model, with_own_effects(model, meal_windows([7, 8], 300), own))
    later = np.datetime64("2027-01-01T00:00", "ms")
    got = multipliers(found, np.array([7, 8]), np.array([later, later]))
    np.testing.assert_allclose(got, [own[7], own[8]], rtol=0.1)
    # With two windows ended, the prior holds the fit closer to the shared model (ridge: a shorter step from 1).
    few = multipliers(found, np.array([7]), cutoffs(meal_windows([7], 300))[2:3])
    assert np.linalg.norm(few[0] - 1.0) < np.linalg.norm(np.array(own[7]) - 1.0)


def test_a_forecast_uses_exactly_the_windows_ended_by_its_cut_off() -> None:
    """Windows every 5 minutes: at window k's cut-off, windows 0..k-24 have ended and count; k-23 does not.

    Window k-24's last target bin ends exactly at the cut-off; window k-23's ends one bin later.
    """
    model = twin()
    windows = with_own_effects(model, meal_windows([3], 80), {3: (2.0, 0.5)})
    windows = Windows(**{**windows.__dict__, "t0": windows.t0[0] + np.arange(80) * np.timedelta64(5, "m")})
    found = evidence(model, windows)
    k = 60
    at_k = multipliers(found, np.array([3]), cutoffs(windows)[k : k + 1])
    ended = evidence(model, windows.select(np.arange(k - 23)))  # windows 0..k-24
    far = np.array([np.datetime64("2030-01-01", "ms")])
    np.testing.assert_allclose(at_k, multipliers(ended, np.array([3]), far))
    assert not np.allclose(at_k, [[1.0, 1.0]])  # they moved the fit
    one_more = evidence(model, windows.select(np.arange(k - 22)))  # with window k-23, which has not ended
    assert not np.allclose(at_k, multipliers(one_more, np.array([3]), far))
    np.testing.assert_allclose(multipliers(found, np.full(24, 3), cutoffs(windows)[:24]), np.ones((24, 2)))


def test_overlapping_windows_count_each_target_bin_once() -> None:
    """Windows 5 minutes apart share 23 of 24 target bins: their sums weigh 1/24; 2 h apart, 1."""
    model = twin()
    dense = meal_windows([3], 30)
    dense = Windows(**{**dense.__dict__, "t0": dense.t0[0] + np.arange(30) * np.timedelta64(5, "m")})
    assert overlap(dense) == pytest.approx(1 / HORIZON_STEPS)
    assert overlap(meal_windows([3, 4], 10)) == 1.0
    target = with_own_effects(model, dense, {3: (2.0, 2.0)})
    weighted = evidence(model, target).xx
    full = evidence(model, Windows(**{**target.__dict__, "t0": meal_windows([3], 30).t0})).xx
    np.testing.assert_allclose(weighted * HORIZON_STEPS, full, rtol=1e-9)


def test_personal_forecasts_keep_the_physiological_sign_and_ones_change_nothing() -> None:
    model = twin()
    windows = meal_windows([5], 30)
    np.testing.assert_allclose(personal_predict(model, windows, np.ones((30, 2))), predict(model, windows))
    found = evidence(model, with_own_effects(model, windows, {5: (-3.0, -3.0)}))  # a fit that would flip signs
    factors = multipliers(found, np.full(30, 5), np.full(30, np.datetime64("2027-01-01", "ms")))
    assert (factors >= MULTIPLIER_RANGE[0]).all()  # never below the floor: the effects keep their sign
    np.testing.assert_allclose(factors[:, 0], MULTIPLIER_RANGE[0])  # the well-measured carbohydrate fit is held there
    more_insulin = windows.future_inputs.copy()
    more_insulin[..., 1] *= 1.2
    plain = personal_predict(model, windows, factors)
    bolused = personal_predict(model, Windows(**{**windows.__dict__, "future_inputs": more_insulin}), factors)
    assert (bolused[..., 1] <= plain[..., 1] + 1e-6).all()


def test_a_patient_without_records_gets_the_shared_model() -> None:
    model = twin()
    found = evidence(model, with_own_effects(model, meal_windows([1], 20), {1: (2.0, 2.0)}))
    got = multipliers(found, np.array([99]), np.array([np.datetime64("2027-01-01", "ms")]))
    assert got.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("count", [0])
def test_no_windows_give_no_parts(count: int) -> None:
    quantiles, carbs, insulin = predict_parts(twin(), meal_windows([1], 1).select(np.arange(count)))
    assert quantiles.shape == (0, HORIZON_STEPS, 3) and carbs.shape == insulin.shape == (0, HORIZON_STEPS)
