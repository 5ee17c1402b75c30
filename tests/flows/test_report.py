"""`twinfed report`: offline HTML pages from the published marts, patient plots only in the site's own page."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from flows.marts.federation import build_federation_mart
from flows.marts.site import build_site_mart
from flows.marts.synthetic import SyntheticSite, write_registry, write_site

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
    assert table is not None and "change in expected time in range, points" in table.group(1)
    number = r"<td>(-?[0-9.]+)</td>"
    rows = re.findall(rf"<tr><td>([a-z_0-9]+)</td>{number * 3}</tr>", table.group(1))
    assert len(rows) >= 2, table.group(1)  # a row per scenario answered at the chosen cut-off, every cell filled


def test_report_without_a_mart_says_what_to_run(tmp_path: Path) -> None:
    """No published mart: exit code 2 and the command that makes one."""
    done = CliRunner().invoke(app, ["report", "nowhere", "--data-dir", str(tmp_path)])
    assert done.exit_code == 2 and "twinfed predict" in done.output
