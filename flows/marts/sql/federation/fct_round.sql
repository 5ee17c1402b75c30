-- Mart: participation and pooled evaluation per federated round of each registered version.
CREATE OR REPLACE TABLE fct_round AS
WITH participation AS (
    SELECT
        model_version,
        round,
        count(*) AS sites_known,
        count(*) FILTER (WHERE status = 'trained') AS sites_trained,
        count(*) FILTER (WHERE status = 'refused') AS sites_refused,
        count(*) FILTER (WHERE status = 'failed') AS sites_failed,
        count(*) FILTER (WHERE status = 'absent') AS sites_absent,
        sum(examples) AS examples_trained,
        max(epsilon_spent) AS max_epsilon_spent_after
    FROM stg_registry_site_round
    GROUP BY model_version, round
),
pooled AS (
    SELECT * FROM int_site_evaluation WHERE site_id IS NULL
)
SELECT
    participation.*,
    coalesce(pooled.sites_evaluated, 0) AS sites_evaluated,
    coalesce(pooled.suppressed, false) AS evaluation_suppressed,
    CASE WHEN NOT pooled.suppressed THEN pooled.rmse_30_mg_dl END AS rmse_30_mg_dl,
    CASE WHEN NOT pooled.suppressed THEN pooled.persistence_rmse_30_mg_dl END AS persistence_rmse_30_mg_dl,
    CASE WHEN NOT pooled.suppressed THEN pooled.rmse_60_mg_dl END AS rmse_60_mg_dl,
    CASE WHEN NOT pooled.suppressed THEN pooled.persistence_rmse_60_mg_dl END AS persistence_rmse_60_mg_dl,
    CASE WHEN NOT pooled.suppressed THEN pooled.coverage_90_pct END AS coverage_90_pct
FROM participation
LEFT JOIN pooled USING (model_version, round)
ORDER BY participation.model_version, participation.round;

COMMENT ON TABLE fct_round IS 'One row per registered version and federated round (key model_version, round): how many sites trained, refused, failed or were absent, the windows trained on, the highest cumulative epsilon any site reported, and the federated evaluation pooled over the sites'' test patients (suppressed when any evaluated site''s own evaluation is).';
COMMENT ON COLUMN fct_round.model_version IS 'Registered twin version.';
COMMENT ON COLUMN fct_round.round IS 'Round number within that training.';
COMMENT ON COLUMN fct_round.sites_known IS 'Sites the training knew of.';
COMMENT ON COLUMN fct_round.sites_trained IS 'Sites that trained in the round.';
COMMENT ON COLUMN fct_round.sites_refused IS 'Sites that refused (privacy budget exhausted, or a non-private request).';
COMMENT ON COLUMN fct_round.sites_failed IS 'Sites whose reply was an error other than a refusal.';
COMMENT ON COLUMN fct_round.sites_absent IS 'Known sites that did not reply.';
COMMENT ON COLUMN fct_round.examples_trained IS 'Training windows used in the round, summed over the sites that trained.';
COMMENT ON COLUMN fct_round.max_epsilon_spent_after IS 'Highest cumulative epsilon any site reported after the round.';
COMMENT ON COLUMN fct_round.sites_evaluated IS 'Sites whose evaluation is pooled.';
COMMENT ON COLUMN fct_round.evaluation_suppressed IS 'True when the pooled evaluation is withheld (a site''s own evaluation is suppressed, so pooled minus the others would reveal it).';
COMMENT ON COLUMN fct_round.rmse_30_mg_dl IS 'Pooled RMSE of the median at 30 minutes, mg/dL.';
COMMENT ON COLUMN fct_round.persistence_rmse_30_mg_dl IS 'Pooled persistence RMSE at 30 minutes, mg/dL.';
COMMENT ON COLUMN fct_round.rmse_60_mg_dl IS 'Pooled RMSE of the median at 60 minutes, mg/dL.';
COMMENT ON COLUMN fct_round.persistence_rmse_60_mg_dl IS 'Pooled persistence RMSE at 60 minutes, mg/dL.';
COMMENT ON COLUMN fct_round.coverage_90_pct IS 'Pooled share of test targets inside the 90% interval, %.';
