"""Benchmark (issue 6): what-if fidelity of the learned twin against the mechanistic simulator, per scenario.

For the held-out TEST patients of every demo hospital (`split_patients`), at every forecast origin where the
simulator's full state is stored (hourly, `states_hourly.npz`: the twin's origin bin t0 ends on the hour, so the
state at t0 + 5 min is where the twin's plan starts), and for each scenario of the twin's catalogue
(`models.twin.scenarios.CATALOGUE`):

- the simulator (`models.uva_padova.whatif.what_if`) replays the recorded plan and the altered plan from that state
  for 4 h, under the matching `Alteration` (`alteration_for`: same meal, same factor, same delay);
- the twin forecasts both plans: its own 2-h forecast, and 4 h by rolling it forward once (a second 2-h forecast
  whose history is the first forecast's median and the first 2 h of the plan, with the plan continuing; the rolled
  window keeps the origin's basal schedule as its reference, see `twin_trajectories`);
- the predicted change (scenario minus recorded plan) in mean glucose and in time in range 70-180 mg/dL over the
  horizon is compared: Pearson correlation, mean absolute error, mean change of each and their ratio.

The issue asks for the change in 4-hour mean glucose and time in range, so the 240-minute rows are the issue's
number; the 120-minute rows are the twin's own horizon, without the roll-forward. The simulator side is the true
plasma glucose, averaged over the same 5-minute bins the twin forecasts (`federated.evaluation` convention).

Exactness of the mapping. A meal scenario acts on the twin's *next planned meal*: the first plan bin with logged
carbohydrate, with the boluses within 15 min of it as its bolus; the simulator's alteration acts on the first meal
that starts in the replay window and on that meal's own bolus. A window is compared only where both pick the same
meal and the same bolus, and where the recorded plan over the 4 h equals what the simulator delivered; the others
are counted by reason under `excluded` (a missed-bolus meal goes unlogged, so the twin cannot see it; a bolus given
more than 15 min late is not the twin's "meal bolus"). What is not excluded, because it is how the scenario plays
out, is listed under `mapping.differences_kept`.

Which twin: the newest model in the registry at --federation-dir if there is one (and --model allows it), else a
pooled non-private twin trained with `fit_local` on every site's train patients (`federated.baselines.pooled`);
the JSON says which. The sites are generated and run through their site flows in a git-ignored folder (the same
`generate_sites` and `site_ingest` as `twinfed demo`), reused with --reuse, as are the pooled twin and the
simulator replays cached there.

Writes bench/results/whatif.json: per scenario and horizon the numbers above, the excluded windows by reason, the
plan agreement, the effect-size ratios by minute, settings, timings and machine, and whether the target
(correlation >= 0.8 for every scenario, mean glucose and time in range, at 4 h) is met, with a diagnosis that
includes the candidate fixes measured by bench/whatif_experiments.py when its results file exists. Beside the
issue's numbers it scores the twin's change in *expected* time in range over its intervals (`tir_expected`), and
sets references for what a better effect model would give: the simulator's exact change on the twin's forecast
level (`tir_with_exact_effect_on_twin_level`) and the share of the simulator's own change that per-patient dose-linear
terms explain in sample (`what_explains_the_simulator_change_240`).

Usage: python bench/whatif.py [--reuse] [--data-dir data/bench-whatif] [--federation-dir data/federation]
                              [--model auto|registry|pooled] [--out bench/results/whatif.json]
The full record: python bench/whatif.py; python bench/whatif_experiments.py; python bench/whatif.py --reuse
(the last run only re-scores the cached twin and replays, folding the experiments into the diagnosis).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.glucose_metrics import expected_time_in_range
from models.twin import HISTORY_CHANNELS, HORIZON_STEPS, QUANTILES, Windows
from models.twin.scenarios import BASAL, BOLUS, CARBS, CATALOGUE, MEAL_BOLUS_BINS, Scenario, apply_scenario
from models.uva_padova.engine import SimResult
from models.uva_padova.scenario import MealPlan
from models.uva_padova.whatif import Alteration

# Run as `python bench/whatif.py`, this folder comes first on sys.path, where bench/federated.py would shadow the
# federated package (imported lazily below); the project's packages come from the install, so the folder goes.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "whatif.json"
EXPERIMENTS = ROOT / "bench" / "results" / "whatif_experiments.json"
DEFAULT_DATA_DIR = ROOT / "data" / "bench-whatif"
DEFAULT_FEDERATION_DIR = ROOT / "data" / "federation"
SITES = ("aurelia", "northbridge", "lakeside")

BIN_MIN = 5
PLAN_BINS = 2 * HORIZON_STEPS  # 4 h: the twin's plan and its continuation
HORIZONS_MIN = (HORIZON_STEPS * BIN_MIN, PLAN_BINS * BIN_MIN)  # 120: the twin as is; 240: the issue's
ISSUE_HORIZON_MIN = 240
PROBE_MIN = (30, 60, 90, 120, 180, 240)
TIR_LOW, TIR_HIGH = 70.0, 180.0
TARGET_CORRELATION = 0.8
STATE_EVERY_MIN = 60  # flows.demo_sites.generate.STATE_EVERY_MIN
MEDIAN = QUANTILES.index(0.5)
HISTORY_BASAL = HISTORY_CHANNELS.index("basal_u")
QUANTITIES = ("mean_glucose", "tir")
CACHE_FORMAT = 2


# --- the scenario on both sides ----------------------------------------------------------------------------------


def alteration_for(scenario: Scenario) -> Alteration:
    """The simulator alteration that asks the twin scenario's question: one change, same factor or delay.

    Raises ValueError for a scenario that changes more than one thing, or one the simulator has no alteration for
    (e.g. a partial meal bolus): `Alteration` is a single change.
    """
    changes = {
        "basal_factor": scenario.basal_factor != 1.0,
        "bolus_factor": scenario.bolus_factor != 1.0,
        "meal_bolus_factor": scenario.meal_bolus_factor != 1.0,
        "meal_carbs_factor": scenario.meal_carbs_factor != 1.0,
        "meal_delay_bins": scenario.meal_delay_bins != 0,
    }
    changed = [name for name, on in changes.items() if on]
    if len(changed) != 1:
        raise ValueError(
            f"scenario {scenario.scenario_id!r} changes {changed or 'nothing'}; an Alteration is one change"
        )
    if changes["basal_factor"]:
        return Alteration("scale_basal", factor=scenario.basal_factor)
    if changes["bolus_factor"]:
        return Alteration("scale_bolus", factor=scenario.bolus_factor)
    if changes["meal_carbs_factor"]:
        return Alteration("scale_meal_carbs", factor=scenario.meal_carbs_factor)
    if changes["meal_delay_bins"]:
        return Alteration("shift_meal", minutes=scenario.meal_delay_bins * BIN_MIN)
    if scenario.meal_bolus_factor == 0.0:
        return Alteration("skip_bolus")
    raise ValueError(f"scenario {scenario.scenario_id!r}: the simulator can skip a meal bolus, not scale it alone")


def scenario_plan(windows: Windows, plan: np.ndarray, scenario: Scenario) -> tuple[np.ndarray, np.ndarray]:
    """The scenario applied to a 4-h plan (n, PLAN_BINS, 3), and where it applies (a meal in the first 2 h).

    The catalogue rewrites a 2-h plan; on 4 h it picks the same next meal (the first within 2 h), so its first 2 h
    equal the catalogue's own answer (checked), a meal moved past 2 h lands in the continuation instead of leaving,
    and factors on basal and boluses hold for the 4 h, as the simulator's alteration does over its 4-h replay.
    """
    two_hours, applies = apply_scenario(windows, scenario)
    altered, _ = apply_scenario(replace(windows, future_inputs=plan), scenario)
    if not np.array_equal(altered.future_inputs[:, :HORIZON_STEPS], two_hours.future_inputs):
        raise AssertionError(f"{scenario.scenario_id}: the 4-h plan's first 2 h differ from the catalogue's answer")
    return altered.future_inputs, applies


def delivered_bins(result: SimResult, bins: int) -> np.ndarray:
    """Basal and bolus units a replay delivered in each 5-minute bin from its start, (N, bins, 2).

    Basal is spread over the minutes of its control step (a 3-minute step straddles bins), a bolus lands in the bin
    of its step's start: how the pump history's records land on the features grid.
    """
    st = result.sample_time
    basal_per_minute = np.repeat(result.basal_u_per_min, st, axis=1)[:, : bins * BIN_MIN]
    basal = basal_per_minute.reshape(len(basal_per_minute), bins, BIN_MIN).sum(axis=2)
    bolus = np.zeros((len(basal), bins))
    patient, step = np.nonzero(result.bolus_u)
    inside = step * st < bins * BIN_MIN
    np.add.at(bolus, (patient[inside], step[inside] * st // BIN_MIN), result.bolus_u[patient[inside], step[inside]])
    return np.stack([basal, bolus], axis=2)


def meal_bins(plan: MealPlan, bins: int) -> np.ndarray:
    """Carbohydrate eaten per 5-minute bin of a (re-timed) meal plan, at each meal's start, (N, bins)."""
    carbs = np.zeros((plan.n_patients, bins))
    inside = (plan.minute >= 0) & (plan.minute < bins * BIN_MIN)
    np.add.at(carbs, (plan.patient[inside], plan.minute[inside] // BIN_MIN), plan.carbs_g[inside])
    return carbs


# --- what is compared ----------------------------------------------------------------------------------------------


def trajectory_summary(glucose: np.ndarray) -> dict[str, np.ndarray]:
    """Mean glucose (mg/dL) and time in range 70-180 (%) of each row of 5-minute glucose bins, (n, bins)."""
    in_range = (glucose >= TIR_LOW) & (glucose <= TIR_HIGH)
    return {"mean_glucose": glucose.mean(axis=1), "tir": 100.0 * in_range.mean(axis=1)}


def change_metrics(simulated: np.ndarray, twin: np.ndarray) -> dict[str, Any]:
    """How the twin's predicted changes match the simulator's, window by window (1-d arrays, same length).

    Pearson correlation (None when either side is constant), mean absolute error, the mean change of each, the
    effect-size ratio (mean twin change over mean simulator change) and the least-squares slope of twin on simulator.
    """
    simulated, twin = np.asarray(simulated, dtype=np.float64), np.asarray(twin, dtype=np.float64)
    n = len(simulated)
    if n == 0:
        return {"n": 0}
    spread = simulated.std() > 1e-12 and twin.std() > 1e-12
    mean_sim, mean_twin = float(simulated.mean()), float(twin.mean())
    centred = simulated - mean_sim
    variance = float((centred**2).sum())
    return {
        "n": n,
        "pearson_r": _round(np.corrcoef(simulated, twin)[0, 1]) if spread else None,
        "mae": _round(np.abs(twin - simulated).mean()),
        "mean_simulator_change": _round(mean_sim),
        "mean_twin_change": _round(mean_twin),
        "effect_size_ratio": _round(mean_twin / mean_sim) if abs(mean_sim) > 1e-9 else None,
        "slope_twin_on_simulator": _round((centred * (twin - mean_twin)).sum() / variance) if variance > 0 else None,
    }


def _round(value: Any, digits: int = 4) -> float:
    return round(float(value), digits)


# --- the sites, their simulator runs and the windows ---------------------------------------------------------------


def prepare_sites(data_dir: Path, *, reuse: bool, patients: int, days: int) -> dict[str, Any]:
    """Generate the demo hospitals and run their site flows under `data_dir`, or reuse what is there."""
    data_dir = data_dir.resolve()  # the flow's Great Expectations workspace needs an absolute path
    ready = all((data_dir / "sites" / s / "features" / "features.json").exists() for s in SITES)
    record = data_dir / "whatif-preparation.json"  # what generating and ingesting took, for reused runs to report
    if reuse and ready:
        earlier = json.loads(record.read_text()) if record.exists() else {}
        return {**earlier, "reused": True, "data_dir": str(data_dir)}
    from flows.demo_sites.ingested import generate_and_ingest

    done = generate_and_ingest(data_dir, SITES, patients=patients, days=days)
    record.write_text(json.dumps(done) + "\n")
    return {**done, "reused": False, "data_dir": str(data_dir)}


@dataclass(frozen=True)
class SiteSimulation:
    """A site's simulator run, regenerated from its ground truth and checked against the stored hourly states."""

    site: str
    run: Any  # models.uva_padova.cohort.CohortRun, with every step's state recorded
    start_ms: int  # UTC epoch ms of the run's minute 0
    patient_of_person: dict[int, int]  # pseudonymous person_id -> simulator patient index


def load_simulation(data_dir: Path, site: str) -> SiteSimulation:
    """Re-run the site's cohort (deterministic) and link its patients to the site's pseudonymous person ids.

    The generator keeps the full state only hourly; what_if needs the run itself, so the run is regenerated from
    the profile in generation.json and must reproduce the stored hourly states bit for bit.
    """
    from federated.evaluation import source_patient_id
    from flows.demo_sites.generate import SitePaths, simulate_site
    from flows.demo_sites.profile import SiteProfile
    from flows.ingest.pseudonym import PERSON_PREFIX, load_or_create_secret, pseudonym, pseudonym_id

    paths = SitePaths.under(data_dir, site)
    meta = json.loads((paths.truth / "generation.json").read_text())
    run = simulate_site(SiteProfile.model_validate(meta["site"]), record_states=True)
    every = STATE_EVERY_MIN // run.result.sample_time
    with np.load(paths.truth / "states_hourly.npz", allow_pickle=False) as stored:
        mrn, stored_x, stored_minute = stored["mrn"], stored["x"], stored["minute"]
    if not np.array_equal(stored_minute, np.arange(len(stored_minute)) * STATE_EVERY_MIN):
        raise SystemExit(f"{paths.truth / 'states_hourly.npz'}: states are not kept every {STATE_EVERY_MIN} min")
    if run.result.step_states is None or not np.array_equal(run.result.step_states.x[::every], stored_x):
        raise SystemExit(
            f"{paths.truth / 'states_hourly.npz'}: the regenerated run does not reproduce the stored states; the "
            "ground truth was written by another version of the simulator (regenerate without --reuse)"
        )
    secret_path = data_dir / "sites" / site / "secret.key"
    if not secret_path.exists():
        raise FileNotFoundError(f"{secret_path}: no site secret; run the site flow before linking truth")
    secret = load_or_create_secret(secret_path)
    export_format = meta["site"]["export"]["format"]
    people = {
        pseudonym_id(pseudonym(secret, PERSON_PREFIX, source_patient_id(export_format, site, str(m)))): i
        for i, m in enumerate(mrn)
    }
    start = np.datetime64(datetime.fromisoformat(meta["window_start_utc"]).replace(tzinfo=None), "ms")
    return SiteSimulation(site=site, run=run, start_ms=int(start.astype(np.int64)), patient_of_person=people)


def hourly_windows(features: Any, test_people: np.ndarray, start_ms: int, minutes: int) -> tuple[Windows, np.ndarray]:
    """Test windows whose plan starts on a stored state (hourly), with their recorded 4-h plan (n, PLAN_BINS, 3).

    Each person's grid is cut to begin on the hour of the run's clock and cut into windows every 12 bins, so every
    origin bin t0 ends on the hour; windows whose 4-h plan or 4-h replay would run past the data are dropped.
    """
    import polars as pl

    from flows.features import BIN_MS, FeatureSet
    from models.twin import build_windows

    hour_ms = STATE_EVERY_MIN * 60_000
    grid = features.grid.filter(pl.col("person_id").is_in(test_people.tolist())).sort("person_id", "bin_start")
    since = pl.col("bin_start").dt.epoch("ms") - start_ms
    grid = grid.filter(pl.col("bin_start") >= pl.col("bin_start").filter(since % hour_ms == 0).min().over("person_id"))
    windows = build_windows(FeatureSet(grid=grid, static=features.static), stride=STATE_EVERY_MIN // BIN_MIN)

    person = grid["person_id"].to_numpy()
    bin_ms = grid["bin_start"].dt.epoch("ms").to_numpy()
    inputs = np.stack([grid[c].to_numpy() for c in ("basal_u", "bolus_u", "carbs_logged_g")], axis=1)
    rows = pl.DataFrame({"person_id": person, "ms": bin_ms}).with_row_index("row")
    origins = pl.DataFrame({"person_id": windows.person_id, "ms": windows.t0.astype(np.int64)})
    row = (
        origins.join(rows, on=["person_id", "ms"], how="left", maintain_order="left")["row"].to_numpy().astype(np.int64)
    )
    last = np.minimum(row + PLAN_BINS, len(person) - 1)
    origin_minute = (windows.t0.astype(np.int64) + BIN_MS - start_ms) // 60_000
    keep = (
        (last == row + PLAN_BINS)
        & (person[last] == windows.person_id)
        & (bin_ms[last] - bin_ms[row] == PLAN_BINS * BIN_MS)
        & (origin_minute % STATE_EVERY_MIN == 0)
        & (origin_minute + PLAN_BINS * BIN_MIN <= minutes)
    )
    index = np.flatnonzero(keep)
    plan = inputs[row[index, None] + np.arange(1, PLAN_BINS + 1)].astype(np.float32)
    return windows.select(index), plan


@dataclass(frozen=True)
class SiteCases:
    """One site's compared windows and what the simulator did from each (rows align with `windows`)."""

    site: str
    windows: Windows  # test windows at hourly origins, the recorded first 2 h of plan
    plan: np.ndarray  # (n, PLAN_BINS, 3) the recorded plan over 4 h
    sim_patient: np.ndarray  # (n,) simulator patient index
    origin_minute: np.ndarray  # (n,) minutes from the run's start to the state the replays start from
    sim_factual: np.ndarray  # (n, PLAN_BINS) true glucose per bin, recorded plan
    sim_scenario: dict[str, np.ndarray]  # scenario id -> (n, PLAN_BINS), NaN rows where not compared
    twin_applicable: dict[str, np.ndarray]  # scenario id -> (n,) bool: the twin answers it (a meal in the first 2 h)
    excluded: dict[str, dict[str, int]]  # scenario id -> reason -> windows
    plan_gap: dict[str, np.ndarray]  # scenario id -> (n,) max |twin - simulator| bolus change (U) where the twin's is
    bolus_feedback: dict[str, np.ndarray]  # scenario id -> (n,) bolus the simulator's calculator changed elsewhere (U)
    hypo_treatment_change: dict[str, np.ndarray]  # scenario id -> (n,) hypo-treatment carbs, altered minus recorded (g)
    seconds: float = 0.0  # what building them took (regenerating the run and every replay)

    def save(self, path: Path) -> None:
        """Write the cases to one .npz (no pickles)."""
        arrays: dict[str, Any] = {f"windows/{f.name}": getattr(self.windows, f.name) for f in fields(Windows)}
        arrays["windows/t0"] = self.windows.t0.astype(np.int64)
        arrays.update(
            plan=self.plan, sim_patient=self.sim_patient, origin_minute=self.origin_minute, sim_factual=self.sim_factual
        )
        for sid in self.sim_scenario:
            arrays.update(
                {
                    f"{sid}/sim": self.sim_scenario[sid],
                    f"{sid}/applicable": self.twin_applicable[sid],
                    f"{sid}/plan_gap": self.plan_gap[sid],
                    f"{sid}/feedback": self.bolus_feedback[sid],
                    f"{sid}/hypo_treatment": self.hypo_treatment_change[sid],
                }
            )
        meta = json.dumps(
            {"format": CACHE_FORMAT, "site": self.site, "excluded": self.excluded, "seconds": self.seconds}
        )
        np.savez_compressed(path, meta=np.array(meta), **arrays)

    @classmethod
    def load(cls, path: Path) -> SiteCases | None:
        """Read what `save` wrote; None when another version of this bench wrote it."""
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            if meta["format"] != CACHE_FORMAT:
                return None
            values = {f.name: stored[f"windows/{f.name}"] for f in fields(Windows)}
            values["t0"] = values["t0"].astype("datetime64[ms]")
            ids = list(meta["excluded"])
            return cls(
                site=meta["site"],
                windows=Windows(**values),
                plan=stored["plan"],
                sim_patient=stored["sim_patient"],
                origin_minute=stored["origin_minute"],
                sim_factual=stored["sim_factual"],
                sim_scenario={sid: stored[f"{sid}/sim"] for sid in ids},
                twin_applicable={sid: stored[f"{sid}/applicable"] for sid in ids},
                excluded=meta["excluded"],
                plan_gap={sid: stored[f"{sid}/plan_gap"] for sid in ids},
                bolus_feedback={sid: stored[f"{sid}/feedback"] for sid in ids},
                hypo_treatment_change={sid: stored[f"{sid}/hypo_treatment"] for sid in ids},
                seconds=float(meta.get("seconds", 0.0)),
            )


def first_meals(plan: MealPlan, patient: np.ndarray, origin_minute: np.ndarray, sample_time: int) -> dict[str, Any]:
    """Each window's first meal starting within 4 h of its origin, as the simulator's alterations pick it.

    Returns `found` (bool), `bin` (plan bin of the meal's start), `logged` (bolused, hence logged) and `bolus_bin`
    (plan bin where its bolus is delivered; -1 when missed).
    """
    span = int(max(plan.minutes, origin_minute.max(initial=0))) + PLAN_BINS * BIN_MIN + 1
    key = plan.patient.astype(np.int64) * span + plan.minute
    order = np.argsort(key, kind="stable")
    position = np.searchsorted(key[order], patient.astype(np.int64) * span + origin_minute)
    at = order[np.minimum(position, len(order) - 1)]
    found = (position < len(order)) & (plan.patient[at] == patient)
    found &= (plan.minute[at] >= origin_minute) & (plan.minute[at] < origin_minute + PLAN_BINS * BIN_MIN)
    logged = plan.bolus_carbs_g[at] > 0
    # BasalBolusTherapy.dosing_plan: the bolus comes one control step after the (possibly late) bolus moment.
    bolus_minute = ((plan.minute[at] + plan.bolus_delay_min[at]) // sample_time + 1) * sample_time
    return {
        "found": found,
        "bin": np.where(found, (plan.minute[at] - origin_minute) // BIN_MIN, -1),
        "logged": found & logged,
        "bolus_bin": np.where(found & logged, (bolus_minute - origin_minute) // BIN_MIN, -1),
    }


def recorded_matches_simulation(
    sim: SiteSimulation, plan: np.ndarray, patient: np.ndarray, origin_minute: np.ndarray
) -> np.ndarray:
    """Where the recorded 4-h plan's boluses and logged meals are what the simulator delivered and was told.

    A window fails when the site flow quarantined or never received one of its records (a fault of the drop).
    """
    run = sim.run
    st = run.result.sample_time
    steps = PLAN_BINS * BIN_MIN // st
    step = origin_minute[:, None] // st + np.arange(steps)
    bolus = np.zeros((len(patient), PLAN_BINS))
    delivered = np.round(run.result.bolus_u[patient[:, None], step], 2)
    rows, cols = np.nonzero(delivered)
    np.add.at(bolus, (rows, (step[rows, cols] * st - origin_minute[rows]) // BIN_MIN), delivered[rows, cols])
    logged = replace(run.plan, carbs_g=run.plan.bolus_carbs_g)
    carbs = np.zeros((len(patient), PLAN_BINS))
    for m in np.unique(origin_minute):
        here = np.flatnonzero(origin_minute == m)
        window = logged.window(int(m), PLAN_BINS * BIN_MIN, sample_time=st, patients=patient[here])
        carbs[here] = meal_bins(window, PLAN_BINS)
    return (np.abs(plan[..., BOLUS] - bolus).max(axis=1) < 0.015) & (np.abs(plan[..., CARBS] - carbs).max(axis=1) < 0.5)


def match_scenario(
    scenario: Scenario, plan: np.ndarray, applies: np.ndarray, meals: dict[str, Any]
) -> tuple[np.ndarray, dict[str, int]]:
    """Where the simulator's alteration changes exactly what the twin's scenario changes; the others by reason."""
    if not scenario.needs_meal:
        return np.ones(len(plan), dtype=bool), {}
    has_carbs = plan[:, :, CARBS] > 0
    twin_bin = np.argmax(has_carbs, axis=1)
    offset = np.arange(PLAN_BINS)[None, :] - twin_bin[:, None]
    twin_bolus = (np.abs(offset) <= MEAL_BOLUS_BINS) & (plan[:, :, BOLUS] > 0)
    sim_bolus = np.zeros_like(twin_bolus)
    has_bolus = meals["bolus_bin"] >= 0
    inside = has_bolus & (meals["bolus_bin"] < PLAN_BINS)
    sim_bolus[np.flatnonzero(inside), meals["bolus_bin"][inside]] = True
    same_meal = meals["found"] & (meals["bin"] == twin_bin)
    same_bolus = (twin_bolus == sim_bolus).all(axis=1)
    needs_bolus = scenario.meal_bolus_factor != 1.0 or scenario.meal_delay_bins != 0
    unlogged_first = meals["found"] & ~meals["logged"] & (meals["bin"] < twin_bin)
    late = has_bolus & (meals["bolus_bin"] - meals["bin"] > MEAL_BOLUS_BINS)
    reasons = {
        "twin_not_applicable_no_logged_meal_in_2h": ~applies,
        "first_meal_unlogged_missed_bolus": applies & unlogged_first,
        "first_meal_differs": applies & ~unlogged_first & ~same_meal,
        "meal_bolus_late_over_15_min": applies & same_meal & needs_bolus & late,
        "other_bolus_within_15_min_of_meal": applies & same_meal & needs_bolus & ~late & ~same_bolus,
    }
    matched = applies & same_meal & (same_bolus | (not needs_bolus))
    return matched, {reason: int(mask.sum()) for reason, mask in reasons.items() if mask.any()}


def glucose_bins(result: SimResult, bins: int) -> np.ndarray:
    """True plasma glucose averaged over each 5-minute bin from the replay's start, (N, bins)."""
    minutes = result.bg[:, : bins * BIN_MIN]
    return minutes.reshape(len(minutes), bins, BIN_MIN).mean(axis=2)


def simulate_cases(sim: SiteSimulation, windows: Windows, plan: np.ndarray) -> SiteCases:
    """Replay every window's recorded and altered plans from its stored state, for every catalogue scenario."""
    from models.uva_padova.whatif import what_if

    run = sim.run
    st = run.result.sample_time
    patient = np.array([sim.patient_of_person[int(p)] for p in windows.person_id])
    origin_minute = (windows.t0.astype(np.int64) + BIN_MIN * 60_000 - sim.start_ms) // 60_000
    faithful = recorded_matches_simulation(sim, plan, patient, origin_minute)
    meals = first_meals(run.plan, patient, origin_minute, st)
    n = len(windows)
    sim_factual = np.full((n, PLAN_BINS), np.nan)
    sim_scenario, applicable, excluded, plan_gap, bolus_feedback, hypo = {}, {}, {}, {}, {}, {}
    for scenario in CATALOGUE:
        sid = scenario.scenario_id
        alteration = alteration_for(scenario)
        altered_plan, applies = scenario_plan(windows, plan, scenario)
        matched, reasons = match_scenario(scenario, plan, applies, meals)
        reasons = {**reasons, "recorded_plan_differs_from_simulation": int((matched & ~faithful).sum())}
        matched &= faithful
        twin_change = altered_plan[..., BOLUS] - plan[..., BOLUS]
        result = np.full((n, PLAN_BINS), np.nan)
        gap, feedback, treated = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        for m in np.unique(origin_minute[matched]):
            here = np.flatnonzero(matched & (origin_minute == m))
            replays = what_if(
                run.params,
                run.result,
                run.plan,
                run.therapy,
                sensor=run.sensor,
                sensor_seeds=run.sensor_seeds,
                patients=patient[here],
                from_step=int(m) // st,
                steps=PLAN_BINS * BIN_MIN // st,
                alteration=alteration,
                pump=run.pump,
            )
            sim_factual[here] = glucose_bins(replays.factual, PLAN_BINS)
            result[here] = glucose_bins(replays.counterfactual, PLAN_BINS)
            sim_change = delivered_bins(replays.counterfactual, PLAN_BINS) - delivered_bins(replays.factual, PLAN_BINS)
            changed = twin_change[here] != 0
            difference = np.abs(twin_change[here] - sim_change[..., 1])
            gap[here] = np.where(changed, difference, 0.0).max(axis=1)
            feedback[here] = np.where(changed, 0.0, sim_change[..., 1]).sum(axis=1)
            treated[here] = replays.counterfactual.hypo_treat_g.sum(axis=1) - replays.factual.hypo_treat_g.sum(axis=1)
        sim_scenario[sid], applicable[sid], plan_gap[sid], bolus_feedback[sid] = result, applies, gap, feedback
        hypo[sid] = treated
        excluded[sid] = {reason: count for reason, count in reasons.items() if count}
    return SiteCases(
        sim.site,
        windows,
        plan,
        patient,
        origin_minute,
        sim_factual,
        sim_scenario,
        applicable,
        excluded,
        plan_gap,
        bolus_feedback,
        hypo,
    )


# --- the twin ------------------------------------------------------------------------------------------------------


def twin_trajectories(
    model: Any, windows: Windows, plan: np.ndarray, *, keep_schedule: bool = True, factors: np.ndarray | None = None
) -> np.ndarray:
    """The twin's quantiles over 4 h, (n, PLAN_BINS, len(QUANTILES)): its 2-h forecast, then one rolled forward.

    The second window's history is the first forecast's median (as observed CGM) with the first 2 h of the plan as
    its inputs; its plan is the plan's next 2 h. The first 2 h are the twin's own forecast of that plan. The rolled
    forecast starts from the first one's median as if it were observed, so its interval half-widths are widened by
    the first forecast's at 2 h (added in quadrature, as independent errors add).

    The twin measures basal against the mean basal of its history (its "scheduled" rate), so in a rolled window a
    temporary basal would become the new schedule and stop acting. With `keep_schedule`, the rolled history keeps
    the origin's schedule as its basal and carries the plan's deviation from it in the bolus channel: the twin adds
    basal and bolus into one insulin dose, so the doses are the same and only the reference is the origin's.

    With `factors` ((n, 2) from `models.twin.personal.multipliers`), both forecasts use each patient's dose-effect
    multipliers, as the prediction flow does; without, the shared model's answer.
    """
    from models.twin import predict
    from models.twin.personal import personal_predict

    def forecast(chosen: Windows) -> np.ndarray:
        return predict(model, chosen) if factors is None else personal_predict(model, chosen, factors)

    first = forecast(replace(windows, future_inputs=plan[:, :HORIZON_STEPS]))
    median = first[..., MEDIAN]
    inputs = plan[:, :HORIZON_STEPS].astype(np.float32, copy=True)
    if keep_schedule:
        scheduled = windows.history[..., HISTORY_BASAL].mean(axis=1, keepdims=True)
        inputs[..., BOLUS] += inputs[..., BASAL] - scheduled
        inputs[..., BASAL] = scheduled
    history = np.concatenate([median[..., None], np.ones_like(median)[..., None], inputs], axis=2).astype(np.float32)
    rolled = Windows(
        history=history,
        future_inputs=plan[:, HORIZON_STEPS:],
        static=windows.static,
        target=np.full((len(windows), HORIZON_STEPS), np.nan, dtype=np.float32),
        last_cgm=median[:, -1].astype(np.float32),
        person_id=windows.person_id,
        t0=windows.t0 + np.timedelta64(HORIZON_STEPS * BIN_MIN, "m"),
    )
    second = forecast(rolled)
    carried = np.abs(first[:, -1:, :] - median[:, -1:, None])  # (n, 1, quantiles): half-widths at 2 h
    offset = second - second[..., MEDIAN : MEDIAN + 1]
    side = np.sign(np.asarray(QUANTILES) - 0.5)  # -1 below the median, +1 above, 0 for the median itself
    second = second[..., MEDIAN : MEDIAN + 1] + side * np.sqrt(offset**2 + carried**2)
    return np.concatenate([first, second], axis=1)


def load_twin(
    choice: str, federation_dir: Path, data_dir: Path, cache_dir: Path, *, reuse: bool
) -> tuple[Any, dict[str, Any]]:
    """The twin to test and how it was made: the registry's newest model, or a pooled non-private twin."""
    import torch

    from federated.registry import Registry

    latest = Registry(federation_dir).latest() if choice in ("auto", "registry") else None
    if choice == "registry" and latest is None:
        raise SystemExit(f"{federation_dir / 'registry'}: no registered twin; train one or use --model pooled")
    if latest is not None:
        metadata = {k: v for k, v in latest.metadata.items() if k != "normalizer"}
        return latest.model(), {"source": "registry", "path": str(latest.path), "metadata": metadata}
    from federated.baselines import TrainingBudget, pooled
    from flows.features import read_features
    from models.twin import Normalizer, TwinSurrogate, build_windows, load_state_arrays, split_patients, state_arrays

    budget = TrainingBudget()
    cache = cache_dir / "whatif-pooled-twin.npz"
    # The cached twin is reused only for the same budget and the same twin code (models/twin may have changed).
    key = {"budget": budget.__dict__, "twin_source_sha256": twin_source_digest()}
    info: dict[str, Any] = {
        "twin_source_sha256": key["twin_source_sha256"],
        "source": "pooled non-private twin: federated.baselines.pooled (fit_local on every site's train patients, "
        f"stride-3 windows); no registered model in {federation_dir / 'registry'}"
        if choice == "auto"
        else "pooled non-private twin (--model pooled)",
        "budget": budget.__dict__,
    }
    if reuse and cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            if meta.get("key") == key:
                model = TwinSurrogate(Normalizer.from_dict(meta["normalizer"]))
                load_state_arrays(model, [stored[f"{i:04d}"] for i in range(meta["arrays"])])
                return model, {**info, **meta["training"], "reused_from": str(cache)}
    started = time.perf_counter()
    splits = {s: split_patients(build_windows(read_features(data_dir / "sites" / s / "features"))) for s in SITES}
    torch.manual_seed(budget.seed)
    model, history = pooled(splits, budget)
    training = {
        "train_windows": history["windows"],
        "steps": history["steps"],
        "epoch_loss": [_round(x) for x in history["epoch_loss"]],
        "seconds": round(time.perf_counter() - started, 1),
    }
    arrays = state_arrays(model)
    meta = {
        "key": key,
        "normalizer": model.normalizer().to_dict(),
        "arrays": len(arrays),
        "training": training,
    }
    named = {f"{i:04d}": a for i, a in enumerate(arrays)}
    np.savez(cache, allow_pickle=False, meta=np.array(json.dumps(meta)), **named)
    return model, {**info, **training}


def twin_source_digest() -> str:
    """sha256 of the twin's code (models/twin/*.py): which TwinSurrogate a number belongs to."""
    import models.twin

    digest = hashlib.sha256()
    for path in sorted(Path(models.twin.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# --- scoring -------------------------------------------------------------------------------------------------------


def score(cases: Sequence[SiteCases], model: Any, factors: np.ndarray | None = None) -> dict[str, Any]:
    """Per scenario and horizon: the twin's predicted changes against the simulator's, and the effect by minute.

    `factors` ((n, 2), rows as the cases' windows concatenated) are per-patient dose-effect multipliers; None scores
    the shared model.
    """
    windows = _concat_windows([c.windows for c in cases])
    plan = np.concatenate([c.plan for c in cases])
    site = np.concatenate([np.full(len(c.windows), c.site) for c in cases])
    sim_factual = np.concatenate([c.sim_factual for c in cases])
    twin_factual = twin_trajectories(model, windows, plan, factors=factors)
    out: dict[str, Any] = {}
    for scenario in CATALOGUE:
        sid = scenario.scenario_id
        sim_scenario = np.concatenate([c.sim_scenario[sid] for c in cases])
        compared = ~np.isnan(sim_scenario).any(axis=1)
        altered, _ = scenario_plan(windows, plan, scenario)
        chosen = windows.select(np.flatnonzero(compared))
        compared_factors = None if factors is None else factors[compared]
        twin_scenario = twin_trajectories(model, chosen, altered[compared], factors=compared_factors)
        sim_before, sim_after, twin_before = sim_factual[compared], sim_scenario[compared], twin_factual[compared]
        sim_delta, twin_delta = sim_after - sim_before, (twin_scenario - twin_before)[..., MEDIAN]
        feedback = np.concatenate([c.bolus_feedback[sid] for c in cases])[compared]
        treated = np.concatenate([c.hypo_treatment_change[sid] for c in cases])[compared]
        # Windows where the simulated patient behaved the same in both replays: no other bolus changed by the
        # calculator's correction, no hypo treatment eaten or skipped because of the change.
        quiet = (np.abs(feedback) <= 0.05) & (treated == 0)
        horizons = {}
        for m in HORIZONS_MIN:
            horizons[str(m)] = _horizon_metrics(sim_before, sim_after, twin_before, twin_scenario, m)
            horizons[str(m)]["same_patient_behaviour_in_both_replays"] = _horizon_metrics(
                sim_before[quiet], sim_after[quiet], twin_before[quiet], twin_scenario[quiet], m
            )
        person = windows.person_id[compared]
        per_site: dict[str, Any] = {}
        for name in SITES:
            mine = site[compared] == name
            sim_m, twin_m = sim_delta[mine].mean(axis=1), twin_delta[mine].mean(axis=1)
            per_site[name] = {k: change_metrics(sim_m, twin_m)[k] for k in ("n", "pearson_r", "effect_size_ratio")}
        excluded: dict[str, int] = {}
        for c in cases:
            for reason, count in c.excluded[sid].items():
                excluded[reason] = excluded.get(reason, 0) + count
        issue = horizons[str(ISSUE_HORIZON_MIN)]
        out[sid] = {
            "description": scenario.description,
            "alteration": dict(alteration_for(scenario).__dict__),
            "windows": {
                "at_hourly_origins": len(windows),
                "twin_applicable": int(np.concatenate([c.twin_applicable[sid] for c in cases]).sum()),
                "compared": int(compared.sum()),
                "excluded": excluded,
            },
            "plan_agreement": _plan_agreement(np.concatenate([c.plan_gap[sid] for c in cases])[compared], feedback),
            "simulated_patient_behaviour": {
                "share_with_calculator_feedback_bolus": _round((np.abs(feedback) > 0.05).mean()),
                "share_with_hypo_treatment_change": _round((treated != 0).mean()),
                "mean_hypo_treatment_change_g": _round(treated.mean()),
            },
            "horizons_min": horizons,
            "effect_by_minute": _effect_by_minute(sim_delta, twin_delta),
            "per_site_mean_glucose_240": per_site,
            "between_and_within_patients_mean_glucose_240": _patient_decomposition(
                sim_delta.mean(axis=1), twin_delta.mean(axis=1), person
            ),
            "what_explains_the_simulator_change_240": _simulator_change_explained(
                sim_delta.mean(axis=1),
                person,
                sim_before.mean(axis=1),
                treated,
                feedback,
                ((altered - plan)[compared] * _REMAINING[None, :, None]).sum(axis=1),
            ),
            "met": {q: _r_or_worst(issue[q].get("pearson_r")) >= TARGET_CORRELATION for q in QUANTITIES},
        }
        if scenario.basal_factor != 1.0:  # what the roll-forward would say without keeping the origin's schedule
            naive, naive_before = (
                twin_trajectories(model, chosen, p[compared], keep_schedule=False, factors=compared_factors)
                for p in (altered, plan)
            )
            out[sid]["rollout_without_kept_schedule_240"] = _horizon_metrics(
                sim_before, sim_after, naive_before, naive, ISSUE_HORIZON_MIN
            )["mean_glucose"]
    return out


def _horizon_metrics(
    sim_before: np.ndarray, sim_after: np.ndarray, twin_before: np.ndarray, twin_after: np.ndarray, minutes: int
) -> dict[str, Any]:
    """Change metrics of mean glucose and time in range over the first `minutes`, and references for the TIR number.

    Rows are windows; the simulator's sides are (n, bins) glucose, the twin's (n, bins, len(QUANTILES)) quantiles.
    `mean_glucose` and `tir` are the twin's median trajectories' changes (the issue's numbers); an empty selection
    gives {"n": 0} for each. The rest separate the what-if effect from the level the twin forecasts, which decides
    where a trajectory crosses 70 and 180 mg/dL:

    - `tir_expected`: the twin's change in *expected* time in range over its 90% intervals
      (`models.glucose_metrics.expected_time_in_range`), the answer a twin that knows its level error should give
      (the model's own intervals, widened after 2 h by `twin_trajectories`; the product's are also conformally
      calibrated per site, over 2 h);
    - `tir_on_simulator_baseline`: the twin's change added to the simulator's own recorded-plan trajectory (a
      perfect level, the twin's effect);
    - `tir_with_exact_effect_on_twin_level` and `tir_expected_with_exact_effect_on_twin_level`: the simulator's
      exact change added to the twin's forecast (the twin's level, a perfect effect), counted on the median and as
      expected time in range: what an exact effect model would score at this level accuracy (a reference, not a
      bound: another estimator, such as `tir_expected` itself at 2 h for the later meal, can score higher).
    """
    bins = minutes // BIN_MIN
    twin_0_median, twin_1_median = twin_before[:, :bins, MEDIAN], twin_after[:, :bins, MEDIAN]
    sim_0, sim_1 = trajectory_summary(sim_before[:, :bins]), trajectory_summary(sim_after[:, :bins])
    twin_0, twin_1 = trajectory_summary(twin_0_median), trajectory_summary(twin_1_median)
    metrics = {q: change_metrics(sim_1[q] - sim_0[q], twin_1[q] - twin_0[q]) for q in QUANTITIES}
    sim_tir = sim_1["tir"] - sim_0["tir"]
    exact = (sim_after - sim_before)[:, :bins]
    shifted = trajectory_summary(sim_before[:, :bins] + twin_1_median - twin_0_median)
    level_kept = trajectory_summary(twin_0_median + exact)
    metrics["tir_expected"] = change_metrics(
        sim_tir, _expected_tir(twin_after[:, :bins]) - _expected_tir(twin_before[:, :bins])
    )
    metrics["tir_on_simulator_baseline"] = change_metrics(sim_tir, shifted["tir"] - sim_0["tir"])
    metrics["tir_with_exact_effect_on_twin_level"] = change_metrics(sim_tir, level_kept["tir"] - twin_0["tir"])
    metrics["tir_expected_with_exact_effect_on_twin_level"] = change_metrics(
        sim_tir, _expected_tir(twin_before[:, :bins] + exact[..., None]) - _expected_tir(twin_before[:, :bins])
    )
    return metrics


def _expected_tir(quantiles: np.ndarray) -> np.ndarray:
    """Expected time in range (%) of (n, bins, len(QUANTILES)) forecasts, (n,)."""
    if not len(quantiles):
        return np.zeros(0)
    coverage = QUANTILES[-1] - QUANTILES[0]
    return np.asarray(
        expected_time_in_range(quantiles[..., 0], quantiles[..., MEDIAN], quantiles[..., -1], coverage=coverage)
    )


def _patient_decomposition(simulated: np.ndarray, twin: np.ndarray, person: np.ndarray) -> dict[str, float | None]:
    """How much of the simulator's change differs between patients, and how well the twin follows each part.

    Splits each window's change into its patient's mean and the window's deviation from it: a twin that ranks
    patients' sensitivities right has a high `pearson_r_patient_means`; one that knows how the same dose acts in
    different states of one patient has a high `pearson_r_within_patients`.
    """
    if len(simulated) < 3:
        return {}
    _, index = np.unique(person, return_inverse=True)
    counts = np.bincount(index)
    sim_mean, twin_mean = np.bincount(index, simulated) / counts, np.bincount(index, twin) / counts
    sim_within, twin_within = simulated - sim_mean[index], twin - twin_mean[index]
    return {
        "patients": len(counts),
        "between_patient_share_of_simulator_variance": _round(np.var(sim_mean[index]) / np.var(simulated)),
        "pearson_r_patient_means": change_metrics(sim_mean, twin_mean).get("pearson_r"),
        "pearson_r_within_patients": change_metrics(sim_within, twin_within).get("pearson_r"),
    }


def _r_or_worst(r: float | None) -> float:
    """A correlation, or -1 where there is none (a constant side): it never meets a target."""
    return -1.0 if r is None else r


_REMAINING = 1.0 - np.arange(PLAN_BINS) / PLAN_BINS  # share of the 4 h after each plan bin's start


def _simulator_change_explained(
    change: np.ndarray,
    person: np.ndarray,
    level: np.ndarray,
    treated: np.ndarray,
    feedback: np.ndarray,
    dose: np.ndarray,
) -> dict[str, float | None]:
    """Share of the simulator's own change in 4-h mean glucose (R^2) that nested linear models explain.

    Terms, added in turn: one constant per patient (a sensitivity a patient-level twin could learn); per-patient
    slopes on the plan's change in insulin and carbohydrate (`dose`, (n, 3) basal, bolus, carbs, each bin's change
    weighted by the share of the 4 h still to come, as a dose acting at once would move the 4-h mean: the
    dose-linear part); the patient's reaction in the altered replay (hypo-treatment carbs and calculator boluses,
    outside the twin's plan); and a per-patient slope on the window's mean glucose (insulin-dependent glucose use
    grows with glucose in UVA/Padova, so the same dose moves a high glucose more). What the last leaves is timing
    and state beyond these terms. The fits are made in sample on the simulator's own changes (ground truth no twin
    sees), so sqrt(R^2) is an upper bound on the correlation a twin of that form could reach, not a twin's result.
    """
    if len(change) < 3 or change.std() == 0:
        return {}
    _, index = np.unique(person, return_inverse=True)
    patient = np.eye(index.max() + 1)[index]

    def explained(columns: list[np.ndarray]) -> float:
        design = np.column_stack(columns)
        fitted = design @ np.linalg.lstsq(design, change, rcond=None)[0]
        return _round(1.0 - ((change - fitted) ** 2).mean() / change.var())

    doses = [patient * (dose[:, BASAL] + dose[:, BOLUS])[:, None], patient * dose[:, CARBS][:, None]]
    reaction = [treated, feedback]
    return {
        "patient": explained([patient]),
        "patient_and_dose": explained([patient, *doses]),
        "patient_dose_and_reaction": explained([patient, *doses, *reaction]),
        "patient_dose_reaction_and_glucose_level": explained([patient, *doses, *reaction, patient * level[:, None]]),
    }


def _plan_agreement(gaps: np.ndarray, feedback: np.ndarray) -> dict[str, float | None]:
    """How closely the simulator's delivered bolus change matches the twin's plan change, over compared windows."""
    if not len(gaps):
        return {}
    return {
        "bolus_gap_u_where_twin_changes_median": _round(np.median(gaps)),
        "bolus_gap_u_where_twin_changes_p95": _round(np.percentile(gaps, 95)),
        "share_within_0_05_u": _round((gaps <= 0.05).mean()),
        "calculator_feedback_bolus_u_mean": _round(feedback.mean()),
        "share_with_calculator_feedback_over_0_05_u": _round((np.abs(feedback) > 0.05).mean()),
    }


def _effect_by_minute(sim_delta: np.ndarray, twin_delta: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Mean change of glucose at each probe minute (the bin ending then), simulator and twin, and their ratio."""
    out: dict[str, dict[str, float | None]] = {}
    for minute in PROBE_MIN:
        column = minute // BIN_MIN - 1
        sim_mean, twin_mean = float(sim_delta[:, column].mean()), float(twin_delta[:, column].mean())
        ratio = _round(twin_mean / sim_mean) if abs(sim_mean) > 1e-9 else None
        out[str(minute)] = {"simulator": _round(sim_mean), "twin": _round(twin_mean), "ratio": ratio}
    return out


def baseline_accuracy(cases: Sequence[SiteCases], model: Any, factors: np.ndarray | None = None) -> dict[str, float]:
    """RMSE (mg/dL) of the twin's median under the recorded plan against the simulator's true glucose, by minute."""
    windows = _concat_windows([c.windows for c in cases])
    plan = np.concatenate([c.plan for c in cases])
    truth = np.concatenate([c.sim_factual for c in cases])
    known = ~np.isnan(truth).any(axis=1)
    chosen = None if factors is None else factors[known]
    path = twin_trajectories(model, windows.select(np.flatnonzero(known)), plan[known], factors=chosen)
    error = path[..., MEDIAN] - truth[known]
    return {str(m): _round(np.sqrt((error[:, m // BIN_MIN - 1] ** 2).mean()), 2) for m in PROBE_MIN}


def _concat_windows(parts: Sequence[Windows]) -> Windows:
    return Windows(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Windows)})


def diagnosis(scenarios: Mapping[str, Any], experiments: Path) -> dict[str, Any]:
    """Why a target is missed, in numbers (effect-size ratios per scenario, horizon and minute), and what would fix it.

    The fixes measured come from bench/whatif_experiments.py's results file when it exists (same replays, same
    train patients); the others are described with their cost.
    """
    at = str(ISSUE_HORIZON_MIN)
    ratios = {
        sid: {m: {q: s["horizons_min"][m][q].get("effect_size_ratio") for q in QUANTITIES} for m in s["horizons_min"]}
        for sid, s in scenarios.items()
    }
    by_minute = {sid: {m: v["ratio"] for m, v in s["effect_by_minute"].items()} for sid, s in scenarios.items()}
    tir_measures = (
        "tir",
        "tir_expected",
        "tir_on_simulator_baseline",
        "tir_with_exact_effect_on_twin_level",
        "tir_expected_with_exact_effect_on_twin_level",
    )
    tir = {
        sid: {f"{k}_pearson_r": s["horizons_min"][at][k].get("pearson_r") for k in tir_measures}
        for sid, s in scenarios.items()
    }
    ceiling = {
        sid: max(
            _r_or_worst(v["tir_with_exact_effect_on_twin_level_pearson_r"]),
            _r_or_worst(v["tir_expected_with_exact_effect_on_twin_level_pearson_r"]),
        )
        for sid, v in tir.items()
    }
    limits = {
        sid: {
            "pearson_r": s["horizons_min"][at]["mean_glucose"].get("pearson_r"),
            "pearson_r_same_patient_behaviour": s["horizons_min"][at]["same_patient_behaviour_in_both_replays"][
                "mean_glucose"
            ].get("pearson_r"),
            **s["between_and_within_patients_mean_glucose_240"],
            "simulator_change_r2_explained_in_sample": s["what_explains_the_simulator_change_240"],
        }
        for sid, s in scenarios.items()
    }
    measured = _experiments_summary(experiments)
    return {
        "effect_size_ratio_twin_over_simulator": ratios,
        "effect_size_ratio_by_minute_mean_glucose": by_minute,
        "what_limits_the_mean_glucose_correlation_240": limits,
        "time_in_range_level_error": tir,
        "time_in_range_with_the_exact_effect_on_the_twin_level": {
            "best_pearson_r": ceiling,
            "reaches_target": {sid: r >= TARGET_CORRELATION for sid, r in ceiling.items()},
        },
        "reading": READING,
        "fixes": FIXES,
        "recommendation": RECOMMENDATION,
        "fixes_measured": measured,
    }


def _experiments_summary(path: Path) -> dict[str, Any]:
    """Per variant of bench/whatif_experiments.py: target met, forecast RMSE, and the 120/240-min numbers."""
    if not path.exists():
        return {"not_run": f"{path} does not exist; run bench/whatif_experiments.py, then this bench with --reuse"}
    data = json.loads(path.read_text())
    out: dict[str, Any] = {"file": str(path), "measured_at": data.get("measured_at")}
    for name, variant in data.get("variants", {}).items():
        out[name] = {
            "met_target": variant["met_target"],
            "forecast_rmse_vs_simulator_mg_dl": variant["forecast_rmse_vs_simulator_mg_dl"],
            "pearson_r_and_effect_ratio": {
                sid: {
                    m: {
                        "mean_glucose": [
                            h[m]["mean_glucose"].get("pearson_r"),
                            h[m]["mean_glucose"].get("effect_size_ratio"),
                        ],
                        "tir_r": h[m]["tir"].get("pearson_r"),
                        "tir_on_simulator_baseline_r": h[m]["tir_on_simulator_baseline"].get("pearson_r"),
                        "mean_glucose_r_same_patient_behaviour": h[m]
                        .get("same_patient_behaviour_in_both_replays", {})
                        .get("mean_glucose", {})
                        .get("pearson_r"),
                    }
                    for m in h
                }
                for sid, h in ((sid, s["horizons_min"]) for sid, s in variant["scenarios"].items())
            },
        }
        if "learned" in variant:
            out[name]["learned"] = variant["learned"]
    return out


READING = [
    "An effect-size ratio (mean twin change / mean simulator change) far below 1 with a positive correlation: the "
    "twin has the direction and some of the ranking of a what-if effect but not its size.",
    "The twin learns from observational records in which boluses follow carbohydrate by the patient's ratio and high "
    "glucose by the correction rule: the separate sizes of the insulin and carbohydrate effects are barely "
    "identified (only missed, late and correction boluses and carb-count errors separate them), and response curves "
    "whose size the network sets per window can fit the net post-meal course with small curves for both.",
    "Scenarios that change a dose without its usual partner (skip the meal bolus, 20% more insulin, less basal, a "
    "larger meal on the same bolus) are the off-pattern plans the records hold few examples of.",
    "Time in range is a thresholded count: its change depends on where the trajectory crosses 70 and 180 mg/dL, so "
    "the twin's error in the glucose level (see twin_forecast_rmse_vs_simulator_recorded_plan_mg_dl) lowers its "
    "correlation even when the effect is right; tir_on_simulator_baseline adds the twin's change to the "
    "simulator's own trajectory and so shows what the twin's effect scores on a perfect level.",
    "The 4-h number rolls the 2-h twin forward once: the second forecast's free part (trained on ordinary days, "
    "where a rise after a meal is met by its bolus) pulls a scenario's excursion back, so effects shrink after 2 h.",
    "The simulated patient reacts to the change: a low treated (15-15 rule) or not, a later bolus's correction. The "
    "records hold no hypo treatments, so the twin cannot foresee them; same_patient_behaviour_in_both_replays "
    "scores only the windows where the patient did the same in both replays.",
    "A small, steady change (10% less basal) moves glucose by a few mg/dL; how much depends mostly on the patient "
    "(between_and_within_patients): the twin has to rank patients' insulin sensitivity from their covariates, and "
    "within a patient the simulator's effect varies with the state (near-lows, meals) in ways a dose-linear twin "
    "does not follow.",
]
RECOMMENDATION = [
    "The target as written (r >= 0.8 for every scenario at 4 h, mean glucose and time in range) is not reached by "
    "the twin or by any variant measured (fixes_measured); fixing the size of the dose effects is necessary but not "
    "sufficient.",
    "Time in range: the change in the count of in-range bins turns on the level forecast (RMSE ~30-35 mg/dL at 2 h, "
    "~40-45 at 4 h), not only on the effect. With the simulator's exact change added to the twin's forecast "
    "(tir_with_exact_effect_on_twin_level, and its expected form), a perfect effect model, the correlation stays "
    "below 0.8 in every scenario (time_in_range_with_the_exact_effect_on_the_twin_level): a better what-if effect "
    "alone is not expected to reach the TIR half of the target; the level forecast matters as much. The twin should "
    "answer TIR as the change in expected time in range over its intervals (tir_expected; compare it with tir, the "
    "median's count); tir_on_simulator_baseline judges the effect alone.",
    "Mean glucose: a per-patient, dose-linear answer with each dose weighted by the time left in the 4 h, fitted in "
    "sample to the simulator's own changes (what_explains_the_simulator_change_240, an upper bound, not a twin), "
    "explains enough for r >= 0.8 for the meal-bolus and larger-meal scenarios and just enough for 20% more bolus, "
    "so a twin that learns each patient's sensitivities could reach the target there; for 10% less basal even "
    "per-patient sensitivity, the patient's reactions and a glucose-level slope leave r below 0.8, and the later "
    "meal reaches about 0.8 only with all of them.",
    "Basal and the later meal: small or cancelling effects whose size varies with the state within a patient "
    "(what_limits_the_mean_glucose_correlation_240: within-patient r ~0.25 for basal); a dose-linear twin does not "
    "follow that. Candidates: state-dependent insulin action learned from more varied data (temporary basals are "
    "absent from these records), a direct 4-h horizon.",
    "Effect size (what a clinician reads off a what-if): take patient-level sensitivities with fixed shapes "
    "(kernels_fixed: ratios ~0.8-1.0 at 2 h, DP-ready) or prior-consistent augmentation with a prior from the "
    "patients' pump settings (augmented, with the 1800/500 rules: best 4-h numbers, overshoot at 2 h).",
    "Do not pretrain on replays of the demo patients: they are the evaluator's ground truth.",
]
FIXES = [
    {
        "fix": "Fixed physiological response kernels with learned patient-level sensitivities (kernels_fixed)",
        "change": "In models/twin/model.py replace ResponseCurves and the per-window gain with a gamma(2) insulin "
        "action curve (peak 75 min) and carbohydrate absorption curve (peak 45 min), each dose's effect the curve "
        "times the patient's sensitivity (mg/dL per U, per g) from a small MLP over the static covariates. The free "
        "part, features and windows stay as they are.",
        "why": "A fast carbohydrate curve and a slow insulin curve give the net post-meal course a shape from which "
        "both sizes can be read; free per-window sizes cannot be. Sensitivities shared by all of a patient's windows "
        "pool the off-pattern evidence (missed and late boluses, corrections) instead of letting each window explain "
        "itself.",
        "cost": "About 40 lines in models/twin/model.py and its tests (the gain head reads the static covariates "
        "instead of the context; the curves fixed); Opacus-compatible only with the time constants fixed (a bare "
        "learned parameter on the top module has no per-sample gradient). Retrain the federated twin. Measured: "
        "forecast RMSE 2-7% higher at 30-240 min; effect sizes calibrated at 2 h; correlation not better, lower for "
        "basal and the later meal, whose effect varies with the state within a patient.",
    },
    {
        "fix": "Learned global time constants (kernels)",
        "change": "As above, the two time constants learned (shared by all patients).",
        "cost": "Needs the time constants wrapped in a layer Opacus supports (or a functorch grad sampler) for DP.",
    },
    {
        "fix": "Scheduled basal as an explicit input",
        "change": "The twin measures basal against its history's mean, so a temporary basal lasting past the window "
        "becomes the new normal. This bench's roll-forward keeps the origin's schedule "
        "(rollout_without_kept_schedule_240 shows the difference); in the product, the pump's programmed basal "
        "would enter the features (pump settings are in the drops but not harmonized).",
        "cost": "A mapping, contract and features change (flows/, data_contracts/) for the pump settings table.",
    },
    {
        "fix": "Forecast 4 h directly",
        "change": "HORIZON_STEPS 48 instead of rolling a 2-h twin forward.",
        "cost": "Windows need 4 h of future (fewer windows), a larger head, retraining; not measured here.",
    },
    {
        "fix": "Training-time augmentation with a rules-of-thumb prior (augmented)",
        "change": "Extra planned boluses and meals with targets moved by ISF = 1800 / TDI and 3.6 mg/dL per g.",
        "cost": "No architecture change: a few lines in the training loop (fit_local and the DP step), no extra "
        "passes. Imposes the prior's error: here effects overshoot at 2 h (ratios 1.4-1.7) and the 1800 rule is "
        "~2.7x the simulator's correction factor for the children's site; a prior from each patient's pump "
        "settings (CF, CR) would need the pump settings harmonized. Measured: forecast RMSE unchanged, the best 4-h "
        "numbers of the variants, still short of the target.",
    },
    {
        "fix": "Pretraining on simulator replays (not done)",
        "change": "The demo patients are the simulator's virtual patients: pretraining on their replays would leak "
        "the evaluator's ground truth into training, and pretraining on another UVA/Padova population would make "
        "the benchmark compare the simulator with a copy of itself. Only a different physiological model or real "
        "intervention data would be a fair prior.",
        "cost": "Not applicable here.",
    },
]


# --- main ----------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Python, torch and numpy versions, CPU count and model, torch threads."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
    }


MAPPING_NOTES = {
    "skip_meal_bolus": "Alteration skip_bolus: the first meal in the replay is not bolused; the twin zeroes the "
    "boluses within 15 min of its next logged meal. Compared where both are the same meal and bolus.",
    "bolus_plus_20": "Alteration scale_bolus x1.2 over the 4-h replay; the twin multiplies every planned bolus of the "
    "4-h plan by 1.2. The simulator's bolus calculator recomputes each later bolus's correction from the altered "
    "CGM and the pump rounds to its increment (see plan_agreement).",
    "basal_minus_10": "Alteration scale_basal x0.9 over the 4-h replay; the twin multiplies every planned basal bin "
    "of the 4-h plan by 0.9.",
    "larger_meal": "Alteration scale_meal_carbs x1.5 (added for this bench: the meal grows, its bolus does not, as "
    "the twin's scenario says; scale_meal would scale the bolus too). The twin scales the LOGGED (counted) carbs, "
    "the simulator the TRUE carbs, so the added grams differ by the patient's counting error.",
    "later_meal": "Alteration shift_meal +30 min (meal and its bolus); the twin moves its next meal and the boluses "
    "within 15 min of it by 6 bins. Compared where both are the same meal and bolus.",
}
DIFFERENCES_KEPT = [
    "The simulated patient treats lows (15-15 rule) in both replays, reacting to the altered glucose; the twin's plan "
    "holds no hypo treatments (they are not logged).",
    "Meal scenarios change the logged carbs the twin sees; the simulator's meals are the true carbs.",
    "Bolus sizes in the simulator's altered replay include corrections computed from the altered CGM.",
    "The simulator side is true plasma glucose in 5-minute bins; the twin forecasts CGM bins (the sensor noise is the "
    "same in both replays, so the change in CGM is the change in glucose except where the sensor clips).",
    "The 4-h twin answer rolls the 2-h twin forward from its own median, keeping the origin's basal schedule as the "
    "reference of the rolled window (see twin_trajectories).",
]


def main() -> None:
    """Run the benchmark and write bench/results/whatif.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Reuse the generated and ingested sites, the pooled twin and the replays in --data-dir.",
    )
    parser.add_argument("--federation-dir", type=Path, default=DEFAULT_FEDERATION_DIR)
    parser.add_argument(
        "--model",
        choices=["auto", "registry", "pooled"],
        default="auto",
        help="auto: the registry's newest twin if there is one, else a pooled non-private twin.",
    )
    parser.add_argument("--cache-dir", type=Path, help="Where the pooled twin and replays are cached (--data-dir).")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--experiments", type=Path, default=EXPERIMENTS, help="bench/whatif_experiments.py's results")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    preparation = prepare_sites(args.data_dir, reuse=args.reuse, patients=args.patients, days=args.days)
    timings["prepare_sites"] = round(time.perf_counter() - started, 1)
    data_dir = args.data_dir.resolve()
    cache_dir = (args.cache_dir or data_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)

    clock = time.perf_counter()
    model, twin = load_twin(args.model, args.federation_dir, data_dir, cache_dir, reuse=args.reuse)
    timings["twin"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    cases = [site_cases(data_dir, cache_dir, site, reuse=args.reuse) for site in SITES]
    timings["simulator_replays"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    with torch.no_grad():
        factors, personal = patient_factors(data_dir, cases, model)
        scenarios = score(cases, model, factors)
        accuracy = baseline_accuracy(cases, model, factors)
        shared = score(cases, model)
        shared_accuracy = baseline_accuracy(cases, model)
    timings["twin_forecasts_and_scoring"] = round(time.perf_counter() - clock, 1)
    timings["total"] = round(time.perf_counter() - started, 1)

    met = all(all(s["met"].values()) for s in scenarios.values())
    result = {
        "issue": "6: what-if fidelity of the learned twin against the mechanistic simulator",
        "target": {
            "pearson_r_at_least": TARGET_CORRELATION,
            "horizon_min": ISSUE_HORIZON_MIN,
            "quantities": list(QUANTITIES),
            "every_scenario": True,
        },
        "issue_number": f"horizons_min['{ISSUE_HORIZON_MIN}'] (4 h: the twin's 2-h forecast rolled forward once); "
        "horizons_min['120'] is the twin's own 2-h horizon",
        "met_target": met,
        "summary": _summary(scenarios),
        "twin": {**twin, "per_patient_calibration": personal},
        "summary_shared_model_without_per_patient_calibration": _summary(shared),
        "twin_forecast_rmse_vs_simulator_recorded_plan_mg_dl_shared_model": shared_accuracy,
        "scenarios": scenarios,
        "twin_forecast_rmse_vs_simulator_recorded_plan_mg_dl": accuracy,
        "mapping": {"per_scenario": MAPPING_NOTES, "differences_kept": DIFFERENCES_KEPT},
        "diagnosis": diagnosis(scenarios, args.experiments),
        "settings": {
            "sites": list(SITES),
            "patients_per_site": args.patients,
            "days": args.days,
            "origins": "test patients (split_patients), every hour the simulator state is stored, 4 h of data after",
            "horizons_min": list(HORIZONS_MIN),
            "tir_range_mg_dl": [TIR_LOW, TIR_HIGH],
            "tir_unit": "percentage points of 5-minute bins",
            "mean_glucose_unit": "mg/dL",
            "change": "scenario minus recorded plan, each side against its own baseline",
        },
        "preparation": preparation,
        "timings_seconds": timings,
        "timings_of_cached_parts_seconds": {
            "pooled_twin_training": twin.get("seconds"),
            "simulator_replays_by_site": {c.site: c.seconds for c in cases},
        },
        "machine": machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"met_target": met, "summary": result["summary"], "timings_seconds": timings}, indent=2))


def _summary(scenarios: Mapping[str, Any]) -> dict[str, Any]:
    """Per scenario and horizon: n, correlation, MAE and effect-size ratio of mean glucose and time in range."""
    keys = ("n", "pearson_r", "mae", "effect_size_ratio")
    return {
        sid: {
            f"{m}": {q: {k: s["horizons_min"][str(m)][q].get(k) for k in keys} for q in QUANTITIES}
            for m in HORIZONS_MIN
        }
        for sid, s in scenarios.items()
    }


def patient_factors(data_dir: Path, cases: Sequence[SiteCases], model: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Each compared window's per-patient dose-effect multipliers, as the prediction flow computes them.

    The evidence is every window of the site (`build_windows`, stride 3: the CGM the site recorded, never the
    simulator's glucose), as in the prediction flow, and a window counts for an origin only if its targets ended by
    the origin's cut-off (`models.twin.personal`). Returns the factors (rows as the cases' windows concatenated)
    and a summary.
    """
    from flows.features import read_features
    from models.twin import build_windows
    from models.twin.personal import MULTIPLIER_RANGE, PRIOR_SD, cutoffs, evidence, multipliers

    parts = []
    for case in cases:
        found = evidence(model, build_windows(read_features(data_dir / "sites" / case.site / "features")))
        parts.append(multipliers(found, case.windows.person_id, cutoffs(case.windows)))
    factors = np.concatenate(parts) if parts else np.ones((0, 2))
    quantiles = {
        name: [_round(q, 3) for q in np.percentile(factors[:, k], (10, 50, 90))] if len(factors) else []
        for k, name in enumerate(("carbohydrate", "insulin"))
    }
    summary = {
        "method": "models.twin.personal: ridge multipliers of the twin's carbohydrate and insulin effects per "
        "patient, from the patient's own windows ended by each cut-off",
        "prior_sd": PRIOR_SD,
        "multiplier_range": list(MULTIPLIER_RANGE),
        "multiplier_p10_p50_p90": quantiles,
    }
    return factors, summary


def site_cases(data_dir: Path, cache_dir: Path, site: str, *, reuse: bool) -> SiteCases:
    """One site's cases: from the cache when reusing, else built (windows, regenerated run, replays) and cached."""
    cache = cache_dir / f"whatif-cases-{site}.npz"
    cached = SiteCases.load(cache) if reuse and cache.exists() else None
    if cached is not None:
        return cached
    from flows.features import read_features
    from models.twin import build_windows, split_patients

    started = time.perf_counter()
    features = read_features(data_dir / "sites" / site / "features")
    test_people = np.unique(split_patients(build_windows(features)).test.person_id)
    sim = load_simulation(data_dir, site)
    windows, plan = hourly_windows(features, test_people, sim.start_ms, sim.run.result.minutes)
    cases = replace(simulate_cases(sim, windows, plan), seconds=round(time.perf_counter() - started, 1))
    cases.save(cache)
    return cases


if __name__ == "__main__":
    main()
