-- Staging: every prediction batch with a batch.json, published or held back by its contract.
CREATE OR REPLACE TEMP VIEW stg_prediction_batch AS
SELECT
    CAST(batch_id AS VARCHAR) AS batch_id,
    CAST(folder AS VARCHAR) AS batch_folder,
    CAST(site AS VARCHAR) AS site_id,
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(issued_at AS TIMESTAMPTZ) AS issued_at,
    CAST(input_cutoff_max AS TIMESTAMPTZ) AS input_cutoff_max,
    CAST("rows" AS BIGINT) AS rows_declared,
    CAST(contract_passed AS BOOLEAN) AS contract_passed
FROM src_prediction_batch;
