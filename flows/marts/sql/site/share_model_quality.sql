-- Share: forecast quality per model version, horizon and cohort cell, suppressed before it leaves the site.
--
-- Primary suppression: a cell of fewer than k patients (getvariable('min_cell_patients')).
-- Complementary suppression: within each partition (one model version, horizon and cohort dimension, whose cells
-- add up to the published 'all' cell), once any cell is suppressed, further cells are suppressed, smallest first,
-- until at least two are and they hold at least k patients together. The total minus the published cells then
-- only reveals a group of at least k patients, never one small cell. A suppressed cell keeps its row (so the
-- partition is visibly incomplete) with every count and statistic null.
CREATE OR REPLACE TABLE share_model_quality AS
WITH cells AS (
    SELECT *, n_patients < getvariable('min_cell_patients') AS below_k
    FROM int_model_quality_cell
),
ordered AS (
    SELECT
        *,
        bool_or(below_k) OVER cell_partition AS partition_has_small_cell,
        row_number() OVER suppression_order - 1 AS cells_before,
        coalesce(sum(n_patients) OVER (suppression_order ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
            AS patients_before
    FROM cells
    WINDOW
        cell_partition AS (PARTITION BY model_version, horizon_min, cohort_dimension),
        suppression_order AS (
            PARTITION BY model_version, horizon_min, cohort_dimension
            ORDER BY below_k DESC, n_patients, cohort_value
        )
),
decided AS (
    SELECT
        *,
        below_k OR (
            partition_has_small_cell
            AND (cells_before < 2 OR patients_before < getvariable('min_cell_patients'))
        ) AS suppressed
    FROM ordered
)
SELECT
    getvariable('site_id') AS site_id,
    model_version,
    cohort_dimension,
    cohort_value,
    horizon_min,
    suppressed,
    CASE WHEN NOT suppressed THEN n_patients END AS n_patients,
    CASE WHEN NOT suppressed THEN n_scored END AS n_scored,
    CASE WHEN NOT suppressed THEN sum_error END AS sum_error,
    CASE WHEN NOT suppressed THEN sum_abs_error END AS sum_abs_error,
    CASE WHEN NOT suppressed THEN sum_sq_error END AS sum_sq_error,
    CASE WHEN NOT suppressed THEN n_covered END AS n_covered,
    CASE WHEN NOT suppressed THEN sum_interval_width END AS sum_interval_width,
    CASE WHEN NOT suppressed THEN n_persistence END AS n_persistence,
    CASE WHEN NOT suppressed THEN sum_sq_error_persistence END AS sum_sq_error_persistence,
    CASE WHEN NOT suppressed THEN sum_abs_error / n_scored END AS mae_mg_dl,
    CASE WHEN NOT suppressed THEN sqrt(sum_sq_error / n_scored) END AS rmse_mg_dl,
    CASE WHEN NOT suppressed THEN sum_error / n_scored END AS bias_mg_dl,
    CASE WHEN NOT suppressed THEN 100.0 * n_covered / n_scored END AS coverage_90_pct,
    CASE WHEN NOT suppressed THEN sqrt(sum_sq_error_persistence / nullif(n_persistence, 0)) END
        AS persistence_rmse_mg_dl
FROM decided
ORDER BY model_version, cohort_dimension, cohort_value, horizon_min;

COMMENT ON TABLE share_model_quality IS 'What the site shares about forecast quality (key site_id, model_version, cohort_dimension, cohort_value, horizon_min): error sums and metrics per cohort cell, with cells under k patients suppressed (primary) and enough others to protect them (complementary). Exported to mart/share/share_model_quality.parquet.';
COMMENT ON COLUMN share_model_quality.site_id IS 'The site.';
COMMENT ON COLUMN share_model_quality.model_version IS 'Registered twin version.';
COMMENT ON COLUMN share_model_quality.cohort_dimension IS 'all (every scored patient), sex or age_band; each dimension''s cells add up to the all cell.';
COMMENT ON COLUMN share_model_quality.cohort_value IS 'The cell: all; male, female, unknown; 0-12, 13-17, 18+, unknown.';
COMMENT ON COLUMN share_model_quality.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN share_model_quality.suppressed IS 'True when the cell is withheld (fewer than k patients, or protecting such a cell): every count and statistic of the row is then null.';
COMMENT ON COLUMN share_model_quality.n_patients IS 'Patients with a scored forecast in the cell (at least k when published).';
COMMENT ON COLUMN share_model_quality.n_scored IS 'Scored forecasts in the cell.';
COMMENT ON COLUMN share_model_quality.sum_error IS 'Sum of (median forecast - observed CGM), mg/dL: pools into bias.';
COMMENT ON COLUMN share_model_quality.sum_abs_error IS 'Sum of absolute errors, mg/dL: pools into MAE.';
COMMENT ON COLUMN share_model_quality.sum_sq_error IS 'Sum of squared errors, (mg/dL)^2: pools into RMSE.';
COMMENT ON COLUMN share_model_quality.n_covered IS 'Scored forecasts whose observed CGM lay within their 90% interval.';
COMMENT ON COLUMN share_model_quality.sum_interval_width IS 'Sum of the scored forecasts'' interval widths q95 - q05, mg/dL.';
COMMENT ON COLUMN share_model_quality.n_persistence IS 'Scored forecasts with a persistence value (last history bin had CGM).';
COMMENT ON COLUMN share_model_quality.sum_sq_error_persistence IS 'Sum of squared persistence errors, (mg/dL)^2.';
COMMENT ON COLUMN share_model_quality.mae_mg_dl IS 'Mean absolute error, mg/dL.';
COMMENT ON COLUMN share_model_quality.rmse_mg_dl IS 'Root mean squared error, mg/dL.';
COMMENT ON COLUMN share_model_quality.bias_mg_dl IS 'Mean error (forecast - observed), mg/dL.';
COMMENT ON COLUMN share_model_quality.coverage_90_pct IS 'Share of scored forecasts inside their 90% interval, %.';
COMMENT ON COLUMN share_model_quality.persistence_rmse_mg_dl IS 'RMSE of persistence on the same targets, mg/dL.';
