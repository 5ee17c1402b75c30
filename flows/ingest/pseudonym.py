"""Keyed pseudonyms: HMAC-SHA256 with a secret the site generates at set-up and never shares."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import polars as pl

SECRET_BYTES = 32
PERSON_PREFIX = "person:"
DEVICE_PREFIX = "device:"


def load_or_create_secret(path: Path) -> bytes:
    """Return the site's secret from `path`, creating it (0600, random) on first use.

    The secret lives in the site's own data folder (git-ignored); losing it means new pseudonyms,
    leaking it lets anyone holding an MRN list re-identify the harmonized data.
    """
    if path.exists():
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"{path}: expected a {SECRET_BYTES}-byte hex secret; delete it to generate a new one")
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret.hex() + "\n")
    return secret


def pseudonym(secret: bytes, kind_prefix: str, source_id: str) -> str:
    """A stable pseudonym for one identifier: 'p' + 24 hex characters of HMAC-SHA256."""
    digest = hmac.new(secret, (kind_prefix + source_id).encode(), hashlib.sha256).hexdigest()
    return f"{kind_prefix[0]}{digest[:24]}"


def pseudonym_id(pseudonym_text: str) -> int:
    """A positive int64 key derived from a pseudonym (for OMOP *_id columns)."""
    return int(pseudonym_text[1:16], 16)


def pseudonymize(secret: bytes, kind_prefix: str, source_ids: pl.Series) -> pl.Series:
    """Pseudonyms for a column of identifiers (unique values hashed once)."""
    unique = source_ids.drop_nulls().unique().to_list()
    table = {value: pseudonym(secret, kind_prefix, value) for value in unique}
    return source_ids.replace_strict(table, default=None, return_dtype=pl.String)


def stable_row_ids(site_id: str, file: str, record_keys: pl.Expr) -> pl.Expr:
    """Positive int64 ids for harmonized rows: same site, file and record key, same id on every rerun.

    polars' hash is stable for a given polars version (pinned in requirements.lock), which is what
    idempotent reruns need; an upgrade of polars re-keys the harmonized tables once.
    """
    keyed = pl.concat_str(pl.lit(f"{site_id}\x00{file}\x00"), record_keys)
    return (keyed.hash(seed=0x7466) & 0x7FFF_FFFF_FFFF_FFFF).cast(pl.Int64)
