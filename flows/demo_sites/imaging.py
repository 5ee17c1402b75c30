"""Synthetic abdominal CT for demo hospitals: L3 slices whose fat and muscle follow the patient, in PHI-laden DICOM.

A series is a few axial slices around the third lumbar vertebra (L3), the level at which body
composition is measured from CT. The phantom is built from nested ellipses whose sizes are
solved so that the visceral fat (VAT), subcutaneous fat (SAT) and skeletal muscle areas equal
the patient's true values, then written as the hospital's scanner would: its matrix, spacing,
rescale, bits stored and transfer syntax, with identifying data in the main dataset, inside
sequences and in a private block, as real exports carry it.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import VR
from scipy import special

TRANSFER_SYNTAXES: dict[str, UID] = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "ImplicitVRLittleEndian": ImplicitVRLittleEndian,
    "RLELossless": RLELossless,
}
CORRUPTION_MODES = ("truncated", "garbage_header", "zero_length")
PRIVATE_CREATOR = "TWINFED DEMO PACS"
PRIVATE_GROUP = 0x0011


NOISE_SD_HU = 10.0
# Gaussian noise by table lookup: 2**16 equiprobable quantiles indexed by random uint16, about
# twice as fast as drawing normals at 512 x 512. The tails stop at 4.3 sd (43 HU), so noise never
# moves fat (<= -86 HU) into the muscle range or muscle (>= 18 HU) into the fat range.
_NOISE_TABLE_HU = (NOISE_SD_HU * special.ndtri((np.arange(2**16) + 0.5) / 2**16)).astype(np.float32)
# Scanners offer display fields of view up to about 500 mm; a wider body would be truncated.
MAX_FIELD_OF_VIEW_MM = 500.0
FIELD_OF_VIEW_STEP_MM = 10.0
BODY_MARGIN_MM = 8.0
SKIN_MM = 2.0
CORTEX_MM = 2.0
# Two ellipses whose semi-axes differ by t are at least 0.85 t apart for the shapes drawn here.
OFFSET_GAP_FACTOR = 0.85
L3_TABLE_POSITION_MM = -180.0

AIR, SKIN, SAT, MUSCLE, VAT, ORGAN, CORTEX, MARROW, GAS = range(9)
TISSUE_HU = {AIR: -1000.0, SKIN: 45.0, ORGAN: 40.0, CORTEX: 700.0, MARROW: 400.0, GAS: -950.0}

# Fictional staff and streets for the PHI a real header carries.
_STAFF = (
    ("Okafor", "Amara"),
    ("Lindqvist", "Erik"),
    ("Moreau", "Claire"),
    ("Haddad", "Rami"),
    ("Nakamura", "Yui"),
    ("Brennan", "Siobhan"),
    ("Kowalski", "Piotr"),
    ("Alvarez", "Lucia"),
)
# Soft-tissue reconstruction kernel by vendor (first word of Manufacturer).
_KERNELS = {"SIEMENS": "Br40", "GE": "STANDARD", "PHILIPS": "B", "CANON": "FC18", "TOSHIBA": "FC18"}
_STREETS = ("Harbour Road", "Elm Avenue", "Station Street", "Mill Lane", "Queen's Parade", "Riverside Drive")
_TOWNS = ("Northbridge", "Lakeside", "Aurelia Bay", "Kingsford", "Westmere")


@dataclass(frozen=True)
class ImagingProfile:
    """Site-specific CT acquisition."""

    manufacturer: str
    model: str
    institution_name: str
    station_name: str
    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slices: int
    rescale_slope: float
    rescale_intercept: float
    bits_stored: int
    transfer_syntax: str

    def __post_init__(self) -> None:
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax {self.transfer_syntax!r} is not one of {sorted(TRANSFER_SYNTAXES)}")
        if self.bits_stored not in (12, 16):
            raise ValueError(f"bits_stored must be 12 or 16, got {self.bits_stored}")
        if self.matrix < 64 or self.slices < 1:
            raise ValueError(f"need matrix >= 64 and slices >= 1, got {self.matrix} and {self.slices}")
        if min(self.pixel_spacing_mm, self.slice_thickness_mm, self.rescale_slope) <= 0:
            raise ValueError("pixel spacing, slice thickness and rescale slope must be positive")


@dataclass(frozen=True)
class ImagingSubject:
    """One patient's identity (PHI, as the hospital holds it) and true body composition."""

    mrn: str
    family_name: str
    given_name: str
    birth_date: datetime.date
    sex: str
    study_datetime: datetime.datetime
    referring_physician: str
    accession_number: str
    body_weight_kg: float
    height_cm: float
    visceral_fat_cm2: float
    subcutaneous_fat_cm2: float
    muscle_cm2: float
    muscle_hu: float

    def __post_init__(self) -> None:
        if self.sex not in ("M", "F"):
            raise ValueError(f"sex must be 'M' or 'F', got {self.sex!r}")
        if min(self.body_weight_kg, self.height_cm, self.visceral_fat_cm2, self.subcutaneous_fat_cm2) <= 0:
            raise ValueError("weight, height and fat areas must be positive")
        if self.muscle_cm2 <= 0:
            raise ValueError("muscle area must be positive")


