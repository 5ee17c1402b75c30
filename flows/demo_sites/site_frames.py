"""A hospital's tables in its own units and codes, with its faults injected, ready to be written."""

from __future__ import annotations

import numpy as np
import polars as pl

from flows.demo_sites import faults as f
from flows.demo_sites.identities import Identity
from flows.demo_sites.profile import SiteProfile
from flows.demo_sites.records import SiteRecords

LB_PER_KG = 2.2046226218
MMOL_MOL_FROM_PERCENT = (10.929, -23.5)  # IFCC mmol/mol = 10.929 x (NGSP % - 2.15)
CLOCK_SHIFT_BLOCK = (12, 60)  # readings per clock-reset episode

# Which tables can carry which row faults.
DUPLICATE_TABLES = ("cgm", "basal", "bolus", "vitals", "meals")
TIME_FAULT_TABLES = ("cgm", "bolus", "meals", "vitals")
FREE_TEXT = {"meals": "note", "devices": "name"}


def site_frames(profile: SiteProfile, records: SiteRecords) -> dict[str, pl.DataFrame]:
    """Convert the canonical tables to the site's units (glucose, weight, HbA1c) and label each value."""
    glucose_unit = profile.export.glucose_unit
    to_site_glucose = f.MMOL_PER_MG if glucose_unit == "mmol/L" else 1.0
    digits = 1 if glucose_unit == "mmol/L" else 0
    t = records.tables
    weight_lb = profile.export.weight_unit == "lb"
    ifcc = profile.export.local_codes.get("hba1c", "").endswith("IFCC")
    a, b = MMOL_MOL_FROM_PERCENT
    frames = dict(t)
    frames["cgm"] = t["cgm"].select(
        "record_id", "mrn", "device_id", "time",
        (pl.col("value_mg_dl") * to_site_glucose).round(digits).alias("value"),
        pl.lit(glucose_unit).alias("unit"),
    )  # fmt: skip
    frames["vitals"] = t["vitals"].with_columns(
        pl.when((pl.col("kind") == "weight") & weight_lb)
        .then((pl.col("value") * LB_PER_KG).round(1))
        .otherwise(pl.col("value"))
        .alias("value"),
        pl.when((pl.col("kind") == "weight") & weight_lb).then(pl.lit("lb")).otherwise(pl.col("unit")).alias("unit"),
    )
    frames["labs"] = t["labs"].with_columns(
        pl.when(pl.col("kind") == "plasma_glucose")
        .then((pl.col("value") * to_site_glucose).round(digits))
        .when((pl.col("kind") == "hba1c") & ifcc)
        .then((pl.col("value") * a + b).round(0))
        .otherwise(pl.col("value"))
        .alias("value"),
        pl.when(pl.col("kind") == "plasma_glucose")
        .then(pl.lit(glucose_unit))
        .when((pl.col("kind") == "hba1c") & ifcc)
        .then(pl.lit("mmol/mol"))
        .otherwise(pl.col("unit"))
        .alias("unit"),
    )
    frames["therapy"] = (
        t["therapy"]
        .with_columns(
            (pl.col("cf_mg_dl_per_u") * to_site_glucose).round(1).alias("cf_per_u"),
            pl.lit(f"{glucose_unit}/U").alias("cf_unit"),
        )
        .drop("cf_mg_dl_per_u")
    )
    return {name: f.with_fault_columns(frame) for name, frame in frames.items()}


