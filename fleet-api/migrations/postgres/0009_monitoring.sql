-- Model monitoring (ota/monitor.rs): what each result says about drift. Additive: leaves
-- schema_compat.min_reader alone. Keep in step with the other engine's 0009_monitoring.sql.
--
-- confidence: a classifier's top probability (NULL for anomaly results), computed at ingest.
-- input_mean_z, input_std_ratio: the window's per-channel input statistics against the model's
-- normalization, as the agent sent them (little-endian f32s; NULL from agents that predate them).
ALTER TABLE inference ADD COLUMN confidence DOUBLE PRECISION;
ALTER TABLE inference ADD COLUMN input_mean_z BYTEA;
ALTER TABLE inference ADD COLUMN input_std_ratio BYTEA;
CREATE INDEX inference_by_received ON inference (received_at);
