"""The site flow under Prefect: every fault caught, nothing identifying written, reruns idempotent and incremental."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from phi_fixtures import identifiers, leaks
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogWorker
from prefect.testing.utilities import prefect_test_harness

from data_contracts.schema import TABLES
from flows.demo_sites.faults import fault_position
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import read_features
from flows.site_flow import site_ingest
from flows.site_store import SiteStore

SITES = ("aurelia", "northbridge", "lakeside")


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A temporary Prefect server for the module's flow runs."""
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small demo drops, with more corrupted DICOM than the defaults so every site has some."""
    folder = tmp_path_factory.mktemp("site_flow")
    profiles = [p.with_overrides(patients=3, days=1) for p in load_profiles()]
    generate_sites(profiles, folder, workers=2)
    return folder


@pytest.fixture(scope="module")
def runs(harness: None, data_dir: Path) -> dict[str, dict]:
    """Each site's flow run once."""
    return {site: site_ingest(site, data_dir=data_dir) for site in SITES}


@pytest.mark.parametrize("site", SITES)
def test_the_site_quarantine_holds_every_manifest_fault_and_nothing_clean(
    data_dir: Path, runs: dict[str, dict], site: str
) -> None:
    """Recall 100% over the whole manifest (records and DICOM), precision 100%, each entry with its raw content."""
    folder = Path(runs[site]["quarantine"])
    entries = pl.read_parquet(folder / "entries.parquet")
    removed = pl.read_parquet(folder / "duplicates_removed.parquet")
    quarantined = set(zip(entries["source_file"], entries["source_position"], strict=True))
    files = set(entries["source_file"])
    duplicates = set(zip(removed["source_file"], removed["source_position"], strict=True))
    faults = SitePaths.under(data_dir, site).faults()
    assert {f["kind"] for f in faults} >= {"corrupted_dicom", "phi_in_free_text", "duplicate_row"}

    def caught(fault: dict) -> bool:
        if fault["kind"] == "corrupted_dicom":
            return fault["file"] in files
        where = (fault["file"], fault_position(fault))
        return where in (duplicates if fault["kind"] == "duplicate_row" else quarantined)

    assert [f for f in faults if not caught(f)] == []
    expected = {(f["file"], fault_position(f)) for f in faults}
    dicom = {f["file"] for f in faults if f["kind"] == "corrupted_dicom"}
    clean_quarantined = {q for q in quarantined if q not in expected and q[0] not in dicom}
    print(f"{site}: {len(faults)} faults, recall 100%, precision {1 - len(clean_quarantined) / len(quarantined):.3f}")
    assert clean_quarantined == set()
    records = entries.filter(pl.col("source_file").str.starts_with("ehr/"))
    assert records["raw_content"].is_not_null().all()
    for file in dicom:
        assert (folder / "files" / file).is_file()
    assert all(ledger["balanced"] for ledger in runs[site]["ledgers"])


def written_texts(store: SiteStore) -> dict[str, str]:
    """Everything the flow wrote at the site outside the quarantine, as text (Parquet tables as CSV)."""
    texts = {}
    for path in store.root.rglob("*"):
        relative = path.relative_to(store.root)
        if not path.is_file() or relative.parts[0] == "quarantine" or path.name == "secret.key":
            continue
        if path.suffix == ".parquet":
            texts[str(relative)] = pl.read_parquet(path).write_csv()
        else:
            texts[str(relative)] = path.read_bytes().decode("latin-1")
    return texts


def test_no_identifier_reaches_tables_features_docs_artifacts_or_logs(data_dir: Path, runs: dict[str, dict]) -> None:
    """The PHI scan: none of any site's identifiers or free text in anything the flows wrote or told Prefect."""
    APILogWorker.instance().drain()  # logs are shipped in the background: send what is pending first
    with get_client(sync_client=True) as client:
        artifacts = [f"{a.key} {a.data} {a.description}" for a in client.read_artifacts(limit=200)]
        logs: list[str] = []
        while page := client.read_logs(limit=200, offset=len(logs)):
            logs += [log.message for log in page]
    assert any(a.startswith("northbridge-ingest-ledger") for a in artifacts)
    assert any("Data Docs: file://" in a for a in artifacts)
    assert any("harmonized" in message for message in logs)
    told = {"artifacts": "\n".join(artifacts), "logs": "\n".join(logs)}
    for site in SITES:
        written = written_texts(SiteStore.under(data_dir, site))
        assert any(name.startswith("gx/data_docs") and name.endswith(".html") for name in written)
        assert any(name.startswith("features/") for name in written)
        assert any(name.startswith("imaging/") for name in written)
        found = leaks(identifiers(data_dir, site), written | told)
        assert found == [], sorted({(value[:4] + "...", where) for value, where in found})


def test_features_cover_every_patient_on_a_5_minute_grid(data_dir: Path, runs: dict[str, dict]) -> None:
    """The training features: a regular 5-minute grid per patient, the CGM of the harmonized table, image covariates."""
    store = SiteStore.under(data_dir, "northbridge")
    features = read_features(store.features)
    person = store.read_table("person")
    assert set(features.static["person_id"]) == set(person["person_id"])
    steps = features.grid.group_by("person_id").agg(pl.col("bin_start").diff().dt.total_minutes().drop_nulls().unique())
    assert all(list(s) == [5] for s in steps["bin_start"])
    cgm = store.read_table("measurement").filter(pl.col("measurement_source_value") == "cgm_glucose")
    assert features.grid["cgm_count"].sum() == cgm.height
    assert features.static["visceral_fat_area_cm2"].null_count() < features.static.height


