-- Intermediate: each what-if row's chance of lying in range 70-180 mg/dL, under the scenario and without it.
-- A forecast bin's glucose is a two-piece normal that reproduces its calibrated 5/50/95% quantiles (below the
-- median a normal of the lower half-width, above it one of the upper), as models.glucose_metrics.probability_in_range
-- computes it; a zero-width interval gives 1 or 0. The baseline is the batch's own forecast of the same patient,
-- cut-off and horizon (its median is fct_whatif.baseline_q50). The normal CDF is Abramowitz and Stegun 7.1.26
-- (absolute error below 1.5e-7): DuckDB has no erf.
CREATE OR REPLACE TEMP MACRO normal_cdf(z) AS
    0.5 + sign(z) * 0.5 * (1.0 - (
        0.254829592 * (1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)))
        - 0.284496736 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 2)
        + 1.421413741 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 3)
        - 1.453152027 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 4)
        + 1.061405429 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 5)
    ) * exp(-z * z / 2.0));

-- P(glucose <= x) (or < x when not inclusive, which differs only for a zero-width half).
CREATE OR REPLACE TEMP MACRO share_at_most(x, q05, q50, q95, inclusive) AS
    CASE
        WHEN (CASE WHEN x < q50 THEN q50 - q05 ELSE q95 - q50 END) > 0
            THEN normal_cdf((x - q50) * 1.6448536269514722 / (CASE WHEN x < q50 THEN q50 - q05 ELSE q95 - q50 END))
        WHEN inclusive THEN CAST(q50 <= x AS DOUBLE)
        ELSE CAST(q50 < x AS DOUBLE)
    END;

CREATE OR REPLACE TEMP MACRO p_in_range(q05, q50, q95) AS
    share_at_most(getvariable('range_high'), q05, q50, q95, true)
    - share_at_most(getvariable('range_low'), q05, q50, q95, false);

CREATE OR REPLACE TEMP TABLE int_whatif_in_range AS
SELECT
    whatif.batch_id,
    whatif.scenario_id,
    whatif.person_id,
    whatif.input_cutoff,
    whatif.horizon_min,
    whatif.model_version,
    whatif.q50,
    forecast.q50 AS baseline_q50,
    p_in_range(whatif.q05, whatif.q50, whatif.q95) AS p_in_range,
    p_in_range(forecast.q05, forecast.q50, forecast.q95) AS baseline_p_in_range
FROM fct_whatif AS whatif
LEFT JOIN fct_glucose_forecast AS forecast USING (batch_id, person_id, input_cutoff, horizon_min);
