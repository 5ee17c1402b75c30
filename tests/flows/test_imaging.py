"""Synthetic CT: readable DICOM in every transfer syntax, a recoverable phenotype, PHI where real files have it."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from imaging_fixtures import make_profile, make_subject
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage

from flows.demo_sites.imaging import (
    CORRUPTION_MODES,
    PRIVATE_CREATOR,
    TRANSFER_SYNTAXES,
    ImagingProfile,
    body_composition,
    corrupt_dicom,
    render_slice,
    write_ct_series,
)
from flows.ingest.images import slice_composition

AREAS = ("visceral_fat_cm2", "subcutaneous_fat_cm2", "muscle_cm2")


def measure_body_composition(hu: np.ndarray, spacing_mm: float) -> dict[str, float]:
    """The pipeline's own measurement (flows.ingest.images), keyed like ImagingSubject's fields."""
    measured = slice_composition(hu, spacing_mm)
    return {
        "visceral_fat_cm2": measured["visceral_fat_area_cm2"],
        "subcutaneous_fat_cm2": measured["subcutaneous_fat_area_cm2"],
        "muscle_cm2": measured["skeletal_muscle_area_cm2"],
        "muscle_hu": measured["muscle_attenuation_hu"],
    }


def hu_image(path: Path) -> tuple[np.ndarray, float]:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds), float(ds.PixelSpacing[0])


def text(value: object) -> str:
    """A private element's value as text: implicit VR files give its bytes (VR UN)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


SYNTAX_PROFILES = [
    make_profile(transfer_syntax="ExplicitVRLittleEndian", matrix=256, pixel_spacing_mm=1.5, bits_stored=12),
    make_profile(transfer_syntax="ImplicitVRLittleEndian", matrix=384, pixel_spacing_mm=1.0, bits_stored=16),
    make_profile(transfer_syntax="RLELossless", matrix=512, pixel_spacing_mm=0.8, bits_stored=16, rescale_slope=0.5),
]


