"""Per-patient calibration of the twin's dose effects, fitted at the site on each patient's own earlier records.

The federated twin has one set of response curves for every hospital's patients; a patient's insulin sensitivity
and carbohydrate absorption are their own. `TwinSurrogate.parts` splits each forecast into the rest and the two
dose effects in it (carbohydrate up, insulin down, mg/dL per target bin). A patient gets two multipliers, one per
effect, fitted by ridge regression of the forecast's error (CGM later recorded minus the median) on those two
effects over the patient's earlier windows:

    error ~ (m_carbs - 1) * carb_effect - (m_insulin - 1) * insulin_effect

with a normal prior centred on the shared model (m = 1, standard deviation `PRIOR_SD`) and the error's variance
per 5-minute bin taken from the site's windows ended by the cut-off: the posterior mean, a ridge regression
whose penalty is variance / PRIOR_SD^2 on each multiplier. A new patient keeps the shared answer, one with weeks
of records moves to their own, and an effect the records barely exercise (a patient who rarely boluses) stays
near 1. Multipliers stay within `MULTIPLIER_RANGE`: a dose effect never changes sign. The forecast, its interval
(moved with the median) and every what-if answer then use the patient's multipliers: a what-if's planned doses
act through the patient's own effects.

No look-ahead: a window counts for a forecast only if its last target bin ended by the forecast's cut-off
(`multipliers(..., as_of=cut-off)`), so scored back-forecasts never see the CGM they are scored on. Nothing here
leaves the site: the evidence and the multipliers are the patient's, computed and used where the records are.

Measured by bench/whatif.py on held-out patients. With the registered DP-trained demo twin
(bench/results/whatif_demo_registry.json) RMSE falls 7-10% at 30 min to 2 h (4% at 4 h), the 4-h what-if
correlations of mean glucose rise by 0.1-0.45 and the mean absolute error of the change falls in four of five
scenarios; but the effect sizes move from about half the simulator's to 0.9-1.8 times it: 20% more bolus
overshoots (1.76x, its error grows by a third), as insulin effects fitted on records where boluses follow meals
and highs absorb some of the meals' effect. With a pooled non-private twin (bench/results/whatif.json) RMSE falls
2-3% and the correlations move by -0.03 to +0.11 (at 2 and 4 h).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.twin.model import TwinSurrogate, predict_parts
from models.twin.windows import HORIZON_STEPS, QUANTILES, Windows

BIN_MS = 5 * 60_000
PRIOR_SD = 0.5  # how far a patient's multiplier is expected to lie from the shared model's 1, a priori
MULTIPLIER_RANGE = (0.2, 5.0)
MEDIAN = QUANTILES.index(0.5)


@dataclass(frozen=True)
class EffectEvidence:
    """Per window of the site's records: whose it is, when its targets ended, and its regression sums."""

    person_id: np.ndarray  # (n,) int64
    ends_ms: np.ndarray  # (n,) int64 epoch ms: end of the window's last target bin
    xx: np.ndarray  # (n, 2, 2) sum over observed target bins of x x^T, x = (carb_effect, -insulin_effect), x overlap
    xy: np.ndarray  # (n, 2) sum of x times the median's error, x overlap
    yy: np.ndarray  # (n,) sum of the median's squared error over observed target bins
    bins: np.ndarray  # (n,) observed target bins

    @property
    def patients(self) -> int:
        """Patients with any evidence."""
        return len(np.unique(self.person_id))


def evidence(model: TwinSurrogate, windows: Windows) -> EffectEvidence:
    """The regression sums of windows with targets (a site's `build_windows`): what `multipliers` fits on.

    Windows `stride` bins apart share their target bins: each CGM bin is the target of HORIZON_STEPS / stride
    windows. The sums are weighted by `overlap` = stride / HORIZON_STEPS so that each recorded bin counts once
    against the prior (its errors across the windows that share it are nearly the same error).
    """
    quantiles, carbs, insulin = predict_parts(model, windows)
    error = windows.target - quantiles[..., MEDIAN]
    observed = ~np.isnan(error)
    x = np.stack([carbs, -insulin], axis=-1) * observed[..., None]
    y = np.where(observed, error, 0.0)
    weight = overlap(windows)
    xx = np.einsum("nta,ntb->nab", x, x) * weight
    xy = np.einsum("nta,nt->na", x, y) * weight
    ends = windows.t0.astype("datetime64[ms]").astype(np.int64) + (HORIZON_STEPS + 1) * BIN_MS
    return EffectEvidence(
        person_id=np.asarray(windows.person_id, dtype=np.int64),
        ends_ms=ends,
        xx=xx,
        xy=xy,
        yy=(y**2).sum(axis=1),
        bins=observed.sum(axis=1),
    )


