-- Mart: one row per prediction batch found under predictions/, published or held back by its contract.
CREATE OR REPLACE TABLE dim_prediction_batch AS
WITH forecast_rows AS (
    SELECT batch_id, count(*) AS forecast_rows, count(DISTINCT person_id) AS patients
    FROM stg_forecast
    GROUP BY batch_id
),
whatif_rows AS (
    SELECT batch_id, count(*) AS whatif_rows
    FROM stg_whatif
    GROUP BY batch_id
)
SELECT
    batch.batch_id,
    batch.batch_folder,
    batch.model_version,
    batch.issued_at,
    batch.input_cutoff_max,
    batch.contract_passed AS published,
    batch.rows_declared,
    coalesce(forecast_rows.forecast_rows, 0) AS forecast_rows,
    coalesce(whatif_rows.whatif_rows, 0) AS whatif_rows,
    coalesce(forecast_rows.patients, 0) AS patients
FROM stg_prediction_batch AS batch
LEFT JOIN forecast_rows USING (batch_id)
LEFT JOIN whatif_rows USING (batch_id)
ORDER BY batch.issued_at, batch.batch_id;

COMMENT ON TABLE dim_prediction_batch IS 'One row per prediction batch under predictions/<batch_id>/ (key batch_id). Only batches whose prediction contract passed are published into fct_glucose_forecast and fct_whatif; the others are listed with published = false.';
COMMENT ON COLUMN dim_prediction_batch.batch_id IS 'Batch identifier (batch.json batch_id); the key the fact tables carry.';
COMMENT ON COLUMN dim_prediction_batch.batch_folder IS 'Folder name of the batch under the site''s predictions/.';
COMMENT ON COLUMN dim_prediction_batch.model_version IS 'Registered twin version that produced the batch (e.g. twin-0003).';
COMMENT ON COLUMN dim_prediction_batch.issued_at IS 'When the prediction flow issued the batch, UTC.';
COMMENT ON COLUMN dim_prediction_batch.input_cutoff_max IS 'Latest input cut-off of the batch: no data after it was used by any forecast in it, UTC.';
COMMENT ON COLUMN dim_prediction_batch.published IS 'Whether the batch''s prediction contract passed (batch.json contract.passed); only then are its rows in the fact tables.';
COMMENT ON COLUMN dim_prediction_batch.rows_declared IS 'Row count the prediction flow declared in batch.json (rows).';
COMMENT ON COLUMN dim_prediction_batch.forecast_rows IS 'Forecast rows published from the batch (0 when held back).';
COMMENT ON COLUMN dim_prediction_batch.whatif_rows IS 'What-if rows published from the batch (0 when held back or without scenarios).';
COMMENT ON COLUMN dim_prediction_batch.patients IS 'Distinct patients with a published forecast in the batch.';
