-- Mart: each site's latest site-flow run in one row: rows, quarantine and check outcomes.
CREATE OR REPLACE TABLE mart_site_data_quality AS
WITH latest AS (
    SELECT site_id, max(run_id) AS run_id FROM stg_share_data_quality GROUP BY site_id
),
files AS (
    SELECT
        site_id,
        run_id,
        any_value(run_started_at) AS run_started_at,
        count(*) AS source_files,
        count(*) FILTER (WHERE file_unreadable) AS files_unreadable,
        bool_and(balanced) AS all_balanced,
        sum(rows_in) AS rows_in,
        sum(rows_quarantined) AS rows_quarantined,
        sum(exact_duplicates) AS exact_duplicates
    FROM stg_share_data_quality
    SEMI JOIN latest USING (site_id, run_id)
    GROUP BY site_id, run_id
),
checks AS (
    SELECT
        site_id,
        run_id,
        count(*) FILTER (WHERE status = 'Passed') AS checks_passed,
        count(*) FILTER (WHERE status = 'Failed') AS checks_failed,
        count(*) FILTER (WHERE status = 'IsError') AS checks_is_error,
        count(*) FILTER (WHERE status = 'NotApplicable') AS checks_not_applicable,
        list(check_name ORDER BY check_name) FILTER (WHERE status = 'Failed') AS failed_checks
    FROM stg_share_data_quality_checks
    SEMI JOIN latest USING (site_id, run_id)
    GROUP BY site_id, run_id
)
SELECT
    files.site_id,
    files.run_id AS latest_run_id,
    files.run_started_at,
    files.source_files,
    files.files_unreadable,
    files.all_balanced,
    files.rows_in,
    files.rows_quarantined,
    100.0 * files.rows_quarantined / nullif(files.rows_in, 0) AS quarantined_pct,
    files.exact_duplicates,
    coalesce(checks.checks_passed, 0) AS checks_passed,
    coalesce(checks.checks_failed, 0) AS checks_failed,
    coalesce(checks.checks_is_error, 0) AS checks_is_error,
    coalesce(checks.checks_not_applicable, 0) AS checks_not_applicable,
    coalesce(checks.failed_checks, []) AS failed_checks
FROM files
LEFT JOIN checks USING (site_id, run_id)
ORDER BY files.site_id;

COMMENT ON TABLE mart_site_data_quality IS 'Data quality of each site''s latest site-flow run that processed files (key site_id): rows read and quarantined over all source files, and how many contract checks passed, failed, errored or did not apply.';
COMMENT ON COLUMN mart_site_data_quality.site_id IS 'The site.';
COMMENT ON COLUMN mart_site_data_quality.latest_run_id IS 'The site''s latest run with a row ledger.';
COMMENT ON COLUMN mart_site_data_quality.run_started_at IS 'When that run started, UTC.';
COMMENT ON COLUMN mart_site_data_quality.source_files IS 'Source files the run accounted for.';
COMMENT ON COLUMN mart_site_data_quality.files_unreadable IS 'Source files that could not be read at all.';
COMMENT ON COLUMN mart_site_data_quality.all_balanced IS 'Whether every file''s rows in = accepted + quarantined + duplicates.';
COMMENT ON COLUMN mart_site_data_quality.rows_in IS 'Records read over all files (null for a site of fewer than k patients).';
COMMENT ON COLUMN mart_site_data_quality.rows_quarantined IS 'Records quarantined over all files.';
COMMENT ON COLUMN mart_site_data_quality.quarantined_pct IS '100 x rows_quarantined / rows_in, %.';
COMMENT ON COLUMN mart_site_data_quality.exact_duplicates IS 'Exact duplicate records removed over all files.';
COMMENT ON COLUMN mart_site_data_quality.checks_passed IS 'Contract checks with status Passed.';
COMMENT ON COLUMN mart_site_data_quality.checks_failed IS 'Contract checks with status Failed (violating share over threshold).';
COMMENT ON COLUMN mart_site_data_quality.checks_is_error IS 'Contract checks with status IsError (could not run).';
COMMENT ON COLUMN mart_site_data_quality.checks_not_applicable IS 'Contract checks with status NotApplicable.';
COMMENT ON COLUMN mart_site_data_quality.failed_checks IS 'Names of the failed checks, sorted.';
