"""Run a mart's SQL models in dependency order, check what they built, and publish the file atomically.

A mart is a list of models (`Model`), one `.sql` file each under `flows/marts/sql/<mart>/`, named after the
object it creates. The layer is the name's prefix, as in dbt's jaffle_shop:

    stg_*     staging: rename and cast a source only; a TEMP VIEW (not in the published file)
    int_*     intermediate: joins, unnesting, bins, sufficient statistics; a TEMP TABLE (not published)
    dim_*, fct_*, mart_*, share_*   published tables, each with COMMENT ON TABLE and on every column

Each file is plain DuckDB SQL (it runs in the `duckdb` CLI once its sources and variables are declared), so the
model's materialization is written in it (CREATE TEMP VIEW / CREATE TEMP TABLE / CREATE TABLE). After the last
model, the checks run: every published table is a declared model and every model's table exists; each key is
unique and never null; every table and column has a comment; and every singular test (`sql/<mart>/tests/*.sql`,
a query returning the offending rows) returns nothing. Any failure raises `MartBuildError` and nothing is
published. `publish_database` builds into a new file beside the live one and renames it into place: readers
holding the old file keep reading it whole, new readers open the new one whole, and no reader blocks the build.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

SQL_DIR = Path(__file__).resolve().parent / "sql"
PUBLISHED_PREFIXES = ("dim_", "fct_", "mart_", "share_")
TEMPORARY_PREFIXES = ("stg_", "int_")


class MartBuildError(RuntimeError):
    """A mart could not be built or failed its checks; the live mart was left as it was."""


@dataclass(frozen=True)
class Model:
    """One SQL model: the object its file creates and, for a published table, the columns that identify a row."""

    name: str
    key: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith(PUBLISHED_PREFIXES + TEMPORARY_PREFIXES):
            raise ValueError(
                f"model {self.name!r}: the name must start with one of {PUBLISHED_PREFIXES + TEMPORARY_PREFIXES}"
            )
        if self.published and not self.key:
            raise ValueError(f"model {self.name!r}: a published table declares its key")

    @property
    def published(self) -> bool:
        """Whether the model is a table of the published file (not a staging view or intermediate table)."""
        return self.name.startswith(PUBLISHED_PREFIXES)

    def path(self, mart: str) -> Path:
        """The model's SQL file."""
        return SQL_DIR / mart / f"{self.name}.sql"


def set_variables(con: duckdb.DuckDBPyConnection, variables: Mapping[str, Any]) -> None:
    """Declare the values the SQL reads with getvariable() (paths, concept ids, thresholds)."""
    for name, value in variables.items():
        con.execute(f"SET VARIABLE {name} = ?", [value])


def run_models(con: duckdb.DuckDBPyConnection, mart: str, models: Sequence[Model]) -> None:
    """Execute each model's file in order; a failure names the model, its file and DuckDB's message."""
    for model in models:
        path = model.path(mart)
        try:
            con.execute(path.read_text())
        except (duckdb.Error, OSError) as error:
            raise MartBuildError(f"{mart} mart: model {model.name} ({path}) failed: {error}") from error


def check_models(con: duckdb.DuckDBPyConnection, mart: str, models: Sequence[Model]) -> None:
    """Run every check on the built models (see the module docstring); raise naming every failure."""
    problems = [*_catalog_problems(con, models), *_comment_problems(con)]
    for model in (m for m in models if m.published):
        problems += _key_problems(con, model)
    for test in sorted((SQL_DIR / mart / "tests").glob("*.sql")):
        try:
            failing = con.execute(f"SELECT count(*) FROM ({test.read_text().strip().rstrip(';')})").fetchone()
        except duckdb.Error as error:
            raise MartBuildError(f"{mart} mart: test {test.stem} ({test}) failed to run: {error}") from error
        if failing and failing[0]:
            problems.append(f"test {test.stem} ({test.name}) found {failing[0]} offending rows")
    if problems:
        raise MartBuildError(f"{mart} mart failed its checks: " + "; ".join(problems))


def _catalog_problems(con: duckdb.DuckDBPyConnection, models: Sequence[Model]) -> list[str]:
    tables = {row[0] for row in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main'"
    ).fetchall()}  # fmt: skip
    views = {row[0] for row in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE database_name = current_database() AND NOT internal"
    ).fetchall()}  # fmt: skip
    declared = {m.name for m in models if m.published}
    problems = [f"table {name} is not a declared model" for name in sorted(tables - declared)]
    problems += [f"view {name} would be published (only tables are)" for name in sorted(views)]
    return problems + [f"model {name} created no table" for name in sorted(declared - tables)]


def _comment_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    where = "database_name = current_database() AND schema_name = 'main' AND coalesce(trim(comment), '') = ''"
    tables = con.execute(f"SELECT table_name FROM duckdb_tables() WHERE {where}").fetchall()
    columns = con.execute(f"SELECT table_name, column_name FROM duckdb_columns() WHERE {where}").fetchall()
    return [f"table {t} has no comment" for (t,) in tables] + [f"column {t}.{c} has no comment" for t, c in columns]


def _key_problems(con: duckdb.DuckDBPyConnection, model: Model) -> list[str]:
    keys = ", ".join(model.key)
    nulls = " OR ".join(f"{k} IS NULL" for k in model.key)
    # Distinct hashes prove distinct keys, at a fraction of a multi-column GROUP BY's cost on the fact tables;
    # only when two hashes coincide is the exact (and rarely needed) count run.
    row = con.execute(
        f"SELECT count(*) FILTER (WHERE {nulls}), count(*) - count(DISTINCT hash({keys})) FROM {model.name}"
    ).fetchone()
    null_rows, collisions = row if row else (0, 0)
    duplicated = 0
    if collisions:
        exact = con.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {model.name} GROUP BY {keys} HAVING count(*) > 1)"
        ).fetchone()
        duplicated = exact[0] if exact else 0
    problems = []
    if null_rows:
        problems.append(f"{model.name}: {null_rows} rows with a null key ({keys})")
    if duplicated:
        problems.append(f"{model.name}: {duplicated} keys ({keys}) on more than one row")
    return problems


def publish_database(live: Path, build: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
    """Build a database with `build(connection)` in a new file beside `live`, then rename it over `live`.

    Readers that opened `live` read-only keep the file they opened (its inode outlives the rename) and see it
    whole; a reader opening `live` afterwards gets the new file, whole. If `build` raises, the new file is removed
    and `live` is untouched. The rename is atomic because both names are in one folder.
    """
    live.parent.mkdir(parents=True, exist_ok=True)
    partial = live.with_name(f".{live.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.building")
    try:
        con = duckdb.connect(str(partial))
        try:
            # One transaction: statement-level commits would each sync the write-ahead log.
            con.execute("BEGIN TRANSACTION")
            build(con)
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(partial, live)
        _sync_folder(live.parent)
    finally:
        for leftover in (partial, partial.with_name(partial.name + ".wal")):
            leftover.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (a crash right after it keeps the new file)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
