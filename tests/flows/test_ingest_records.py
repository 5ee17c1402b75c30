"""Record and device ingestion: every injected fault caught, nothing clean quarantined, every row accounted for."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phi_fixtures import identifiers, leaks

from data_contracts import vocabulary as v
from flows.demo_sites.faults import fault_position
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.ingest.mapping import MappingError, load_mapping, mapping_for
from flows.ingest.records import RecordBatch, ingest_records

SITES = ("aurelia", "northbridge", "lakeside")
SECRET = bytes(range(32))
DST_START_UK = datetime(2026, 3, 29, 1, tzinfo=UTC)  # clocks go forward at 01:00 UTC


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small demo drops; Northbridge's runs across the UK's spring DST change."""
    folder = tmp_path_factory.mktemp("records")
    profiles = [p.with_overrides(patients=4, days=8 if p.site.id == "northbridge" else 2) for p in load_profiles()]
    generate_sites(profiles, folder, workers=2)
    return folder


@pytest.fixture(scope="module")
def batches(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RecordBatch]:
    """Each site's records ingested once."""
    work = tmp_path_factory.mktemp("work")
    return {
        site: ingest_records(
            SitePaths.under(data_dir, site).drop,
            mapping_for(site),
            secret=SECRET,
            workdir=work / site,
            build_docs=False,
        )  # fmt: skip
        for site in SITES
    }


@pytest.mark.parametrize("site", SITES)
def test_every_manifest_fault_is_caught_and_no_clean_row_is_quarantined(
    data_dir: Path, batches: dict[str, RecordBatch], site: str
) -> None:
    """Recall 100% on every record file's faults (duplicates removed, the rest quarantined); precision 100%."""
    entries = [e for e in SitePaths.under(data_dir, site).faults() if e["file"].startswith("ehr/")]
    assert {e["kind"] for e in entries} >= {"duplicate_row", "impossible_value", "phi_in_free_text", "clock_shift"}
    batch = batches[site]
    quarantined = set(zip(batch.quarantine["source_file"], batch.quarantine["source_position"], strict=True))
    removed = set(zip(batch.duplicates["source_file"], batch.duplicates["source_position"], strict=True))

    def where(entry: dict) -> tuple[str, int | None]:
        return entry["file"], fault_position(entry)

    missed = [e for e in entries if where(e) not in (removed if e["kind"] == "duplicate_row" else quarantined)]
    assert missed == []
    false_positives = quarantined - {where(e) for e in entries}
    precision = 1 - len(false_positives) / max(len(quarantined), 1)
    print(f"{site}: {len(entries)} faults, recall 100%, precision {precision:.3f}")
    assert precision == 1.0, sorted(false_positives)[:5]
    assert batch.quarantine["reason"].str.len_chars().min() > 10


@pytest.mark.parametrize("site", SITES)
def test_every_file_is_read_or_withheld_and_every_row_accounted_for(
    data_dir: Path, batches: dict[str, RecordBatch], site: str
) -> None:
    """Each drop file is read or withheld with a reason; per file rows in = harmonized + quarantined + duplicates."""
    batch = batches[site]
    ehr = SitePaths.under(data_dir, site).drop / "ehr"
    data_files = {f"ehr/{p.name}" for p in ehr.iterdir() if p.suffix in (".ndjson", ".csv", ".parquet")}
    assert {ledger.file for ledger in batch.ledgers} | set(batch.withheld) == data_files
    for ledger in batch.ledgers:
        assert ledger.rows_in > 0 and ledger.balanced, ledger
    harmonized = sum(ledger.harmonized for ledger in batch.ledgers)
    produced = sum(batch.tables[t].height for t in ("person", "measurement", "condition_occurrence", "device_exposure"))
    bolus_carbs = batch.tables["observation"].filter(pl.col("observation_concept_id") == v.BOLUS_CARB_INPUT).height
    produced += batch.tables["drug_exposure"].height + batch.tables["observation"].height - bolus_carbs
    assert produced == harmonized


def test_mmol_site_glucose_matches_the_sensor_truth_across_the_dst_change(
    data_dir: Path, batches: dict[str, RecordBatch]
) -> None:
    """CGM from the mmol/L, local-time site equals the sensor's mg/dL at the true UTC instant, before and after DST."""
    truth = pl.read_parquet(SitePaths.under(data_dir, "northbridge").truth / "cgm.parquet")
    cgm = batches["northbridge"].tables["measurement"].filter(pl.col("measurement_source_value") == "cgm_glucose")
    joined = cgm.with_columns(pl.col("source_record").str.split("#").list.last().alias("record_id")).join(
        truth, on="record_id"
    )
    assert joined.height == cgm.height > 1000
    assert (joined["value_as_number"] - joined["value_mg_dl"]).abs().max() <= 0.05 * 18.016 + 1e-9
    assert (joined["measurement_datetime"] == joined["time"]).all()
    after = joined.filter(pl.col("time") >= DST_START_UK)
    assert after.height > 500 and (after["measurement_datetime"] == after["time"]).all()


