-- Mart: what each site did in each federated round of each registered version: participation, privacy spent, and
-- the round's evaluation on the site's test patients (suppressed when they are too few).
CREATE OR REPLACE TABLE fct_site_round AS
SELECT
    part.model_version,
    part.round,
    part.site_id,
    part.status,
    part.examples,
    part.private,
    part.epsilon_spent AS epsilon_spent_after,
    model_site.epsilon_budget,
    greatest(model_site.epsilon_budget - part.epsilon_spent, 0) AS epsilon_remaining_after,
    part.train_loss,
    part.reason,
    coalesce(evaluation.suppressed, false) AS evaluation_suppressed,
    CASE WHEN NOT evaluation.suppressed THEN evaluation.rmse_30_mg_dl END AS rmse_30_mg_dl,
    CASE WHEN NOT evaluation.suppressed THEN evaluation.persistence_rmse_30_mg_dl END AS persistence_rmse_30_mg_dl,
    CASE WHEN NOT evaluation.suppressed THEN evaluation.rmse_60_mg_dl END AS rmse_60_mg_dl,
    CASE WHEN NOT evaluation.suppressed THEN evaluation.persistence_rmse_60_mg_dl END AS persistence_rmse_60_mg_dl,
    CASE WHEN NOT evaluation.suppressed THEN evaluation.coverage_90_pct END AS coverage_90_pct
FROM stg_registry_site_round AS part
LEFT JOIN stg_registry_model_site AS model_site USING (model_version, site_id)
LEFT JOIN int_site_evaluation AS evaluation USING (model_version, round, site_id)
ORDER BY part.model_version, part.round, part.site_id;

COMMENT ON TABLE fct_site_round IS 'One row per registered version, federated round and site the training knew (key model_version, round, site_id): whether the site trained, refused (privacy budget, non-private request), failed or was absent; the epsilon it reported spent after the round; and the federated evaluation on its held-out test patients, suppressed when the site has fewer than k of them.';
COMMENT ON COLUMN fct_site_round.model_version IS 'Registered twin version the round belongs to.';
COMMENT ON COLUMN fct_site_round.round IS 'Round number within that training (1 = first; continues across resumed runs).';
COMMENT ON COLUMN fct_site_round.site_id IS 'The site.';
COMMENT ON COLUMN fct_site_round.status IS 'trained, refused, failed or absent (did not reply).';
COMMENT ON COLUMN fct_site_round.examples IS 'Training windows the site used in the round (null unless trained).';
COMMENT ON COLUMN fct_site_round.private IS 'Whether the site''s update was differentially private (null unless trained).';
COMMENT ON COLUMN fct_site_round.epsilon_spent_after IS 'Cumulative epsilon the site reported after the round (its ledger, all runs); null unless trained.';
COMMENT ON COLUMN fct_site_round.epsilon_budget IS 'The site''s epsilon budget in that training.';
COMMENT ON COLUMN fct_site_round.epsilon_remaining_after IS 'epsilon_budget - epsilon_spent_after, never below 0.';
COMMENT ON COLUMN fct_site_round.train_loss IS 'Mean pinball loss of the site''s local training in the round.';
COMMENT ON COLUMN fct_site_round.reason IS 'Why the site refused or failed, as it replied; null otherwise.';
COMMENT ON COLUMN fct_site_round.evaluation_suppressed IS 'True when the site''s evaluation is withheld (fewer than k test patients, or its patient count unknown).';
COMMENT ON COLUMN fct_site_round.rmse_30_mg_dl IS 'RMSE of the median at 30 minutes on the site''s test patients after the round, mg/dL.';
COMMENT ON COLUMN fct_site_round.persistence_rmse_30_mg_dl IS 'Persistence RMSE at 30 minutes on the same targets, mg/dL.';
COMMENT ON COLUMN fct_site_round.rmse_60_mg_dl IS 'RMSE of the median at 60 minutes, mg/dL.';
COMMENT ON COLUMN fct_site_round.persistence_rmse_60_mg_dl IS 'Persistence RMSE at 60 minutes, mg/dL.';
COMMENT ON COLUMN fct_site_round.coverage_90_pct IS 'Share of test targets inside the site-calibrated 90% interval (all horizons), %.';
