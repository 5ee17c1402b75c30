"""Generate each demo hospital's raw drop, its fault manifest and its ground truth, deterministically."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from flows.demo_sites import faults as f
from flows.demo_sites.identities import Identity, draw_clinicians, draw_identities
from flows.demo_sites.imaging import ImagingProfile, ImagingSubject, body_composition, corrupt_dicom, write_ct_series
from flows.demo_sites.profile import SiteProfile
from flows.demo_sites.records import SiteRecords, build_records
from flows.demo_sites.site_frames import inject_row_faults, site_frames
from flows.demo_sites.writers import WrittenDrop, write_csv, write_extract_manifest, write_fhir, write_parquet
from models.uva_padova.cohort import CohortRun, simulate_cohort

STATE_EVERY_MIN = 60  # ground-truth simulator states are kept hourly


FAULT_MANIFEST = "fault_manifest.jsonl"


@dataclass(frozen=True)
class SitePaths:
    """Where a site's generated data lives under the data folder."""

    drop: Path  # the raw drop, as the hospital hands it over
    truth: Path  # ground truth and the fault manifest: never read by the pipeline

    @classmethod
    def under(cls, data_dir: Path, site_id: str) -> SitePaths:
        """The standard layout: data/drops/<site> and data/ground_truth/<site>."""
        return cls(drop=data_dir / "drops" / site_id, truth=data_dir / "ground_truth" / site_id)

    @property
    def fault_manifest(self) -> Path:
        """The injected faults, one JSON object per line (FaultEntry.as_dict)."""
        return self.truth / FAULT_MANIFEST

    def faults(self) -> list[dict[str, Any]]:
        """The fault manifest's entries, as written."""
        return [json.loads(line) for line in self.fault_manifest.read_text().splitlines()]


@dataclass(frozen=True)
class SiteSummary:
    """What one site's generation produced and how long it took."""

    site_id: str
    export_format: str
    patients: int
    days: int
    seconds: float
    files: int
    bytes: int
    rows: dict[str, int]
    faults: dict[str, int]


def simulate_site(profile: SiteProfile, *, record_states: bool = False) -> CohortRun:
    """The site's simulated cohort: same profile, same run (the drop's ground truth)."""
    cohort = profile.cohort
    return simulate_cohort(
        cohort.patients,
        cohort.days,
        seed=profile.site.seed,
        sensor=cohort.sensor,
        pump=cohort.pump,
        cohort_mix=cohort.mix,
        record_states=record_states,
    )


def generate_site(profile: SiteProfile, data_dir: Path) -> SiteSummary:
    """Write one hospital's raw drop and ground truth under `data_dir` (replacing earlier ones)."""
    started = time.perf_counter()
    paths = SitePaths.under(data_dir, profile.site.id)
    for folder in (paths.drop, paths.truth):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    identity_seq, records_seq, faults_seq, imaging_seq = np.random.SeedSequence(profile.site.seed).spawn(4)

    run = simulate_site(profile, record_states=True)
    identities = draw_identities(
        run.params,
        locale=profile.site.locale,
        mrn_prefix=profile.site.mrn_prefix,
        start=profile.cohort.start,
        seed=int(identity_seq.generate_state(1)[0]),
    )
    clinicians = draw_clinicians(locale=profile.site.locale, seed=int(identity_seq.generate_state(2)[1]))
    records = build_records(profile, run, identities, clinicians, np.random.default_rng(records_seq))
    by_mrn = {ident.mrn: ident for ident in identities}
    fault_rng = np.random.default_rng(faults_seq)
    frames = inject_row_faults(site_frames(profile, records), profile, by_mrn, fault_rng)

    ehr = paths.drop / "ehr"
    ehr.mkdir()
    if profile.export.format == "fhir":
        written = write_fhir(ehr, frames, profile, records.window_end_utc, fault_rng)
    else:
        if profile.export.format == "csv":
            written = write_csv(ehr, frames, profile, fault_rng)
        else:
            written = write_parquet(ehr, frames, profile)
        write_extract_manifest(ehr, written, records.window_end_utc)
    written.faults = [replace(entry, file=f"ehr/{entry.file}") for entry in written.faults]

    composition = _write_imaging(profile, run, identities, clinicians, records, paths.drop, imaging_seq, written)
    _write_truth(paths.truth, profile, run, identities, composition, records, written)
    return _summary(profile, paths, written, time.perf_counter() - started)


