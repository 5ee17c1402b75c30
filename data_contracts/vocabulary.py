"""The concepts twinfed speaks: OMOP concept ids for measurements, units, drugs, conditions and images.

One place for every code a table, contract or mart uses. Standard OMOP concept ids are given
where the OMOP vocabularies (Athena) have one; concepts Athena lacks here (the CGM LOINC code
99504-3 is newer than most vocabulary releases, and the image features have no standard concept)
get site-neutral local ids in the range OMOP reserves for them (>= 2,000,000,000), and keep their
source code in `*_source_value`. `ATHENA_CHECKED` lists the ids taken from the project's domain
notes; the others were set from the public OMOP vocabulary and should be re-checked against the
vocabulary release a federation deploys with (`tests/data_contracts` checks internal consistency).
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_CONCEPT_BASE = 2_000_000_000

# Units (UCUM code -> OMOP unit concept id).
UNIT_CONCEPTS: dict[str, int] = {
    "mg/dL": 8840,
    "mmol/L": 8753,
    "%": 8554,
    "mmol/mol": 9573,
    "kg": 9529,
    "cm": 8582,
    "mm[Hg]": 8876,
    "/min": 8541,
    "g": 8504,
    "[iU]": 8718,
    # No unit concept checked here for these; local ids until the deployed vocabulary is consulted.
    "[iU]/h": LOCAL_CONCEPT_BASE + 100,
    "cm2": LOCAL_CONCEPT_BASE + 101,
    "[hnsf'U]": LOCAL_CONCEPT_BASE + 102,
}


@dataclass(frozen=True)
class MeasurementConcept:
    """A measurement the harmonized layer holds, in one canonical unit, with its plausible range."""

    key: str  # twinfed's own short name
    concept_id: int
    loinc: str
    name: str
    unit: str  # canonical UCUM unit; every site's values are converted to it
    plausible_low: float  # outside [low, high] a value is physiologically impossible
    plausible_high: float

    @property
    def unit_concept_id(self) -> int:
        """The OMOP unit concept of the canonical unit."""
        return UNIT_CONCEPTS[self.unit]


MEASUREMENTS: dict[str, MeasurementConcept] = {
    m.key: m
    for m in (
        # A CGM reports numbers only inside its sensor's range (39-600 mg/dL for the sensors twinfed knows;
        # commercial ones show LO/HI outside 40-400): anything else, such as mmol/L values labelled mg/dL, is not
        # a reading.
        MeasurementConcept(
            "cgm_glucose", LOCAL_CONCEPT_BASE + 1, "99504-3", "Glucose [Mass/volume] in Interstitial fluid",
            "mg/dL", 39.0, 600.0,
        ),
        MeasurementConcept(
            "plasma_glucose", 3004501, "2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 10.0, 2000.0
        ),
        MeasurementConcept("hba1c", 3004410, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 3.0, 20.0),
        MeasurementConcept("weight", 3025315, "29463-7", "Body weight", "kg", 1.0, 400.0),
        MeasurementConcept("height", 3036277, "8302-2", "Body height", "cm", 40.0, 250.0),
        MeasurementConcept("systolic", 3004249, "8480-6", "Systolic blood pressure", "mm[Hg]", 40.0, 260.0),
        MeasurementConcept("diastolic", 3012888, "8462-4", "Diastolic blood pressure", "mm[Hg]", 20.0, 180.0),
        MeasurementConcept("heart_rate", 3027018, "8867-4", "Heart rate", "/min", 20.0, 250.0),
    )
}  # fmt: skip

# Unit conversions into each measurement's canonical unit: value_canonical = value * factor + offset.
MG_DL_PER_MMOL_L = 18.016
UNIT_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("mmol/L", "mg/dL"): (MG_DL_PER_MMOL_L, 0.0),
    ("[lb_av]", "kg"): (0.45359237, 0.0),
    ("mmol/mol", "%"): (0.09148, 2.152),  # IFCC -> NGSP master equation
}

# Conditions, drugs, devices, observations, person attributes.
TYPE_1_DIABETES = 201254  # SNOMED 46635009
INSULIN_ASPART = 1567198  # RxNorm 51428
GENDER = {"M": 8507, "F": 8532}
CGM_DEVICE = LOCAL_CONCEPT_BASE + 10  # SNOMED 704708004 continuous glucose monitoring system
INSULIN_PUMP = LOCAL_CONCEPT_BASE + 11  # SNOMED 69805005 insulin pump
CARBOHYDRATE_INTAKE = LOCAL_CONCEPT_BASE + 2  # LOINC 9059-7, patient-logged carbohydrate
BOLUS_CARB_INPUT = LOCAL_CONCEPT_BASE + 3  # carbohydrate entered into a pump's bolus wizard

CONDITIONS = {"type_1_diabetes": TYPE_1_DIABETES}
DEVICES = {"cgm": CGM_DEVICE, "insulin_pump": INSULIN_PUMP}
OBSERVATIONS = {"carbohydrate_intake": CARBOHYDRATE_INTAKE, "bolus_carb_input": BOLUS_CARB_INPUT}
DRUGS = {"insulin": INSULIN_ASPART}

# Type concepts (OMOP v5.4 "Type Concept" vocabulary): where a record came from.
TYPE_EHR = 32817
TYPE_LAB = 32856
TYPE_PATIENT_REPORTED = 32865
TYPE_DEVICE = LOCAL_CONCEPT_BASE + 30  # CGM and pump downloads (no type concept checked here)

# Image features extracted from CT at L3 (no standard OMOP concepts exist).
IMAGE_FEATURES: dict[str, tuple[int, str]] = {
    "visceral_fat_area_cm2": (LOCAL_CONCEPT_BASE + 20, "cm2"),
    "subcutaneous_fat_area_cm2": (LOCAL_CONCEPT_BASE + 21, "cm2"),
    "skeletal_muscle_area_cm2": (LOCAL_CONCEPT_BASE + 22, "cm2"),
    "muscle_attenuation_hu": (LOCAL_CONCEPT_BASE + 23, "[hnsf'U]"),
}

# Concept ids the project's domain notes give explicitly.
ATHENA_CHECKED = frozenset({3004501, 8840, 8753})


def to_canonical(value: float, unit: str, canonical: str) -> float:
    """Convert one value from `unit` to `canonical`; raises naming both units when no conversion exists."""
    if unit == canonical:
        return value
    if (unit, canonical) not in UNIT_CONVERSIONS:
        raise ValueError(f"no conversion from {unit!r} to {canonical!r}; known: {sorted(UNIT_CONVERSIONS)}")
    factor, offset = UNIT_CONVERSIONS[(unit, canonical)]
    return value * factor + offset
