"""Benchmark (issue 5): the federated twin against persistence, local-only and pooled training, on true glucose.

Generates the three demo hospitals (100 patients x 14 days each, as `twinfed demo` does) into a git-ignored folder
and runs each site's flow on them (the same `generate_sites` and `site_ingest`), unless --reuse finds them there.
Every method uses one patient split (`split_patients`: ~70% train, 10% calibration, 20% test at each site):

- persistence; local-only (each site alone); pooled non-private (all train patients in one place);
- the Flower federation (in-process simulation, three SuperNodes) without DP, and with patient-level DP at each
  epsilon of --epsilons: the noise multiplier is `noise_for_budget` for the whole training (rounds x steps per
  round), every DP run starts with fresh privacy ledgers, its budget is that epsilon, and the epsilon each site's
  ledger reports afterwards is recorded. Every federated run takes the same rounds and steps; the learning rate
  is `--lr-plain` without DP (plain SGD on summed window losses) and `--lr-private` with it (clipped steps), the
  latter scaled down where the noise multiplier exceeds its reference (see `private_lr`).

The baselines train with `fit_local` (Adam) on one `TrainingBudget` (epochs over their own training windows); the
federation trains as `federated.twin_app` does (SGD on patient-sampled steps). Both are reported as they are.

Each method is scored on every site's test patients (per site and pooled) against the simulator's TRUE glucose
(`federated.evaluation`): RMSE at 30/60 min, Clarke zone A and A+B shares, and the 90% interval's coverage after
each site conformalizes it on its own calibration patients. `dp_step_overhead` is the median time of one
`dp_step` over the median time of a plain backward and step, same model, same sampled patients, same process.

Writes bench/results/federated.json with the numbers, settings, timings, machine and git revision, and which
targets are met: federated DP at epsilon 8 within 15% of pooled RMSE30; RMSE30 <= 0.7 x persistence; coverage in
[0.88, 0.92]; dp_step_overhead <= 3.

Usage: python bench/federated.py [--reuse] [--data-dir data/bench-federated] [--skip-federated]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run as `python bench/federated.py`, Python puts bench/ first on sys.path, where this file would shadow the
# `federated` package it benchmarks; drop that entry so `federated` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from federated.baselines import TrainingBudget, local_only, persistence, pooled  # noqa: E402
from federated.evaluation import Scored, calibrated_interval, load_truth, score_sites, truth_at_targets  # noqa: E402
from federated.privacy import DPConfig, PrivacyLedger, dp_step, noise_for_budget, poisson_sample  # noqa: E402
from flows.features import read_features  # noqa: E402
from models.twin import (  # noqa: E402
    PatientSplit,
    TwinSurrogate,
    build_windows,
    patient_batches,
    pinball_loss,
    predict,
    split_patients,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "federated.json"
DEFAULT_DATA_DIR = ROOT / "data" / "bench-federated"  # under data/: git-ignored
SITES = ("aurelia", "northbridge", "lakeside")
DP8_WITHIN_OF_POOLED = 0.15  # federated DP at epsilon 8: RMSE30 at most 15% above pooled non-private
RMSE30_VS_PERSISTENCE = 0.7  # RMSE30 at most 0.7 x persistence
COVERAGE90 = (0.88, 0.92)  # calibrated 90% intervals
DP_STEP_OVERHEAD = 3.0  # DP step time over non-private step time
TARGETS = {
    "dp8_rmse30_within_of_pooled": DP8_WITHIN_OF_POOLED,
    "rmse30_vs_persistence_at_most": RMSE30_VS_PERSISTENCE,
    "coverage90": COVERAGE90,
    "dp_step_overhead_at_most": DP_STEP_OVERHEAD,
}


@dataclass(frozen=True)
class FederationSettings:
    """How every federated run trains (the same rounds and steps with and without DP; lr per mode)."""

    rounds: int = 10
    steps_per_round: int = 20
    patient_sample_rate: float = 0.5
    max_grad_norm: float = 1.0
    lr_private: float = 0.1  # at noise multiplier `reference_noise` or less; scaled by reference_noise / sigma above
    reference_noise: float = 4.0  # ~ sigma of epsilon 8 at 200 steps of q = 0.5: the largest budget benchmarked
    lr_plain: float = 5e-5  # plain SGD on the sum of a patient's window losses: ~1000x the per-window gradient
    delta: float = 1e-4  # below 1 / (train patients per site) ~ 1 / 70
    strategy: str = "fedavg"
    seed: int = 0


def prepare_sites(data_dir: Path, *, reuse: bool, patients: int, days: int) -> dict[str, Any]:
    """Generate the demo hospitals and run their site flows under `data_dir`, or reuse what is there."""
    data_dir = data_dir.resolve()  # the flow's Great Expectations workspace needs an absolute path
    ready = all((data_dir / "sites" / s / "features" / "features.json").exists() for s in SITES)
    if reuse and ready:
        return {"reused": True}
    from flows.demo_sites.ingested import generate_and_ingest

    # A fixed key per site, so every fresh run splits the same patients (demo data only).
    timings = generate_and_ingest(data_dir, SITES, patients=patients, days=days,
                                  fixed_secrets="twinfed bench federated")  # fmt: skip
    return {"reused": False, **timings}


def git_revision() -> dict[str, Any]:
    """`git describe` and whether the working tree had changes, or what git said."""

    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"describe": run("describe", "--always", "--dirty"), "commit": run("rev-parse", "HEAD")}
    except (OSError, subprocess.CalledProcessError) as error:
        return {"error": str(error)}


def machine() -> dict[str, Any]:
    """Python, torch and flwr versions, CPU count and model."""
    import flwr
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return {"python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
            "cpus": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads()}  # fmt: skip


@dataclass(frozen=True)
class Site:
    """One site's split and the true glucose at its test windows' targets (the evaluator's view)."""

    split: PatientSplit
    truth: np.ndarray  # (n_test, HORIZON_STEPS)


def load_sites(data_dir: Path) -> dict[str, Site]:
    """Every site's windows split by patient, and its test windows linked to the simulator's truth."""
    sites = {}
    for site in SITES:
        split = split_patients(build_windows(read_features(data_dir / "sites" / site / "features")))
        sites[site] = Site(split, truth_at_targets(split.test, load_truth(data_dir, site)))
    return sites


def scored(sites: dict[str, Site], model_for: Callable[[str], TwinSurrogate]) -> dict[str, Any]:
    """A trained method's scores: each site's test forecasts, interval calibrated on that site's calibration set."""
    parts = {}
    for name, site in sites.items():
        model = model_for(name)
        pred = predict(model, site.split.test)
        interval = calibrated_interval(pred, predict(model, site.split.calibration), site.split.calibration)
        parts[name] = Scored(pred[..., 1], interval, site.truth, site.split.test.target)
    return score_sites(parts)


def run_federation(
    name: str, data_dir: Path, work: Path, settings: FederationSettings, *, epsilon: float | None
) -> tuple[TwinSurrogate, dict[str, Any]]:
    """One Flower simulation (three SuperNodes, in process) on fresh ledgers; the registered model and its record.

    Each run gets its own data folder whose sites/<site>/features link to the bench's features, so its privacy
    ledgers start empty, and its own federation folder (registry, checkpoints).
    """
    from flwr.simulation import run_simulation

    from federated.registry import Registry
    from federated.twin_app import client, server_app

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    for site in SITES:
        (run_dir / "sites" / site).mkdir(parents=True)
        (run_dir / "sites" / site / "features").symlink_to(data_dir / "sites" / site / "features")
    steps = settings.rounds * settings.steps_per_round
    private = epsilon is not None
    sigma = (
        noise_for_budget(epsilon=epsilon, delta=settings.delta, sample_rate=settings.patient_sample_rate, steps=steps)
        if epsilon is not None
        else 0.0
    )
    overrides: dict[str, Any] = {
        "num-server-rounds": settings.rounds,
        "steps-per-round": settings.steps_per_round,
        "patient-sample-rate": settings.patient_sample_rate,
        "strategy": settings.strategy,
        "dp": private,
        "target-epsilon": 0.0,  # the noise is derived here, as twin_app.planned_noise would
        "noise-multiplier": sigma,
        "max-grad-norm": settings.max_grad_norm,
        "lr": private_lr(settings, sigma) if private else settings.lr_plain,
        "epsilon-budget": epsilon if epsilon is not None else 1.0,
        "delta": settings.delta,
        "seed": settings.seed,
        "sites": ",".join(SITES),
        "data-dir": str(run_dir),
        "federation-dir": str(run_dir / "federation"),
        "resume": False,
        "min-nodes": len(SITES),
    }
    started = time.perf_counter()
    run_simulation(server_app=server_app(overrides), client_app=client, num_supernodes=len(SITES),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip
    seconds = time.perf_counter() - started
    registered = Registry(run_dir / "federation").latest()
    if registered is None:
        raise RuntimeError(f"{name}: the federation registered no model (see the Flower log above)")
    record: dict[str, Any] = {
        "config": {k: v for k, v in overrides.items() if k not in ("data-dir", "federation-dir", "sites")},
        "seconds": round(seconds, 1),
        "registered": registered.version,
        "rounds": registered.metadata["rounds"],
        "app_metrics": registered.metadata.get("metrics", {}),
    }
    if epsilon is not None:
        record["epsilon_target"] = epsilon
        record["epsilon_spent_by_ledger"] = {
            site: PrivacyLedger(run_dir / "sites" / site / "privacy_ledger.json", site_id=site,
                                epsilon_budget=float(epsilon), delta=settings.delta).epsilon_spent()
            for site in SITES
        }  # fmt: skip
        record["epsilon_spent_by_registry"] = {s: v["epsilon_spent"] for s, v in registered.metadata["sites"].items()}
    return registered.model(), record


def private_lr(settings: FederationSettings, sigma: float) -> float:
    """The DP learning rate: `lr_private`, scaled down by reference_noise / sigma when the noise is larger.

    The step's noise is lr x sigma x C per coordinate: holding it at most its reference size keeps a small budget
    from drowning the model in noise (it then learns less and stays nearer its start) instead of diverging.
    """
    return settings.lr_private * min(1.0, settings.reference_noise / sigma) if sigma > 0 else settings.lr_private


def dp_step_overhead(site: Site, *, sample_rate: float, repeats: int, seed: int) -> dict[str, Any]:
    """Median time of one dp_step (ragged patients, and padded to one shape) over a plain backward and step.

    Same model, same sampled patients, same process, one thread; the steps alternate so drift hits all alike. The
    optimizer's learning rate is 0, so every repeat sees the same weights.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    from models.twin import Normalizer

    model = TwinSurrogate(Normalizer.fit(site.split.train))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    people = np.unique(site.split.train.person_id)
    chosen = poisson_sample(len(people), sample_rate, generator)
    windows = site.split.train.select(np.isin(site.split.train.person_id, people[chosen]))
    ragged, padded = patient_batches(windows), patient_batches(windows, pad=True)
    expected = sample_rate * len(people)
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, patient_sample_rate=sample_rate, delta=1e-5)
    history, future, static, target = (torch.cat(parts) for parts in zip(*ragged, strict=True))

    def loss_fn(module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h, f, st, t = batch
        return pinball_loss(module(h, f, st), t, ~torch.isnan(t)).sum()

    def plain() -> None:
        optimizer.zero_grad()
        (pinball_loss(model(history, future, static), target, ~torch.isnan(target)).sum() / expected).backward()
        optimizer.step()

    def private(batches: list[tuple[torch.Tensor, ...]]) -> Callable[[], object]:
        return lambda: dp_step(model, batches, loss_fn=loss_fn, optimizer=optimizer, config=config,
                               generator=generator, expected_patients=expected)  # fmt: skip

    steps: dict[str, Callable[[], object]] = {
        "plain": plain,
        "dp_ragged": private(ragged),
        "dp_padded": private(padded),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for repeat in range(repeats + 1):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "patients": len(chosen),
        "windows": len(windows),
        "padded_windows": int(sum(b[0].shape[0] for b in padded)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "repeats": repeats,
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "ragged": round(median["dp_ragged"] / median["plain"], 2),
        "padded": round(median["dp_padded"] / median["plain"], 2),
    }


def targets_met(methods: dict[str, Any], overhead: dict[str, Any], dp8: str) -> dict[str, Any]:
    """Each target, the numbers it compares, and whether it is met (pooled over sites, against true glucose)."""
    pooled_rmse30 = methods["pooled"]["pooled"]["rmse30"]
    persistence_rmse30 = methods["persistence"]["pooled"]["rmse30"]
    low, high = COVERAGE90
    met: dict[str, Any] = {}
    if dp8 in methods:
        dp = methods[dp8]["pooled"]
        ratio = dp["rmse30"] / pooled_rmse30
        within = ratio <= 1 + DP8_WITHIN_OF_POOLED
        met["dp8_within_15pct_of_pooled"] = {"dp8_rmse30": dp["rmse30"], "pooled_rmse30": pooled_rmse30,
                                             "ratio": ratio, "met": within}  # fmt: skip
    met["rmse30_at_most_0.7x_persistence"] = {
        name: {"ratio": m["pooled"]["rmse30"] / persistence_rmse30,
               "met": m["pooled"]["rmse30"] <= RMSE30_VS_PERSISTENCE * persistence_rmse30}
        for name, m in methods.items() if name != "persistence"
    }  # fmt: skip
    met["coverage90_in_88_92"] = {
        name: {against: {"coverage": m["pooled"][f"coverage90_vs_{against}"],
                         "met": low <= m["pooled"][f"coverage90_vs_{against}"] <= high} for against in ("cgm", "truth")}
        for name, m in methods.items() if "coverage90_vs_cgm" in m["pooled"]
    }  # fmt: skip
    met["dp_step_overhead_at_most_3"] = {
        variant: {"overhead": overhead[variant], "met": overhead[variant] <= DP_STEP_OVERHEAD}
        for variant in ("ragged", "padded")
    }
    return met


def summary(methods: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The headline numbers of each method, pooled over sites."""
    keys = ("rmse30", "rmse60", "clarke30_a", "clarke30_ab", "clarke60_a", "clarke60_ab", "coverage90_vs_cgm",
            "coverage90_vs_truth")  # fmt: skip
    return {name: {k: round(m["pooled"][k], 4) for k in keys if k in m["pooled"]} for name, m in methods.items()}


def main() -> None:
    """Run the benchmark and write bench/results/federated.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--reuse", action="store_true", help="Reuse generated and ingested sites in --data-dir.")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--prepare-only", action="store_true", help="Generate and ingest the sites, then stop.")
    parser.add_argument("--skip-federated", action="store_true", help="Baselines and overhead only (no Flower).")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    parser.add_argument("--epochs", type=int, default=TrainingBudget.epochs, help="Baselines' passes over the data.")
    parser.add_argument("--rounds", type=int, default=FederationSettings.rounds)
    parser.add_argument("--steps-per-round", type=int, default=FederationSettings.steps_per_round)
    parser.add_argument("--patient-sample-rate", type=float, default=FederationSettings.patient_sample_rate)
    parser.add_argument("--max-grad-norm", type=float, default=FederationSettings.max_grad_norm)
    parser.add_argument("--lr-private", type=float, default=FederationSettings.lr_private)
    parser.add_argument("--lr-plain", type=float, default=FederationSettings.lr_plain)
    parser.add_argument("--strategy", default=FederationSettings.strategy, choices=["fedavg", "fedprox", "fedadam"])
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    data_dir = args.data_dir.resolve()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    preparation = prepare_sites(data_dir, reuse=args.reuse, patients=args.patients, days=args.days)
    timings["prepare"] = time.perf_counter() - started
    if args.prepare_only:
        print(json.dumps(preparation))
        return
    torch.set_num_threads(1)  # the model is small; on a shared 2-core machine one thread is the considerate choice
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    sites = load_sites(data_dir)
    budget = TrainingBudget(epochs=args.epochs)
    settings = FederationSettings(
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        patient_sample_rate=args.patient_sample_rate,
        max_grad_norm=args.max_grad_norm,
        lr_private=args.lr_private,
        lr_plain=args.lr_plain,
        strategy=args.strategy,
    )
    methods: dict[str, Any] = {}
    methods["persistence"] = score_sites(
        {n: Scored(persistence(s.split.test), None, s.truth, s.split.test.target) for n, s in sites.items()}
    )

    clock = time.perf_counter()
    local = local_only({n: s.split for n, s in sites.items()}, budget)
    timings["local_only_train"] = time.perf_counter() - clock
    methods["local_only"] = scored(sites, lambda name: local[name][0])
    clock = time.perf_counter()
    central, central_history = pooled({n: s.split for n, s in sites.items()}, budget)
    timings["pooled_train"] = time.perf_counter() - clock
    methods["pooled"] = scored(sites, lambda name: central)

    clock = time.perf_counter()
    overhead = dp_step_overhead(sites["lakeside"], sample_rate=settings.patient_sample_rate,
                                repeats=args.overhead_repeats, seed=settings.seed)  # fmt: skip
    timings["dp_step_overhead"] = time.perf_counter() - clock

    federations: dict[str, Any] = {}
    if not args.skip_federated:
        work = data_dir / "runs"
        for epsilon in [None, *args.epsilons]:
            name = "federated_plain" if epsilon is None else f"federated_dp_eps{epsilon:g}"
            model, record = run_federation(name, data_dir, work, settings, epsilon=epsilon)
            federations[name] = record
            timings[name] = record["seconds"]
            methods[name] = scored(sites, _same(model))
            print(name, json.dumps(summary({name: methods[name]})[name]), flush=True)

    train_windows = sum(len(s.split.train) for s in sites.values())
    result = {
        "summary": summary(methods),
        "targets": targets_met(methods, overhead, "federated_dp_eps8"),
        "dp_step_overhead": overhead,
        "methods": methods,
        "federations": federations,
        "settings": {
            "sites": list(SITES),
            "patients_per_site": args.patients,
            "days": args.days,
            "split": "models.twin.split_patients: ~70% train, 10% calibration, 20% test per site, by patient",
            "windows": {n: _sizes(s.split) for n, s in sites.items()},
            "truth": "mean of the simulator's per-minute blood glucose over each target's 5-minute bin",
            "baseline_budget": asdict(budget),
            "pooled_epoch_loss": [round(x, 4) for x in central_history["epoch_loss"]],
            "pooled_steps": central_history["steps"],
            "federation": asdict(settings),
            "federation_total_dp_steps": settings.rounds * settings.steps_per_round,
            "model_parameters": int(sum(p.numel() for p in central.parameters())),
            "train_windows": train_windows,
        },
        "timings_seconds": {k: round(v, 1) for k, v in (timings | {"total": time.perf_counter() - started}).items()},
        "preparation": preparation,
        "git": git_revision(),
        "machine": machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(json.dumps({"summary": result["summary"], "targets": result["targets"]}, indent=2, default=_json_default))


def _same(model: TwinSurrogate) -> Callable[[str], TwinSurrogate]:
    return lambda _site: model


def _sizes(split: PatientSplit) -> dict[str, int]:
    return {"train": len(split.train), "calibration": len(split.calibration), "test": len(split.test)}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    main()
