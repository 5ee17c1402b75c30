"""Basal-bolus therapy from each patient's CR/CF, and the human errors real patients make with it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from models.uva_padova.engine import DosingPlan
from models.uva_padova.params import PatientParams
from models.uva_padova.scenario import MealPlan

# Mean share of meal boluses missed, by cohort. Adolescents miss most (Burdick et al., Pediatrics
# 2004: a third of adolescents missed more than 15% of boluses); children's boluses are given by
# parents; adults in between (Olinder et al. 2009 report 2-4 missed boluses a week).
MISSED_BOLUS_MEAN = {"child": 0.05, "adolescent": 0.15, "adult": 0.08}
LATE_BOLUS_MEAN = {"child": 0.15, "adolescent": 0.25, "adult": 0.15}
LATE_DELAY_RANGE_MIN = (15, 90)
# Carb counting: per-patient bias plus per-meal error; Brazeau et al. 2013 found adults off by
# ~20% on average per meal, with a systematic tendency to underestimate.
CARB_BIAS_MEAN = -0.1
CARB_BIAS_SD = 0.12
CARB_MEAL_SD_RANGE = (0.10, 0.30)
BETA_CONCENTRATION = 20.0
HYPO_TREAT_BELOW_MG_DL = 70.0
HYPO_TREAT_CARBS_G = {"child": 10.0, "adolescent": 15.0, "adult": 15.0}


@dataclass(frozen=True)
class HumanError:
    """Each patient's bolusing habits: arrays of length N."""

    p_missed: np.ndarray  # probability a meal bolus is forgotten
    p_late: np.ndarray  # probability a meal bolus is given late
    carb_bias: np.ndarray  # log of the patient's systematic carb-count factor
    carb_meal_sd: np.ndarray  # sd of the log per-meal carb-count error

    @classmethod
    def none(cls, n: int) -> HumanError:
        """A patient who boluses every meal, on time, with exact carb counts."""
        zeros = np.zeros(n)
        return cls(zeros, zeros.copy(), zeros.copy(), zeros.copy())

    @classmethod
    def draw(cls, params: PatientParams, rng: np.random.Generator) -> HumanError:
        """Draw bolusing habits per patient, with cohort-specific means (see module constants)."""
        missed_mean = np.array([MISSED_BOLUS_MEAN[c] for c in params.cohort])
        late_mean = np.array([LATE_BOLUS_MEAN[c] for c in params.cohort])
        return cls(
            p_missed=rng.beta(missed_mean * BETA_CONCENTRATION, (1 - missed_mean) * BETA_CONCENTRATION),
            p_late=rng.beta(late_mean * BETA_CONCENTRATION, (1 - late_mean) * BETA_CONCENTRATION),
            carb_bias=rng.normal(CARB_BIAS_MEAN, CARB_BIAS_SD, size=len(params)),
            carb_meal_sd=rng.uniform(*CARB_MEAL_SD_RANGE, size=len(params)),
        )

    def apply(self, plan: MealPlan, rng: np.random.Generator) -> MealPlan:
        """Return the plan with each meal's bolus drawn from the patient's habits."""
        p = plan.patient
        missed = rng.random(len(plan)) < self.p_missed[p]
        late = rng.random(len(plan)) < self.p_late[p]
        delay = np.where(late, rng.integers(*LATE_DELAY_RANGE_MIN, endpoint=True, size=len(plan)), 0)
        counted = plan.carbs_g * np.exp(self.carb_bias[p] + rng.normal(0.0, 1.0, len(plan)) * self.carb_meal_sd[p])
        counted = np.where(missed, 0.0, np.maximum(np.round(counted), 1.0))
        return replace(plan, bolus_carbs_g=counted, bolus_delay_min=delay.astype(int))


@dataclass(frozen=True)
class BasalBolusTherapy:
    """Pump therapy: steady-state basal, meal boluses by CR, corrections by CF above a threshold.

    This is simglucose's BBController (target 140 mg/dL, correction above 150 mg/dL, bolus one
    control step after the meal is announced), made to follow a meal plan's bolus decisions.
    """

    basal_u_per_min: np.ndarray
    cr_g_per_u: np.ndarray
    cf_mg_dl_per_u: np.ndarray
    target_mg_dl: float = 140.0
    correction_above_mg_dl: float = 150.0
    hypo_treat_below_mg_dl: float | None = None
    hypo_treat_carbs_g: np.ndarray | None = None

    @classmethod
    def for_patients(cls, params: PatientParams, *, treat_hypos: bool = True) -> BasalBolusTherapy:
        """Therapy set from the patients' own steady-state basal and Quest.csv CR/CF.

        With `treat_hypos`, patients eat fast carbs below 70 mg/dL (15 g, 10 g for children,
        the ISPAD/ADA "15-15 rule"), rechecking every 15 minutes. simglucose's BBController has no
        such rule; without it several of its children sit below 54 mg/dL for hours.
        """
        carbs = np.array([HYPO_TREAT_CARBS_G[c] for c in params.cohort]) if treat_hypos else None
        return cls(
            basal_u_per_min=params.basal_u_per_min,
            cr_g_per_u=params.cr,
            cf_mg_dl_per_u=params.cf,
            hypo_treat_below_mg_dl=HYPO_TREAT_BELOW_MG_DL if treat_hypos else None,
            hypo_treat_carbs_g=carbs,
        )

    def take(self, index: np.ndarray) -> BasalBolusTherapy:
        """The therapy of the patients at `index`."""
        return replace(
            self,
            basal_u_per_min=self.basal_u_per_min[index],
            cr_g_per_u=self.cr_g_per_u[index],
            cf_mg_dl_per_u=self.cf_mg_dl_per_u[index],
            hypo_treat_carbs_g=None if self.hypo_treat_carbs_g is None else self.hypo_treat_carbs_g[index],
        )

    def dosing_plan(self, plan: MealPlan, sample_time: int, basal_scale: np.ndarray | None = None) -> DosingPlan:
        """Translate a meal plan into per-step pump commands for a sensor of `sample_time` min.

        `basal_scale` (N, K) multiplies the basal rate per step (a temporary basal).
        """
        n, steps = plan.n_patients, plan.minutes // sample_time
        carbs = np.zeros((n, steps))
        scale = np.full((n, steps), np.nan)
        step = (plan.minute + plan.bolus_delay_min) // sample_time + 1
        given = (step >= 0) & (step < steps) & (plan.bolus_carbs_g > 0)
        np.add.at(carbs, (plan.patient[given], step[given]), plan.bolus_carbs_g[given])
        # Two boluses landing in one step are given as one; the larger multiplier wins.
        np.fmax.at(scale, (plan.patient[given], step[given]), plan.bolus_scale[given])
        scale = np.nan_to_num(scale, nan=1.0)
        basal = np.repeat(self.basal_u_per_min[:, None], steps, axis=1)
        if basal_scale is not None:
            basal = basal * basal_scale
        return DosingPlan(
            basal_u_per_min=basal,
            bolus_carbs_g=carbs,
            bolus_scale=scale,
            cr_g_per_u=self.cr_g_per_u,
            cf_mg_dl_per_u=self.cf_mg_dl_per_u,
            target_mg_dl=np.full(n, self.target_mg_dl),
            correction_above_mg_dl=self.correction_above_mg_dl,
            hypo_treat_below_mg_dl=self.hypo_treat_below_mg_dl,
            hypo_treat_carbs_g=self.hypo_treat_carbs_g,
        )
