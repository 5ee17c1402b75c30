-- Staging: each site's share_model_quality cells (already suppressed at the site).
CREATE OR REPLACE TEMP VIEW stg_share_model_quality AS
SELECT
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(cohort_dimension AS VARCHAR) AS cohort_dimension,
    CAST(cohort_value AS VARCHAR) AS cohort_value,
    CAST(horizon_min AS SMALLINT) AS horizon_min,
    CAST(suppressed AS BOOLEAN) AS suppressed,
    CAST(n_patients AS BIGINT) AS n_patients,
    CAST(n_scored AS BIGINT) AS n_scored,
    CAST(sum_error AS DOUBLE) AS sum_error,
    CAST(sum_abs_error AS DOUBLE) AS sum_abs_error,
    CAST(sum_sq_error AS DOUBLE) AS sum_sq_error,
    CAST(n_covered AS BIGINT) AS n_covered,
    CAST(sum_interval_width AS DOUBLE) AS sum_interval_width,
    CAST(n_persistence AS BIGINT) AS n_persistence,
    CAST(sum_sq_error_persistence AS DOUBLE) AS sum_sq_error_persistence
FROM src_share_model_quality;