def _write_imaging(
    profile: SiteProfile,
    run: CohortRun,
    identities: list[Identity],
    clinicians: list[tuple[str, str]],
    records: SiteRecords,
    drop: Path,
    seed_seq: np.random.SeedSequence,
    written: WrittenDrop,
) -> pl.DataFrame:
    """One abdominal CT series per patient at the first visit; some files corrupted in transfer."""
    rng = np.random.default_rng(seed_seq)
    imaging = ImagingProfile(**profile.imaging.model_dump())
    zone = ZoneInfo(profile.export.time_zone)
    first_visit = records.tables["vitals"].group_by("mrn").agg(pl.col("time").min())
    visit_at = dict(zip(first_visit["mrn"], first_visit["time"], strict=True))
    rows = []
    all_files: list[tuple[str, Path]] = []
    for i, ident in enumerate(identities):
        height = float(
            records.tables["vitals"].filter((pl.col("mrn") == ident.mrn) & (pl.col("kind") == "height"))["value"][0]
        )
        body = body_composition(
            body_weight_kg=float(run.params.BW[i]),
            height_cm=height,
            insulin_sensitivity=float(run.params.extra["insulin_sensitivity"][i]),
            age_years=float(run.params.age[i]),
            sex=ident.sex,
            rng=rng,
        )
        accession = f"{profile.site.mrn_prefix}A{i + 1:06d}"
        family, given = clinicians[i % len(clinicians)]
        scan_at = (visit_at[ident.mrn] + timedelta(minutes=45)).astimezone(zone).replace(tzinfo=None)
        subject = ImagingSubject(
            mrn=ident.mrn,
            family_name=ident.family,
            given_name=ident.given,
            birth_date=ident.birth_date,
            sex=ident.sex,
            study_datetime=scan_at,
            referring_physician=f"{family}^{given}",
            accession_number=accession,
            body_weight_kg=float(run.params.BW[i]),
            height_cm=height,
            **body,
        )
        series = drop / "imaging" / accession
        series.mkdir(parents=True)
        files = write_ct_series(series, subject, imaging, seed=profile.site.seed * 100_003 + i)
        all_files += [(accession, path) for path in files]
        rows.append({"mrn": ident.mrn, "accession": accession, "height_cm": height, **body})
    count = f.count_for(profile.faults.get("corrupted_dicom", 0), len(all_files), at_least_one=True)
    for index in sorted(rng.choice(len(all_files), size=count, replace=False)):
        accession, path = all_files[int(index)]
        mode = ("truncated", "garbage_header", "zero_length")[int(rng.integers(3))]
        detail = corrupt_dicom(path, mode=mode, rng=rng)
        relative = str(path.relative_to(drop))
        written.faults.append(f.FaultEntry(relative, "corrupted_dicom", accession, None, detail))
    written.files.update({str(p.relative_to(drop)): 1 for _, p in all_files})
    return pl.DataFrame(rows)


