"""Vectorized UVA/Padova 2008 type-1 diabetes simulator, equation-for-equation with simglucose."""

from models.uva_padova.cohort import CohortRun, simulate_cohort
from models.uva_padova.engine import DosingPlan, SimResult, SimState, replay, simulate
from models.uva_padova.params import PatientParams, load_base_patients
from models.uva_padova.population import expand_population
from models.uva_padova.scenario import MealHabits, MealPlan, draw_meal_plan
from models.uva_padova.sensor import CGMSensorSpec, get_sensor, sensor_names
from models.uva_padova.therapy import BasalBolusTherapy, HumanError
from models.uva_padova.whatif import Alteration, WhatIfRun, what_if

__all__ = [
    "Alteration",
    "CohortRun",
    "DosingPlan",
    "WhatIfRun",
    "simulate_cohort",
    "what_if",
    "BasalBolusTherapy",
    "CGMSensorSpec",
    "HumanError",
    "MealHabits",
    "MealPlan",
    "PatientParams",
    "SimResult",
    "SimState",
    "draw_meal_plan",
    "expand_population",
    "get_sensor",
    "load_base_patients",
    "replay",
    "sensor_names",
    "simulate",
]
