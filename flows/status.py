"""What `twinfed status` reports: each site's and the federation's last outputs, read from local files only.

Per site: the newest raw drop and whether the site flow has harmonized it as it is now, the last site-flow run
and its row counts, rows quarantined per source, failed prediction batches, the privacy ledger's spend, the live
model against the one behind the site's newest published predictions, and when its mart was published. Each stage
that failed or fell behind gets one line saying which command to run or which file to read. A failed stage leaves
the previous good outputs live (every stage publishes atomically), so the report says what is still being served.

Only counts, file names and the ids of runs, batches and models are read into the report, never a patient row.
No Prefect server is needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from federated.registry import Registry
from flows.ingest.mapping import DEFAULT_MAPPINGS_DIR, MappingError, mapping_for
from flows.ingest.pseudonym import load_or_create_secret
from flows.marts.layout import BATCH_FILE, SHARE_MANIFEST, SiteMartLayout, federation_mart_path
from flows.predict_flow import read_batches
from flows.site_flow import changed_files, drop_versions
from flows.site_store import SiteStore, fingerprint_files

# The site flow gives all series folders one ledger line named "imaging/ (N series folders)": one source.
IMAGING_SOURCE = "imaging/"


@dataclass(frozen=True)
class DropStatus:
    """The site's raw drop: how many files, the newest change, and whether the store holds it as it is now."""

    files: int
    newest_change: datetime | None
    harmonized: bool | None  # None: no mapping to judge it by


@dataclass(frozen=True)
class RunStatus:
    """The last site-flow run that changed the store, from its run record."""

    run_id: str
    finished: datetime
    outcome: str  # "completed", or "unbalanced" when a source's rows in != harmonized + quarantined + duplicates
    rows_in: int
    harmonized: int
    quarantined: int
    exact_duplicates: int


@dataclass(frozen=True)
class PrivacyStatus:
    """The site's privacy ledger: epsilon spent of its budget at its delta, over every recorded round."""

    epsilon_spent: float
    epsilon_budget: float
    epsilon_remaining: float
    delta: float
    rounds: int
    last_round_cost: float  # epsilon the newest round added; RDP composition makes the next like it cost no more


@dataclass(frozen=True)
class SiteStatus:
    """One site's state, stage by stage, with what to do where a stage failed or is behind."""

    site: str
    drop: DropStatus | None
    last_run: RunStatus | None
    quarantined_by_source: dict[str, int]  # rows, as of each source's last processing
    files_rejected: int  # whole files the last processing of their source could not read
    failed_batches: list[str]  # quarantined prediction batches, oldest first
    privacy: PrivacyStatus | None
    live_model: str | None
    predicted_with: str | None  # model of the newest published prediction batch
    newest_batch: str | None
    mart_published: datetime | None
    failed: bool  # the last run of some stage failed
    hints: list[str] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        """Rows quarantined over every source."""
        return sum(self.quarantined_by_source.values())


@dataclass(frozen=True)
class FederationStatus:
    """The registry's live model and the federation mart."""

    live_model: str | None
    versions: int
    rounds: int | None
    strategy: str | None
    registered: datetime | None
    mart_published: datetime | None
    hints: list[str] = field(default_factory=list)


def status_sites(data_dir: Path) -> list[str]:
    """Sites with a drop or a store under data_dir, sorted."""
    found = {p.name for kind in ("drops", "sites") if (data_dir / kind).is_dir() for p in (data_dir / kind).iterdir()
             if p.is_dir()}  # fmt: skip
    return sorted(found)


