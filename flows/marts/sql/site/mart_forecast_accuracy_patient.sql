-- Mart: forecast accuracy per model version, patient and horizon (which patients the twin serves badly).
CREATE OR REPLACE TABLE mart_forecast_accuracy_patient AS
SELECT
    model_version,
    person_id,
    horizon_min,
    n_forecasts,
    n_scored,
    sum_abs_error / nullif(n_scored, 0) AS mae_mg_dl,
    sqrt(sum_sq_error / nullif(n_scored, 0)) AS rmse_mg_dl,
    sum_error / nullif(n_scored, 0) AS bias_mg_dl,
    100.0 * n_covered / nullif(n_scored, 0) AS coverage_90_pct,
    sqrt(sum_sq_error_persistence / nullif(n_persistence, 0)) AS persistence_rmse_mg_dl
FROM int_forecast_patient_horizon
ORDER BY model_version, person_id, horizon_min;

COMMENT ON TABLE mart_forecast_accuracy_patient IS 'Forecast accuracy per model version, patient and horizon (key model_version, person_id, horizon_min); same definitions as mart_forecast_accuracy.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.model_version IS 'Registered twin version.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.person_id IS 'Pseudonymous patient (dim_patient.person_id).';
COMMENT ON COLUMN mart_forecast_accuracy_patient.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.n_forecasts IS 'Forecasts published for the patient at this horizon.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.n_scored IS 'Of those, forecasts whose target bin has CGM.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.mae_mg_dl IS 'Mean absolute error of the median forecast, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.rmse_mg_dl IS 'Root mean squared error of the median forecast, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.bias_mg_dl IS 'Mean of median forecast minus observed CGM, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.coverage_90_pct IS 'Share of scored forecasts inside their 90% interval, %.';
COMMENT ON COLUMN mart_forecast_accuracy_patient.persistence_rmse_mg_dl IS 'RMSE of persistence on the same targets, mg/dL.';
