-- Share: the site's privacy ledger rounds (parameters and cumulative epsilon; nothing about patients).
CREATE OR REPLACE TABLE share_privacy_ledger AS
SELECT getvariable('site_id') AS site_id, *
FROM mart_privacy_ledger
ORDER BY ledger_position;

COMMENT ON TABLE share_privacy_ledger IS 'What the site shares about its privacy spend (key site_id, round_id): mart_privacy_ledger. Exported to mart/share/share_privacy_ledger.parquet.';
COMMENT ON COLUMN share_privacy_ledger.site_id IS 'The site.';
COMMENT ON COLUMN share_privacy_ledger.round_id IS 'Round identifier, <flower run id>:<server round>.';
COMMENT ON COLUMN share_privacy_ledger.ledger_position IS 'Order in which the ledger recorded the round.';
COMMENT ON COLUMN share_privacy_ledger.privacy_unit IS 'What the guarantee protects: patient.';
COMMENT ON COLUMN share_privacy_ledger.noise_multiplier IS 'DP-SGD noise multiplier of the round.';
COMMENT ON COLUMN share_privacy_ledger.sample_rate IS 'Poisson sampling rate of patients per step.';
COMMENT ON COLUMN share_privacy_ledger.steps IS 'DP-SGD steps of the round.';
COMMENT ON COLUMN share_privacy_ledger.epsilon_after IS 'Cumulative epsilon after the round.';
COMMENT ON COLUMN share_privacy_ledger.epsilon_budget IS 'The site''s epsilon budget.';
COMMENT ON COLUMN share_privacy_ledger.epsilon_remaining IS 'Budget left after the round.';
COMMENT ON COLUMN share_privacy_ledger.delta IS 'Delta of the guarantee.';
