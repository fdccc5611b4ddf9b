-- Ingestion sources other than MQTT (server/ingest/source.rs): one row per partition of a
-- source (a Kinesis shard, an Event Hubs partition), leased to one replica at a time, with the
-- position up to which its messages are stored. The position is written in the same
-- transaction as the messages it covers, and only by the lease's owner. Additive: leaves
-- schema_compat.min_reader alone. Keep in step with the other engine's 0007_ingest_sources.sql.
CREATE TABLE ingest_leases (
    source       TEXT NOT NULL,
    partition_id TEXT NOT NULL,
    owner        TEXT NOT NULL,
    expires_at   BIGINT NOT NULL,
    position     TEXT,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (source, partition_id)
);
