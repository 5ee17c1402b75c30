"""Meal scenarios: each patient's eating habits and the meal events drawn from them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import truncnorm

from models.uva_padova.params import PatientParams

MINUTES_PER_DAY = 1440
# simglucose's RandomScenario: breakfast, snack, lunch, snack, dinner, snack.
SLOTS = ("breakfast", "morning_snack", "lunch", "afternoon_snack", "dinner", "evening_snack")
SLOT_PROBABILITY = np.array([0.95, 0.3, 0.95, 0.3, 0.95, 0.3])
SLOT_TIME_LOW_MIN = np.array([5, 9, 10, 14, 16, 20]) * 60.0
SLOT_TIME_HIGH_MIN = np.array([9, 10, 14, 16, 20, 23]) * 60.0
SLOT_TIME_MEAN_MIN = np.array([7, 9.5, 12, 15, 18, 21.5]) * 60.0
SLOT_TIME_SD_MIN = np.array([60, 30, 60, 30, 60, 30], dtype=float)
SLOT_CARBS_MEAN_G = np.array([45, 10, 70, 10, 80, 10], dtype=float)
SLOT_CARBS_SD_G = np.array([10, 5, 10, 5, 10, 5], dtype=float)
REFERENCE_WEIGHT_KG = 70.0


@dataclass(frozen=True)
class MealHabits:
    """Per-patient eating habits, arrays of shape (N, 6) over `SLOTS`."""

    probability: np.ndarray
    time_mean_min: np.ndarray
    time_sd_min: np.ndarray
    carbs_mean_g: np.ndarray
    carbs_sd_g: np.ndarray

    @classmethod
    def draw(cls, params: PatientParams, rng: np.random.Generator) -> MealHabits:
        """Draw habits around simglucose's RandomScenario, personalised per patient.

        Each patient gets a chronotype (all meals shifted by N(0, 40) min), an appetite (carbs
        scaled by a log-normal factor, sd 0.15, times (BW / 70 kg)^0.5 so that children eat
        less), and a snacking propensity (snack probabilities scaled by U(0.3, 1.7)).
        """
        n = len(params)
        shift = np.clip(rng.normal(0.0, 40.0, size=(n, 1)), -90.0, 90.0)
        appetite = np.exp(rng.normal(0.0, 0.15, size=(n, 1))) * np.sqrt(params.BW[:, None] / REFERENCE_WEIGHT_KG)
        snacking = rng.uniform(0.3, 1.7, size=(n, 1))
        is_snack = np.array([0, 1, 0, 1, 0, 1], dtype=bool)
        probability = np.where(is_snack, np.clip(SLOT_PROBABILITY * snacking, 0.0, 0.9), SLOT_PROBABILITY)
        return cls(
            probability=np.broadcast_to(probability, (n, 6)).copy(),
            time_mean_min=SLOT_TIME_MEAN_MIN + shift,
            time_sd_min=np.broadcast_to(SLOT_TIME_SD_MIN, (n, 6)).copy(),
            carbs_mean_g=SLOT_CARBS_MEAN_G * appetite,
            carbs_sd_g=SLOT_CARBS_SD_G * appetite,
        )

    @classmethod
    def simglucose_default(cls, n: int) -> MealHabits:
        """Simglucose's RandomScenario habits, the same for every patient."""

        def tile(row: np.ndarray) -> np.ndarray:
            return np.tile(row, (n, 1)).astype(float)

        return cls(
            probability=tile(SLOT_PROBABILITY),
            time_mean_min=tile(SLOT_TIME_MEAN_MIN),
            time_sd_min=tile(SLOT_TIME_SD_MIN),
            carbs_mean_g=tile(SLOT_CARBS_MEAN_G),
            carbs_sd_g=tile(SLOT_CARBS_SD_G),
        )


