-- Mart: every published forecast row, scored against the CGM the site later recorded. Sorted by patient and time
-- so a patient's rows sit in few row groups (DuckDB's zonemaps skip the rest). Bins are matched by their epoch
-- index (see int_cgm_reading). A prediction run may forecast again cut-offs an earlier batch already covered
-- (it looks back over the last days); every issued row is kept, and the older ones are marked superseded so that
-- accuracy counts each forecast once.
CREATE OR REPLACE TABLE fct_glucose_forecast AS
WITH latest_issue AS (
    SELECT model_version, person_id, input_cutoff, max(issued_at) AS latest_issued_at
    FROM stg_forecast
    GROUP BY model_version, person_id, input_cutoff
)
SELECT
    forecast.person_id,
    forecast.input_cutoff,
    forecast.horizon_min,
    forecast.target_time,
    forecast.batch_id,
    forecast.model_version,
    forecast.issued_at,
    forecast.issued_at < latest_issue.latest_issued_at AS superseded,
    forecast.q05,
    forecast.q50,
    forecast.q95,
    target.glucose_mg_dl AS observed_mg_dl,
    last_bin.glucose_mg_dl AS persistence_mg_dl
FROM stg_forecast AS forecast
JOIN latest_issue USING (model_version, person_id, input_cutoff)
LEFT JOIN int_cgm_bin AS target
    ON target.person_id = forecast.person_id
    AND target.bin_index = epoch_us(forecast.target_time) // getvariable('bin_us')
LEFT JOIN int_cgm_bin AS last_bin  -- the bin that ends at the cut-off
    ON last_bin.person_id = forecast.person_id
    AND last_bin.bin_index = epoch_us(forecast.input_cutoff) // getvariable('bin_us') - 1
ORDER BY forecast.person_id, forecast.input_cutoff, forecast.horizon_min;

COMMENT ON TABLE fct_glucose_forecast IS 'One row per published forecast: patient, input cut-off, horizon and batch (key batch_id, person_id, input_cutoff, horizon_min), with the calibrated 90% interval and, once recorded, the CGM it is scored against. Sorted by person_id, input_cutoff, horizon_min.';
COMMENT ON COLUMN fct_glucose_forecast.person_id IS 'Pseudonymous patient (dim_patient.person_id).';
COMMENT ON COLUMN fct_glucose_forecast.input_cutoff IS 'End of the last 5-minute history bin the forecast used, UTC: nothing after it was seen.';
COMMENT ON COLUMN fct_glucose_forecast.horizon_min IS 'Minutes ahead: 5, 10, ..., 120. Horizon h forecasts the CGM bin starting h - 5 minutes after input_cutoff.';
COMMENT ON COLUMN fct_glucose_forecast.target_time IS 'Start of the 5-minute CGM bin forecast, UTC (input_cutoff + horizon_min - 5 min).';
COMMENT ON COLUMN fct_glucose_forecast.batch_id IS 'Prediction batch that issued the forecast (dim_prediction_batch.batch_id).';
COMMENT ON COLUMN fct_glucose_forecast.model_version IS 'Registered twin version that made the forecast.';
COMMENT ON COLUMN fct_glucose_forecast.issued_at IS 'When the forecast was issued, UTC.';
COMMENT ON COLUMN fct_glucose_forecast.superseded IS 'True when a later batch of the same model version forecast the same patient and cut-off again; accuracy marts count only the latest issue (superseded = false).';
COMMENT ON COLUMN fct_glucose_forecast.q05 IS 'Lower end of the calibrated 90% interval (5% quantile), mg/dL.';
COMMENT ON COLUMN fct_glucose_forecast.q50 IS 'Median forecast, mg/dL: the point forecast scored by MAE, RMSE and bias.';
COMMENT ON COLUMN fct_glucose_forecast.q95 IS 'Upper end of the calibrated 90% interval (95% quantile), mg/dL.';
COMMENT ON COLUMN fct_glucose_forecast.observed_mg_dl IS 'Mean CGM of the bin holding target_time, mg/dL, as the twin is trained on; null until recorded or when the sensor had a gap.';
COMMENT ON COLUMN fct_glucose_forecast.persistence_mg_dl IS 'Mean CGM of the last history bin [input_cutoff - 5 min, input_cutoff), mg/dL: the persistence forecast the model is compared with; null if that bin had no reading.';
