-- Staging: each site's share_site row, as the site exported it.
CREATE OR REPLACE TEMP VIEW stg_share_site AS
SELECT
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(built_at AS TIMESTAMPTZ) AS share_built_at,
    CAST(min_cell_patients AS INTEGER) AS site_min_cell_patients,
    CAST(n_patients_suppressed AS BOOLEAN) AS n_patients_suppressed,
    CAST(n_patients AS BIGINT) AS n_patients,
    CAST(latest_run_id AS VARCHAR) AS latest_run_id,
    CAST(schema_version AS VARCHAR) AS schema_version,
    CAST(contract_version AS VARCHAR) AS contract_version,
    CAST(batches_published AS BIGINT) AS batches_published,
    CAST(latest_issued_at AS TIMESTAMPTZ) AS latest_issued_at,
    CAST(epsilon_spent AS DOUBLE) AS epsilon_spent,
    CAST(epsilon_budget AS DOUBLE) AS epsilon_budget,
    CAST(delta AS DOUBLE) AS delta,
    CAST(privacy_rounds AS BIGINT) AS privacy_rounds
FROM src_share_site;
