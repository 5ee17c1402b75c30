"""Write a hospital's frames as its export format: FHIR R4 Bulk Data NDJSON, CSV extracts or Parquet."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from flows.demo_sites import faults as f
from flows.demo_sites.profile import SiteProfile
from flows.demo_sites.site_frames import garbled_or_time, local_time

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
UCUM_CODES = {
    "mg/dL": "mg/dL",
    "mmol/L": "mmol/L",
    "kg": "kg",
    "lb": "[lb_av]",
    "cm": "cm",
    "%": "%",
    "mm[Hg]": "mm[Hg]",
    "/min": "/min",
    "mmol/mol": "mmol/mol",
}
LOINC_CODES = {
    "cgm_glucose": ("99504-3", "Glucose [Mass/volume] in Interstitial fluid"),
    "plasma_glucose": ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
    "hba1c": ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
    "weight": ("29463-7", "Body weight"),
    "height": ("8302-2", "Body height"),
    "systolic": ("8480-6", "Systolic blood pressure"),
    "diastolic": ("8462-4", "Diastolic blood pressure"),
    "heart_rate": ("8867-4", "Heart rate"),
    "carbs": ("9059-7", "Carbohydrate intake Estimated"),
}
INSULIN_ASPART = {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "51428", "display": "insulin aspart"}
EXTENSION_BASE = "https://twinfed.example/fhir/StructureDefinition"
FHIR_TIME = "%Y-%m-%dT%H:%M:%S%:z"
CGM_FILES = ("cgm", "Observation.cgm")  # every configured line fault lands at least once in these


@dataclass
class WrittenDrop:
    """What a writer produced: files (relative paths) with row counts and bytes, and the faults in them."""

    files: dict[str, int] = field(default_factory=dict)
    faults: list[f.FaultEntry] = field(default_factory=list)


def record_key_column(table: str) -> str:
    """The column that identifies a record of `table` in the manifest (patients by MRN, devices by id)."""
    return {"patients": "mrn", "devices": "device_id"}.get(table, "record_id")


def patient_uuid(site_id: str, mrn: str) -> str:
    """The FHIR server's logical id for a patient (opaque, stable)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{site_id}/Patient/{mrn}"))


def _text_file(
    drop: Path,
    name: str,
    frame: pl.DataFrame,
    lines: list[str],
    *,
    header: str | None,
    profile: SiteProfile,
    delimiter: str | None,
    rng: np.random.Generator,
    written: WrittenDrop,
    key: str,
) -> None:
    """Write lines (one per frame row), damaging some; record every fault with its line number."""
    offset = 1 if header is not None else 0
    keys = frame[key].cast(pl.String).to_list()
    kinds, fields, details = frame[f.FAULT].to_list(), frame[f.FAULT_FIELD].to_list(), frame[f.FAULT_DETAIL].to_list()
    for row, kind in enumerate(kinds):
        if kind is not None:
            written.faults.append(f.FaultEntry(name, kind, keys[row], fields[row], details[row], line=offset + row + 1))
    clean = f.clean_rows(frame).to_numpy()
    for kind in ("truncated_line", "malformed_line"):
        candidates = np.flatnonzero(clean)
        count = f.count_for(profile.faults.get(kind, 0), candidates.size, at_least_one=name.startswith(CGM_FILES))
        chosen = np.sort(rng.choice(candidates, size=count, replace=False)) if count else np.array([], dtype=int)
        for row in chosen.tolist():
            lines[row], detail = f.damage_line(lines[row], kind, rng, delimiter)
            written.faults.append(f.FaultEntry(name, kind, keys[row], None, detail, line=offset + row + 1))
        clean[chosen] = False
    text = "\n".join(([header] if header is not None else []) + lines) + "\n"
    (drop / name).write_text(text)
    written.files[name] = frame.height


# ---------------------------------------------------------------- FHIR R4 Bulk Data