def body_composition(
    *,
    body_weight_kg: float,
    height_cm: float,
    insulin_sensitivity: float,
    age_years: float,
    sex: str,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Draw a plausible (visceral_fat_cm2, subcutaneous_fat_cm2, muscle_cm2, muscle_hu) at L3 for a patient.

    The chain, each step a published relation with patient-level scatter:

    - Body fat % from BMI, age and sex (Deurenberg et al. 1991, Br J Nutr 65:105; their child
      equation below 16 years), so heavier and higher-BMI patients carry more fat.
    - Total adipose area at L3 proportional to fat mass over height, about 14 cm2 per kg at
      170 cm, near the slope of Mourtzakis et al. 2008 (Appl Physiol Nutr Metab 33:997) in the
      overweight range and still positive for lean patients and children.
    - The visceral share of that fat is about a quarter in children of either sex (Goran et al.
      1997, CT in 5-10 year olds), and in adults rises with male sex and age (Kotani et al.
      1994) and with insulin resistance: VAT is the depot most tied to it (Fox et al. 2007,
      Circulation 116:39; Preis et al. 2010). Here the logit of the share falls by 1.1 per unit
      of log insulin sensitivity (factor 1.0 typical, 0.5-2.0 range).
    - Skeletal muscle area from fat-free mass, FFM = 0.30 SMA + 6.06 (Mourtzakis et al. 2008),
      and at least 2.6 cm2 per kg of FFM, where that adult line runs too low for small children.
    - Muscle attenuation falls with age, BMI and insulin resistance, through intramuscular lipid
      (Goodpaster et al. 2000, J Appl Physiol 89:104; Martin et al. 2013, J Clin Oncol 31:1539).

    Children (age < 12) come out with smaller areas because they are smaller and leaner, and
    with a smaller visceral share.
    """
    _check_sex(sex)
    if body_weight_kg <= 0 or height_cm <= 0 or insulin_sensitivity <= 0 or age_years < 0:
        raise ValueError("weight, height and insulin sensitivity must be positive and age non-negative")
    male = 1.0 if sex == "M" else 0.0
    bmi = body_weight_kg / (height_cm / 100.0) ** 2
    if age_years < 16:
        fat_percent = 1.51 * bmi - 0.70 * age_years - 3.6 * male + 1.4
    else:
        fat_percent = 1.2 * bmi + 0.23 * age_years - 10.8 * male - 5.4
    fat_percent = float(np.clip(fat_percent * math.exp(rng.normal(0.0, 0.10)), 5.0, 60.0))
    fat_kg = body_weight_kg * fat_percent / 100.0
    lean_kg = body_weight_kg - fat_kg
    adipose_cm2 = 14.0 * fat_kg * (170.0 / height_cm)

    log_sensitivity = math.log(insulin_sensitivity)
    # Sex differences in fat distribution emerge through puberty (12 to 18 years).
    maturity = min(max((age_years - 12.0) / 6.0, 0.0), 1.0)
    adult_base = -0.45 if male else -1.0
    visceral_logit = (
        (1.0 - maturity) * -0.425
        + maturity * adult_base
        + 0.025 * (min(max(age_years, 18.0), 70.0) - 45.0)
        - 1.1 * log_sensitivity
        + rng.normal(0.0, 0.30)
    )
    visceral_share = 1.0 / (1.0 + math.exp(-visceral_logit))

    muscle_cm2 = max((lean_kg - 6.06) / 0.30, 2.6 * lean_kg) * math.exp(rng.normal(0.0, 0.08))
    muscle_hu = (
        47.0
        - 0.25 * max(age_years - 30.0, 0.0)
        - 0.5 * (bmi - 23.0)
        - 2.0 * (1.0 - male)
        + 7.0 * log_sensitivity
        + rng.normal(0.0, 3.0)
    )
    return {
        "visceral_fat_cm2": max(5.0, visceral_share * adipose_cm2),
        "subcutaneous_fat_cm2": max(10.0, (1.0 - visceral_share) * adipose_cm2),
        "muscle_cm2": muscle_cm2,
        "muscle_hu": float(np.clip(muscle_hu, 18.0, 60.0)),
    }


@dataclass(frozen=True)
class _Ellipse:
    """Axis-aligned ellipse in the axial plane, in mm: x toward the patient's left, y toward posterior."""

    cx: float
    cy: float
    a: float
    b: float

    @property
    def area(self) -> float:
        """Area in mm2."""
        return math.pi * self.a * self.b

    def grown(self, mm: float) -> _Ellipse:
        """The ellipse with both semi-axes longer by `mm` (negative shrinks)."""
        return _Ellipse(self.cx, self.cy, self.a + mm, self.b + mm)

    def shifted(self, dy: float) -> _Ellipse:
        """The ellipse moved by `dy` mm toward posterior."""
        return _Ellipse(self.cx, self.cy + dy, self.a, self.b)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean (len(y), len(x)) grid: which points of the grid x by y lie inside."""
        dx = ((x - self.cx) / self.a) ** 2
        dy = ((y - self.cy) / self.b) ** 2
        return (dy[:, None] + dx[None, :]) <= 1.0


@dataclass(frozen=True)
class _Anatomy:
    """One axial slice's structures, in mm relative to the image centre."""

    body: _Ellipse
    subcutaneous: _Ellipse
    wall: _Ellipse
    cavity: _Ellipse
    vertebra: _Ellipse
    arch: _Ellipse | None
    psoas: tuple[_Ellipse, _Ellipse]
    lining_mm: float
    frame: float
    vat_mm2: float


@dataclass(frozen=True)
class _Traits:
    """Patient-level shape variation: the same patient looks the same on every slice and every scan."""

    cavity_aspect: float
    wall_lateral: float
    sat_anterior: float
    psoas_fraction: float
    vertebra_scale: float
    organ_scale: float
    sat_hu: float
    vat_hu: float
    area_phases: tuple[float, float, float]
    field_x: np.ndarray
    field_y: np.ndarray
    gas: np.ndarray


@functools.lru_cache(maxsize=256)
def _traits(subject: ImagingSubject) -> _Traits:
    """Draw a patient's anatomy from their identity, so it does not depend on which scan this is."""
    rng = np.random.default_rng(_stable_int("anatomy", subject.mrn, subject.birth_date.isoformat(), subject.sex))
    terms = 6
    return _Traits(
        cavity_aspect=float(rng.uniform(1.35, 1.55)),
        wall_lateral=float(rng.uniform(1.5, 2.1)),
        sat_anterior=float(rng.uniform(1.05, 1.3)),
        psoas_fraction=float(rng.uniform(0.10, 0.13) if subject.sex == "M" else rng.uniform(0.08, 0.11)),
        vertebra_scale=float(rng.uniform(0.92, 1.08)),
        organ_scale=float(rng.uniform(0.9, 1.1)),
        sat_hu=float(rng.uniform(-108.0, -96.0)),
        vat_hu=float(rng.uniform(-98.0, -86.0)),
        area_phases=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 6.3))),
        # Rows: spatial frequency (rad/mm), phase, drift of the phase along z (rad/mm), weight.
        field_x=np.stack(
            [
                2 * np.pi / rng.uniform(25, 70, terms),
                rng.uniform(0, 2 * np.pi, terms),
                rng.uniform(-0.08, 0.08, terms),
                rng.uniform(0.5, 1.0, terms),
            ]
        ),
        field_y=np.stack(
            [
                2 * np.pi / rng.uniform(25, 70, terms),
                rng.uniform(0, 2 * np.pi, terms),
                rng.uniform(-0.08, 0.08, terms),
                np.ones(terms),
            ]
        ),
        # Bowel gas pockets: x, y as fractions of the cavity's semi-axes, radius in mm, z extent in mm.
        gas=np.column_stack(
            [rng.uniform(-0.6, 0.6, 5), rng.uniform(-0.7, 0.0, 5), rng.uniform(2.0, 5.0, 5), rng.uniform(-12, 12, 5)]
        ),
    )


