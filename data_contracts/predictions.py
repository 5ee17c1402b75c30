"""The prediction contract: what a batch of twin forecasts and what-if answers must satisfy before anyone sees it.

The same `Check` declarations as the site flow's contracts, run by `gx_runner.run_contract` (GX results plus the
rows each check flags), on two tables of one prediction batch:

- `forecast`: one row per patient, forecast origin (input cut-off) and horizon (5..120 min), with the calibrated
  5/50/95% quantiles in mg/dL and the model version;
- `whatif`: the same for each catalogue scenario, with the baseline median beside it.

Checks: quantiles plausible (median within what a sensor can report, bounds non-negative and finite), quantiles
monotone (lower <= median <= upper), every forecast complete (all 24 horizons, once each), the model version
registered, and the inputs fresh (each live forecast's cut-off within `max_input_lag` of the site's newest CGM
in the harmonized store: features that lag the store mean the site flow did not rebuild them). Every check
allows no violation: one bad row fails the batch, which is then quarantined whole and not published.
"""

from __future__ import annotations

from datetime import timedelta

from data_contracts.contracts import ROW_QUERY_EXPECTATION, Check

PREDICTION_CONTRACT_VERSION = "1.0.0"
PREDICTION_TABLES = ("forecast", "whatif")
HORIZONS_MIN = tuple(range(5, 121, 5))
MEDIAN_RANGE_MG_DL = (20.0, 600.0)  # a median outside what CGM sensors report (39-600) with margin is implausible
UPPER_MAX_MG_DL = 1000.0


def prediction_checks(*, registered_versions: list[str], max_input_lag: timedelta) -> list[Check]:
    """The contract for one prediction batch (tables `forecast` and `whatif`)."""
    if not registered_versions:
        raise ValueError("no registered model version: nothing can be predicted before a model is registered")
    lag_ms = int(max_input_lag.total_seconds() * 1000)
    checks: list[Check] = []
    for table in PREDICTION_TABLES:
        group = "person_id, input_cutoff" + (", scenario_id" if table == "whatif" else "")
        checks += [
            Check(f"{table}.q50.plausible_range", table, "plausibility", "ExpectColumnValuesToBeBetween",
                  {"column": "q50", "min_value": MEDIAN_RANGE_MG_DL[0], "max_value": MEDIAN_RANGE_MG_DL[1]}, 0.0,
                  f"the median forecast must lie between {MEDIAN_RANGE_MG_DL[0]:g} and {MEDIAN_RANGE_MG_DL[1]:g} "
                  "mg/dL"),
            Check(f"{table}.q05.plausible_range", table, "plausibility", "ExpectColumnValuesToBeBetween",
                  {"column": "q05", "min_value": 0.0, "max_value": MEDIAN_RANGE_MG_DL[1]}, 0.0,
                  "the lower bound must be non-negative and at most the sensor's 600 mg/dL"),
            Check(f"{table}.q95.plausible_range", table, "plausibility", "ExpectColumnValuesToBeBetween",
                  {"column": "q95", "min_value": MEDIAN_RANGE_MG_DL[0], "max_value": UPPER_MAX_MG_DL}, 0.0,
                  f"the upper bound must lie between {MEDIAN_RANGE_MG_DL[0]:g} and {UPPER_MAX_MG_DL:g} mg/dL"),
            Check(f"{table}.q50.not_below_q05", table, "plausibility", "ExpectColumnPairValuesAToBeGreaterThanB",
                  {"column_A": "q50", "column_B": "q05", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
                  0.0, "quantiles must be monotone: the lower bound at most the median"),
            Check(f"{table}.q95.not_below_q50", table, "plausibility", "ExpectColumnPairValuesAToBeGreaterThanB",
                  {"column_A": "q95", "column_B": "q50", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
                  0.0, "quantiles must be monotone: the median at most the upper bound"),
            Check(f"{table}.horizon_min.complete", table, "completeness", ROW_QUERY_EXPECTATION,
                  {"unexpected_rows_query": (
                      f"SELECT b.* FROM {{batch}} AS b JOIN (SELECT {group} FROM {{batch}} GROUP BY {group} "
                      f"HAVING count(*) <> {len(HORIZONS_MIN)} OR count(DISTINCT horizon_min) <> {len(HORIZONS_MIN)} "
                      f"OR min(horizon_min) <> {HORIZONS_MIN[0]} OR max(horizon_min) <> {HORIZONS_MIN[-1]} "
                      f"OR bool_or(horizon_min % 5 <> 0)) AS g USING ({group})")},
                  0.0, "every forecast must have each horizon 5, 10, ..., 120 min exactly once"),
            Check(f"{table}.model_version.registered", table, "conformance", "ExpectColumnValuesToBeInSet",
                  {"column": "model_version", "value_set": list(registered_versions)}, 0.0,
                  "the model version must be one the registry holds"),
            Check(f"{table}.q50.not_null", table, "completeness", "ExpectColumnValuesToNotBeNull",
                  {"column": "q50"}, 0.0, "every forecast row must have a median"),
        ]  # fmt: skip
    checks.append(
        Check("forecast.input_cutoff.fresh", "forecast", "plausibility", ROW_QUERY_EXPECTATION,
              {"unexpected_rows_query": (
                  "SELECT * FROM {batch} WHERE live AND "
                  f"epoch_ms(store_cgm_end) - epoch_ms(input_cutoff) > {lag_ms}")},
              0.0, f"a live forecast's inputs must end within {max_input_lag} of the newest CGM in the store")
    )  # fmt: skip
    return checks
