"""Site mapping files: how to read one hospital's export, validated with errors naming file and field.

Onboarding a hospital that exports FHIR NDJSON, CSV or Parquet means writing one of these files
(see infra/mappings/*.toml), not code: which file holds what, which column (or JSONPath) is the
patient, the time, the value, the unit and the code, how the site spells its units and codes,
and the site's time zone and timestamp format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.vocabulary import MEASUREMENTS, UNIT_CONCEPTS, UNIT_CONVERSIONS
from flows.config_files import SiteId, StrictModel, TimeZoneName, load_toml_model

DEFAULT_MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "infra" / "mappings"
KNOWN_UNITS = set(UNIT_CONCEPTS) | {source for source, _ in UNIT_CONVERSIONS}


class SiteFormat(StrictModel):
    """The export's format, clock and date conventions."""

    id: SiteId
    format: Literal["fhir", "csv", "parquet"]
    time_zone: TimeZoneName
    timestamp_format: str  # strftime format, or "epoch_ms"
    date_format: str = "%Y-%m-%d"


def _identity_sex_codes() -> dict[str, Literal["M", "F"]]:
    return {"M": "M", "F": "F"}


class PatientSource(StrictModel):
    """Where the patient list is: the identifier, sex and birth date fields."""

    file: str
    patient: str
    sex: str
    birth_date: str
    sex_codes: dict[str, Literal["M", "F"]] = Field(default_factory=_identity_sex_codes)


class MeasurementSource(StrictModel):
    """One file of measurements: its fields, and either a fixed concept or a code field with a code map."""

    file: str
    record_key: str
    patient: str
    time: str
    value: str
    unit: str
    type: Literal["device", "ehr", "lab"]
    concept: str | None = None
    code: str | None = None
    codes: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _concept_or_codes(self) -> MeasurementSource:
        if (self.concept is None) == (self.code is None):
            raise ValueError("give either `concept` (one concept for the whole file) or `code` with `codes`")
        if self.code is not None and not self.codes:
            raise ValueError("`code` needs a `codes` table mapping the site's codes to twinfed concepts")
        named = set(self.codes.values()) | ({self.concept} if self.concept is not None else set())
        unknown = named - set(MEASUREMENTS)
        if unknown:
            raise ValueError(f"unknown concepts {sorted(unknown)}; known: {sorted(MEASUREMENTS)}")
        return self


class SiteMapping(StrictModel):
    """A whole mapping file."""

    site: SiteFormat
    units: dict[str, str]
    patients: PatientSource
    measurements: dict[str, MeasurementSource]

    @field_validator("units")
    @classmethod
    def _known_units(cls, units: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(units.values()) - KNOWN_UNITS)
        if unknown:
            raise ValueError(f"units map to {unknown}, which twinfed cannot convert; known: {sorted(KNOWN_UNITS)}")
        return units


class MappingError(ValueError):
    """A mapping file that cannot be used, with the file and the field named."""


def load_mapping(path: Path) -> SiteMapping:
    """Read and validate one site mapping file; errors name the file and the offending field."""
    return load_toml_model(path, SiteMapping, MappingError)


def mapping_for(site_id: str, folder: Path = DEFAULT_MAPPINGS_DIR) -> SiteMapping:
    """The mapping of one site, from `folder/<site_id>.toml`."""
    mapping = load_mapping(folder / f"{site_id}.toml")
    if mapping.site.id != site_id:
        raise MappingError(f"{folder / f'{site_id}.toml'}: site.id is {mapping.site.id!r}, expected {site_id!r}")
    return mapping
