"""Virtual population: many distinct patients perturbed around simglucose's 30, each at rest at rest.

See docs/virtual-population.md for the method and its limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.uva_padova.params import COHORTS, PatientParams, load_base_patients

# State entries that scale with the insulin level: plasma and liver insulin, the two
# subcutaneous depots, and the delayed insulin signals I1 and Id (steady state = Ib).
INSULIN_STATES = (5, 7, 8, 9, 10, 11)
GUT_RATES = ("kmax", "kmin", "kabs")


@dataclass(frozen=True)
class PerturbationSpread:
    """Log-normal spreads (sd of the log) and clip ranges of the per-patient factors."""

    insulin_sensitivity_sd: float = 0.25
    insulin_sensitivity_range: tuple[float, float] = (0.5, 2.0)
    body_weight_sd: float = 0.12
    body_weight_range: tuple[float, float] = (0.75, 1.35)
    gut_rate_sd: float = 0.15
    gut_rate_range: tuple[float, float] = (0.7, 1.4)


def expand_population(
    n: int,
    *,
    seed: int,
    cohort_mix: dict[str, float] | None = None,
    spread: PerturbationSpread | None = None,
) -> PatientParams:
    """Return `n` distinct virtual patients drawn around the 30 base patients.

    Patients are assigned to cohorts by `cohort_mix` (weights over child/adolescent/adult,
    default equal), cycle through that cohort's 10 base patients, and get three independent
    log-normal factors: insulin sensitivity s, body weight w and gastric/intestinal rate g.
    The first copy of each base patient (factors 1) is the base patient itself.
    """
    if n < 1:
        raise ValueError(f"population size must be at least 1, got {n}")
    spread = spread or PerturbationSpread()
    mix = cohort_mix or {c: 1.0 for c in COHORTS}
    unknown = set(mix) - set(COHORTS)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"cohort_mix {mix} must weight some of {COHORTS} with non-negative numbers")
    rng = np.random.default_rng(seed)
    base = load_base_patients()
    counts = _apportion(n, mix)
    picks: list[int] = []
    copies: list[int] = []
    for cohort, count in counts.items():
        members = [i for i, c in enumerate(base.cohort) if c == cohort]
        picks += [members[j % len(members)] for j in range(count)]
        copies += [j // len(members) for j in range(count)]
    copy = np.array(copies)
    pop = base.take(picks)

    def factor(sd: float, bounds: tuple[float, float]) -> np.ndarray:
        drawn = np.clip(np.exp(rng.normal(0.0, sd, size=n)), *bounds)
        return np.where(copy == 0, 1.0, drawn)

    s = factor(spread.insulin_sensitivity_sd, spread.insulin_sensitivity_range)
    w = factor(spread.body_weight_sd, spread.body_weight_range)
    g = factor(spread.gut_rate_sd, spread.gut_rate_range)
    return perturb(pop, insulin_sensitivity=s, body_weight=w, gut_rate=g, copy_index=copy)


def perturb(
    params: PatientParams,
    *,
    insulin_sensitivity: np.ndarray,
    body_weight: np.ndarray,
    gut_rate: np.ndarray,
    copy_index: np.ndarray,
) -> PatientParams:
    """Apply the three factors and recompute each patient's steady state and therapy.

    Insulin sensitivity s multiplies both insulin actions (Vmx on utilisation, kp3 on hepatic
    production) and divides basal insulin Ib: the insulin effect at rest, kp3 * Ib, is unchanged,
    so EGP, utilisation and glucose at rest stay exactly where they were, while the insulin needed
    to hold them (u2ss and every insulin state) falls by 1/s. The model is per kilogram, so a body
    weight factor w changes only BW, hence the dose per kg of a unit. Therapy follows: CR x s,
    CF x s / w, total daily insulin x w / s.
    """
    values = {k: v.copy() for k, v in params.values.items()}
    s, w, g = insulin_sensitivity, body_weight, gut_rate
    values["Vmx"] = values["Vmx"] * s
    values["kp3"] = values["kp3"] * s
    values["Ib"] = values["Ib"] / s
    values["u2ss"] = values["u2ss"] / s
    values["BW"] = values["BW"] * w
    for rate in GUT_RATES:
        values[rate] = values[rate] * g
    x0 = params.x0.copy()
    x0[:, list(INSULIN_STATES)] /= s[:, None]
    names = tuple(f"{base}/v{int(c):03d}" for base, c in zip(params.base_name, copy_index, strict=True))
    return PatientParams(
        names=names,
        cohort=params.cohort,
        base_name=params.base_name,
        values=values,
        x0=x0,
        cr=params.cr * s,
        cf=params.cf * s / w,
        tdi=params.tdi * w / s,
        age=params.age.copy(),
        extra={"insulin_sensitivity": s, "body_weight_factor": w, "gut_rate_factor": g},
    )


def _apportion(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split n patients over cohorts in proportion to the weights (largest remainder)."""
    total = sum(mix.values())
    exact = {c: n * wgt / total for c, wgt in mix.items()}
    counts = {c: int(np.floor(v)) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - counts[c], reverse=True)[: n - sum(counts.values())]:
        counts[c] += 1
    return counts