def _slice_offset_mm(profile: ImagingProfile, slice_index: int) -> float:
    """Distance of slice `slice_index` above the middle of the series (slice 0 is the most superior)."""
    if not 0 <= slice_index < profile.slices:
        raise ValueError(f"slice_index {slice_index} outside 0..{profile.slices - 1}")
    return ((profile.slices - 1) / 2.0 - slice_index) * profile.slice_thickness_mm


def _minimum_gap_mm(spacing_mm: float) -> float:
    """Narrowest layer of fat that keeps two soft-tissue structures apart once rasterised.

    Pixels whose centres lie more than one spacing apart are not 4-neighbours, so a fat layer
    thicker than a pixel separates; half a pixel more absorbs the ellipse-offset approximation.
    """
    return 1.5 * spacing_mm / OFFSET_GAP_FACTOR


def _minimum_wall_mm(spacing_mm: float) -> float:
    """Thinnest muscle wall that stays one 4-connected ring once rasterised."""
    return 2.0 * spacing_mm / OFFSET_GAP_FACTOR


def _fine_area_mm2(target: _Ellipse, inside: _Ellipse | None = None, outside: tuple[_Ellipse, ...] = ()) -> float:
    """Area of target, within `inside` and outside every ellipse of `outside`, integrated on a 0.5 mm grid."""
    step = 0.5
    x = np.arange(target.cx - target.a, target.cx + target.a, step) + step / 2
    y = np.arange(target.cy - target.b, target.cy + target.b, step) + step / 2
    mask = target.contains(x, y)
    if inside is not None:
        mask &= inside.contains(x, y)
    for other in outside:
        mask &= ~other.contains(x, y)
    return float(np.count_nonzero(mask)) * step * step


def _positive_root(a: float, b: float, c: float) -> float:
    """The larger root of a x^2 + b x + c = 0 (a >= 0; a linear equation when a == 0)."""
    if a == 0.0:
        return -c / b
    return (-b + math.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)


@functools.lru_cache(maxsize=256)
def _slice_anatomy(subject: ImagingSubject, spacing_mm: float, z_mm: float) -> _Anatomy:
    """The slice's structures; cached because fitting the field of view and rendering both need them."""
    return _layout(subject, _traits(subject), spacing_mm, z_mm)


