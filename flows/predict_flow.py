"""The prediction flow of one site: the registered twin's forecasts and what-if answers, validated, then published.

`site_predict` loads a registered model version (the newest unless one is named), cuts forecast windows from the
site's features at a fixed cadence over the last days up to each patient's newest CGM (the last one is the live
forecast of the next two hours), calibrates the intervals on the site's own calibration patients (conformal, the
offsets stay at the site), forecasts with each patient's dose effects calibrated on their own earlier records
(`models.twin.personal`, also at the site), answers every catalogue scenario (`models.twin.scenarios`), and runs the
prediction contract (`data_contracts.predictions`). A batch that passes is written under
`data/sites/<site>/predictions/<batch_id>/` for the site mart; one that fails is written under
`quarantine/predictions/<batch_id>/` with the failed checks and their reasons, is not published, and the flow
run fails saying so, while the previous batches and mart stay as they were. After a batch passes, the site's
DuckDB mart is rebuilt and published (`flows.marts`). Every row records the model version
and its input cut-off. Logs and artifacts carry counts and check names only, never a patient row.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from data_contracts import vocabulary as v
from data_contracts.gx_runner import run_contract
from data_contracts.predictions import PREDICTION_CONTRACT_VERSION, prediction_checks
from federated.registry import RegisteredModel, Registry
from flows.features import features_version, read_features
from flows.marts.flow import publish_site_mart
from flows.site_store import SiteStore, write_json_atomic, write_parquet_atomic
from models.twin import TwinSurrogate, Windows, apply, build_windows, calibrate, predict, split_patients
from models.twin.conformal import Calibration
from models.twin.forecast import forecast_windows
from models.twin.personal import PRIOR_SD, EffectEvidence, cutoffs, evidence, multipliers, personal_predict
from models.twin.scenarios import CATALOGUE, Scenario, apply_scenario, scenario

BIN_MIN = 5
HORIZONS = np.arange(1, 25) * BIN_MIN  # minutes after the origin bin's start: target bins 1..24
SENSOR_RANGE_MG_DL = (39.0, 600.0)  # what CGM sensors report (the harmonized contract's CGM range too)
MIN_PATIENTS_FOR_SPREAD = 11  # batch.json gives the multipliers' spread only over at least this many patients


class PredictionContractFailed(RuntimeError):
    """A prediction batch failed its contract: quarantined, not published."""


@task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def load_model(federation_dir: Path, version: str | None) -> RegisteredModel:
    """The named registered version, or the newest (a clear error when none is registered)."""
    registry = Registry(federation_dir)
    if version is not None:
        return registry.get(version)
    latest = registry.latest()
    if latest is None:
        raise FileNotFoundError(f"no registered twin in {registry.folder}: train one first (twinfed train)")
    return latest


@task(cache_policy=NO_CACHE, persist_result=False)
def forecast_batch(
    registered: RegisteredModel,
    store: SiteStore,
    every_min: int,
    days: float,
    scenarios: list[Scenario],
    personalize: bool = True,
) -> dict[str, Any]:
    """Forecast and what-if frames of the batch, the site-local calibration used, and the personalization's summary.

    With `personalize`, each patient's dose effects are scaled by multipliers fitted on that patient's own windows
    that ended by each cut-off (`models.twin.personal`), in the calibration windows as in the forecasts.
    """
    model = registered.model()
    features = read_features(store.features)
    recorded = build_windows(features)
    found = evidence(model, recorded) if personalize else None
    calibration_windows = split_patients(recorded).calibration
    raw = _personal(model, calibration_windows, _factors(found, calibration_windows))
    calibration = calibrate(raw, calibration_windows.target, alpha=0.1)
    last_ms = int(features.grid["bin_start"].dt.epoch("ms").max() or 0)  # type: ignore[arg-type]
    since = np.datetime64(last_ms - int(days * 86_400_000), "ms")
    windows = forecast_windows(features, every_bins=max(every_min // BIN_MIN, 1), since=since)
    factors = _factors(found, windows)
    baseline = _forecast(model, windows, calibration, factors)
    frames = {"forecast": _rows(windows, baseline, registered.version)}
    whatifs = []
    for chosen in scenarios:
        changed, applies = apply_scenario(windows, chosen)
        subset = changed.select(np.flatnonzero(applies))
        answer = _forecast(model, subset, calibration, None if factors is None else factors[applies])
        rows = _rows(subset, answer, registered.version).with_columns(
            pl.lit(chosen.scenario_id).alias("scenario_id"),
            pl.Series("baseline_q50", baseline[applies][:, :, 1].reshape(-1)),
        )
        whatifs.append(rows)
    frames["whatif"] = pl.concat(whatifs) if whatifs else _rows(windows.select(np.zeros(0, int)), baseline[:0], "")
    return {
        "frames": frames,
        "calibration": calibration,
        "windows": len(windows),
        "personalization": _personalization_summary(found, windows, factors),
    }


def _factors(found: EffectEvidence | None, windows: Windows) -> np.ndarray | None:
    """Each window's patient multipliers as of its cut-off (None: the shared model)."""
    return None if found is None else multipliers(found, windows.person_id, cutoffs(windows))


