"""One call from a seed to a simulated cohort: population, habits, errors, therapy and the run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.uva_padova.engine import SimResult, simulate
from models.uva_padova.params import PatientParams
from models.uva_padova.population import expand_population
from models.uva_padova.pump import PumpSpec, get_pump
from models.uva_padova.scenario import MealHabits, MealPlan, draw_meal_plan
from models.uva_padova.sensor import CGMSensorSpec, get_sensor
from models.uva_padova.therapy import BasalBolusTherapy, HumanError


@dataclass(frozen=True)
class CohortRun:
    """Everything a cohort simulation was made of, so any part of it can be replayed."""

    params: PatientParams
    habits: MealHabits
    errors: HumanError
    plan: MealPlan
    therapy: BasalBolusTherapy
    sensor: CGMSensorSpec
    sensor_seeds: np.ndarray
    pump: PumpSpec
    result: SimResult


def simulate_cohort(
    n_patients: int,
    days: int,
    *,
    seed: int,
    sensor: str = "Dexcom",
    pump: str = "Insulet",
    cohort_mix: dict[str, float] | None = None,
    human_error: bool = True,
    record_states: bool = False,
) -> CohortRun:
    """Simulate `n_patients` distinct virtual patients for `days` days; same seed, same run."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    population_seq, habits_seq, meals_seq, errors_seq, sensor_seq = np.random.SeedSequence(seed).spawn(5)
    params = expand_population(n_patients, seed=int(population_seq.generate_state(1)[0]), cohort_mix=cohort_mix)
    habits = MealHabits.draw(params, np.random.default_rng(habits_seq))
    plan = draw_meal_plan(habits, days, np.random.default_rng(meals_seq))
    errors_rng = np.random.default_rng(errors_seq)
    errors = HumanError.draw(params, errors_rng) if human_error else HumanError.none(n_patients)
    plan = errors.apply(plan, errors_rng)
    therapy = BasalBolusTherapy.for_patients(params)
    spec = get_sensor(sensor)
    pump_spec = get_pump(pump)
    # RandomState seeds are 32-bit, as simglucose's CGMSensor takes them.
    sensor_seeds = sensor_seq.generate_state(n_patients).astype(np.int64)
    result = simulate(
        params,
        meals_g=plan.announced_g(),
        dosing=therapy.dosing_plan(plan, spec.sample_time),
        sensor=spec,
        sensor_seeds=sensor_seeds,
        pump=pump_spec,
        record_states=record_states,
    )
    return CohortRun(params, habits, errors, plan, therapy, spec, sensor_seeds, pump_spec, result)