@dataclass(frozen=True)
class MealPlan:
    """Meal events of N patients over `minutes`, with how each one is bolused.

    One row per meal: the patient, the minute eating starts, the carbs eaten, the slot, and the
    bolus the patient gives for it: carbs entered into the calculator (0 = bolus missed), delay
    after the meal (minutes) and a multiplier on the calculated dose.
    """

    n_patients: int
    minutes: int
    patient: np.ndarray
    minute: np.ndarray
    carbs_g: np.ndarray
    slot: np.ndarray
    bolus_carbs_g: np.ndarray
    bolus_delay_min: np.ndarray
    bolus_scale: np.ndarray

    def __len__(self) -> int:
        return int(self.patient.shape[0])

    @classmethod
    def from_events(
        cls, n_patients: int, minutes: int, events: list[tuple[int, int, float]], slot: int = 0
    ) -> MealPlan:
        """Build a plan from (patient, minute, carbs) triples, each bolused exactly and on time."""
        arr = np.array(events, dtype=float).reshape(-1, 3)
        carbs = arr[:, 2].copy()
        return cls(
            n_patients=n_patients,
            minutes=minutes,
            patient=arr[:, 0].astype(int),
            minute=arr[:, 1].astype(int),
            carbs_g=carbs,
            slot=np.full(len(arr), slot, dtype=int),
            bolus_carbs_g=carbs.copy(),
            bolus_delay_min=np.zeros(len(arr), dtype=int),
            bolus_scale=np.ones(len(arr)),
        )

    def announced_g(self) -> np.ndarray:
        """Carbs announced at each minute, (N, minutes): the simulator's meal input."""
        dense = np.zeros((self.n_patients, self.minutes))
        inside = (self.minute >= 0) & (self.minute < self.minutes)
        np.add.at(dense, (self.patient[inside], self.minute[inside]), self.carbs_g[inside])
        return dense

    def where(self, mask: np.ndarray) -> MealPlan:
        """Return the plan restricted to the events where `mask` is true."""
        return replace(
            self,
            **{
                name: getattr(self, name)[mask]
                for name in ("patient", "minute", "carbs_g", "slot", "bolus_carbs_g", "bolus_delay_min", "bolus_scale")
            },
        )

    def window(
        self, start_minute: int, minutes: int, *, sample_time: int, patients: np.ndarray | None = None
    ) -> MealPlan:
        """Events that act in [start_minute, start_minute + minutes), re-timed to start at 0.

        A meal acts when it is announced and when its bolus is given, one control step of
        `sample_time` minutes after the bolus moment (see `BasalBolusTherapy.dosing_plan`), so an
        earlier meal whose bolus lands in the window is kept. With `patients`, only those
        patients are kept, renumbered in the given order.
        """
        bolus_minute = ((self.minute + self.bolus_delay_min) // sample_time + 1) * sample_time
        end = start_minute + minutes
        keep = ((self.minute >= start_minute) & (self.minute < end)) | (
            (bolus_minute >= start_minute) & (bolus_minute < end)
        )
        n_patients = self.n_patients
        renumber = np.arange(self.n_patients)
        if patients is not None:
            patients = np.asarray(patients, dtype=int)
            renumber = np.full(self.n_patients, -1)
            renumber[patients] = np.arange(len(patients))
            keep &= renumber[self.patient] >= 0
            n_patients = len(patients)
        sub = self.where(keep)
        return replace(
            sub, n_patients=n_patients, minutes=minutes, patient=renumber[sub.patient], minute=sub.minute - start_minute
        )


def draw_meal_plan(habits: MealHabits, days: int, rng: np.random.Generator) -> MealPlan:
    """Draw each patient's meals for `days` days from their habits (bolused perfectly)."""
    n = habits.probability.shape[0]
    shape = (n, days, len(SLOTS))
    taken = rng.random(shape) < habits.probability[:, None, :]
    mean, sd = habits.time_mean_min[:, None, :], habits.time_sd_min[:, None, :]
    low = np.minimum(SLOT_TIME_LOW_MIN, mean - sd)
    high = np.maximum(SLOT_TIME_HIGH_MIN, mean + sd)
    times = truncnorm.rvs(a=(low - mean) / sd, b=(high - mean) / sd, loc=mean, scale=sd, size=shape, random_state=rng)
    carbs = np.maximum(
        np.round(rng.normal(habits.carbs_mean_g[:, None, :], habits.carbs_sd_g[:, None, :], size=shape)), 0
    )
    taken &= carbs > 0
    patient, day, slot = np.nonzero(taken)
    minute = (day * MINUTES_PER_DAY + np.clip(np.round(times[taken]), 0, MINUTES_PER_DAY - 1)).astype(int)
    order = np.lexsort((minute, patient))
    grams = carbs[taken][order]
    return MealPlan(
        n_patients=n,
        minutes=days * MINUTES_PER_DAY,
        patient=patient[order],
        minute=minute[order],
        carbs_g=grams,
        slot=slot[order],
        bolus_carbs_g=grams.copy(),
        bolus_delay_min=np.zeros(len(order), dtype=int),
        bolus_scale=np.ones(len(order)),
    )
