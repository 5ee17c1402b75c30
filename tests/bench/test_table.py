"""The README's benchmark table is the one rendered from bench/results/, and every results file has its row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_table() -> ModuleType:
    """bench/table.py as a module (bench/ holds scripts)."""
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_table_rendered_from_the_results() -> None:
    """Rerun a benchmark and this fails until `python bench/table.py` is pasted into the README."""
    table = load_table()
    assert table.readme_table(ROOT / "README.md") == table.render()


def test_each_row_reads_its_results_file(tmp_path: Path) -> None:
    """A missing file is a 'not run yet' row; a present one shows its numbers and whether the target was met."""
    table = load_table()
    assert table.render(tmp_path).count("not run yet") == len(table.ROWS)
    sites = {"sites": 3, "patients_per_site": 100, "days": 14, "seconds": 75.5, "target_seconds": 60.0,
             "met_target": False, "total_bytes": 5e8, "total_files": 936}  # fmt: skip
    (tmp_path / "sites.json").write_text(json.dumps(sites))
    row = next(line for line in table.render(tmp_path).splitlines() if "sites.json" in line)
    assert "75.5 s" in row and "<= 60 s" in row and "**missed**" in row
