"""Image harmonization: every site's CT on one 1 mm grid in HU, and body composition that agrees across sites."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imaging_fixtures import make_profile, make_subject
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from flows.demo_sites.imaging import ImagingSubject, write_ct_series
from flows.ingest.dicom_deid import DeidOptions, deidentify_file
from flows.ingest.images import COMMON_SPACING_MM, harmonize_slice, series_features, slice_composition

SECRET = bytes(range(32))
# The three demo hospitals' acquisitions (infra/sites/*.toml).
SITE_ACQUISITIONS: dict[str, dict[str, object]] = {
    "aurelia-256px-1.4mm": {"matrix": 256, "pixel_spacing_mm": 1.4, "bits_stored": 12},
    "northbridge-384px-1.0mm": {"matrix": 384, "pixel_spacing_mm": 1.0, "transfer_syntax": "ImplicitVRLittleEndian"},
    "lakeside-512px-0.78mm": {
        "matrix": 512,
        "pixel_spacing_mm": 0.78,
        "rescale_slope": 0.5,
        "transfer_syntax": "RLELossless",
    },
}
TRUTH = {
    "visceral_fat_area_cm2": "visceral_fat_cm2",
    "subcutaneous_fat_area_cm2": "subcutaneous_fat_cm2",
    "skeletal_muscle_area_cm2": "muscle_cm2",
}


SUBJECTS = {
    "average": make_subject(),
    # Thin fat layers between muscle and organs: the case resampling makes hard.
    "lean": make_subject(
        mrn="NGH0054321", sex="M", height_cm=180.0, visceral_fat_cm2=40.0, subcutaneous_fat_cm2=120.0, muscle_cm2=170.0
    ),
}


def deidentified_series(folder: Path, subject: ImagingSubject, acquisition: dict[str, object]) -> list[Dataset]:
    """Write a demo series, de-identify it as the pipeline does and read the outputs back."""
    sources = write_ct_series(folder / "drop", subject, make_profile(**acquisition), seed=7)
    outcomes = [
        deidentify_file(
            p, folder / "deid", secret=SECRET, pseudonym_for=lambda mrn: "p" + mrn, options=DeidOptions("shift")
        )
        for p in sources
    ]
    assert all(o.output is not None for o in outcomes), [o.error for o in outcomes]
    return [pydicom.dcmread(o.output) for o in outcomes if o.output is not None]


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, float]]:
    """Features of each subject's de-identified series at each site's acquisition."""
    root = tmp_path_factory.mktemp("sites")
    return {
        (who, site): series_features(deidentified_series(root / who / site, subject, acquisition))
        for who, subject in SUBJECTS.items()
        for site, acquisition in SITE_ACQUISITIONS.items()
    }


@pytest.mark.parametrize("site", list(SITE_ACQUISITIONS))
@pytest.mark.parametrize("who", list(SUBJECTS))
def test_features_recover_the_truth_at_every_site(
    features: dict[tuple[str, str], dict[str, float]], who: str, site: str
) -> None:
    """VAT, SAT and muscle areas are within 10% of the phantom's truth and muscle attenuation within 3 HU."""
    measured, subject = features[(who, site)], SUBJECTS[who]
    for feature, truth in TRUTH.items():
        assert measured[feature] == pytest.approx(getattr(subject, truth), rel=0.10), feature
    assert measured["muscle_attenuation_hu"] == pytest.approx(subject.muscle_hu, abs=3.0)
    assert measured["n_slices"] == 3.0


@pytest.mark.parametrize("who", list(SUBJECTS))
def test_same_patient_agrees_across_acquisitions(features: dict[tuple[str, str], dict[str, float]], who: str) -> None:
    """One patient scanned on every site's scanner gives features within 5% of each other."""
    sites = list(SITE_ACQUISITIONS)
    for feature in (*TRUTH, "muscle_attenuation_hu"):
        values = [features[(who, site)][feature] for site in sites]
        assert max(values) <= 1.05 * min(values), (feature, dict(zip(sites, values, strict=True)))


