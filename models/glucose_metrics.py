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


def probability_in_range(
    lower: np.ndarray,
    median: np.ndarray,
    upper: np.ndarray,
    *,
    low: float = RANGE_LOW,
    high: float = RANGE_HIGH,
    coverage: float = 0.90,
) -> np.ndarray:
    """Probability that a forecast bin's glucose lies in [low, high], from its median and central interval.

    `lower` and `upper` are the forecast's quantiles at (1 - coverage)/2 and (1 + coverage)/2 (same shapes as
    `median`). The glucose is a two-piece normal that reproduces the three quantiles: below the median a normal of
    the lower half-width, above it one of the upper. A zero-width half puts its 50% on the median itself, so a
    zero-width interval gives 1 or 0 (the median in range or not). NaN in any quantile gives NaN.
    """
    from scipy.special import ndtr, ndtri

    scale = float(ndtri(0.5 + coverage / 2.0))
    median = np.asarray(median, dtype=float)
    below = (median - np.asarray(lower, dtype=float)) / scale
    above = (np.asarray(upper, dtype=float) - median) / scale
    if (below < 0).any() or (above < 0).any():
        raise ValueError("quantiles out of order: need lower <= median <= upper in every bin")

    def share_under(x: float, *, inclusive: bool) -> np.ndarray:
        """P(glucose <= x), or P(glucose < x): the half below the median answers for x under it (or at it, strict)."""
        lower_half = (x < median) if inclusive else (x <= median)
        spread = np.where(lower_half, below, above)
        certain = np.where(lower_half, 0.0, 1.0)  # a zero-width half: its mass sits on the median
        return np.where(spread > 0, ndtr((x - median) / np.where(spread > 0, spread, 1.0)), certain)

    inside = share_under(high, inclusive=True) - share_under(low, inclusive=False)
    return np.asarray(np.where(np.isnan(below) | np.isnan(above), np.nan, inside))


def expected_time_in_range(
    lower: np.ndarray,
    median: np.ndarray,
    upper: np.ndarray,
    *,
    low: float = RANGE_LOW,
    high: float = RANGE_HIGH,
    coverage: float = 0.90,
) -> np.ndarray:
    """Expected time in range (%) of forecast trajectories: `probability_in_range` averaged over the last axis (bins).

    Counting the median's bins in range treats the forecast as certain: a trajectory just outside a bound counts 0%
    however wide its interval. The expectation weighs each bin by its chance of being in range; by linearity it does
    not depend on how the errors of different bins are correlated. Zero-width intervals give the median's count.
    """
    inside = probability_in_range(lower, median, upper, low=low, high=high, coverage=coverage)
    return np.asarray(100.0 * inside.mean(axis=-1))
