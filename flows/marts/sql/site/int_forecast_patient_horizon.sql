-- Intermediate: sufficient statistics of forecast error per model version, patient and horizon (sums, not
-- means, so any grouping of patients pools them exactly), each forecast counted once (its latest issue).
CREATE OR REPLACE TEMP TABLE int_forecast_patient_horizon AS
SELECT
    model_version,
    person_id,
    horizon_min,
    count(*) AS n_forecasts,
    count(observed_mg_dl) AS n_scored,
    sum(q50 - observed_mg_dl) AS sum_error,
    sum(abs(q50 - observed_mg_dl)) AS sum_abs_error,
    sum((q50 - observed_mg_dl) ** 2) AS sum_sq_error,
    count(*) FILTER (WHERE observed_mg_dl BETWEEN q05 AND q95) AS n_covered,
    sum(q95 - q05) FILTER (WHERE observed_mg_dl IS NOT NULL) AS sum_interval_width,
    count(*) FILTER (WHERE observed_mg_dl IS NOT NULL AND persistence_mg_dl IS NOT NULL) AS n_persistence,
    sum((persistence_mg_dl - observed_mg_dl) ** 2) AS sum_sq_error_persistence
FROM fct_glucose_forecast
WHERE NOT superseded
GROUP BY model_version, person_id, horizon_min;
