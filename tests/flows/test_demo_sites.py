"""Demo hospitals: drops read with standard tools, the fault manifest matches the drop, truth stays apart."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pydicom
import pytest

from flows.demo_sites.generate import SitePaths, generate_site, generate_sites
from flows.demo_sites.profile import ProfileError, SiteProfile, load_profile, load_profiles
from flows.demo_sites.writers import CSV_FILES, csv_columns

PATIENTS, DAYS = 6, 2
TRUTH_MARKERS = (
    "sim_patient",
    "insulin_sensitivity",
    "bg_mg_dl",
    "base_patient",
    "Vmx",
    "kp3",
    "u2ss",
    "adolescent#",
    "adult#0",
    "child#0",
    "/v00",
    "p_missed_bolus",
    "sensor_seed",
)


@pytest.fixture(scope="module")
def profiles() -> dict[str, SiteProfile]:
    """The three default profiles, shrunk to a few patients and days."""
    return {p.site.id: p.with_overrides(patients=PATIENTS, days=DAYS) for p in load_profiles()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, profiles: dict[str, SiteProfile]) -> Path:
    """Generate all three sites once for the module."""
    folder = tmp_path_factory.mktemp("sites")
    generate_sites(list(profiles.values()), folder, workers=2)
    return folder


def text_lines(drop: Path, name: str) -> list[str]:
    return (drop / name).read_text().split("\n")[:-1]


def test_three_default_sites_differ_in_cohort_and_format(profiles: dict[str, SiteProfile]) -> None:
    """The default federation is non-IID: one site per format, children at one site only."""
    assert {p.export.format for p in profiles.values()} == {"fhir", "csv", "parquet"}
    assert {tuple(sorted(p.cohort.mix)) for p in profiles.values()} == {("child",), ("adolescent", "adult"), ("adult",)}
    assert load_profiles()[0].cohort.patients == 100 and load_profiles()[0].cohort.days == 14


def test_every_configured_fault_kind_is_injected(data_dir: Path, profiles: dict[str, SiteProfile]) -> None:
    """Each fault kind a profile gives a rate appears in that site's manifest at least once."""
    for site, profile in profiles.items():
        kinds = {entry["kind"] for entry in SitePaths.under(data_dir, site).faults()}
        configured = {kind for kind, rate in profile.faults.items() if rate > 0}
        assert configured <= kinds, f"{site}: missing {configured - kinds}"


def test_fhir_resources_validate_against_r4b(data_dir: Path) -> None:
    """Every FHIR line not listed as damaged parses and validates as its R4B resource type."""
    from fhir.resources.R4B import get_fhir_model_class

    drop = SitePaths.under(data_dir, "aurelia").drop / "ehr"
    bulk = json.loads((drop / "manifest.json").read_text())
    assert bulk["transactionTime"] and bulk["error"] == []
    broken = {
        (e["file"], e["line"])
        for e in SitePaths.under(data_dir, "aurelia").faults()
        if e["kind"] in ("truncated_line", "malformed_line")
    }
    validated = 0
    for output in bulk["output"]:
        lines = text_lines(drop, output["url"])
        assert len(lines) == output["count"]
        faulted = {(e["file"], e["line"]) for e in SitePaths.under(data_dir, "aurelia").faults()}
        for number, line in enumerate(lines, start=1):
            if (f"ehr/{output['url']}", number) in broken:
                with pytest.raises(json.JSONDecodeError):
                    json.loads(line)
                continue
            resource = json.loads(line)
            assert resource["resourceType"] == output["type"]
            if (f"ehr/{output['url']}", number) not in faulted:
                assert orjson.dumps(resource).decode() == line  # one canonical serialisation, fast path or not
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
                validated += 1
    assert validated > PATIENTS * DAYS * 200


def test_csv_and_parquet_read_with_polars(data_dir: Path) -> None:
    """CSV extracts (minus listed damaged lines) and Parquet tables read with polars, with their own schemas."""
    csv_drop = SitePaths.under(data_dir, "northbridge").drop / "ehr"
    damaged = {
        (e["file"], e["line"]) for e in SitePaths.under(data_dir, "northbridge").faults() if e["kind"].endswith("_line")
    }
    for table, name in CSV_FILES.items():
        lines = (csv_drop / name).read_text().split("\n")
        kept = [line for number, line in enumerate(lines, start=1) if (f"ehr/{name}", number) not in damaged]
        frame = pl.read_csv(io.StringIO("\n".join(kept)), infer_schema=False)
        assert frame.columns == list(csv_columns(load_profiles()[2], table).values())
        assert frame.height > 0
    parquet_drop = SitePaths.under(data_dir, "lakeside").drop / "ehr"
    cgm = pl.read_parquet(parquet_drop / "measurement_cgm.parquet")
    assert cgm.schema["ts_epoch_ms"] == pl.Int64 and set(cgm["code"]) == {"GLUC-ISF-CGM"}
    labs = pl.read_parquet(parquet_drop / "measurement_lab.parquet")
    assert "4548-4" not in labs["code"].to_list() and "HBA1C-IFCC" in labs["code"].to_list()


