"""The `twinfed` command line: one subcommand per stage, each with --help."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, cast

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from federated.registry import Registry
from flows.demo_sites.generate import SiteSummary, generate_sites
from flows.demo_sites.profile import DEFAULT_PROFILES_DIR, ProfileError, SiteProfile, load_profiles
from flows.ingest.mapping import DEFAULT_MAPPINGS_DIR, MappingError
from flows.marts.cli import app as marts_app
from flows.marts.cli import query as marts_query
from flows.pipeline import StageFailed, TrainPolicy, federation_round, twinfed_run
from flows.predict_flow import PredictionContractFailed, site_predict
from flows.report import write_reports
from flows.site_flow import site_ingest
from flows.status import federation_status, site_status, status_json, status_lines, status_sites, status_table
from models.uva_padova.cohort import simulate_cohort
from models.uva_padova.export import DEMO_START, cohort_summary, write_cohort
from models.uva_padova.population import expand_population
from models.uva_padova.sensor import sensor_names

app = typer.Typer(
    name="twinfed",
    help="Federated multi-hospital digital twins: simulate, ingest, train, predict, query.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
sites_app = typer.Typer(help="Demo hospitals: list their profiles, generate their raw drops.", no_args_is_help=True)
app.add_typer(sites_app, name="sites")
app.add_typer(marts_app, name="marts")
# The analyst's everyday command at the top level too: `twinfed query SITE_OR_FEDERATION "SQL"`.
app.command("query")(marts_query)

DEFAULT_DATA_DIR = Path("data")
# `twinfed demo`'s hospitals: the profiles' sites, smaller (the profiles say 100 patients x 14 days each).
DEMO_PATIENTS = 40
DEMO_DAYS = 7


@app.command()
def simulate(
    patients: Annotated[int, typer.Option(min=1, help="Number of distinct virtual patients.")] = 30,
    days: Annotated[int, typer.Option(min=1, help="Days to simulate per patient.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same data, bit for bit.")] = 42,
    sensor: Annotated[str, typer.Option(help=f"CGM sensor model: one of {', '.join(sensor_names())}.")] = "Dexcom",
    out: Annotated[Path, typer.Option(help="Folder for the Parquet tables.")] = DEFAULT_DATA_DIR / "simulated",
    human_error: Annotated[bool, typer.Option(help="Draw missed/late boluses and carb-count errors.")] = True,
) -> None:
    """Simulate a virtual cohort with the UVA/Padova twin and write its tables as Parquet."""
    if sensor not in sensor_names():
        raise typer.BadParameter(f"unknown sensor {sensor!r}; choose one of {sensor_names()}", param_hint="--sensor")
    started = time.perf_counter()
    run = simulate_cohort(patients, days, seed=seed, sensor=sensor, human_error=human_error)
    elapsed = time.perf_counter() - started
    paths = write_cohort(run, out, DEMO_START)
    _print_summary(run_summary=cohort_summary(run), elapsed=elapsed, patient_days=patients * days)
    console.print(f"Wrote {', '.join(p.name for p in paths.values())} to [bold]{out}[/bold]")


@app.command()
def population(
    patients: Annotated[int, typer.Option(min=1, help="Number of virtual patients to draw.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the perturbation.")] = 42,
    show: Annotated[int, typer.Option(min=1, help="Rows to print.")] = 20,
) -> None:
    """Show the expanded virtual population: base patient, perturbation factors and therapy."""
    pop = expand_population(patients, seed=seed)
    table = Table(title=f"{patients} virtual patients (seed {seed})")
    for column in ("patient", "cohort", "BW kg", "insulin sens.", "basal U/h", "CR g/U", "CF mg/dL/U", "TDI U"):
        table.add_column(column, justify="left" if column in ("patient", "cohort") else "right")
    for i in range(min(show, patients)):
        table.add_row(
            pop.names[i],
            pop.cohort[i],
            f"{pop.BW[i]:.1f}",
            f"{pop.extra['insulin_sensitivity'][i]:.2f}",
            f"{pop.basal_u_per_min[i] * 60:.2f}",
            f"{pop.cr[i]:.1f}",
            f"{pop.cf[i]:.1f}",
            f"{pop.tdi[i]:.1f}",
        )
    console.print(table)


@sites_app.command("list")
def sites_list(
    profiles: Annotated[Path, typer.Option(help="Folder of site profiles (*.toml).")] = DEFAULT_PROFILES_DIR,
) -> None:
    """List the demo hospitals defined by the site profiles."""
    table = Table(title=f"Site profiles in {profiles}")
    for column in ("site", "name", "format", "patients", "days", "cohort mix", "sensor", "time zone"):
        table.add_column(column)
    for p in _load_profiles_or_exit(profiles):
        mix = ", ".join(f"{k} {v:g}" for k, v in p.cohort.mix.items())
        table.add_row(
            p.site.id,
            p.site.name,
            p.export.format,
            str(p.cohort.patients),
            str(p.cohort.days),
            mix,
            p.cohort.sensor,
            p.export.time_zone,
        )
    console.print(table)


@sites_app.command("generate")
def sites_generate(
    profiles: Annotated[Path, typer.Option(help="Folder of site profiles (*.toml).")] = DEFAULT_PROFILES_DIR,
    data_dir: Annotated[Path, typer.Option(help="Data folder: drops/<site> and ground_truth/<site> go here.")] = (
        DEFAULT_DATA_DIR
    ),
    site: Annotated[list[str] | None, typer.Option(help="Only these site ids (repeat the option).")] = None,
    patients: Annotated[int | None, typer.Option(min=1, help="Override every profile's patient count.")] = None,
    days: Annotated[int | None, typer.Option(min=1, help="Override every profile's number of days.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Sites generated in parallel processes.")] = 2,
) -> None:
    """Write each demo hospital's raw drop (records, device data, DICOM) with faults, and its ground truth."""
    chosen = _load_profiles_or_exit(profiles)
    if site:
        unknown = sorted(set(site) - {p.site.id for p in chosen})
        if unknown:
            raise typer.BadParameter(f"unknown site ids {unknown}", param_hint="--site")
        chosen = [p for p in chosen if p.site.id in site]
    chosen = [p.with_overrides(patients=patients, days=days) for p in chosen]
    started = time.perf_counter()
    summaries = generate_sites(chosen, data_dir, workers=workers)
    _print_sites(summaries, time.perf_counter() - started, data_dir)


