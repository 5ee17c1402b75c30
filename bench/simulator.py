"""Benchmark: this vectorized UVA/Padova twin against simglucose itself, in one run.

The twin simulates `--patients` virtual patients for one day (1,000 patient-days by default) under
simglucose's own scenario, BB controller, sensor and pump. simglucose, which simulates one patient
at a time, is timed on `--simglucose-patients` of the same patients (the unperturbed base patients
inside that population, same sensor seeds) and its cost per patient-day is extrapolated linearly
to the same work; running it on all 1,000 patient-days here would take hours. The same simglucose
runs give `max_abs_diff_mg_dl`: the largest BG difference between the two at any step.

Usage: python bench/simulator.py [--patients 1000] [--simglucose-patients 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.uva_padova.population import expand_population
from models.uva_padova.reference import run_simglucose, run_twin_like_simglucose

RESULTS = Path(__file__).resolve().parent / "results" / "simulator.json"
SENSOR = "Dexcom"


def main() -> None:
    """Run the benchmark and write bench/results/simulator.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1000, help="twin patients, one day each")
    parser.add_argument("--simglucose-patients", type=int, default=6, help="patients timed in simglucose")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    population = expand_population(args.patients, seed=2026)
    seeds = np.arange(args.patients) + 1
    # The base patients (factors 1) inside the population, spread over the three cohorts.
    base_idx = [i for i, name in enumerate(population.names) if name.endswith("/v000")]
    by_cohort = [[i for i in base_idx if population.cohort[i] == c] for c in ("child", "adolescent", "adult")]
    reference_idx = [group[j] for j in range(args.simglucose_patients) for group in by_cohort if j < len(group)]
    reference_idx = reference_idx[: args.simglucose_patients]

    run_twin_like_simglucose(population.take(reference_idx[:1]), sensor=SENSOR, seeds=seeds[:1])  # warm-up
    started = time.perf_counter()
    twin = run_twin_like_simglucose(population, sensor=SENSOR, seeds=seeds)
    twin_seconds = time.perf_counter() - started
    twin_bg = twin.bg_step_mean()

    simglucose_seconds = 0.0
    diffs = []
    for i in reference_idx:
        started = time.perf_counter()
        reference = run_simglucose(population.base_name[i], sensor=SENSOR, seed=int(seeds[i]))
        simglucose_seconds += time.perf_counter() - started
        steps = twin_bg.shape[1]
        diffs.append(float(np.abs(reference.bg_step_mean[:steps] - twin_bg[i]).max()))

    per_patient_day = simglucose_seconds / len(reference_idx)
    result = {
        "patient_days": args.patients,
        "seconds": round(twin_seconds, 3),
        "twin_seconds_per_patient_day": twin_seconds / args.patients,
        "simglucose_patient_days_timed": len(reference_idx),
        "simglucose_seconds": round(simglucose_seconds, 3),
        "simglucose_seconds_per_patient_day": round(per_patient_day, 3),
        "simglucose_seconds_extrapolated": round(per_patient_day * args.patients, 1),
        "speedup_vs_simglucose": round(per_patient_day * args.patients / twin_seconds, 1),
        "speedup_target": 1000,
        "max_abs_diff_mg_dl": max(diffs),
        "max_abs_diff_per_patient_mg_dl": dict(
            zip((population.base_name[i] for i in reference_idx), diffs, strict=True)
        ),
        "sensor": SENSOR,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "numpy": np.__version__},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
