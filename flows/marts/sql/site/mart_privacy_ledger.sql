-- Mart: the site's privacy spend, one row per federated round its ledger recorded.
CREATE OR REPLACE TABLE mart_privacy_ledger AS
SELECT
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
FROM stg_privacy_round
ORDER BY ledger_position;

COMMENT ON TABLE mart_privacy_ledger IS 'The site''s privacy ledger (privacy_ledger.json): one row per federated training round it recorded, across every training run (key round_id). Epsilon is cumulative, from the RDP accountant over the whole history.';
COMMENT ON COLUMN mart_privacy_ledger.round_id IS 'Round identifier, <flower run id>:<server round>, unique across runs.';
COMMENT ON COLUMN mart_privacy_ledger.ledger_position IS 'Order in which the ledger recorded the round (1 = first).';
COMMENT ON COLUMN mart_privacy_ledger.privacy_unit IS 'What the guarantee protects: patient (all of a patient''s windows).';
COMMENT ON COLUMN mart_privacy_ledger.noise_multiplier IS 'DP-SGD noise multiplier (sigma) of the round.';
COMMENT ON COLUMN mart_privacy_ledger.sample_rate IS 'Poisson sampling rate of patients per step.';
COMMENT ON COLUMN mart_privacy_ledger.steps IS 'DP-SGD steps taken in the round.';
COMMENT ON COLUMN mart_privacy_ledger.epsilon_after IS 'Cumulative epsilon spent after the round, at the ledger''s delta.';
COMMENT ON COLUMN mart_privacy_ledger.epsilon_budget IS 'The site''s total epsilon budget; the ledger refuses a round that would exceed it.';
COMMENT ON COLUMN mart_privacy_ledger.epsilon_remaining IS 'epsilon_budget - epsilon_after (never below 0).';
COMMENT ON COLUMN mart_privacy_ledger.delta IS 'Delta of the (epsilon, delta) guarantee.';