@app.command()
def ingest(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with a mapping).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Drops under DATA_DIR/drops, stores under DATA_DIR/sites.")] = (
        DEFAULT_DATA_DIR
    ),
    mappings: Annotated[Path, typer.Option(help="Folder of site mapping files (*.toml).")] = DEFAULT_MAPPINGS_DIR,
    force: Annotated[bool, typer.Option(help="Reprocess files already harmonized.")] = False,
    docs: Annotated[bool, typer.Option(help="Build Great Expectations Data Docs.")] = True,
) -> None:
    """Run each site's flow: validate, quarantine, de-identify, harmonize, build the twin's features."""
    chosen = sites or sorted(p.stem for p in mappings.glob("*.toml"))
    runs, failed = [], []
    for site in chosen:  # one site's failure does not stop the others
        try:
            runs.append(site_ingest(site, data_dir=data_dir, mappings_dir=mappings, force=force, build_docs=docs))
        except (MappingError, FileNotFoundError, ValueError, RuntimeError) as error:
            console.print(f"[red]{site}: {error}[/red] (its store keeps the last good outputs)")
            failed.append(site)
    _print_ingest(runs, data_dir)
    if failed:
        raise typer.Exit(code=2)


@app.command()
def train(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with features).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Stores under DATA_DIR/sites.")] = DEFAULT_DATA_DIR,
    federation_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints and registry (default DATA_DIR/federation).")
    ] = None,
    run_config: Annotated[
        str, typer.Option(help="Run-config overrides, e.g. 'num-server-rounds=5 strategy=\"fedprox\"'.")
    ] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run.")] = 1800.0,
) -> None:
    """Train the twin by federated simulation (`flwr run`, one virtual hospital per site) with patient-level DP."""
    from flwr.common.config import parse_config_args  # noqa: PLC0415 (flwr's CLI stack: slow to import)

    from federated.deploy import DeploymentError  # noqa: PLC0415

    data_dir = data_dir.resolve()
    chosen = sites or sorted(p.name for p in (data_dir / "sites").glob("*") if (p / "features").is_dir())
    if not chosen:
        console.print(f"[red]No site has training features under {data_dir / 'sites'}[/red]: run `twinfed ingest`.")
        raise typer.Exit(code=2)
    federation = (federation_dir or data_dir / "federation").resolve()
    started = time.perf_counter()
    with console.status(f"Federated training over {', '.join(chosen)} (Flower simulation)..."):
        try:
            federation_round(str(data_dir), chosen, str(federation), parse_config_args([run_config] if run_config
                             else None), timeout=timeout)  # fmt: skip
        except DeploymentError as error:
            console.print(f"[red]Training failed[/red]: {error}")
            raise typer.Exit(code=2) from error
    latest = Registry(federation).latest()
    assert latest is not None  # a completed run registers its model
    _print_model(latest.version, latest.metadata, time.perf_counter() - started)