def test_dicom_files_open_with_pydicom_except_the_corrupted(data_dir: Path) -> None:
    """Every DICOM file opens with pydicom and decodes, except exactly those the manifest lists as corrupted."""
    for site in ("aurelia", "northbridge", "lakeside"):
        drop = SitePaths.under(data_dir, site).drop
        corrupted = {e["file"] for e in SitePaths.under(data_dir, site).faults() if e["kind"] == "corrupted_dicom"}
        files = sorted(drop.glob("imaging/*/*.dcm"))
        assert len(files) >= PATIENTS
        for path in files:
            relative = str(path.relative_to(drop))
            if relative in corrupted:
                with pytest.raises(Exception):  # noqa: B017 - any read failure is the point
                    pydicom.dcmread(path).pixel_array  # noqa: B018
            else:
                ds = pydicom.dcmread(path)
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
                assert ds.PatientID.startswith(("SAC", "NGH", "LUMC"))


# ---------------------------------------------------------------- the manifest matches the drop


def _value_mg_dl(value: float, unit: str) -> float:
    return value * 18.016 if unit == "mmol/L" else value


def _record(drop: Path, entry: dict, site: str) -> tuple[dict | None, str | None]:
    """The record an entry points at, as a dict of the site's fields, and the raw line (text formats)."""
    if entry["row"] is not None:
        return pl.read_parquet(drop / entry["file"]).row(entry["row"], named=True), None
    lines = text_lines(drop, entry["file"])
    line = lines[entry["line"] - 1]
    if entry["file"].endswith(".ndjson"):
        try:
            return json.loads(line), line
        except json.JSONDecodeError:
            return None, line
    header = next(csv.reader([lines[0]]))
    fields = next(csv.reader([line]))
    return (dict(zip(header, fields, strict=True)) if len(fields) == len(header) else None), line


def _time_text(record: dict, site: str) -> str | int | None:
    if site == "aurelia":
        return record.get("effectiveDateTime") or record.get("effectivePeriod", {}).get("start")
    if site == "lakeside":
        return record["ts_epoch_ms"]
    return next(v for k, v in record.items() if k.endswith("DateTime"))


def _parse_time(text: str | int | None, site: str) -> datetime | None:
    if text in (None, ""):
        return None
    if site == "lakeside":
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)  # type: ignore[arg-type]
    fmt = "%Y-%m-%dT%H:%M:%S%z" if site == "aurelia" else "%d/%m/%Y %H:%M:%S"
    return datetime.strptime(str(text), fmt)


def _glucose(record: dict, site: str) -> tuple[float, str]:
    if site == "aurelia":
        return float(record["valueQuantity"]["value"]), record["valueQuantity"]["unit"]
    if site == "lakeside":
        return float(record["value"]), record["unit"]
    return float(record["GlucoseValue"]), record["GlucoseUnits"]


