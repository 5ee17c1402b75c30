-- Every published forecast row sits in the folder of a published batch of this site and carries that batch's id
-- model version and issue time.
SELECT forecast.batch_folder, forecast.batch_id, forecast.site_id, forecast.model_version
FROM stg_forecast AS forecast
LEFT JOIN stg_prediction_batch AS batch
    ON batch.batch_folder = forecast.batch_folder AND batch.contract_passed
WHERE batch.batch_id IS NULL
    OR forecast.batch_id <> batch.batch_id
    OR forecast.site_id <> getvariable('site_id')
    OR batch.site_id <> getvariable('site_id')
    OR forecast.model_version <> batch.model_version
    OR forecast.issued_at <> batch.issued_at
