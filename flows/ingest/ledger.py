"""Row accounting and quarantine records shared by every source a site flow reads.

For every source file and run: rows in = rows harmonized + rows quarantined + exact duplicates
removed. A quarantined row keeps its file, position, record key, the checks it failed and the
reasons in words; a file that cannot be read is one quarantine entry with no position.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

QUARANTINE_SCHEMA = pl.Schema(
    {
        "source_file": pl.String(),
        "source_position": pl.Int64(),
        "record_key": pl.String(),
        "failed_checks": pl.String(),
        "reason": pl.String(),
    }
)
WHOLE_FILE_CHECK = "raw.file.readable"


@dataclass(frozen=True)
class SourceLedger:
    """Row accounting for one source file of one run."""

    file: str
    rows_in: int
    exact_duplicates: int
    quarantined: int
    harmonized: int
    file_error: str | None

    @property
    def balanced(self) -> bool:
        """Whether every row read is accounted for."""
        return self.rows_in == self.exact_duplicates + self.quarantined + self.harmonized


def whole_file_quarantine(file: str, reason: str) -> pl.DataFrame:
    """The quarantine entry of a file that cannot be read at all."""
    return pl.DataFrame(
        [{"source_file": file, "source_position": None, "record_key": None,
          "failed_checks": WHOLE_FILE_CHECK, "reason": reason}],
        schema=QUARANTINE_SCHEMA,
    )  # fmt: skip


def empty_quarantine() -> pl.DataFrame:
    """A quarantine with no entries."""
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)
