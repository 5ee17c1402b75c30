-- Mart: every contract check of every site-flow run, with its DataQualityDashboard-style status.
CREATE OR REPLACE TABLE mart_data_quality_checks AS
SELECT
    run_id,
    check_name,
    run_started_at,
    table_name,
    category,
    status,
    rows_checked,
    violating_rows,
    violating_pct,
    threshold_pct,
    description
FROM int_run_check
ORDER BY run_id, check_name;

COMMENT ON TABLE mart_data_quality_checks IS 'One row per site-flow run and contract check (key run_id, check_name), from runs/<run>.json: the check''s Kahn category, status and share of violating rows.';
COMMENT ON COLUMN mart_data_quality_checks.run_id IS 'Site-flow run (mart_data_quality.run_id).';
COMMENT ON COLUMN mart_data_quality_checks.check_name IS 'Check identifier, <table>.<field>.<rule>.';
COMMENT ON COLUMN mart_data_quality_checks.run_started_at IS 'When the run started, UTC.';
COMMENT ON COLUMN mart_data_quality_checks.table_name IS 'Table checked: raw_* (as read from the drop) or a harmonized table.';
COMMENT ON COLUMN mart_data_quality_checks.category IS 'Kahn category: conformance, completeness or plausibility.';
COMMENT ON COLUMN mart_data_quality_checks.status IS 'Passed, Failed (violating_pct over threshold_pct), NotApplicable or IsError (the check could not run, e.g. the field is absent).';
COMMENT ON COLUMN mart_data_quality_checks.rows_checked IS 'Rows the check looked at.';
COMMENT ON COLUMN mart_data_quality_checks.violating_rows IS 'Rows violating the check.';
COMMENT ON COLUMN mart_data_quality_checks.violating_pct IS '100 x violating_rows / rows_checked, %.';
COMMENT ON COLUMN mart_data_quality_checks.threshold_pct IS 'Share of violating rows above which the check fails, %.';
COMMENT ON COLUMN mart_data_quality_checks.description IS 'What the check requires, in words.';