def test_a_rerun_changes_nothing_and_a_new_drop_is_incremental(harness: None, data_dir: Path) -> None:
    """Same drop: skipped, tables byte-identical. New CGM lines: only that file read, rows added once, no duplicates."""
    site = "northbridge"
    store = SiteStore.under(data_dir, site)
    site_ingest(site, data_dir=data_dir, build_docs=False)  # the runs fixture may not have run first
    before = {t: store.table_path(t).read_bytes() for t in TABLES}
    again = site_ingest(site, data_dir=data_dir, build_docs=False)
    assert again["skipped"] is True
    assert {t: store.table_path(t).read_bytes() for t in TABLES} == before
    forced = site_ingest(site, data_dir=data_dir, build_docs=False, force=True)  # everything read and written again
    assert forced["skipped"] is False and forced["tables"]["image_feature"] > 0
    assert {t: store.table_path(t).read_bytes() for t in TABLES} == before
    cgm = SitePaths.under(data_dir, site).drop / "ehr" / "cgm_readings.csv"
    header, *lines = cgm.read_text().splitlines()
    stamp = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d$")
    last = next(f for f in (line.split(",") for line in reversed(lines)) if len(f) == 6 and stamp.match(f[3]))
    new_lines = []
    for i in range(1, 4):  # three readings after the patient's last, as tomorrow's export would add
        fields = list(last)
        fields[0] = f"CGNEW{i:04d}"
        later = datetime.strptime(last[3], "%d/%m/%Y %H:%M:%S") - timedelta(hours=3) + timedelta(minutes=5 * i)
        fields[3] = later.strftime("%d/%m/%Y %H:%M:%S")  # inside the export window, new record keys
        new_lines.append(",".join(fields))
    cgm.write_text("\n".join([header, *lines, *new_lines]) + "\n")
    measurement_before = store.read_table("measurement").height
    incremental = site_ingest(site, data_dir=data_dir, build_docs=False)
    assert incremental["skipped"] is False
    assert {ledger["file"] for ledger in incremental["ledgers"]} == {"ehr/patients.csv", "ehr/cgm_readings.csv"}
    measurement = store.read_table("measurement")
    assert measurement.height == measurement_before + 3, incremental["ledgers"]
    assert measurement["measurement_id"].is_unique().all()
    for table in ("drug_exposure", "observation", "image_feature"):
        assert store.table_path(table).read_bytes() == before[table]


@pytest.mark.slow  # ~20 s of three more flow runs; CI runs it (make test-slow)
def test_a_record_now_rejected_and_a_patient_now_unlisted_leave_the_store(harness: None, data_dir: Path) -> None:
    """A record re-exported with a bad value withdraws its earlier row; an unlisted patient leaves every table.

    A patient dropped from the patient list (consent withdrawn) leaves every table, and the changed list makes
    every file of the drop be read again.
    """
    site = "northbridge"
    store = SiteStore.under(data_dir, site)
    drop = SitePaths.under(data_dir, site).drop
    site_ingest(site, data_dir=data_dir, build_docs=False)
    measurement = store.read_table("measurement")
    victim = measurement.filter(pl.col("measurement_source_value") == "cgm_glucose").row(0, named=True)
    record = victim["source_record"].split("#")[1]
    cgm = drop / "ehr" / "cgm_readings.csv"
    lines = cgm.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{record},"))
    fields = lines[index].split(",")
    fields[4] = "99.9"  # mmol/L: 1,800 mg/dL, beyond any sensor
    lines[index] = ",".join(fields)
    cgm.write_text("\n".join(lines) + "\n")
    run = site_ingest(site, data_dir=data_dir, build_docs=False)
    entries = pl.read_parquet(Path(run["quarantine"]) / "entries.parquet")
    assert record in set(entries["record_key"])
    assert victim["measurement_id"] not in set(store.read_table("measurement")["measurement_id"])

    patients = drop / "ehr" / "patients.csv"
    header, first, *rest = patients.read_text().splitlines()
    gone = store.read_table("person").filter(
        pl.col("person_id").is_in(store.read_table("measurement")["person_id"].implode())
    )["person_id"]
    before = {t: store.read_table(t) for t in TABLES}
    patients.write_text("\n".join([header, *rest]) + "\n")  # the first patient withdrew consent
    run = site_ingest(site, data_dir=data_dir, build_docs=False)
    assert run["files_skipped"] == []  # a new patient list: every file read again
    after = {t: store.read_table(t) for t in TABLES}
    assert after["person"].height == before["person"].height - 1
    removed = set(before["person"]["person_id"]) - set(after["person"]["person_id"])
    assert len(removed) == 1 and removed <= set(gone)
    for table, frame in after.items():
        if "person_id" in frame.columns:
            assert not set(frame["person_id"]) & removed, table
    assert after["measurement"].height < before["measurement"].height
