"""`twinfed report`: offline HTML pages from the published marts, patient plots only in the site's own page."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import polars as pl
from typer.testing import CliRunner

from flows.cli import app
from flows.marts.federation import build_federation_mart
from flows.marts.site import build_site_mart
from flows.marts.synthetic import SyntheticSite, write_registry, write_site
from flows.report import whatif_summary
from models.glucose_metrics import expected_time_in_range

PNG = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


def test_report_pages_are_offline_and_the_federation_page_has_no_patient(tmp_path: Path) -> None:
    """Three plots for the site, two for the federation; PNGs embedded, no script, nothing fetched from a network."""
    site = SyntheticSite("testsite", sexes=["M", "F"] * 6, ages=[30, 60] * 6, days=1, forecast_every_min=60,
                         forecast_from_day=0, batches=1, whatif_every_min=60, seed=2)  # fmt: skip
    person_ids = write_site(tmp_path, site)
    write_registry(tmp_path / "federation", ["testsite"])
    build_site_mart(tmp_path, "testsite")
    build_federation_mart(tmp_path, tmp_path / "federation")

    done = CliRunner().invoke(app, ["report", "testsite", "--data-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    site_page = tmp_path / "sites" / "testsite" / "report" / "index.html"
    federation_page = tmp_path / "federation" / "report" / "index.html"
    for page, plots in ((site_page, 3), (federation_page, 2)):
        text = page.read_text()
        images = PNG.findall(text)
        assert len(images) == plots and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
        assert "<script" not in text and "http://" not in text and "https://" not in text
    federation = federation_page.read_text()
    assert not any(str(p) in federation for p in person_ids)  # aggregates only
    shown = re.search(r"vs CGM: patient (\d+)", site_page.read_text())
    assert shown is not None and int(shown.group(1)) in person_ids  # a pseudonym of the site's own patients
    table = re.search(r"<table>(.*?)</table>", site_page.read_text())
    assert table is not None and "change in expected time in range 70-180, points" in table.group(1)
    cells = re.findall(
        r"<tr><td>([a-z_0-9]+)</td><td>120</td><td>(-?[0-9.]+)</td><td>(-?[0-9.]+)</td></tr>", table.group(1)
    )
    assert cells, table.group(1)  # one row per scenario, both changes filled in (the baseline's interval joined)


def test_whatif_summary_changes_over_the_horizons() -> None:
    """Mean change of the medians; expected TIR change: with zero-width intervals it is the median bins' count."""
    certain = pl.DataFrame(
        {
            "scenario_id": ["later_meal", "later_meal"],
            "horizon_min": [10, 5],
            "q50": [170.0, 160.0],
            "baseline_q50": [190.0, 150.0],
        }
    ).with_columns(
        q05=pl.col("q50"), q95=pl.col("q50"), baseline_q05=pl.col("baseline_q50"), baseline_q95=pl.col("baseline_q50")
    )
    got = whatif_summary(certain).row(0, named=True)
    assert got["scenario"] == "later_meal" and got["minutes"] == 10
    assert got["change in mean glucose, mg/dL"] == -5.0  # (160 - 150 + 170 - 190) / 2
    assert got["change in expected time in range 70-180, points"] == 50.0  # 100% in range under it, 50% without
    wide = certain.with_columns(q95=pl.col("q50") + 60.0, baseline_q05=pl.col("baseline_q50") - 60.0)
    expected = expected_time_in_range(
        np.array([160.0, 170.0]), np.array([160.0, 170.0]), np.array([220.0, 230.0])
    ) - expected_time_in_range(np.array([90.0, 130.0]), np.array([150.0, 190.0]), np.array([150.0, 190.0]))
    assert whatif_summary(wide)["change in expected time in range 70-180, points"][0] == round(float(expected), 1)
    unjoined = certain.with_columns(baseline_q05=pl.lit(None, dtype=pl.Float64))
    assert whatif_summary(unjoined)["change in expected time in range 70-180, points"][0] is None


def test_report_without_a_mart_says_what_to_run(tmp_path: Path) -> None:
    """No published mart: exit code 2 and the command that makes one."""
    done = CliRunner().invoke(app, ["report", "nowhere", "--data-dir", str(tmp_path)])
    assert done.exit_code == 2 and "twinfed predict" in done.output