@pytest.mark.parametrize("profile", SYNTAX_PROFILES, ids=lambda p: p.transfer_syntax)
def test_series_reads_back_in_every_transfer_syntax(tmp_path: Path, profile: ImagingProfile) -> None:
    """Each file opens, has the asked transfer syntax, bits and shape, and decodes to HU from air to bone."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_ct_series(tmp_path, make_subject(), profile, seed=1)
    assert [p.name for p in paths] == ["IM000001.dcm", "IM000002.dcm", "IM000003.dcm"]
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[profile.transfer_syntax]
        assert ds.preamble == b"\x00" * 128 and path.read_bytes()[128:132] == b"DICM"
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, profile.bits_stored, profile.bits_stored - 1)
        assert (ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (0, 1, "MONOCHROME2")
        assert ds.RescaleType == "HU" and float(ds.RescaleSlope) == profile.rescale_slope
        assert ds.pixel_array.shape == (profile.matrix, profile.matrix)
        assert int(ds.pixel_array.max()) < 2**profile.bits_stored
        hu = apply_modality_lut(ds.pixel_array, ds)
        assert -1100 <= hu.min() <= -950 and 600 <= hu.max() <= 800
        assert float(np.median(hu)) == pytest.approx(-1000, abs=40)  # most of the field of view is air


def test_rle_series_is_lossless(tmp_path: Path) -> None:
    """The RLE series decodes to exactly the pixels of the uncompressed series written with the same seed."""
    explicit = make_profile(matrix=512, pixel_spacing_mm=0.8, transfer_syntax="ExplicitVRLittleEndian")
    rle = dataclasses.replace(explicit, transfer_syntax="RLELossless")
    for plain, packed in zip(
        write_ct_series(tmp_path / "plain", make_subject(), explicit, seed=5),
        write_ct_series(tmp_path / "rle", make_subject(), rle, seed=5),
        strict=True,
    ):
        assert np.array_equal(pydicom.dcmread(plain).pixel_array, pydicom.dcmread(packed).pixel_array)
        assert packed.stat().st_size < 0.7 * plain.stat().st_size


def test_series_geometry_is_consistent(tmp_path: Path) -> None:
    """Slices share orientation, frame of reference and series, and step down by the slice thickness."""
    profile = make_profile(slices=4, slice_thickness_mm=2.5)
    datasets = [pydicom.dcmread(p) for p in write_ct_series(tmp_path, make_subject(), profile, seed=2)]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    assert np.allclose(np.diff(positions[:, 2]), -2.5)
    assert np.allclose(positions[:, :2], positions[0, :2])
    assert [float(ds.SliceLocation) for ds in datasets] == pytest.approx(list(positions[:, 2]))
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4]
    for attribute in ("ImageOrientationPatient", "FrameOfReferenceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert len({str(ds[attribute].value) for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert all(float(ds.SliceThickness) == 2.5 for ds in datasets)


@pytest.mark.parametrize(
    "profile",
    [
        make_profile(matrix=256, pixel_spacing_mm=1.4, bits_stored=12),
        make_profile(matrix=512, pixel_spacing_mm=0.78, rescale_slope=0.5, transfer_syntax="RLELossless"),
    ],
    ids=["256px-1.4mm", "512px-0.78mm"],
)
def test_phenotype_is_recoverable_from_the_files(tmp_path: Path, profile: ImagingProfile) -> None:
    """VAT, SAT and muscle measured on the decoded files are within 15% of the truth and keep the patients' order."""
    lean = make_subject(mrn="LEAN01", visceral_fat_cm2=40.0, subcutaneous_fat_cm2=120.0, muscle_cm2=170.0)
    obese = make_subject(
        mrn="OBESE1", visceral_fat_cm2=200.0, subcutaneous_fat_cm2=380.0, muscle_cm2=140.0, muscle_hu=28.0
    )
    measured = {}
    for subject in (lean, obese):
        paths = write_ct_series(tmp_path / subject.mrn, subject, profile, seed=3)
        per_slice = [measure_body_composition(*hu_image(p)) for p in paths]
        mean = {key: float(np.mean([m[key] for m in per_slice])) for key in per_slice[0]}
        for key in AREAS:
            assert mean[key] == pytest.approx(getattr(subject, key), rel=0.15), (subject.mrn, key)
        assert mean["muscle_hu"] == pytest.approx(subject.muscle_hu, abs=2.0)
        measured[subject.mrn] = mean
    assert measured["OBESE1"]["visceral_fat_cm2"] > 3 * measured["LEAN01"]["visceral_fat_cm2"]
    assert measured["OBESE1"]["subcutaneous_fat_cm2"] > measured["LEAN01"]["subcutaneous_fat_cm2"]
    assert measured["OBESE1"]["muscle_cm2"] < measured["LEAN01"]["muscle_cm2"]


def test_render_matches_drawn_patients_at_every_spacing() -> None:
    """For children to obese adults drawn by body_composition, rendered areas are within 10% at three spacings."""
    rng = np.random.default_rng(11)
    patients = [  # age, sex, weight kg, height cm, insulin sensitivity
        (7, "M", 24, 122, 1.2),
        (10, "F", 45, 140, 0.8),
        (15, "M", 62, 170, 1.0),
        (34, "F", 58, 164, 1.5),
        (52, "M", 96, 178, 0.6),
        (67, "F", 104, 160, 0.5),
    ]
    for i, (age, sex, weight, height, sensitivity) in enumerate(patients):
        body = body_composition(
            body_weight_kg=weight, height_cm=height, insulin_sensitivity=sensitivity, age_years=age, sex=sex, rng=rng
        )
        subject = make_subject(mrn=f"P{i}", sex=sex, body_weight_kg=weight, height_cm=height, **body)
        for matrix, spacing in ((256, 1.9), (384, 1.25), (512, 0.92)):
            profile = make_profile(matrix=matrix, pixel_spacing_mm=spacing)
            measured = measure_body_composition(render_slice(subject, profile, 1, rng), spacing)
            for key in AREAS:
                assert measured[key] == pytest.approx(body[key], rel=0.10), (age, sex, matrix, key)
            assert measured["muscle_hu"] == pytest.approx(body["muscle_hu"], abs=1.0)


