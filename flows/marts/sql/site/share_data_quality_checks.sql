-- Share: every contract check of every run, as the site mart has it (counts and shares withheld for a site of
-- fewer than k patients, as in share_data_quality).
CREATE OR REPLACE TABLE share_data_quality_checks AS
WITH site AS (
    SELECT count(*) >= getvariable('min_cell_patients') AS shares_counts FROM int_patient_cohort
)
SELECT
    getvariable('site_id') AS site_id,
    run_id,
    check_name,
    run_started_at,
    table_name,
    category,
    status,
    CASE WHEN site.shares_counts THEN rows_checked END AS rows_checked,
    CASE WHEN site.shares_counts THEN violating_rows END AS violating_rows,
    CASE WHEN site.shares_counts THEN violating_pct END AS violating_pct,
    threshold_pct
FROM mart_data_quality_checks, site
ORDER BY run_id, check_name;

COMMENT ON TABLE share_data_quality_checks IS 'What the site shares about its contract checks (key site_id, run_id, check_name). Record counts, not patient counts; counts and shares null for a site of fewer than k patients. Exported to mart/share/share_data_quality_checks.parquet.';
COMMENT ON COLUMN share_data_quality_checks.site_id IS 'The site.';
COMMENT ON COLUMN share_data_quality_checks.run_id IS 'Site-flow run.';
COMMENT ON COLUMN share_data_quality_checks.check_name IS 'Check identifier, <table>.<field>.<rule>.';
COMMENT ON COLUMN share_data_quality_checks.run_started_at IS 'When the run started, UTC.';
COMMENT ON COLUMN share_data_quality_checks.table_name IS 'Table checked.';
COMMENT ON COLUMN share_data_quality_checks.category IS 'Kahn category: conformance, completeness or plausibility.';
COMMENT ON COLUMN share_data_quality_checks.status IS 'Passed, Failed, NotApplicable or IsError.';
COMMENT ON COLUMN share_data_quality_checks.rows_checked IS 'Records checked.';
COMMENT ON COLUMN share_data_quality_checks.violating_rows IS 'Records violating the check.';
COMMENT ON COLUMN share_data_quality_checks.violating_pct IS '100 x violating_rows / rows_checked, %.';
COMMENT ON COLUMN share_data_quality_checks.threshold_pct IS 'Share of violating records above which the check fails, %.';
