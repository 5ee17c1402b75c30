"""Site mapping files: how to read one hospital's export, validated with errors naming file and field.

Onboarding a hospital that exports FHIR NDJSON, CSV or Parquet means writing one of these files
(see infra/mappings/*.toml), not code: which file holds what, which column (or JSONPath) is the
patient, the time, the value, the unit and the code, how the site spells its units and codes,
and the site's time zone and timestamp format. Five kinds of source are understood: the patient
list, measurements (CGM, vitals, labs), insulin deliveries (basal periods and boluses), logged
carbohydrates, diagnoses and devices. Files a mapping lists under `withheld` are deliberately
not read (free-text letters, for example), and say why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.vocabulary import CONDITIONS, DEVICES, MEASUREMENTS, OBSERVATIONS, UNIT_CONCEPTS, UNIT_CONVERSIONS
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
    """Where the patient list is: the identifier, sex and birth date fields, and the identifiers to screen for.

    `imaging_id` is the field DICOM's PatientID matches (the MRN; by default the patient field).
    `identifiers` name the fields holding direct identifiers (names, MRN, phone, address); they are
    read only to screen free text for leaked identifiers and never leave the patient list.
    `full_name` names the given and family name fields, screened for as one phrase.
    """

    file: str
    patient: str
    sex: str
    birth_date: str
    sex_codes: dict[str, Literal["M", "F"]] = Field(default_factory=_identity_sex_codes)
    imaging_id: str | None = None
    identifiers: list[str] = Field(default_factory=list)
    full_name: tuple[str, str] | None = None


def _known_values(table: dict[str, str], vocabulary: dict[str, int], what: str) -> dict[str, str]:
    unknown = sorted(set(table.values()) - set(vocabulary))
    if unknown:
        raise ValueError(f"unknown {what} concepts {unknown}; known: {sorted(vocabulary)}")
    return table


class _Keyed(StrictModel):
    """Fields every event source has: its file, the record key and the patient."""

    file: str
    record_key: str
    patient: str


class DrugSource(_Keyed):
    """Insulin deliveries: basal periods (start, rate in U/h, and an end or a duration) or boluses.

    A bolus file may also carry the carbohydrate entered into the pump's bolus wizard (`carb_input`),
    harmonized as an observation of its own.
    """

    kind: Literal["basal", "bolus"]
    time: str  # basal: period start; bolus: delivery time
    rate: str | None = None  # basal, U/h
    end: str | None = None  # basal: period end (a timestamp), or
    duration_min: str | None = None  # basal: period length in minutes
    dose: str | None = None  # bolus, U
    carb_input: str | None = None  # bolus, g

    @model_validator(mode="after")
    def _fields_of_kind(self) -> DrugSource:
        if self.kind == "basal":
            if self.rate is None or (self.end is None) == (self.duration_min is None):
                raise ValueError("a basal source needs `rate` and exactly one of `end` or `duration_min`")
        elif self.dose is None:
            raise ValueError("a bolus source needs `dose`")
        return self


class ObservationSource(_Keyed):
    """Patient-logged carbohydrate (grams); an optional free-text field is screened, never carried forward."""

    time: str
    value: str
    concept: str
    free_text: str | None = None

    @field_validator("concept")
    @classmethod
    def _known_concept(cls, concept: str) -> str:
        if concept not in OBSERVATIONS:
            raise ValueError(f"unknown observation concept {concept!r}; known: {sorted(OBSERVATIONS)}")
        return concept


class ConditionSource(_Keyed):
    """Diagnoses: a date and a code, with the site's codes mapped to twinfed condition concepts."""

    date: str
    code: str
    codes: dict[str, str]

    @field_validator("codes")
    @classmethod
    def _known_concepts(cls, codes: dict[str, str]) -> dict[str, str]:
        return _known_values(codes, CONDITIONS, "condition")


class DeviceSource(_Keyed):
    """The devices patients wear: kind (mapped to twinfed device concepts), serial number, make and model."""

    kind: str
    kinds: dict[str, str]
    serial: str
    manufacturer: str
    model: str
    free_text: str | None = None  # a name typed in by staff: screened for identifiers, never carried forward

    @field_validator("kinds")
    @classmethod
    def _known_concepts(cls, kinds: dict[str, str]) -> dict[str, str]:
        return _known_values(kinds, DEVICES, "device")


class MeasurementSource(_Keyed):
    """One file of measurements: its fields, and either a fixed concept or a code field with a code map."""

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


class ImagingOptions(StrictModel):
    """How the site's DICOM is de-identified: the PS3.15 Annex E options declared on top of the Basic Profile."""

    date_option: Literal["remove", "shift"] = "shift"
    keep_patient_characteristics: bool = True
    keep_device_identity: bool = False


EventSource = MeasurementSource | DrugSource | ObservationSource | ConditionSource | DeviceSource


class SiteMapping(StrictModel):
    """A whole mapping file."""

    site: SiteFormat
    units: dict[str, str]
    patients: PatientSource
    measurements: dict[str, MeasurementSource]
    drugs: dict[str, DrugSource] = Field(default_factory=dict)
    observations: dict[str, ObservationSource] = Field(default_factory=dict)
    conditions: dict[str, ConditionSource] = Field(default_factory=dict)
    devices: dict[str, DeviceSource] = Field(default_factory=dict)
    withheld: dict[str, str] = Field(default_factory=dict)  # file -> why it is not read
    imaging: ImagingOptions = Field(default_factory=ImagingOptions)

    @property
    def sources(self) -> dict[str, EventSource]:
        """Every event source by name (names are unique across kinds)."""
        return {**self.measurements, **self.drugs, **self.observations, **self.conditions, **self.devices}

    @model_validator(mode="after")
    def _unique_names_and_files(self) -> SiteMapping:
        kinds = (self.measurements, self.drugs, self.observations, self.conditions, self.devices)
        names = [name for kind in kinds for name in kind]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique across kinds; repeated: {repeated}")
        files = [s.file for kind in kinds for s in kind.values()] + [self.patients.file]
        read_twice = sorted({f for f in files if files.count(f) > 1})
        if read_twice:
            raise ValueError(f"each file is one source; named more than once: {read_twice}")
        both = sorted(set(files) & set(self.withheld))
        if both:
            raise ValueError(f"files both read and withheld: {both}")
        return self

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