def write_fhir(
    drop: Path, frames: dict[str, pl.DataFrame], profile: SiteProfile, window_end: datetime, rng: np.random.Generator
) -> WrittenDrop:
    """NDJSON per resource type (Observation split by kind) and the bulk-export manifest."""
    written = WrittenDrop()
    site = profile.site.id
    tz = profile.export.time_zone
    ref = {mrn: f"Patient/{patient_uuid(site, mrn)}" for mrn in frames["patients"]["mrn"].to_list()}

    def stamped(frame: pl.DataFrame) -> pl.DataFrame:
        formatted = pl.col("time").dt.convert_time_zone(tz).dt.strftime(FHIR_TIME)
        return frame.with_columns(garbled_or_time(frame, formatted).alias("__ts"))

    builders: dict[str, tuple[str, Callable[[dict], dict]]] = {
        "Patient.ndjson": ("patients", lambda r: _patient(r, site)),
        "Condition.ndjson": ("conditions", lambda r: _condition(r, ref)),
        "Device.ndjson": ("devices", lambda r: _device(r, ref)),
        "Observation.cgm.ndjson": ("cgm", lambda r: _observation(r, ref, "cgm_glucose", "laboratory")),
        "Observation.vitals.ndjson": ("vitals", lambda r: _observation(r, ref, r["kind"], "vital-signs")),
        "Observation.labs.ndjson": ("labs", lambda r: _observation(r, ref, r["kind"], "laboratory")),
        "Observation.meals.ndjson": ("meals", lambda r: _meal(r, ref)),
        "MedicationRequest.ndjson": ("therapy", lambda r: _medication_request(r, ref)),
        "MedicationAdministration.basal.ndjson": ("basal", lambda r: _basal(r, ref)),
        "MedicationAdministration.bolus.ndjson": ("bolus", lambda r: _bolus(r, ref)),
        "DocumentReference.ndjson": ("notes", lambda r: _document(r, ref)),
    }
    for name, (table, build) in builders.items():
        frame = frames[table]
        frame = stamped(frame) if "time" in frame.columns else frame
        if table == "cgm":
            lines = cgm_observation_lines(frame, ref)
        else:
            lines = [orjson.dumps(build(row)).decode() for row in _rows(frame)]
        key = record_key_column(table)
        _text_file(
            drop, name, frame, lines, header=None, profile=profile, delimiter=None, rng=rng, written=written, key=key
        )
    manifest = {
        "transactionTime": (window_end + timedelta(hours=2)).isoformat(),
        "request": f"https://fhir.{site}.example/fhir/$export?_type=Patient,Observation,Condition,Device,"
        "MedicationRequest,MedicationAdministration,DocumentReference",
        "requiresAccessToken": True,
        "output": [{"type": n.split(".")[0], "url": n, "count": written.files[n]} for n in builders],
        "error": [],
    }
    (drop / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return written


def _rows(frame: pl.DataFrame) -> Iterator[dict]:
    return frame.iter_rows(named=True)


def _quantity(value: float | None, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": UCUM_CODES.get(unit, unit)}


def _effective(row: dict) -> dict:
    return {"effectiveDateTime": row["__ts"]} if row["__ts"] is not None else {}


def _patient(row: dict, site: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": patient_uuid(site, row["mrn"]),
        "identifier": [{"type": {"text": "MRN"}, "system": f"urn:oid:2.16.840.1.113883.4.{site}", "value": row["mrn"]}],
        "name": [{"family": row["family"], "given": [row["given"]]}],
        "gender": "female" if row["sex"] == "F" else "male",
        "birthDate": row["birth_date"].isoformat(),
        "address": [{"line": [row["address"]], "city": row["city"], "postalCode": row["postcode"]}],
        "telecom": [{"system": "phone", "value": row["phone"], "use": "home"}],
    }


def _condition(row: dict, ref: dict[str, str]) -> dict:
    return {
        "resourceType": "Condition",
        "id": row["record_id"],
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "code": {
            "coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10", "code": row["icd10"]},
                {"system": "http://snomed.info/sct", "code": row["snomed"], "display": row["text"]},
            ]
        },
        "subject": {"reference": ref[row["mrn"]]},
        "onsetDateTime": row["onset_date"].isoformat(),
    }


def _device(row: dict, ref: dict[str, str]) -> dict:
    snomed = (
        ("704708004", "Continuous glucose monitoring system") if row["kind"] == "cgm" else ("69805005", "Insulin pump")
    )
    return {
        "resourceType": "Device",
        "id": row["device_id"],
        "serialNumber": row["device_id"][3:],
        "manufacturer": row["manufacturer"],
        "deviceName": [{"name": row["name"], "type": "user-friendly-name"}],
        "modelNumber": row["model"],
        "type": {"coding": [{"system": "http://snomed.info/sct", "code": snomed[0], "display": snomed[1]}]},
        "patient": {"reference": ref[row["mrn"]]},
    }