def _layout(subject: ImagingSubject, traits: _Traits, spacing_mm: float, z_mm: float) -> _Anatomy:
    """Solve the slice's ellipses so VAT, SAT and muscle areas match the subject's at height z_mm.

    Built from the inside out: cavity (VAT, organs, the inner parts of psoas and vertebra), muscle
    wall (thin anterior, thicker lateral, thick posterior where the paraspinal muscles are),
    subcutaneous fat, skin. Each outer size is the root of a quadratic in its thickness.
    """
    frame = subject.height_cm / 175.0
    gap = _minimum_gap_mm(spacing_mm)
    thinnest_wall = _minimum_wall_mm(spacing_mm)
    # Areas drift by a few per cent along z, as they do between neighbouring slices.
    p_vat, p_sat, p_muscle = traits.area_phases
    vat = 100.0 * subject.visceral_fat_cm2 * (1.0 + 0.025 * math.sin(z_mm / 20.0 + p_vat))
    sat = 100.0 * subject.subcutaneous_fat_cm2 * (1.0 + 0.02 * math.sin(z_mm / 25.0 + p_sat))
    muscle = 100.0 * subject.muscle_cm2 * (1.0 + 0.015 * math.sin(z_mm / 30.0 + p_muscle))

    # Psoas grows toward the pelvis (caudal, negative z).
    psoas_each = traits.psoas_fraction * (1.0 - 0.006 * z_mm) * muscle / 2.0
    psoas_b = math.sqrt(psoas_each / (math.pi * 0.85))
    psoas_a = 0.85 * psoas_b
    vertebra_a, vertebra_b = 23.0 * frame * traits.vertebra_scale, 16.0 * frame * traits.vertebra_scale
    organs = 14000.0 * frame**2 * traits.organ_scale

    # Visceral obesity deepens the abdomen front to back.
    aspect = traits.cavity_aspect - 0.12 * min(vat / 20000.0, 1.5)
    cavity_area = vat + organs + 0.6 * math.pi * vertebra_a * vertebra_b + 1.5 * psoas_each
    cavity_b = math.sqrt(cavity_area / (math.pi * aspect))
    cavity = _Ellipse(0.0, 0.0, aspect * cavity_b, cavity_b)
    vertebra = _Ellipse(0.0, cavity_b - 0.35 * vertebra_b, vertebra_a, vertebra_b)
    psoas_x = vertebra_a + 0.55 * psoas_a
    rim_y = cavity.b * math.sqrt(max(1.0 - (psoas_x / cavity.a) ** 2, 0.05))
    psoas = (
        _Ellipse(-psoas_x, rim_y - 0.3 * psoas_b, psoas_a, psoas_b),
        _Ellipse(psoas_x, rim_y - 0.3 * psoas_b, psoas_a, psoas_b),
    )
    psoas_inside = sum(_fine_area_mm2(p, inside=cavity, outside=(vertebra,)) for p in psoas)
    vertebra_outside = _fine_area_mm2(vertebra, outside=(cavity,))

    # Wall thickness: k anterior, lateral * k at the sides, 5k posterior.
    lateral = traits.wall_lateral
    arch: _Ellipse | None = None
    for _ in range(2):  # the spinous process takes muscle area, and its length depends on the wall
        ring = muscle - psoas_inside + vertebra_outside + (arch.area if arch else 0.0)
        k = max(_positive_root(3.0 * lateral, 3.0 * cavity.a + lateral * cavity.b, -ring / math.pi), thinnest_wall)
        posterior_room = cavity.b + 5.0 * k - (vertebra.cy + vertebra.b) - gap
        length = min(28.0 * frame, posterior_room)
        # The spinous process starts 1 mm inside the vertebral body so the bone is one piece.
        arch_cy = vertebra.cy + vertebra.b + length / 2 - 1.0
        arch = _Ellipse(0.0, arch_cy, 5.0 * frame, length / 2) if length > 4 else None
    wall = _Ellipse(0.0, 2.0 * k, cavity.a + lateral * k, cavity.b + 3.0 * k)

    # SAT thickness: u at the sides, traits.sat_anterior * u in front, the rest of 2u behind.
    u = _positive_root(1.0, wall.a + wall.b, -sat / math.pi)
    posterior_share = 2.0 - traits.sat_anterior
    u = max(u, gap / posterior_share)
    subcutaneous = _Ellipse(0.0, wall.cy - (traits.sat_anterior - 1.0) * u, wall.a + u, wall.b + u)
    body = subcutaneous.grown(SKIN_MM)

    # About a fifth of VAT lines the cavity (preperitoneal and retroperitoneal fat).
    lining = max(gap, min(8.0, 0.2 * vat / (math.pi * (cavity.a + cavity.b))))
    centre = -body.cy
    return _Anatomy(
        body=body.shifted(centre),
        subcutaneous=subcutaneous.shifted(centre),
        wall=wall.shifted(centre),
        cavity=cavity.shifted(centre),
        vertebra=vertebra.shifted(centre),
        arch=arch.shifted(centre) if arch else None,
        psoas=(psoas[0].shifted(centre), psoas[1].shifted(centre)),
        lining_mm=lining,
        frame=frame,
        vat_mm2=vat,
    )


class _Canvas:
    """A label image on the scanner's pixel grid, painted one ellipse at a time."""

    def __init__(self, matrix: int, spacing_mm: float) -> None:
        self.spacing = spacing_mm
        self.coords = ((np.arange(matrix) - (matrix - 1) / 2.0) * spacing_mm).astype(np.float32)
        self.labels = np.full((matrix, matrix), AIR, dtype=np.uint8)

    def window(self, e: _Ellipse) -> tuple[slice, slice]:
        """Rows and columns of the pixels that can fall inside `e`."""
        half = (len(self.coords) - 1) / 2.0
        n = len(self.coords)

        def span(centre: float, semi: float) -> slice:
            lo = max(0, math.ceil((centre - semi) / self.spacing + half))
            hi = min(n, math.floor((centre + semi) / self.spacing + half) + 1)
            return slice(lo, max(lo, hi))

        return span(e.cy, e.b), span(e.cx, e.a)

    def mask(self, e: _Ellipse, rows: slice, cols: slice) -> np.ndarray:
        """Which pixels of the window rows x cols lie inside `e`."""
        return e.contains(self.coords[cols], self.coords[rows])

    def paint(self, e: _Ellipse, label: int, only: int | None = None) -> None:
        """Give the pixels inside `e` the label, optionally only those currently labelled `only`."""
        rows, cols = self.window(e)
        inside = self.mask(e, rows, cols)
        view = self.labels[rows, cols]
        if only is not None:
            inside &= view == only
        view[inside] = label


