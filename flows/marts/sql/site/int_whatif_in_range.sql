-- Intermediate: each what-if row's chance of lying in range 70-180 mg/dL, under the scenario and without it.
-- A forecast bin's glucose is a two-piece normal that reproduces its calibrated 5/50/95% quantiles (below the
-- median a normal of the lower half-width, above it one of the upper), as models.glucose_metrics.probability_in_range
-- computes it; a zero-width interval gives 1 or 0. The baseline is the batch's own forecast of the same patient,
-- cut-off and horizon (its median is fct_whatif.baseline_q50). The normal CDF is Abramowitz and Stegun 7.1.26
-- (absolute error below 1.5e-7): DuckDB has no erf.
CREATE OR REPLACE TEMP MACRO whatif_normal_cdf(z) AS
    0.5 + sign(z) * 0.5 * (1.0 - (
        0.254829592 * (1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)))
        - 0.284496736 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 2)
        + 1.421413741 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 3)
        - 1.453152027 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 4)
        + 1.061405429 * pow(1.0 / (1.0 + 0.3275911 * abs(z) / sqrt(2.0)), 5)
    ) * exp(-z * z / 2.0));

-- P(glucose <= x) when inclusive, else P(glucose < x). The half below the median answers for x under it (or at
-- it, when strict); a zero-width half puts its 50% on the median: 0 below it, 1 from it on.
CREATE OR REPLACE TEMP MACRO whatif_share_under(x, q05, q50, q95, lower_half) AS
    CASE
        WHEN (CASE WHEN lower_half THEN q50 - q05 ELSE q95 - q50 END) > 0
            THEN whatif_normal_cdf(
                (x - q50) * 1.6448536269514722 / (CASE WHEN lower_half THEN q50 - q05 ELSE q95 - q50 END))
        WHEN lower_half THEN 0.0
        ELSE 1.0
    END;

-- NULL for a missing or crossed quantile (the prediction contract lets neither reach a published batch).
CREATE OR REPLACE TEMP MACRO whatif_p_in_range(q05, q50, q95) AS
    CASE
        WHEN q05 IS NULL OR q50 IS NULL OR q95 IS NULL OR q05 > q50 OR q50 > q95 THEN NULL
        ELSE whatif_share_under(getvariable('range_high'), q05, q50, q95, getvariable('range_high') < q50)
            - whatif_share_under(getvariable('range_low'), q05, q50, q95, getvariable('range_low') <= q50)
    END;

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
    whatif_p_in_range(whatif.q05, whatif.q50, whatif.q95) AS p_in_range,
    whatif_p_in_range(forecast.q05, forecast.q50, forecast.q95) AS baseline_p_in_range
FROM fct_whatif AS whatif
LEFT JOIN fct_glucose_forecast AS forecast USING (batch_id, person_id, input_cutoff, horizon_min);
