-- Mart: the what-if scenarios each batch declares.
CREATE OR REPLACE TABLE dim_scenario AS
SELECT batch_id, scenario_id, description
FROM stg_scenario
ORDER BY batch_id, scenario_id;

COMMENT ON TABLE dim_scenario IS 'One row per prediction batch and what-if scenario it declares in batch.json (key batch_id, scenario_id); describes fct_whatif.scenario_id.';
COMMENT ON COLUMN dim_scenario.batch_id IS 'Prediction batch (dim_prediction_batch.batch_id).';
COMMENT ON COLUMN dim_scenario.scenario_id IS 'Scenario identifier from the prediction flow''s scenario catalogue.';
COMMENT ON COLUMN dim_scenario.description IS 'What the scenario changes, in words (e.g. bolus 20% larger at the next meal).';