def site_status(
    data_dir: Path, site: str, federation_dir: Path, mappings_dir: Path = DEFAULT_MAPPINGS_DIR
) -> SiteStatus:
    """Read one site's drop, store, privacy ledger and predictions, and the registry, into a SiteStatus."""
    layout = SiteMartLayout.under(data_dir, site)
    store = layout.store
    hints: list[str] = []
    failed = False
    drop = _drop_status(data_dir / "drops" / site, store, mappings_dir, site)
    runs = _run_records(store)
    last_run = _run_status(runs[-1]) if runs else None
    if drop is None and last_run is None:
        hints.append(f"no drop in {data_dir / 'drops' / site} and no store: check the site id, or the export")
    elif last_run is None:
        hints.append(f"never ingested: run `twinfed ingest {site}`")
    elif drop is not None and drop.harmonized is False:
        hints.append(f"the drop has new or changed files: run `twinfed ingest {site}`")
    if last_run is not None and last_run.outcome != "completed":
        failed = True
        hints.append(f"run {last_run.run_id} does not balance its rows: read {store.runs / last_run.run_id}.json")
    quarantined, rejected = _quarantined_by_source(runs)
    batches = read_batches(data_dir, site)
    newest = batches[-1] if batches else None
    failed_batches = _failed_batches(store)
    if failed_batches and (newest is None or _time(failed_batches[-1]["issued_at"]) > _time(newest["issued_at"])):
        failed = True
        hints.append(_failed_batch_hint(store, site, failed_batches[-1], newest))
    live = Registry(federation_dir).latest()
    live_model = live.version if live is not None else None
    if live_model is not None and last_run is not None and (newest is None or newest["model_version"] != live_model):
        hints.append(f"no published predictions of the live model {live_model}: run `twinfed predict {site}`")
    privacy, privacy_error = _privacy_status(layout.privacy_ledger)
    if privacy_error is not None:
        failed = True
        hints.append(privacy_error)
    elif privacy is not None and privacy.epsilon_remaining <= 0:
        hints.append(f"privacy budget used up: {site} refuses further training rounds (budget in the ledger)")
    elif privacy is not None and privacy.rounds and privacy.epsilon_remaining < privacy.last_round_cost:
        hints.append(f"privacy budget nearly used up: {privacy.epsilon_remaining:.2f} left, the last round cost "
                     f"{privacy.last_round_cost:.2f}; {site} will refuse rounds like it")  # fmt: skip
    published = _site_mart_published(layout)
    if newest is not None and (published is None or published < _time(newest["issued_at"])):
        hints.append(f"the mart predates batch {newest['batch_id']}: run `twinfed marts build {site}`")
    return SiteStatus(
        site=site,
        drop=drop,
        last_run=last_run,
        quarantined_by_source=quarantined,
        files_rejected=rejected,
        failed_batches=[b["batch_id"] for b in failed_batches],
        privacy=privacy,
        live_model=live_model,
        predicted_with=newest["model_version"] if newest else None,
        newest_batch=newest["batch_id"] if newest else None,
        mart_published=published,
        failed=failed,
        hints=hints,
    )


def federation_status(federation_dir: Path, sites: list[SiteStatus]) -> FederationStatus:
    """The live model and the federation mart, with what to do if either is missing or behind the sites."""
    registry = Registry(federation_dir)
    live = registry.latest()
    mart = federation_mart_path(federation_dir)
    published = _mtime(mart) if mart.is_file() else None
    hints = []
    if live is None:
        hints.append("no model registered: run `twinfed train` once the sites are ingested")
    shared = [s.mart_published for s in sites if s.mart_published is not None]
    if shared and (published is None or published < max(shared)):
        hints.append("the federation mart predates a site mart: run `twinfed marts build`")
    meta = live.metadata if live is not None else {}
    return FederationStatus(
        live_model=live.version if live is not None else None,
        versions=len(registry.versions()),
        rounds=meta.get("rounds"),
        strategy=meta.get("strategy"),
        registered=_time(meta["registered_at"]) if meta.get("registered_at") else None,
        mart_published=published,
        hints=hints,
    )


def status_json(sites: list[SiteStatus], federation: FederationStatus) -> str:
    """Machine-readable status: one object per site (with its total quarantined rows) and the federation."""
    payload = {
        "sites": [asdict(s) | {"quarantined": s.quarantined} for s in sites],
        "federation": asdict(federation),
        "failed": any(s.failed for s in sites),
    }
    return json.dumps(payload, indent=2, default=_json_default)