def _observation(row: dict, ref: dict[str, str], kind: str, category: str) -> dict:
    code, display = LOINC_CODES[kind]
    resource = {
        "resourceType": "Observation",
        "id": row["record_id"],
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": ref[row["mrn"]]},
        **_effective(row),
        "valueQuantity": _quantity(row["value"], row["unit"]),
    }
    if "device_id" in row:
        resource["device"] = {"reference": f"Device/{row['device_id']}"}
    return resource


def cgm_observation_lines(frame: pl.DataFrame, ref: dict[str, str]) -> list[str]:
    """The CGM Observations as NDJSON lines, built column-wise: the same bytes `_observation` gives.

    A hospital's CGM file has hundreds of thousands of readings; building a dict per reading took
    most of the FHIR export's time. tests/flows/test_demo_sites.py checks both paths agree.
    """
    code, display = LOINC_CODES["cgm_glucose"]
    unsafe = frame.select(
        pl.any_horizontal(pl.col(c).str.contains(r'["\\]') for c in ("record_id", "unit", "device_id", "__ts")).any()
    ).item()
    if unsafe:
        raise ValueError("CGM text fields must not contain quotes or backslashes")
    effective = (
        pl.when(pl.col("__ts").is_null())
        .then(pl.lit(""))
        .otherwise(pl.concat_str(pl.lit('"effectiveDateTime":"'), pl.col("__ts"), pl.lit('",')))
    )
    category = (
        '[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}]'
    )
    built = frame.select(
        pl.concat_str(
            pl.lit('{"resourceType":"Observation","id":"'),
            pl.col("record_id"),
            pl.lit(f'","status":"final","category":{category},"code":{{"coding":[{{"system":"{LOINC}",'),
            pl.lit(f'"code":"{code}","display":"{display}"}}]}},"subject":{{"reference":"'),
            pl.col("mrn").replace_strict(ref),
            pl.lit('"},'),
            effective,
            pl.lit('"valueQuantity":{"value":'),
            pl.col("value").cast(pl.String),
            pl.lit(',"unit":"'),
            pl.col("unit"),
            pl.lit(f'","system":"{UCUM}","code":"'),
            pl.col("unit").replace_strict(UCUM_CODES, default=pl.col("unit")),
            pl.lit('"},"device":{"reference":"Device/'),
            pl.col("device_id"),
            pl.lit('"}}'),
        )
    )
    return built.to_series().to_list()


def _meal(row: dict, ref: dict[str, str]) -> dict:
    resource = _observation({**row, "value": row["carbs_g"], "unit": "g"}, ref, "carbs", "survey")
    if row["note"]:
        resource["note"] = [{"text": row["note"]}]
    return resource


def _medication_request(row: dict, ref: dict[str, str]) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": row["record_id"],
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [INSULIN_ASPART]},
        "subject": {"reference": ref[row["mrn"]]},
        "authoredOn": row["__ts"],
        "dosageInstruction": [
            {
                "text": "Continuous subcutaneous insulin infusion via pump",
                "doseAndRate": [
                    {"rateQuantity": {"value": row["basal_u_per_h"], "unit": "U/h", "system": UCUM, "code": "[iU]/h"}}
                ],
            }
        ],
        "extension": [
            {
                "url": f"{EXTENSION_BASE}/insulin-carb-ratio",
                "valueQuantity": {"value": row["cr_g_per_u"], "unit": "g/U"},
            },
            {
                "url": f"{EXTENSION_BASE}/insulin-sensitivity-factor",
                "valueQuantity": {"value": row["cf_per_u"], "unit": row["cf_unit"]},
            },
        ],
    }


def _administration(row: dict, ref: dict[str, str], category: str) -> dict:
    return {
        "resourceType": "MedicationAdministration",
        "id": row["record_id"],
        "status": "completed",
        "category": {"coding": [{"system": f"{EXTENSION_BASE}/insulin-delivery", "code": category}]},
        "medicationCodeableConcept": {"coding": [INSULIN_ASPART]},
        "subject": {"reference": ref[row["mrn"]]},
        "device": [{"reference": f"Device/{row['device_id']}"}],
    }


