"""Runs data contracts on polars tables: official GX results and Data Docs, and the same checks as row-level flags.

Both sides read one in-memory DuckDB database over the frames' Arrow buffers (no copy, no file): GX through its SQL
datasource, the row-level flags through predicates compiled from the same `Check` declarations. GX gives the official
counts and renders Data Docs without data values (result format BASIC, no unexpected-value samples); the row-level
side says which rows fail which check. A check whose row-level count differs from GX's unexpected count is reported
as IsError and flags no row, so a quarantine never rests on a predicate GX does not confirm.
"""

from __future__ import annotations

import os

# GX reads this when a context starts; a site's validation must not phone home (the context config says so too).
os.environ["GX_ANALYTICS_ENABLED"] = "False"

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import duckdb_engine
import great_expectations as gx
import numpy as np
import polars as pl
import pyarrow as pa
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.data_context import EphemeralDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.datasource.fluent import SQLDatasource
from great_expectations.expectations.row_conditions import (
    AndCondition,
    ComparisonCondition,
    NullityCondition,
    OrCondition,
)

from data_contracts.contracts import CONTRACT_VERSION, Check
from data_contracts.schema import TABLES

Status = Literal["Passed", "Failed", "IsError", "NotApplicable"]

ROW_INDEX = "row_index"  # flags name rows by their position in the frame given to run_contract
FAILED_CHECKS = "failed_checks"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "twinfed_data_docs"
# BASIC carries counts and percentages; with no partial list, Data Docs show no value from the data.
RESULT_FORMAT: dict[str, Any] = {"result_format": "BASIC", "partial_unexpected_count": 0}
_ROW = "__twinfed_row"  # the row position inside DuckDB; run_contract refuses tables that already have it


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one batch: GX's counts, the DQD status, and why it could not run if so."""

    check: Check
    status: Status
    rows: int  # rows the check judged (after its row_condition; null values excluded where GX excludes them)
    violating: int
    violating_pct: float
    error: str | None
    gx_success: bool | None = None  # GX's own verdict (threshold_pct is its 'mostly'), None when GX did not run


@dataclass(frozen=True)
class ContractRun:
    """All check results of one batch, the rows each check flags, where the Data Docs are, and what it cost."""

    results: list[CheckResult]
    row_flags: dict[str, pl.DataFrame]  # per table: row_index, the key column, failed_checks; failing rows only
    data_docs_index: Path | None
    seconds: float
    gx_seconds: float = 0.0  # the GX checkpoint (datasource, suites, validation, Data Docs)
    row_flag_seconds: float = 0.0  # the row-level predicates and queries
    contract_version: str = CONTRACT_VERSION


def run_contract(
    tables: dict[str, pl.DataFrame],
    checks: list[Check],
    *,
    site_id: str,
    suite_name: str,
    workdir: Path,
    build_docs: bool = True,
    keys: Mapping[str, str] | None = None,
    contract_version: str = CONTRACT_VERSION,
) -> ContractRun:
    """Validate the tables (polars frames) against the checks; row flags and GX agree; Data Docs in workdir/data_docs.

    Row flags list every row that violates a check, whatever the check's threshold; the status says whether the
    check as a whole Passed. `keys` names each table's key column for the flags (default: the schema's key, else the
    frame's first column). Checks on a table the batch does not carry are NotApplicable. The frames are not modified.
    """
    start = time.perf_counter()
    workdir = Path(workdir).resolve()  # GX's Data Docs store refuses a relative folder (`twinfed demo`'s default)
    key_columns = _key_columns(tables, checks, keys)
    present = [c for c in checks if c.table in tables]
    docs_dir = workdir / DATA_DOCS_DIR if build_docs else None
    with _ArrowDatabase(tables, workdir / "duckdb_spill") as database:
        # One after the other: run side by side on two cores, polars', DuckDB's and GX's threads slowed each other
        # down (5M rows: 10.4 s instead of 6.7 s).
        row_flag_seconds, row_outcomes = _timed(_row_violations, database, tables, present)
        gx_seconds, (gx_outcomes, docs_index) = _timed(
            _run_gx, database, present, site_id=site_id, suite_name=suite_name, docs_dir=docs_dir,
            contract_version=contract_version,
        )  # fmt: skip
    results = [
        _check_result(check, gx_outcomes.get(check.name), row_outcomes.get(check.name), tables) for check in checks
    ]
    trusted = {r.check.name for r in results if r.status in ("Passed", "Failed")}
    flags = {
        name: _flag_frame(frame, key_columns[name], [c for c in present if c.table == name], row_outcomes, trusted)
        for name, frame in tables.items()
    }
    return ContractRun(
        results=results,
        row_flags=flags,
        data_docs_index=docs_index,
        seconds=time.perf_counter() - start,
        gx_seconds=gx_seconds,
        row_flag_seconds=row_flag_seconds,
        contract_version=contract_version,
    )