def test_slices_differ_along_the_body() -> None:
    """Neighbouring slices show different anatomy, not the same picture with new noise."""
    profile = make_profile()
    first, last = (render_slice(make_subject(), profile, i, np.random.default_rng(0)) for i in (0, 2))
    assert np.mean(np.abs(first - last) > 60) > 0.02


def test_render_refuses_a_body_wider_than_the_field_of_view() -> None:
    """render_slice raises rather than cut off a body that does not fit matrix x spacing."""
    with pytest.raises(ValueError, match="field of view"):
        render_slice(make_subject(), make_profile(matrix=128, pixel_spacing_mm=1.0), 0, np.random.default_rng(0))


def test_series_widens_the_field_of_view_for_a_large_patient(tmp_path: Path) -> None:
    """A body wider than the site's field of view is reconstructed with a wider one, recorded in PixelSpacing."""
    large = make_subject(visceral_fat_cm2=260.0, subcutaneous_fat_cm2=520.0, muscle_cm2=170.0, body_weight_kg=130.0)
    profile = make_profile(matrix=256, pixel_spacing_mm=1.2)
    paths = write_ct_series(tmp_path, large, profile, seed=4)
    hu, spacing = hu_image(paths[1])
    assert spacing > 1.2 and spacing * 256 <= 500
    assert measure_body_composition(hu, spacing)["subcutaneous_fat_cm2"] == pytest.approx(520.0, rel=0.1)


def test_lower_insulin_sensitivity_means_more_visceral_fat() -> None:
    """Across many draws, insulin-resistant patients have more VAT, a larger VAT share and lower muscle HU."""
    rng = np.random.default_rng(21)

    def draws(sensitivity: float) -> list[dict[str, float]]:
        return [
            body_composition(
                body_weight_kg=85.0, height_cm=175.0, insulin_sensitivity=sensitivity, age_years=50, sex="M", rng=rng
            )
            for _ in range(300)
        ]

    resistant, sensitive = draws(0.6), draws(1.6)

    def mean(group: list[dict[str, float]], key: str) -> float:
        return float(np.mean([d[key] for d in group]))

    def visceral_share(group: list[dict[str, float]]) -> float:
        return float(
            np.mean([d["visceral_fat_cm2"] / (d["visceral_fat_cm2"] + d["subcutaneous_fat_cm2"]) for d in group])
        )

    assert mean(resistant, "visceral_fat_cm2") > 1.3 * mean(sensitive, "visceral_fat_cm2")
    assert visceral_share(resistant) > visceral_share(sensitive) + 0.1
    assert mean(resistant, "muscle_hu") < mean(sensitive, "muscle_hu") - 3


def test_heavier_patients_have_more_fat_and_children_smaller_areas() -> None:
    """Fat grows with BMI at the same height, and a child's areas are all smaller than an adult's."""
    rng = np.random.default_rng(5)

    def mean(**patient: float | str) -> dict[str, float]:
        draws = [body_composition(insulin_sensitivity=1.0, rng=rng, **patient) for _ in range(200)]  # type: ignore[arg-type]
        return {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}

    lean = mean(body_weight_kg=60.0, height_cm=175.0, age_years=40.0, sex="M")
    heavy = mean(body_weight_kg=105.0, height_cm=175.0, age_years=40.0, sex="M")
    child = mean(body_weight_kg=26.0, height_cm=128.0, age_years=8.0, sex="F")
    adult = mean(body_weight_kg=64.0, height_cm=165.0, age_years=35.0, sex="F")
    for key in ("visceral_fat_cm2", "subcutaneous_fat_cm2"):
        assert heavy[key] > 1.8 * lean[key]
    for key in AREAS:
        assert child[key] < 0.7 * adult[key]
    assert all(30.0 <= d["muscle_hu"] <= 55.0 for d in (lean, heavy, child, adult))