def _print_model(version: str, meta: dict[str, Any], elapsed: float) -> None:
    table = Table(title=f"Registered {version}: {meta['rounds']} rounds, {meta['strategy']}, {elapsed:.0f} s")
    for column in ("site", "examples", "rounds trained", "refused", "epsilon spent", "budget"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for site, part in meta["sites"].items():
        spent = part["epsilon_spent"]
        table.add_row(site, f"{part['examples']:,}", str(part["rounds_trained"]), str(part["rounds_refused"]),
                      "-" if spent is None else f"{spent:.2f}", f"{part['epsilon_budget']:g}")  # fmt: skip
    console.print(table)
    metrics = meta.get("metrics") or {}
    if metrics.get("rmse-30") is not None:
        rmse, persistence, coverage = metrics["rmse-30"], metrics["persistence-rmse-30"], metrics["coverage-90"]
        console.print(f"Held-out test patients: RMSE 30 min {rmse:.1f} mg/dL (persistence {persistence:.1f}), "
                      f"90% interval coverage {coverage:.3f}")  # fmt: skip


@app.command()
def predict(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with a mapping).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Stores under DATA_DIR/sites.")] = DEFAULT_DATA_DIR,
    federation_dir: Annotated[Path | None, typer.Option(help="Registry folder (default DATA_DIR/federation).")] = None,
    model_version: Annotated[str | None, typer.Option(help="A registered version (default: the newest).")] = None,
    every_min: Annotated[int, typer.Option(help="Minutes between forecast origins.")] = 60,
    days: Annotated[float, typer.Option(help="Days back from each site's newest data to forecast from.")] = 2.0,
    scenario: Annotated[
        list[str] | None, typer.Option(help="What-if scenario ids (default: the whole catalogue).")
    ] = None,
    personalize: Annotated[
        bool, typer.Option(help="Calibrate each patient's dose effects on their own earlier records at the site.")
    ] = True,
) -> None:
    """Forecast every patient with the registered twin, answer the what-ifs, validate, and publish per site."""
    chosen = sites or sorted(p.stem for p in DEFAULT_MAPPINGS_DIR.glob("*.toml"))
    table = Table(title="Prediction batches")
    for column in ("site", "batch", "model", "patients", "forecast rows", "what-if rows", "contract", "s"):
        table.add_column(column, justify="left" if column in ("site", "batch", "model", "contract") else "right")
    failed = []
    for site in chosen:  # one site's failure does not stop the others
        try:
            run = site_predict(site, data_dir=data_dir, federation_dir=federation_dir, model_version=model_version,
                               every_min=every_min, days=days, scenarios=scenario,
                               personalize=personalize)  # fmt: skip
        except (PredictionContractFailed, FileNotFoundError, KeyError, ValueError) as error:
            console.print(f"[red]{site}: {error}[/red]")
            failed.append(site)
            continue
        rows = run["rows"]
        table.add_row(site, run["batch_id"], run["model_version"], str(run["patients"]), f"{rows['forecast']:,}",
                      f"{rows['whatif']:,}", "passed", f"{run['seconds']:.1f}")  # fmt: skip
    console.print(table)
    if failed:
        raise typer.Exit(code=2)


@app.command()
def report(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with a mapping).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Stores under DATA_DIR/sites.")] = DEFAULT_DATA_DIR,
    federation_dir: Annotated[
        Path | None, typer.Option(help="Federation folder (default DATA_DIR/federation).")
    ] = None,
) -> None:
    """Write an offline HTML page per site mart (kept at the site) and one for the federation mart."""
    chosen = sites or sorted(p.stem for p in DEFAULT_MAPPINGS_DIR.glob("*.toml"))
    pages = write_reports(data_dir, federation_dir or data_dir / "federation", chosen)
    if not pages:
        console.print("[red]No published mart to report on[/red]: run `twinfed predict` (and `twinfed marts build`).")
        raise typer.Exit(code=2)
    for page in pages:
        console.print(f"{page.target}: [bold]{page.path}[/bold] ({page.plots} plots)")


