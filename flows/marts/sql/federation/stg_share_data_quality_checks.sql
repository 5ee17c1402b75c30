-- Staging: each site's share_data_quality_checks rows.
CREATE OR REPLACE TEMP VIEW stg_share_data_quality_checks AS
SELECT
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(run_id AS VARCHAR) AS run_id,
    CAST(check_name AS VARCHAR) AS check_name,
    CAST(run_started_at AS TIMESTAMPTZ) AS run_started_at,
    CAST(table_name AS VARCHAR) AS table_name,
    CAST(category AS VARCHAR) AS category,
    CAST(status AS VARCHAR) AS status,
    CAST(rows_checked AS BIGINT) AS rows_checked,
    CAST(violating_rows AS BIGINT) AS violating_rows,
    CAST(violating_pct AS DOUBLE) AS violating_pct,
    CAST(threshold_pct AS DOUBLE) AS threshold_pct
FROM src_share_data_quality_checks;