def test_harmonize_applies_the_modality_lut_and_resamples_to_the_common_grid(tmp_path: Path) -> None:
    """A 0.78 mm slice with slope 0.5 becomes float32 HU on a 1 mm grid covering the same field of view."""
    path = write_ct_series(
        tmp_path, make_subject(), make_profile(**SITE_ACQUISITIONS["lakeside-512px-0.78mm"]), seed=1
    )[0]
    ds = pydicom.dcmread(path)
    hu = harmonize_slice(ds)
    assert hu.dtype == np.float32 and hu.shape == (round(512 * 0.78), round(512 * 0.78))
    native = apply_modality_lut(ds.pixel_array, ds)
    assert float(np.median(hu)) == pytest.approx(float(np.median(native)), abs=5)  # air, in HU
    assert hu.min() >= native.min() and hu.max() <= native.max()  # linear interpolation stays within range


def test_harmonize_keeps_a_slice_already_on_the_grid(tmp_path: Path) -> None:
    """A slice already at 1 mm comes back as exactly its HU values."""
    path = write_ct_series(tmp_path, make_subject(), make_profile(rescale_slope=0.5), seed=1)[0]
    ds = pydicom.dcmread(path)
    assert np.array_equal(harmonize_slice(ds), apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


def square_phantom(rows: int, columns: int, spacing: tuple[float, float]) -> Dataset:
    """An in-memory CT slice: a fat rectangle of half the field of view in air, stored as HU + 1024."""
    hu = np.full((rows, columns), -1000.0)
    hu[rows // 4 : rows // 4 + rows // 2, columns // 4 : columns // 4 + columns // 2] = -100.0
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data((hu + 1024).astype(np.uint16), "MONOCHROME2", 16)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelSpacing = [f"{spacing[0]:.4f}", f"{spacing[1]:.4f}"]
    return ds


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(40, 160),
    columns=st.integers(40, 160),
    spacing=st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0)),
)
def test_harmonized_areas_do_not_depend_on_the_pixel_grid(
    rows: int, columns: int, spacing: tuple[float, float]
) -> None:
    """Whatever the (anisotropic) pixel spacing, the image keeps its size in mm and a fat region keeps its area."""
    ds = square_phantom(rows, columns, spacing)
    row_mm, column_mm = (float(v) for v in ds.PixelSpacing)
    hu = harmonize_slice(ds)
    assert hu.shape == (round(rows * row_mm / COMMON_SPACING_MM), round(columns * column_mm / COMMON_SPACING_MM))
    true_mm2 = (rows // 2) * row_mm * (columns // 2) * column_mm
    measured_mm2 = np.count_nonzero((hu >= -190) & (hu <= -30)) * COMMON_SPACING_MM**2
    perimeter_mm = 2 * ((rows // 2) * row_mm + (columns // 2) * column_mm)
    # Each edge can move by half a pixel of either grid (interpolation, sampling), plus the rounding of the grid's size.
    tolerance_mm2 = perimeter_mm * 0.5 * (max(row_mm, column_mm) + COMMON_SPACING_MM) + 0.02 * true_mm2
    assert measured_mm2 == pytest.approx(true_mm2, abs=tolerance_mm2)


def test_series_features_refuse_what_they_cannot_measure(tmp_path: Path) -> None:
    """An empty list, two series mixed, a slice without PixelSpacing or without a body raise, naming the problem."""
    paths = write_ct_series(tmp_path, make_subject(), make_profile(matrix=128, slices=2), seed=1)
    first, second = (pydicom.dcmread(p) for p in paths)
    with pytest.raises(ValueError, match="at least one slice"):
        series_features([])
    second.SeriesInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="one series at a time"):
        series_features([first, second])
    del first.PixelSpacing
    with pytest.raises(ValueError, match=f"{paths[0].name}.*PixelSpacing"):
        series_features([first])
    air = square_phantom(64, 64, (1.0, 1.0))
    air.PixelData = np.zeros((64, 64), dtype=np.uint16).tobytes()
    with pytest.raises(ValueError, match=f"SOP Instance {air.SOPInstanceUID}: no body"):
        series_features([air])


def test_slice_composition_of_a_body_without_muscle_reports_no_attenuation() -> None:
    """A body of fat only has no muscle area and a NaN attenuation rather than a made-up number."""
    y, x = np.mgrid[:80, :80]
    hu = np.where((y - 40) ** 2 + (x - 40) ** 2 <= 25**2, -100.0, -1000.0).astype(np.float32)
    measured = slice_composition(hu, 1.0)
    assert measured["skeletal_muscle_area_cm2"] == 0.0 and math.isnan(measured["muscle_attenuation_hu"])
    assert measured["visceral_fat_area_cm2"] + measured["subcutaneous_fat_area_cm2"] > 0
