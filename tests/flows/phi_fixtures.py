"""What a drop holds that must never leave its raw layer, and a scan for it."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from flows.demo_sites.generate import SitePaths
from flows.ingest.mapping import mapping_for
from flows.ingest.readers import read_source


def identifiers(data_dir: Path, site: str) -> set[str]:
    """Every direct identifier and free text of a drop, as strings of 5 characters or more.

    Names, MRNs, accession numbers, birth dates, addresses, phones, device serials, carbohydrate notes and
    clinic-letter text.
    """
    drop, mapping = SitePaths.under(data_dir, site).drop, mapping_for(site)
    source = mapping.patients
    fields = {f"f{i}": field for i, field in enumerate([*source.identifiers, source.birth_date, source.patient])}
    assert source.full_name is not None
    fields |= {"given": source.full_name[0], "family": source.full_name[1]}
    listing = read_source(drop, source.file, fields, mapping.site.format).frame
    found = {value for column in fields for value in listing[column].drop_nulls().to_list()}
    found |= {f"{g} {f}" for g, f in zip(listing["given"], listing["family"], strict=True)}
    truth = pl.read_parquet(SitePaths.under(data_dir, site).truth / "patients.parquet")
    found |= set(truth["mrn"]) | set(truth["accession"])
    for file in mapping.withheld:  # clinic letters: names, MRNs, phones inside free text
        path = drop / file
        text = path.read_text() if path.suffix != ".parquet" else pl.read_parquet(path).write_csv()
        found |= {line[20:60] for line in text.splitlines()[1:] if len(line) > 60}
    for devices in mapping.devices.values():
        found |= set(read_source(drop, devices.file, {"serial": devices.serial}, mapping.site.format).frame["serial"])
    carbs = next(iter(mapping.observations.values()))
    assert carbs.free_text is not None
    notes = read_source(drop, carbs.file, {"note": carbs.free_text}, mapping.site.format).frame["note"]
    found |= {n for n in notes.drop_nulls().to_list() if len(n) >= 10}
    return {value for value in found if value is not None and len(value) >= 5}


def leaks(values: set[str], texts: dict[str, str]) -> list[tuple[str, str]]:
    """(value, where) for each value found in a text; an all-digit value only where no digit touches it."""
    found = []
    for value in values:
        pattern = re.compile(rf"(?<!\d){re.escape(value)}(?!\d)" if value.isdigit() else re.escape(value))
        found += [(value, where) for where, text in texts.items() if pattern.search(text)]
    return found
