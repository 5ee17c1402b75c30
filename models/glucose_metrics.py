"""CGM consensus metrics (Battelino et al., Diabetes Care 2019) over arrays of glucose readings."""

from __future__ import annotations

import numpy as np

# Ranges of the international consensus on time in ranges, mg/dL.
RANGE_LOW_SEVERE = 54.0
RANGE_LOW = 70.0
RANGE_HIGH = 180.0
RANGE_HIGH_SEVERE = 250.0


def gmi_percent(mean_glucose_mg_dl: np.ndarray | float) -> np.ndarray | float:
    """Glucose management indicator (%) from mean glucose: 3.31 + 0.02392 x mean (mg/dL)."""
    return 3.31 + 0.02392 * mean_glucose_mg_dl


def hba1c_from_mean_glucose(mean_glucose_mg_dl: np.ndarray | float) -> np.ndarray | float:
    """HbA1c (%) from mean glucose by the ADAG relation eAG = 28.7 x HbA1c - 46.7."""
    return (mean_glucose_mg_dl + 46.7) / 28.7


def consensus_metrics(glucose_mg_dl: np.ndarray, axis: int | None = None) -> dict[str, np.ndarray]:
    """Return mean, CV (%), GMI (%) and the five time-in-range shares (%) along `axis`.

    NaN readings (sensor gaps) are left out of every metric.
    """
    g = np.asarray(glucose_mg_dl, dtype=float)
    valid = ~np.isnan(g)
    count = valid.sum(axis=axis)

    def share(mask: np.ndarray) -> np.ndarray:
        return 100.0 * (mask & valid).sum(axis=axis) / count

    mean = np.nanmean(g, axis=axis)
    return {
        "mean_mg_dl": mean,
        "cv_percent": 100.0 * np.nanstd(g, axis=axis) / mean,
        "gmi_percent": np.asarray(gmi_percent(mean)),
        "tir_70_180_percent": share((g >= RANGE_LOW) & (g <= RANGE_HIGH)),
        "tbr_below_70_percent": share(g < RANGE_LOW),
        "tbr_below_54_percent": share(g < RANGE_LOW_SEVERE),
        "tar_above_180_percent": share(g > RANGE_HIGH),
        "tar_above_250_percent": share(g > RANGE_HIGH_SEVERE),
    }
