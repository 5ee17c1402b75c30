-- Staging: each site's share_data_quality rows.
CREATE OR REPLACE TEMP VIEW stg_share_data_quality AS
SELECT
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(run_id AS VARCHAR) AS run_id,
    CAST(source_file AS VARCHAR) AS source_file,
    CAST(run_started_at AS TIMESTAMPTZ) AS run_started_at,
    CAST(schema_version AS VARCHAR) AS schema_version,
    CAST(contract_version AS VARCHAR) AS contract_version,
    CAST(rows_in AS BIGINT) AS rows_in,
    CAST(rows_accepted AS BIGINT) AS rows_accepted,
    CAST(rows_quarantined AS BIGINT) AS rows_quarantined,
    CAST(exact_duplicates AS BIGINT) AS exact_duplicates,
    CAST(balanced AS BOOLEAN) AS balanced,
    CAST(file_unreadable AS BOOLEAN) AS file_unreadable
FROM src_share_data_quality;