def _basal(row: dict, ref: dict[str, str]) -> dict:
    resource = _administration(row, ref, "basal")
    end = (row["time"] + timedelta(minutes=row["duration_min"])) if row["time"] is not None else None
    resource["effectivePeriod"] = {"start": row["__ts"], "end": end.isoformat() if end is not None else None}
    resource["dosage"] = {
        "rateQuantity": {"value": row["rate_u_per_h"], "unit": "U/h", "system": UCUM, "code": "[iU]/h"}
    }
    return resource


def _bolus(row: dict, ref: dict[str, str]) -> dict:
    resource = _administration(row, ref, "bolus")
    resource.update(_effective(row))
    resource["dosage"] = {"dose": {"value": row["units"], "unit": "U", "system": UCUM, "code": "[iU]"}}
    resource["extension"] = [
        {"url": f"{EXTENSION_BASE}/bolus-carb-input", "valueQuantity": {"value": row["carbs_entered_g"], "unit": "g"}}
    ]
    return resource


def _document(row: dict, ref: dict[str, str]) -> dict:
    return {
        "resourceType": "DocumentReference",
        "id": row["record_id"],
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
        "subject": {"reference": ref[row["mrn"]]},
        "date": row["__ts"],
        "author": [{"display": row["author"]}],
        "content": [
            {"attachment": {"contentType": "text/plain", "data": base64.b64encode(row["text"].encode()).decode()}}
        ],
    }


# ---------------------------------------------------------------- CSV extracts

EXTRACT_MANIFEST = "extract_manifest.json"


def write_extract_manifest(drop: Path, written: WrittenDrop, window_end: datetime) -> None:
    """The control file an EPR extract job leaves beside its files: when it ran and rows per file."""
    manifest = {
        "extracted_at": (window_end + timedelta(hours=2)).isoformat(),
        "files": [{"name": name, "rows": rows} for name, rows in written.files.items()],
    }
    (drop / EXTRACT_MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


CSV_DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "patients": {
        "mrn": "MRN",
        "family": "LastName",
        "given": "FirstName",
        "sex": "Sex",
        "birth_date": "DOB",
        "address": "Address",
        "city": "City",
        "postcode": "PostCode",
        "phone": "Phone",
    },
    "conditions": {
        "record_id": "DiagnosisID",
        "mrn": "MRN",
        "onset_date": "DiagnosisDate",
        "icd10": "ICD10",
        "text": "Description",
    },
    "devices": {
        "device_id": "DeviceID",
        "mrn": "MRN",
        "kind": "DeviceType",
        "manufacturer": "Manufacturer",
        "model": "Model",
        "name": "DeviceName",
    },
    "vitals": {
        "record_id": "ObsID",
        "mrn": "MRN",
        "time": "ObsDateTime",
        "kind": "ObsType",
        "value": "Value",
        "unit": "Units",
    },
    "labs": {
        "record_id": "ResultID",
        "mrn": "MRN",
        "time": "CollectedDateTime",
        "kind": "TestCode",
        "value": "Result",
        "unit": "Units",
    },
    "therapy": {
        "record_id": "PrescriptionID",
        "mrn": "MRN",
        "time": "PrescribedDateTime",
        "insulin": "Drug",
        "basal_u_per_h": "BasalRate_U_per_h",
        "cr_g_per_u": "CarbRatio_g_per_U",
        "cf_per_u": "CorrectionFactor",
        "cf_unit": "CorrectionUnits",
    },
    "notes": {"record_id": "NoteID", "mrn": "MRN", "time": "NoteDateTime", "author": "Author", "text": "NoteText"},
    "cgm": {
        "record_id": "ReadingID",
        "mrn": "MRN",
        "device_id": "SensorSerial",
        "time": "ReadingDateTime",
        "value": "Glucose",
        "unit": "Units",
    },
    "basal": {
        "record_id": "BasalID",
        "mrn": "MRN",
        "device_id": "PumpSerial",
        "time": "StartDateTime",
        "duration_min": "DurationMin",
        "rate_u_per_h": "Rate_U_per_h",
    },
    "bolus": {
        "record_id": "BolusID",
        "mrn": "MRN",
        "device_id": "PumpSerial",
        "time": "DeliveredDateTime",
        "units": "Units_U",
        "carbs_entered_g": "CarbInput_g",
    },
    "meals": {"record_id": "EntryID", "mrn": "MRN", "time": "EntryDateTime", "carbs_g": "Carbs_g", "note": "Comment"},
}
CSV_FILES = {
    "patients": "patients.csv",
    "conditions": "diagnoses.csv",
    "devices": "devices.csv",
    "vitals": "observations.csv",
    "labs": "lab_results.csv",
    "therapy": "pump_settings.csv",
    "notes": "clinic_letters.csv",
    "cgm": "cgm_readings.csv",
    "basal": "pump_basal.csv",
    "bolus": "pump_bolus.csv",
    "meals": "carb_entries.csv",
}


