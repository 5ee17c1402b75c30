"""How the benchmark scores a forecast: against the simulator's true glucose, by RMSE, Clarke zones and coverage.

This is the evaluator's side, never the pipeline's. A demo hospital's ground truth (`data/ground_truth/<site>`,
written by the generator) holds the simulator's true blood glucose by MRN; the site's features know patients only
by their keyed pseudonym. The evaluator, who may hold the site's secret, links the two by computing the pseudonym
of each MRN exactly as the site flow does (`flows.ingest.pseudonym`). Nothing here is called by training.

What "truth at a target bin" means: target bin k of a window starts 5k minutes after t0, and the features put a
CGM reading in the bin [bin_start, bin_start + 5 min) that holds its timestamp, averaging the readings there
(`flows.features`). The true value of the bin is likewise the mean of the simulator's minute-by-minute blood
glucose over the same five minutes: the same span, the same kind of average.

Metrics (mg/dL throughout):

- RMSE of the median at 30 and 60 minutes (target bins 6 and 12), over windows whose truth exists.
- Clarke error grid (Clarke et al., Diabetes Care 1987): share of forecasts in zone A and in zones A or B, with the
  boundaries the original paper draws (written out in `clarke_zones`; no maintained Python package provides it).
- 90% interval coverage: each site calibrates the model's 5-95% interval on its own calibration patients' CGM
  (CQR, `models.twin.conformal`), then the share of test targets inside, over all 24 horizons, is reported both
  against CGM (what the conformal guarantee is about) and against true glucose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from flows.demo_sites.generate import SitePaths
from flows.demo_sites.writers import patient_uuid
from flows.features import BIN_MS
from flows.ingest.pseudonym import PERSON_PREFIX, load_or_create_secret, pseudonym, pseudonym_id
from models.twin import HORIZON_STEPS, Windows, apply, calibrate

MINUTE_MS = 60_000
BIN_MINUTES = BIN_MS // MINUTE_MS
HORIZONS_MIN = (30, 60)
ZONES = ("A", "B", "C", "D", "E")


def horizon_index(minutes: int) -> int:
    """Column of a (n, HORIZON_STEPS) target for the bin that starts `minutes` after t0."""
    if minutes % BIN_MINUTES or not 0 < minutes // BIN_MINUTES <= HORIZON_STEPS:
        raise ValueError(f"a horizon must be a multiple of {BIN_MINUTES} min up to {HORIZON_STEPS * BIN_MINUTES}")
    return minutes // BIN_MINUTES - 1


# --- truth -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteTruth:
    """A site's true blood glucose per minute, by pseudonymous person id (one flat array, one offset per person)."""

    person_id: np.ndarray  # (p,) int64, sorted
    start_ms: np.ndarray  # (p,) epoch ms of each person's first minute
    offset: np.ndarray  # (p,) where each person's minutes begin in `bg`
    length: np.ndarray  # (p,) minutes each person has
    bg: np.ndarray  # float64 mg/dL, all persons' minutes back to back


def source_patient_id(export_format: str, site_id: str, mrn: str) -> str:
    """The patient identifier a site's mapping pseudonymizes: the FHIR server's Patient.id, else the MRN itself."""
    return patient_uuid(site_id, mrn) if export_format == "fhir" else mrn


