-- Intermediate: forecast-error sums per model version, horizon and cohort cell, before suppression. Each cohort
-- dimension (sex, age_band) partitions the patients of the 'all' cell, so its cells add up to that total.
CREATE OR REPLACE TEMP TABLE int_model_quality_cell AS
WITH scored AS (
    SELECT error.*, coalesce(cohort.sex, 'unknown') AS sex, coalesce(cohort.age_band, 'unknown') AS age_band
    FROM int_forecast_patient_horizon AS error
    LEFT JOIN int_patient_cohort AS cohort USING (person_id)
    WHERE error.n_scored > 0
)
SELECT
    model_version,
    horizon_min,
    CASE WHEN grouping(sex) = 0 THEN 'sex' WHEN grouping(age_band) = 0 THEN 'age_band' ELSE 'all' END
        AS cohort_dimension,
    coalesce(sex, age_band, 'all') AS cohort_value,
    count(DISTINCT person_id) AS n_patients,
    sum(n_scored) AS n_scored,
    sum(sum_error) AS sum_error,
    sum(sum_abs_error) AS sum_abs_error,
    sum(sum_sq_error) AS sum_sq_error,
    sum(n_covered) AS n_covered,
    sum(sum_interval_width) AS sum_interval_width,
    sum(n_persistence) AS n_persistence,
    sum(sum_sq_error_persistence) AS sum_sq_error_persistence
FROM scored
GROUP BY GROUPING SETS ((model_version, horizon_min), (model_version, horizon_min, sex),
                        (model_version, horizon_min, age_band));
