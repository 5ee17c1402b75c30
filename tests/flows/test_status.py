"""`twinfed status`: what it reads from a real site flow's store, its hints, its exit code, and what it never prints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from phi_fixtures import identifiers, leaks
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from federated.privacy import BudgetExceeded, PrivacyLedger
from flows.cli import app
from flows.demo_sites.generate import generate_sites
from flows.demo_sites.profile import load_profiles
from flows.marts.layout import BATCH_FILE, SiteMartLayout
from flows.marts.synthetic import SyntheticSite, write_registry, write_site
from flows.site_flow import site_ingest
from flows.site_store import SiteStore
from flows.status import IMAGING_SOURCE, site_status

SITE = "lakeside"
runner = CliRunner()


def status_json(data_dir: Path, *sites: str) -> tuple[int, dict[str, Any]]:
    """Exit code and parsed output of `twinfed status --json`."""
    done = runner.invoke(app, ["status", *sites, "--data-dir", str(data_dir), "--json"])
    assert done.exception is None or isinstance(done.exception, SystemExit), done.output
    return done.exit_code, json.loads(done.output)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A small demo hospital's drop run once through the real site flow; the data folder and the run's result."""
    folder = tmp_path_factory.mktemp("status")
    profile = next(p for p in load_profiles() if p.site.id == SITE).with_overrides(patients=3, days=1)
    generate_sites([profile], folder, workers=1)
    with prefect_test_harness(server_startup_timeout=120):
        run = site_ingest(SITE, data_dir=folder, build_docs=False)
        again = site_ingest(SITE, data_dir=folder, build_docs=False)
    assert not run["skipped"] and again["skipped"]  # the flow itself finds nothing to do the second time
    return folder, run


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[SiteMartLayout]:
    """A 12-patient synthetic site store with one published batch of twin-0001, which is registered."""
    write_site(tmp_path, SyntheticSite("tiny", sexes=["M", "F"] * 6, ages=[30] * 12, days=1, forecast_every_min=60,
                                       forecast_from_day=0, batches=1, seed=3))  # fmt: skip
    write_registry(tmp_path / "federation", ["tiny"])
    yield SiteMartLayout.under(tmp_path, "tiny")


def quarantine_batch(layout: SiteMartLayout, batch_id: str, hours_later: int) -> Path:
    """A batch that failed its contract, as the prediction flow leaves it: under quarantine/predictions."""
    published = json.loads(next(layout.predictions.glob(f"*/{BATCH_FILE}")).read_text())
    folder = layout.store.root / "quarantine" / "predictions" / batch_id
    folder.mkdir(parents=True)
    issued = pl.Series([published["issued_at"]]).str.to_datetime()[0] + timedelta(hours=hours_later)
    failed = [{"check": "forecast.q50.plausible_range", "status": "Failed", "violating": 24,
               "reason": "q50 must be between 20 and 600 mg/dL", "error": None}]  # fmt: skip
    batch = published | {"batch_id": batch_id, "issued_at": issued.isoformat(),
                         "contract": {"version": "1.0.0", "passed": False, "failed": failed}}  # fmt: skip
    (folder / BATCH_FILE).write_text(json.dumps(batch))
    return folder


def test_a_fresh_site_says_run_the_site_flow(tmp_path: Path) -> None:
    """A drop never ingested: no run, not harmonized, the hint names `twinfed ingest <site>`, and exit 0."""
    drop = tmp_path / "drops" / SITE / "ehr"
    drop.mkdir(parents=True)
    (drop / "patient.parquet").write_bytes(b"not read by status")
    status = site_status(tmp_path, SITE, tmp_path / "federation")
    assert status.last_run is None and status.drop is not None and status.drop.files == 1
    assert status.drop.harmonized is False and not status.failed
    assert any(f"twinfed ingest {SITE}" in hint for hint in status.hints)
    code, out = status_json(tmp_path)
    assert code == 0 and [s["site"] for s in out["sites"]] == [SITE]
    assert any("twinfed train" in hint for hint in out["federation"]["hints"])


def test_an_ingested_site_reports_its_run_record(ingested: tuple[Path, dict[str, Any]]) -> None:
    """The last run and the quarantine per source are the run record's ledgers; the drop is harmonized as it is."""
    data_dir, run = ingested
    status = site_status(data_dir, SITE, data_dir / "federation")
    assert status.last_run is not None and status.last_run.run_id == run["run_id"]
    assert status.last_run.outcome == "completed" and not status.failed
    for key in ("rows_in", "harmonized", "quarantined", "exact_duplicates"):
        assert getattr(status.last_run, key) == sum(entry[key] for entry in run["ledgers"])
    by_source = {(IMAGING_SOURCE if e["file"].startswith(IMAGING_SOURCE) else e["file"]): e["quarantined"]
                 for e in run["ledgers"]}  # fmt: skip
    assert status.quarantined_by_source == by_source and status.quarantined == status.last_run.quarantined > 0
    assert status.drop is not None and status.drop.harmonized is True
    assert not any("twinfed ingest" in hint for hint in status.hints)


def test_a_changed_drop_is_reported_not_harmonized(ingested: tuple[Path, dict[str, Any]]) -> None:
    """A file the site flow has not seen makes the drop pending again, with the command that ingests it."""
    data_dir, _ = ingested
    extra = data_dir / "drops" / SITE / "ehr" / "late_export.csv"
    extra.write_text("a file the hospital added after the run\n")
    try:
        status = site_status(data_dir, SITE, data_dir / "federation")
    finally:
        extra.unlink()
    assert status.drop is not None and status.drop.harmonized is False
    assert any(f"twinfed ingest {SITE}" in hint for hint in status.hints) and not status.failed


