-- Mart: forecast quality pooled over sites, exactly (from the shared sums), over the published cells only.
CREATE OR REPLACE TABLE mart_model_quality_pooled AS
SELECT
    model_version,
    cohort_dimension,
    cohort_value,
    horizon_min,
    count(*) FILTER (WHERE NOT suppressed) AS sites_pooled,
    count(*) FILTER (WHERE suppressed) AS sites_suppressed,
    sum(n_patients) AS n_patients,
    sum(n_scored) AS n_scored,
    sum(sum_abs_error) / sum(n_scored) AS mae_mg_dl,
    sqrt(sum(sum_sq_error) / sum(n_scored)) AS rmse_mg_dl,
    sum(sum_error) / sum(n_scored) AS bias_mg_dl,
    100.0 * sum(n_covered) / sum(n_scored) AS coverage_90_pct,
    sqrt(sum(sum_sq_error_persistence) / nullif(sum(n_persistence), 0)) AS persistence_rmse_mg_dl
FROM fct_model_quality
GROUP BY model_version, cohort_dimension, cohort_value, horizon_min
ORDER BY model_version, cohort_dimension, cohort_value, horizon_min;

COMMENT ON TABLE mart_model_quality_pooled IS 'Forecast quality pooled over sites per model version, cohort cell and horizon (key model_version, cohort_dimension, cohort_value, horizon_min): exact pooling of the shared error sums over the cells the sites published. Suppressed cells are not in it (the federation never receives their values), so a pooled row covers sites_pooled sites, not necessarily all; statistics are null when no site published the cell.';
COMMENT ON COLUMN mart_model_quality_pooled.model_version IS 'Registered twin version.';
COMMENT ON COLUMN mart_model_quality_pooled.cohort_dimension IS 'all, sex or age_band.';
COMMENT ON COLUMN mart_model_quality_pooled.cohort_value IS 'The cell.';
COMMENT ON COLUMN mart_model_quality_pooled.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN mart_model_quality_pooled.sites_pooled IS 'Sites whose published cell is pooled.';
COMMENT ON COLUMN mart_model_quality_pooled.sites_suppressed IS 'Sites whose cell was suppressed and is left out.';
COMMENT ON COLUMN mart_model_quality_pooled.n_patients IS 'Patients in the pooled cells (a sum of published counts, each at least k); null when none.';
COMMENT ON COLUMN mart_model_quality_pooled.n_scored IS 'Scored forecasts in the pooled cells.';
COMMENT ON COLUMN mart_model_quality_pooled.mae_mg_dl IS 'Pooled mean absolute error, mg/dL.';
COMMENT ON COLUMN mart_model_quality_pooled.rmse_mg_dl IS 'Pooled root mean squared error, mg/dL.';
COMMENT ON COLUMN mart_model_quality_pooled.bias_mg_dl IS 'Pooled mean error, mg/dL.';
COMMENT ON COLUMN mart_model_quality_pooled.coverage_90_pct IS 'Pooled share inside the 90% interval, %.';
COMMENT ON COLUMN mart_model_quality_pooled.persistence_rmse_mg_dl IS 'Pooled persistence RMSE on the same targets, mg/dL.';