def _smooth_field(traits: _Traits, x: np.ndarray, y: np.ndarray, z_mm: float) -> np.ndarray:
    """Smooth random field on the grid x by y: a sum of separable cosines, so one small matrix product."""
    fx, fy = traits.field_x, traits.field_y
    across = np.cos(np.outer(fx[0], x) + (fx[1] + fx[2] * z_mm)[:, None]) * fx[3][:, None]
    down = np.cos(np.outer(y, fy[0]) + (fy[1] + fy[2] * z_mm)[None, :])
    return (down @ across).astype(np.float32)


def _fill_cavity(canvas: _Canvas, anatomy: _Anatomy, traits: _Traits, z_mm: float) -> tuple[slice, slice, np.ndarray]:
    """Turn the fat-filled cavity into organs and bowel, leaving exactly the slice's VAT as fat.

    Organs keep a lining of fat against the muscle wall, psoas and vertebra (peritoneal and
    retroperitoneal fat), so soft tissue inside the cavity never touches muscle. Inside that
    zone, mesenteric fat is the top part of a smooth random field, cut at the quantile that makes
    the fat pixel count exact. Returns the cavity's window and the HU of its organ pixels (NaN elsewhere).
    """
    cavity = anatomy.cavity
    lining = anatomy.lining_mm
    rows, cols = canvas.window(cavity)
    x, y = canvas.coords[cols], canvas.coords[rows]
    view = canvas.labels[rows, cols]
    zone = cavity.grown(-lining).contains(x, y)
    for solid in (anatomy.vertebra, *anatomy.psoas):
        zone &= ~solid.grown(lining).contains(x, y)
    zone &= view == VAT

    f = anatomy.frame
    vertebra, left_psoas = anatomy.vertebra, anatomy.psoas[1]
    front = vertebra.cy - vertebra.b - lining
    liver = max(0.0, min(1.0, 0.5 + z_mm / 30.0))
    solid_organs = [
        (_Ellipse(0.35 * vertebra.a, front - 11.0 * f - 1.0, 11.0 * f, 11.0 * f), 42.0),  # aorta
        (_Ellipse(-1.1 * vertebra.a, front - 9.0 * f - 1.0, 12.0 * f, 8.0 * f), 38.0),  # inferior vena cava
    ]
    for side in (-1.0, 1.0):  # lower poles of the kidneys
        solid_organs.append(
            (_Ellipse(side * (left_psoas.cx + left_psoas.a + 24.0 * f), left_psoas.cy - 8.0 * f, 20 * f, 26 * f), 32.0)
        )
    if liver > 0:  # tip of the right lobe, on the image's left
        solid_organs.append(
            (_Ellipse(cavity.cx - cavity.a + 45 * f, cavity.cy - 0.15 * cavity.b, 45 * f * liver, 55 * f * liver), 58.0)
        )
    organ_hu = np.full(view.shape, np.nan, dtype=np.float32)
    for organ, hu in solid_organs:
        organ_hu[organ.contains(x, y) & zone] = hu

    field = _smooth_field(traits, x, y, z_mm)
    vat_now = int(np.count_nonzero(view == VAT))
    target = int(round(anatomy.vat_mm2 / canvas.spacing**2))
    eligible = zone & np.isnan(organ_hu)
    need = target - vat_now + int(np.count_nonzero(zone))
    values = field[eligible]
    need = min(max(need, 0), values.size)
    fat = np.zeros_like(zone)
    if need:
        threshold = np.partition(values, values.size - need)[values.size - need]
        fat = eligible & (field >= threshold)
    bowel = eligible & ~fat
    organ_hu[bowel] = 30.0 + 12.0 * np.tanh(field[bowel])
    soft = zone & ~fat
    view[soft] = ORGAN
    organ_hu[~soft] = np.nan

    for gx, gy, radius, z_extent in traits.gas:
        r = radius * (1.0 - min(1.0, abs(z_mm - z_extent) / 15.0))
        if r > canvas.spacing:
            pocket = _Ellipse(cavity.cx + gx * cavity.a, cavity.cy + gy * cavity.b, r, r)
            gas_rows, gas_cols = canvas.window(pocket)
            gas_view = canvas.labels[gas_rows, gas_cols]
            inside = canvas.mask(pocket, gas_rows, gas_cols) & (gas_view == ORGAN)
            gas_view[inside] = GAS
    return rows, cols, organ_hu


