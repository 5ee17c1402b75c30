"""Harmonize CT slices from different scanners to one pixel grid and measure body composition at L3 on it.

Sites reconstruct on different matrices and fields of view (0.78 to 1.4 mm pixels here), so each
slice is put in Hounsfield units (modality LUT: rescale slope and intercept) and resampled to
COMMON_SPACING_MM before anything is measured; the same patient then gives the same areas
whichever site scanned them. The measurement follows the Alberta protocol thresholds
(Mitsiopoulos et al. 1998; Mourtzakis et al. 2008): fat -190..-30 HU, skeletal muscle -29..150 HU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

# 1 mm: inside the sites' range (0.78-1.4 mm), so the coarsest site is not upsampled far beyond
# what it resolves and the finest loses little (thin fat layers it resolves may fall between the
# new samples; see _wall_structures); a pixel is then exactly 0.01 cm2.
COMMON_SPACING_MM = 1.0
FAT_HU = (-190.0, -30.0)
MUSCLE_HU = (-29.0, 150.0)
# Anything denser than lung or bowel gas belongs to the patient (or the table, which is smaller).
BODY_HU = -500.0
# Depth of the wall's outer layer that is never eroded: thinner than any abdominal wall plus the
# fat inside it, so no organ reaches it, and thick enough to keep a two-pixel wall continuous.
WALL_BAND_MM = 2.0
FEATURE_NAMES = (
    "visceral_fat_area_cm2",
    "subcutaneous_fat_area_cm2",
    "skeletal_muscle_area_cm2",
    "muscle_attenuation_hu",
    "n_slices",
)


def harmonize_slice(ds: Dataset) -> np.ndarray:
    """The slice in HU (modality LUT applied), linearly resampled from its PixelSpacing to COMMON_SPACING_MM, float32.

    The resampling maps the image's full extent onto the new grid (scipy's grid mode), so the
    patient keeps their size in millimetres and areas stay areas.
    """
    spacing = _pixel_spacing(ds)
    hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"{_name(ds)}: expected one 2-D slice, got pixel data of shape {hu.shape}")
    factors = (spacing[0] / COMMON_SPACING_MM, spacing[1] / COMMON_SPACING_MM)
    if factors == (1.0, 1.0):
        return hu
    return ndimage.zoom(hu, factors, order=1, mode="nearest", grid_mode=True).astype(np.float32, copy=False)


def series_features(datasets: list[Dataset]) -> dict[str, float]:
    """Body composition of one L3 series: mean VAT, SAT and muscle areas (cm2) and muscle HU over its slices.

    Each slice is harmonized and measured with `slice_composition`; the series value is the mean
    of the slices' values, and n_slices the number of slices. Raises ValueError for an empty
    list, slices of more than one series, or a slice that shows no body.
    """
    if not datasets:
        raise ValueError("series_features needs at least one slice")
    series = {str(ds.SeriesInstanceUID) for ds in datasets if "SeriesInstanceUID" in ds}
    if len(series) > 1:
        raise ValueError(f"slices of {len(series)} series were given together; measure one series at a time")
    per_slice = []
    for ds in datasets:
        hu = harmonize_slice(ds)
        try:
            per_slice.append(slice_composition(hu, COMMON_SPACING_MM))
        except ValueError as error:
            raise ValueError(f"{_name(ds)}: {error}") from error
    features = {name: float(np.mean([s[name] for s in per_slice])) for name in FEATURE_NAMES[:-1]}
    features["n_slices"] = float(len(per_slice))
    return features


def slice_composition(hu: np.ndarray, pixel_spacing_mm: float) -> dict[str, float]:
    """VAT, SAT and skeletal muscle areas (cm2) and muscle attenuation (HU) of one axial HU image at L3.

    The body is the largest object above -500 HU, holes filled. Soft tissue and bone touching the
    body's outline is skin; the other soft tissue and bone, holes filled, is everything inside the
    outer surface of the muscle wall. Fat inside that is visceral, fat between it and the skin is
    subcutaneous; fat outside the skin (partial volume of skin and air) is neither. Muscle is the
    soft tissue of the structures forming the wall's outer surface (abdominal wall, psoas and
    paraspinals, joined through the spine), which leaves out organs and bowel, held apart by fat
    (see `_wall_structures` for fat layers thinner than a pixel). Muscle attenuation is the mean
    over muscle pixels whose four neighbours are muscle too, so the partial-volume mix of fat and
    muscle along the edges does not pull it down. Raises ValueError if the image holds no body.
    """
    pixel_cm2 = (pixel_spacing_mm / 10.0) ** 2
    body = _largest_component(ndimage.binary_fill_holes(hu > BODY_HU))
    if not body.any():
        raise ValueError(f"no body above {BODY_HU:g} HU in the image; is it a CT slice in HU?")
    fat = body & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
    dense = body & (hu >= MUSCLE_HU[0])
    soft = dense & (hu <= MUSCLE_HU[1])
    labels, count = ndimage.label(dense)
    outline = body & ~ndimage.binary_erosion(body)
    skin = _select(labels, count, labels[outline])
    within_skin = _enclosed_by_skin(skin, body)
    structures = dense & ~skin
    inside_wall = ndimage.binary_fill_holes(structures)
    muscle = soft & _wall_structures(structures, inside_wall, pixel_spacing_mm)
    muscle_core = muscle & ndimage.binary_erosion(muscle)
    return {
        "visceral_fat_area_cm2": float(np.count_nonzero(fat & inside_wall)) * pixel_cm2,
        "subcutaneous_fat_area_cm2": float(np.count_nonzero(fat & within_skin & ~inside_wall)) * pixel_cm2,
        "skeletal_muscle_area_cm2": float(np.count_nonzero(muscle)) * pixel_cm2,
        "muscle_attenuation_hu": float(hu[muscle_core].mean()) if muscle_core.any() else math.nan,
    }


def _wall_structures(structures: np.ndarray, inside_wall: np.ndarray, pixel_spacing_mm: float) -> np.ndarray:
    """The soft-tissue and bone structures that form the outer surface of the muscle wall, organs cut off.

    Resampling can drop the thin fat layer between the wall and the organs from the new grid in
    places (a 1.4 mm layer sampled every 1 mm, say), leaving necks one pixel wide through which
    organs touch the wall. Eroding the structures by one pixel cuts those necks; the outer
    WALL_BAND_MM of the wall is kept whole so a thin abdominal wall stays one ring; every pixel
    the erosion took goes back to the nearest remaining structure.
    """
    depth_px = ndimage.distance_transform_edt(inside_wall)
    surface = structures & (depth_px <= 1.0)
    cores = ndimage.binary_erosion(structures) | (structures & (depth_px <= WALL_BAND_MM / pixel_spacing_mm))
    if not cores.any():
        return cores
    core_labels, count = ndimage.label(cores)
    nearest = ndimage.distance_transform_edt(~cores, return_distances=False, return_indices=True)
    assigned = np.where(structures, core_labels[tuple(nearest)], 0)
    return _select(assigned, count, assigned[surface])


def _enclosed_by_skin(skin: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The skin and what it encloses; the whole body if the skin is not a closed ring around most of it."""
    enclosed = ndimage.binary_fill_holes(skin)
    if np.count_nonzero(enclosed) < 0.5 * np.count_nonzero(body):
        return body
    return enclosed


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm from PixelSpacing; raises naming the instance if it is missing or not positive."""
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise ValueError(f"{_name(ds)}: no PixelSpacing; the slice cannot be put on the common grid")
    row, column = float(spacing[0]), float(spacing[1])
    if not (row > 0 and column > 0):
        raise ValueError(f"{_name(ds)}: PixelSpacing {list(spacing)} must be positive")
    return row, column


def _name(ds: Dataset) -> str:
    """How to name a slice in an error: its file if it came from one, else its SOP Instance UID."""
    filename = getattr(ds, "filename", None)  # only a FileDataset read from disk has one
    return str(filename) if isinstance(filename, str | Path) else f"SOP Instance {ds.get('SOPInstanceUID', '?')}"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected object of a boolean mask (all False if the mask is empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _select(labels: np.ndarray, count: int, ids: np.ndarray) -> np.ndarray:
    """Mask of the pixels whose label is one of `ids` (label 0, the background, never selected)."""
    keep = np.zeros(count + 1, dtype=bool)
    keep[ids] = True
    keep[0] = False
    return keep[labels]
