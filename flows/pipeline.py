"""The whole pipeline as Prefect flows: each site's flow, federated training, predictions, marts, reports.

`twinfed_run` is the parent flow (`twinfed run`, `twinfed demo`); its stages are flows of their own, so a Prefect
deployment can run each alone on the right machine (infra/prefect.yaml):

- `site_ingest` (flows/site_flow.py), one sub-flow per site: validate, quarantine, de-identify, harmonize.
- `federation_round`: train the twin by Flower simulation, or submit the run to a deployed SuperLink.
- `site_publish`, one per site: forecasts and what-ifs with the live model, contract, site mart, site report.
- `federation_publish`: the federation mart (aggregates only) and its report.

Every stage does only what is new, so running the same drop twice changes nothing:

- a site flow skips a drop it harmonized before;
- training runs while no model is registered, or when a site's data changed since the live model was trained
  (`trained_on.json` beside the registry records each site's data version, the id of the site run that last
  changed its store). Training spends privacy budget, so it never runs just because the pipeline did;
- a site predicts again only for a new model or new data (each batch records both), and rebuilds its mart only
  then or when the mart is missing;
- the federation mart is rebuilt only when a site published or the live model changed.

A failed stage leaves the previous good outputs live (site stores, batches, marts and models are all published
atomically), the later stages go on with what is there, and the run fails at the end naming what to do.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from federated.registry import Registry
from flows.features import features_version
from flows.marts.flow import publish_federation_mart, publish_site_mart
from flows.marts.layout import SHARE_MANIFEST, SiteMartLayout
from flows.predict_flow import read_batches, site_predict
from flows.report import write_reports
from flows.site_flow import site_ingest
from flows.site_store import SiteStore, write_json_atomic

DEFAULT_DATA_DIR = "data"
TRAINED_ON = "trained_on.json"
TrainPolicy = Literal["auto", "always", "never"]  # auto: no model yet, or new feature data since the live one


class StageFailed(RuntimeError):
    """One or more stages of a pipeline run failed; `failures` holds one line per failure with what to do."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(f"{len(failures)} stage(s) failed: " + " | ".join(failures))
        self.failures = failures


def data_version(data_dir: Path, site: str) -> str | None:
    """The version of the site's training features: a hash of their bytes (None before its first run).

    Content, not run ids: a forced re-ingest or a mapping edit that changes no feature retrains nothing.
    """
    return features_version(SiteStore.under(data_dir, site).features)


def trained_on(federation_dir: Path) -> dict[str, Any] | None:
    """What the live model was trained on: its version and each site's data version then (None if unrecorded)."""
    path = federation_dir / TRAINED_ON
    return json.loads(path.read_text()) if path.is_file() else None


def training_needed(data_dir: Path, federation_dir: Path, sites: list[str]) -> str | None:
    """Why the federation should train now (None: the live model is current for these sites' data)."""
    latest = Registry(federation_dir).latest()
    if latest is None:
        return "no model is registered yet"
    record = trained_on(federation_dir)
    if record is None or record.get("model_version") != latest.version:
        # Trained outside the pipeline (a deployed run, `infra/flower/simulate.sh`): that model is the live one,
        # and what it was trained on is not known here. Say so: automatic retraining waits for `--train always`.
        logging.getLogger(__name__).warning(
            "%s was registered outside `twinfed run` (no %s for it): not retraining on new data until a run with "
            "--train always", latest.version, federation_dir / TRAINED_ON)  # fmt: skip
        return None
    changed = [s for s in sites if record["data_versions"].get(s) != data_version(data_dir, s)]
    return f"new data at {', '.join(changed)} since {latest.version} was trained" if changed else None


def sites_short_of_budget(data_dir: Path, sites: list[str], run_config: dict[str, Any] | None) -> dict[str, str]:
    """The sites whose privacy ledger could not pay even one round of the planned training, with why.

    The same arithmetic each site's ledger does before it trains (`PrivacyLedger.epsilon_if`); a site with no
    ledger yet can pay (its first round is checked against its budget when it trains).
    """
    from federated.privacy import BudgetExceeded, PrivacyLedger  # noqa: PLC0415 (opacus: slow to import)
    from federated.twin_app import DEFAULTS, planned_noise  # noqa: PLC0415

    config = planned_noise(DEFAULTS | dict(run_config or {}))
    if not config["dp"]:
        return {}
    short = {}
    for site in sites:
        path = SiteMartLayout.under(data_dir, site).privacy_ledger
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        ledger = PrivacyLedger(path, site_id=site, epsilon_budget=float(stored["epsilon_budget"]),
                               delta=float(stored["delta"]))  # fmt: skip
        try:
            ledger.check_round(noise_multiplier=float(config["noise-multiplier"]),
                               sample_rate=float(config["patient-sample-rate"]),
                               steps=int(config["steps-per-round"]))  # fmt: skip
        except BudgetExceeded as refusal:
            short[site] = str(refusal)
    return short


