"""A demo hospital's records and device data as canonical tables (UTC, mg/dL, kg), before export."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from flows.demo_sites.identities import Identity
from flows.demo_sites.profile import SiteProfile
from models.glucose_metrics import hba1c_from_mean_glucose
from models.uva_padova.cohort import CohortRun

SENSOR_DEVICES = {
    "Dexcom": ("Dexcom", "G6"),
    "GuardianRT": ("Medtronic", "Guardian Connect"),
    "Navigator": ("Abbott", "FreeStyle Navigator II"),
}
PUMP_DEVICES = {"Insulet": ("Insulet", "Omnipod DASH"), "Cozmo": ("Smiths Medical", "Deltec Cozmo")}
MEAL_WORDS = (
    ("porridge", "toast", "cereal", "eggs and toast", "yoghurt and fruit"),
    ("apple", "banana", "crackers", "granola bar", "biscuits"),
    ("sandwich", "pasta salad", "soup and bread", "rice bowl", "wrap"),
    ("fruit", "crisps", "muffin", "smoothie", "rice cakes"),
    ("pasta", "pizza", "curry and rice", "chicken and potatoes", "stir fry"),
    ("milk and biscuits", "popcorn", "toast", "cereal", "fruit"),
)
SIGNAL_LOSS_PER_DAY = 0.5  # mean CGM signal-loss gaps per patient-day (30-120 min each)


@dataclass(frozen=True)
class SiteRecords:
    """Everything the hospital holds about its patients, in canonical units and UTC."""

    tables: dict[str, pl.DataFrame]
    window_start_utc: datetime
    window_end_utc: datetime


def local_midnight_utc(profile: SiteProfile) -> datetime:
    """The start of the drop: local midnight of the profile's start date, in UTC."""
    zone = ZoneInfo(profile.export.time_zone)
    return datetime.combine(profile.cohort.start, time(0), tzinfo=zone).astimezone(UTC)


def build_records(
    profile: SiteProfile,
    run: CohortRun,
    identities: list[Identity],
    clinicians: list[tuple[str, str]],
    rng: np.random.Generator,
) -> SiteRecords:
    """Turn a simulated cohort into the tables a hospital's systems would hold."""
    start = local_midnight_utc(profile)
    minutes = run.result.minutes
    mrn = np.array([ident.mrn for ident in identities])
    visits = _visit_minutes(len(identities), minutes, rng)
    devices = _devices(profile, mrn, rng)
    cgm_ids = devices.filter(pl.col("kind") == "cgm")["device_id"].to_numpy()
    pump_ids = devices.filter(pl.col("kind") == "pump")["device_id"].to_numpy()
    tables = {
        "patients": _patients(identities),
        "conditions": _conditions(identities, start.date(), rng),
        "devices": devices,
        "vitals": _vitals(run, identities, visits, start, rng),
        "labs": _labs(run, mrn, visits, start, rng),
        "therapy": _therapy(run, mrn, visits, start),
        "notes": _notes(run, identities, clinicians, visits, start, rng),
        "cgm": _cgm(run, mrn, cgm_ids, start, rng),
        "basal": _basal(run, mrn, pump_ids, start),
        "bolus": _bolus(run, mrn, pump_ids, start),
        "meals": _meals(run, mrn, start, rng),
    }
    return SiteRecords(tables=tables, window_start_utc=start, window_end_utc=start + timedelta(minutes=minutes))


def _stamp(start: datetime, offsets_min: np.ndarray) -> pl.Series:
    base = np.datetime64(start.replace(tzinfo=None), "ms")
    return pl.Series((base + offsets_min.astype("timedelta64[m]")).astype("datetime64[ms]")).dt.replace_time_zone("UTC")


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(1, n + 1)]


def _visit_minutes(n: int, minutes: int, rng: np.random.Generator) -> np.ndarray:
    """Two clinic visits per patient (first and last day, mid-morning), minutes from the start."""
    last_day = (minutes // 1440 - 1) * 1440
    first = 9 * 60 + rng.integers(0, 180, size=n)
    last = last_day + 9 * 60 + rng.integers(0, 180, size=n)
    return np.stack([first, last], axis=1)


def _patients(identities: list[Identity]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "mrn": [i.mrn for i in identities],
            "family": [i.family for i in identities],
            "given": [i.given for i in identities],
            "sex": [i.sex for i in identities],
            "birth_date": [i.birth_date for i in identities],
            "address": [i.address for i in identities],
            "city": [i.city for i in identities],
            "postcode": [i.postcode for i in identities],
            "phone": [i.phone for i in identities],
        }
    )


def _conditions(identities: list[Identity], first_day: date, rng: np.random.Generator) -> pl.DataFrame:
    # Diagnosed one to eight years after birth, and at the latest a month before the device data begin (a young
    # child's draw could otherwise land in the future).
    latest = first_day - timedelta(days=30)
    drawn = [i.birth_date + timedelta(days=int(rng.integers(365, 365 * 8))) for i in identities]
    onset = [max(min(d, latest), i.birth_date) for d, i in zip(drawn, identities, strict=True)]
    return pl.DataFrame(
        {
            "record_id": _ids("DX", len(identities)),
            "mrn": [i.mrn for i in identities],
            "onset_date": onset,
            "icd10": ["E10.9"] * len(identities),
            "snomed": ["46635009"] * len(identities),
            "text": ["Type 1 diabetes mellitus"] * len(identities),
        }
    )


