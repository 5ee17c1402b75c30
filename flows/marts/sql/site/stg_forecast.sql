-- Staging: forecast rows of the published batches, cast to the types the marts use.
CREATE OR REPLACE TEMP VIEW stg_forecast AS
SELECT
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(batch_id AS VARCHAR) AS batch_id,
    regexp_extract(filename, '([^/\\]+)[/\\][^/\\]+$', 1) AS batch_folder,
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(person_id AS BIGINT) AS person_id,
    CAST(input_cutoff AS TIMESTAMPTZ) AS input_cutoff,
    CAST(issued_at AS TIMESTAMPTZ) AS issued_at,
    CAST(horizon_min AS SMALLINT) AS horizon_min,
    CAST(target_time AS TIMESTAMPTZ) AS target_time,
    CAST(q05 AS DOUBLE) AS q05,
    CAST(q50 AS DOUBLE) AS q50,
    CAST(q95 AS DOUBLE) AS q95
FROM src_forecast;