def test_same_seed_gives_identical_bytes_and_another_seed_new_uids(tmp_path: Path) -> None:
    """Writing twice with one seed gives byte-identical files; another seed changes every UID."""
    profile = make_profile(transfer_syntax="RLELossless")
    first = write_ct_series(tmp_path / "a", make_subject(), profile, seed=9)
    again = write_ct_series(tmp_path / "b", make_subject(), profile, seed=9)
    other = write_ct_series(tmp_path / "c", make_subject(), profile, seed=10)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    uid_keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    for mine, theirs in zip(first, other, strict=True):
        a, b = pydicom.dcmread(mine), pydicom.dcmread(theirs)
        for key in uid_keys:
            assert a[key].value != b[key].value
            assert a[key].value.is_valid
    assert not np.array_equal(pydicom.dcmread(first[0]).pixel_array, pydicom.dcmread(other[0]).pixel_array)


@pytest.mark.parametrize("syntax", ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"])
def test_phi_is_where_real_files_carry_it(tmp_path: Path, syntax: str) -> None:
    """MRN and name sit in the patient module, in OtherPatientIDsSequence, in the request and in the private block."""
    subject = make_subject()
    ds = pydicom.dcmread(write_ct_series(tmp_path, subject, make_profile(transfer_syntax=syntax), seed=1)[0])
    assert str(ds.PatientName) == "Okonkwo^Adaeze" and ds.PatientID == "NGH0012345"
    assert (ds.PatientBirthDate, ds.PatientSex, ds.PatientAge) == ("19680517", "F", "056Y")
    assert (ds.StudyDate, ds.StudyTime) == ("20250314", "094107")
    assert ds.InstanceCreationDate == "20250314" and ds.InstanceCreationTime == "094107"
    assert str(ds.ReferringPhysicianName) == "Whitfield^Marcus" and ds.AccessionNumber == "NGHA000123"
    for keyword in ("InstitutionAddress", "PerformingPhysicianName", "OperatorsName", "DeviceSerialNumber", "StudyID"):
        assert str(ds[keyword].value)
    assert ds.OtherPatientIDsSequence[0].PatientID == subject.mrn
    request = ds.RequestAttributesSequence[0]
    assert request.RequestedProcedureID and request.ScheduledProcedureStepID
    assert request.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ds.StudyInstanceUID
    code = ds.ProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "74150",
        "CPT4",
        "CT abdomen w/o contrast",
    )
    block = ds.private_block(0x0011, PRIVATE_CREATOR)
    private = [text(block[offset].value) for offset in (0x01, 0x02, 0x03)]
    assert private[0] == "Okonkwo^Adaeze" and private[1] == subject.mrn
    assert "Adaeze Okonkwo" in private[2]


@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("mode", CORRUPTION_MODES)
def test_every_corruption_makes_the_file_unreadable(tmp_path: Path, mode: str, syntax: str) -> None:
    """After corrupt_dicom, reading the file or its pixels raises, and the description is one line."""
    rng = np.random.default_rng(8)
    paths = write_ct_series(tmp_path, make_subject(), make_profile(transfer_syntax=syntax, matrix=256), seed=1)
    for path in paths:
        description = corrupt_dicom(path, mode=mode, rng=rng)
        assert description and "\n" not in description and path.name in description
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a truncated RLE file warns before it fails
            with pytest.raises((InvalidDicomError, ValueError, AttributeError, EOFError)):
                _ = pydicom.dcmread(path).pixel_array


def test_unknown_corruption_mode_is_refused(tmp_path: Path) -> None:
    """An unknown mode raises and leaves the file as written."""
    path = write_ct_series(tmp_path, make_subject(), make_profile(matrix=256, slices=1), seed=1)[0]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="truncated"):
        corrupt_dicom(path, mode="bit_flip", rng=np.random.default_rng(0))
    assert path.read_bytes() == before
