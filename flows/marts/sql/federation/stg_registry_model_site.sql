-- Staging: one row per registered version and site that took part in training it.
CREATE OR REPLACE TEMP VIEW stg_registry_model_site AS
SELECT
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(examples AS BIGINT) AS examples,
    CAST(rounds_trained AS INTEGER) AS rounds_trained,
    CAST(rounds_refused AS INTEGER) AS rounds_refused,
    CAST(rounds_failed AS INTEGER) AS rounds_failed,
    CAST(rounds_absent AS INTEGER) AS rounds_absent,
    CAST(epsilon_spent AS DOUBLE) AS epsilon_spent,
    CAST(epsilon_budget AS DOUBLE) AS epsilon_budget,
    CAST(delta AS DOUBLE) AS delta
FROM src_registry_model_site;
