"""Conformalized quantile regression (Romano, Patterson and Candes, 2019) of the twin's intervals, per horizon.

The network's outer quantiles are learned, not guaranteed: on patients it has not seen they typically cover less
than they claim. CQR fixes that with held-out windows the model was not trained on. For each horizon step it
scores each window by how far the target falls outside [lower, upper] (negative when inside), takes the
ceil((1 - alpha)(n + 1))-th smallest score as an offset, and moves both bounds out by it (in, when negative).
If the held-out windows and the new ones are exchangeable, the calibrated interval covers with probability at
least 1 - alpha. Calibration is site-local: each hospital calibrates the shared model on its own held-out
patients, and the offsets never need to leave the site. Exchangeability is between patients, not between the
overlapping windows of one patient, so hold out whole patients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.twin.windows import QUANTILES

LOWER, MEDIAN, UPPER = 0, QUANTILES.index(0.5), len(QUANTILES) - 1


@dataclass(frozen=True)
class Calibration:
    """Per-horizon CQR offsets in mg/dL (inf where too few held-out targets for the level), from `calibrate`."""

    offsets: np.ndarray  # (HORIZON_STEPS,)
    alpha: float
    counts: np.ndarray  # (HORIZON_STEPS,) held-out targets scored at each horizon

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (an infinite offset is written as None)."""
        return {
            "alpha": self.alpha,
            "offsets": [float(o) if math.isfinite(o) else None for o in self.offsets],
            "counts": [int(c) for c in self.counts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """The inverse of to_dict."""
        offsets = [math.inf if o is None else float(o) for o in data["offsets"]]
        return cls(offsets=np.array(offsets), alpha=float(data["alpha"]), counts=np.array(data["counts"]))


def calibrate(pred: np.ndarray, target: np.ndarray, alpha: float = 0.1) -> Calibration:
    """CQR offsets from held-out forecasts `pred` (n, H, len(QUANTILES)) and targets (n, H), NaN targets skipped.

    `alpha` should match the outer quantiles (0.1 for 0.05 and 0.95); the offset at each horizon is the
    ceil((1 - alpha)(n + 1))-th smallest conformity score, i.e. the empirical (1 - alpha)(1 + 1/n) quantile.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    scores = np.maximum(pred[..., LOWER] - target, target - pred[..., UPPER])  # NaN where the target is
    offsets = np.full(scores.shape[1], np.inf)
    counts = np.zeros(scores.shape[1], dtype=np.int64)
    for step, column in enumerate(scores.T):
        ordered = np.sort(column[~np.isnan(column)])
        counts[step] = len(ordered)
        rank = math.ceil((1.0 - alpha) * (len(ordered) + 1))  # 1-based
        if rank <= len(ordered):
            offsets[step] = ordered[rank - 1]
    return Calibration(offsets=offsets, alpha=alpha, counts=counts)


def apply(pred: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Forecasts with the outer quantiles moved by the offsets; the median stays and stays inside the interval."""
    calibrated = np.array(pred, dtype=np.float64, copy=True)
    median = calibrated[..., MEDIAN]
    calibrated[..., LOWER] = np.minimum(calibrated[..., LOWER] - calibration.offsets, median)
    calibrated[..., UPPER] = np.maximum(calibrated[..., UPPER] + calibration.offsets, median)
    return calibrated


def coverage(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-horizon share of observed targets inside [lower, upper] (NaN at a horizon with none)."""
    observed = ~np.isnan(target)
    inside = (pred[..., LOWER] <= target) & (target <= pred[..., UPPER])
    with np.errstate(invalid="ignore", divide="ignore"):
        return inside.sum(axis=0) / observed.sum(axis=0)
