"""Read one source file of a drop into raw string columns with provenance, losing no line.

Every data line (or Parquet row) becomes one row with its position, a hash of its exact content
(for exact-duplicate removal), the mapped fields as text, and a parse error when the line cannot
be read (a truncated or malformed line). A file that cannot be read at all is reported whole.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import polars as pl

POSITION = "source_position"  # 1-based line in a text file, 0-based row in a Parquet file
ROW_HASH = "row_hash"
PARSE_ERROR = "parse_error"


@dataclass(frozen=True)
class RawRead:
    """What reading one file gave: a row per data line, or a reason the whole file is unreadable."""

    file: str
    frame: pl.DataFrame  # POSITION, ROW_HASH, PARSE_ERROR and one String column per mapped field
    rows_in: int
    file_error: str | None = None


def read_source(drop: Path, file: str, fields: dict[str, str], file_format: str) -> RawRead:
    """Read `file` (relative to the drop) and extract `fields` {name: column or JSONPath} as text."""
    path = drop / file
    try:
        if file_format == "fhir":
            return _read_ndjson(path, file, fields)
        if file_format == "csv":
            return _read_csv(path, file, fields)
        return _read_parquet(path, file, fields)
    except (OSError, pl.exceptions.PolarsError, UnicodeDecodeError, _MappingMismatch) as error:
        return RawRead(file=file, frame=_empty(fields), rows_in=0, file_error=f"{file}: {error}")


class _MappingMismatch(ValueError):
    """The mapping names a column the file does not have."""


def _empty(fields: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame(
        schema={POSITION: pl.Int64, ROW_HASH: pl.UInt64, PARSE_ERROR: pl.String, **{f: pl.String for f in fields}}
    )


def _lines(path: Path) -> pl.Series:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return pl.Series("line", lines, dtype=pl.String)


def _read_ndjson(path: Path, file: str, fields: dict[str, str]) -> RawRead:
    lines = _lines(path)
    frame = pl.DataFrame({"line": lines}).with_row_index(POSITION, offset=1)
    valid = pl.col("line").str.json_path_match("$.resourceType").is_not_null()
    frame = frame.with_columns(
        pl.col(POSITION).cast(pl.Int64),
        pl.col("line").hash().alias(ROW_HASH),
        pl.when(valid)
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(pl.format("line {} is not a complete JSON resource (truncated or malformed)", pl.col(POSITION)))
        .alias(PARSE_ERROR),
        *[pl.col("line").str.json_path_match(path_).alias(name) for name, path_ in fields.items()],
    ).drop("line")
    return RawRead(file=file, frame=frame, rows_in=frame.height)


def _read_csv(path: Path, file: str, fields: dict[str, str]) -> RawRead:
    lines = _lines(path)
    if lines.len() == 0:
        raise _MappingMismatch("the file is empty (no header)")
    header = next(csv.reader([lines[0]]))
    missing = [column for column in fields.values() if column not in header]
    if missing:
        # The header is not echoed: in a file without one, the first line is a patient's data.
        raise _MappingMismatch(f"columns {missing} named by the mapping are not in the file's header (first line)")
    data = lines[1:]
    plain = ~data.str.contains('"', literal=True)
    split = data.str.split(",")
    parsed: list[list[str] | None] = []
    for text, is_plain, parts in zip(data.to_list(), plain.to_list(), split.to_list(), strict=True):
        fields_of_line = parts if is_plain else _parse_quoted(text)
        parsed.append(fields_of_line if fields_of_line is not None and len(fields_of_line) == len(header) else None)
    index = {name: header.index(column) for name, column in fields.items()}
    positions = list(range(2, len(parsed) + 2))
    frame = pl.DataFrame(
        {
            POSITION: pl.Series(positions, dtype=pl.Int64),
            ROW_HASH: data.hash(),
            PARSE_ERROR: [
                None if row is not None else f"line {pos} does not have the header's {len(header)} fields"
                for row, pos in zip(parsed, positions, strict=True)
            ],
            **{name: [None if row is None else (row[i] or None) for row in parsed] for name, i in index.items()},
        },
        schema_overrides={PARSE_ERROR: pl.String, **{name: pl.String for name in fields}},
    )
    return RawRead(file=file, frame=frame, rows_in=frame.height)


def _parse_quoted(text: str) -> list[str] | None:
    """Parse one CSV line with quotes; None if its quoting is broken."""
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error:
        return None
    return rows[0] if len(rows) == 1 else None


def _read_parquet(path: Path, file: str, fields: dict[str, str]) -> RawRead:
    table = pl.read_parquet(path)
    missing = [column for column in fields.values() if column not in table.columns]
    if missing:
        raise _MappingMismatch(f"columns {missing} named by the mapping are not in the table {table.columns}")
    frame = table.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias(POSITION),
        pl.Series(ROW_HASH, table.hash_rows()),
        pl.lit(None, dtype=pl.String).alias(PARSE_ERROR),
        *[pl.col(column).cast(pl.String).alias(name) for name, column in fields.items()],
    )
    return RawRead(file=file, frame=frame, rows_in=frame.height)
