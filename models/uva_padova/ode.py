"""The UVA/Padova 2008 right-hand side for N patients at once, and its fixed-step integrator.

The equations are simglucose's `T1DPatient.model`, term for term, with the state laid out as
(13, N) so that each compartment is one contiguous row. simglucose integrates each minute with
scipy's adaptive dopri5; a classical RK4 step of one minute, split into `SUBSTEPS`, agrees with it
far inside 1 mg/dL (see tests/models/test_simglucose_parity.py) at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.uva_padova.params import PatientParams

SUBSTEPS = 2  # RK4 sub-steps per simulated minute


@dataclass(frozen=True)
class MealDrive:
    """Gut inputs that are constant over one minute: ingestion and the tanh shape of kgut."""

    ingestion_mg_per_min: np.ndarray
    dbar: np.ndarray  # last_Qsto + last_foodtaken (mg), simglucose's Dbar
    aa: np.ndarray
    cc: np.ndarray


class UvaPadovaRhs:
    """Vectorized dx/dt of the UVA/Padova model for a fixed set of patients."""

    def __init__(self, params: PatientParams) -> None:
        v = params.values
        self.p = {k: np.asarray(val, dtype=np.float64) for k, val in v.items()}
        p = self.p
        self.half_kgut_span = (p["kmax"] - p["kmin"]) / 2.0
        self.rat_gain = p["f"] * p["kabs"] / p["BW"]
        self.m2_m4 = p["m2"] + p["m4"]
        self.m1_m30 = p["m1"] + p["m30"]
        self.ka1_kd = p["ka1"] + p["kd"]
        self.insulin_gain = 6000.0 / p["BW"]  # U/min -> pmol/kg/min

    def meal_drive(self, ingestion_g_per_min: np.ndarray, dbar: np.ndarray) -> MealDrive:
        """Precompute the gut terms that only change when a meal starts."""
        p = self.p
        safe = np.where(dbar > 0, dbar, 1.0)
        return MealDrive(
            ingestion_mg_per_min=ingestion_g_per_min * 1000.0,
            dbar=dbar,
            aa=5.0 / (2.0 * safe * (1.0 - p["b"])),
            cc=5.0 / (2.0 * safe * p["d"]),
        )

    def __call__(self, x: np.ndarray, meal: MealDrive, insulin_u_per_min: np.ndarray) -> np.ndarray:
        """Return dx/dt, shape (13, N), for state x (13, N)."""
        p = self.p
        dx = np.empty_like(x)
        qsto = x[0] + x[1]
        dbar = meal.dbar
        kgut = np.where(
            dbar > 0,
            p["kmin"]
            + self.half_kgut_span
            * (np.tanh(meal.aa * (qsto - p["b"] * dbar)) - np.tanh(meal.cc * (qsto - p["d"] * dbar)) + 2.0),
            p["kmax"],
        )
        dx[0] = -p["kmax"] * x[0] + meal.ingestion_mg_per_min
        dx[1] = p["kmax"] * x[0] - x[1] * kgut
        dx[2] = kgut * x[1] - p["kabs"] * x[2]

        rat = self.rat_gain * x[2]
        egp = p["kp1"] - p["kp2"] * x[3] - p["kp3"] * x[8]
        renal = np.where(x[3] > p["ke2"], p["ke1"] * (x[3] - p["ke2"]), 0.0)
        dx[3] = np.maximum(egp, 0.0) + rat - p["Fsnc"] - renal - p["k1"] * x[3] + p["k2"] * x[4]
        dx[3] *= x[3] >= 0

        uptake = (p["Vm0"] + p["Vmx"] * x[6]) * x[4] / (p["Km0"] + x[4])
        dx[4] = -uptake + p["k1"] * x[3] - p["k2"] * x[4]
        dx[4] *= x[4] >= 0

        dx[5] = -self.m2_m4 * x[5] + p["m1"] * x[9] + p["ka1"] * x[10] + p["ka2"] * x[11]
        dx[5] *= x[5] >= 0
        plasma_insulin = x[5] / p["Vi"]
        dx[6] = p["p2u"] * (plasma_insulin - p["Ib"] - x[6])
        dx[7] = -p["ki"] * (x[7] - plasma_insulin)
        dx[8] = -p["ki"] * (x[8] - x[7])
        dx[9] = -self.m1_m30 * x[9] + p["m2"] * x[5]
        dx[9] *= x[9] >= 0
        dx[10] = insulin_u_per_min * self.insulin_gain - self.ka1_kd * x[10]
        dx[10] *= x[10] >= 0
        dx[11] = p["kd"] * x[10] - p["ka2"] * x[11]
        dx[11] *= x[11] >= 0
        dx[12] = p["ksc"] * (x[3] - x[12])
        dx[12] *= x[12] >= 0
        return dx

    def advance_minute(self, x: np.ndarray, meal: MealDrive, insulin_u_per_min: np.ndarray) -> np.ndarray:
        """Integrate one minute with constant inputs by RK4 sub-steps; returns the new state."""
        h = 1.0 / SUBSTEPS
        for _ in range(SUBSTEPS):
            k1 = self(x, meal, insulin_u_per_min)
            k2 = self(x + (0.5 * h) * k1, meal, insulin_u_per_min)
            k3 = self(x + (0.5 * h) * k2, meal, insulin_u_per_min)
            k4 = self(x + h * k3, meal, insulin_u_per_min)
            x = x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return x
