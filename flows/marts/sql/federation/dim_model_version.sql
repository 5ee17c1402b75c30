-- Mart: one row per registered twin version.
CREATE OR REPLACE TABLE dim_model_version AS
WITH sites AS (
    SELECT model_version, count(*) FILTER (WHERE rounds_trained > 0) AS sites_trained, count(*) AS sites_known
    FROM stg_registry_model_site
    GROUP BY model_version
)
SELECT
    model.model_version,
    model.registered_at,
    model.rounds,
    model.strategy,
    model.private,
    model.privacy_unit,
    model.epsilon_budget,
    model.delta,
    coalesce(sites.sites_trained, 0) AS sites_trained,
    coalesce(sites.sites_known, 0) AS sites_known,
    model.examples
FROM stg_registry_model AS model
LEFT JOIN sites USING (model_version)
ORDER BY model.model_version;

COMMENT ON TABLE dim_model_version IS 'One row per registered twin version (key model_version), from the model registry''s metadata.';
COMMENT ON COLUMN dim_model_version.model_version IS 'Registered version, twin-NNNN.';
COMMENT ON COLUMN dim_model_version.registered_at IS 'When it was registered, UTC.';
COMMENT ON COLUMN dim_model_version.rounds IS 'Federated rounds of its training.';
COMMENT ON COLUMN dim_model_version.strategy IS 'Aggregation strategy: fedavg, fedprox or fedadam.';
COMMENT ON COLUMN dim_model_version.private IS 'Whether it was trained with differential privacy (DP-SGD at every site).';
COMMENT ON COLUMN dim_model_version.privacy_unit IS 'What the guarantee protects: patient.';
COMMENT ON COLUMN dim_model_version.epsilon_budget IS 'Per-site epsilon budget the training was configured with.';
COMMENT ON COLUMN dim_model_version.delta IS 'Delta of the guarantee.';
COMMENT ON COLUMN dim_model_version.sites_trained IS 'Sites that trained in at least one round.';
COMMENT ON COLUMN dim_model_version.sites_known IS 'Sites the training knew of (trained, refused, failed or absent).';
COMMENT ON COLUMN dim_model_version.examples IS 'Training windows contributed, summed over sites (each site''s last round).';