@pytest.mark.parametrize("site", ["aurelia", "northbridge", "lakeside"])
def test_each_manifest_fault_is_where_it_says(data_dir: Path, site: str) -> None:
    """Every manifest entry points at a record that shows exactly that fault."""
    drop = SitePaths.under(data_dir, site).drop
    patients_phi = _phi_by_mrn(drop, site)
    entries = SitePaths.under(data_dir, site).faults()
    assert entries
    for entry in entries:
        kind = entry["kind"]
        if kind == "corrupted_dicom":
            assert (drop / entry["file"]).exists()
            continue
        record, line = _record(drop, entry, site)
        where = f"{entry['file']}:{entry['line'] or entry['row']} ({kind})"
        if kind in ("truncated_line", "malformed_line"):
            assert record is None, where
        elif kind == "duplicate_row":
            previous = {**entry, "line": entry["line"] - 1} if entry["line"] else {**entry, "row": entry["row"] - 1}
            assert _record(drop, previous, site) == (record, line), where
        elif kind == "missing_timestamp":
            assert _time_text(record, site) in (None, ""), where
        elif kind == "garbled_timestamp":
            text = _time_text(record, site)
            if site == "lakeside":
                assert int(text) < 10**11, where  # seconds where milliseconds belong
            else:
                with pytest.raises(ValueError):
                    _parse_time(text, site)
        elif kind == "clock_shift":
            # The sensor clock fell back to its factory date, 2000-01-01, years before the drop's window.
            assert _parse_time(_time_text(record, site), site).year in (1999, 2000), where
        elif kind == "impossible_value" and entry["file"].endswith(("cgm.ndjson", "cgm_readings.csv", "cgm.parquet")):
            value, unit = _glucose(record, site)
            assert not 20 <= _value_mg_dl(value, unit) <= 1000, where
        elif kind == "impossible_value":
            value = float(
                record.get("valueQuantity", {}).get("value")
                if site == "aurelia"
                else record.get("value", record.get("Value"))
            )
            assert value < 1 or value > 600, where
        elif kind == "unit_mixup":
            value, unit = _glucose(record, site)
            assert unit == "mg/dL" and value < 35, where
        elif kind == "phi_in_free_text":
            text = json.dumps(record)
            mrn = _mrn_of(record, site)
            assert any(phi in text for phi in patients_phi[mrn]), where
        else:
            pytest.fail(f"unexpected kind {kind}")


def test_clean_cgm_records_are_clean(data_dir: Path, profiles: dict[str, SiteProfile]) -> None:
    """Every CGM record the manifest does not list parses, is plausible, in the site's unit and inside the window."""
    files = {
        "aurelia": "ehr/Observation.cgm.ndjson",
        "northbridge": "ehr/cgm_readings.csv",
        "lakeside": "ehr/measurement_cgm.parquet",
    }
    for site, name in files.items():
        drop = SitePaths.under(data_dir, site).drop
        listed = {(e["line"], e["row"]) for e in SitePaths.under(data_dir, site).faults() if e["file"] == name}
        count = (
            pl.read_parquet(drop / name).height
            if name.endswith("parquet")
            else len(text_lines(drop, name)) - name.endswith(".csv")
        )
        window_start = datetime.combine(profiles[site].cohort.start, datetime.min.time())
        checked = 0
        for index in range(count):
            position = (None, index) if name.endswith("parquet") else (index + 1 + name.endswith(".csv"), None)
            if position in listed:
                continue
            record, _ = _record(drop, {"file": name, "line": position[0], "row": position[1]}, site)
            assert record is not None, (site, position)
            value, unit = _glucose(record, site)
            assert unit == profiles[site].export.glucose_unit
            assert 39 <= round(_value_mg_dl(value, unit)) <= 600
            stamp = _parse_time(_time_text(record, site), site)
            assert abs((stamp.replace(tzinfo=None) - window_start).days) <= DAYS + 1
            checked += 1
        assert checked > PATIENTS * DAYS * 200


def _phi_by_mrn(drop: Path, site: str) -> dict[str, list[str]]:
    if site == "aurelia":
        rows = [json.loads(line) for line in text_lines(drop, "ehr/Patient.ndjson")]
        return {
            f"Patient/{r['id']}": [
                r["identifier"][0]["value"],
                r["name"][0]["family"],
                r["telecom"][0]["value"],
                r["address"][0]["line"][0],
            ]
            for r in rows
        }
    table = (
        pl.read_parquet(drop / "ehr/patient.parquet")
        if site == "lakeside"
        else pl.read_csv(drop / "ehr/patients.csv", infer_schema=False)
    )
    table = (
        table.rename({v: k for k, v in csv_columns(load_profiles()[2], "patients").items()})
        if site == "northbridge"
        else table
    )
    return {r["mrn"]: [r["mrn"], r["family"], r["phone"], r["address"]] for r in table.iter_rows(named=True)}


def _mrn_of(record: dict, site: str) -> str:
    if site == "aurelia":
        return next(iter(record.get("patient", record.get("subject", {})).values()))
    return record.get("mrn") or record.get("HospitalNumber") or record["MRN"]


# ---------------------------------------------------------------- truth apart, determinism, profiles


