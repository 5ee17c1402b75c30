-- Mart: forecast accuracy by model version and horizon over every scored forecast of the site.
CREATE OR REPLACE TABLE mart_forecast_accuracy AS
SELECT
    model_version,
    horizon_min,
    count(DISTINCT person_id) FILTER (WHERE n_scored > 0) AS n_patients,
    sum(n_forecasts) AS n_forecasts,
    sum(n_scored) AS n_scored,
    sum(sum_abs_error) / nullif(sum(n_scored), 0) AS mae_mg_dl,
    sqrt(sum(sum_sq_error) / nullif(sum(n_scored), 0)) AS rmse_mg_dl,
    sum(sum_error) / nullif(sum(n_scored), 0) AS bias_mg_dl,
    100.0 * sum(n_covered) / nullif(sum(n_scored), 0) AS coverage_90_pct,
    sum(sum_interval_width) / nullif(sum(n_scored), 0) AS mean_interval_width_mg_dl,
    sum(n_persistence) AS n_persistence,
    sqrt(sum(sum_sq_error_persistence) / nullif(sum(n_persistence), 0)) AS persistence_rmse_mg_dl
FROM int_forecast_patient_horizon
GROUP BY model_version, horizon_min
ORDER BY model_version, horizon_min;

COMMENT ON TABLE mart_forecast_accuracy IS 'Forecast accuracy per model version and horizon (key model_version, horizon_min): published forecasts scored against the mean CGM of their target bin. Each forecast counts once (its latest issue: superseded = false); one without CGM for its target bin (not yet recorded, or a sensor gap) counts in n_forecasts only.';
COMMENT ON COLUMN mart_forecast_accuracy.model_version IS 'Registered twin version.';
COMMENT ON COLUMN mart_forecast_accuracy.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN mart_forecast_accuracy.n_patients IS 'Patients with at least one scored forecast at this horizon.';
COMMENT ON COLUMN mart_forecast_accuracy.n_forecasts IS 'Forecasts published at this horizon (latest issue of each), scored or not.';
COMMENT ON COLUMN mart_forecast_accuracy.n_scored IS 'Forecasts whose target bin has CGM: the denominator of MAE, RMSE, bias, coverage and width.';
COMMENT ON COLUMN mart_forecast_accuracy.mae_mg_dl IS 'Mean absolute error of the median forecast, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy.rmse_mg_dl IS 'Root mean squared error of the median forecast, mg/dL (OhioT1DM anchor: about 18 at 30 min).';
COMMENT ON COLUMN mart_forecast_accuracy.bias_mg_dl IS 'Mean of median forecast minus observed CGM, mg/dL (positive: forecasts too high).';
COMMENT ON COLUMN mart_forecast_accuracy.coverage_90_pct IS 'Share of scored forecasts whose observed CGM lies within [q05, q95], % (calibrated target 90%).';
COMMENT ON COLUMN mart_forecast_accuracy.mean_interval_width_mg_dl IS 'Mean width q95 - q05 of the scored forecasts'' 90% interval, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy.n_persistence IS 'Scored forecasts whose last history bin has CGM too: the denominator of persistence_rmse_mg_dl.';
COMMENT ON COLUMN mart_forecast_accuracy.persistence_rmse_mg_dl IS 'RMSE of persistence (the last history bin''s CGM carried forward) on the same targets, mg/dL: the baseline the model must beat.';
