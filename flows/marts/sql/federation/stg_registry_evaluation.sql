-- Staging: the federated evaluation after each round, per site (site_id set) and pooled (site_id null).
CREATE OR REPLACE TEMP VIEW stg_registry_evaluation AS
SELECT
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(round AS INTEGER) AS round,
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(rmse_30 AS DOUBLE) AS rmse_30_mg_dl,
    CAST(persistence_rmse_30 AS DOUBLE) AS persistence_rmse_30_mg_dl,
    CAST(rmse_60 AS DOUBLE) AS rmse_60_mg_dl,
    CAST(persistence_rmse_60 AS DOUBLE) AS persistence_rmse_60_mg_dl,
    100.0 * CAST(coverage_90 AS DOUBLE) AS coverage_90_pct
FROM src_registry_evaluation;
