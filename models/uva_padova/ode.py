"""The UVA/Padova 2008 right-hand side for N patients, and its fixed-step integrator, compiled by numba.

The equations are simglucose's `T1DPatient.model`, term for term. simglucose integrates each
minute with scipy's adaptive dopri5; a classical RK4 step of one minute, split into `SUBSTEPS`,
agrees with it far inside 1 mg/dL (see tests/models/test_simglucose_parity.py). The state is laid
out as (13, N). numba compiles the per-patient loop once (cached on disk), which removes the
per-call overhead that dominates a numpy version at hospital-sized N.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.uva_padova.params import PatientParams

SUBSTEPS = 2  # RK4 sub-steps per simulated minute

# Row of each parameter in the packed (len(PARAMETER_ROWS), N) array the kernel reads.
PARAMETER_ROWS = (
    "BW", "kabs", "kmax", "kmin", "b", "d", "Vi", "Ib", "Vmx", "Km0", "k2", "k1", "p2u", "m1", "m2",
    "m4", "m30", "ki", "kp1", "kp2", "kp3", "f", "ke1", "ke2", "Fsnc", "Vm0", "kd", "ksc", "ka1", "ka2",
)  # fmt: skip
(BW, KABS, KMAX, KMIN, B, D, VI, IB, VMX, KM0, K2, K1, P2U, M1, M2,
 M4, M30, KI, KP1, KP2, KP3, F, KE1, KE2, FSNC, VM0, KD, KSC, KA1, KA2) = range(len(PARAMETER_ROWS))  # fmt: skip


def pack_parameters(params: PatientParams) -> np.ndarray:
    """The patients' ODE parameters as one contiguous (n_parameters, N) float64 array."""
    return np.ascontiguousarray(np.stack([params.values[name] for name in PARAMETER_ROWS]).astype(np.float64))


@njit(cache=True)
def _rhs(
    x: np.ndarray, p: np.ndarray, i: int, ingestion_mg: float, dbar: float, insulin_pmol_kg: float, dx: np.ndarray
) -> None:
    """dx/dt of patient i (simglucose's T1DPatient.model); writes into dx (13,)."""
    qsto = x[0] + x[1]
    if dbar > 0:
        aa = 5.0 / (2.0 * dbar * (1.0 - p[B, i]))
        cc = 5.0 / (2.0 * dbar * p[D, i])
        kgut = p[KMIN, i] + (p[KMAX, i] - p[KMIN, i]) / 2.0 * (
            np.tanh(aa * (qsto - p[B, i] * dbar)) - np.tanh(cc * (qsto - p[D, i] * dbar)) + 2.0
        )
    else:
        kgut = p[KMAX, i]
    dx[0] = -p[KMAX, i] * x[0] + ingestion_mg
    dx[1] = p[KMAX, i] * x[0] - x[1] * kgut
    dx[2] = kgut * x[1] - p[KABS, i] * x[2]

    rat = p[F, i] * p[KABS, i] * x[2] / p[BW, i]
    egp = p[KP1, i] - p[KP2, i] * x[3] - p[KP3, i] * x[8]
    renal = p[KE1, i] * (x[3] - p[KE2, i]) if x[3] > p[KE2, i] else 0.0
    dx[3] = max(egp, 0.0) + rat - p[FSNC, i] - renal - p[K1, i] * x[3] + p[K2, i] * x[4]
    if x[3] < 0:
        dx[3] = 0.0

    uptake = (p[VM0, i] + p[VMX, i] * x[6]) * x[4] / (p[KM0, i] + x[4])
    dx[4] = -uptake + p[K1, i] * x[3] - p[K2, i] * x[4]
    if x[4] < 0:
        dx[4] = 0.0

    dx[5] = -(p[M2, i] + p[M4, i]) * x[5] + p[M1, i] * x[9] + p[KA1, i] * x[10] + p[KA2, i] * x[11]
    if x[5] < 0:
        dx[5] = 0.0
    plasma_insulin = x[5] / p[VI, i]
    dx[6] = -p[P2U, i] * x[6] + p[P2U, i] * (plasma_insulin - p[IB, i])
    dx[7] = -p[KI, i] * (x[7] - plasma_insulin)
    dx[8] = -p[KI, i] * (x[8] - x[7])
    dx[9] = -(p[M1, i] + p[M30, i]) * x[9] + p[M2, i] * x[5]
    if x[9] < 0:
        dx[9] = 0.0
    dx[10] = insulin_pmol_kg - (p[KA1, i] + p[KD, i]) * x[10]
    if x[10] < 0:
        dx[10] = 0.0
    dx[11] = p[KD, i] * x[10] - p[KA2, i] * x[11]
    if x[11] < 0:
        dx[11] = 0.0
    dx[12] = -p[KSC, i] * x[12] + p[KSC, i] * x[3]
    if x[12] < 0:
        dx[12] = 0.0