def render_slice(
    subject: ImagingSubject, profile: ImagingProfile, slice_index: int, rng: np.random.Generator
) -> np.ndarray:
    """Return a (matrix, matrix) float32 image in Hounsfield units of one axial slice near L3.

    Air outside an elliptical body whose size follows from the patient's areas (and so from
    weight and height), skin, a subcutaneous fat ring, a closed muscle wall (thin in front,
    thick behind), and inside it VAT (lining fat and mesenteric fat), organs and bowel
    (+30..+60 HU, with gas), a vertebral body with its spinous process (cortex +700, marrow
    +400 HU) and the psoas muscles. VAT, SAT and muscle areas measured at the profile's pixel
    spacing match the subject's within a few per cent; they drift by a few per cent along z and
    the mesenteric pattern changes between slices. The anatomy is a function of the patient;
    `rng` draws only the acquisition's Gaussian noise (10 HU sd, cut at 4.3 sd); with muscle_hu
    above about 14 HU, noise never carries a pixel across the fat/muscle thresholds.

    Floors: the renderer keeps about two pixels of fat between skin and wall and between wall
    and organs, and a wall at least about two pixels thick, so for a very lean or small patient
    imaged at a coarse spacing, SAT, VAT or muscle comes out above the subject's value.
    Raises ValueError when the body does not fit the field of view (matrix x spacing).
    """
    spacing = profile.pixel_spacing_mm
    z_mm = _slice_offset_mm(profile, slice_index)
    traits = _traits(subject)
    anatomy = _slice_anatomy(subject, spacing, z_mm)
    field_of_view = profile.matrix * spacing
    if _needed_field_of_view_mm(anatomy) > field_of_view:
        raise ValueError(
            f"the body ({2 * anatomy.body.a:.0f} x {2 * anatomy.body.b:.0f} mm) does not fit the "
            f"{field_of_view:.0f} mm field of view of {profile.station_name}; widen pixel_spacing_mm"
        )

    canvas = _Canvas(profile.matrix, spacing)
    canvas.paint(anatomy.body, SKIN)
    canvas.paint(anatomy.subcutaneous, SAT)
    canvas.paint(anatomy.wall, MUSCLE)
    canvas.paint(anatomy.cavity, VAT)
    for psoas in anatomy.psoas:
        canvas.paint(psoas, MUSCLE, only=VAT)
    canvas.paint(anatomy.vertebra, CORTEX)
    canvas.paint(anatomy.vertebra.grown(-CORTEX_MM), MARROW)
    if anatomy.arch is not None:
        canvas.paint(anatomy.arch, CORTEX)
    rows, cols, organ_hu = _fill_cavity(canvas, anatomy, traits, z_mm)

    lut = np.zeros(GAS + 1, dtype=np.float32)
    for label, hu in TISSUE_HU.items():
        lut[label] = hu
    lut[SAT], lut[VAT], lut[MUSCLE] = traits.sat_hu, traits.vat_hu, subject.muscle_hu
    image = np.take(lut, canvas.labels)
    np.copyto(image[rows, cols], organ_hu, where=canvas.labels[rows, cols] == ORGAN)
    image += np.take(_NOISE_TABLE_HU, rng.integers(0, 2**16, image.shape, dtype=np.uint16))
    return image


def write_ct_series(folder: Path, subject: ImagingSubject, profile: ImagingProfile, *, seed: int) -> list[Path]:
    """Write one CT series, one file per slice (IM000001.dcm, ...), under `folder`; return the paths.

    Deterministic: the same subject, profile and seed give byte-identical files. If the body
    does not fit the profile's field of view, the series is reconstructed with a wider one, as
    a technologist would, and PixelSpacing records it (up to 500 mm, beyond which it raises).
    """
    profile = _fitted_profile(subject, profile)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _stable_int("noise", subject.mrn, subject.accession_number)])
    uids = _SeriesUids.draw(subject, profile, seed)
    ds = _series_dataset(subject, profile, uids, seed)
    paths = []
    for index in range(profile.slices):
        hu = render_slice(subject, profile, index, rng)
        _set_instance(ds, subject, profile, uids, index, _stored_values(hu, profile))
        path = folder / f"IM{index + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _fitted_profile(subject: ImagingSubject, profile: ImagingProfile) -> ImagingProfile:
    """The profile, with its display field of view widened in 10 mm steps if the body needs it."""
    fitted = profile
    while True:
        needed = max(
            _needed_field_of_view_mm(_slice_anatomy(subject, fitted.pixel_spacing_mm, _slice_offset_mm(fitted, i)))
            for i in range(fitted.slices)
        )
        if needed <= fitted.matrix * fitted.pixel_spacing_mm:
            return fitted
        field_of_view = max(
            math.ceil(needed / FIELD_OF_VIEW_STEP_MM) * FIELD_OF_VIEW_STEP_MM,
            fitted.matrix * fitted.pixel_spacing_mm + FIELD_OF_VIEW_STEP_MM,
        )
        if field_of_view > MAX_FIELD_OF_VIEW_MM:
            raise ValueError(f"the body needs a {needed:.0f} mm field of view, wider than the scanner's 500 mm")
        # The DS string is what readers get, so render at exactly that spacing.
        fitted = replace(profile, pixel_spacing_mm=float(_ds(field_of_view / profile.matrix)))


def _needed_field_of_view_mm(anatomy: _Anatomy) -> float:
    """Side of the smallest square field of view that holds the body with a margin."""
    return 2.0 * (max(anatomy.body.a, anatomy.body.b) + BODY_MARGIN_MM)


