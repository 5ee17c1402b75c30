-- Staging: one row per registered version, training round and known site: what the site did in the round.
CREATE OR REPLACE TEMP VIEW stg_registry_site_round AS
SELECT
    CAST(model_version AS VARCHAR) AS model_version,
    CAST(round AS INTEGER) AS round,
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(status AS VARCHAR) AS status,
    CAST(examples AS BIGINT) AS examples,
    CAST(epsilon_spent AS DOUBLE) AS epsilon_spent,
    CAST(private AS BOOLEAN) AS private,
    CAST(train_loss AS DOUBLE) AS train_loss,
    CAST(reason AS VARCHAR) AS reason
FROM src_registry_site_round;
