"""Windows to forecast from: every patient's recent forecast origins, including the newest, at a fixed cadence.

Training windows (`build_windows`) need a recorded future to learn from. A forecast does not: its origins run at
`every_bins` up to each patient's last CGM reading, and the window ending there is the live forecast of the next
two hours. Its plan is what is recorded where the grid has it (for past origins: the insulin and meals that were
then given, as a patient announcing them would have planned) and, after the grid ends, basal continuing at its
last rate with no bolus or meal announced. Targets are the recorded CGM where it exists (NaN after the grid), so
past forecasts can be scored later.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from flows.features import BIN_MS, FeatureSet
from models.twin.windows import HISTORY_STEPS, HORIZON_STEPS, Windows, _fill_within, _static_rows


def forecast_windows(features: FeatureSet, *, every_bins: int = 12, since: np.datetime64 | None = None) -> Windows:
    """One window per patient every `every_bins` bins back from the patient's last CGM bin (origins >= `since`)."""
    if every_bins < 1:
        raise ValueError(f"every_bins must be at least 1, got {every_bins}")
    grid = features.grid.sort("person_id", "bin_start")
    channels = ("basal_u", "bolus_u", "carbs_logged_g")
    padded = _pad_future(grid.select("person_id", "bin_start", "cgm_mg_dl", *channels))
    person_id = padded["person_id"].to_numpy()
    bin_ms = padded["bin_start"].dt.epoch("ms").to_numpy()
    cgm = padded["cgm_mg_dl"].fill_null(np.nan).to_numpy().astype(np.float32)
    inputs = np.stack([padded[c].to_numpy() for c in channels], axis=1).astype(np.float32)
    recorded = padded["recorded"].to_numpy()

    starts = np.flatnonzero(np.r_[True, person_id[1:] != person_id[:-1]]) if len(person_id) else np.zeros(0, int)
    position = np.arange(len(person_id)) - np.repeat(starts, np.diff(np.r_[starts, len(person_id)]))
    observed = ~np.isnan(cgm) & recorded
    last_observed = (
        pl.DataFrame({"p": person_id, "i": np.where(observed, np.arange(len(cgm)), -1)})
        .select(pl.col("i").max().over("p"))["i"]
        .to_numpy()
    )
    keep = observed & (position >= HISTORY_STEPS - 1) & ((last_observed - np.arange(len(cgm))) % every_bins == 0)
    if since is not None:
        keep &= bin_ms >= since.astype("datetime64[ms]").astype(np.int64)
    origin = np.flatnonzero(keep)

    past = origin[:, None] + np.arange(1 - HISTORY_STEPS, 1)
    ahead = origin[:, None] + np.arange(1, HORIZON_STEPS + 1)
    filled, seen = _fill_within(cgm[past])
    return Windows(
        history=np.concatenate([filled[..., None], seen[..., None], inputs[past]], axis=2),
        future_inputs=inputs[ahead],
        static=_static_rows(features.static, person_id[origin]),
        target=np.where(recorded[ahead], cgm[ahead], np.nan).astype(np.float32),
        last_cgm=cgm[origin],
        person_id=person_id[origin].astype(np.int64),
        t0=bin_ms[origin].astype("datetime64[ms]"),
    )


def _pad_future(grid: pl.DataFrame) -> pl.DataFrame:
    """Each person's grid followed by HORIZON_STEPS unrecorded bins: no CGM, basal at its last rate, no bolus/meal."""
    last = grid.group_by("person_id", maintain_order=True).agg(
        pl.col("bin_start").last(), pl.col("basal_u").last().fill_null(0.0)
    )
    steps = pl.Series("step", np.arange(1, HORIZON_STEPS + 1), dtype=pl.Int64)
    future = (
        last.join(pl.DataFrame(steps), how="cross")
        .with_columns(
            (pl.col("bin_start") + pl.duration(milliseconds=pl.col("step") * BIN_MS)).alias("bin_start"),
            pl.lit(None, dtype=grid.schema["cgm_mg_dl"]).alias("cgm_mg_dl"),
            pl.lit(0.0).alias("bolus_u"),
            pl.lit(0.0).alias("carbs_logged_g"),
        )
        .drop("step")
    )
    both = pl.concat(
        [grid.with_columns(pl.lit(True).alias("recorded")), future.with_columns(pl.lit(False).alias("recorded"))],
        how="diagonal_relaxed",
    )
    return both.sort("person_id", "bin_start")
