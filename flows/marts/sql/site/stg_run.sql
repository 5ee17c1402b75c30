-- Staging: one row per site-flow run record, with its source ledgers and checks still nested.
CREATE OR REPLACE TEMP VIEW stg_run AS
SELECT
    CAST(run_id AS VARCHAR) AS run_id,
    CAST(site AS VARCHAR) AS site_id,
    -- run ids start with the UTC start time (flows/site_flow.py: %Y%m%dT%H%M%SZ)
    CAST(try_strptime(left(run_id, 16), '%Y%m%dT%H%M%SZ') AS TIMESTAMP) AT TIME ZONE 'UTC' AS run_started_at,
    coalesce(CAST(skipped AS BOOLEAN), false) AS skipped,
    CAST(versions.schema AS VARCHAR) AS schema_version,
    CAST(versions.contract AS VARCHAR) AS contract_version,
    ledgers,
    checks
FROM src_run;
