"""Tables (polars) of a simulated cohort: patients, true glucose, CGM, meals and insulin."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from models.glucose_metrics import consensus_metrics
from models.uva_padova.cohort import CohortRun

# Demo data starts a week before the 2026 European DST change (29 March), so a 14-day drop spans it.
DEMO_START = datetime(2026, 3, 23)


def cohort_tables(run: CohortRun, start: datetime) -> dict[str, pl.DataFrame]:
    """Long-format tables of a run, timestamps counted from `start`."""
    params, result = run.params, run.result
    names = np.array(params.names)
    n, st = len(params), result.sample_time
    minutes = result.minutes

    def times(offsets_min: np.ndarray) -> pl.Series:
        stamps = offsets_min.astype("timedelta64[m]") + np.datetime64(start.replace(tzinfo=None), "m")
        return pl.Series(stamps.astype("datetime64[ms]")).dt.replace_time_zone("UTC")

    patients = pl.DataFrame(
        {
            "patient": names,
            "cohort": list(params.cohort),
            "base_patient": list(params.base_name),
            "age_years": params.age,
            "body_weight_kg": params.BW,
            "insulin_sensitivity": params.extra.get("insulin_sensitivity", np.ones(n)),
            "cr_g_per_u": params.cr,
            "cf_mg_dl_per_u": params.cf,
            "tdi_u": params.tdi,
            "basal_u_per_h": params.basal_u_per_min * 60.0,
            "p_missed_bolus": run.errors.p_missed,
            "p_late_bolus": run.errors.p_late,
            "carb_count_bias": np.exp(run.errors.carb_bias),
        }
    )
    bg_minutes = np.arange(minutes + 1)
    glucose = pl.DataFrame(
        {
            "patient": np.repeat(names, minutes + 1),
            "time": times(np.tile(bg_minutes, n)),
            "bg_mg_dl": result.bg.ravel(),
        }
    )
    cgm_minutes = np.arange(result.cgm.shape[1]) * st
    cgm = pl.DataFrame(
        {
            "patient": np.repeat(names, len(cgm_minutes)),
            "time": times(np.tile(cgm_minutes, n)),
            "cgm_mg_dl": result.cgm.ravel(),
        }
    )
    plan = run.plan
    meals = pl.DataFrame(
        {
            "patient": names[plan.patient],
            "time": times(plan.minute),
            "carbs_g": plan.carbs_g,
            "bolus_carbs_g": plan.bolus_carbs_g,
            "bolus_delay_min": plan.bolus_delay_min,
        }
    )
    step_minutes = np.arange(result.basal_u_per_min.shape[1]) * st
    insulin = pl.DataFrame(
        {
            "patient": np.repeat(names, len(step_minutes)),
            "time": times(np.tile(step_minutes, n)),
            "basal_u_per_h": result.basal_u_per_min.ravel() * 60.0,
            "bolus_u": result.bolus_u.ravel(),
            "hypo_treatment_carbs_g": result.hypo_treat_g.ravel(),
        }
    )
    return {"patients": patients, "glucose": glucose, "cgm": cgm, "meals": meals, "insulin": insulin}


def write_cohort(run: CohortRun, folder: Path, start: datetime) -> dict[str, Path]:
    """Write the cohort's tables as Parquet files under `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in cohort_tables(run, start).items():
        paths[name] = folder / f"{name}.parquet"
        table.write_parquet(paths[name])
    return paths


def cohort_summary(run: CohortRun) -> pl.DataFrame:
    """Per-cohort consensus metrics of true glucose, and how boluses were given."""
    rows = []
    cohorts = np.array(run.params.cohort)
    plan = run.plan
    for cohort in sorted(set(cohorts)):
        members = np.flatnonzero(cohorts == cohort)
        metrics = consensus_metrics(run.result.bg[members])
        meals = np.isin(plan.patient, members)
        rows.append(
            {
                "cohort": cohort,
                "patients": len(members),
                "patient_days": len(members) * run.result.minutes / 1440,
                **{k: float(v) for k, v in metrics.items()},
                "meals": int(meals.sum()),
                "boluses_missed_percent": 100.0 * float((plan.bolus_carbs_g[meals] == 0).mean()),
                "boluses_late_percent": 100.0 * float((plan.bolus_delay_min[meals] > 0).mean()),
                "hypo_treatments": int((run.result.hypo_treat_g[members] > 0).sum()),
            }
        )
    return pl.DataFrame(rows)
