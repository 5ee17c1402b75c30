"""simglucose itself, run headless on the same patients and meals: the reference this twin must match."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from models.uva_padova.engine import SimResult, simulate
from models.uva_padova.params import PatientParams
from models.uva_padova.pump import get_pump
from models.uva_padova.scenario import MealPlan
from models.uva_padova.sensor import get_sensor
from models.uva_padova.therapy import BasalBolusTherapy

REFERENCE_START = datetime(2026, 1, 1)
# (hour, grams): simglucose's CustomScenario form. Breakfast, lunch, dinner.
REFERENCE_MEALS: tuple[tuple[float, float], ...] = ((7.0, 45.0), (12.0, 70.0), (18.0, 80.0))


@dataclass(frozen=True)
class ReferenceRun:
    """simglucose's history for one patient: BG and CGM means per step, insulin per step."""

    bg_step_mean: np.ndarray
    cgm_seen: np.ndarray
    insulin_u_per_min: np.ndarray


def run_simglucose(
    name: str, *, sensor: str, seed: int, days: int = 1, meals: tuple[tuple[float, float], ...] = REFERENCE_MEALS
) -> ReferenceRun:
    """Simulate one base patient with simglucose's T1DSimEnv, BBController and Insulet pump."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gym 0.9 warns about pkg_resources and numpy on import
        from simglucose.actuator.pump import InsulinPump
        from simglucose.controller.basal_bolus_ctrller import BBController
        from simglucose.patient.t1dpatient import T1DPatient
        from simglucose.sensor.cgm import CGMSensor
        from simglucose.simulation.env import T1DSimEnv
        from simglucose.simulation.scenario import CustomScenario
        from simglucose.simulation.sim_engine import SimObj

    env = T1DSimEnv(
        T1DPatient.withName(name),
        CGMSensor.withName(sensor, seed=seed),
        InsulinPump.withName("Insulet"),
        CustomScenario(REFERENCE_START, list(meals)),
    )
    with tempfile.TemporaryDirectory() as folder:
        sim = SimObj(env, BBController(), timedelta(days=days), animate=False, path=folder)
        sim.simulate()
        history = sim.results()
    return ReferenceRun(
        bg_step_mean=history["BG"].to_numpy()[1:],
        cgm_seen=history["CGM"].to_numpy(),
        insulin_u_per_min=history["insulin"].to_numpy()[:-1],
    )


def run_twin_like_simglucose(
    params: PatientParams,
    *,
    sensor: str,
    seeds: np.ndarray,
    days: int = 1,
    meals: tuple[tuple[float, float], ...] = REFERENCE_MEALS,
) -> SimResult:
    """Run this simulator on simglucose's terms: exact boluses, no hypo treatment, Insulet pump."""
    spec = get_sensor(sensor)
    n = len(params)
    # CustomScenario times are hours after the start: the meals happen once, not every day.
    events = [(i, round(hour * 60.0), grams) for i in range(n) for hour, grams in meals]
    plan = MealPlan.from_events(n, days * 1440, events)
    therapy = BasalBolusTherapy.for_patients(params, treat_hypos=False)
    return simulate(
        params,
        meals_g=plan.announced_g(),
        dosing=therapy.dosing_plan(plan, spec.sample_time),
        sensor=spec,
        sensor_seeds=np.asarray(seeds),
        pump=get_pump("Insulet"),
    )