def _write_truth(
    truth: Path,
    profile: SiteProfile,
    run: CohortRun,
    identities: list[Identity],
    composition: pl.DataFrame,
    records: SiteRecords,
    written: WrittenDrop,
) -> None:
    """Ground truth: who each MRN is in the simulator, true glucose, meals, states, body composition."""
    params = run.params
    mrn = np.array([ident.mrn for ident in identities])
    patients = pl.DataFrame(
        {
            "mrn": mrn,
            "sim_patient": list(params.names),
            "cohort": list(params.cohort),
            "base_patient": list(params.base_name),
            "age_years": params.age,
            "body_weight_kg": params.BW,
            "insulin_sensitivity": params.extra["insulin_sensitivity"],
            "body_weight_factor": params.extra["body_weight_factor"],
            "gut_rate_factor": params.extra["gut_rate_factor"],
            "cr_g_per_u": params.cr,
            "cf_mg_dl_per_u": params.cf,
            "basal_u_per_h": params.basal_u_per_min * 60,
            "p_missed_bolus": run.errors.p_missed,
            "p_late_bolus": run.errors.p_late,
            "sensor_seed": run.sensor_seeds,
        }
    ).join(composition, on="mrn")
    patients.write_parquet(truth / "patients.parquet")
    minutes = run.result.minutes
    start = np.datetime64(records.window_start_utc.replace(tzinfo=None), "ms")
    stamps = start + np.arange(minutes + 1).astype("timedelta64[m]")
    pl.DataFrame(
        {
            "mrn": np.repeat(mrn, minutes + 1),
            "time": np.tile(stamps, len(mrn)),
            "bg_mg_dl": run.result.bg.astype(np.float32).ravel(),
        }
    ).with_columns(pl.col("time").dt.replace_time_zone("UTC")).write_parquet(truth / "glucose.parquet")
    # The CGM readings as the sensor produced them (mg/dL, UTC), before export rounding, units or faults.
    records.tables["cgm"].select("record_id", "mrn", "time", "value_mg_dl").write_parquet(truth / "cgm.parquet")
    plan = run.plan
    pl.DataFrame(
        {
            "mrn": mrn[plan.patient],
            "time": start + plan.minute.astype("timedelta64[m]"),
            "carbs_g": plan.carbs_g,
            "bolus_carbs_g": plan.bolus_carbs_g,
            "bolus_delay_min": plan.bolus_delay_min,
        }
    ).with_columns(pl.col("time").dt.replace_time_zone("UTC")).write_parquet(truth / "meals.parquet")
    states = run.result.step_states
    assert states is not None
    every = STATE_EVERY_MIN // run.result.sample_time
    np.savez_compressed(
        truth / "states_hourly.npz",
        mrn=mrn,
        minute=np.arange(0, states.x.shape[0], every) * run.result.sample_time,
        **{name: getattr(states, name)[::every] for name in ("x", "planned_meal_g", "last_cho_g", "eating",
                                                            "last_qsto_mg", "last_food_g", "last_cgm", "cgm_obs",
                                                            "since_hypo_treat_min")},
    )  # fmt: skip
    with open(truth / FAULT_MANIFEST, "w") as manifest:
        for entry in written.faults:
            manifest.write(json.dumps(entry.as_dict()) + "\n")
    meta = {
        "site": profile.model_dump(mode="json"),
        "window_start_utc": records.window_start_utc.isoformat(),
        "window_end_utc": records.window_end_utc.isoformat(),
        "generated_by": "twinfed sites generate",
    }
    (truth / "generation.json").write_text(json.dumps(meta, indent=2) + "\n")


def _summary(profile: SiteProfile, paths: SitePaths, written: WrittenDrop, seconds: float) -> SiteSummary:
    files = [p for p in paths.drop.rglob("*") if p.is_file()]
    kinds: dict[str, int] = {}
    for entry in written.faults:
        kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
    return SiteSummary(
        site_id=profile.site.id,
        export_format=profile.export.format,
        patients=profile.cohort.patients,
        days=profile.cohort.days,
        seconds=round(seconds, 2),
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        rows={k: v for k, v in written.files.items() if not k.startswith("imaging/")},
        faults=dict(sorted(kinds.items())),
    )


def generate_sites(profiles: list[SiteProfile], data_dir: Path, *, workers: int = 2) -> list[SiteSummary]:
    """Generate every site, `workers` at a time in separate processes."""
    if workers <= 1 or len(profiles) == 1:
        return [generate_site(p, data_dir) for p in profiles]
    # Spawn, not fork: polars' and numba's thread pools do not survive a fork (the children hang).
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(generate_site, profiles, [data_dir] * len(profiles)))