def load_truth(data_dir: Path, site_id: str) -> SiteTruth:
    """The site's true glucose keyed by the person_id its site flow gives each MRN (needs the site's secret)."""
    paths = SitePaths.under(data_dir, site_id)
    secret_path = data_dir / "sites" / site_id / "secret.key"
    if not secret_path.exists():
        raise FileNotFoundError(f"{secret_path}: no site secret; run the site flow before linking truth")
    secret = load_or_create_secret(secret_path)
    export_format = json.loads((paths.truth / "generation.json").read_text())["site"]["export"]["format"]
    glucose = pl.read_parquet(paths.truth / "glucose.parquet", columns=["mrn", "time", "bg_mg_dl"])
    ids = {
        mrn: pseudonym_id(pseudonym(secret, PERSON_PREFIX, source_patient_id(export_format, site_id, mrn)))
        for mrn in glucose["mrn"].unique().to_list()
    }
    glucose = glucose.with_columns(person_id=pl.col("mrn").replace_strict(ids, return_dtype=pl.Int64)).sort(
        "person_id", "time"
    )
    per_person = glucose.group_by("person_id", maintain_order=True).agg(
        start=pl.col("time").first().dt.epoch("ms"), minutes=pl.len(), step=pl.col("time").diff().max()
    )
    steps = per_person["step"].drop_nulls().dt.total_milliseconds().unique().to_list()
    if steps and steps != [MINUTE_MS]:
        raise ValueError(f"{paths.truth / 'glucose.parquet'}: expected one row a minute per MRN, found steps {steps}")
    length = per_person["minutes"].to_numpy().astype(np.int64)
    return SiteTruth(
        person_id=per_person["person_id"].to_numpy(),
        start_ms=per_person["start"].to_numpy().astype(np.int64),
        offset=np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64),
        length=length,
        bg=glucose["bg_mg_dl"].to_numpy().astype(np.float64),
    )


def truth_at_targets(windows: Windows, truth: SiteTruth) -> np.ndarray:
    """(n, HORIZON_STEPS) true glucose of each window's target bins: the mean over the bin's five minutes.

    Raises if a window's person is not in the truth (a wrong secret or site); NaN where the bin lies outside the
    simulated span.
    """
    position = np.searchsorted(truth.person_id, windows.person_id)
    found = (position < len(truth.person_id)) & (truth.person_id[np.minimum(position, len(truth.person_id) - 1)]
                                                 == windows.person_id)  # fmt: skip
    if not found.all():
        missing = np.unique(windows.person_id[~found])
        raise ValueError(
            f"{len(missing)} person(s) of the windows have no true glucose (e.g. {missing[0]}): the truth was keyed "
            "with another site's secret or export format"
        )
    t0_ms = windows.t0.astype("datetime64[ms]").astype(np.int64)
    since_start = t0_ms - truth.start_ms[position]
    if np.any(since_start % MINUTE_MS):
        raise ValueError("window origins are not on the truth's minute grid")
    bin_start = since_start[:, None] // MINUTE_MS + BIN_MINUTES * np.arange(1, HORIZON_STEPS + 1)  # (n, H) minutes
    minute = bin_start[..., None] + np.arange(BIN_MINUTES)  # (n, H, 5)
    inside = (minute >= 0) & (minute < truth.length[position][:, None, None])
    flat = truth.offset[position][:, None, None] + np.clip(minute, 0, None)
    values = np.where(inside, truth.bg[np.minimum(flat, len(truth.bg) - 1)], np.nan)
    return values.mean(axis=2)


# --- metrics -----------------------------------------------------------------------------------------------------


def rmse(forecast: np.ndarray, reference: np.ndarray) -> float:
    """Root mean squared error over the pairs where the reference is known (NaN when there are none)."""
    used = ~np.isnan(reference)
    if not used.any():
        return float("nan")
    return float(np.sqrt(np.mean((forecast[used] - reference[used]) ** 2)))


