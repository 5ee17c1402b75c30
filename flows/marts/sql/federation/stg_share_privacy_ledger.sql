-- Staging: each site's privacy ledger rounds.
CREATE OR REPLACE TEMP VIEW stg_share_privacy_ledger AS
SELECT
    CAST(site_id AS VARCHAR) AS site_id,
    CAST(round_id AS VARCHAR) AS round_id,
    CAST(ledger_position AS INTEGER) AS ledger_position,
    CAST(privacy_unit AS VARCHAR) AS privacy_unit,
    CAST(noise_multiplier AS DOUBLE) AS noise_multiplier,
    CAST(sample_rate AS DOUBLE) AS sample_rate,
    CAST(steps AS INTEGER) AS steps,
    CAST(epsilon_after AS DOUBLE) AS epsilon_after,
    CAST(epsilon_budget AS DOUBLE) AS epsilon_budget,
    CAST(delta AS DOUBLE) AS delta
FROM src_share_privacy_ledger;
