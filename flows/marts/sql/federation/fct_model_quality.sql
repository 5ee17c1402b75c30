-- Mart: forecast quality per site, model version, cohort cell and horizon, as the sites shared it.
CREATE OR REPLACE TABLE fct_model_quality AS
SELECT
    site_id,
    model_version,
    cohort_dimension,
    cohort_value,
    horizon_min,
    suppressed,
    n_patients,
    n_scored,
    sum_abs_error / n_scored AS mae_mg_dl,
    sqrt(sum_sq_error / n_scored) AS rmse_mg_dl,
    sum_error / n_scored AS bias_mg_dl,
    100.0 * n_covered / n_scored AS coverage_90_pct,
    sum_interval_width / n_scored AS mean_interval_width_mg_dl,
    sqrt(sum_sq_error_persistence / nullif(n_persistence, 0)) AS persistence_rmse_mg_dl,
    sum_error,
    sum_abs_error,
    sum_sq_error,
    n_covered,
    sum_interval_width,
    n_persistence,
    sum_sq_error_persistence
FROM stg_share_model_quality
ORDER BY model_version, site_id, cohort_dimension, cohort_value, horizon_min;

COMMENT ON TABLE fct_model_quality IS 'Forecast quality of deployed predictions per site, model version, cohort cell and horizon (key site_id, model_version, cohort_dimension, cohort_value, horizon_min), from the sites'' shares. A cell under k = 11 patients, and any cell protecting it, is suppressed at the site: the row is kept with suppressed = true and every count and statistic null. Each cohort dimension''s cells add up to the site''s all cell.';
COMMENT ON COLUMN fct_model_quality.site_id IS 'The site.';
COMMENT ON COLUMN fct_model_quality.model_version IS 'Registered twin version (dim_model_version).';
COMMENT ON COLUMN fct_model_quality.cohort_dimension IS 'all, sex or age_band.';
COMMENT ON COLUMN fct_model_quality.cohort_value IS 'The cell: all; male, female, unknown; 0-12, 13-17, 18+, unknown.';
COMMENT ON COLUMN fct_model_quality.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN fct_model_quality.suppressed IS 'True when the site withheld the cell (fewer than k patients, or protecting such a cell).';
COMMENT ON COLUMN fct_model_quality.n_patients IS 'Patients with a scored forecast in the cell; at least k when published, null when suppressed.';
COMMENT ON COLUMN fct_model_quality.n_scored IS 'Forecasts scored against CGM in the cell.';
COMMENT ON COLUMN fct_model_quality.mae_mg_dl IS 'Mean absolute error of the median forecast, mg/dL.';
COMMENT ON COLUMN fct_model_quality.rmse_mg_dl IS 'Root mean squared error of the median forecast, mg/dL.';
COMMENT ON COLUMN fct_model_quality.bias_mg_dl IS 'Mean error (forecast - observed), mg/dL.';
COMMENT ON COLUMN fct_model_quality.coverage_90_pct IS 'Share of scored forecasts inside their calibrated 90% interval, %.';
COMMENT ON COLUMN fct_model_quality.mean_interval_width_mg_dl IS 'Mean width of the 90% interval, mg/dL.';
COMMENT ON COLUMN fct_model_quality.persistence_rmse_mg_dl IS 'RMSE of persistence (last CGM carried forward) on the same targets, mg/dL.';
COMMENT ON COLUMN fct_model_quality.sum_error IS 'Sum of errors, mg/dL (for exact pooling).';
COMMENT ON COLUMN fct_model_quality.sum_abs_error IS 'Sum of absolute errors, mg/dL (for exact pooling).';
COMMENT ON COLUMN fct_model_quality.sum_sq_error IS 'Sum of squared errors, (mg/dL)^2 (for exact pooling).';
COMMENT ON COLUMN fct_model_quality.n_covered IS 'Scored forecasts inside their 90% interval.';
COMMENT ON COLUMN fct_model_quality.sum_interval_width IS 'Sum of interval widths, mg/dL.';
COMMENT ON COLUMN fct_model_quality.n_persistence IS 'Scored forecasts with a persistence value.';
COMMENT ON COLUMN fct_model_quality.sum_sq_error_persistence IS 'Sum of squared persistence errors, (mg/dL)^2.';
