"""Read-only analyst access to the marts: find a mart by name, open it read-only, run one query.

A connection opened here can read the mart and nothing else: the file is opened read-only (so it never blocks a
build, which writes a new file), external access is off (no reading other files, no COPY, ATTACH or extension
installs), and only a SELECT (including FROM-first, WITH, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN is accepted.
Timestamps display in UTC, as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from flows.marts.layout import FEDERATION, SiteMartLayout, federation_mart_path, site_ids

READ_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


class QueryError(ValueError):
    """A query the analyst interface refuses, or a mart it cannot find; the message says what to do."""


def mart_path(target: str, *, data_dir: Path, federation_dir: Path) -> Path:
    """The live mart file of a site id or of 'federation'; QueryError naming the marts that exist otherwise."""
    path = (
        federation_mart_path(federation_dir)
        if target == FEDERATION
        else SiteMartLayout.under(data_dir, target).database
    )
    if path.is_file():
        return path
    built = [s for s in site_ids(data_dir) if SiteMartLayout.under(data_dir, s).database.is_file()]
    if federation_mart_path(federation_dir).is_file():
        built.append(FEDERATION)
    known = ", ".join(built) or "none yet (run `twinfed marts build`)"
    if target != FEDERATION and target not in site_ids(data_dir):
        raise QueryError(f"unknown site {target!r} (no store under {Path(data_dir) / 'sites'}); marts built: {known}")
    raise QueryError(f"{path}: the {target} mart has not been built; run `twinfed marts build`. Marts built: {known}")


def connect_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to a mart that can touch no other file."""
    con = duckdb.connect(str(path), read_only=True, config={"enable_external_access": False})
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    return con


def check_read_only(sql: str) -> str:
    """The one statement of `sql` if it only reads; QueryError naming the statement type otherwise."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"cannot parse the query: {error}") from error
    if len(statements) != 1:
        raise QueryError(f"give exactly one statement (got {len(statements)}); run several queries one by one")
    kind = statements[0].type
    if kind not in READ_STATEMENTS:
        raise QueryError(
            f"{kind.name} statements are refused: marts are read-only and published by `twinfed marts build`; "
            "a query may SELECT (or EXPLAIN) only"
        )
    return sql


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The result of a read-only query as an Arrow table; QueryError carrying DuckDB's message on failure."""
    check_read_only(sql)
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as error:
        raise QueryError(f"{type(error).__name__}: {error}") from error


DOCS = Path(__file__).resolve().parents[2] / "docs" / "marts.md"
_EXAMPLE = re.compile(r"```sql\n-- query: (site|federation)/([a-z0-9_]+)\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class ExampleQuery:
    """One documented analyst query: the mart it is for ('site' or 'federation'), its name and SQL."""

    mart: str
    name: str
    sql: str


def documented_queries(path: Path = DOCS) -> list[ExampleQuery]:
    """The example queries of docs/marts.md: fenced sql blocks whose first line is `-- query: <mart>/<name>`."""
    return [ExampleQuery(m.group(1), m.group(2), m.group(3).strip()) for m in _EXAMPLE.finditer(path.read_text())]
