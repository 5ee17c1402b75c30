"""Insulin pump model: simglucose's rounding to the pump increment and its rate limits."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from models.uva_padova.params import read_param_csv

U_TO_PMOL = 6000.0


@dataclass(frozen=True)
class PumpSpec:
    """One pump from simglucose's pump_params.csv; increments in pmol/min, limits in U/min."""

    name: str
    min_bolus: float
    max_bolus: float
    inc_bolus: float
    min_basal: float
    max_basal: float
    inc_basal: float

    def deliver_basal(self, rate_u_per_min: np.ndarray) -> np.ndarray:
        """Basal rate the pump actually delivers for a commanded rate (U/min)."""
        return _quantize(rate_u_per_min, self.inc_basal, self.min_basal, self.max_basal)

    def deliver_bolus(self, rate_u_per_min: np.ndarray) -> np.ndarray:
        """Bolus rate the pump actually delivers for a commanded rate (U/min)."""
        return _quantize(rate_u_per_min, self.inc_bolus, self.min_bolus, self.max_bolus)


def _quantize(rate: np.ndarray, increment: float, low: float, high: float) -> np.ndarray:
    pmol = np.round(rate * U_TO_PMOL / increment) * increment
    return np.maximum(np.minimum(pmol / U_TO_PMOL, high), low)


@cache
def get_pump(name: str = "Insulet") -> PumpSpec:
    """Return the named pump (simglucose ships Cozmo and Insulet)."""
    rows = {row["Name"]: row for row in read_param_csv("pump_params.csv")}
    if name not in rows:
        raise KeyError(f"unknown insulin pump {name!r}; known: {sorted(rows)}")
    row = rows[name]
    return PumpSpec(
        name=name,
        **{k: float(row[k]) for k in ("min_bolus", "max_bolus", "inc_bolus", "min_basal", "max_basal", "inc_basal")},
    )
