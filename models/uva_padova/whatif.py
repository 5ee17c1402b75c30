"""What-if replays: the same patient, from the same moment, under an altered meal or insulin plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from models.uva_padova.engine import SimResult, replay
from models.uva_padova.params import PatientParams
from models.uva_padova.pump import PumpSpec
from models.uva_padova.scenario import MealPlan
from models.uva_padova.sensor import CGMSensorSpec
from models.uva_padova.therapy import BasalBolusTherapy

AlterationKind = Literal["skip_bolus", "scale_bolus", "scale_basal", "scale_meal", "scale_meal_carbs", "shift_meal"]


@dataclass(frozen=True)
class Alteration:
    """One change to a patient's plan from the replay's start on.

    - skip_bolus: the first meal in the window is not bolused.
    - scale_bolus: every bolus in the window is multiplied by `factor`.
    - scale_basal: the basal rate is multiplied by `factor` for the whole window.
    - scale_meal: the first meal in the window is `factor` times larger (and counted as such).
    - scale_meal_carbs: the first meal in the window is `factor` times larger, its bolus unchanged (eaten, not
      counted: the patient boluses for the meal they planned).
    - shift_meal: the first meal in the window, and its bolus, happen `minutes` later.
    """

    kind: AlterationKind
    factor: float = 1.0
    minutes: int = 0

    def apply(self, plan: MealPlan, sample_time: int) -> tuple[MealPlan, np.ndarray | None]:
        """Return the altered meal plan and a basal multiplier (N, K), or None for no change."""
        first = _first_meal_mask(plan)
        if self.kind == "skip_bolus":
            return replace(plan, bolus_carbs_g=np.where(first, 0.0, plan.bolus_carbs_g)), None
        if self.kind == "scale_bolus":
            return replace(plan, bolus_scale=plan.bolus_scale * self.factor), None
        if self.kind == "scale_meal":
            return (
                replace(
                    plan,
                    carbs_g=np.where(first, plan.carbs_g * self.factor, plan.carbs_g),
                    bolus_carbs_g=np.where(first, plan.bolus_carbs_g * self.factor, plan.bolus_carbs_g),
                ),
                None,
            )
        if self.kind == "scale_meal_carbs":
            return replace(plan, carbs_g=np.where(first, plan.carbs_g * self.factor, plan.carbs_g)), None
        if self.kind == "shift_meal":
            return replace(plan, minute=np.where(first, plan.minute + self.minutes, plan.minute)), None
        if self.kind == "scale_basal":
            return plan, np.full((plan.n_patients, plan.minutes // sample_time), self.factor)
        raise ValueError(f"unknown alteration kind {self.kind!r}")


def _first_meal_mask(plan: MealPlan) -> np.ndarray:
    """True for each patient's first meal that starts inside the window."""
    mask = np.zeros(len(plan), dtype=bool)
    inside = np.flatnonzero(plan.minute >= 0)
    if inside.size:
        order = inside[np.lexsort((plan.minute[inside], plan.patient[inside]))]
        _, first_idx = np.unique(plan.patient[order], return_index=True)
        mask[order[first_idx]] = True
    return mask


@dataclass(frozen=True)
class WhatIfRun:
    """Factual and counterfactual replays of the same patients from the same state."""

    factual: SimResult
    counterfactual: SimResult


def what_if(
    params: PatientParams,
    run: SimResult,
    plan: MealPlan,
    therapy: BasalBolusTherapy,
    *,
    sensor: CGMSensorSpec,
    sensor_seeds: np.ndarray,
    patients: np.ndarray,
    from_step: int,
    steps: int,
    alteration: Alteration,
    pump: PumpSpec | None = None,
) -> WhatIfRun:
    """Replay `patients` of a recorded run from control step `from_step` for `steps` steps.

    The factual replay uses the original plan and so reproduces the recorded run; the
    counterfactual applies `alteration`. Both start from the identical saved state and see the
    identical sensor noise.
    """
    st = sensor.sample_time
    patients = np.asarray(patients, dtype=int)
    sub_params = params.take(patients)
    sub_therapy = therapy.take(patients)
    state = run.state_at(from_step).take(patients)
    window = plan.window(from_step * st, steps * st, sample_time=st, patients=patients)
    seeds = np.asarray(sensor_seeds)[patients]

    def run_plan(meal_plan: MealPlan, basal_scale: np.ndarray | None) -> SimResult:
        dosing = sub_therapy.dosing_plan(meal_plan, st, basal_scale=basal_scale)
        return replay(
            sub_params, state, meals_g=meal_plan.announced_g(), dosing=dosing, sensor=sensor,
            sensor_seeds=seeds, pump=pump,
        )  # fmt: skip

    altered, basal_scale = alteration.apply(window, st)
    return WhatIfRun(factual=run_plan(window, None), counterfactual=run_plan(altered, basal_scale))
