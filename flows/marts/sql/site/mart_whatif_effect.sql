-- Mart: what each scenario of each batch changes, by horizon, over the batch's patients and cut-offs.
-- Pre-aggregated: the question is asked of every batch, and answering it from fct_whatif scans all its rows.
CREATE OR REPLACE TABLE mart_whatif_effect AS
SELECT
    batch_id,
    scenario_id,
    horizon_min,
    any_value(model_version) AS model_version,
    count(DISTINCT person_id) AS n_patients,
    count(*) AS n_forecasts,
    avg(change_q50_mg_dl) AS mean_change_mg_dl,
    quantile_cont(change_q50_mg_dl, 0.1) AS p10_change_mg_dl,
    quantile_cont(change_q50_mg_dl, 0.5) AS median_change_mg_dl,
    quantile_cont(change_q50_mg_dl, 0.9) AS p90_change_mg_dl,
    min(change_q50_mg_dl) AS min_change_mg_dl,
    max(change_q50_mg_dl) AS max_change_mg_dl,
    avg(baseline_q50) AS mean_baseline_q50_mg_dl,
    avg(q50) AS mean_q50_mg_dl
FROM fct_whatif
GROUP BY batch_id, scenario_id, horizon_min
ORDER BY batch_id, scenario_id, horizon_min;

COMMENT ON TABLE mart_whatif_effect IS 'What each what-if scenario changes per batch and horizon (key batch_id, scenario_id, horizon_min): the distribution of q50 - baseline_q50 over the batch''s patients and cut-offs.';
COMMENT ON COLUMN mart_whatif_effect.batch_id IS 'Prediction batch (dim_prediction_batch.batch_id).';
COMMENT ON COLUMN mart_whatif_effect.scenario_id IS 'Scenario (dim_scenario.scenario_id).';
COMMENT ON COLUMN mart_whatif_effect.horizon_min IS 'Minutes ahead: 5, 10, ..., 120.';
COMMENT ON COLUMN mart_whatif_effect.model_version IS 'Registered twin version of the batch.';
COMMENT ON COLUMN mart_whatif_effect.n_patients IS 'Patients with a what-if forecast under the scenario.';
COMMENT ON COLUMN mart_whatif_effect.n_forecasts IS 'What-if forecasts (patients x cut-offs).';
COMMENT ON COLUMN mart_whatif_effect.mean_change_mg_dl IS 'Mean change of the median forecast, mg/dL (negative lowers glucose).';
COMMENT ON COLUMN mart_whatif_effect.p10_change_mg_dl IS '10th percentile of the change, mg/dL.';
COMMENT ON COLUMN mart_whatif_effect.median_change_mg_dl IS 'Median change, mg/dL.';
COMMENT ON COLUMN mart_whatif_effect.p90_change_mg_dl IS '90th percentile of the change, mg/dL.';
COMMENT ON COLUMN mart_whatif_effect.min_change_mg_dl IS 'Smallest change, mg/dL.';
COMMENT ON COLUMN mart_whatif_effect.max_change_mg_dl IS 'Largest change, mg/dL.';
COMMENT ON COLUMN mart_whatif_effect.mean_baseline_q50_mg_dl IS 'Mean median forecast without the scenario, mg/dL.';
COMMENT ON COLUMN mart_whatif_effect.mean_q50_mg_dl IS 'Mean median forecast under the scenario, mg/dL.';