def csv_columns(profile: SiteProfile, table: str) -> dict[str, str]:
    """The site's column name for each canonical column of `table` (profile overrides defaults)."""
    return {**CSV_DEFAULT_COLUMNS[table], **profile.export.csv_columns.get(table, {})}


def write_csv(
    drop: Path, frames: dict[str, pl.DataFrame], profile: SiteProfile, rng: np.random.Generator
) -> WrittenDrop:
    """One CSV extract per table, the site's column names, local wall-clock timestamps."""
    written = WrittenDrop()
    for table, name in CSV_FILES.items():
        frame = frames[table]
        columns = csv_columns(profile, table)
        exported = (
            frame.with_columns(garbled_or_time(frame, local_time(profile)).alias("time"))
            if "time" in frame.columns
            else frame
        )
        exported = exported.with_columns(pl.col(pl.Date).dt.strftime("%d/%m/%Y")).select(
            [pl.col(src).alias(dst) for src, dst in columns.items()]
        )
        text = exported.write_csv(null_value="", float_precision=None)
        header, *lines = text.rstrip("\n").split("\n")
        key = record_key_column(table)
        _text_file(
            drop, name, frame, lines, header=header, profile=profile, delimiter=",", rng=rng, written=written, key=key
        )
    return written


# ---------------------------------------------------------------- Parquet tables

PARQUET_FILES = {
    "patients": "patient.parquet",
    "conditions": "diagnosis.parquet",
    "devices": "device.parquet",
    "vitals": "measurement_vitals.parquet",
    "labs": "measurement_lab.parquet",
    "therapy": "pump_setting.parquet",
    "notes": "note.parquet",
    "cgm": "measurement_cgm.parquet",
    "basal": "pump_basal.parquet",
    "bolus": "pump_bolus.parquet",
    "meals": "carb_entry.parquet",
}


def write_parquet(drop: Path, frames: dict[str, pl.DataFrame], profile: SiteProfile) -> WrittenDrop:
    """One Parquet table per kind of record: local codes, epoch-millisecond UTC timestamps."""
    written = WrittenDrop()
    codes = profile.export.local_codes
    for table, name in PARQUET_FILES.items():
        frame = frames[table]
        exported = frame
        if "time" in frame.columns:
            # A garbled epoch is one written in seconds instead of milliseconds, a classic export bug.
            epoch = pl.col("time").dt.epoch("ms")
            exported = exported.with_columns(
                pl.when(pl.col(f.GARBLED_TIME).is_not_null()).then(epoch // 1000).otherwise(epoch).alias("time")
            ).rename({"time": "ts_epoch_ms"})
        if table == "cgm":
            exported = exported.with_columns(pl.lit(codes.get("cgm_glucose", "cgm_glucose")).alias("code"))
        if table in ("vitals", "labs"):
            exported = exported.with_columns(
                pl.col("kind").replace_strict(codes, default=pl.col("kind")).alias("code")
            ).drop("kind")
        exported.drop([c for c in exported.columns if c.startswith("__")]).write_parquet(drop / name)
        written.files[name] = frame.height
        key = record_key_column(table)
        for row, (kind, fld, detail, record_key) in enumerate(
            frame.select(f.FAULT, f.FAULT_FIELD, f.FAULT_DETAIL, pl.col(key).cast(pl.String)).iter_rows()
        ):
            if kind == "garbled_timestamp":
                detail = "epoch written in seconds, not milliseconds"
            if kind is not None:
                written.faults.append(f.FaultEntry(name, kind, record_key, fld, detail, row=row))
    return written