def _personal(model: TwinSurrogate, windows: Windows, factors: np.ndarray | None) -> np.ndarray:
    """Raw quantiles: the shared model's, or with each window's patient multipliers."""
    return predict(model, windows) if factors is None else personal_predict(model, windows, factors)


def _personalization_summary(
    found: EffectEvidence | None, windows: Windows, factors: np.ndarray | None
) -> dict[str, Any]:
    """Counts, and the spread of the patients' live multipliers when enough patients hide each one's own value."""
    if found is None or factors is None:
        return {"enabled": False}
    summary: dict[str, Any] = {
        "enabled": True,
        "method": "models.twin.personal",
        "prior_sd": PRIOR_SD,
        "patients_with_evidence": found.patients,
    }
    latest = np.lexsort((windows.t0, windows.person_id))  # each patient's newest cut-off is their live forecast
    last = (
        latest[np.r_[windows.person_id[latest][1:] != windows.person_id[latest][:-1], True]] if len(latest) else latest
    )
    if len(last) >= MIN_PATIENTS_FOR_SPREAD:
        summary["live_multiplier_p10_p50_p90"] = {
            name: [round(float(q), 3) for q in np.percentile(factors[last, k], (10, 50, 90))]
            for k, name in enumerate(("carbohydrate", "insulin"))
        }
    return summary


def _forecast(
    model: TwinSurrogate, windows: Windows, calibration: Calibration, factors: np.ndarray | None
) -> np.ndarray:
    """Calibrated quantiles, clipped to what a CGM sensor reports (39-600 mg/dL), as glucose forecasts are shown.

    The twin's dose responses are linear and can run past the body's floor within two hours. Clipping keeps the
    quantiles in order; the contract still catches what clipping cannot (NaN, missing horizons, unregistered
    versions).
    """
    return np.clip(apply(_personal(model, windows, factors), calibration), *SENSOR_RANGE_MG_DL)


def _rows(windows: Windows, quantiles: np.ndarray, version: str) -> pl.DataFrame:
    """One row per window and horizon: pseudonymous person, cut-off, target bin, calibrated quantiles."""
    n, steps = len(windows), len(HORIZONS)
    t0 = windows.t0.astype("datetime64[ms]").astype(np.int64)
    cutoff_ms = np.repeat(t0 + BIN_MIN * 60_000, steps)
    return pl.DataFrame(
        {
            "person_id": np.repeat(windows.person_id, steps),
            "model_version": np.full(n * steps, version, dtype=object),
            "input_cutoff": cutoff_ms,
            "horizon_min": np.tile(HORIZONS, n).astype(np.int16),
            "target_time": np.repeat(t0, steps) + np.tile(HORIZONS, n) * 60_000,
            "q05": quantiles[:, :, 0].reshape(-1),
            "q50": quantiles[:, :, 1].reshape(-1),
            "q95": quantiles[:, :, 2].reshape(-1),
        },
        schema_overrides={"model_version": pl.String()},
    ).with_columns(
        pl.from_epoch("input_cutoff", time_unit="ms").dt.replace_time_zone("UTC").dt.cast_time_unit("us"),
        pl.from_epoch("target_time", time_unit="ms").dt.replace_time_zone("UTC").dt.cast_time_unit("us"),
    )


