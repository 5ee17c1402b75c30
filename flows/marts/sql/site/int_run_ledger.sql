-- Intermediate: one row per run and source file, from the run records' ledgers.
CREATE OR REPLACE TEMP TABLE int_run_ledger AS
SELECT
    run.run_id,
    run.site_id,
    run.run_started_at,
    run.schema_version,
    run.contract_version,
    ledger.file AS source_file,
    ledger.rows_in,
    ledger.harmonized AS rows_accepted,
    ledger.quarantined AS rows_quarantined,
    ledger.exact_duplicates,
    ledger.balanced,
    ledger.file_error
FROM (SELECT *, unnest(ledgers) AS ledger FROM stg_run) AS run;
