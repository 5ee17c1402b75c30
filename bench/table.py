"""The README's benchmark table, rendered from bench/results/*.json (what each benchmark last measured).

`python bench/table.py` prints it; the README carries it between the `<!-- bench-table -->` markers, and a test
checks the two agree, so the README never shows a number the results do not hold. A missing results file is a
row saying so, not a gap.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def _met(flag: bool) -> str:
    return "met" if flag else "**missed**"


def _simulator(d: dict[str, Any]) -> tuple[str, str, str]:
    measured = (f"{d['patient_days']:,} patient-days in {d['seconds']:.1f} s: {d['speedup_vs_simglucose']:,.0f}x "
                f"simglucose; max glucose difference {d['max_abs_diff_mg_dl']:.4f} mg/dL")  # fmt: skip
    return measured, f">= {d['speedup_target']:,}x", _met(d["speedup_vs_simglucose"] >= d["speedup_target"])


def _sites(d: dict[str, Any]) -> tuple[str, str, str]:
    measured = (f"{d['sites']} sites x {d['patients_per_site']} patients x {d['days']} days in {d['seconds']:.1f} s "
                f"({d['total_files']} files, {d['total_bytes'] / 1e6:,.0f} MB)")  # fmt: skip
    return measured, f"<= {d['target_seconds']:g} s", _met(d["met_target"])


def _ingest(d: dict[str, Any]) -> tuple[str, str, str]:
    faults = d["faults_vs_manifest"]
    measured = (f"{d['site']}: {d['rows']:,} device rows in {d['seconds']:.1f} s, {d['ratio_vs_raw_copy']:.1f}x a "
                f"plain read+write, validation {d['validation_share']:.0%} of the time, peak RSS "
                f"{d['peak_rss_mb'] / 1024:.1f} GB; {faults['faults']:,} injected faults: recall "
                f"{faults['recall']:.2f}, precision {faults['precision']:.2f}")  # fmt: skip
    t = d["targets"]
    target = (f"ratio <= {t['ratio_vs_raw_copy']:g}, validation <= {t['validation_share']:.0%}, "
              f"RSS <= {t['peak_rss_mb'] / 1024:g} GB")  # fmt: skip
    met = d["met_targets"]
    return measured, target, ", ".join(f"{k}: {_met(met[k])}" for k in t)


def _federated(d: dict[str, Any]) -> tuple[str, str, str]:
    s, t = d["summary"], d["targets"]
    persistence = s["persistence"]["rmse30"]
    methods = [("local-only", "local_only"), ("pooled", "pooled"), ("federated", "federated_plain"),
               ("DP eps 1", "federated_dp_eps1"), ("DP eps 3", "federated_dp_eps3"),
               ("DP eps 8", "federated_dp_eps8")]  # fmt: skip
    rmse = "; ".join(f"{name} {s[key]['rmse30']:.1f}" for name, key in methods)
    coverage = t["coverage90_in_88_92"]["federated_dp_eps8"]["truth"]["coverage"]
    measured = (f"RMSE30 vs true glucose (mg/dL): persistence {persistence:.1f}; {rmse}. DP eps 8 / pooled "
                f"{t['dp8_within_15pct_of_pooled']['ratio']:.2f}; DP eps 8 coverage {coverage:.3f}; "
                f"dp_step_overhead {d['dp_step_overhead']['ragged']:.2f}")  # fmt: skip
    target = "DP eps 8 <= 1.15x pooled; RMSE30 <= 0.7x persistence; coverage 0.88-0.92; overhead <= 3"
    dp8 = t["rmse30_at_most_0.7x_persistence"]["federated_dp_eps8"]["met"]
    overhead = all(v["met"] for v in t["dp_step_overhead_at_most_3"].values())
    met = (f"within 15%: {_met(t['dp8_within_15pct_of_pooled']['met'])}, 0.7x (DP eps 8): {_met(dp8)}, "
           f"coverage: {_met(0.88 <= coverage <= 0.92)}, overhead: {_met(overhead)}")  # fmt: skip
    return measured, target, met


def _whatif(d: dict[str, Any]) -> tuple[str, str, str]:
    horizon = str(d["target"]["horizon_min"])
    rs = {name: by[horizon]["mean_glucose"]["pearson_r"] for name, by in d["summary"].items()}
    tir = max(by[horizon]["tir"]["pearson_r"] for by in d["summary"].values())
    expected = max(s["horizons_min"][horizon]["tir_expected"]["pearson_r"] for s in d["scenarios"].values())
    ceiling = d["diagnosis"]["time_in_range_with_the_exact_effect_on_the_twin_level"]["best_pearson_r"]
    measured = (f"r of the change in {horizon}-min mean glucose, twin (per-patient calibrated) vs simulator: "
                + ", ".join(f"{k} {v:.2f}" for k, v in rs.items())
                + f"; time in range r <= {tir:.2f} (expected TIR over the intervals <= {expected:.2f}; with the "
                f"simulator's exact change on the twin's forecast <= {max(ceiling.values()):.3f})")  # fmt: skip
    return measured, f"r >= {d['target']['pearson_r_at_least']:g} every scenario", _met(d["met_target"])


def _marts(d: dict[str, Any]) -> tuple[str, str, str]:
    medians = [q["median_ms"] for q in d["queries"].values()]
    measured = (f"{d['forecast_rows']:,} forecast rows; {len(medians)} documented queries, medians "
                f"{min(medians):.0f}-{max(medians):.0f} ms; build {d['site_build_seconds']:.0f} s, "
                f"{d['site_mart_bytes'] / 1e6:,.0f} MB")  # fmt: skip
    return measured, f"median < {d['target_median_ms']:g} ms each", _met(d["all_met"])


ROWS: list[tuple[str, str, Callable[[dict[str, Any]], tuple[str, str, str]]]] = [
    ("simulator.json", "mechanistic twin vs simglucose", _simulator),
    ("sites.json", "demo hospitals generated", _sites),
    ("ingest.json", "one site flow", _ingest),
    ("federated.json", "federated twin (issue 5)", _federated),
    ("whatif.json", "what-if fidelity (issue 6)", _whatif),
    ("marts.json", "analyst queries on a site mart", _marts),
]


def render(results: Path = RESULTS) -> str:
    """The markdown table, one row per benchmark, from the results files in `results`."""
    lines = ["| benchmark | measured here (2 cores) | target | |", "|---|---|---|---|"]
    for file, title, row in ROWS:
        path = results / file
        if not path.is_file():
            lines.append(f"| `{file}`: {title} | not run yet (`python bench/{file.replace('.json', '.py')}`) | | |")
            continue
        measured, target, met = row(json.loads(path.read_text()))
        lines.append(f"| `{file}`: {title} | {measured} | {target} | {met} |")
    return "\n".join(lines)


def readme_table(readme: Path) -> str:
    """The table between the markers in the README."""
    text = readme.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