@flow(name="site-predict", persist_result=False, log_prints=False)
def site_predict(
    site: str,
    data_dir: Path = Path("data"),
    federation_dir: Path | None = None,
    model_version: str | None = None,
    every_min: int = 60,
    days: float = 2.0,
    scenarios: list[str] | None = None,
    max_input_lag_min: float = 60.0,
    publish: bool = True,
    personalize: bool = True,
) -> dict[str, Any]:
    """Forecast every patient of `site` with the registered twin, answer the what-ifs, validate, publish.

    With `publish` a passing batch is followed by a rebuild of the site's mart (and its share for the federation).
    With `personalize` (the default) each patient's dose effects are calibrated on their own earlier records at the
    site (`models.twin.personal`); without, every patient gets the shared model's answer.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    federation_dir = Path(federation_dir).resolve() if federation_dir else data_dir / "federation"
    store = SiteStore.under(data_dir, site)
    chosen = [scenario(s) for s in scenarios] if scenarios is not None else list(CATALOGUE)
    registered = load_model(federation_dir, model_version)
    inputs = features_version(store.features)  # before reading them: a concurrent ingest must not relabel the batch
    batch = forecast_batch(registered, store, every_min, days, chosen, personalize)
    issued = datetime.now(UTC)
    batch_id = f"{issued:%Y%m%dT%H%M%SZ}-{registered.version}"
    frames = _finish(batch["frames"], site, batch_id, issued)
    frames["forecast"] = _with_freshness(frames["forecast"], store)
    checks = prediction_checks(registered_versions=Registry(federation_dir).versions(),
                               max_input_lag=timedelta(minutes=max_input_lag_min))  # fmt: skip
    run = run_contract(frames, checks, site_id=site, suite_name="predictions", workdir=store.gx / "predictions",
                       build_docs=False, keys={"forecast": "person_id", "whatif": "person_id"})  # fmt: skip
    failed = [r for r in run.results if r.status != "Passed" and r.status != "NotApplicable"]
    summary = {
        "batch_id": batch_id,
        "site": site,
        "model_version": registered.version,
        "data_version": inputs,  # the features the batch was predicted from (flows.features.features_version)
        "issued_at": issued.isoformat(),
        "input_cutoff_max": frames["forecast"]["input_cutoff"].max().isoformat() if frames["forecast"].height else None,  # type: ignore[union-attr]
        "rows": {name: frame.height for name, frame in frames.items()},
        "patients": frames["forecast"]["person_id"].n_unique(),
        "windows": batch["windows"],
        "scenarios": [{"scenario_id": s.scenario_id, "description": s.description} for s in chosen],
        "calibration": _calibration_summary(batch["calibration"]),
        "personalization": batch["personalization"],
        "contract": {
            "version": PREDICTION_CONTRACT_VERSION,
            "passed": not failed,
            "failed": [
                {
                    "check": r.check.name,
                    "status": r.status,
                    "violating": r.violating,
                    "reason": r.check.description,
                    "error": r.error,
                }
                for r in failed
            ],  # fmt: skip
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    folder = (store.root / "predictions" if not failed else store.root / "quarantine" / "predictions") / batch_id
    _write_batch(folder, frames, summary, run.row_flags if failed else None)
    _report(site, summary)
    if failed:
        names = ", ".join(f["check"] for f in summary["contract"]["failed"])
        raise PredictionContractFailed(
            f"{site}: prediction batch {batch_id} failed its contract ({names}); quarantined in {folder}, not "
            "published; the previous predictions and mart stay live. See batch.json there for the reasons."
        )
    logger.info("%s: batch %s published: %s rows, %s patients", site, batch_id, summary["rows"], summary["patients"])
    if publish:
        mart = publish_site_mart(data_dir, site)
        summary["mart"] = str(mart.database)
        logger.info("%s: site mart published at %s", site, mart.database)
    return summary


def _finish(frames: dict[str, pl.DataFrame], site: str, batch_id: str, issued: datetime) -> dict[str, pl.DataFrame]:
    """Add the batch's identity columns in the documented column order."""
    extra = [pl.lit(site).alias("site_id"), pl.lit(batch_id).alias("batch_id"),
             pl.lit(issued).dt.cast_time_unit("us").alias("issued_at")]  # fmt: skip
    order = ["site_id", "person_id", "model_version", "batch_id", "input_cutoff", "issued_at", "horizon_min",
             "target_time", "q05", "q50", "q95"]  # fmt: skip
    out = {}
    for name, frame in frames.items():
        frame = frame.with_columns(extra)
        out[name] = frame.select(order + [c for c in frame.columns if c not in order])
    return out