def status_table(sites: list[SiteStatus]) -> Table:
    """One row per site: drop, last run and its rows, quarantine now, privacy, models, mart (times in UTC)."""
    table = Table(title="Sites (times UTC)")
    table.add_column("site")
    table.add_column("drop")
    table.add_column("last run", overflow="fold")
    for column in ("rows in", "harmonized", "quarantined", "quarantine now", "epsilon spent / budget"):
        table.add_column(column, justify="right")
    table.add_column("predicted with / live")
    table.add_column("mart")
    for s in sites:
        run = s.last_run
        table.add_row(
            f"[red]{s.site}[/red]" if s.failed else s.site,
            _drop_cell(s.drop),
            f"{run.run_id}" + ("" if run.outcome == "completed" else f" [red]{run.outcome}[/red]") if run else "-",
            *((f"{run.rows_in:,}", f"{run.harmonized:,}", f"{run.quarantined:,}") if run else ("-", "-", "-")),
            _quarantine_cell(s),
            _privacy_cell(s.privacy),
            _model_cell(s),
            _short(s.mart_published),
        )
    return table


def status_lines(sites: list[SiteStatus], federation: FederationStatus) -> list[str]:
    """The federation line, then each site's and the federation's hints (rich markup)."""
    live = federation.live_model or "none"
    lines = [
        f"Federation: live model [bold]{live}[/bold]"
        + (f" ({federation.rounds} rounds, {federation.strategy}, registered {_short(federation.registered)} UTC; "
           f"{federation.versions} version(s))" if federation.live_model else "")
        + f"; federation mart published {_short(federation.mart_published)} UTC"
    ]  # fmt: skip
    for s in sites:
        colour = "red" if s.failed else "yellow"
        lines += [f"[{colour}]{s.site}[/{colour}]: {hint}" for hint in s.hints]
    lines += [f"[yellow]federation[/yellow]: {hint}" for hint in federation.hints]
    return lines


def _drop_status(drop: Path, store: SiteStore, mappings_dir: Path, site: str) -> DropStatus | None:
    """Count and newest change of the drop's files; harmonized when the site flow would find nothing to do."""
    if not drop.is_dir():
        return None
    files = [p for p in drop.rglob("*") if p.is_file()]
    newest = max((_mtime(p) for p in files), default=None)
    state = store.read_state()
    if not state.get("last_run") or not store.secret.is_file():
        return DropStatus(files=len(files), newest_change=newest, harmonized=False)
    try:
        mapping = mapping_for(site, mappings_dir)
    except (MappingError, FileNotFoundError):
        return DropStatus(files=len(files), newest_change=newest, harmonized=None)
    prints = fingerprint_files(drop)
    versions = drop_versions(mappings_dir / f"{site}.toml", mapping, prints)
    changed = changed_files(prints, state, versions, load_or_create_secret(store.secret), force=False)
    return DropStatus(files=len(files), newest_change=newest, harmonized=not changed)


def _run_records(store: SiteStore) -> list[dict[str, Any]]:
    """The site's run records, oldest first (run ids start with their UTC time)."""
    if not store.runs.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(store.runs.glob("*.json"))]


def _run_status(run: dict[str, Any]) -> RunStatus:
    totals = {key: sum(entry[key] for entry in run["ledgers"])
              for key in ("rows_in", "harmonized", "quarantined", "exact_duplicates")}  # fmt: skip
    balanced = all(entry.get("balanced", True) for entry in run["ledgers"])
    return RunStatus(run_id=run["run_id"], finished=_run_time(run["run_id"]),
                     outcome="completed" if balanced else "unbalanced", **totals)  # fmt: skip


