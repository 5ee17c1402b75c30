-- Mart: every contract check per site and run, from the shares.
CREATE OR REPLACE TABLE fct_data_quality_checks AS
SELECT
    site_id,
    run_id,
    check_name,
    run_started_at,
    table_name,
    category,
    status,
    rows_checked,
    violating_rows,
    violating_pct,
    threshold_pct
FROM stg_share_data_quality_checks
ORDER BY site_id, run_id, check_name;

COMMENT ON TABLE fct_data_quality_checks IS 'One row per site, site-flow run and contract check (key site_id, run_id, check_name), with its DataQualityDashboard-style status.';
COMMENT ON COLUMN fct_data_quality_checks.site_id IS 'The site.';
COMMENT ON COLUMN fct_data_quality_checks.run_id IS 'Site-flow run.';
COMMENT ON COLUMN fct_data_quality_checks.check_name IS 'Check identifier, <table>.<field>.<rule>.';
COMMENT ON COLUMN fct_data_quality_checks.run_started_at IS 'When the run started, UTC.';
COMMENT ON COLUMN fct_data_quality_checks.table_name IS 'Table checked: raw_* (as read) or harmonized.';
COMMENT ON COLUMN fct_data_quality_checks.category IS 'Kahn category: conformance, completeness or plausibility.';
COMMENT ON COLUMN fct_data_quality_checks.status IS 'Passed, Failed, NotApplicable or IsError.';
COMMENT ON COLUMN fct_data_quality_checks.rows_checked IS 'Records checked (null for a site of fewer than k patients).';
COMMENT ON COLUMN fct_data_quality_checks.violating_rows IS 'Records violating the check.';
COMMENT ON COLUMN fct_data_quality_checks.violating_pct IS '100 x violating_rows / rows_checked, %.';
COMMENT ON COLUMN fct_data_quality_checks.threshold_pct IS 'Share of violating records above which the check fails, %.';