def _timed(function: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - start, value


def _key_columns(
    tables: dict[str, pl.DataFrame], checks: list[Check], keys: Mapping[str, str] | None
) -> dict[str, str]:
    names = [c.name for c in checks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"check names must be unique: {duplicates}")
    key_columns = {}
    for name, frame in tables.items():
        if _ROW in frame.columns:
            raise ValueError(f"table {name}: column {_ROW!r} is reserved for row positions")
        if frame.width == 0:
            raise ValueError(f"table {name}: the frame has no columns")
        key = (keys or {}).get(name) or (TABLES[name].key if name in TABLES else frame.columns[0])
        if key not in frame.columns:
            raise ValueError(f"table {name}: key column {key!r} is not in the frame (columns {frame.columns})")
        if key in (ROW_INDEX, FAILED_CHECKS):
            raise ValueError(f"table {name}: key column {key!r} clashes with the flag frame's own columns")
        key_columns[name] = key
    return key_columns


class _AutocommitConnection(duckdb_engine.ConnectionWrapper):
    """A DuckDB connection for GX whose transactions are no-ops: every statement commits on its own.

    SQLAlchemy rolls back when GX closes a connection, and GX fetches a result after closing it; DuckDB drops the
    pending result on that rollback, so GX saw empty results (IndexError in resolve_metric_bundle, GX issue #11579).
    The connection only reads registered Arrow data, so there is nothing a transaction would protect.
    """

    def begin(self) -> None:
        """Do not open a transaction."""

    def commit(self) -> None:
        """Nothing to commit."""

    def rollback(self) -> None:
        """Nothing to roll back, and rolling back would drop the pending result."""


class _ArrowDatabase:
    """An in-memory DuckDB database whose connections see the batch's tables as views over their Arrow buffers."""

    def __init__(self, tables: dict[str, pl.DataFrame], spill_dir: Path) -> None:
        # The newest compat level keeps polars' string views: no copy of the string columns.
        self._arrow = {name: frame.to_arrow(compat_level=pl.CompatLevel.newest()) for name, frame in tables.items()}
        self._with_rows = {
            name: arrow.append_column(_ROW, pa.array(np.arange(arrow.num_rows, dtype=np.uint32)))
            for name, arrow in self._arrow.items()
        }
        # A large sort may spill; by default DuckDB would spill into the process's working directory.
        self._database = duckdb.connect(":memory:", config={"temp_directory": str(spill_dir)})

    def __enter__(self) -> _ArrowDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self._database.close()

    def gx_connection(self) -> _AutocommitConnection:
        """A DBAPI connection for GX's SQLAlchemy engine (its `creator`): the tables as they were given."""
        return _AutocommitConnection(self._connect(self._arrow))

    @contextmanager
    def row_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection where each table also carries its row position, for the row-level predicates."""
        connection = self._connect(self._with_rows)
        try:
            yield connection
        finally:
            connection.close()

    def _connect(self, arrow_tables: dict[str, pa.Table]) -> duckdb.DuckDBPyConnection:
        connection = self._database.cursor()
        # Timestamps carry UTC; a UTC session keeps any rendering of them independent of the host's zone.
        connection.execute("SET TimeZone = 'UTC'")
        for name, arrow in arrow_tables.items():
            connection.register(name, arrow)
        return connection


# --- GX: the official results -------------------------------------------------------------------------------------


def _run_gx(
    database: _ArrowDatabase,
    checks: list[Check],
    *,
    site_id: str,
    suite_name: str,
    docs_dir: Path | None,
    contract_version: str,
) -> tuple[dict[str, ExpectationValidationResult], Path | None]:
    context = _ephemeral_context(docs_dir)
    # `creator` hands GX connections to the in-memory database that sees the frames; a plain connection string
    # would open an empty database (":memory:") or need the data copied into a file first.
    datasource = context.data_sources.add_sql(
        SQLDatasource(name=site_id, connection_string="duckdb:///:memory:", kwargs={"creator": database.gx_connection})
    )
    try:
        definitions = []
        for table in dict.fromkeys(c.table for c in checks):
            asset = datasource.add_table_asset(name=table, table_name=table)
            batch = asset.add_batch_definition_whole_table(name=f"{table} (whole table)")
            suite = context.suites.add(
                gx.ExpectationSuite(
                    name=f"{suite_name}.{table}",
                    expectations=[_expectation(c) for c in checks if c.table == table],
                    meta={"contract_version": contract_version, "site_id": site_id},
                )
            )
            definitions.append(
                context.validation_definitions.add(
                    gx.ValidationDefinition(name=f"{site_id}.{suite_name}.{table}", data=batch, suite=suite)
                )
            )
        if not definitions:
            return {}, None
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{site_id}.{suite_name}", validation_definitions=definitions, result_format=RESULT_FORMAT
            )
        )
        # The run name carries the contract version, so every validation page in the Data Docs shows it.
        run_name = f"{site_id}.{suite_name}.contract-{contract_version}"
        run_id = gx.RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
        outcome = checkpoint.run(run_id=run_id)
        if docs_dir is not None:
            # One build of the whole site: an UpdateDataDocsAction rebuilds it (and recompiles every template) once
            # per validation definition, which cost seconds per table.
            context.build_data_docs(site_names=[DATA_DOCS_SITE])
    finally:
        datasource.get_engine().dispose()
        datasource.get_execution_engine().engine.dispose()
    results = {
        result.expectation_config.meta["check"]: result
        for suite_result in outcome.run_results.values()
        for result in suite_result.results
        if result.expectation_config is not None
    }
    return results, (docs_dir / "index.html" if docs_dir else None)


def _ephemeral_context(docs_dir: Path | None) -> EphemeralDataContext:
    """A context that keeps suites and results in memory; only the Data Docs site (if any) writes, under docs_dir."""
    sites = {}
    if docs_dir is not None:
        sites[DATA_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,  # no GX tutorial and newsletter footer in a hospital's report
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        analytics_enabled=False,
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _expectation(check: Check) -> Any:
    """The GX expectation a check declares, with its threshold as GX's `mostly` so Data Docs judge alike."""
    kwargs = dict(check.kwargs)
    if check.threshold_pct > 0:
        kwargs["mostly"] = 1.0 - check.threshold_pct / 100.0
    return getattr(gx.expectations, check.expectation)(
        **kwargs,
        description=check.description,
        notes=f"{check.category}; threshold {check.threshold_pct:g}% of rows; check {check.name}",
        meta={"check": check.name, "category": check.category, "threshold_pct": check.threshold_pct},
    )


def _gx_error(result: ExpectationValidationResult) -> str | None:
    """GX's exception message for a result, whether it reports it directly or per failed metric."""
    info = result.exception_info or {}
    entries = [info] if "raised_exception" in info else [e for e in info.values() if isinstance(e, dict)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(dict.fromkeys(messages)) or None


def _gx_counts(check: Check, result: ExpectationValidationResult, table_rows: int) -> tuple[int, int]:
    """Rows judged and rows violating, as GX counted them."""
    values = result.result or {}
    if check.is_row_query:
        return table_rows, int(values.get("observed_value") or 0)
    judged = int(values.get("element_count") or 0) - int(values.get("missing_count") or 0)
    return judged, int(values.get("unexpected_count") or 0)


# --- Row level: the same checks, as polars predicates and as DuckDB queries ----------------------------------------


@dataclass(frozen=True)
class _RowOutcome:
    """The rows one check flags (positions, each once), how many rows it counted, or why it could not run."""

    rows: np.ndarray
    counted: int
    error: str | None = None


def _row_violations(
    database: _ArrowDatabase, tables: dict[str, pl.DataFrame], checks: list[Check]
) -> dict[str, _RowOutcome]:
    """Map checks as polars predicates (one pass per table); row queries run their own SQL in DuckDB, as in GX."""
    outcomes: dict[str, _RowOutcome] = {}
    with database.row_connection() as connection:
        for table in dict.fromkeys(c.table for c in checks):
            frame, map_checks = tables[table], []
            for check in (c for c in checks if c.table == table):
                missing = [name for name in check.columns if name not in frame.columns]
                if missing:
                    outcomes[check.name] = _failed(f"{table}: columns {missing} do not exist (check {check.name})")
                elif check.is_row_query:
                    outcomes[check.name] = _row_query_outcome(connection, check)
                else:
                    map_checks.append(check)
            outcomes.update(_map_outcomes(frame, map_checks))
    return outcomes


def _failed(error: str) -> _RowOutcome:
    return _RowOutcome(np.empty(0, dtype=np.uint32), 0, error)


def _map_outcomes(frame: pl.DataFrame, checks: list[Check]) -> dict[str, _RowOutcome]:
    """All map checks of a table in one pass; if that fails, each check alone, to tell which one cannot run."""
    if not checks:
        return {}
    try:
        return _map_pass(frame, checks)
    except pl.exceptions.PolarsError:
        outcomes = {}
        for check in checks:
            try:
                outcomes.update(_map_pass(frame, [check]))
            except pl.exceptions.PolarsError as error:
                outcomes[check.name] = _failed(f"{check.table}: row-level predicate of {check.name} failed: {error}")
        return outcomes


def _map_pass(frame: pl.DataFrame, checks: list[Check]) -> dict[str, _RowOutcome]:
    flags = [_violation_expr(check, frame).alias(f"c{i}") for i, check in enumerate(checks)]
    flagged = frame.lazy().with_row_index(_ROW).filter(pl.any_horizontal(flags)).select(_ROW, *flags).collect()
    outcomes = {}
    for i, check in enumerate(checks):
        rows = flagged.filter(pl.col(f"c{i}"))[_ROW].to_numpy()
        outcomes[check.name] = _RowOutcome(rows, len(rows))
    return outcomes


def _violation_expr(check: Check, frame: pl.DataFrame) -> pl.Expr:
    """Whether a row violates a map check, decided as GX's SQL decides it; never null."""
    domain = _condition_expr(check.kwargs.get("row_condition"), frame.schema)
    return (domain & _unexpected_expr(check, frame, domain)).fill_null(False)


def _unexpected_expr(check: Check, frame: pl.DataFrame, domain: pl.Expr) -> pl.Expr:
    """GX's unexpected condition for a row in the check's domain: nulls are unexpected only to the null checks."""
    kwargs, expectation = check.kwargs, check.expectation
    if expectation == "ExpectColumnPairValuesAToBeGreaterThanB":
        a, b = pl.col(kwargs["column_A"]), pl.col(kwargs["column_B"])
        holds = a >= b if kwargs.get("or_equal") else a > b
        return a.is_not_null() & b.is_not_null() & ~holds
    name = kwargs["column"]
    column, dtype = pl.col(name), frame.schema[name]
    if expectation == "ExpectColumnValuesToNotBeNull":
        return column.is_null()
    if expectation == "ExpectColumnValuesToBeNull":
        return column.is_not_null()
    if expectation == "ExpectColumnValuesToBeInSet":
        return column.is_not_null() & ~_is_in(name, dtype, list(kwargs["value_set"]))
    if expectation == "ExpectColumnValuesToNotBeInSet":
        return column.is_not_null() & _is_in(name, dtype, list(kwargs["value_set"]))
    if expectation == "ExpectColumnValuesToBeBetween":
        return column.is_not_null() & ~_between_expr(name, dtype, kwargs)
    if expectation == "ExpectColumnValuesToBeUnique":
        return column.is_not_null() & _is_in(name, dtype, _duplicated_values(frame, name, domain))
    raise ValueError(f"check {check.name}: no row-level predicate for {expectation}")


def _between_expr(name: str, dtype: pl.DataType, kwargs: dict[str, Any]) -> pl.Expr:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    holds = pl.lit(True)
    if low is not None:
        column, bound = _comparable(name, dtype, low)
        holds = holds & (column > bound if kwargs.get("strict_min") else column >= bound)
    if high is not None:
        column, bound = _comparable(name, dtype, high)
        holds = holds & (column < bound if kwargs.get("strict_max") else column <= bound)
    return holds


def _comparable(name: str, dtype: pl.DataType, value: Any) -> tuple[pl.Expr, pl.Expr]:
    """A column and a literal to compare at DuckDB's precision: polars would truncate a finer datetime literal."""
    if isinstance(value, datetime) and isinstance(dtype, pl.Datetime):
        precise = pl.Datetime("us", dtype.time_zone)
        return pl.col(name).cast(precise), pl.lit(value).cast(precise)
    return pl.col(name), pl.lit(value)


def _is_in(name: str, dtype: pl.DataType, values: Any) -> pl.Expr:
    """Membership as SQL's IN: a null value gives null; numbers compare by value across integer and float types."""
    members = values if isinstance(values, pl.Series) else pl.Series(values, strict=False)
    column = pl.col(name)
    if members.dtype == pl.Null():  # an empty set, or only nulls: nothing is a member
        members = members.cast(dtype)
    elif members.dtype != dtype:
        common = _common_dtype(dtype, members.dtype)
        column, members = column.cast(common), members.cast(common)
    return column.is_in(members.implode())


def _common_dtype(left: pl.DataType, right: pl.DataType) -> pl.DataType:
    if left.is_integer() and right.is_integer():
        return pl.Int64()
    if left.is_numeric() and right.is_numeric():
        return pl.Float64()
    return left  # the values must then cast to the column's type, or the check cannot run


def _duplicated_values(frame: pl.DataFrame, name: str, domain: pl.Expr) -> pl.Series:
    """The values occurring more than once among the domain's non-null values (a sort: polars' hashing is slower)."""
    ordered = frame.lazy().filter(domain.fill_null(False)).select(pl.col(name).drop_nulls().sort()).collect()[name]
    repeated = (ordered == ordered.shift(1)).fill_null(False) | (ordered == ordered.shift(-1)).fill_null(False)
    return ordered.filter(repeated).unique()


def _condition_expr(condition: Any, schema: pl.Schema) -> pl.Expr:
    """A GX row condition as polars, with SQL's null logic (GX's SQL engine filters with it; null leaves a row out)."""
    if condition is None:
        return pl.lit(True)
    if isinstance(condition, AndCondition | OrCondition):
        parts = [_condition_expr(part, schema) for part in condition.conditions]
        combined = parts[0]
        for part in parts[1:]:
            combined = combined & part if isinstance(condition, AndCondition) else combined | part
        return combined
    name = condition.column.name
    if isinstance(condition, NullityCondition):
        return pl.col(name).is_null() if condition.is_null else pl.col(name).is_not_null()
    assert isinstance(condition, ComparisonCondition)
    operator = str(condition.operator)
    if operator in ("IN", "NOT_IN"):
        member = _is_in(name, schema[name], list(condition.parameter))
        return member if operator == "IN" else ~member
    column, value = _comparable(name, schema[name], condition.parameter)
    return _COMPARE[operator](column, value)


_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_JOIN = re.compile(r"\bJOIN\b", re.IGNORECASE)


def _row_query_outcome(connection: duckdb.DuckDBPyConnection, check: Check) -> _RowOutcome:
    """Run an UnexpectedRowsExpectation's own query on the row-indexed table, substituting {batch} as GX does."""
    batch = f"(SELECT * FROM {_quoted(check.table)})"
    query = str(check.kwargs["unexpected_rows_query"])
    # GX aliases the batch itself unless the query joins (then the query must alias it); mirror that exactly.
    substituted = query.format(batch=batch if _JOIN.search(query) else f"{batch} AS subselect")
    try:
        found = connection.execute(f"SELECT {_ROW} FROM ({substituted}) AS unexpected_rows").fetchnumpy()[_ROW]
    except duckdb.Error as error:
        return _failed(
            f"{check.table}: row-level query of {check.name} failed (it must select the batch's rows, e.g. "
            f"SELECT b.* FROM {{batch}} AS b ...): {error}"
        )
    rows = np.asarray(found, dtype=np.uint32)
    return _RowOutcome(np.unique(rows), len(rows))


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# --- Results and flags --------------------------------------------------------------------------------------------


def _check_result(
    check: Check,
    gx_result: ExpectationValidationResult | None,
    row_outcome: _RowOutcome | None,
    tables: dict[str, pl.DataFrame],
) -> CheckResult:
    if check.table not in tables:
        return CheckResult(check, "NotApplicable", 0, 0, 0.0, None)
    if gx_result is None or row_outcome is None:
        return CheckResult(check, "IsError", 0, 0, 0.0, f"{check.name}: GX or the row-level run returned no result")
    errors = [e for e in (_gx_error(gx_result), row_outcome.error) if e]
    if errors:
        return CheckResult(check, "IsError", 0, 0, 0.0, " | ".join(errors), bool(gx_result.success))
    rows, violating = _gx_counts(check, gx_result, tables[check.table].height)
    pct = 100.0 * violating / rows if rows else 0.0
    success = bool(gx_result.success)
    if row_outcome.counted != violating:
        error = (
            f"{check.name}: the row-level predicate finds {row_outcome.counted} violating rows, GX counts {violating}"
        )
        return CheckResult(check, "IsError", rows, violating, pct, error, success)
    if rows == 0:
        return CheckResult(check, "NotApplicable", 0, 0, 0.0, None, success)
    status: Status = "Failed" if pct > check.threshold_pct else "Passed"
    return CheckResult(check, status, rows, violating, pct, None, success)


def _flag_frame(
    frame: pl.DataFrame, key: str, checks: list[Check], outcomes: dict[str, _RowOutcome], trusted: set[str]
) -> pl.DataFrame:
    """One row per failing row: its position, its key, and the checks it fails in declaration order."""
    schema = pl.Schema({ROW_INDEX: pl.UInt32(), key: frame.schema[key], FAILED_CHECKS: pl.List(pl.String())})
    # An Enum of the check names sorts in declaration order and stores each flag as a small integer.
    names = pl.Enum([c.name for c in checks])
    parts = [
        pl.DataFrame(
            {ROW_INDEX: outcomes[c.name].rows, "check": pl.repeat(c.name, len(outcomes[c.name].rows), eager=True)}
        ).cast({ROW_INDEX: pl.UInt32(), "check": names})
        for c in checks
        if c.name in trusted and len(outcomes[c.name].rows)
    ]
    if not parts:
        return pl.DataFrame(schema=schema)
    flagged = pl.concat(parts).sort(ROW_INDEX, "check").group_by(ROW_INDEX, maintain_order=True).agg(pl.col("check"))
    return flagged.select(
        pl.col(ROW_INDEX), frame[key].gather(flagged[ROW_INDEX]).alias(key), pl.col("check").alias(FAILED_CHECKS)
    ).cast(schema)
