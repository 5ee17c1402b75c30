"""Benchmark: generate the three default demo hospitals (100 patients x 14 days each) and time it.

Writes bench/results/sites.json with the wall time (target: at most 60 s here), and per site the
time, files, bytes, rows per export file and faults injected.

Usage: python bench/sites.py [--patients 100] [--days 14] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from flows.demo_sites.generate import generate_sites
from flows.demo_sites.profile import load_profiles

RESULTS = Path(__file__).resolve().parent / "results" / "sites.json"
TARGET_SECONDS = 60.0


def main() -> None:
    """Run the benchmark and write bench/results/sites.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    profiles = [p.with_overrides(patients=args.patients, days=args.days) for p in load_profiles()]
    folder = Path(tempfile.mkdtemp(prefix="twinfed-bench-sites-"))
    try:
        # Warm the numba cache so the timing is of generation, not of a one-off compile.
        generate_sites([profiles[0].with_overrides(patients=1, days=1)], folder / "warmup", workers=1)
        started = time.perf_counter()
        summaries = generate_sites(profiles, folder / "run", workers=args.workers)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "sites": len(profiles),
        "patients_per_site": args.patients,
        "days": args.days,
        "workers": args.workers,
        "seconds": round(seconds, 2),
        "target_seconds": TARGET_SECONDS,
        "met_target": seconds <= TARGET_SECONDS,
        "total_bytes": sum(s.bytes for s in summaries),
        "total_files": sum(s.files for s in summaries),
        "per_site": [asdict(s) for s in summaries],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_site"}, indent=2))


if __name__ == "__main__":
    main()