@app.command()
def status(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with a drop or store).")] = (
        None
    ),
    data_dir: Annotated[Path, typer.Option(help="Drops under DATA_DIR/drops, stores under DATA_DIR/sites.")] = (
        DEFAULT_DATA_DIR
    ),
    federation_dir: Annotated[Path | None, typer.Option(help="Registry and federation mart folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of the table.")] = False,
) -> None:
    """Per site: last drop, last flow run, quarantine, privacy spent, live model, mart; exit 2 if a stage failed."""
    federation = federation_dir or data_dir / "federation"
    found = [site_status(data_dir, site, federation) for site in sites or status_sites(data_dir)]
    overall = federation_status(federation, found)
    if as_json:
        typer.echo(status_json(found, overall))
    else:
        console.print(status_table(found))
        for line in status_lines(found, overall):
            console.print(line)
    if any(s.failed for s in found):
        raise typer.Exit(code=2)


@app.command("run")
def run_pipeline(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with a mapping).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Drops under DATA_DIR/drops; stores, models, marts under it.")] = (
        DEFAULT_DATA_DIR
    ),
    train: Annotated[str, typer.Option(help="auto (no model yet, or new data), always, or never.")] = "auto",
    run_config: Annotated[
        str, typer.Option(help="Run-config overrides for training, e.g. 'num-server-rounds=5'.")
    ] = "",
    every_min: Annotated[int, typer.Option(help="Minutes between forecast origins.")] = 60,
    days: Annotated[float, typer.Option(help="Days back from each site's newest data to forecast from.")] = 2.0,
    docs: Annotated[bool, typer.Option(help="Build Great Expectations Data Docs.")] = True,
) -> None:
    """The whole pipeline as one Prefect flow (`twinfed-run`, sub-flows per site), on PREFECT_API_URL or a local one.

    Site flows, federated DP training (only when needed: it spends privacy budget), predictions and site marts,
    the federation mart and the reports. Running the same drop again changes nothing.
    """
    from flwr.common.config import parse_config_args  # noqa: PLC0415 (flwr's CLI stack: slow to import)

    if train not in ("auto", "always", "never"):
        raise typer.BadParameter("choose auto, always or never", param_hint="--train")
    try:
        overrides = parse_config_args([run_config] if run_config else None)
        summary = twinfed_run(str(data_dir), sites, run_config=overrides, train=cast(TrainPolicy, train),
                              every_min=every_min, days=days, build_docs=docs)  # fmt: skip
    except StageFailed as error:
        console.print("[red]Some stages failed[/red]; their previous good outputs stay live. What to do:")
        for failure in error.failures:
            console.print(f"  - {failure}")
        raise typer.Exit(code=2) from error
    _print_run(summary, data_dir)


def _print_run(summary: dict[str, Any], data_dir: Path) -> None:
    table = Table(title=f"Pipeline run: model {summary['model_version']}, {summary['seconds']:.0f} s")
    for column in ("site", "site flow", "prediction batch", "site mart"):
        table.add_column(column)
    for site, done in summary["sites"].items():
        table.add_row(site, done.get("ingest", "-"), done.get("predicted") or "unchanged", done.get("mart", "-"))
    console.print(table)
    trained = summary["trained"] or summary.get("training_skipped") or "no (the live model is current)"
    console.print(f"Trained: {trained}; federation mart: "
                  f"{summary.get('federation', '-')}")  # fmt: skip


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = DEFAULT_DATA_DIR,
    profiles: Annotated[Path, typer.Option(help="Folder of site profiles (*.toml).")] = DEFAULT_PROFILES_DIR,
    patients: Annotated[int, typer.Option(min=1, help="Patients per demo hospital.")] = DEMO_PATIENTS,
    days: Annotated[int, typer.Option(min=1, help="Days of data per demo hospital.")] = DEMO_DAYS,
) -> None:
    """The whole pipeline on embedded defaults: sites, site flows, federated DP training, predictions, marts, report.

    Generates the demo hospitals if absent (smaller than their profiles, so the demo takes minutes; `twinfed sites
    generate` makes the full ones), then runs `twinfed run`. Each stage that has nothing new to do is skipped;
    training spends privacy budget, so it runs only while no model is registered or when data changed.
    """
    chosen = [p.with_overrides(patients=patients, days=days) for p in _load_profiles_or_exit(profiles)]
    site_ids = [p.site.id for p in chosen]
    missing = [p for p in chosen if not (data_dir / "drops" / p.site.id).is_dir()]
    if missing:
        started = time.perf_counter()
        with console.status(f"Generating {len(missing)} demo hospitals ({patients} patients x {days} days each)..."):
            summaries = generate_sites(missing, data_dir, workers=2)
        _print_sites(summaries, time.perf_counter() - started, data_dir)
    run_pipeline(sites=site_ids, data_dir=data_dir, train="auto", run_config="", every_min=60, days=2.0, docs=True)
    federation = data_dir / "federation"
    console.print(
        f"\nEverything is under [bold]{data_dir}[/bold]: drops/ (raw), sites/<site>/ (each hospital's store, "
        f"quarantine, Data Docs in gx/, predictions/, mart/site.duckdb, report/index.html) and federation/ "
        f"(registry, mart/federation.duckdb, report/index.html).\n"
        "Try:\n"
        f'  twinfed query {site_ids[0]} "SELECT horizon_min, rmse_mg_dl, persistence_rmse_mg_dl, coverage_90_pct '
        'FROM mart_forecast_accuracy ORDER BY horizon_min"\n'
        f'  twinfed query {site_ids[0]} "SELECT scenario_id, horizon_min, median_change_mg_dl FROM mart_whatif_effect '
        'WHERE horizon_min = 120"\n'
        '  twinfed query federation "SELECT site_id, round_id, epsilon_after, epsilon_budget FROM fct_privacy_ledger"\n'
        f"  twinfed status --data-dir {data_dir}   (and open {federation / 'report' / 'index.html'})"
    )