def test_carbohydrate_and_insulin_land_at_the_true_time(data_dir: Path, batches: dict[str, RecordBatch]) -> None:
    """Logged carbs sit at the simulator's meal times (UTC, after the DST change too); boluses carry their carbs."""
    truth = pl.read_parquet(SitePaths.under(data_dir, "northbridge").truth / "meals.parquet")
    tables = batches["northbridge"].tables
    logged = tables["observation"].filter(pl.col("observation_concept_id") == v.CARBOHYDRATE_INTAKE)
    on_time = logged.join(truth, left_on="observation_datetime", right_on="time", how="semi")
    assert logged.height > 50 and on_time.height == logged.height
    assert logged.filter(pl.col("observation_datetime") >= DST_START_UK).height > 10
    drugs = tables["drug_exposure"]
    basal = drugs.filter(pl.col("drug_source_value") == "basal")
    hours = (basal["drug_exposure_end_datetime"] - basal["drug_exposure_start_datetime"]).dt.total_minutes() / 60
    assert (hours > 0).all() and basal["quantity"].sum() > 0
    wizard = tables["observation"].filter(pl.col("observation_concept_id") == v.BOLUS_CARB_INPUT)
    assert wizard.height > 0 and set(wizard["source_record"]) <= set(drugs["source_record"])


@pytest.mark.parametrize("site", SITES)
def test_no_identifier_or_free_text_reaches_the_harmonized_tables(
    data_dir: Path, batches: dict[str, RecordBatch], site: str
) -> None:
    """No name, MRN, birth date, address, phone, device serial or note text of the drop is in any harmonized table."""
    batch = batches[site]
    texts = {name: frame.write_csv() for name, frame in batch.tables.items()}
    assert leaks(identifiers(data_dir, site), texts) == []
    truth = pl.read_parquet(SitePaths.under(data_dir, site).truth / "patients.parquet")
    assert batch.tables["person"]["person_source_value"].str.starts_with("p").all()
    assert batch.tables["person"].height == truth.height
    assert batch.tables["device_exposure"]["unique_device_id"].str.starts_with("d").all()


def test_a_file_the_mapping_does_not_know_is_quarantined_whole(data_dir: Path, tmp_path: Path) -> None:
    """A new export file nobody mapped is not silently ignored: it is quarantined whole, naming the mapping."""
    drop = tmp_path / "northbridge"
    shutil.copytree(SitePaths.under(data_dir, "northbridge").drop, drop, ignore=shutil.ignore_patterns("imaging"))
    (drop / "ehr" / "ketones.csv").write_text("KetoneID,MRN,Value\nK1,NGH0000001,0.4\n")
    batch = ingest_records(drop, mapping_for("northbridge"), secret=SECRET, workdir=tmp_path / "work",
                           build_docs=False)  # fmt: skip
    entry = batch.quarantine.filter(pl.col("source_file") == "ehr/ketones.csv")
    assert entry.height == 1 and entry["source_position"].is_null().all()
    assert "mapping" in entry["reason"][0]
    ledger = next(entry for entry in batch.ledgers if entry.file == "ehr/ketones.csv")
    assert ledger.file_error is not None and ledger.balanced


def test_a_wrong_mapping_names_the_field(tmp_path: Path) -> None:
    """A basal source without a rate, or a device kind twinfed does not know, fails naming the source."""
    text = (Path("infra/mappings/northbridge.toml")).read_text()
    broken = tmp_path / "northbridge.toml"
    broken.write_text(text.replace('rate = "Rate_U_per_h"\n', ""))
    with pytest.raises(MappingError, match=r"drugs\.basal"):
        load_mapping(broken)
    broken.write_text(text.replace('pump = "insulin_pump"', 'pump = "pacemaker"'))
    with pytest.raises(MappingError, match="pacemaker"):
        load_mapping(broken)


@pytest.mark.slow  # ~50 s: five full ingests; CI runs it (make test-slow)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from(["cgm_readings.csv", "pump_bolus.csv", "carb_entries.csv", "pump_basal.csv"]),
    operations=st.lists(
        st.tuples(st.sampled_from(["duplicate", "truncate", "blank_field", "garbage"]), st.integers(1, 400)),
        min_size=1, max_size=25,
    ),
)  # fmt: skip
def test_conservation_holds_for_any_damage(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, file: str, operations: list
) -> None:
    """Whatever lines of a source are damaged, every row of every file is harmonized, quarantined or removed.

    Lines are duplicated, cut, emptied or replaced by garbage at random; the damaged file's rows and every other
    file's rows still balance.
    """
    source = SitePaths.under(data_dir, "northbridge").drop
    drop = tmp_path_factory.mktemp("damaged") / "northbridge"
    shutil.copytree(source, drop, ignore=shutil.ignore_patterns("imaging"))
    path = drop / "ehr" / file
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
    batch = ingest_records(drop, mapping_for("northbridge"), secret=SECRET, workdir=drop.parent / "work",
                           build_docs=False)  # fmt: skip
    ledger = next(entry for entry in batch.ledgers if entry.file == f"ehr/{file}")
    assert ledger.rows_in == len(lines)
    assert all(entry.balanced for entry in batch.ledgers)