@njit(cache=True)
def advance_minute(
    x: np.ndarray,
    p: np.ndarray,
    ingestion_g_per_min: np.ndarray,
    dbar_mg: np.ndarray,
    insulin_u_per_min: np.ndarray,
    substeps: int,
) -> np.ndarray:
    """Integrate every patient one minute with constant inputs (RK4); returns the new (13, N) state."""
    n = x.shape[1]
    out = np.empty_like(x)
    xi = np.empty(13)
    tmp = np.empty(13)
    k1 = np.empty(13)
    k2 = np.empty(13)
    k3 = np.empty(13)
    k4 = np.empty(13)
    h = 1.0 / substeps
    for i in range(n):
        ingestion_mg = ingestion_g_per_min[i] * 1000.0
        insulin_pmol_kg = insulin_u_per_min[i] * 6000.0 / p[BW, i]
        dbar = dbar_mg[i]
        for j in range(13):
            xi[j] = x[j, i]
        for _ in range(substeps):
            _rhs(xi, p, i, ingestion_mg, dbar, insulin_pmol_kg, k1)
            for j in range(13):
                tmp[j] = xi[j] + 0.5 * h * k1[j]
            _rhs(tmp, p, i, ingestion_mg, dbar, insulin_pmol_kg, k2)
            for j in range(13):
                tmp[j] = xi[j] + 0.5 * h * k2[j]
            _rhs(tmp, p, i, ingestion_mg, dbar, insulin_pmol_kg, k3)
            for j in range(13):
                tmp[j] = xi[j] + h * k3[j]
            _rhs(tmp, p, i, ingestion_mg, dbar, insulin_pmol_kg, k4)
            for j in range(13):
                xi[j] = xi[j] + h / 6.0 * (k1[j] + 2.0 * k2[j] + 2.0 * k3[j] + k4[j])
        for j in range(13):
            out[j, i] = xi[j]
    return out


EAT_RATE_G_PER_MIN = 5.0  # simglucose's T1DPatient.EAT_RATE


@njit(cache=True)
def advance_minutes(
    x: np.ndarray,
    p: np.ndarray,
    eat: np.ndarray,
    meals_g: np.ndarray,
    first_meal_extra_g: np.ndarray,
    insulin_u_per_min: np.ndarray,
    substeps: int,
    bg_out: np.ndarray,
    eaten_out: np.ndarray,
    vg: np.ndarray,
) -> np.ndarray:
    """Run every patient through len(meals_g[0]) minutes of eating and integration.

    `eat` rows are simglucose's patient bookkeeping, updated in place: planned meal (g), last
    minute's carbs (g), eating (0/1), stomach content at meal start (mg), carbs eaten since (g).
    `meals_g` (N, M) are the carbs announced each minute, `first_meal_extra_g` (N,) carbs announced
    at the first minute on top (hypo treatment). Writes BG (mg/dL) after each minute into
    `bg_out` (N, M) and the carbs eaten into `eaten_out` (N, M); returns the new state.
    """
    n, minutes = meals_g.shape
    planned, last_cho, eating, last_qsto, last_food = 0, 1, 2, 3, 4
    dbar = np.zeros(n)
    for m in range(minutes):
        to_eat = np.empty(n)
        for i in range(n):
            eat[planned, i] += meals_g[i, m] + (first_meal_extra_g[i] if m == 0 else 0.0)
            if eat[planned, i] > 0:
                to_eat[i] = min(EAT_RATE_G_PER_MIN, eat[planned, i])
                eat[planned, i] = max(eat[planned, i] - to_eat[i], 0.0)
            else:
                to_eat[i] = 0.0
            if to_eat[i] > 0 and eat[last_cho, i] <= 0:
                eat[last_qsto, i] = x[0, i] + x[1, i]
                eat[last_food, i] = 0.0
                eat[eating, i] = 1.0
            if eat[eating, i] > 0:
                eat[last_food, i] += to_eat[i]
            if to_eat[i] <= 0 and eat[last_cho, i] > 0:
                eat[eating, i] = 0.0
            eat[last_cho, i] = to_eat[i]
            eaten_out[i, m] = to_eat[i]
            dbar[i] = eat[last_qsto, i] + eat[last_food, i] * 1000.0
        x = advance_minute(x, p, to_eat, dbar, insulin_u_per_min, substeps)
        for i in range(n):
            bg_out[i, m] = x[12, i] / vg[i]
    return x
