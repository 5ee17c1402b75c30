-- Mart: every published what-if row: the forecast under a scenario next to the forecast without it.
CREATE OR REPLACE TABLE fct_whatif AS
SELECT
    person_id,
    scenario_id,
    input_cutoff,
    horizon_min,
    target_time,
    batch_id,
    model_version,
    issued_at,
    q05,
    q50,
    q95,
    baseline_q50,
    q50 - baseline_q50 AS change_q50_mg_dl
FROM stg_whatif
ORDER BY person_id, scenario_id, input_cutoff, horizon_min, batch_id;

COMMENT ON TABLE fct_whatif IS 'One row per published what-if forecast (key batch_id, scenario_id, person_id, input_cutoff, horizon_min): the median and 90% interval under the scenario, and the change from the forecast without it. Sorted by person_id, scenario_id, input_cutoff, horizon_min.';
COMMENT ON COLUMN fct_whatif.person_id IS 'Pseudonymous patient (dim_patient.person_id).';
COMMENT ON COLUMN fct_whatif.scenario_id IS 'Scenario applied (dim_scenario.scenario_id, with the batch).';
COMMENT ON COLUMN fct_whatif.input_cutoff IS 'End of the last 5-minute history bin used, UTC.';
COMMENT ON COLUMN fct_whatif.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN fct_whatif.target_time IS 'Start of the 5-minute CGM bin forecast, UTC.';
COMMENT ON COLUMN fct_whatif.batch_id IS 'Prediction batch that issued it (dim_prediction_batch.batch_id).';
COMMENT ON COLUMN fct_whatif.model_version IS 'Registered twin version that made it.';
COMMENT ON COLUMN fct_whatif.issued_at IS 'When it was issued, UTC.';
COMMENT ON COLUMN fct_whatif.q05 IS 'Lower end of the calibrated 90% interval under the scenario, mg/dL.';
COMMENT ON COLUMN fct_whatif.q50 IS 'Median forecast under the scenario, mg/dL.';
COMMENT ON COLUMN fct_whatif.q95 IS 'Upper end of the calibrated 90% interval under the scenario, mg/dL.';
COMMENT ON COLUMN fct_whatif.baseline_q50 IS 'Median forecast for the same patient, cut-off and horizon without the scenario, mg/dL.';
COMMENT ON COLUMN fct_whatif.change_q50_mg_dl IS 'q50 - baseline_q50, mg/dL: what the scenario changes (negative lowers glucose).';
