"""Benchmark: one site's nightly flow on at least 5 million device rows, against a plain polars copy of its files.

Generates Lakeside (Parquet) with enough patients and days for >= 5M device rows (Dexcom CGM every 3 min, basal,
bolus), removes its imaging (timed by the imaging tests, not here: this measures the record and
device path), then in separate processes, so each has its own peak RSS:

1. the baseline: polars reads every record file of the drop and writes it back as Parquet;
2. the site flow (`site_ingest`, under a temporary Prefect server) on the same drop.

Writes bench/results/ingest.json: rows, seconds (the flow's own clock, without the temporary
Prefect server's start), rows_per_second, peak_rss_mb, validation_share (time in contracts over
flow time), ratio_vs_raw_copy, and the flow's stage breakdown (contracts split into GX and the
row-level predicates). Targets: ratio <= 3, validation_share <= 0.25, peak RSS <= 4 GB.

Usage: python bench/ingest.py [--patients 160] [--days 66] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
SITE = "lakeside"
TARGETS = {"ratio_vs_raw_copy": 3.0, "validation_share": 0.25, "peak_rss_mb": 4096.0}
MIN_DEVICE_ROWS = 5_000_000


def main() -> None:
    """Run the benchmark (or, with --phase, one measured phase in this process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--days", type=int, default=66)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, help="Reuse (or keep) the generated data in this folder.")
    parser.add_argument("--phase", choices=["copy", "flow"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_copy(args.data_dir) if args.phase == "copy" else _flow(args.data_dir)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="twinfed-bench-ingest-"))
    try:
        generation = _generate(folder, args.patients, args.days)
        copy, copy_rss = _measured("copy", folder)
        shutil.rmtree(folder / "sites", ignore_errors=True)
        flow, flow_rss = _measured("flow", folder)
        faults = _fault_recall(folder)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    rows = generation["device_rows"]
    seconds = flow["seconds"]["total"]
    result = {
        "site": SITE,
        "patients": args.patients,
        "days": args.days,
        "rows": rows,
        "rows_all_sources": flow["rows_in"],
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "peak_rss_mb": round(flow_rss, 1),
        "validation_share": round(flow["seconds"]["contracts"] / seconds, 3),
        "ratio_vs_raw_copy": round(seconds / copy["seconds"], 2),
        "raw_copy": {"seconds": round(copy["seconds"], 2), "peak_rss_mb": round(copy_rss, 1), "rows": copy["rows"]},
        "flow_breakdown_seconds": {k: round(v, 2) for k, v in flow["seconds"].items()},
        "flow_wall_seconds_with_prefect_server_start": round(flow["wall_seconds"], 2),
        "quarantined": flow["quarantined"],
        "faults_vs_manifest": faults,
        "targets": TARGETS,
        "generation_seconds": round(generation["seconds"], 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result["met_targets"] = {
        "ratio_vs_raw_copy": result["ratio_vs_raw_copy"] <= TARGETS["ratio_vs_raw_copy"],
        "validation_share": result["validation_share"] <= TARGETS["validation_share"],
        "peak_rss_mb": result["peak_rss_mb"] <= TARGETS["peak_rss_mb"],
        "rows": rows >= MIN_DEVICE_ROWS,
        "recall_and_precision_1": faults["recall"] == 1.0 and faults["precision"] == 1.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _generate(folder: Path, patients: int, days: int) -> dict[str, Any]:
    import polars as pl

    from flows.demo_sites.generate import generate_sites
    from flows.demo_sites.profile import load_profiles

    started = time.perf_counter()
    drop = folder / "drops" / SITE
    if not drop.exists():
        profile = next(p for p in load_profiles() if p.site.id == SITE).with_overrides(patients=patients, days=days)
        generate_sites([profile], folder, workers=2)
    shutil.rmtree(drop / "imaging", ignore_errors=True)
    ehr = drop / "ehr"
    device_rows = sum(
        pl.scan_parquet(ehr / name).select(pl.len()).collect().item()
        for name in ("measurement_cgm.parquet", "pump_basal.parquet", "pump_bolus.parquet")
    )
    if device_rows < MIN_DEVICE_ROWS:
        raise SystemExit(f"only {device_rows:,} device rows; raise --patients or --days")
    return {"device_rows": device_rows, "seconds": time.perf_counter() - started}


def _measured(phase: str, folder: Path) -> tuple[dict[str, Any], float]:
    """Run one phase in a child process; its JSON output and its peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    completed = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--data-dir", str(folder)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:  # ru_maxrss of children is the largest child so far; the flow runs second and is larger
        print(f"warning: {phase} peak RSS not above the earlier child's ({before} kB)", file=sys.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1]), peak_kb / 1024


def _fault_recall(folder: Path) -> dict[str, Any]:
    """The run's quarantine and removed duplicates against the generator's fault manifest (record files)."""
    import polars as pl

    from flows.demo_sites.faults import fault_position
    from flows.demo_sites.generate import SitePaths

    run = sorted((folder / "sites" / SITE / "quarantine").iterdir())[-1]
    entries = pl.read_parquet(run / "entries.parquet")
    removed = pl.read_parquet(run / "duplicates_removed.parquet")
    quarantined = set(zip(entries["source_file"], entries["source_position"], strict=True))
    duplicates = set(zip(removed["source_file"], removed["source_position"], strict=True))
    faults = [entry for entry in SitePaths.under(folder, SITE).faults() if entry["file"].startswith("ehr/")]
    where = [(e["file"], fault_position(e)) for e in faults]
    caught = sum(
        w in (duplicates if e["kind"] == "duplicate_row" else quarantined) for e, w in zip(faults, where, strict=True)
    )
    clean_quarantined = len(quarantined - set(where))
    return {
        "faults": len(faults),
        "caught": caught,
        "recall": caught / len(faults),
        "quarantined": len(quarantined),
        "precision": 1 - clean_quarantined / max(len(quarantined), 1),
    }


def _copy(folder: Path) -> dict[str, Any]:
    """The baseline: read every record file of the drop with polars and write it as Parquet."""
    import polars as pl

    ehr = folder / "drops" / SITE / "ehr"
    out = folder / "raw_copy"
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    rows = 0
    for path in sorted(ehr.glob("*.parquet")):
        frame = pl.read_parquet(path)
        frame.write_parquet(out / path.name)
        rows += frame.height
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return {"seconds": seconds, "rows": rows}


def _flow(folder: Path) -> dict[str, Any]:
    """The site flow on the drop, under a temporary Prefect server."""
    os.environ.setdefault("PREFECT_HOME", str(folder / "prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.site_flow import site_ingest

    with prefect_test_harness(server_startup_timeout=60):
        started = time.perf_counter()
        run = site_ingest(SITE, data_dir=folder)
        wall = time.perf_counter() - started
    return {
        "seconds": run["seconds"],
        "wall_seconds": wall,
        "rows_in": sum(entry["rows_in"] for entry in run["ledgers"]),
        "quarantined": sum(entry["quarantined"] for entry in run["ledgers"]),
    }


if __name__ == "__main__":
    main()
