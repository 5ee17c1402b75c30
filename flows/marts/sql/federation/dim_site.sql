-- Mart: one row per site known from a share or from the registry.
CREATE OR REPLACE TABLE dim_site AS
WITH registry_sites AS (
    SELECT site_id, count(*) AS model_versions_trained, max(model_version) AS latest_model_version
    FROM stg_registry_model_site
    WHERE rounds_trained > 0
    GROUP BY site_id
),
all_sites AS (
    SELECT site_id FROM stg_share_site
    UNION
    SELECT site_id FROM stg_registry_model_site
)
SELECT
    all_sites.site_id,
    share.share_built_at,
    coalesce(share.n_patients_suppressed, true) AS n_patients_suppressed,
    share.n_patients,
    share.latest_run_id,
    share.schema_version,
    share.contract_version,
    share.batches_published,
    share.latest_issued_at,
    share.epsilon_spent,
    share.epsilon_budget,
    greatest(share.epsilon_budget - share.epsilon_spent, 0) AS epsilon_remaining,
    share.delta,
    share.privacy_rounds,
    coalesce(registry_sites.model_versions_trained, 0) AS model_versions_trained,
    registry_sites.latest_model_version
FROM all_sites
LEFT JOIN stg_share_site AS share USING (site_id)
LEFT JOIN registry_sites USING (site_id)
ORDER BY all_sites.site_id;

COMMENT ON TABLE dim_site IS 'One row per hospital of the federation (key site_id): what its share says about it (size suppressed under k patients, data versions, latest run, published predictions, privacy ledger) and which registered models it trained.';
COMMENT ON COLUMN dim_site.site_id IS 'The site (hospital) id.';
COMMENT ON COLUMN dim_site.share_built_at IS 'When the site built the share this row comes from, UTC; null for a site known only from the registry.';
COMMENT ON COLUMN dim_site.n_patients_suppressed IS 'True when the site''s patient count is withheld (fewer than k = 11, or no share).';
COMMENT ON COLUMN dim_site.n_patients IS 'Patients at the site (its harmonized person table); null when suppressed.';
COMMENT ON COLUMN dim_site.latest_run_id IS 'The site''s latest site-flow run.';
COMMENT ON COLUMN dim_site.schema_version IS 'Canonical schema version of the site''s latest run.';
COMMENT ON COLUMN dim_site.contract_version IS 'Data contract version of the site''s latest run.';
COMMENT ON COLUMN dim_site.batches_published IS 'Prediction batches the site has published into its mart.';
COMMENT ON COLUMN dim_site.latest_issued_at IS 'Issue time of the site''s latest published prediction batch, UTC.';
COMMENT ON COLUMN dim_site.epsilon_spent IS 'Cumulative epsilon spent according to the site''s own privacy ledger (all trainings).';
COMMENT ON COLUMN dim_site.epsilon_budget IS 'The site''s epsilon budget.';
COMMENT ON COLUMN dim_site.epsilon_remaining IS 'epsilon_budget - epsilon_spent, never below 0.';
COMMENT ON COLUMN dim_site.delta IS 'Delta of the site''s (epsilon, delta) guarantee.';
COMMENT ON COLUMN dim_site.privacy_rounds IS 'Rounds the site''s privacy ledger recorded.';
COMMENT ON COLUMN dim_site.model_versions_trained IS 'Registered twin versions the site trained in at least one round.';
COMMENT ON COLUMN dim_site.latest_model_version IS 'Newest registered version the site trained.';
