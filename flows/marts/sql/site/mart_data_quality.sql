-- Mart: row accounting per site-flow run and source file (rows in = accepted + quarantined + duplicates).
CREATE OR REPLACE TABLE mart_data_quality AS
SELECT
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
    file_error
FROM int_run_ledger
ORDER BY run_id, source_file;

COMMENT ON TABLE mart_data_quality IS 'Row accounting per site-flow run and source file (key run_id, source_file), from runs/<run>.json. For every file: rows_in = rows_accepted + rows_quarantined + exact_duplicates. Runs that found nothing to do have no rows.';
COMMENT ON COLUMN mart_data_quality.run_id IS 'Site-flow run (UTC start time and run id), the runs/<run_id>.json record.';
COMMENT ON COLUMN mart_data_quality.source_file IS 'Drop file the rows came from, relative to the drop (imaging: the series folders, summarized).';
COMMENT ON COLUMN mart_data_quality.run_started_at IS 'When the run started, UTC (from the run id).';
COMMENT ON COLUMN mart_data_quality.schema_version IS 'Canonical schema version the run harmonized to.';
COMMENT ON COLUMN mart_data_quality.contract_version IS 'Data contract version the run validated with.';
COMMENT ON COLUMN mart_data_quality.rows_in IS 'Rows (records) read from the file.';
COMMENT ON COLUMN mart_data_quality.rows_accepted IS 'Rows that passed the contracts and were harmonized.';
COMMENT ON COLUMN mart_data_quality.rows_quarantined IS 'Rows rejected into quarantine/<run>/ with the checks they failed.';
COMMENT ON COLUMN mart_data_quality.exact_duplicates IS 'Byte-identical repeated rows removed before validation.';
COMMENT ON COLUMN mart_data_quality.quarantined_pct IS '100 x rows_quarantined / rows_in, %.';
COMMENT ON COLUMN mart_data_quality.balanced IS 'Whether rows_in = rows_accepted + rows_quarantined + exact_duplicates (must always hold).';
COMMENT ON COLUMN mart_data_quality.file_error IS 'Why the whole file could not be read, if it could not; null otherwise.';