def test_a_failed_prediction_batch_fails_the_status_until_a_batch_passes(tiny: SiteMartLayout) -> None:
    """The newest batch quarantined: failed, hint with its batch.json and `twinfed predict`, exit 2; later, history."""
    data_dir = tiny.store.root.parent.parent
    published = json.loads(next(tiny.predictions.glob(f"*/{BATCH_FILE}")).read_text())["batch_id"]
    folder = quarantine_batch(tiny, "20260407T010000Z-twin-0001", hours_later=1)
    status = site_status(data_dir, "tiny", data_dir / "federation")
    assert status.failed and status.failed_batches == ["20260407T010000Z-twin-0001"]
    hint = next(h for h in status.hints if "failed its contract" in h)
    assert str(folder / BATCH_FILE) in hint and "forecast.q50.plausible_range" in hint
    assert "twinfed predict tiny" in hint and f"batch {published} stays published" in hint
    code, out = status_json(data_dir, "tiny")
    assert code == 2 and out["failed"] and out["sites"][0]["failed_batches"] == ["20260407T010000Z-twin-0001"]
    table = runner.invoke(app, ["status", "tiny", "--data-dir", str(data_dir)])
    assert table.exit_code == 2 and "twinfed predict tiny" in table.output
    shutil.move(folder, data_dir / "older")  # the same failure, but before the published batch
    quarantine_batch(tiny, "20260406T000000Z-twin-0001", hours_later=-1)
    status = site_status(data_dir, "tiny", data_dir / "federation")
    assert not status.failed and len(status.failed_batches) == 1
    assert status_json(data_dir, "tiny")[0] == 0


def test_the_run_record_s_rejected_file_and_the_stale_model_are_reported(tiny: SiteMartLayout) -> None:
    """A whole file rejected counts as such; predictions of a model that is no longer live say run predict."""
    data_dir = tiny.store.root.parent.parent
    status = site_status(data_dir, "tiny", data_dir / "federation")
    assert status.files_rejected == 1 and status.quarantined_by_source["ehr/cgm.csv"] == 9
    assert status.predicted_with == status.live_model == "twin-0001"
    assert not any("twinfed predict" in hint for hint in status.hints)
    write_registry(data_dir / "federation", ["tiny"], version="twin-0002")
    status = site_status(data_dir, "tiny", data_dir / "federation")
    assert status.live_model == "twin-0002" and any("twinfed predict tiny" in hint for hint in status.hints)


def test_privacy_remaining_is_the_budget_less_what_the_real_ledger_spent(tmp_path: Path) -> None:
    """Spent, budget, delta and rounds are the PrivacyLedger's own; remaining is budget - spent."""
    path = SiteMartLayout.under(tmp_path, SITE).privacy_ledger
    ledger = PrivacyLedger(path, site_id=SITE, epsilon_budget=4.0, delta=1e-5)
    ledger.record_round("run-1:1", noise_multiplier=2.0, sample_rate=0.1, steps=5)
    ledger.record_round("run-1:2", noise_multiplier=2.0, sample_rate=0.1, steps=5)
    privacy = site_status(tmp_path, SITE, tmp_path / "federation").privacy
    assert privacy is not None and privacy.rounds == 2 and privacy.delta == 1e-5
    assert privacy.epsilon_spent == pytest.approx(ledger.epsilon_spent(), rel=1e-9) and privacy.epsilon_spent > 0
    assert privacy.epsilon_remaining == pytest.approx(4.0 - ledger.epsilon_spent(), rel=1e-9)
    assert not any("budget" in hint for hint in site_status(tmp_path, SITE, tmp_path / "federation").hints)
    while True:  # spend until one more round like the last would not fit: the status says so before it is refused
        try:
            ledger.check_round(noise_multiplier=2.0, sample_rate=0.1, steps=5)
        except BudgetExceeded:
            break
        ledger.record_round(f"run-2:{ledger.summary()['rounds']}", noise_multiplier=2.0, sample_rate=0.1, steps=5)
    late = site_status(tmp_path, SITE, tmp_path / "federation")
    assert late.privacy is not None and late.privacy.epsilon_remaining > 0
    assert any("nearly used up" in hint for hint in late.hints)
    path.write_text("{not json")
    broken = site_status(tmp_path, SITE, tmp_path / "federation")
    assert broken.failed and any(str(path) in hint and "restore" in hint for hint in broken.hints)


def test_no_person_id_pseudonym_or_identifier_is_printed(ingested: tuple[Path, dict[str, Any]]) -> None:
    """Neither the table nor the JSON holds a person id, a pseudonym, or any identifier of the drop."""
    data_dir, _ = ingested
    person = SiteStore.under(data_dir, SITE).read_table("person")
    assert person.height > 0
    secrets = {str(p) for p in person["person_id"]} | set(person["person_source_value"].drop_nulls())
    secrets |= identifiers(data_dir, SITE)
    table = runner.invoke(app, ["status", "--data-dir", str(data_dir)], env={"COLUMNS": "300"})
    _, out = status_json(data_dir)
    assert table.exit_code == 0 and SITE in table.output
    assert leaks(secrets, {"table": table.output, "json": json.dumps(out)}) == []
