-- Share: row accounting per run and source file. Counts of records, not of patients, and no free text (a file's
-- error message stays at the site; only whether there was one is shared). A site with fewer than k patients
-- shares no counts at all: its patient list's row count would be its size, which share_site withholds.
CREATE OR REPLACE TABLE share_data_quality AS
WITH site AS (
    SELECT count(*) >= getvariable('min_cell_patients') AS shares_counts FROM int_patient_cohort
)
SELECT
    getvariable('site_id') AS site_id,
    run_id,
    source_file,
    run_started_at,
    schema_version,
    contract_version,
    CASE WHEN site.shares_counts THEN rows_in END AS rows_in,
    CASE WHEN site.shares_counts THEN rows_accepted END AS rows_accepted,
    CASE WHEN site.shares_counts THEN rows_quarantined END AS rows_quarantined,
    CASE WHEN site.shares_counts THEN exact_duplicates END AS exact_duplicates,
    CASE WHEN site.shares_counts THEN quarantined_pct END AS quarantined_pct,
    balanced,
    file_error IS NOT NULL AS file_unreadable
FROM mart_data_quality, site
ORDER BY run_id, source_file;

COMMENT ON TABLE share_data_quality IS 'What the site shares about its row accounting (key site_id, run_id, source_file): mart_data_quality without the error text. Record counts, not patient counts; all null for a site of fewer than k patients. Exported to mart/share/share_data_quality.parquet.';
COMMENT ON COLUMN share_data_quality.site_id IS 'The site.';
COMMENT ON COLUMN share_data_quality.run_id IS 'Site-flow run.';
COMMENT ON COLUMN share_data_quality.source_file IS 'Drop file, relative to the drop.';
COMMENT ON COLUMN share_data_quality.run_started_at IS 'When the run started, UTC.';
COMMENT ON COLUMN share_data_quality.schema_version IS 'Canonical schema version of the run.';
COMMENT ON COLUMN share_data_quality.contract_version IS 'Data contract version of the run.';
COMMENT ON COLUMN share_data_quality.rows_in IS 'Records read from the file; null for a site of fewer than k patients (as are the other counts).';
COMMENT ON COLUMN share_data_quality.rows_accepted IS 'Records harmonized.';
COMMENT ON COLUMN share_data_quality.rows_quarantined IS 'Records quarantined.';
COMMENT ON COLUMN share_data_quality.exact_duplicates IS 'Exact duplicate records removed.';
COMMENT ON COLUMN share_data_quality.quarantined_pct IS '100 x rows_quarantined / rows_in, %.';
COMMENT ON COLUMN share_data_quality.balanced IS 'Whether rows_in = rows_accepted + rows_quarantined + exact_duplicates.';
COMMENT ON COLUMN share_data_quality.file_unreadable IS 'Whether the whole file could not be read.';
