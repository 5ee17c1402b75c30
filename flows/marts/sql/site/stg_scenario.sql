-- Staging: the what-if scenarios each batch's batch.json declares (one row per batch and scenario).
CREATE OR REPLACE TEMP VIEW stg_scenario AS
SELECT
    CAST(batch_id AS VARCHAR) AS batch_id,
    CAST(scenario.scenario_id AS VARCHAR) AS scenario_id,
    CAST(scenario.description AS VARCHAR) AS description
FROM (SELECT batch_id, unnest(scenarios) AS scenario FROM src_prediction_batch);
