"""A site's own store: harmonized tables, features, quarantine, validation docs and run records, on the site's disk.

Layout under `data/sites/<site>/` (git-ignored; it never leaves the site):

    secret.key                  the site's pseudonym key (0600), generated on first use
    harmonized/<table>.parquet  the OMOP-shaped tables, one file each, upserted by key
    imaging/                    de-identified DICOM, by remapped study and series UID
    features/                   the twin's training features (grid, static, features.json)
    quarantine/<run>/           what a run rejected: entries.parquet (+ the raw line), unreadable files
    gx/                         Great Expectations workspace and Data Docs
    runs/<run>.json             per-run counts, ledgers and check results (no patient rows)
    state.json                  fingerprints of the drop files already harmonized, and with which mapping

Every file is written to a temporary name and renamed into place, so a reader (or a crashed run)
never sees half a table.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from data_contracts.schema import TABLES

STATE_VERSION = 1


@dataclass(frozen=True)
class SiteStore:
    """Paths of one site's store."""

    root: Path

    @classmethod
    def under(cls, data_dir: Path, site_id: str) -> SiteStore:
        """The standard layout: data/sites/<site>."""
        return cls(Path(data_dir) / "sites" / site_id)

    @property
    def secret(self) -> Path:
        """The site's pseudonym key."""
        return self.root / "secret.key"

    @property
    def harmonized(self) -> Path:
        """Folder of the harmonized tables."""
        return self.root / "harmonized"

    @property
    def features(self) -> Path:
        """Folder of the training features."""
        return self.root / "features"

    @property
    def gx(self) -> Path:
        """Great Expectations workspace (Data Docs under data_docs/)."""
        return self.root / "gx"

    @property
    def runs(self) -> Path:
        """Folder of per-run records."""
        return self.root / "runs"

    @property
    def state(self) -> Path:
        """What has been harmonized so far."""
        return self.root / "state.json"

    def quarantine(self, run_id: str) -> Path:
        """One run's quarantine folder."""
        return self.root / "quarantine" / run_id

    def table_path(self, table: str) -> Path:
        """Where one harmonized table lives."""
        return self.harmonized / f"{table}.parquet"

    def read_table(self, table: str) -> pl.DataFrame:
        """One harmonized table (empty, with its schema, before the first run)."""
        path = self.table_path(table)
        return pl.read_parquet(path) if path.exists() else TABLES[table].empty()

    def read_tables(self) -> dict[str, pl.DataFrame]:
        """Every harmonized table."""
        return {name: self.read_table(name) for name in TABLES}

    def read_state(self) -> dict[str, Any]:
        """The fingerprints of what was harmonized, or an empty state."""
        if not self.state.exists():
            return {"version": STATE_VERSION, "files": {}, "mapping": None, "last_run": None}
        return dict(json.loads(self.state.read_text()))


def upsert(existing: pl.DataFrame, new: pl.DataFrame, table: str) -> pl.DataFrame:
    """Rows of `new` replace rows of `existing` with the same key; the result is sorted by key (deterministic)."""
    key = TABLES[table].key
    conformed = TABLES[table].conform(new)
    kept = TABLES[table].conform(existing).join(conformed.select(key), on=key, how="anti")
    return pl.concat([kept, conformed]).sort(key)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through `write(temporary_path)` beside `path`, then rename it over `path`: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write `frame` to `path` as Parquet (with statistics), atomically."""
    replace_atomically(path, lambda partial: frame.write_parquet(partial, statistics=True))


def write_json_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write `payload` to `path` as indented JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    replace_atomically(path, lambda partial: partial.write_text(text))


def fingerprint_files(drop: Path) -> dict[str, str]:
    """SHA-256 of every file of the drop, by path relative to the drop."""
    prints = {}
    for path in sorted(p for p in Path(drop).rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        prints[path.relative_to(drop).as_posix()] = digest.hexdigest()
    return prints


def fingerprint_text(text: str) -> str:
    """SHA-256 of a text (a mapping file)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
