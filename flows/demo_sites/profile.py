"""Site profiles: one TOML file per demo hospital under infra/sites/, validated with clear errors."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from flows.config_files import SiteId, StrictModel, TimeZoneName, load_toml_model
from models.uva_padova.params import COHORTS
from models.uva_padova.sensor import sensor_names

DEFAULT_PROFILES_DIR = Path(__file__).resolve().parents[2] / "infra" / "sites"
FAULT_KINDS = (
    "duplicate_row",
    "impossible_value",
    "unit_mixup",
    "missing_timestamp",
    "garbled_timestamp",
    "clock_shift",
    "truncated_line",
    "malformed_line",
    "corrupted_dicom",
    "phi_in_free_text",
)
TEXT_ONLY_FAULTS = ("truncated_line", "malformed_line")


class SiteInfo(StrictModel):
    """Who the hospital is."""

    id: SiteId
    name: str
    kind: str
    seed: int
    locale: str = "en_US"
    mrn_prefix: str = Field(pattern=r"^[A-Z]{2,6}$")


class CohortSpec(StrictModel):
    """Which patients the hospital treats, for how long, with which devices."""

    patients: int = Field(ge=1, le=100_000)
    days: int = Field(ge=1, le=366)
    start: date
    mix: dict[str, float]
    sensor: str
    pump: str = "Insulet"

    @field_validator("mix")
    @classmethod
    def _known_cohorts(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = set(mix) - set(COHORTS)
        if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
            raise ValueError(f"mix must give non-negative weights to some of {list(COHORTS)}, got {mix}")
        return mix

    @field_validator("sensor")
    @classmethod
    def _known_sensor(cls, sensor: str) -> str:
        if sensor not in sensor_names():
            raise ValueError(f"unknown sensor {sensor!r}; simglucose has {sensor_names()}")
        return sensor


class ExportSpec(StrictModel):
    """How the hospital exports: format, units, time zone, its own column names and codes."""

    format: Literal["fhir", "csv", "parquet"]
    time_zone: TimeZoneName
    glucose_unit: Literal["mg/dL", "mmol/L"] = "mg/dL"
    weight_unit: Literal["kg", "lb"] = "kg"
    timestamp_format: str = "%Y-%m-%dT%H:%M:%S"
    csv_columns: dict[str, dict[str, str]] = Field(default_factory=dict)
    local_codes: dict[str, str] = Field(default_factory=dict)


class ImagingSpec(StrictModel):
    """The hospital's CT acquisition settings."""

    manufacturer: str
    model: str
    institution_name: str
    station_name: str
    matrix: int = Field(ge=64, le=1024)
    pixel_spacing_mm: float = Field(gt=0.2, le=3.0)
    slice_thickness_mm: float = Field(gt=0.2, le=10.0)
    slices: int = Field(ge=1, le=50)
    rescale_slope: float = Field(gt=0)
    rescale_intercept: float
    bits_stored: Literal[12, 16]
    transfer_syntax: Literal["ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "RLELossless"]


class SiteProfile(StrictModel):
    """One demo hospital: identity, cohort, export conventions, imaging and fault rates."""

    site: SiteInfo
    cohort: CohortSpec
    export: ExportSpec
    imaging: ImagingSpec
    faults: dict[str, float] = Field(default_factory=dict)

    @field_validator("faults")
    @classmethod
    def _known_faults(cls, faults: dict[str, float]) -> dict[str, float]:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {list(FAULT_KINDS)}")
        bad = {k: v for k, v in faults.items() if not 0.0 <= v <= 0.5}
        if bad:
            raise ValueError(f"fault rates must be between 0 and 0.5, got {bad}")
        return faults

    @model_validator(mode="after")
    def _faults_fit_format(self) -> SiteProfile:
        if self.export.format == "parquet":
            wrong = [k for k in TEXT_ONLY_FAULTS if self.faults.get(k, 0) > 0]
            if wrong:
                raise ValueError(f"{wrong} are faults of line-based text files; a parquet export cannot have them")
        return self

    def with_overrides(self, *, patients: int | None = None, days: int | None = None) -> SiteProfile:
        """The same profile with a different patient count or number of days."""
        changes = {k: v for k, v in {"patients": patients, "days": days}.items() if v is not None}
        return self.model_copy(update={"cohort": self.cohort.model_copy(update=changes)})


class ProfileError(ValueError):
    """A site profile file that cannot be used, with the file and field named."""


def load_profile(path: Path) -> SiteProfile:
    """Read and validate one site profile; errors name the file and the offending field."""
    return load_toml_model(path, SiteProfile, ProfileError)


def load_profiles(folder: Path = DEFAULT_PROFILES_DIR) -> list[SiteProfile]:
    """Load every *.toml profile in `folder`, sorted by site id; site ids must be unique."""
    paths = sorted(folder.glob("*.toml"))
    if not paths:
        raise ProfileError(f"{folder}: no site profiles (*.toml) found")
    profiles = [load_profile(p) for p in paths]
    ids = [p.site.id for p in profiles]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ProfileError(f"{folder}: site ids must be unique, repeated: {duplicates}")
    return sorted(profiles, key=lambda p: p.site.id)