def _load_profiles_or_exit(folder: Path) -> list[SiteProfile]:
    try:
        return load_profiles(folder)
    except ProfileError as error:
        console.print(f"[red]Site profile error:[/red] {error}")
        raise typer.Exit(code=2) from error


def _print_sites(summaries: list[SiteSummary], elapsed: float, data_dir: Path) -> None:
    table = Table(title=f"Generated {len(summaries)} demo hospitals in {elapsed:.1f} s")
    for column in ("site", "format", "patients x days", "files", "MB", "records", "faults injected"):
        table.add_column(column, justify="left" if column in ("site", "format") else "right")
    for s in summaries:
        table.add_row(
            s.site_id,
            s.export_format,
            f"{s.patients} x {s.days}",
            str(s.files),
            f"{s.bytes / 1e6:.1f}",
            f"{sum(s.rows.values()):,}",
            f"{sum(s.faults.values()):,}",
        )
    console.print(table)
    console.print(
        f"Raw drops under [bold]{data_dir / 'drops'}[/bold]; ground truth and fault manifests "
        f"under [bold]{data_dir / 'ground_truth'}[/bold] (never read by the pipeline)."
    )


def _print_ingest(runs: list[dict[str, Any]], data_dir: Path) -> None:
    table = Table(title="Site flows")
    for column in ("site", "rows in", "harmonized", "quarantined", "exact duplicates", "features (patients)", "s"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for run in runs:
        if run["skipped"]:
            table.add_row(run["site"], "unchanged drop: nothing to do", "", "", "", "", "")
            continue
        totals = {k: sum(e[k] for e in run["ledgers"]) for k in ("rows_in", "harmonized", "quarantined",
                                                                  "exact_duplicates")}  # fmt: skip
        table.add_row(run["site"], *(f"{totals[k]:,}" for k in totals), str(run["features"]["patients"]),
                      f"{run['seconds']['total']:.1f}")  # fmt: skip
    console.print(table)
    console.print(
        f"Harmonized tables, features, quarantine and Data Docs under [bold]{data_dir / 'sites'}/<site>[/bold]; "
        "each run's record in runs/, its report as Prefect artifacts."
    )


def _print_summary(*, run_summary: pl.DataFrame, elapsed: float, patient_days: int) -> None:
    table = Table(title=f"Simulated {patient_days} patient-days in {elapsed:.1f} s (true plasma glucose)")
    columns = {
        "cohort": ("cohort", "{}"),
        "patients": ("patients", "{}"),
        "mean_mg_dl": ("mean mg/dL", "{:.0f}"),
        "cv_percent": ("CV %", "{:.0f}"),
        "gmi_percent": ("GMI %", "{:.1f}"),
        "tir_70_180_percent": ("TIR %", "{:.0f}"),
        "tbr_below_70_percent": ("<70 %", "{:.1f}"),
        "tbr_below_54_percent": ("<54 %", "{:.1f}"),
        "tar_above_250_percent": (">250 %", "{:.1f}"),
        "boluses_missed_percent": ("missed bolus %", "{:.0f}"),
        "boluses_late_percent": ("late bolus %", "{:.0f}"),
    }
    for title, _ in columns.values():
        table.add_column(title, justify="left" if title == "cohort" else "right")
    for row in run_summary.iter_rows(named=True):
        table.add_row(*(fmt.format(row[key]) for key, (_, fmt) in columns.items()))
    console.print(table)


if __name__ == "__main__":
    app()
