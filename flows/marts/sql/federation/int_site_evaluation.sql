-- Intermediate: the registry's per-site and pooled evaluation with the suppression decided. A site evaluates on its
-- held-out test patients, one in getvariable('test_every') of its patients (models/twin/windows.py); fewer than k
-- of them (judged from the site's shared patient count; unknown counts as too few) suppresses the site's row, and
-- the pooled row of every round where any site's row is suppressed.
CREATE OR REPLACE TEMP TABLE int_site_evaluation AS
WITH per_site AS (
    SELECT
        evaluation.*,
        coalesce(ceil(site.n_patients / getvariable('test_every')), 0) < getvariable('min_cell_patients')
            AS suppressed
    FROM stg_registry_evaluation AS evaluation
    LEFT JOIN stg_share_site AS site USING (site_id)
    WHERE evaluation.site_id IS NOT NULL
),
rounds AS (
    SELECT model_version, round, bool_or(suppressed) AS any_site_suppressed, count(*) AS sites_evaluated
    FROM per_site
    GROUP BY model_version, round
)
SELECT
    model_version, round, site_id, suppressed, 1 AS sites_evaluated,
    rmse_30_mg_dl, persistence_rmse_30_mg_dl, rmse_60_mg_dl, persistence_rmse_60_mg_dl, coverage_90_pct
FROM per_site
UNION ALL
SELECT
    pooled.model_version, pooled.round, NULL AS site_id, coalesce(rounds.any_site_suppressed, true) AS suppressed,
    coalesce(rounds.sites_evaluated, 0),
    pooled.rmse_30_mg_dl, pooled.persistence_rmse_30_mg_dl, pooled.rmse_60_mg_dl, pooled.persistence_rmse_60_mg_dl,
    pooled.coverage_90_pct
FROM stg_registry_evaluation AS pooled
LEFT JOIN rounds USING (model_version, round)
WHERE pooled.site_id IS NULL;
