-- Mart: row accounting per site, run and source file, from the shares.
CREATE OR REPLACE TABLE fct_data_quality AS
SELECT
    site_id,
    run_id,
    source_file,
    run_started_at,
    schema_version,
    contract_version,
    rows_in,
    rows_accepted,
    rows_quarantined,
    exact_duplicates,
    100.0 * rows_quarantined / nullif(rows_in, 0) AS quarantined_pct,
    balanced,
    file_unreadable
FROM stg_share_data_quality
ORDER BY site_id, run_id, source_file;

COMMENT ON TABLE fct_data_quality IS 'Row accounting per site, site-flow run and source file (key site_id, run_id, source_file): record counts, not patient counts (null for a site of fewer than k patients).';
COMMENT ON COLUMN fct_data_quality.site_id IS 'The site.';
COMMENT ON COLUMN fct_data_quality.run_id IS 'Site-flow run.';
COMMENT ON COLUMN fct_data_quality.source_file IS 'Drop file, relative to the site''s drop.';
COMMENT ON COLUMN fct_data_quality.run_started_at IS 'When the run started, UTC.';
COMMENT ON COLUMN fct_data_quality.schema_version IS 'Canonical schema version of the run.';
COMMENT ON COLUMN fct_data_quality.contract_version IS 'Data contract version of the run.';
COMMENT ON COLUMN fct_data_quality.rows_in IS 'Records read from the file.';
COMMENT ON COLUMN fct_data_quality.rows_accepted IS 'Records harmonized.';
COMMENT ON COLUMN fct_data_quality.rows_quarantined IS 'Records quarantined.';
COMMENT ON COLUMN fct_data_quality.exact_duplicates IS 'Exact duplicate records removed.';
COMMENT ON COLUMN fct_data_quality.quarantined_pct IS '100 x rows_quarantined / rows_in, %.';
COMMENT ON COLUMN fct_data_quality.balanced IS 'Whether rows_in = rows_accepted + rows_quarantined + exact_duplicates.';
COMMENT ON COLUMN fct_data_quality.file_unreadable IS 'Whether the whole file could not be read.';
