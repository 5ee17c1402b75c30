"""`twinfed report`: one self-contained HTML page per site mart, and one for the federation mart, viewable offline.

A site's page (written inside the site's folder, `data/sites/<site>/report/index.html`: it shows one pseudonymous
patient and never leaves the site) has: the 30-minute-ahead forecast against the CGM later recorded, with its 90%
interval, for the patient with the most scored forecasts; that patient's newest forecast with each what-if
scenario side by side, with a table of what each scenario changes over the two hours (mean glucose, expected time
in range); and the site's accuracy by horizon against persistence with interval coverage. The
federation page (`data/federation/report/index.html`, aggregates only) shows the privacy each site has spent
round by round against its budget, and the pooled accuracy of each round. Plots are PNG embedded as base64 (no
script, no network); everything is read through read-only connections to the published marts.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")  # no display: render to memory only
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from flows.marts.query import QueryError, connect_read_only, mart_path  # noqa: E402
from flows.site_store import replace_atomically  # noqa: E402

FEDERATION = "federation"
STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}p.note{color:#555;font-size:.9em}
img{max-width:100%}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"""


@dataclass(frozen=True)
class Page:
    """One written report page and how many plots it holds."""

    target: str
    path: Path
    plots: int


def write_reports(data_dir: Path, federation_dir: Path, sites: list[str], *, federation: bool = True) -> list[Page]:
    """Write the page of each site that has a mart, then (with `federation`) the federation's, if its mart exists.

    A hospital's host writes its own page only: the federation folder it can read is not its to write.
    """
    pages = []
    for site in sites:
        try:
            mart = mart_path(site, data_dir=data_dir, federation_dir=federation_dir)
        except QueryError:
            continue
        pages.append(_write(data_dir / "sites" / site / "report" / "index.html", site, _site_sections(mart, site)))
    if not federation:
        return pages
    try:
        mart = mart_path(FEDERATION, data_dir=data_dir, federation_dir=federation_dir)
    except QueryError:
        return pages
    pages.append(_write(federation_dir / "report" / "index.html", FEDERATION, _federation_sections(mart)))
    return pages


Section = tuple[str, str, Figure | None, pl.DataFrame | None]  # heading, note, plot, table under it
# A patient's newest cut-off among those the most scenarios answer (a live forecast plans no meal); binds person_id.
CHOSEN_CUTOFF = (
    "WITH chosen AS (SELECT batch_id, input_cutoff FROM fct_whatif WHERE person_id = ? GROUP BY batch_id, "
    "input_cutoff ORDER BY count(DISTINCT scenario_id) DESC, input_cutoff DESC, batch_id DESC LIMIT 1) "
)


def _site_sections(mart: Path, site: str) -> list[Section]:
    con = connect_read_only(mart)
    try:
        forecast = _frame(
            con,
            "WITH best AS (SELECT person_id FROM fct_glucose_forecast WHERE NOT superseded AND horizon_min = 30 "
            "AND observed_mg_dl IS NOT NULL GROUP BY person_id ORDER BY count(*) DESC, person_id LIMIT 1) "
            "SELECT f.person_id, target_time, q05, q50, q95, observed_mg_dl FROM fct_glucose_forecast f JOIN best "
            "USING (person_id) WHERE NOT superseded AND horizon_min = 30 ORDER BY target_time",
        )
        person = int(forecast["person_id"][0]) if forecast.height else None
        whatif = _frame(
            con,
            CHOSEN_CUTOFF + "SELECT scenario_id, horizon_min, q50, baseline_q50 FROM fct_whatif "
            "JOIN chosen USING (batch_id, input_cutoff) WHERE person_id = ? ORDER BY scenario_id, horizon_min",
            [person, person],
        )
        # What each scenario changes over the two hours, for the same patient and cut-off (mart_whatif_patient).
        summary = _frame(
            con,
            CHOSEN_CUTOFF + "SELECT scenario_id AS scenario, round(change_mean_mg_dl, 1) AS "
            '"change in mean glucose, mg/dL", round(baseline_expected_tir_pct, 1) AS "expected time in range '
            '70-180 without, %", round(change_expected_tir_pct, 1) AS "change in expected time in range, points" '
            "FROM mart_whatif_patient JOIN chosen USING (batch_id, input_cutoff) WHERE person_id = ? "
            "ORDER BY scenario_id",
            [person, person],
        )
        accuracy = _frame(
            con,
            "SELECT model_version, horizon_min, rmse_mg_dl, persistence_rmse_mg_dl, coverage_90_pct, n_scored "
            "FROM mart_forecast_accuracy ORDER BY model_version, horizon_min",
        )
    finally:
        con.close()
    return [
        (f"Forecast 30 minutes ahead vs CGM: patient {person}",
         "The median forecast made 30 minutes before each 5-minute bin, its calibrated 90% interval, and the CGM "
         "later recorded there. The patient is the one with the most scored forecasts (pseudonymous id).",
         _forecast_plot(forecast) if forecast.height else None, None),
        ("What if: one forecast under each scenario",
         "The same patient, at the newest cut-off that the most scenarios answer: the median forecast under the "
         "recorded plan and under each catalogue scenario (scenarios about a meal need a planned meal). The table "
         "gives what each scenario changes over the two hours: the mean of the median forecast, and the expected "
         "time in range 70-180 mg/dL, which weighs each 5-minute bin by its chance of being in range under the "
         "calibrated 90% intervals (a median just outside a bound still counts in part).",
         _whatif_plot(whatif) if whatif.height else None, summary if summary.height else None),
        ("Accuracy by horizon",
         "RMSE of the median forecast against the CGM recorded later, beside last-value persistence, and the "
         "share of CGM inside the 90% interval (target 90%).",
         _accuracy_plot(accuracy) if accuracy.height else None, None),
    ]  # fmt: skip


