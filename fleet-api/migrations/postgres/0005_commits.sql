-- End-to-end acknowledgement (issue 13). Keep in step with migrations/sqlite/0005_commits.sql.
-- streams.committed_through: the commit watermark the fleet publishes to the device on
-- ember/v1/{device}/committed: every record 1..=committed_through is stored, or lies below the
-- retention floor, or below the lowest sequence number the agent still queues (so it can never
-- be sent again). Only ever raised, inside the transaction that stores the records.
-- devices.delivery: how the device's agent deletes queued records, from its last status:
-- 'commit' (on the fleet's watermark) or 'puback' (on the broker's PUBACK; also agents that
-- predate end-to-end acknowledgement, whose status has no delivery field).
ALTER TABLE streams ADD COLUMN committed_through BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN delivery TEXT;
