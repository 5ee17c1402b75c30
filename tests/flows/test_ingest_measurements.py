"""Measurement ingestion: every injected fault caught, nothing clean quarantined, every row accounted for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.ingest.mapping import mapping_for
from flows.ingest.measurements import MeasurementBatch, ingest_measurements

SITES = ("aurelia", "northbridge", "lakeside")
SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small demo drops."""
    folder = tmp_path_factory.mktemp("measurements")
    generate_sites([p.with_overrides(patients=4, days=2) for p in load_profiles()], folder, workers=2)
    return folder


@pytest.fixture(scope="module")
def batches(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, MeasurementBatch]:
    """Each site's measurements ingested once."""
    work = tmp_path_factory.mktemp("work")
    return {
        site: ingest_measurements(
            SitePaths.under(data_dir, site).drop, mapping_for(site), secret=SECRET, workdir=work / site
        )  # fmt: skip
        for site in SITES
    }


def manifest(data_dir: Path, site: str) -> list[dict]:
    text = (SitePaths.under(data_dir, site).truth / "fault_manifest.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("site", SITES)
def test_every_manifest_fault_is_caught_and_no_clean_row_is_quarantined(
    data_dir: Path, batches: dict[str, MeasurementBatch], site: str
) -> None:
    """Recall 100% on the measurement files' faults (duplicates removed, the rest quarantined); precision 100%."""
    files = {source.file for source in mapping_for(site).measurements.values()}
    entries = [e for e in manifest(data_dir, site) if e["file"] in files]
    assert entries
    batch = batches[site]
    quarantined = set(zip(batch.quarantine["source_file"], batch.quarantine["source_position"], strict=True))
    removed = set(zip(batch.duplicates["source_file"], batch.duplicates["source_position"], strict=True))

    def where(entry: dict) -> tuple[str, int]:
        return entry["file"], entry["line"] if entry["line"] is not None else entry["row"]

    missed = [e for e in entries if where(e) not in (removed if e["kind"] == "duplicate_row" else quarantined)]
    assert missed == []
    false_positives = quarantined - {where(e) for e in entries}
    precision = 1 - len(false_positives) / max(len(quarantined), 1)
    print(f"{site}: {len(entries)} faults, recall 100%, precision {precision:.3f}")
    assert precision == 1.0, sorted(false_positives)[:5]
    assert batch.quarantine["reason"].str.len_chars().min() > 10


@pytest.mark.parametrize("site", SITES)
def test_rows_in_equal_harmonized_plus_quarantined_plus_duplicates(
    batches: dict[str, MeasurementBatch], site: str
) -> None:
    """For every source file: rows read = rows harmonized + rows quarantined + exact duplicates removed."""
    for ledger in batches[site].ledgers:
        assert ledger.rows_in > 0 and ledger.balanced, ledger


def test_mmol_site_glucose_matches_the_sensor_truth(data_dir: Path, batches: dict[str, MeasurementBatch]) -> None:
    """Harmonized CGM from the mmol/L site equals the sensor's mg/dL within export rounding, at the true UTC time."""
    truth = pl.read_parquet(SitePaths.under(data_dir, "northbridge").truth / "cgm.parquet")
    cgm = batches["northbridge"].measurement.filter(pl.col("measurement_source_value") == "cgm_glucose")
    joined = cgm.with_columns(pl.col("source_record").str.split("#").list.last().alias("record_id")).join(
        truth, on="record_id"
    )
    assert joined.height == cgm.height > 1000
    assert (joined["value_as_number"] - joined["value_mg_dl"]).abs().max() <= 0.05 * 18.016 + 1e-9
    assert (joined["measurement_datetime"] == joined["time"]).all()


@pytest.mark.parametrize("site", SITES)
def test_no_identifier_reaches_the_harmonized_tables(
    data_dir: Path, batches: dict[str, MeasurementBatch], site: str
) -> None:
    """No MRN, name, birth date or phone of the drop's patients appears in the person or measurement table."""
    truth = pl.read_parquet(SitePaths.under(data_dir, site).truth / "patients.parquet")
    batch = batches[site]
    text = batch.person.write_csv() + batch.measurement.write_csv()
    for mrn in truth["mrn"]:
        assert mrn not in text
    assert batch.person["person_source_value"].str.starts_with("p").all()
    assert batch.person.height == truth.height


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    operations=st.lists(
        st.tuples(st.sampled_from(["duplicate", "truncate", "blank_field", "garbage"]), st.integers(1, 400)),
        min_size=1, max_size=25,
    )
)  # fmt: skip
def test_conservation_holds_for_any_damage(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, operations: list
) -> None:
    """Whatever lines are duplicated, cut, emptied or replaced, every CSV row is harmonized, quarantined or dropped."""
    source = SitePaths.under(data_dir, "northbridge").drop
    drop = tmp_path_factory.mktemp("damaged") / "northbridge"
    shutil.copytree(source, drop, ignore=shutil.ignore_patterns("imaging"))
    path = drop / "ehr" / "cgm_readings.csv"
    header, *lines = path.read_text().splitlines()
    for operation, position in operations:
        index = position % len(lines)
        if operation == "duplicate":
            lines.insert(index, lines[index])
        elif operation == "truncate":
            lines[index] = lines[index][: len(lines[index]) // 2]
        elif operation == "blank_field":
            lines[index] = ",".join("" if i == 3 else f for i, f in enumerate(lines[index].split(",")))
        else:
            lines[index] = '"oops,,,'
    path.write_text("\n".join([header, *lines]) + "\n")
    batch = ingest_measurements(drop, mapping_for("northbridge"), secret=SECRET, workdir=drop.parent / "work",
                                build_docs=False)  # fmt: skip
    ledger = next(entry for entry in batch.ledgers if entry.file == "ehr/cgm_readings.csv")
    assert ledger.rows_in == len(lines) and ledger.balanced