def clarke_zones(reference: np.ndarray, forecast: np.ndarray) -> np.ndarray:
    """Clarke error grid zone ("A".."E") of each (reference, forecast) pair in mg/dL, Clarke et al. 1987.

    A: within 20% of the reference, or both below 70. E: reference >= 180 and forecast <= 70, or reference <= 70
    and forecast >= 180 (treating the opposite). C: forecast >= reference + 110 for references 70-290, or
    forecast <= 7/5 reference - 182 for references 130-180 (overcorrection). D: reference >= 240 with forecast
    70-180, reference <= 70 with forecast between 70 (or 6/5 reference, whichever is higher) and 180 (failure
    to detect). B: everything else. A pair in two regions takes the first of A, E, C, D.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(forecast, dtype=np.float64)
    zone = np.full(np.broadcast(x, y).shape, "B", dtype="<U1")
    a = ((x <= 70) & (y <= 70)) | ((y >= 0.8 * x) & (y <= 1.2 * x))
    e = ((x >= 180) & (y <= 70)) | ((x <= 70) & (y >= 180))
    c = ((x >= 70) & (x <= 290) & (y >= x + 110)) | ((x >= 130) & (x <= 180) & (y <= 1.4 * x - 182))
    d = ((x >= 240) & (y >= 70) & (y <= 180)) | ((x <= 70) & (y >= np.maximum(70, 1.2 * x)) & (y <= 180))
    for mask, name in ((d, "D"), (c, "C"), (e, "E"), (a, "A")):  # later assignments win: A, then E, C, D
        zone = np.where(mask, name, zone)
    return zone


def clarke_shares(reference: np.ndarray, forecast: np.ndarray) -> dict[str, float]:
    """Shares of the pairs with a known reference in zone A and in zones A or B."""
    used = ~np.isnan(reference)
    zones = clarke_zones(reference[used], forecast[used])
    if zones.size == 0:
        return {"A": float("nan"), "A+B": float("nan")}
    return {"A": float(np.mean(zones == "A")), "A+B": float(np.mean((zones == "A") | (zones == "B")))}


def interval_coverage(pred: np.ndarray, target: np.ndarray) -> float:
    """Share of known targets (any horizon) inside [lower, upper] of `pred` (n, H, 3); NaN without targets."""
    known = ~np.isnan(target)
    if not known.any():
        return float("nan")
    inside = (pred[..., 0] <= target) & (target <= pred[..., 2])
    return float(inside[known].mean())


# --- one method on the test patients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One method's forecasts for a site's test windows, with what they are scored against."""

    median: np.ndarray  # (n, H) mg/dL
    interval: np.ndarray | None  # (n, H, 3) calibrated quantiles, or None for a point forecast
    truth: np.ndarray  # (n, H) true glucose
    cgm: np.ndarray  # (n, H) CGM target, NaN where the bin has no reading

    @classmethod
    def concat(cls, parts: Sequence[Scored]) -> Scored:
        """Several sites' test windows as one set (pooled over sites)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            arrays = [getattr(p, f.name) for p in parts]
            values[f.name] = None if any(a is None for a in arrays) else np.concatenate(arrays)
        return cls(**values)


def calibrated_interval(test_pred: np.ndarray, calibration_pred: np.ndarray, calibration: Windows) -> np.ndarray:
    """The test forecasts with their 5-95% interval conformalized on the site's calibration patients' CGM."""
    return apply(test_pred, calibrate(calibration_pred, calibration.target, alpha=0.1))


def score(scored: Scored) -> dict[str, Any]:
    """RMSE and Clarke shares at 30 and 60 minutes against truth (and RMSE against CGM); interval coverage."""
    result: dict[str, Any] = {"windows": int(scored.median.shape[0])}
    for minutes in HORIZONS_MIN:
        k = horizon_index(minutes)
        result[f"rmse{minutes}"] = rmse(scored.median[:, k], scored.truth[:, k])
        result[f"rmse{minutes}_vs_cgm"] = rmse(scored.median[:, k], scored.cgm[:, k])
        shares = clarke_shares(scored.truth[:, k], scored.median[:, k])
        result[f"clarke{minutes}_a"], result[f"clarke{minutes}_ab"] = shares["A"], shares["A+B"]
    if scored.interval is not None:
        result["coverage90_vs_cgm"] = interval_coverage(scored.interval, scored.cgm)
        result["coverage90_vs_truth"] = interval_coverage(scored.interval, scored.truth)
        for minutes in HORIZONS_MIN:
            k = horizon_index(minutes)
            result[f"coverage90_vs_truth_{minutes}"] = interval_coverage(
                scored.interval[:, k : k + 1], scored.truth[:, k : k + 1]
            )
    return result


def score_sites(per_site: Mapping[str, Scored]) -> dict[str, Any]:
    """Scores per site and pooled over every site's test windows."""
    return {"pooled": score(Scored.concat(list(per_site.values()))), "sites": {s: score(v) for s, v in
                                                                                 per_site.items()}}  # fmt: skip
