"""CGM sensor model: simglucose's Johnson-transformed AR(1) noise, sampled at the sensor interval.

simglucose draws one noise value every 15 minutes (an AR(1) process pushed through a Johnson SU
transform, parameters from Breton & Kovatchev 2008), then interpolates blocks of ten of them with a
cubic spline onto the sensor's own grid. Cubic-spline interpolation is linear in the knot values,
so here each block is one matrix product for all patients at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.interpolate import make_interp_spline

from models.uva_padova.params import read_param_csv

NOISE_KNOT_MINUTES = 15  # simglucose's CGMNoise.MDL_SAMPLE_TIME
KNOTS_PER_BLOCK = 10  # simglucose's CGMNoise.PRECOMPUTE


@dataclass(frozen=True)
class CGMSensorSpec:
    """One sensor model from simglucose's sensor_params.csv."""

    name: str
    sample_time: int  # minutes
    pacf: float
    gamma: float
    lam: float
    delta: float
    xi: float
    min_mg_dl: float
    max_mg_dl: float

    @property
    def samples_per_block(self) -> int:
        """Noise samples one block of ten 15-minute knots yields (simglucose's `nsample - 1`)."""
        return math.floor(KNOTS_PER_BLOCK * NOISE_KNOT_MINUTES / self.sample_time)

    def noise(self, seeds: np.ndarray, n_samples: int) -> np.ndarray:
        """Return the first `n_samples` noise values (mg/dL) of each patient's sensor, (N, n).

        Patient i's sequence equals what simglucose's `CGMNoise(params, seed=seeds[i])` yields.
        """
        per_block = self.samples_per_block
        n_blocks = max(1, math.ceil(n_samples / per_block))
        n_knots = KNOTS_PER_BLOCK * n_blocks + 1
        shocks = np.stack([np.random.RandomState(int(s)).randn(n_knots) for s in seeds])
        ar = np.empty_like(shocks)
        ar[:, 0] = shocks[:, 0]
        for j in range(1, n_knots):
            ar[:, j] = self.pacf * (ar[:, j - 1] + shocks[:, j])
        knots = self.xi + self.lam * np.sinh((ar - self.gamma) / self.delta)
        starts = np.arange(n_blocks) * KNOTS_PER_BLOCK
        windows = knots[:, starts[:, None] + np.arange(KNOTS_PER_BLOCK + 1)]  # (N, B, 11)
        weights = _block_weights(self.sample_time)  # (per_block, 11)
        samples = np.einsum("nbk,sk->nbs", windows, weights).reshape(len(seeds), -1)
        return samples[:, :n_samples]

    def measure(self, bg_mg_dl: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Return CGM readings: blood glucose plus noise, clipped to the sensor's range."""
        return np.clip(bg_mg_dl + noise, self.min_mg_dl, self.max_mg_dl)


@cache
def _block_weights(sample_time: float) -> np.ndarray:
    """Cubic (not-a-knot) interpolation weights from 11 knots onto one block's sample times."""
    knot_t = np.arange(KNOTS_PER_BLOCK + 1) * NOISE_KNOT_MINUTES
    n_sample = math.floor(KNOTS_PER_BLOCK * NOISE_KNOT_MINUTES / sample_time) + 1
    sample_t = np.arange(n_sample) * sample_time
    basis = make_interp_spline(knot_t, np.eye(KNOTS_PER_BLOCK + 1), k=3)
    return np.asarray(basis(sample_t[1:]))  # (n_sample - 1, 11): weight of each knot


@cache
def _load_sensors() -> dict[str, CGMSensorSpec]:
    sensors = {}
    for row in read_param_csv("sensor_params.csv"):
        sensors[row["Name"]] = CGMSensorSpec(
            name=row["Name"],
            sample_time=int(float(row["sample_time"])),
            pacf=float(row["PACF"]),
            gamma=float(row["gamma"]),
            lam=float(row["lambda"]),
            delta=float(row["delta"]),
            xi=float(row["xi"]),
            min_mg_dl=float(row["min"]),
            max_mg_dl=float(row["max"]),
        )
    return sensors


def sensor_names() -> list[str]:
    """Names of the CGM sensors simglucose ships (Dexcom, GuardianRT, Navigator)."""
    return sorted(_load_sensors())


def get_sensor(name: str) -> CGMSensorSpec:
    """Return the named sensor model, or explain which names exist."""
    sensors = _load_sensors()
    if name not in sensors:
        raise KeyError(f"unknown CGM sensor {name!r}; known: {sorted(sensors)}")
    return sensors[name]
