"""Imaging ingestion: every DICOM file de-identified or quarantined, no PHI in the store, features match the truth."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from imaging_fixtures import leaked, make_profile, make_subject
from pydicom.dataset import Dataset

from data_contracts.schema import IMAGE_FEATURE, IMAGE_OCCURRENCE
from data_contracts.vocabulary import IMAGE_FEATURES
from flows.demo_sites.generate import SitePaths, generate_site
from flows.demo_sites.imaging import write_ct_series
from flows.demo_sites.profile import SiteProfile, load_profiles
from flows.ingest.dicom_deid import DateOption, DeidOptions, date_offset_days, keyed_uid, phi_values
from flows.ingest.imaging import ALG_SYSTEM, ImagingBatch, ingest_imaging
from flows.ingest.ledger import QUARANTINE_SCHEMA
from flows.ingest.pseudonym import PERSON_PREFIX, pseudonym, pseudonym_id

SECRET = bytes(range(32))
PATIENTS = 8
SHIFT = DeidOptions(date_option="shift")
MEASURED_AT = datetime.datetime(2026, 4, 1, 3, 0, tzinfo=datetime.UTC)
# Enough corrupted files that every corruption mode turns up, several empty files among them.
CORRUPTED_DICOM_RATE = 0.2
TRUTH = {
    "visceral_fat_area_cm2": "visceral_fat_cm2",
    "subcutaneous_fat_area_cm2": "subcutaneous_fat_cm2",
    "skeletal_muscle_area_cm2": "muscle_cm2",
}
Patients = dict[str, tuple[int, str]]


@dataclasses.dataclass(frozen=True)
class IngestedSite:
    """A generated demo site and the batch its imaging gave."""

    site_id: str
    paths: SitePaths
    patients: Patients
    store: Path
    batch: ImagingBatch


def patient_map(mrns: list[str]) -> Patients:
    """MRN -> (person_id, pseudonym), as the site flow derives them from its secret."""
    return {
        mrn: (pseudonym_id(pseudonym(SECRET, PERSON_PREFIX, mrn)), pseudonym(SECRET, PERSON_PREFIX, mrn))
        for mrn in mrns
    }


def ingest(drop: Path, store: Path, patients: Patients, site_id: str = "demo", **changes: object) -> ImagingBatch:
    """ingest_imaging with the test's secret, date-shift option and run time unless `changes` say otherwise."""
    arguments: dict[str, object] = {
        "site_id": site_id, "secret": SECRET, "store": store, "patients": patients,
        "options": SHIFT, "measured_at": MEASURED_AT, **changes,
    }  # fmt: skip
    return ingest_imaging(drop, **arguments)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["aurelia", "northbridge", "lakeside"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> IngestedSite:
    """A small demo site with a high corrupted-DICOM rate, generated and its imaging ingested once."""
    profile: SiteProfile = next(p for p in load_profiles() if p.site.id == request.param)
    profile = profile.with_overrides(patients=PATIENTS, days=1)
    profile = profile.model_copy(update={"faults": {**profile.faults, "corrupted_dicom": CORRUPTED_DICOM_RATE}})
    root = tmp_path_factory.mktemp(request.param)
    generate_site(profile, root / "data")
    paths = SitePaths.under(root / "data", profile.site.id)
    patients = patient_map(pl.read_parquet(paths.truth / "patients.parquet")["mrn"].to_list())
    store = root / "store"
    return IngestedSite(profile.site.id, paths, patients, store, ingest(paths.drop, store, patients, profile.site.id))


def corrupted(site: IngestedSite) -> set[str]:
    """The files the fault manifest lists as corrupted DICOM."""
    return {entry["file"] for entry in site.paths.faults() if entry["kind"] == "corrupted_dicom"}


def relative(site: IngestedSite, path: Path) -> str:
    """A drop file's path as the manifest and the quarantine give it."""
    return path.relative_to(site.paths.drop).as_posix()


def drop_files(drop: Path) -> list[Path]:
    """The DICOM files of a drop, as the ingest walks them."""
    return sorted(drop.glob("imaging/*/*.dcm"))


def store_files(store: Path) -> dict[str, str]:
    """Every entry under the store, relative path -> SHA-256 of a file's bytes ("" for a folder)."""
    return {
        p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(store.rglob("*"))
    }


def kept_times(ds: Dataset) -> set[str]:
    """Times of day (TM), which the Modified Dates option keeps by design."""
    return {str(elem.value).strip() for elem in ds.iterall() if elem.VR == "TM" and elem.value}


def test_exactly_the_corrupted_files_are_quarantined(site: IngestedSite) -> None:
    """Every corrupted_dicom file of the manifest is quarantined, with its position and a reason naming it; no other."""
    quarantine = site.batch.quarantine
    assert quarantine.schema == pl.Schema(QUARANTINE_SCHEMA)
    assert len(corrupted(site)) >= 3
    assert set(quarantine["source_file"]) == corrupted(site)
    for row in quarantine.iter_rows(named=True):
        assert row["failed_checks"] == "dicom.deidentifiable"
        assert row["reason"].startswith(f"{row['source_file']}: ") and str(site.paths.drop) not in row["reason"]
        assert row["record_key"] == f"IM{row['source_position']:06d}.dcm" == Path(row["source_file"]).name


def test_ledgers_balance_and_account_for_every_file(site: IngestedSite) -> None:
    """One balanced ledger per folder; harmonized plus quarantined is every .dcm file of the drop."""
    ledgers, files = site.batch.ledgers, drop_files(site.paths.drop)
    assert [ledger.file for ledger in ledgers] == sorted({f"imaging/{p.parent.name}" for p in files})
    assert all(ledger.balanced and ledger.file_error is None for ledger in ledgers)
    assert sum(ledger.harmonized for ledger in ledgers) + sum(ledger.quarantined for ledger in ledgers) == len(files)
    assert sum(ledger.quarantined for ledger in ledgers) == len(corrupted(site))
    # Two of the sites have several emptied files, byte-identical: copies of nothing harmonized are no duplicates.
    assert sum(ledger.exact_duplicates for ledger in ledgers) == 0


def test_store_holds_each_series_under_its_keyed_uids(site: IngestedSite) -> None:
    """One occurrence per series, its local_path holding its files named by SOP Instance UID, nothing else stored."""
    occurrences = site.batch.image_occurrence
    assert occurrences.schema == IMAGE_OCCURRENCE.polars_schema
    assert occurrences["image_occurrence_id"].is_unique().all() and (occurrences["image_occurrence_id"] > 0).all()
    folders = {p.parent for p in drop_files(site.paths.drop)}
    readable = {p.parent for p in drop_files(site.paths.drop) if relative(site, p) not in corrupted(site)}
    assert occurrences.height == len(readable) >= len(folders) - 2
    stored = set()
    for row in occurrences.iter_rows(named=True):
        assert row["local_path"] == f"imaging/{row['image_study_uid']}/{row['image_series_uid']}"
        assert row["modality_source_value"] == "CT"
        for path in (site.store / row["local_path"]).iterdir():
            ds = pydicom.dcmread(path)
            assert path.name == f"{ds.SOPInstanceUID}.dcm"
            assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (row["image_study_uid"], row["image_series_uid"])
            stored.add(path.relative_to(site.store).as_posix())
    files = {path for path, digest in store_files(site.store).items() if digest}
    assert files == stored
    assert len(stored) == sum(ledger.harmonized for ledger in site.batch.ledgers)


def test_store_and_frames_carry_no_phi(site: IngestedSite) -> None:
    """No identifying value of a source file is in its de-identified copy, and no MRN in the store or the frames."""
    stored = {path.stem: path for path in site.store.rglob("*.dcm")}
    mrns = set(site.patients)
    for source in drop_files(site.paths.drop):
        if relative(site, source) in corrupted(site):
            continue
        original = pydicom.dcmread(source)
        output = stored[keyed_uid(original.SOPInstanceUID, secret=SECRET)]
        phi = (phi_values(original) - kept_times(original)) | mrns | {source.parent.name}
        assert {str(original.PatientID), str(original.PatientName), str(original.AccessionNumber)} <= phi
        assert leaked(phi, output.read_bytes()) == set(), source
    frames = (site.batch.image_occurrence, site.batch.image_feature, site.batch.quarantine)
    text = "\n".join(frame.cast(pl.String).write_csv() for frame in frames)
    assert leaked(mrns, text.encode()) == set()


def test_features_match_the_ground_truth(site: IngestedSite) -> None:
    """Each series' areas are within 10% of the patient's true body composition and muscle HU within 3 HU."""
    features = site.batch.image_feature
    assert features.schema == IMAGE_FEATURE.polars_schema
    assert features["image_feature_id"].is_unique().all()
    assert set(features["image_feature_source_value"]) == set(IMAGE_FEATURES)
    assert (features["alg_system"] == ALG_SYSTEM).all() and (features["alg_datetime"] == MEASURED_AT).all()
    for name, (concept, _) in IMAGE_FEATURES.items():
        assert (
            features.filter(pl.col("image_feature_source_value") == name)["image_feature_concept_id"] == concept
        ).all()
    mrn_of = {person_id: mrn for mrn, (person_id, _) in site.patients.items()}
    measured = features.pivot("image_feature_source_value", index="person_id", values="value_as_number")
    truth = pl.read_parquet(site.paths.truth / "patients.parquet")
    joined = measured.with_columns(mrn=pl.col("person_id").replace_strict(mrn_of)).join(truth, on="mrn")
    assert joined.height == site.batch.image_occurrence.height >= PATIENTS - 2
    for row in joined.iter_rows(named=True):
        for feature, true in TRUTH.items():
            assert row[feature] == pytest.approx(row[true], rel=0.10), (row["mrn"], feature)
        assert row["muscle_attenuation_hu"] == pytest.approx(row["muscle_hu"], abs=3.0), row["mrn"]


def test_rerun_is_idempotent(site: IngestedSite) -> None:
    """Ingesting the same drop again gives equal frames and ledgers and the same files with the same bytes."""
    before = store_files(site.store)
    again = ingest(site.paths.drop, site.store, site.patients, site.site_id)
    assert again.image_occurrence.equals(site.batch.image_occurrence)
    assert again.image_feature.equals(site.batch.image_feature)
    assert again.quarantine.equals(site.batch.quarantine)
    assert again.ledgers == site.batch.ledgers
    assert store_files(site.store) == before


@pytest.fixture
def small_drop(tmp_path: Path) -> Path:
    """A drop of two patients' three-slice series, written as a PACS would (drop/imaging/<accession>/IM*.dcm)."""
    drop = tmp_path / "drop"
    for index, mrn in enumerate(("NGH0000001", "NGH0000002"), start=1):
        subject = make_subject(mrn=mrn, accession_number=f"NGHA00000{index}")
        write_ct_series(drop / "imaging" / subject.accession_number, subject, make_profile(), seed=index)
    return drop


def test_unknown_patient_is_quarantined_and_not_written(small_drop: Path, tmp_path: Path) -> None:
    """A file whose PatientID is not in the patient list is quarantined, never written, and the reason omits the ID."""
    batch = ingest(small_drop, tmp_path / "store", patient_map(["NGH0000001"]))
    assert batch.quarantine["source_file"].to_list() == [f"imaging/NGHA000002/IM00000{i}.dcm" for i in (1, 2, 3)]
    assert set(batch.quarantine["failed_checks"]) == {"dicom.patient_known"}
    for row in batch.quarantine.iter_rows(named=True):
        assert row["reason"] == f"{row['source_file']}: PatientID is not in the site's patient list"
        assert "NGH0000002" not in row["reason"]
    assert batch.image_occurrence["person_id"].to_list() == [patient_map(["NGH0000001"])["NGH0000001"][0]]
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == 3
    assert [(ledger.harmonized, ledger.quarantined) for ledger in batch.ledgers] == [(3, 0), (0, 3)]


def test_unmeasurable_series_is_quarantined_whole(small_drop: Path, tmp_path: Path) -> None:
    """A series with a slice showing no body is quarantined file by file and leaves nothing in the store."""
    slice_path = small_drop / "imaging" / "NGHA000002" / "IM000002.dcm"
    ds = pydicom.dcmread(slice_path)
    ds.PixelData = np.zeros_like(ds.pixel_array).tobytes()  # stored 0 is -1024 HU: air everywhere
    ds.save_as(slice_path, enforce_file_format=True)
    store = tmp_path / "store"
    batch = ingest(small_drop, store, patient_map(["NGH0000001", "NGH0000002"]))
    assert set(batch.quarantine["failed_checks"]) == {"dicom.series_measurable"}
    assert batch.quarantine["source_file"].to_list() == [f"imaging/NGHA000002/IM00000{i}.dcm" for i in (1, 2, 3)]
    assert all(
        "its series cannot be measured" in reason and "no body" in reason for reason in batch.quarantine["reason"]
    )
    assert all(str(store) not in reason for reason in batch.quarantine["reason"])
    assert batch.image_occurrence.height == 1 and batch.image_feature.height == len(IMAGE_FEATURES)
    assert [path.parent.parent.parent for path in store.rglob("*.dcm")] == [store / "imaging"] * 3
    assert len(list((store / "imaging").iterdir())) == 1  # the quarantined series left no empty folders
    assert [(ledger.harmonized, ledger.quarantined) for ledger in batch.ledgers] == [(3, 0), (0, 3)]


def test_copies_are_counted_and_conflicting_instances_quarantined(small_drop: Path, tmp_path: Path) -> None:
    """A byte-identical copy is an exact duplicate; a different file with the same SOP Instance UID is quarantined."""
    folder = small_drop / "imaging" / "NGHA000001"
    shutil.copyfile(folder / "IM000001.dcm", folder / "IM000004.dcm")
    ds = pydicom.dcmread(folder / "IM000002.dcm")
    ds.InstanceNumber = 99
    ds.save_as(folder / "IM000005.dcm", enforce_file_format=True)
    batch = ingest(small_drop, tmp_path / "store", patient_map(["NGH0000001", "NGH0000002"]))
    first = batch.ledgers[0]
    assert (first.rows_in, first.exact_duplicates, first.quarantined, first.harmonized) == (5, 1, 1, 3)
    assert first.balanced
    assert batch.quarantine.row(0, named=True) == {
        "source_file": "imaging/NGHA000001/IM000005.dcm",
        "source_position": 5,
        "record_key": "IM000005.dcm",
        "failed_checks": "dicom.instance_unique",
        "reason": "imaging/NGHA000001/IM000005.dcm: same SOP Instance UID as imaging/NGHA000001/IM000002.dcm "
        "but different bytes; resend the one that is right",
    }
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == 6


@pytest.mark.parametrize("date_option", ["shift", "remove"])
def test_occurrence_date_is_the_shifted_study_date_or_the_run_date(
    small_drop: Path, tmp_path: Path, date_option: DateOption
) -> None:
    """Shifting moves the study date by the patient's offset; removing dates leaves the run's UTC date."""
    patients = patient_map(["NGH0000001", "NGH0000002"])
    late_evening = datetime.datetime(2026, 4, 1, 22, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-5)))
    batch = ingest(small_drop, tmp_path / "store", patients, options=DeidOptions(date_option), measured_at=late_evening)
    study_day = make_subject().study_datetime.date()
    expected = {
        person_id: study_day + datetime.timedelta(days=date_offset_days(text, secret=SECRET))
        if date_option == "shift"
        else datetime.date(2026, 4, 2)
        for person_id, text in patients.values()
    }
    assert dict(batch.image_occurrence.select("person_id", "image_occurrence_date").iter_rows()) == expected
    assert (batch.image_feature["alg_datetime"] == late_evening.astimezone(datetime.UTC)).all()


def test_drop_without_imaging_gives_an_empty_batch(tmp_path: Path) -> None:
    """No imaging folder: empty tables with their schemas, no quarantine, no ledgers, nothing stored."""
    batch = ingest(tmp_path / "drop", tmp_path / "store", {})
    assert batch.image_occurrence.schema == IMAGE_OCCURRENCE.polars_schema and batch.image_occurrence.is_empty()
    assert batch.image_feature.schema == IMAGE_FEATURE.polars_schema and batch.image_feature.is_empty()
    assert batch.quarantine.is_empty() and batch.ledgers == []
    assert not (tmp_path / "store").exists()


def test_naive_run_time_is_refused(small_drop: Path, tmp_path: Path) -> None:
    """measured_at without a time zone raises before anything is written."""
    with pytest.raises(ValueError, match="no time zone"):
        ingest(small_drop, tmp_path / "store", {}, measured_at=datetime.datetime(2026, 4, 1))
    assert not (tmp_path / "store").exists()
