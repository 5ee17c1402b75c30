"""Site mappings, readers and transforms: every line read, broken lines found, values and times right."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.ingest.mapping import MappingError, MeasurementSource, load_mapping, mapping_for
from flows.ingest.readers import PARSE_ERROR, POSITION, read_source
from flows.ingest.transform import measurement_candidates

SITES = ("aurelia", "northbridge", "lakeside")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small demo drops."""
    folder = tmp_path_factory.mktemp("ingest")
    generate_sites([p.with_overrides(patients=4, days=2) for p in load_profiles()], folder, workers=2)
    return folder


def fields_of(source: MeasurementSource) -> dict[str, str]:
    fields = {k: getattr(source, k) for k in ("record_key", "patient", "time", "value", "unit")}
    if source.code is not None:
        fields["code"] = source.code
    return fields


def read_cgm(data_dir: Path, site: str) -> tuple[pl.DataFrame, int]:
    mapping = mapping_for(site)
    source = mapping.measurements["cgm"]
    read = read_source(SitePaths.under(data_dir, site).drop, source.file, fields_of(source), mapping.site.format)
    assert read.file_error is None
    return measurement_candidates(read.frame, source, mapping.site, mapping.units), read.rows_in


def test_default_mappings_load() -> None:
    """The three demo sites' mapping files load and name their own site."""
    for site in SITES:
        assert mapping_for(site).site.id == site


def test_a_wrong_mapping_names_file_and_fields(tmp_path: Path) -> None:
    """A mapping with an unknown unit target, concept and time zone fails naming the file and each field."""
    text = (Path(__file__).resolve().parents[2] / "infra/mappings/northbridge.toml").read_text()
    broken = text.replace('"lb" = "[lb_av]"', '"lb" = "stone"').replace('concept = "cgm_glucose"', 'concept = "cgm"')
    broken = broken.replace("Europe/London", "Europe/Londn")
    path = tmp_path / "northbridge.toml"
    path.write_text(broken)
    with pytest.raises(MappingError) as error:
        load_mapping(path)
    message = str(error.value)
    assert str(path) in message and "units" in message and "stone" in message
    assert "measurements.cgm" in message and "Europe/Londn" in message


def test_a_column_the_file_lacks_is_a_file_error(data_dir: Path) -> None:
    """A mapping naming a column the CSV header lacks makes the whole file unreadable, with the column named."""
    drop = SitePaths.under(data_dir, "northbridge").drop
    read = read_source(drop, "ehr/cgm_readings.csv", {"value": "GlucoseMgDl"}, "csv")
    assert read.file_error is not None and "GlucoseMgDl" in read.file_error and read.rows_in == 0


def test_a_file_without_its_header_is_unreadable_and_its_first_row_is_not_echoed(
    data_dir: Path, tmp_path: Path
) -> None:
    """A patient list exported without its header: the error names the missing columns, not the patient in line 1."""
    source = SitePaths.under(data_dir, "northbridge").drop / "ehr" / "patients.csv"
    lines = source.read_text().splitlines()
    (tmp_path / "ehr").mkdir()
    (tmp_path / "ehr" / "patients.csv").write_text("\n".join(lines[1:]) + "\n")
    first_patient = lines[1].split(",")
    read = read_source(tmp_path, "ehr/patients.csv", {"patient": "HospitalNumber"}, "csv")
    assert read.file_error is not None and "HospitalNumber" in read.file_error
    assert not [value for value in first_patient if value and value in read.file_error]


@pytest.mark.parametrize("site", SITES)
def test_every_line_is_read_and_broken_lines_are_exactly_the_manifests(data_dir: Path, site: str) -> None:
    """Rows read equal the file's data lines, and parse errors sit exactly on the manifest's broken lines."""
    frame, rows_in = read_cgm(data_dir, site)
    file = mapping_for(site).measurements["cgm"].file
    path = SitePaths.under(data_dir, site).drop / file
    expected = pl.read_parquet(path).height if file.endswith(".parquet") else len(path.read_text().splitlines())
    assert rows_in == frame.height == expected - file.endswith(".csv")
    broken = {
        e["line"] for e in SitePaths.under(data_dir, site).faults() if e["file"] == file and e["kind"].endswith("_line")
    }
    assert set(frame.filter(pl.col(PARSE_ERROR).is_not_null())[POSITION].to_list()) == broken


@pytest.mark.parametrize("site", SITES)
def test_clean_cgm_values_and_times_match_the_sensor_truth(data_dir: Path, site: str) -> None:
    """Unfaulted readings convert to the sensor's true mg/dL (within the site's rounding) at the true UTC time."""
    frame, _ = read_cgm(data_dir, site)
    file = mapping_for(site).measurements["cgm"].file
    faulted = {e["record_key"] for e in SitePaths.under(data_dir, site).faults() if e["file"] == file}
    truth = pl.read_parquet(SitePaths.under(data_dir, site).truth / "cgm.parquet").rename({"time": "true_time"})
    clean = frame.filter(~pl.col("record_key").is_in(list(faulted)))
    joined = clean.join(truth, left_on="record_key", right_on="record_id", how="inner")
    assert joined.height == clean.height > 500
    rounding = 0.05 * 18.016 if site == "northbridge" else 0.5
    assert (joined["value_canonical"] - joined["value_mg_dl"]).abs().max() <= rounding + 1e-9
    assert (joined["time_utc"] == joined["true_time"]).all()