def _devices(profile: SiteProfile, mrn: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    n = len(mrn)
    cgm_make, cgm_model = SENSOR_DEVICES[profile.cohort.sensor]
    pump_make, pump_model = PUMP_DEVICES[profile.cohort.pump]
    serials = rng.choice(90_000_000, size=2 * n, replace=False) + 10_000_000
    return pl.DataFrame(
        {
            "device_id": [f"CGM{s}" for s in serials[:n]] + [f"PMP{s}" for s in serials[n:]],
            "mrn": np.concatenate([mrn, mrn]),
            "kind": ["cgm"] * n + ["pump"] * n,
            "manufacturer": [cgm_make] * n + [pump_make] * n,
            "model": [cgm_model] * n + [pump_model] * n,
            "name": [f"{cgm_make} {cgm_model}"] * n + [f"{pump_make} {pump_model}"] * n,
        }
    )


def _height_cm(identity: Identity, age: float, rng: np.random.Generator) -> float:
    """A plausible height for age and sex (rough CDC growth-chart medians, 5% spread)."""
    adult = 176.0 if identity.sex == "M" else 163.0
    median = min(adult, 77.0 + 6.0 * age) if age < 18 else adult
    return float(median * (1 + 0.04 * rng.standard_normal()))


def _vitals(
    run: CohortRun, identities: list[Identity], visits: np.ndarray, start: datetime, rng: np.random.Generator
) -> pl.DataFrame:
    rows: dict[str, list] = {"mrn": [], "minute": [], "kind": [], "value": [], "unit": []}
    for i, ident in enumerate(identities):
        height = _height_cm(ident, float(run.params.age[i]), rng)
        child = run.params.age[i] < 12
        for minute in visits[i]:
            for kind, value, unit in (
                ("weight", run.params.BW[i] + 0.3 * rng.standard_normal(), "kg"),
                ("height", height, "cm"),
                ("systolic", (100 if child else 118) + 9 * rng.standard_normal(), "mm[Hg]"),
                ("diastolic", (62 if child else 76) + 7 * rng.standard_normal(), "mm[Hg]"),
                ("heart_rate", (92 if child else 72) + 9 * rng.standard_normal(), "/min"),
            ):
                rows["mrn"].append(ident.mrn)
                rows["minute"].append(int(minute))
                rows["kind"].append(kind)
                rows["value"].append(round(float(value), 1))
                rows["unit"].append(unit)
    frame = pl.DataFrame(rows)
    return frame.select(
        pl.Series("record_id", _ids("VS", frame.height)),
        "mrn",
        _stamp(start, frame["minute"].to_numpy()).alias("time"),
        "kind",
        "value",
        "unit",
    )


def _labs(
    run: CohortRun, mrn: np.ndarray, visits: np.ndarray, start: datetime, rng: np.random.Generator
) -> pl.DataFrame:
    n = len(mrn)
    bg = run.result.bg
    mean_bg = bg.mean(axis=1)
    hba1c = np.round(hba1c_from_mean_glucose(mean_bg) + 0.15 * rng.standard_normal(n), 1)
    plasma_minutes = visits.ravel()
    patient = np.repeat(np.arange(n), visits.shape[1])
    plasma = np.round(bg[patient, plasma_minutes] * (1 + 0.02 * rng.standard_normal(len(patient))), 0)
    minute = np.concatenate([visits[:, -1], plasma_minutes])
    return pl.DataFrame(
        {
            "record_id": _ids("LB", n + len(patient)),
            "mrn": np.concatenate([mrn, mrn[patient]]),
            "time": _stamp(start, minute),
            "kind": ["hba1c"] * n + ["plasma_glucose"] * len(patient),
            "value": np.concatenate([hba1c, plasma]),
            "unit": ["%"] * n + ["mg/dL"] * len(patient),
        }
    )


def _therapy(run: CohortRun, mrn: np.ndarray, visits: np.ndarray, start: datetime) -> pl.DataFrame:
    """Pump settings as prescribed at the first visit (rounded the way a clinician writes them)."""
    return pl.DataFrame(
        {
            "record_id": _ids("RX", len(mrn)),
            "mrn": mrn,
            "time": _stamp(start, visits[:, 0]),
            "insulin": ["insulin aspart"] * len(mrn),
            "basal_u_per_h": np.round(run.therapy.basal_u_per_min * 60 / 0.05) * 0.05,
            "cr_g_per_u": np.round(run.therapy.cr_g_per_u * 2) / 2,
            "cf_mg_dl_per_u": np.round(run.therapy.cf_mg_dl_per_u),
        }
    )


def _notes(
    run: CohortRun,
    identities: list[Identity],
    clinicians: list[tuple[str, str]],
    visits: np.ndarray,
    start: datetime,
    rng: np.random.Generator,
) -> pl.DataFrame:
    """Clinic letters: free text that names the patient, as real notes do."""
    rows: dict[str, list] = {"mrn": [], "minute": [], "author": [], "text": []}
    for i, ident in enumerate(identities):
        family, given = clinicians[int(rng.integers(len(clinicians)))]
        for minute in visits[i]:
            text = (
                f"Diabetes clinic review. {ident.given} {ident.family} (DOB {ident.birth_date:%d/%m/%Y}, "
                f"MRN {ident.mrn}) attended clinic. Type 1 diabetes on insulin pump and CGM. "
                f"Carb ratio 1:{run.therapy.cr_g_per_u[i]:.0f} g, correction 1:{run.therapy.cf_mg_dl_per_u[i]:.0f}. "
                f"Reports {'some missed' if run.errors.p_missed[i] > 0.1 else 'few missed'} meal boluses. "
                f"Contact {ident.phone}. Plan: continue current settings, review in 3 months."
            )
            rows["mrn"].append(ident.mrn)
            rows["minute"].append(int(minute) + 30)
            rows["author"].append(f"Dr {given} {family}")
            rows["text"].append(text)
    frame = pl.DataFrame(rows)
    return frame.select(
        pl.Series("record_id", _ids("NT", frame.height)),
        "mrn",
        _stamp(start, frame["minute"].to_numpy()).alias("time"),
        "author",
        "text",
    )


def _cgm(
    run: CohortRun, mrn: np.ndarray, device: np.ndarray, start: datetime, rng: np.random.Generator
) -> pl.DataFrame:
    """Sensor readings at the sensor's own interval, with occasional signal-loss gaps."""
    result = run.result
    st = result.sample_time
    n, samples = result.cgm.shape[0], result.cgm.shape[1] - 1  # the reading at the window's end is excluded
    keep = np.ones((n, samples), dtype=bool)
    days = result.minutes / 1440
    for i in range(n):
        for _ in range(rng.poisson(SIGNAL_LOSS_PER_DAY * days)):
            first = int(rng.integers(0, samples))
            keep[i, first : first + int(rng.integers(30, 121)) // st] = False
    patient, sample = np.nonzero(keep)
    return pl.DataFrame(
        {
            "record_id": _ids("CG", len(patient)),
            "mrn": mrn[patient],
            "device_id": device[patient],
            "time": _stamp(start, sample * st),
            "value_mg_dl": np.round(result.cgm[patient, sample], 0),
        }
    )


def _basal(run: CohortRun, mrn: np.ndarray, device: np.ndarray, start: datetime) -> pl.DataFrame:
    """Basal delivery per hour, as pump history summarises it."""
    rate = run.result.basal_u_per_min
    steps_per_hour = 60 // run.result.sample_time
    hours = rate.shape[1] // steps_per_hour
    hourly = rate[:, : hours * steps_per_hour].reshape(len(mrn), hours, steps_per_hour).mean(axis=2) * 60.0
    patient, hour = np.nonzero(np.ones_like(hourly, dtype=bool))
    return pl.DataFrame(
        {
            "record_id": _ids("BA", len(patient)),
            "mrn": mrn[patient],
            "device_id": device[patient],
            "time": _stamp(start, hour * 60),
            "duration_min": np.full(len(patient), 60),
            "rate_u_per_h": np.round(hourly[patient, hour], 3),
        }
    )


def _bolus(run: CohortRun, mrn: np.ndarray, device: np.ndarray, start: datetime) -> pl.DataFrame:
    """Every bolus the pump delivered, with the carbs entered in its bolus wizard."""
    st = run.result.sample_time
    entered = run.therapy.dosing_plan(run.plan, st).bolus_carbs_g
    patient, step = np.nonzero(run.result.bolus_u > 0)
    return pl.DataFrame(
        {
            "record_id": _ids("BO", len(patient)),
            "mrn": mrn[patient],
            "device_id": device[patient],
            "time": _stamp(start, step * st),
            "units": np.round(run.result.bolus_u[patient, step], 2),
            "carbs_entered_g": entered[patient, step],
        }
    )


def _meals(run: CohortRun, mrn: np.ndarray, start: datetime, rng: np.random.Generator) -> pl.DataFrame:
    """Meals the patient logged (counted carbs, at the meal's time); unbolused meals go unlogged."""
    plan = run.plan
    logged = np.flatnonzero(plan.bolus_carbs_g > 0)
    notes = [MEAL_WORDS[int(plan.slot[e])][int(rng.integers(5))] if rng.random() < 0.6 else "" for e in logged]
    return pl.DataFrame(
        {
            "record_id": _ids("ML", len(logged)),
            "mrn": mrn[plan.patient[logged]],
            "time": _stamp(start, plan.minute[logged]),
            "carbs_g": plan.bolus_carbs_g[logged],
            "note": notes,
        }
    )