# flwr's log carries each line twice, coloured and time-stamped; the time-stamped one is matched.
ROUND_LINE = re.compile(r"^[\d/]+ [\d:]+:INFO:(\[ROUND \d+/\d+\]|round \d+ evaluation: .*)$")


@contextmanager
def follow_rounds(folder: Path, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> Iterator[None]:
    """While inside, log each round's start and pooled evaluation from the run logs that appear in `folder`.

    `flwr log --stream` writes the run's log to `folder/<...>.log` as it goes; training takes minutes, and this
    is its progress display (round numbers and metrics only: the app never logs a patient row).
    """
    done = threading.Event()
    started = time.time()

    def tail() -> None:
        offsets: dict[Path, int] = {}
        while not done.wait(2.0):
            for log in folder.glob("*.log"):
                if log.stat().st_mtime < started:
                    continue
                with log.open(errors="replace") as handle:
                    handle.seek(offsets.get(log, 0))
                    for line in handle.read().splitlines():
                        if match := ROUND_LINE.match(line.strip()):
                            logger.info("training: %s", match.group(1)[:300])
                    offsets[log] = handle.tell()

    thread = threading.Thread(target=tail, name="follow-rounds", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5.0)


def _first_line(error: BaseException) -> str:
    """The error's first line, shortened: what to tell the user; the site's own logs keep the rest."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _sites_with_features(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "sites").glob("*") if (p / "features").is_dir())


@flow(name="federation-round", persist_result=False, log_prints=False)
def federation_round(
    data_dir: str = DEFAULT_DATA_DIR,
    sites: list[str] | None = None,
    federation_dir: str | None = None,
    run_config: dict[str, Any] | None = None,
    operator_home: str | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Train the twin across the sites and register it; return the registered version and run facts.

    Without `operator_home` this is a Flower simulation (one virtual SuperNode per site, `flwr run`). With it, the
    run is submitted to the deployed SuperLink that the operator's Flower configuration (FLWR_HOME) connects to;
    each hospital's SuperNode then reads its own data folder from its node config.
    """
    from federated.deploy import REPO_ROOT, Operator, simulate, stage_app, write_run_config  # noqa: PLC0415 (slow)

    logger = get_run_logger()
    started = time.perf_counter()
    root = Path(data_dir).resolve()
    chosen = sites or _sites_with_features(root)
    if not chosen:
        raise FileNotFoundError(f"no site has training features under {root / 'sites'}: run the site flows first")
    federation = Path(federation_dir).resolve() if federation_dir else root / "federation"
    versions = {site: data_version(root, site) for site in chosen}
    config = {"sites": ",".join(chosen), "data-dir": str(root), "federation-dir": str(federation),
              "min-nodes": len(chosen), "quorum": min(2, len(chosen))} | dict(run_config or {})  # fmt: skip
    logger.info("training over %s (%s)", ", ".join(chosen), "deployed SuperLink" if operator_home else "simulation")
    if operator_home is None:
        with follow_rounds(federation / "flwr-home", logger):
            result = simulate(config, flwr_home=federation / "flwr-home", num_supernodes=len(chosen), timeout=timeout)
    else:
        operator = Operator(Path(operator_home))
        runs = federation / "runs"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        run_id = operator.submit(stage_app(REPO_ROOT, runs / "app"), write_run_config(runs / f"{stamp}.toml", config))
        with follow_rounds(runs, logger):
            result = operator.wait(run_id, log=runs / f"{run_id}.log", timeout=timeout)
    result.check()
    latest = Registry(federation).latest()
    if latest is None:
        raise RuntimeError(f"run {result.run_id} completed but registered no model in {federation}")
    write_json_atomic({"model_version": latest.version, "data_versions": versions}, federation / TRAINED_ON)
    spent = {site: part["epsilon_spent"] for site, part in latest.metadata["sites"].items()}
    logger.info("registered %s after %d rounds; epsilon spent per site %s", latest.version,
                latest.metadata["rounds"], spent)  # fmt: skip
    return {"model_version": latest.version, "run_id": result.run_id, "rounds": latest.metadata["rounds"],
            "epsilon_spent": spent, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def predictions_current(data_dir: Path, site: str, model_version: str) -> bool:
    """Whether the site has a published batch of this model on its current data."""
    current = data_version(data_dir, site)
    return any(b["model_version"] == model_version and b.get("data_version") == current
               for b in read_batches(data_dir, site))  # fmt: skip


@flow(name="site-publish", persist_result=False, log_prints=False)
def site_publish(
    site: str,
    data_dir: str = DEFAULT_DATA_DIR,
    federation_dir: str | None = None,
    model_version: str | None = None,
    every_min: int = 60,
    days: float = 2.0,
) -> dict[str, Any]:
    """Predict with the live (or given) model if the site has no batch of it on its current data; publish the mart.

    Returns what was done: `predicted` (a new batch id or None), `mart` (published, kept or missing).
    """
    logger = get_run_logger()
    root = Path(data_dir).resolve()
    federation = Path(federation_dir).resolve() if federation_dir else root / "federation"
    registered = Registry(federation).get(model_version) if model_version else Registry(federation).latest()
    if registered is None:
        raise FileNotFoundError(f"no model is registered in {federation}: run a federation round first")
    outcome: dict[str, Any] = {"site": site, "model_version": registered.version, "predicted": None}
    if predictions_current(root, site, registered.version):
        logger.info("%s: predictions of %s on the current data are published; nothing to predict", site,
                    registered.version)  # fmt: skip
    else:
        batch = site_predict(site, data_dir=root, federation_dir=federation, model_version=registered.version,
                             every_min=every_min, days=days, publish=False)  # fmt: skip
        outcome["predicted"] = batch["batch_id"]
    if outcome["predicted"] or site_mart_stale(root, site):  # stale: an earlier publish failed after its batch
        outcome["mart"] = str(publish_site_mart(root, site).database)
        write_reports(root, federation, [site], federation=False)
    else:
        outcome["mart"] = "unchanged"
    return outcome


def site_mart_stale(data_dir: Path, site: str) -> bool:
    """Whether the site mart is missing or was built before the site's newest published batch."""
    manifest = SiteMartLayout.under(data_dir, site).share / SHARE_MANIFEST
    if not manifest.is_file():
        return True
    built = datetime.fromisoformat(json.loads(manifest.read_text())["built_at"])
    batches = read_batches(data_dir, site)
    return bool(batches) and built < datetime.fromisoformat(batches[-1]["issued_at"])


def federation_mart_stale(data_dir: Path, federation_dir: Path, sites: list[str]) -> bool:
    """Whether the federation mart is missing or older than a site's share or the newest registered model."""
    mart = federation_dir / "mart" / "federation.duckdb"
    if not mart.is_file():
        return True
    built = datetime.fromtimestamp(mart.stat().st_mtime, UTC)
    inputs = [SiteMartLayout.under(data_dir, s).share / SHARE_MANIFEST for s in sites]
    shares = [datetime.fromisoformat(json.loads(m.read_text())["built_at"]) for m in inputs if m.is_file()]
    latest = Registry(federation_dir).latest()
    if latest is not None:
        shares.append(datetime.fromisoformat(latest.metadata["registered_at"]))
    return any(when > built for when in shares)


@flow(name="federation-publish", persist_result=False, log_prints=False)
def federation_publish(
    data_dir: str = DEFAULT_DATA_DIR, federation_dir: str | None = None, force: bool = True
) -> dict[str, Any]:
    """Rebuild the federation mart from the sites' shares and the registry, and write the federation report.

    With `force` off an existing mart is kept (the pipeline passes it when no site published and no model changed).
    """
    root = Path(data_dir).resolve()
    federation = Path(federation_dir).resolve() if federation_dir else root / "federation"
    mart = federation / "mart" / "federation.duckdb"
    if not force and mart.is_file():
        return {"mart": "unchanged"}
    summary = publish_federation_mart(root, federation)
    write_reports(root, federation, [])
    return {"mart": str(summary.database)}


@flow(name="twinfed-run", persist_result=False, log_prints=False)
def twinfed_run(
    data_dir: str = DEFAULT_DATA_DIR,
    sites: list[str] | None = None,
    mappings_dir: str | None = None,
    run_config: dict[str, Any] | None = None,
    train: TrainPolicy = "auto",
    every_min: int = 60,
    days: float = 2.0,
    build_docs: bool = True,
) -> dict[str, Any]:
    """Every stage for every site: site flows, training (`train`: auto, always or never), predictions, marts.

    `auto` trains only when no model is registered or a site's data changed since the live model was trained.
    A failed stage keeps the previous good outputs live; the run goes on and fails at the end, naming each
    failure with what to do.
    """
    from flows.ingest.mapping import DEFAULT_MAPPINGS_DIR  # noqa: PLC0415

    if train not in ("auto", "always", "never"):
        raise ValueError(f"train must be auto, always or never, not {train!r}")
    logger = get_run_logger()
    started = time.perf_counter()
    root = Path(data_dir).resolve()
    mappings = Path(mappings_dir) if mappings_dir else DEFAULT_MAPPINGS_DIR
    # Default: every site this host has both a mapping and a drop for (a hospital's host has its own only).
    chosen = sites or sorted(p.stem for p in mappings.glob("*.toml") if (root / "drops" / p.stem).is_dir())
    if not chosen:
        raise FileNotFoundError(f"no site has both a mapping in {mappings} and a drop under {root / 'drops'}")
    federation = root / "federation"
    failures: list[str] = []
    summary: dict[str, Any] = {"sites": {}, "trained": None}

    logger.info("stage 1/4: site flows for %s", ", ".join(chosen))
    for site in chosen:
        try:
            run = site_ingest(site, data_dir=root, mappings_dir=mappings, build_docs=build_docs)
            summary["sites"][site] = {"ingest": "unchanged" if run.get("skipped") else run["run_id"]}
        except Exception as error:  # one site's failure must not stop the others
            logger.error("%s: site flow failed (%s), its store keeps the last good outputs", site, type(error).__name__)
            failures.append(f"{site} site flow: {_first_line(error)} -> fix the drop or mapping, then "
                            f"`twinfed ingest {site}`")  # fmt: skip
            summary["sites"][site] = {"ingest": "failed"}
    ready = [s for s in chosen if data_version(root, s) is not None]

    why = "asked to" if train == "always" else training_needed(root, federation, ready) if train == "auto" else None
    short = sites_short_of_budget(root, ready, run_config) if why else {}
    if why and len(ready) - len(short) < min(2, len(ready)):
        # Budget spent is a decision the hospitals made, not a failure: the live model stays and predictions go on.
        logger.warning("not training (%s): too few sites have privacy budget left for a round: %s", why, short)
        summary["training_skipped"] = f"privacy budget spent at {', '.join(sorted(short))}"
        why = None
    logger.info("stage 2/4: federated training: %s", f"training ({why})" if why else "not training, live model kept")
    if why and ready:
        try:
            summary["trained"] = federation_round(str(root), ready, str(federation), run_config)["model_version"]
        except Exception as error:  # predictions go on with the previous model
            logger.error("federated training failed; the previous model (if any) stays live: %s", type(error).__name__)
            failures.append(f"training: {_first_line(error)} -> read the run log in {federation / 'flwr-home'}, then "
                            "`twinfed train`")  # fmt: skip
    latest = Registry(federation).latest()

    logger.info("stage 3/4: predictions and site marts with %s", latest.version if latest else "no model")
    published: list[str] = []
    if latest is None:
        failures.append("no model is registered, so nothing was predicted -> `twinfed train`")
    live = latest.version if latest is not None else None
    for site in ready if live else []:
        try:
            outcome = site_publish(site, str(root), str(federation), live, every_min, days)
        except Exception as error:  # one site's failure must not stop the others
            logger.error("%s: not published, its previous predictions and mart stay live (%s)", site,
                         type(error).__name__)  # fmt: skip
            failures.append(f"{site} predictions: {_first_line(error)} -> `twinfed status {site}`, then "
                            f"`twinfed run {site}`")  # fmt: skip
            continue
        summary["sites"][site] |= {"predicted": outcome["predicted"], "mart": outcome["mart"]}
        if outcome["mart"] != "unchanged":
            published.append(site)

    logger.info("stage 4/4: federation mart and reports")
    shared = [s for s in chosen if (SiteMartLayout.under(root, s).share / SHARE_MANIFEST).is_file()]
    if not shared:
        summary["federation"] = "not built: no site has published a share yet"
    else:
        try:
            force = bool(published or summary["trained"]) or federation_mart_stale(root, federation, shared)
            summary["federation"] = federation_publish(str(root), str(federation), force=force)["mart"]
        except Exception as error:  # the previous federation mart stays live
            failures.append(f"federation mart: {_first_line(error)} -> `twinfed marts build`")
    summary["model_version"] = latest.version if latest else None
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if failures:
        raise StageFailed(failures)
    logger.info("pipeline done in %.0f s: %s", summary["seconds"], summary)
    return summary


__all__ = [
    "StageFailed",
    "data_version",
    "federation_publish",
    "federation_round",
    "site_publish",
    "training_needed",
    "twinfed_run",
]