def _federation_sections(mart: Path) -> list[Section]:
    con = connect_read_only(mart)
    try:
        ledger = _frame(
            con,
            "SELECT site_id, ledger_position, epsilon_after, epsilon_budget FROM fct_privacy_ledger "
            "ORDER BY site_id, ledger_position",
        )
        rounds = _frame(
            con,
            "SELECT model_version, round, rmse_30_mg_dl, persistence_rmse_30_mg_dl, coverage_90_pct, sites_trained "
            "FROM fct_round ORDER BY model_version, round",
        )
    finally:
        con.close()
    return [
        ("Privacy spent per site",
         "Each site's cumulative epsilon (patient-level, as its own ledger recorded it) after each round it "
         "accepted, and its budget (dashed). A site never passes its budget: it refuses the round.",
         _privacy_plot(ledger) if ledger.height else None, None),
        ("Model quality per round",
         "Pooled RMSE at 30 minutes on the sites' held-out test patients against persistence, per registered "
         "model version and round (suppressed where too few test patients).",
         _rounds_plot(rounds) if rounds.height else None, None),
    ]  # fmt: skip


def _frame(con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> pl.DataFrame:
    frame = pl.from_arrow(con.sql(sql, params=params or []).to_arrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def _forecast_plot(frame: pl.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(10, 3.6))
    time = frame["target_time"].to_list()
    ax.fill_between(time, frame["q05"].to_list(), frame["q95"].to_list(), alpha=0.25, label="90% interval")
    ax.plot(time, frame["q50"].to_list(), label="forecast (30 min ahead)")
    ax.plot(time, frame["observed_mg_dl"].to_list(), ".", markersize=3, color="black", label="CGM")
    ax.axhspan(70, 180, color="green", alpha=0.06)
    ax.set(ylabel="glucose, mg/dL", xlabel="UTC")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _whatif_plot(frame: pl.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    first = frame.filter(pl.col("scenario_id") == frame["scenario_id"][0])
    ax.plot(first["horizon_min"].to_list(), first["baseline_q50"].to_list(), color="black", linewidth=2,
            label="recorded plan")  # fmt: skip
    for (scenario_id,), rows in frame.group_by("scenario_id", maintain_order=True):
        ax.plot(rows["horizon_min"].to_list(), rows["q50"].to_list(), label=str(scenario_id))
    ax.set(xlabel="minutes ahead", ylabel="median forecast, mg/dL")
    ax.legend(fontsize=8)
    return fig


def _html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
        for row in frame.iter_rows()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _accuracy_plot(frame: pl.DataFrame) -> Figure:
    fig, (rmse, cover) = plt.subplots(1, 2, figsize=(10, 3.4))
    for (version,), rows in frame.group_by("model_version", maintain_order=True):
        rmse.plot(rows["horizon_min"].to_list(), rows["rmse_mg_dl"].to_list(), marker="o", label=f"twin {version}")
        cover.plot(rows["horizon_min"].to_list(), rows["coverage_90_pct"].to_list(), marker="o", label=str(version))
    last = frame.filter(pl.col("model_version") == frame["model_version"][-1])
    rmse.plot(last["horizon_min"].to_list(), last["persistence_rmse_mg_dl"].to_list(), "--", color="gray",
              label="persistence")  # fmt: skip
    rmse.set(xlabel="minutes ahead", ylabel="RMSE, mg/dL")
    cover.axhline(90, color="gray", linestyle="--")
    cover.set(xlabel="minutes ahead", ylabel="90% interval coverage, %", ylim=(0, 100))
    rmse.legend(fontsize=8)
    return fig


def _privacy_plot(frame: pl.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for (site,), rows in frame.group_by("site_id", maintain_order=True):
        line = ax.plot(rows["ledger_position"].to_list(), rows["epsilon_after"].to_list(), marker="o", label=site)
        ax.axhline(float(rows["epsilon_budget"][0]), linestyle="--", color=line[0].get_color(), linewidth=1)
    ax.set(xlabel="rounds accepted", ylabel="cumulative epsilon")
    ax.legend(fontsize=8)
    return fig


def _rounds_plot(frame: pl.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for (version,), rows in frame.group_by("model_version", maintain_order=True):
        ax.plot(rows["round"].to_list(), rows["rmse_30_mg_dl"].to_list(), marker="o", label=f"twin {version}")
        ax.plot(rows["round"].to_list(), rows["persistence_rmse_30_mg_dl"].to_list(), "--", color="gray")
    ax.set(xlabel="round", ylabel="RMSE at 30 min, mg/dL")
    ax.legend(fontsize=8)
    return fig


def _write(path: Path, target: str, sections: list[Section]) -> Page:
    title = f"twinfed report: {target}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='note'>Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the published mart.</p>",
    ]
    plots = 0
    for heading, note, figure, table in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(note)}</p>")
        if figure is None:
            parts.append("<p><em>Nothing to show yet: the mart has no rows for this.</em></p>")
            continue
        parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{_png(figure)}'>")
        plots += 1
        if table is not None:
            parts.append(_html_table(table))
    parts.append("</body></html>")
    replace_atomically(path, lambda partial: partial.write_text("\n".join(parts), encoding="utf-8"))
    return Page(target, path, plots)


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
