"""De-identification of the demo sites' CT files: nothing identifying survives, links and pixels do."""

from __future__ import annotations

import datetime
import hashlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import imaging_fixtures
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imaging_fixtures import leaked, make_subject
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, MRImageStorage

from flows.demo_sites.imaging import (
    CORRUPTION_MODES,
    TRANSFER_SYNTAXES,
    ImagingProfile,
    ImagingSubject,
    corrupt_dicom,
    write_ct_series,
)
from flows.ingest.dicom_deid import (
    DeidOptions,
    date_offset_days,
    deidentify,
    deidentify_file,
    keyed_uid,
    phi_values,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
REMOVE = DeidOptions(date_option="remove")
SHIFT = DeidOptions(date_option="shift")
SYNTAX_ACQUISITIONS = {
    "ExplicitVRLittleEndian": {"matrix": 256, "pixel_spacing_mm": 1.4, "bits_stored": 12},
    "ImplicitVRLittleEndian": {"matrix": 384, "pixel_spacing_mm": 1.0},
    "RLELossless": {"matrix": 512, "pixel_spacing_mm": 0.78, "rescale_slope": 0.5},
}
TEMPORAL_VRS = ("DA", "DT", "TM")


def make_profile(**changes: object) -> ImagingProfile:
    """The shared profile at the children's hospital's coarse 256 x 1.4 mm grid, with `changes` applied."""
    return imaging_fixtures.make_profile(**{"matrix": 256, "pixel_spacing_mm": 1.4, **changes})


def pseudonym_for(mrn: str) -> str:
    """A stand-in for the site's keyed pseudonym: stable, and different for each MRN."""
    return "p" + hashlib.sha256(f"test:{mrn}".encode()).hexdigest()[:24]


def walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    """Every element of a dataset, at every depth of its sequences."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


def subject_phi(subject: ImagingSubject, profile: ImagingProfile) -> set[str]:
    """What the brief names as PHI of a demo series, independent of phi_values."""
    return {
        subject.mrn,
        subject.family_name,
        subject.given_name,
        f"{subject.family_name}^{subject.given_name}",
        subject.birth_date.strftime("%Y%m%d"),
        subject.accession_number,
        subject.referring_physician,
        subject.referring_physician.split("^")[0],
        profile.institution_name,
        profile.station_name,
    }


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """One three-slice series of the same patient in each transfer syntax."""
    root = tmp_path_factory.mktemp("drops")
    return {
        syntax: write_ct_series(
            root / syntax, make_subject(), make_profile(transfer_syntax=syntax, **acquisition), seed=1
        )
        for syntax, acquisition in SYNTAX_ACQUISITIONS.items()
    }


def deidentify_series(paths: list[Path], out: Path, options: DeidOptions, secret: bytes = SECRET) -> list[Path]:
    outcomes = [deidentify_file(p, out, secret=secret, pseudonym_for=pseudonym_for, options=options) for p in paths]
    assert all(o.error is None and o.output is not None for o in outcomes), [o.error for o in outcomes]
    return [o.output for o in outcomes if o.output is not None]


@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
def test_output_opens_decodes_and_keeps_pixels(tmp_path: Path, series: dict[str, list[Path]], syntax: str) -> None:
    """Each output opens, keeps its transfer syntax, is named by its new SOP Instance UID and has the same pixels."""
    for source in series[syntax]:
        outcome = deidentify_file(source, tmp_path, secret=SECRET, pseudonym_for=pseudonym_for, options=SHIFT)
        assert outcome.error is None and outcome.output is not None
        original, written = pydicom.dcmread(source), pydicom.dcmread(outcome.output)
        assert written.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        assert outcome.output.name == f"{written.SOPInstanceUID}.dcm"
        assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID == outcome.sop_instance_uid
        assert (written.SeriesInstanceUID, written.StudyInstanceUID) == (
            outcome.series_instance_uid,
            outcome.study_instance_uid,
        )
        assert written.SOPInstanceUID != original.SOPInstanceUID
        assert np.array_equal(written.pixel_array, original.pixel_array)
        assert written.PatientID == str(written.PatientName) == pseudonym_for(original.PatientID)


@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
def test_no_identifying_value_survives(tmp_path: Path, series: dict[str, list[Path]], syntax: str) -> None:
    """Under the Basic Profile no PHI of the source is in the output bytes or values, and no private tag is left."""
    profile = make_profile(transfer_syntax=syntax, **SYNTAX_ACQUISITIONS[syntax])
    for source, output in zip(series[syntax], deidentify_series(series[syntax], tmp_path, REMOVE), strict=True):
        original = pydicom.dcmread(source)
        phi = phi_values(original) | subject_phi(make_subject(), profile)
        assert {"Okonkwo^Adaeze", "NGH0012345", "19680517", "TWINFED DEMO PACS"} <= phi
        assert leaked(phi, output.read_bytes()) == set()
        written = pydicom.dcmread(output)
        assert phi.isdisjoint(phi_values(written))
        assert not [elem.tag for elem in walk(written) if elem.tag.is_private]
        assert "OtherPatientIDsSequence" not in written and "RequestAttributesSequence" not in written


def test_sequences_are_cleaned_at_every_depth(series: dict[str, list[Path]]) -> None:
    """In kept sequences UIDs map as at the top level; names, private tags and nested study references go."""
    source = pydicom.dcmread(series["ExplicitVRLittleEndian"][0])
    nested_study = Dataset()
    nested_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    nested_study.ReferencedSOPInstanceUID = source.StudyInstanceUID
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item = Dataset()
    item.SeriesInstanceUID = source.SeriesInstanceUID
    item.ReferencedInstanceSequence = Sequence([instance])
    item.ReferencedStudySequence = Sequence([nested_study])
    item.PerformingPhysicianName = "Okafor^Amara"
    item.SeriesDate = "20250314"
    item.private_block(0x0019, "TWINFED DEMO PACS", create=True).add_new(0x01, "LO", source.PatientID)
    source.ReferencedSeriesSequence = Sequence([item])

    result = deidentify(source, secret=SECRET, pseudonym="p0001", options=SHIFT)

    cleaned = result.ReferencedSeriesSequence[0]
    assert cleaned.SeriesInstanceUID == result.SeriesInstanceUID == keyed_uid(source.SeriesInstanceUID, secret=SECRET)
    nested = cleaned.ReferencedInstanceSequence[0]
    assert nested.ReferencedSOPInstanceUID == result.SOPInstanceUID
    assert nested.ReferencedSOPClassUID == source.SOPClassUID
    assert "ReferencedStudySequence" not in cleaned and "PerformingPhysicianName" not in cleaned
    assert cleaned.SeriesDate != "20250314" and cleaned.SeriesDate == result.SeriesDate
    assert not [elem.tag for elem in walk(result) if elem.tag.is_private]
    assert source.ReferencedSeriesSequence[0].PerformingPhysicianName == "Okafor^Amara"  # the input is untouched
    assert source.RequestAttributesSequence[0].ReferencedStudySequence[0].ReferencedSOPInstanceUID == (
        source.StudyInstanceUID
    )
    assert "RequestAttributesSequence" not in result  # Table E.1-1: X, nested study reference and all


@pytest.mark.parametrize("options", [REMOVE, SHIFT], ids=["remove", "shift"])
def test_attributes_the_table_does_not_list_are_handled_by_vr(
    series: dict[str, list[Path]], options: DeidOptions
) -> None:
    """Unlisted names and AE titles go, instance UIDs are remapped, dates and times follow the date option."""
    source = pydicom.dcmread(series["ExplicitVRLittleEndian"][0])
    source.ReviewerName = "Brennan^Siobhan"
    source.DestinationAE = "NGH_PACS_01"
    source.SOPInstanceUIDOfConcatenationSource = source.SOPInstanceUID
    source.CreationDate, source.CreationTime = "20250313", "170500"
    result = deidentify(source, secret=SECRET, pseudonym="p0001", options=options)
    assert "ReviewerName" not in result and "DestinationAE" not in result
    assert result.SOPInstanceUIDOfConcatenationSource == result.SOPInstanceUID
    if options.date_option == "shift":
        offset = date_offset_days("p0001", secret=SECRET)
        assert day(result.CreationDate) - day("20250313") == datetime.timedelta(days=offset)
        assert result.CreationTime == "170500"
    else:
        assert "CreationDate" not in result and "CreationTime" not in result


def test_uids_are_consistent_within_a_site_and_differ_between_sites(
    tmp_path: Path, series: dict[str, list[Path]]
) -> None:
    """One secret: same UIDs and bytes each run, one study/series/frame UID per series; another secret shares none."""
    paths = series["RLELossless"]
    first = deidentify_series(paths, tmp_path / "first", SHIFT)
    again = deidentify_series(paths, tmp_path / "again", SHIFT)
    other = deidentify_series(paths, tmp_path / "other", SHIFT, secret=OTHER_SECRET)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")
    mine = [pydicom.dcmread(p) for p in first]
    theirs = [pydicom.dcmread(p) for p in other]
    originals = [pydicom.dcmread(p) for p in paths]
    for key in keys[:3]:
        assert len({str(ds[key].value) for ds in mine}) == 1
    assert len({ds.SOPInstanceUID for ds in mine}) == len(paths)
    for ds, original, foreign in zip(mine, originals, theirs, strict=True):
        for key in keys:
            new = ds[key].value
            assert new == keyed_uid(original[key].value, secret=SECRET)
            assert new != foreign[key].value and new != original[key].value
            assert UID(new).is_valid and len(new) <= 64 and new.startswith("2.25.")


@settings(max_examples=60, deadline=None)
@given(
    uids=st.sets(
        st.lists(st.integers(0, 10**12), min_size=1, max_size=10).map(lambda parts: "1.2." + ".".join(map(str, parts))),
        min_size=2,
        max_size=40,
    ),
    secret=st.binary(min_size=16, max_size=64),
)
def test_keyed_uid_is_deterministic_injective_and_valid(uids: set[str], secret: bytes) -> None:
    """keyed_uid gives each distinct UID its own valid 2.25 UID of at most 64 characters, the same on every call."""
    mapped = [keyed_uid(uid, secret=secret) for uid in sorted(uids)]
    assert len(set(mapped)) == len(uids)
    assert mapped == [keyed_uid(uid, secret=secret) for uid in sorted(uids)]
    assert all(u.is_valid and len(u) <= 64 and u.startswith("2.25.") for u in mapped)


@pytest.mark.parametrize("date_option", ["remove", "shift"])
@pytest.mark.parametrize("keep", [True, False], ids=["keep-options", "basic-only"])
def test_markers_record_profile_and_options(series: dict[str, list[Path]], date_option: str, keep: bool) -> None:
    """(0012,0062-0064) and (0028,0303) name the profile and exactly the options used, and those options act."""
    options = DeidOptions(date_option=date_option, keep_patient_characteristics=keep, keep_device_identity=keep)  # type: ignore[arg-type]
    source = pydicom.dcmread(series["ImplicitVRLittleEndian"][0])
    result = deidentify(source, secret=SECRET, pseudonym="p0001", options=options)
    expected = (
        {"113100"} | ({"113107"} if date_option == "shift" else set()) | ({"113108", "113109"} if keep else set())
    )
    codes = result.DeidentificationMethodCodeSequence
    assert {c.CodeValue for c in codes} == expected and {c.CodingSchemeDesignator for c in codes} == {"DCM"}
    assert result.PatientIdentityRemoved == "YES"
    methods = result.DeidentificationMethod
    methods = [methods] if isinstance(methods, str) else list(methods)  # one value reads back as a string
    assert "Basic Application Confidentiality Profile" in methods[0]
    assert ("Retain Patient Characteristics Option" in methods) is keep
    assert ("Retain Longitudinal Temporal Information Modified Dates Option" in methods) is (date_option == "shift")
    assert result.LongitudinalTemporalInformationModified == ("MODIFIED" if date_option == "shift" else "REMOVED")
    for keyword in ("PatientSex", "PatientAge", "PatientSize", "PatientWeight"):
        assert (result.get(keyword) == source.get(keyword)) is keep
    for keyword in ("StationName", "DeviceSerialNumber"):
        assert (result.get(keyword) == source.get(keyword)) is keep


def test_remove_leaves_no_date_or_time(series: dict[str, list[Path]]) -> None:
    """With dates removed every date and time attribute is gone or empty, and the original values appear nowhere."""
    source = pydicom.dcmread(series["ExplicitVRLittleEndian"][1])
    result = deidentify(source, secret=SECRET, pseudonym="p0001", options=REMOVE)
    assert [elem.keyword for elem in walk(result) if elem.VR in TEMPORAL_VRS and elem.value] == []
    originals = {str(elem.value) for elem in walk(source) if elem.VR in TEMPORAL_VRS and elem.value}
    assert originals and originals.isdisjoint(str(elem.value) for elem in walk(result))


def test_shift_moves_dates_by_one_offset_per_patient(tmp_path: Path) -> None:
    """With shifted dates each DA moves by its patient's offset, so intervals between a patient's studies survive."""
    first_visit = make_subject()
    follow_up = make_subject(study_datetime=datetime.datetime(2025, 9, 2, 14, 5, 0), accession_number="NGHA000456")
    stranger = make_subject(mrn="NGH0099999", family_name="Moreau", accession_number="NGHA000789")
    profile = make_profile(slices=2, matrix=128)
    shifts: dict[str, set[int]] = {}
    study_dates: dict[str, tuple[datetime.date, datetime.date]] = {}
    for name, subject in (("first", first_visit), ("follow_up", follow_up), ("stranger", stranger)):
        paths = write_ct_series(tmp_path / name, subject, profile, seed=4)
        for source, output in zip(paths, deidentify_series(paths, tmp_path / f"{name}-out", SHIFT), strict=True):
            before, after = pydicom.dcmread(source), pydicom.dcmread(output)
            pairs = [(before[e.tag].value, e.value) for e in after if e.VR == "DA" and e.value]
            shifted = {e.keyword for e in after if e.VR == "DA" and e.value}
            assert {"StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"} <= shifted
            for old, new in pairs:
                shifts.setdefault(subject.mrn, set()).add((day(new) - day(old)).days)
            study_dates[name] = (day(before.StudyDate), day(after.StudyDate))
            assert after.PatientBirthDate == ""  # Table E.1-1 gives birth date no modified-dates option
    assert len(shifts[first_visit.mrn]) == 1 and len(shifts[stranger.mrn]) == 1
    (offset,) = shifts[first_visit.mrn]
    assert offset == date_offset_days(pseudonym_for(first_visit.mrn), secret=SECRET) and -3652 <= offset <= -366
    assert shifts[stranger.mrn] != shifts[first_visit.mrn]
    original_gap = study_dates["follow_up"][0] - study_dates["first"][0]
    assert study_dates["follow_up"][1] - study_dates["first"][1] == original_gap == datetime.timedelta(days=172)


def day(value: str) -> datetime.date:
    return datetime.datetime.strptime(value, "%Y%m%d").date()


def test_shift_keeps_no_original_date_and_only_times_of_day(tmp_path: Path, series: dict[str, list[Path]]) -> None:
    """With shifted dates the only identifying values left in the bytes are times of day, kept by a whole-day shift."""
    for source, output in zip(
        series["RLELossless"], deidentify_series(series["RLELossless"], tmp_path, SHIFT), strict=True
    ):
        original = pydicom.dcmread(source)
        times = {str(e.value) for e in walk(original) if e.VR == "TM"}
        assert leaked(phi_values(original), output.read_bytes()) == {t for t in times if len(t) >= 4}


@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("mode", CORRUPTION_MODES)
def test_corrupt_files_are_quarantined(tmp_path: Path, mode: str, syntax: str) -> None:
    """A truncated, garbage-headed or empty file gives an error naming it and writes nothing."""
    path = write_ct_series(
        tmp_path / "in", make_subject(), make_profile(transfer_syntax=syntax, matrix=128, slices=1), seed=1
    )[0]
    corrupt_dicom(path, mode=mode, rng=np.random.default_rng(3))
    outcome = deidentify_file(path, tmp_path / "out", secret=SECRET, pseudonym_for=pseudonym_for, options=REMOVE)
    assert outcome.output is None and outcome.error is not None and str(path) in outcome.error
    assert "\n" not in outcome.error
    assert outcome.sop_instance_uid is outcome.series_instance_uid is outcome.study_instance_uid is None
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    damage=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    keep=st.one_of(st.none(), st.floats(0, 1)),
)
def test_damaged_files_are_written_clean_or_quarantined_never_raised(
    series: dict[str, list[Path]], damage: list[tuple[float, int]], keep: float | None
) -> None:
    """Whatever header bytes are overwritten or cut off, the outcome is a readable file or an error naming the input."""
    data = bytearray(series["ImplicitVRLittleEndian"][0].read_bytes())
    header_end = data.find(b"\xe0\x7f\x10\x00", 132) + 8
    for where, byte in damage:
        data[int(where * header_end)] = byte
    if keep is not None:
        data = data[: int(keep * len(data))]
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each damaged value it reads
        path = Path(folder) / "damaged.dcm"
        path.write_bytes(bytes(data))
        outcome = deidentify_file(path, Path(folder) / "out", secret=SECRET, pseudonym_for=pseudonym_for, options=SHIFT)
        if outcome.output is None:
            assert outcome.error is not None and str(path) in outcome.error and "\n" not in outcome.error
        else:
            assert pydicom.dcmread(outcome.output).pixel_array.shape == (384, 384)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"SOPClassUID": MRImageStorage}, "not CT Image Storage"),
        ({"PatientID": ""}, "no PatientID"),
        ({"BurnedInAnnotation": "YES"}, "Burned In Annotation"),
    ],
    ids=["not-ct", "no-patient-id", "burned-in"],
)
def test_readable_files_the_pipeline_cannot_use_are_quarantined(
    tmp_path: Path, change: dict[str, str], reason: str
) -> None:
    """A readable file that is not CT, has no PatientID or has burned-in annotation is quarantined with the reason."""
    path = write_ct_series(tmp_path / "in", make_subject(), make_profile(matrix=128, slices=1), seed=1)[0]
    ds = pydicom.dcmread(path)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    outcome = deidentify_file(path, tmp_path / "out", secret=SECRET, pseudonym_for=pseudonym_for, options=REMOVE)
    assert outcome.output is None and outcome.error is not None
    assert str(path) in outcome.error and reason in outcome.error


def test_weak_secret_and_bad_pseudonym_are_refused(series: dict[str, list[Path]]) -> None:
    """A secret under 16 bytes or a pseudonym that does not fit PatientID raises instead of writing weak output."""
    source = pydicom.dcmread(series["ExplicitVRLittleEndian"][0])
    with pytest.raises(ValueError, match="at least 16 bytes"):
        deidentify(source, secret=b"short", pseudonym="p0001", options=REMOVE)
    with pytest.raises(ValueError, match="pseudonym"):
        deidentify(source, secret=SECRET, pseudonym="a\\b", options=REMOVE)
    with pytest.raises(ValueError, match="date_option"):
        DeidOptions(date_option="keep")  # type: ignore[arg-type]
