-- What leaves the site describes no fewer than k patients per cell, and a suppressed cell shows no statistic.
SELECT 'share_model_quality' AS share_table, cohort_dimension, cohort_value
FROM share_model_quality
WHERE n_patients < getvariable('min_cell_patients')
    OR (suppressed AND coalesce(n_patients, n_scored, n_covered, n_persistence) IS NOT NULL)
    OR (suppressed AND coalesce(sum_error, sum_abs_error, sum_sq_error, sum_interval_width, sum_sq_error_persistence,
                                mae_mg_dl, rmse_mg_dl, bias_mg_dl, coverage_90_pct, persistence_rmse_mg_dl) IS NOT NULL)
UNION ALL
SELECT 'share_site', 'all', 'all'
FROM share_site
WHERE n_patients < getvariable('min_cell_patients') OR (n_patients_suppressed AND n_patients IS NOT NULL)