def overlap(windows: Windows) -> float:
    """The weight that counts each target bin once: stride / HORIZON_STEPS (at most 1).

    The stride is the median step, in bins, between consecutive origins of one patient's windows.
    """
    order = np.lexsort((windows.t0.astype("datetime64[ms]").astype(np.int64), windows.person_id))
    t0 = windows.t0.astype("datetime64[ms]").astype(np.int64)[order]
    same = windows.person_id[order][1:] == windows.person_id[order][:-1]
    steps = np.diff(t0)[same] / BIN_MS
    stride = float(np.median(steps[steps > 0])) if (steps > 0).any() else float(HORIZON_STEPS)
    return min(stride / HORIZON_STEPS, 1.0)


def multipliers(found: EffectEvidence, person_id: np.ndarray, as_of: np.ndarray) -> np.ndarray:
    """(n, 2) carbohydrate and insulin multipliers for each (patient, cut-off), from the evidence ended by then.

    `as_of` is datetime64 (the forecast's input cut-off). A patient without evidence by then gets (1, 1).
    """
    as_of_ms = np.asarray(as_of).astype("datetime64[ms]").astype(np.int64)
    out = np.ones((len(person_id), 2))
    # The site's error variance per bin over the windows ended by each cut-off: the ridge penalty's numerator.
    site_order = np.argsort(found.ends_ms, kind="stable")
    site_ends = found.ends_ms[site_order]
    squared, bins = np.cumsum(found.yy[site_order]), np.cumsum(found.bins[site_order])
    site_used = np.searchsorted(site_ends, as_of_ms, side="right")
    variance = np.where(site_used > 0, squared[site_used - 1] / np.maximum(bins[site_used - 1], 1), 1.0)
    penalty = np.maximum(variance, 1.0) / PRIOR_SD**2
    for person in np.unique(person_id):
        mine = np.flatnonzero(found.person_id == person)
        rows = np.flatnonzero(person_id == person)
        if not len(mine):
            continue
        order = mine[np.argsort(found.ends_ms[mine], kind="stable")]
        ends = found.ends_ms[order]
        xx, xy = np.cumsum(found.xx[order], axis=0), np.cumsum(found.xy[order], axis=0)
        used = np.searchsorted(ends, as_of_ms[rows], side="right")  # windows that ended by each cut-off
        fitted = rows[used > 0]
        last = used[used > 0] - 1
        system = xx[last] + penalty[fitted, None, None] * np.eye(2)
        out[fitted] = 1.0 + np.linalg.solve(system, xy[last][..., None])[..., 0]
    return np.clip(out, *MULTIPLIER_RANGE)


def personal_predict(model: TwinSurrogate, windows: Windows, factors: np.ndarray) -> np.ndarray:
    """Quantile forecasts (n, HORIZON_STEPS, len(QUANTILES)) with each window's dose effects scaled by `factors`.

    `factors` is (n, 2) from `multipliers` (ones give `predict`'s answer). The interval moves with the median.
    """
    quantiles, carbs, insulin = predict_parts(model, windows)
    shift = (factors[:, 0:1] - 1.0) * carbs - (factors[:, 1:2] - 1.0) * insulin
    return quantiles + shift[..., None]


def cutoffs(windows: Windows) -> np.ndarray:
    """Each window's input cut-off: the end of its last history bin (t0 + 5 min), datetime64[ms]."""
    return windows.t0.astype("datetime64[ms]") + np.timedelta64(BIN_MS, "ms")