def _stored_values(hu: np.ndarray, profile: ImagingProfile) -> np.ndarray:
    """Stored pixel values: round((HU - intercept) / slope), clipped to what bits_stored can hold."""
    scaled = hu - np.float32(profile.rescale_intercept)
    scaled *= np.float32(1.0 / profile.rescale_slope)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 2**profile.bits_stored - 1, out=scaled)
    return scaled.astype("<u2")


@dataclass(frozen=True)
class _SeriesUids:
    """The UIDs of one series, drawn deterministically from the seed and the patient."""

    study: UID
    series: UID
    frame_of_reference: UID
    instance_root: tuple[str, ...]

    @classmethod
    def draw(cls, subject: ImagingSubject, profile: ImagingProfile, seed: int) -> _SeriesUids:
        """Hash the seed, the patient and the scanner into study, series and frame-of-reference UIDs."""
        root = (str(seed), subject.mrn, subject.accession_number, profile.station_name)
        return cls(
            study=generate_uid(entropy_srcs=[*root, "study"]),
            series=generate_uid(entropy_srcs=[*root, "series"]),
            frame_of_reference=generate_uid(entropy_srcs=[*root, "frame-of-reference"]),
            instance_root=root,
        )

    def instance(self, index: int) -> UID:
        """SOP Instance UID of slice `index`."""
        return generate_uid(entropy_srcs=[*self.instance_root, "instance", str(index)])


def _series_dataset(subject: ImagingSubject, profile: ImagingProfile, uids: _SeriesUids, seed: int) -> Dataset:
    """Everything a series' files share: patient, study, series, equipment, request and private data."""
    when = subject.study_datetime
    syntax = TRANSFER_SYNTAXES[profile.transfer_syntax]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["implementation", profile.manufacturer, profile.model])
    meta.ImplementationVersionName = ("".join(c for c in profile.model.upper() if c.isalnum())[:12] + "_V1")[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(when), _tm(when)
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate, ds.StudyTime = _da(when), _tm(when)
    series_at = when + datetime.timedelta(minutes=2)
    ds.SeriesDate, ds.SeriesTime = _da(series_at), _tm(series_at)
    acquired = when + datetime.timedelta(minutes=3)
    ds.AcquisitionDate, ds.AcquisitionTime = _da(acquired), _tm(acquired)
    ds.AccessionNumber = subject.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution_name
    ds.InstitutionAddress = _institution_address(profile.institution_name)
    ds.ReferringPhysicianName = subject.referring_physician
    ds.StationName = profile.station_name
    ds.ProcedureCodeSequence = Sequence([_code("74150", "CPT4", "CT abdomen w/o contrast")])
    ds.StudyDescription = "CT ABDOMEN W/O CONTRAST"
    ds.SeriesDescription = f"AXIAL {profile.slice_thickness_mm:g}MM L3 BODY COMPOSITION"
    radiologist = _STAFF[_stable_int("radiologist", profile.institution_name, subject.accession_number) % len(_STAFF)]
    operator = _STAFF[_stable_int("operator", profile.station_name, subject.accession_number) % len(_STAFF)]
    ds.PerformingPhysicianName = f"{radiologist[0]}^{radiologist[1]}"
    ds.OperatorsName = f"{operator[0]}^{operator[1]}"
    ds.ManufacturerModelName = profile.model

    ds.PatientName = f"{subject.family_name}^{subject.given_name}"
    ds.PatientID = subject.mrn
    ds.IssuerOfPatientID = profile.institution_name
    ds.PatientBirthDate = _da(subject.birth_date)
    ds.PatientSex = subject.sex
    ds.OtherPatientIDsSequence = Sequence([_other_patient_id(subject, profile)])
    ds.PatientAge = _age_string(subject.birth_date, when.date())
    ds.PatientSize = _ds(subject.height_cm / 100.0)
    ds.PatientWeight = _ds(subject.body_weight_kg)

    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = _ds(profile.slice_thickness_mm)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = str(100000 + _stable_int("serial", profile.manufacturer, profile.station_name) % 900000)
    ds.SoftwareVersions = f"{profile.model} VA{1 + _stable_int('sw', profile.model) % 9}"
    ds.ReconstructionDiameter = _ds(profile.matrix * profile.pixel_spacing_mm)
    ds.XRayTubeCurrent = 150 + _stable_int("mA", str(seed), subject.mrn) % 200
    ds.ConvolutionKernel = _KERNELS.get(profile.manufacturer.split()[0].upper(), "STANDARD")
    ds.PatientPosition = "HFS"

    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.StudyID = str(10000 + _stable_int("study id", profile.station_name, subject.accession_number) % 90000)
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = profile.slices

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [_ds(profile.pixel_spacing_mm), _ds(profile.pixel_spacing_mm)]
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = _ds(profile.rescale_intercept)
    ds.RescaleSlope = _ds(profile.rescale_slope)
    ds.RescaleType = "HU"

    ds.RequestAttributesSequence = Sequence([_request_attributes(subject, uids)])

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, VR.PN, ds.PatientName)
    block.add_new(0x02, VR.LO, subject.mrn)
    block.add_new(
        0x03,
        VR.LT,
        f"Pt {subject.given_name} {subject.family_name} ({subject.mrn}) consented for body composition CT; "
        f"prior imaging requested by Dr {subject.referring_physician.split('^')[0]}.",
    )
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """A coded entry item (Code Sequence Macro)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _other_patient_id(subject: ImagingSubject, profile: ImagingProfile) -> Dataset:
    """The hospital's MRN again, as its enterprise index lists it."""
    item = Dataset()
    item.PatientID = subject.mrn
    item.IssuerOfPatientID = f"{profile.institution_name} MPI"
    item.TypeOfPatientID = "TEXT"
    return item


