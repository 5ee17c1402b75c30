"""`twinfed marts`: build the marts, query them read-only, describe their tables (wired in with app.add_typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.marts.federation import build_federation_mart
from flows.marts.layout import FEDERATION, site_ids
from flows.marts.query import QueryError, connect_read_only, documented_queries, mart_path, run_query
from flows.marts.runner import MartBuildError
from flows.marts.site import build_site_mart
from flows.site_store import replace_atomically

app = typer.Typer(help="DuckDB marts: build them, query them read-only, describe their tables.", no_args_is_help=True)
console = Console()

DEFAULT_DATA_DIR = Path("data")
MAX_CELL = 48  # characters of a value shown in the printed table
DataDir = Annotated[Path, typer.Option(help="Site stores under DATA_DIR/sites.")]
FederationDir = Annotated[
    Path | None, typer.Option(help="Federation folder: registry, federation mart (default DATA_DIR/federation).")
]
Target = Annotated[str, typer.Argument(help=f"A site id, or '{FEDERATION}'.", show_default=False)]


@app.command()
def build(
    sites: Annotated[list[str] | None, typer.Argument(help="Site ids (default: every site with a store).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    federation_dir: FederationDir = None,
    federation: Annotated[bool, typer.Option(help="Build the federation mart after the site marts.")] = True,
) -> None:
    """Build and publish each site's mart and share, then the federation mart (readers are never blocked)."""
    chosen = sites or site_ids(data_dir)
    unknown = sorted(set(chosen) - set(site_ids(data_dir)))
    if unknown:
        console.print(f"[red]unknown sites {unknown}[/red]: no store under {data_dir / 'sites'} (run `twinfed ingest`)")
        raise typer.Exit(code=2)
    table = Table(title="Marts published")
    for column in ("mart", "file", "MB", "s", "rows"):
        table.add_column(column, justify="left" if column in ("mart", "file", "rows") else "right")
    failed = []
    for site in chosen:  # one site's failure keeps its previous mart and does not stop the others
        try:
            summary = build_site_mart(data_dir, site)
        except MartBuildError as error:
            console.print(f"[red]{site}: {error}[/red] (the previous mart stays live)")
            failed.append(site)
            continue
        facts = f"{summary.rows['fct_glucose_forecast']:,} forecasts, {summary.rows['dim_patient']:,} patients"
        table.add_row(site, str(summary.database), f"{summary.bytes / 1e6:.1f}", f"{summary.seconds:.1f}", facts)
    if federation:
        try:
            fed = build_federation_mart(data_dir, federation_dir or data_dir / "federation")
            facts = f"{len(fed.sites)} sites, {len(fed.model_versions)} model versions"
            table.add_row(FEDERATION, str(fed.database), f"{fed.bytes / 1e6:.1f}", f"{fed.seconds:.1f}", facts)
        except MartBuildError as error:
            console.print(f"[red]{FEDERATION}: {error}[/red] (the previous mart stays live)")
            failed.append(FEDERATION)
    console.print(table)
    if failed:
        raise typer.Exit(code=2)


@app.command()
def query(
    target: Target,
    sql: Annotated[str, typer.Argument(help="One SELECT (or EXPLAIN) statement.", show_default=False)],
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write every row to this CSV file.")] = None,
    parquet: Annotated[
        Path | None, typer.Option("--parquet", help="Also write every row to this Parquet file.")
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="Rows to print (exports get all).")] = 50,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    federation_dir: FederationDir = None,
) -> None:
    """Run a read-only query on a site's mart or the federation mart; print it as a table, optionally export it."""
    try:
        con = connect_read_only(
            mart_path(target, data_dir=data_dir, federation_dir=federation_dir or data_dir / "federation")
        )
        try:
            result = run_query(con, sql)
        finally:
            con.close()
    except QueryError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(code=2) from error
    if csv is not None:
        replace_atomically(csv, lambda partial: pa_csv.write_csv(result, partial))
    if parquet is not None:
        replace_atomically(parquet, lambda partial: pq.write_table(result, partial))
    console.print(_rich_table(result, limit, title=target))
    written = " and ".join(str(p) for p in (csv, parquet) if p is not None)
    if written:
        console.print(f"Wrote {result.num_rows:,} rows to {written}")


@app.command()
def describe(
    target: Target,
    table: Annotated[str | None, typer.Argument(help="A table: list its columns (default: list the tables).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    federation_dir: FederationDir = None,
) -> None:
    """List a mart's tables with their comments, or one table's columns with theirs."""
    if table is None:
        sql = "SELECT table_name, estimated_size AS rows, comment FROM duckdb_tables() ORDER BY table_name"
    else:
        name = table.replace("'", "''")
        sql = (f"SELECT column_name, data_type, comment FROM duckdb_columns() WHERE table_name = '{name}' "
               "ORDER BY column_index")  # fmt: skip
    try:
        con = connect_read_only(
            mart_path(target, data_dir=data_dir, federation_dir=federation_dir or data_dir / "federation")
        )
        try:
            result = run_query(con, sql)
        finally:
            con.close()
    except QueryError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(code=2) from error
    if table is not None and result.num_rows == 0:
        console.print(f"[red]{target} mart has no table {table!r}[/red]; `twinfed marts describe {target}` lists them")
        raise typer.Exit(code=2)
    console.print(_rich_table(result, limit=1000, title=f"{target} {table or 'tables'}", max_cell=None))


@app.command()
def examples(
    mart: Annotated[str | None, typer.Argument(help="site or federation (default: both).")] = None,
) -> None:
    """Print the documented example queries (docs/marts.md), ready to paste into `twinfed marts query`."""
    for example in documented_queries():
        if mart in (None, example.mart):
            console.rule(f"{example.mart}/{example.name}")
            console.print(example.sql, markup=False, highlight=False)


def _rich_table(result: pa.Table, limit: int, title: str, max_cell: int | None = MAX_CELL) -> Table:
    shown = min(limit, result.num_rows)
    caption = f"{result.num_rows:,} rows" + (
        f" (first {shown} shown; export with --csv/--parquet)" if shown < result.num_rows else ""
    )
    table = Table(title=title, caption=caption)
    for field in result.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_decimal(field.type)
        table.add_column(field.name, justify="right" if numeric else "left", overflow="fold")
    for row in result.slice(0, shown).to_pylist():
        table.add_row(*(_cell(value, max_cell) for value in row.values()))
    return table


def _cell(value: Any, max_cell: int | None) -> str:
    """A value as printed: NULL dimmed, floats to 6 significant digits, long text cut (exports keep it whole)."""
    if value is None:
        return "[dim]NULL[/dim]"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return escape(text if max_cell is None or len(text) <= max_cell else text[: max_cell - 1] + "…")
