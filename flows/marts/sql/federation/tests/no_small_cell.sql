-- No published cell describes fewer than k patients, and a suppressed cell shows no statistic.
SELECT 'fct_model_quality' AS table_name
FROM fct_model_quality
WHERE n_patients < getvariable('min_cell_patients')
    OR (suppressed AND coalesce(n_patients, n_scored, n_covered, n_persistence) IS NOT NULL)
    OR (suppressed AND coalesce(mae_mg_dl, rmse_mg_dl, bias_mg_dl, coverage_90_pct, mean_interval_width_mg_dl,
                                persistence_rmse_mg_dl, sum_error, sum_abs_error, sum_sq_error, sum_interval_width,
                                sum_sq_error_persistence) IS NOT NULL)
UNION ALL
SELECT 'mart_model_quality_pooled' FROM mart_model_quality_pooled WHERE n_patients < getvariable('min_cell_patients')
UNION ALL
SELECT 'dim_site' FROM dim_site
WHERE n_patients < getvariable('min_cell_patients') OR (n_patients_suppressed AND n_patients IS NOT NULL)
UNION ALL
SELECT 'fct_site_round' FROM fct_site_round
WHERE evaluation_suppressed
    AND coalesce(rmse_30_mg_dl, persistence_rmse_30_mg_dl, rmse_60_mg_dl, persistence_rmse_60_mg_dl,
                 coverage_90_pct) IS NOT NULL
UNION ALL
SELECT 'fct_round' FROM fct_round
WHERE evaluation_suppressed
    AND coalesce(rmse_30_mg_dl, persistence_rmse_30_mg_dl, rmse_60_mg_dl, persistence_rmse_60_mg_dl,
                 coverage_90_pct) IS NOT NULL
