"""The virtual population: distinct patients, sane perturbations, every patient at rest stays at rest."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.uva_padova.engine import simulate
from models.uva_padova.params import load_base_patients
from models.uva_padova.population import _apportion, expand_population
from models.uva_padova.pump import PumpSpec, get_pump
from models.uva_padova.scenario import MealPlan
from models.uva_padova.sensor import get_sensor
from models.uva_padova.therapy import BasalBolusTherapy


def test_base_patients_load_from_installed_simglucose() -> None:
    """The 30 base patients (10 per cohort) load with Quest.csv therapy and a 13-entry state."""
    base = load_base_patients()
    assert len(base) == 30
    assert sorted(set(base.cohort)) == ["adolescent", "adult", "child"]
    assert all(base.cohort.count(c) == 10 for c in ("child", "adolescent", "adult"))
    assert base.x0.shape == (30, 13)
    assert np.all(base.cr > 0) and np.all(base.cf > 0)


def test_population_of_300_is_distinct_and_cohort_balanced() -> None:
    """300 patients have 300 names and 300 distinct parameter sets, split by the cohort mix."""
    pop = expand_population(300, seed=1, cohort_mix={"child": 1, "adolescent": 1, "adult": 2})
    assert len(set(pop.names)) == 300
    signature = np.stack([pop.Vmx, pop.BW, pop.kabs], axis=1)
    assert len(np.unique(signature, axis=0)) == 300
    assert pop.cohort.count("adult") == 150 and pop.cohort.count("child") == 75


def test_unknown_cohort_is_a_clear_error() -> None:
    """A cohort mix naming an unknown cohort says which cohorts exist."""
    with pytest.raises(ValueError, match="child"):
        expand_population(10, seed=0, cohort_mix={"elderly": 1.0})


def test_every_patient_at_rest_stays_at_rest() -> None:
    """Basal insulin only, no meals, 24 h: each patient's steady state is exact (drift < 0.001 mg/dL).

    With simglucose's Insulet pump the basal is rounded to its 0.05 pmol/min increment, which alone
    moves glucose by less than 1 mg/dL in a day.
    """
    pop = expand_population(240, seed=9)
    sensor = get_sensor("GuardianRT")
    plan = MealPlan.from_events(len(pop), 1440, [])
    dosing = BasalBolusTherapy.for_patients(pop, treat_hypos=False).dosing_plan(plan, sensor.sample_time)
    exact_pump = PumpSpec("exact", 0.0, 1e9, 1e-12, 0.0, 1e9, 1e-12)
    for pump, tolerance in ((exact_pump, 1e-3), (get_pump("Insulet"), 1.0)):
        result = simulate(
            pop, meals_g=plan.announced_g(), dosing=dosing, sensor=sensor, sensor_seeds=np.arange(len(pop)), pump=pump
        )
        drift = np.abs(result.bg - pop.basal_glucose_mg_dl[:, None]).max(axis=1)
        worst = int(drift.argmax())
        assert drift[worst] < tolerance, f"{pop.names[worst]} drifted {drift[worst]:.4f} mg/dL with {pump.name}"
    assert np.ptp(pop.extra["insulin_sensitivity"]) > 0.5  # the perturbation is not a no-op


def test_therapy_follows_sensitivity_and_weight() -> None:
    """CR scales with insulin sensitivity, CF with sensitivity over weight, basal with weight over sensitivity."""
    pop = expand_population(90, seed=4)
    base = load_base_patients(list(pop.base_name))
    s, w = pop.extra["insulin_sensitivity"], pop.extra["body_weight_factor"]
    np.testing.assert_allclose(pop.cr, base.cr * s)
    np.testing.assert_allclose(pop.cf, base.cf * s / w)
    np.testing.assert_allclose(pop.basal_u_per_min, base.basal_u_per_min * w / s)
    np.testing.assert_allclose(pop.basal_glucose_mg_dl, base.basal_glucose_mg_dl)


@given(n=st.integers(1, 5000), weights=st.lists(st.floats(0.01, 10), min_size=3, max_size=3))
@settings(max_examples=200, deadline=None)
def test_apportion_always_sums_to_n(n: int, weights: list[float]) -> None:
    """Cohort apportioning always hands out exactly n patients, none negative."""
    counts = _apportion(n, dict(zip(("child", "adolescent", "adult"), weights, strict=True)))
    assert sum(counts.values()) == n and min(counts.values()) >= 0
