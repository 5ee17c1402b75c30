"""Turn a source's raw text fields into canonical values: UTC times, canonical units, concepts, pseudonyms.

Nothing here rejects a row: a value that cannot be converted becomes null, and the contracts
(data_contracts) decide what is quarantined and why. Transformations are vectorized polars
expressions so a site's millions of device rows stay cheap.
"""

from __future__ import annotations

import polars as pl

from data_contracts.vocabulary import MEASUREMENTS, UNIT_CONCEPTS, UNIT_CONVERSIONS
from flows.ingest.mapping import MeasurementSource, SiteFormat

UTC_MS = pl.Datetime("ms", "UTC")


def parse_time(column: str, site: SiteFormat) -> pl.Expr:
    """Source timestamps as UTC; null when unparseable or a local time that does not exist (DST gap).

    Local wall-clock times that occur twice (the autumn DST change) are read as the first of the two:
    without an offset in the source there is no way to tell them apart.
    """
    text = pl.col(column)
    if site.timestamp_format == "epoch_ms":
        return pl.from_epoch(text.cast(pl.Int64, strict=False), time_unit="ms").dt.replace_time_zone("UTC")
    if "%z" in site.timestamp_format or "%:z" in site.timestamp_format:
        return text.str.to_datetime(site.timestamp_format, strict=False, time_unit="ms").dt.convert_time_zone("UTC")
    local = text.str.to_datetime(site.timestamp_format, strict=False, time_unit="ms")
    return local.dt.replace_time_zone(site.time_zone, ambiguous="earliest", non_existent="null").dt.convert_time_zone(
        "UTC"
    )


def concept_key(source: MeasurementSource) -> pl.Expr:
    """Map each row to its concept key: the file's fixed concept, or the row's code through the code map."""
    if source.concept is not None:
        return pl.lit(source.concept, dtype=pl.String)
    assert source.code is not None
    return pl.col("code").replace_strict(source.codes, default=None, return_dtype=pl.String)


def canonical_value(units: dict[str, str]) -> pl.Expr:
    """Values in their concept's canonical unit (null if the unit or conversion is unknown).

    Expects columns `value_number`, `ucum_unit` and `concept`.
    """
    canonical = pl.col("concept").replace_strict(
        {k: m.unit for k, m in MEASUREMENTS.items()}, default=None, return_dtype=pl.String
    )
    factor = pl.when(pl.col("ucum_unit") == canonical).then(pl.lit(1.0))
    offset = pl.when(pl.col("ucum_unit") == canonical).then(pl.lit(0.0))
    for (source_unit, target_unit), (scale, shift) in UNIT_CONVERSIONS.items():
        applies = (pl.col("ucum_unit") == source_unit) & (canonical == target_unit)
        factor = factor.when(applies).then(pl.lit(scale))  # type: ignore[assignment]
        offset = offset.when(applies).then(pl.lit(shift))  # type: ignore[assignment]
    return pl.col("value_number") * factor.otherwise(None) + offset.otherwise(None)


def measurement_candidates(
    frame: pl.DataFrame, source: MeasurementSource, site: SiteFormat, units: dict[str, str]
) -> pl.DataFrame:
    """Add the parsed and converted columns a measurement row needs: time_utc, value_number, concept, value, unit."""
    concepts = {k: m.concept_id for k, m in MEASUREMENTS.items()}
    canonical_units = {k: UNIT_CONCEPTS[m.unit] for k, m in MEASUREMENTS.items()}
    return frame.with_columns(
        parse_time("time", site).alias("time_utc"),
        pl.col("value").cast(pl.Float64, strict=False).alias("value_number"),
        pl.col("unit").replace_strict(units, default=None, return_dtype=pl.String).alias("ucum_unit"),
        concept_key(source).alias("concept"),
    ).with_columns(
        canonical_value(units).alias("value_canonical"),
        pl.col("concept").replace_strict(concepts, default=None, return_dtype=pl.Int32).alias("concept_id"),
        pl.col("concept").replace_strict(canonical_units, default=None, return_dtype=pl.Int32).alias("unit_concept_id"),
    )
