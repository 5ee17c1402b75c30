-- Mart: what each scenario changes for one patient at one cut-off, over the forecast's two hours: the mean of the
-- median forecast and the expected time in range 70-180 mg/dL (each 5-minute bin weighed by its chance of being
-- in range under the calibrated 90% interval; counting the median's bins would treat the forecast as certain).
CREATE OR REPLACE TABLE mart_whatif_patient AS
SELECT
    batch_id,
    scenario_id,
    person_id,
    input_cutoff,
    any_value(model_version) AS model_version,
    count(*) AS n_horizons,
    max(horizon_min) AS horizon_max_min,
    avg(baseline_q50) AS baseline_mean_mg_dl,
    avg(q50) AS mean_mg_dl,
    avg(q50 - baseline_q50) AS change_mean_mg_dl,
    100.0 * avg(baseline_p_in_range) AS baseline_expected_tir_pct,
    100.0 * avg(p_in_range) AS expected_tir_pct,
    100.0 * avg(p_in_range - baseline_p_in_range) AS change_expected_tir_pct
FROM int_whatif_in_range
GROUP BY batch_id, scenario_id, person_id, input_cutoff
-- A what-if without its baseline forecast, or with a bin it cannot weigh, has no change to report (the
-- prediction flow writes both, and its contract admits no missing or crossed quantile).
HAVING count(baseline_p_in_range) = count(*) AND count(p_in_range) = count(*)
ORDER BY person_id, scenario_id, input_cutoff, batch_id;

COMMENT ON TABLE mart_whatif_patient IS 'What each what-if scenario changes for a patient at a cut-off over the forecast''s two hours (key batch_id, scenario_id, person_id, input_cutoff): mean glucose and expected time in range 70-180, with and without the scenario. Sorted by person_id, scenario_id, input_cutoff.';
COMMENT ON COLUMN mart_whatif_patient.batch_id IS 'Prediction batch (dim_prediction_batch.batch_id).';
COMMENT ON COLUMN mart_whatif_patient.scenario_id IS 'Scenario (dim_scenario.scenario_id).';
COMMENT ON COLUMN mart_whatif_patient.person_id IS 'Pseudonymous patient (dim_patient.person_id).';
COMMENT ON COLUMN mart_whatif_patient.input_cutoff IS 'End of the last 5-minute history bin used, UTC.';
COMMENT ON COLUMN mart_whatif_patient.model_version IS 'Registered twin version that made the forecasts.';
COMMENT ON COLUMN mart_whatif_patient.n_horizons IS 'Forecast bins averaged (24: every 5 minutes up to 120).';
COMMENT ON COLUMN mart_whatif_patient.horizon_max_min IS 'Last minute ahead covered, 120.';
COMMENT ON COLUMN mart_whatif_patient.baseline_mean_mg_dl IS 'Mean median forecast without the scenario, mg/dL.';
COMMENT ON COLUMN mart_whatif_patient.mean_mg_dl IS 'Mean median forecast under the scenario, mg/dL.';
COMMENT ON COLUMN mart_whatif_patient.change_mean_mg_dl IS 'mean_mg_dl - baseline_mean_mg_dl: the change in 2-h mean glucose, mg/dL.';
COMMENT ON COLUMN mart_whatif_patient.baseline_expected_tir_pct IS 'Expected time in range 70-180 mg/dL without the scenario, % of the 2 h.';
COMMENT ON COLUMN mart_whatif_patient.expected_tir_pct IS 'Expected time in range 70-180 mg/dL under the scenario, % of the 2 h.';
COMMENT ON COLUMN mart_whatif_patient.change_expected_tir_pct IS 'expected_tir_pct - baseline_expected_tir_pct, percentage points (bench/whatif.py measures how it tracks the simulator).';