def _request_attributes(subject: ImagingSubject, uids: _SeriesUids) -> Dataset:
    """The order this series answers: requested procedure, scheduled step and the referenced study."""
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, still sent)
    study.ReferencedSOPInstanceUID = uids.study
    item = Dataset()
    item.AccessionNumber = subject.accession_number
    item.ReferencedStudySequence = Sequence([study])
    item.StudyInstanceUID = uids.study
    item.RequestedProcedureDescription = "CT ABDOMEN W/O CONTRAST"
    item.ScheduledProcedureStepDescription = "CT ABDOMEN L3 BODY COMPOSITION"
    item.ScheduledProcedureStepID = ("S" + subject.accession_number)[-16:]
    item.RequestedProcedureID = ("R" + subject.accession_number)[-16:]
    return item


def _set_instance(
    ds: Dataset, subject: ImagingSubject, profile: ImagingProfile, uids: _SeriesUids, index: int, stored: np.ndarray
) -> None:
    """Fill in what differs from slice to slice: UIDs, position, content time and pixel data."""
    uid = uids.instance(index)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = TRANSFER_SYNTAXES[profile.transfer_syntax]
    ds.SOPInstanceUID = uid
    content = subject.study_datetime + datetime.timedelta(minutes=3, seconds=index)
    ds.ContentDate, ds.ContentTime = _da(content), _tm(content)
    ds.InstanceNumber = index + 1
    z = L3_TABLE_POSITION_MM + _slice_offset_mm(profile, index)
    corner = -(profile.matrix - 1) / 2.0 * profile.pixel_spacing_mm
    ds.ImagePositionPatient = [_ds(corner), _ds(corner), _ds(z)]
    ds.SliceLocation = _ds(z)
    ds.set_pixel_data(stored, "MONOCHROME2", profile.bits_stored, generate_instance_uid=False)
    if profile.transfer_syntax == "RLELossless":
        # pylibjpeg-rle's compiled encoder; pydicom's own RLE encoder is pure Python (~190 ms a slice).
        ds.compress(RLELossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def corrupt_dicom(path: Path, *, mode: str, rng: np.random.Generator) -> str:
    """Damage a written DICOM file in place like a broken transfer; return a one-line description.

    "truncated" cuts the file inside the pixel data, "garbage_header" overwrites the preamble,
    the DICM magic and the start of the file meta group with random bytes, "zero_length" empties
    the file. Each leaves a file on which pydicom.dcmread, or reading its pixel_array, raises.
    """
    data = path.read_bytes()
    if mode == "truncated":
        start = _pixel_data_value_offset(data)
        cut = start + int(rng.integers(1, max(2, (len(data) - start) * 3 // 4)))
        path.write_bytes(data[:cut])
        return f"{path.name}: transfer cut at byte {cut} of {len(data)}, inside the pixel data"
    if mode == "garbage_header":
        length = 128 + 4 + int(rng.integers(8, 48))
        garbage = bytearray(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
        if garbage[128:132] == b"DICM":
            garbage[128] ^= 0xFF
        path.write_bytes(bytes(garbage) + data[length:])
        return f"{path.name}: first {length} bytes (preamble, DICM magic, file meta start) overwritten with noise"
    if mode == "zero_length":
        path.write_bytes(b"")
        return f"{path.name}: empty file (0 of {len(data)} bytes arrived)"
    raise ValueError(f"unknown corruption mode {mode!r}; choose one of {CORRUPTION_MODES}")


def _pixel_data_value_offset(data: bytes) -> int:
    """Byte offset where the value of the top-level Pixel Data element starts."""
    # The first occurrence after the preamble: the same four bytes may recur inside the pixel data.
    tag = data.find(b"\xe0\x7f\x10\x00", 132)
    if tag < 0:
        raise ValueError("no Pixel Data element in the file")
    explicit = data[tag + 4 : tag + 6] in (b"OB", b"OW")
    return tag + (12 if explicit else 8)


def _stable_int(*parts: str) -> int:
    """A 63-bit integer hashed from strings: the same on every run and machine, unlike hash()."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_sex(sex: str) -> None:
    """Reject anything but the two values DICOM PatientSex and the demo records use here."""
    if sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {sex!r}")


def _institution_address(institution: str) -> str:
    """A fictional but stable street address for the hospital."""
    h = _stable_int("address", institution)
    return f"{1 + h % 240} {_STREETS[h % len(_STREETS)]}, {_TOWNS[(h >> 8) % len(_TOWNS)]}"


def _da(day: datetime.date | datetime.datetime) -> str:
    """DICOM DA value."""
    return day.strftime("%Y%m%d")


def _tm(moment: datetime.datetime) -> str:
    """DICOM TM value, whole seconds."""
    return moment.strftime("%H%M%S")


def _ds(value: float) -> str:
    """DICOM DS value: at most 16 characters, no float noise such as 0.7800000000000001."""
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


def _age_string(birth: datetime.date, on: datetime.date) -> str:
    """DICOM AS value: years from age 2, else months, else days."""
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    if years >= 2:
        return f"{min(years, 999):03d}Y"
    months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
    if months >= 1:
        return f"{months:03d}M"
    return f"{max((on - birth).days, 0):03d}D"