def test_no_ground_truth_field_inside_a_drop(data_dir: Path) -> None:
    """No simulator name, parameter or true-glucose column appears in any file of any drop."""
    for site in ("aurelia", "northbridge", "lakeside"):
        drop = SitePaths.under(data_dir, site).drop
        for path in drop.rglob("*"):
            if not path.is_file():
                continue
            if path.suffix == ".parquet":
                content = " ".join(pl.read_parquet(path).columns) + " " + pl.read_parquet(path).write_csv()
            elif path.suffix == ".dcm":
                content = path.read_bytes().decode("latin-1")
            else:
                content = path.read_text()
            for marker in TRUTH_MARKERS:
                assert marker not in content, f"{marker!r} found in {path}"
        assert not (drop / "fault_manifest.jsonl").exists()


def test_same_seed_same_drop_bit_for_bit(tmp_path: Path, profiles: dict[str, SiteProfile]) -> None:
    """Generating a site twice gives byte-identical drops; another seed gives another drop."""
    profile = profiles["northbridge"].with_overrides(patients=3, days=1)

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    generate_site(profile, tmp_path / "a")
    generate_site(profile, tmp_path / "b")
    first, second = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert first == second and len(first) > 10
    reseeded = profile.model_copy(update={"site": profile.site.model_copy(update={"seed": 999})})
    generate_site(reseeded, tmp_path / "c")
    assert digest(tmp_path / "c") != first


def test_csv_local_times_are_dst_correct(data_dir: Path) -> None:
    """Europe/London wall-clock CGM times map back to a regular UTC grid across the 29 March DST change."""
    drop = SitePaths.under(data_dir, "northbridge").drop
    listed = {
        e["line"] for e in SitePaths.under(data_dir, "northbridge").faults() if e["file"] == "ehr/cgm_readings.csv"
    }
    lines = text_lines(drop, "ehr/cgm_readings.csv")
    kept = [line for number, line in enumerate(lines, start=1) if number not in listed]
    frame = pl.read_csv(io.StringIO("\n".join(kept)), infer_schema=False)
    utc = frame.select(
        pl.col("ReadingDateTime")
        .str.strptime(pl.Datetime("ms"), "%d/%m/%Y %H:%M:%S")
        .dt.replace_time_zone("Europe/London")
        .dt.convert_time_zone("UTC")
    ).to_series()
    start = utc.min()
    assert all(((t - start).total_seconds() / 60) % 3 == 0 for t in utc.to_list())


def test_a_profile_with_a_bad_field_names_file_and_field(tmp_path: Path) -> None:
    """A profile with an unknown sensor and an unknown fault kind fails naming the file and both fields."""
    text = (Path(__file__).resolve().parents[2] / "infra/sites/lakeside-adult.toml").read_text()
    bad = tmp_path / "broken.toml"
    bad.write_text(text.replace('sensor = "Dexcom"', 'sensor = "Libre3"').replace("clock_shift", "clock_drift"))
    with pytest.raises(ProfileError) as error:
        load_profile(bad)
    message = str(error.value)
    assert "broken.toml" in message and "cohort.sensor" in message and "clock_drift" in message


def test_truth_links_every_mrn_to_a_simulated_patient(data_dir: Path) -> None:
    """Ground truth maps each drop MRN to its simulator patient and holds minute-level true glucose."""
    paths = SitePaths.under(data_dir, "lakeside")
    truth = pl.read_parquet(paths.truth / "patients.parquet")
    drop_patients = pl.read_parquet(paths.drop / "ehr/patient.parquet")
    assert set(truth["mrn"]) == set(drop_patients["mrn"])
    glucose = pl.read_parquet(paths.truth / "glucose.parquet")
    assert glucose.height == PATIENTS * (DAYS * 1440 + 1)
    states = np.load(paths.truth / "states_hourly.npz")
    assert states["x"].shape == (DAYS * 24 + 1, 13, PATIENTS)


def test_diagnosis_dates_lie_between_birth_and_the_device_data() -> None:
    """A young child's diagnosis is never drawn after the drop's data begin (it would be a false fault)."""
    from types import SimpleNamespace

    from flows.demo_sites.records import _conditions

    first_day = date(2026, 3, 23)
    births = [first_day - timedelta(days=days) for days in (400, 700, 2000, 9000)]
    people = [SimpleNamespace(birth_date=b, mrn=f"M{i}") for i, b in enumerate(births)]
    for seed in range(20):
        onset = _conditions(people, first_day, np.random.default_rng(seed))["onset_date"].to_list()  # type: ignore[arg-type]
        assert all(b <= o <= first_day - timedelta(days=30) for b, o in zip(births, onset, strict=True))