def _quarantined_by_source(runs: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """Rows quarantined per source as of the last run that processed it, and whole files rejected then.

    A later run that processes a source again replaces what the earlier one harmonized and quarantined from it.
    """
    latest: dict[str, dict[str, Any]] = {}
    for run in runs:
        for entry in run["ledgers"]:
            source = IMAGING_SOURCE if entry["file"].startswith(IMAGING_SOURCE) else entry["file"]
            latest[source] = entry
    counts = {source: int(entry["quarantined"]) for source, entry in sorted(latest.items())}
    return counts, sum(entry.get("file_error") is not None for entry in latest.values())


def _failed_batches(store: SiteStore) -> list[dict[str, Any]]:
    """Prediction batches that failed their contract (quarantine/predictions/<batch>/batch.json), oldest first."""
    folder = store.root / "quarantine" / "predictions"
    if not folder.is_dir():
        return []
    found = [json.loads((p / BATCH_FILE).read_text()) for p in folder.iterdir() if (p / BATCH_FILE).is_file()]
    return sorted(found, key=lambda b: _time(b["issued_at"]))


def _failed_batch_hint(store: SiteStore, site: str, batch: dict[str, Any], live: dict[str, Any] | None) -> str:
    checks = [f["check"] if isinstance(f, dict) else str(f) for f in batch.get("contract", {}).get("failed", [])]
    folder = store.root / "quarantine" / "predictions" / batch["batch_id"]
    still = f"batch {live['batch_id']} stays published" if live else "nothing is published yet"
    return (f"prediction batch {batch['batch_id']} failed its contract ({', '.join(checks) or 'see batch.json'}); "
            f"{still}: read the reasons in {folder / BATCH_FILE} (rows flagged in *.flags.parquet), fix the model "
            f"or data, then run `twinfed predict {site}`")  # fmt: skip


def _privacy_status(path: Path) -> tuple[PrivacyStatus | None, str | None]:
    """The ledger's spend (epsilon after its last round: spending only grows), or what is wrong with it."""
    if not path.is_file():
        return None, None
    try:
        ledger = json.loads(path.read_text())
        budget, delta = float(ledger["epsilon_budget"]), float(ledger["delta"])
        rounds = ledger["rounds"]
        spent = max((float(r["epsilon_after"]) for r in rounds), default=0.0)
        after = [0.0, *(float(r["epsilon_after"]) for r in rounds)]
        last_cost = after[-1] - after[-2]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"privacy ledger {path} is unreadable ({error}): restore it from backup before training"
    status = PrivacyStatus(epsilon_spent=spent, epsilon_budget=budget, epsilon_remaining=max(budget - spent, 0.0),
                           delta=delta, rounds=len(rounds), last_round_cost=last_cost)  # fmt: skip
    return status, None


def _site_mart_published(layout: SiteMartLayout) -> datetime | None:
    """When the site mart was last published: its share's build time, else the database file's."""
    manifest = layout.share / SHARE_MANIFEST
    if manifest.is_file():
        built = json.loads(manifest.read_text()).get("built_at")
        if built:
            return _time(built)
    return _mtime(layout.database) if layout.database.is_file() else None


def _drop_cell(drop: DropStatus | None) -> str:
    if drop is None:
        return "-"
    state = {True: "ingested", False: "[yellow]not ingested[/yellow]", None: "[yellow]no mapping[/yellow]"}
    return f"{drop.files} files, {_short(drop.newest_change)}, {state[drop.harmonized]}"


def _quarantine_cell(s: SiteStatus) -> str:
    parts = [f"{s.quarantined:,} rows"]
    if s.files_rejected:
        parts.append(f"{s.files_rejected} files")
    if s.failed_batches:
        parts.append(f"[red]{len(s.failed_batches)} batches[/red]")
    return ", ".join(parts)


def _privacy_cell(privacy: PrivacyStatus | None) -> str:
    if privacy is None:
        return "-"
    return f"{privacy.epsilon_spent:.2f} / {privacy.epsilon_budget:g} ({privacy.epsilon_remaining:.2f} left)"


def _model_cell(s: SiteStatus) -> str:
    live = s.live_model or "none"
    if s.predicted_with is None:
        return f"- / {live}"
    colour = "green" if s.predicted_with == s.live_model else "yellow"
    return f"[{colour}]{s.predicted_with}[/{colour}] / {live}"


def _run_time(run_id: str) -> datetime:
    return datetime.strptime(run_id.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def _time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def _short(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "-"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
