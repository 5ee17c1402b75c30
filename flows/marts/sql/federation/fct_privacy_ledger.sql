-- Mart: every round each site's own privacy ledger recorded, across all trainings.
CREATE OR REPLACE TABLE fct_privacy_ledger AS
SELECT
    site_id,
    round_id,
    ledger_position,
    privacy_unit,
    noise_multiplier,
    sample_rate,
    steps,
    epsilon_after,
    epsilon_budget,
    greatest(epsilon_budget - epsilon_after, 0) AS epsilon_remaining,
    delta
FROM stg_share_privacy_ledger
ORDER BY site_id, ledger_position;

COMMENT ON TABLE fct_privacy_ledger IS 'Privacy spent per site and round as each site''s own ledger recorded it (key site_id, round_id), across every training: the DP-SGD parameters of the round and the cumulative epsilon after it. The ledger is the site''s authority; fct_site_round shows what the site reported to each training.';
COMMENT ON COLUMN fct_privacy_ledger.site_id IS 'The site.';
COMMENT ON COLUMN fct_privacy_ledger.round_id IS 'Round identifier, <flower run id>:<server round>, unique across runs.';
COMMENT ON COLUMN fct_privacy_ledger.ledger_position IS 'Order in which the site''s ledger recorded the round.';
COMMENT ON COLUMN fct_privacy_ledger.privacy_unit IS 'What the guarantee protects: patient.';
COMMENT ON COLUMN fct_privacy_ledger.noise_multiplier IS 'DP-SGD noise multiplier (sigma).';
COMMENT ON COLUMN fct_privacy_ledger.sample_rate IS 'Poisson sampling rate of patients per step.';
COMMENT ON COLUMN fct_privacy_ledger.steps IS 'DP-SGD steps in the round.';
COMMENT ON COLUMN fct_privacy_ledger.epsilon_after IS 'Cumulative epsilon after the round.';
COMMENT ON COLUMN fct_privacy_ledger.epsilon_budget IS 'The site''s epsilon budget.';
COMMENT ON COLUMN fct_privacy_ledger.epsilon_remaining IS 'Budget left after the round, never below 0.';
COMMENT ON COLUMN fct_privacy_ledger.delta IS 'Delta of the guarantee.';
