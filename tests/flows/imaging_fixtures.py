"""Shared builders of CT acquisition profiles and imaged subjects for the imaging tests."""

from __future__ import annotations

import dataclasses
import datetime
import re

from flows.demo_sites.imaging import ImagingProfile, ImagingSubject


def make_profile(**changes: object) -> ImagingProfile:
    """Northbridge's CT (384 x 1.0 mm, explicit VR), with `changes` applied."""
    base = ImagingProfile(
        manufacturer="SIEMENS",
        model="SOMATOM go.Up",
        institution_name="Northbridge General Hospital",
        station_name="NGHCT2",
        matrix=384,
        pixel_spacing_mm=1.0,
        slice_thickness_mm=5.0,
        slices=3,
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        bits_stored=16,
        transfer_syntax="ExplicitVRLittleEndian",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def make_subject(**changes: object) -> ImagingSubject:
    """An adult woman with average body composition, with `changes` applied."""
    base = ImagingSubject(
        mrn="NGH0012345",
        family_name="Okonkwo",
        given_name="Adaeze",
        birth_date=datetime.date(1968, 5, 17),
        sex="F",
        study_datetime=datetime.datetime(2025, 3, 14, 9, 41, 7),
        referring_physician="Whitfield^Marcus",
        accession_number="NGHA000123",
        body_weight_kg=82.0,
        height_cm=166.0,
        visceral_fat_cm2=110.0,
        subcutaneous_fat_cm2=260.0,
        muscle_cm2=125.0,
        muscle_hu=36.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def leaked(values: set[str], data: bytes) -> set[str]:
    """Values of at least 4 characters found in the raw bytes (digits only where not part of a longer number)."""
    text = data.decode("latin-1")
    found = set()
    for value in values:
        if len(value) < 4:  # shorter strings turn up by chance in compressed pixel data
            continue
        pattern = re.escape(value.encode("utf-8").decode("latin-1"))
        if value.isdigit():
            pattern = rf"(?<!\d){pattern}(?!\d)"
        if re.search(pattern, text):
            found.add(value)
    return found
