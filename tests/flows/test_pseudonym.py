"""Keyed pseudonyms: secret made once with owner-only rights, stable per secret, unlinkable across secrets."""

from __future__ import annotations

import stat
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.ingest.pseudonym import (
    PERSON_PREFIX,
    load_or_create_secret,
    pseudonym,
    pseudonym_id,
    pseudonymize,
    stable_row_ids,
)


def test_secret_is_created_once_owner_only(tmp_path: Path) -> None:
    """The first call writes a 32-byte secret readable by its owner only; later calls read the same secret."""
    path = tmp_path / "secrets" / "pseudonym.key"
    first = load_or_create_secret(path)
    assert len(first) == 32 and load_or_create_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("abcd\n")
    with pytest.raises(ValueError, match="32-byte"):
        load_or_create_secret(path)


@given(st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=30, unique=True))
def test_pseudonyms_are_stable_distinct_and_keyed(mrns: list[str]) -> None:
    """Same secret and MRN give the same pseudonym; distinct MRNs differ; another secret gives other pseudonyms."""
    secret, other = b"a" * 32, b"b" * 32
    first = [pseudonym(secret, PERSON_PREFIX, m) for m in mrns]
    assert first == [pseudonym(secret, PERSON_PREFIX, m) for m in mrns]
    assert len(set(first)) == len(mrns)
    assert not set(first) & {pseudonym(other, PERSON_PREFIX, m) for m in mrns}
    assert all(m not in p for m, p in zip(mrns, first, strict=True) if len(m) > 3)
    assert all(pseudonym_id(p) > 0 for p in first)
    column = pseudonymize(secret, PERSON_PREFIX, pl.Series(mrns + [None]))
    assert column.to_list() == [*first, None]


def test_row_ids_are_stable_and_distinct() -> None:
    """Row ids depend only on site, file and record key: reruns agree, different keys differ."""
    keys = pl.DataFrame({"record_key": [f"CG{i:07d}" for i in range(10_000)]})
    first = keys.select(stable_row_ids("north", "ehr/cgm.csv", pl.col("record_key"))).to_series()
    again = keys.select(stable_row_ids("north", "ehr/cgm.csv", pl.col("record_key"))).to_series()
    other_site = keys.select(stable_row_ids("lake", "ehr/cgm.csv", pl.col("record_key"))).to_series()
    assert first.equals(again) and first.n_unique() == 10_000 and (first > 0).all()
    assert not first.equals(other_site)