def _with_freshness(forecast: pl.DataFrame, store: SiteStore) -> pl.DataFrame:
    """Mark each patient's newest forecast as live, beside that patient's newest CGM in the harmonized store."""
    cgm = v.MEASUREMENTS["cgm_glucose"].concept_id
    newest = (
        store.read_table("measurement")
        .filter(pl.col("measurement_concept_id") == cgm)
        .group_by("person_id")
        .agg(pl.col("measurement_datetime").max().dt.cast_time_unit("us").alias("store_cgm_end"))
    )
    return forecast.join(newest, on="person_id", how="left", maintain_order="left").with_columns(
        (pl.col("input_cutoff") == pl.col("input_cutoff").max().over("person_id")).alias("live")
    )


def _calibration_summary(calibration: Calibration) -> dict[str, Any]:
    offsets = calibration.offsets
    return {"alpha": calibration.alpha, "offset_min": float(np.min(offsets)), "offset_max": float(np.max(offsets)),
            "finite": bool(np.isfinite(offsets).all())}  # fmt: skip


def _write_batch(folder: Path, frames: dict[str, pl.DataFrame], summary: dict[str, Any], flags: Any) -> None:
    """The batch's Parquet files, the flagged rows' positions if any, and batch.json last (it marks it complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        write_parquet_atomic(frame, folder / f"{name}.parquet")
    if flags:
        for name, flagged in flags.items():
            write_parquet_atomic(flagged, folder / f"{name}.flags.parquet")
    write_json_atomic(summary, folder / "batch.json")


def _report(site: str, summary: dict[str, Any]) -> None:
    contract = summary["contract"]
    lines = [
        f"# {site}: prediction batch {summary['batch_id']}",
        "",
        f"Model **{summary['model_version']}**, {summary['patients']} patients, rows {summary['rows']}.",
        "",
        f"Contract {contract['version']}: **{'passed' if contract['passed'] else 'FAILED, not published'}**.",
    ]
    lines += [f"- {f['check']}: {f['violating']} rows: {f['reason']}" for f in contract["failed"]]
    create_markdown_artifact("\n".join(lines), key=f"{site}-predictions", description="Prediction batch and contract")


def read_batches(data_dir: Path, site: str) -> list[dict[str, Any]]:
    """The site's published batches (batch.json of each), oldest first."""
    folder = SiteStore.under(data_dir, site).root / "predictions"
    if not folder.is_dir():
        return []
    found = [json.loads((p / "batch.json").read_text()) for p in folder.iterdir() if (p / "batch.json").is_file()]
    return sorted(found, key=lambda b: b["batch_id"])
