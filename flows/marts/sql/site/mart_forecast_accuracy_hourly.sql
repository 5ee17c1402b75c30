-- Mart: forecast accuracy by model version, horizon and UTC hour of the target (is the twin as good, and its
-- interval as well calibrated, overnight as after meals?). Pre-aggregated here: grouping the forecast facts by
-- hour at query time means a full scan of every forecast row. The hour is taken from the epoch, not hour(),
-- which would convert every timestamp through the time zone library.
CREATE OR REPLACE TABLE mart_forecast_accuracy_hourly AS
SELECT
    model_version,
    horizon_min,
    CAST(epoch_ms(target_time) // 3600000 % 24 AS TINYINT) AS hour_utc,
    count(*) AS n_forecasts,
    count(observed_mg_dl) AS n_scored,
    avg(abs(q50 - observed_mg_dl)) AS mae_mg_dl,
    sqrt(avg((q50 - observed_mg_dl) ** 2)) AS rmse_mg_dl,
    avg(q50 - observed_mg_dl) AS bias_mg_dl,
    100.0 * count(*) FILTER (WHERE observed_mg_dl BETWEEN q05 AND q95) / nullif(count(observed_mg_dl), 0)
        AS coverage_90_pct,
    sqrt(avg((persistence_mg_dl - observed_mg_dl) ** 2)) AS persistence_rmse_mg_dl
FROM fct_glucose_forecast
WHERE NOT superseded
GROUP BY model_version, horizon_min, hour_utc
ORDER BY model_version, horizon_min, hour_utc;

COMMENT ON TABLE mart_forecast_accuracy_hourly IS 'Forecast accuracy per model version, horizon and UTC hour of the target bin (key model_version, horizon_min, hour_utc); same definitions as mart_forecast_accuracy.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.model_version IS 'Registered twin version.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.hour_utc IS 'Hour of day (0-23, UTC) of the target bin''s start.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.n_forecasts IS 'Forecasts published for targets in that hour.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.n_scored IS 'Of those, forecasts whose target bin has CGM.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.mae_mg_dl IS 'Mean absolute error of the median forecast, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.rmse_mg_dl IS 'Root mean squared error of the median forecast, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.bias_mg_dl IS 'Mean of median forecast minus observed CGM, mg/dL.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.coverage_90_pct IS 'Share of scored forecasts inside their 90% interval, %.';
COMMENT ON COLUMN mart_forecast_accuracy_hourly.persistence_rmse_mg_dl IS 'RMSE of persistence on the scored targets that have a persistence value, mg/dL.';