def inject_row_faults(
    frames: dict[str, pl.DataFrame],
    profile: SiteProfile,
    identities: dict[str, Identity],
    rng: np.random.Generator,
) -> dict[str, pl.DataFrame]:
    """Apply the profile's row-fault rates; every configured kind hits at least one row."""
    rates = profile.faults
    out = dict(frames)
    glucose_unit = profile.export.glucose_unit

    for i, name in enumerate(DUPLICATE_TABLES):
        n = f.count_for(rates.get("duplicate_row", 0), out[name].height, at_least_one=i == 0)
        out[name] = f.duplicate_rows(out[name], f.pick_clean(out[name], n, rng), "record_id")

    cgm = out["cgm"]
    n = f.count_for(rates.get("impossible_value", 0), cgm.height, at_least_one=True)
    rows = f.pick_clean(cgm, n, rng)
    values = f.impossible_glucose(glucose_unit, rng, len(rows))
    cgm = f.set_values(cgm, rows, "value", values)
    cgm = f.mark(cgm, rows, "impossible_value", "value", [f"glucose {v} {glucose_unit}" for v in values])

    n = f.count_for(rates.get("unit_mixup", 0), cgm.height, at_least_one=True)
    rows = f.pick_clean(cgm, n, rng)
    mmol = cgm["value"].to_numpy()[rows] * (1.0 if glucose_unit == "mmol/L" else f.MMOL_PER_MG)
    cgm = f.set_values(cgm, rows, "value", np.round(mmol, 1))
    cgm = f.set_values(cgm, rows, "unit", np.full(len(rows), "mg/dL", dtype=object))
    cgm = f.mark(cgm, rows, "unit_mixup", "value", [f"{v:.1f} is mmol/L, labelled mg/dL" for v in mmol])
    out["cgm"] = _clock_shift(cgm, rates.get("clock_shift", 0), rng)

    vitals = out["vitals"]
    n = f.count_for(rates.get("impossible_value", 0), int((vitals["kind"] == "weight").sum()), at_least_one=False)
    rows = f.pick_clean(vitals, n, rng, pl.col("kind") == "weight")
    weights = rng.choice(np.array([0.0, 0.4, 880.0, 1500.0]), size=len(rows))
    vitals = f.set_values(vitals, rows, "value", weights)
    out["vitals"] = f.mark(vitals, rows, "impossible_value", "value", [f"body weight {w}" for w in weights])

    for i, name in enumerate(TIME_FAULT_TABLES):
        frame = out[name]
        n = f.count_for(rates.get("missing_timestamp", 0), frame.height, at_least_one=i == 0)
        rows = f.pick_clean(frame, n, rng)
        frame = f.set_values(frame, rows, "time", np.full(len(rows), None))
        frame = f.mark(frame, rows, "missing_timestamp", "time", ["timestamp empty"] * len(rows))
        n = f.count_for(rates.get("garbled_timestamp", 0), frame.height, at_least_one=i == 0)
        rows = f.pick_clean(frame, n, rng)
        garbled = f.garble([frame["time"][int(r)] for r in rows], rng)
        frame = f.set_values(frame, rows, f.GARBLED_TIME, np.array(garbled, dtype=object))
        out[name] = f.mark(frame, rows, "garbled_timestamp", "time", [f"timestamp {g!r}" for g in garbled])

    for i, (name, column) in enumerate(FREE_TEXT.items()):
        frame = out[name]
        n = f.count_for(rates.get("phi_in_free_text", 0), frame.height, at_least_one=i == 0)
        rows = f.pick_clean(frame, n, rng)
        texts = frame[column].to_numpy().copy()
        mrns = frame["mrn"].to_numpy()
        leaked = [f"{texts[r]} {f.phi_phrase(identities[mrns[r]], rng)}".strip() for r in rows]
        frame = f.set_values(frame, rows, column, np.array(leaked, dtype=object))
        out[name] = f.mark(frame, rows, "phi_in_free_text", column, ["identifier typed into free text"] * len(rows))
    return out


def _clock_shift(cgm: pl.DataFrame, rate: float, rng: np.random.Generator) -> pl.DataFrame:
    """Reset the sensor clock of a few patients for a block of readings (device battery reset)."""
    patients = cgm["mrn"].unique(maintain_order=True).to_numpy()
    count = f.count_for(rate, len(patients), at_least_one=True)
    times = cgm["time"].to_numpy().copy()
    for mrn in rng.choice(patients, size=count, replace=False):
        clean = np.flatnonzero(((cgm["mrn"] == mrn) & f.clean_rows(cgm) & cgm["time"].is_not_null()).to_numpy())
        length = min(int(rng.integers(*CLOCK_SHIFT_BLOCK)), clean.size // 2)
        first = int(rng.integers(0, clean.size - length))
        block = clean[first : first + length]
        # A contiguous run of clean readings only: stop at the first row a previous fault touched.
        block = block[: int(np.argmax(np.diff(block, append=block[-1] + 2) != 1)) + 1]
        origin = times[block[0]]
        reset = np.datetime64(f.CLOCK_RESET, "ms")
        times[block] = reset + (times[block] - origin)
        cgm = f.mark(
            cgm, block, "clock_shift", "time", [f"sensor clock reset to {f.CLOCK_RESET:%Y-%m-%d}"] * len(block)
        )
    return cgm.with_columns(pl.Series("time", times).dt.replace_time_zone("UTC"))


def garbled_or_time(frame: pl.DataFrame, formatted: pl.Expr) -> pl.Expr:
    """The formatted timestamp, or the garbled text a fault put there."""
    return pl.when(pl.col(f.GARBLED_TIME).is_not_null()).then(pl.col(f.GARBLED_TIME)).otherwise(formatted)


def local_time(profile: SiteProfile) -> pl.Expr:
    """Timestamps as the site writes them: local wall-clock time in the site's format."""
    return pl.col("time").dt.convert_time_zone(profile.export.time_zone).dt.strftime(profile.export.timestamp_format)
