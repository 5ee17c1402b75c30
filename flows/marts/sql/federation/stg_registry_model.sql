-- Staging: one row per registered twin version (federated/registry.py metadata).
CREATE OR REPLACE TEMP VIEW stg_registry_model AS
SELECT
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(registered_at AS TIMESTAMPTZ) AS registered_at,
    CAST(rounds AS INTEGER) AS rounds,
    CAST(strategy AS VARCHAR) AS strategy,
    CAST(private AS BOOLEAN) AS private,
    CAST(privacy_unit AS VARCHAR) AS privacy_unit,
    CAST(examples AS BIGINT) AS examples,
    CAST(epsilon_budget AS DOUBLE) AS epsilon_budget,
    CAST(delta AS DOUBLE) AS delta
FROM src_registry_model;
