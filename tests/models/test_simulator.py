"""Determinism, replay and physiology of the vectorized twin simulator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.uva_padova.cohort import simulate_cohort
from models.uva_padova.engine import simulate
from models.uva_padova.params import load_base_patients
from models.uva_padova.scenario import MealPlan
from models.uva_padova.sensor import get_sensor
from models.uva_padova.therapy import BasalBolusTherapy


def test_same_seed_same_output_bit_for_bit() -> None:
    """Two runs with the same seed agree exactly in every array; another seed differs."""
    first = simulate_cohort(12, 1, seed=2024, sensor="GuardianRT")
    second = simulate_cohort(12, 1, seed=2024, sensor="GuardianRT")
    for name in ("bg", "cgm", "cgm_obs", "cho_eaten_g", "basal_u_per_min", "bolus_u", "hypo_treat_g"):
        assert np.array_equal(getattr(first.result, name), getattr(second.result, name)), name
    assert first.result.bg.tobytes() == second.result.bg.tobytes()
    assert np.array_equal(first.plan.bolus_carbs_g, second.plan.bolus_carbs_g)
    other = simulate_cohort(12, 1, seed=2025, sensor="GuardianRT")
    assert not np.array_equal(first.result.cgm, other.result.cgm)


def test_run_split_in_two_equals_one_run() -> None:
    """Continuing from a saved state reproduces the uninterrupted run exactly."""
    run = simulate_cohort(6, 2, seed=5, sensor="Dexcom", record_states=True)
    st = run.sensor.sample_time
    half = run.result.bolus_u.shape[1] // 2
    tail_plan = run.plan.window(half * st, half * st, sample_time=st)
    tail = simulate(
        run.params,
        meals_g=tail_plan.announced_g(),
        dosing=run.therapy.dosing_plan(tail_plan, st),
        sensor=run.sensor,
        sensor_seeds=run.sensor_seeds,
        start=run.result.state_at(half),
    )
    assert np.array_equal(tail.bg, run.result.bg[:, half * st :])
    assert np.array_equal(tail.cgm, run.result.cgm[:, half:])
    assert np.array_equal(tail.bolus_u, run.result.bolus_u[:, half:])


def test_meal_raises_glucose_and_bolus_brings_it_back() -> None:
    """A 60 g meal raises glucose; its bolus (at least carbs / CR) brings it back near baseline in 5 hours."""
    params = load_base_patients(["adult#001", "adult#002", "adult#003"])
    sensor = get_sensor("GuardianRT")
    minutes = 8 * 60
    plan = MealPlan.from_events(3, minutes, [(i, 60, 60.0) for i in range(3)])
    therapy = BasalBolusTherapy.for_patients(params, treat_hypos=False)
    result = simulate(
        params,
        meals_g=plan.announced_g(),
        dosing=therapy.dosing_plan(plan, sensor.sample_time),
        sensor=sensor,
        sensor_seeds=np.arange(3),
    )
    baseline = params.basal_glucose_mg_dl
    assert np.all(result.bg.max(axis=1) > baseline + 20)
    assert np.all(np.abs(result.bg[:, 6 * 60] - baseline) < 45)
    assert np.all(result.bolus_u.sum(axis=1) >= 60.0 / params.cr * (1 - 1e-4))
    assert np.all(result.cho_eaten_g.sum(axis=1) == pytest.approx(60.0))


def test_hypo_treatment_cuts_time_below_54() -> None:
    """With the 15-15 rule, the 30 base patients spend far less time below 54 mg/dL than without it."""
    run = simulate_cohort(30, 2, seed=5, human_error=False)
    untreated = simulate(
        run.params,
        meals_g=run.plan.announced_g(),
        dosing=replace(run.therapy, hypo_treat_below_mg_dl=None).dosing_plan(run.plan, run.sensor.sample_time),
        sensor=run.sensor,
        sensor_seeds=run.sensor_seeds,
    )
    treated_share = (run.result.bg < 54).mean()
    untreated_share = (untreated.bg < 54).mean()
    assert untreated_share > 0.005 and untreated.hypo_treat_g.sum() == 0
    assert treated_share < untreated_share / 10
    assert run.result.bg.min() > untreated.bg.min()
    assert np.all(np.isin(run.result.hypo_treat_g, [0.0, 10.0, 15.0]))


def test_meals_shape_mismatch_is_a_clear_error() -> None:
    """A meal array of the wrong shape is rejected with the shape that was expected."""
    params = load_base_patients(["adult#001"])
    plan = MealPlan.from_events(1, 60, [])
    dosing = BasalBolusTherapy.for_patients(params).dosing_plan(plan, 5)
    with pytest.raises(ValueError, match=r"expected \(1, 60\)"):
        simulate(params, meals_g=np.zeros((1, 30)), dosing=dosing, sensor=get_sensor("GuardianRT"),
                 sensor_seeds=np.array([0]))  # fmt: skip
