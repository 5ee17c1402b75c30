-- Every published what-if row sits in the folder of a published batch of this site, carries that batch's id and
-- model version, and applies a scenario the batch declares.
SELECT whatif.batch_folder, whatif.batch_id, whatif.scenario_id
FROM stg_whatif AS whatif
LEFT JOIN stg_prediction_batch AS batch
    ON batch.batch_folder = whatif.batch_folder AND batch.contract_passed
LEFT JOIN stg_scenario AS scenario
    ON scenario.batch_id = whatif.batch_id AND scenario.scenario_id = whatif.scenario_id
WHERE batch.batch_id IS NULL
    OR whatif.batch_id <> batch.batch_id
    OR scenario.scenario_id IS NULL
    OR whatif.site_id <> getvariable('site_id')
    OR whatif.model_version <> batch.model_version
