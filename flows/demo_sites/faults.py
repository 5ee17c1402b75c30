"""Realistic faults injected into a demo hospital's export, each one listed in a manifest.

Row faults change a table before it is written (duplicates, impossible values, unit mix-ups,
missing, garbled or clock-shifted timestamps, PHI typed into free-text fields); line faults damage
written text lines (truncated or malformed); file faults corrupt DICOM files. A row carries at
most one fault, so every manifest entry names exactly one thing that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from flows.demo_sites.identities import Identity

MMOL_PER_MG = 1.0 / 18.016
FAULT = "__fault"
FAULT_FIELD = "__fault_field"
FAULT_DETAIL = "__fault_detail"
GARBLED_TIME = "__garbled_time"
# Both rows of an injected duplicate pair: no later fault may touch them, or the copy would no longer be exact.
RESERVED = "__reserved"
CLOCK_RESET = datetime(2000, 1, 1)  # where a pump or CGM clock lands after a battery reset


def fault_position(entry: Mapping[str, Any]) -> int | None:
    """Where a manifest entry sits in its file: its line, or for Parquet its row; None for a whole file (DICOM)."""
    position = entry["line"] if entry["line"] is not None else entry["row"]
    return None if position is None else int(position)


@dataclass(frozen=True)
class FaultEntry:
    """One injected fault: where it is (file, line or row, record key, field) and what it is."""

    file: str
    kind: str
    record_key: str
    field: str | None
    detail: str
    line: int | None = None  # 1-based line in a text file
    row: int | None = None  # 0-based row in a Parquet file

    def as_dict(self) -> dict[str, object]:
        """The entry as written to the manifest (JSON lines)."""
        return asdict(self)


def with_fault_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """Add the bookkeeping columns the injectors fill (null = clean row)."""
    return frame.with_columns(
        pl.lit(None, dtype=pl.String).alias(FAULT),
        pl.lit(None, dtype=pl.String).alias(FAULT_FIELD),
        pl.lit(None, dtype=pl.String).alias(FAULT_DETAIL),
        pl.lit(None, dtype=pl.String).alias(GARBLED_TIME),
        pl.lit(False).alias(RESERVED),
    )


def clean_rows(frame: pl.DataFrame) -> pl.Series:
    """Rows that carry no fault and are not half of an injected duplicate pair."""
    return frame[FAULT].is_null() & ~frame[RESERVED]


def count_for(rate: float, eligible: int, *, at_least_one: bool) -> int:
    """How many rows a rate hits; at least one when asked so every configured kind is present."""
    if rate <= 0 or eligible == 0:
        return 0
    return min(eligible, max(int(round(rate * eligible)), 1 if at_least_one else 0))


def pick_clean(frame: pl.DataFrame, count: int, rng: np.random.Generator, where: pl.Expr | None = None) -> np.ndarray:
    """Row positions of `count` rows that carry no fault yet (and satisfy `where`)."""
    clean = clean_rows(frame)
    if where is not None:
        clean = clean & frame.select(where.fill_null(False)).to_series()
    candidates = np.flatnonzero(clean.to_numpy())
    if count == 0 or candidates.size == 0:
        return np.array([], dtype=int)
    return np.sort(rng.choice(candidates, size=min(count, candidates.size), replace=False))


def mark(frame: pl.DataFrame, rows: np.ndarray, kind: str, field: str | None, detail: list[str]) -> pl.DataFrame:
    """Record fault `kind` on `rows`."""
    hit = np.zeros(frame.height, dtype=bool)
    hit[rows] = True
    details: list[str | None] = [None] * frame.height
    for row, text in zip(rows, detail, strict=True):
        details[int(row)] = text
    return frame.with_columns(
        pl.when(pl.Series(hit)).then(pl.lit(kind)).otherwise(pl.col(FAULT)).alias(FAULT),
        pl.when(pl.Series(hit)).then(pl.lit(field)).otherwise(pl.col(FAULT_FIELD)).alias(FAULT_FIELD),
        pl.when(pl.Series(hit))
        .then(pl.Series(details, dtype=pl.String))
        .otherwise(pl.col(FAULT_DETAIL))
        .alias(FAULT_DETAIL),
    )


def set_values(frame: pl.DataFrame, rows: np.ndarray, column: str, values: np.ndarray) -> pl.DataFrame:
    """Overwrite `column` at `rows` with `values` (None for null), keeping the column's type."""
    if len(rows) == 0:
        return frame
    replacement = pl.Series(column, list(values), dtype=frame.schema[column], strict=False)
    return frame.with_columns(frame[column].scatter(np.asarray(rows, dtype=np.int64), replacement))


def duplicate_rows(frame: pl.DataFrame, rows: np.ndarray, key: str) -> pl.DataFrame:
    """Insert an exact copy right after each chosen row; the copy carries the fault, both rows are reserved."""
    frame = set_values(frame, rows, RESERVED, np.full(len(rows), True))
    copies = mark(
        frame[rows], np.arange(len(rows)), "duplicate_row", None, ["exact copy of the previous record"] * len(rows)
    )
    order = np.concatenate([np.arange(frame.height), rows]).argsort(kind="stable")
    return pl.concat([frame, copies])[order]


def impossible_glucose(unit: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Physiologically impossible CGM values in the site's unit (zero, negative, far above 600 mg/dL)."""
    mg = rng.choice(np.array([0.0, -5.0, -40.0, 1450.0, 2500.0, 9999.0]), size=size)
    return np.round(mg * MMOL_PER_MG, 1) if unit == "mmol/L" else mg


def garble(stamps: list[datetime | None], rng: np.random.Generator) -> list[str]:
    """Timestamps as broken exports write them: impossible dates, cut-off strings, placeholders."""
    forms = (
        lambda t: f"{t:%Y-%m-%d}T{t.hour + 24}:{t:%M}:00",
        lambda t: f"{t:%d/%m}/20{t:%y}T99:99",
        lambda t: f"{t:%Y}-{t.month + 12:02d}-{t:%d} {t:%H:%M}",
        lambda t: f"{t:%Y-%m-%dT%H:%M}"[:-3],
        lambda t: "00/00/0000 00:00",
        lambda t: "#VALUE!",
    )
    return [forms[int(rng.integers(len(forms)))](t or datetime(2026, 1, 1)) for t in stamps]


def phi_phrase(identity: Identity, rng: np.random.Generator) -> str:
    """A phrase a patient or nurse might type into a free-text field, leaking an identifier."""
    phrases = (
        f"for {identity.given} {identity.family}",
        f"pt MRN {identity.mrn}",
        f"call mum on {identity.phone}",
        f"{identity.given} {identity.family} DOB {identity.birth_date:%d/%m/%Y}",
        f"lives at {identity.address}",
    )
    return phrases[int(rng.integers(len(phrases)))]


def damage_line(line: str, kind: str, rng: np.random.Generator, delimiter: str | None) -> tuple[str, str]:
    """Truncate or malform one text line; returns the damaged line and a description."""
    if kind == "truncated_line":
        cut = int(len(line) * rng.uniform(0.3, 0.8))
        return line[:cut], f"line cut after {cut} of {len(line)} characters"
    if delimiter is None:  # NDJSON: make the JSON unparseable
        return line.replace('"', "'", 2).replace("}", "", 1), "JSON with single quotes and an unbalanced brace"
    return line.replace(delimiter, f'{delimiter}"', 1) + f"{delimiter}{delimiter}", "unbalanced quote and extra fields"
