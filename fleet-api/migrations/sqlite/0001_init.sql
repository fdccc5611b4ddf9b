-- ember-fleet schema v1 (SQLite). Keep in step with migrations/postgres/0001_init.sql: same
-- tables, columns and keys; only the type names differ. Booleans are INTEGER 0/1 here: sqlx's
-- Any driver cannot read a column declared BOOLEAN from SQLite. Times are microseconds since the Unix
-- epoch (UTC); `ts` columns are the agent's clock, `*_at` columns the fleet's.

CREATE TABLE devices (
    device_id         TEXT    PRIMARY KEY,
    registered_at     BIGINT  NOT NULL,
    preregistered     INTEGER NOT NULL DEFAULT 0,
    first_seen        BIGINT,
    last_seen         BIGINT,
    online            INTEGER NOT NULL DEFAULT 0,
    online_changed_at BIGINT,
    status_ts         BIGINT,
    status_at         BIGINT,
    agent_version     TEXT,
    models            TEXT,
    counters          TEXT,
    queue_records     BIGINT,
    queue_bytes       BIGINT,
    queue_disk_bytes  BIGINT,
    uptime_s          BIGINT,
    heartbeat_at      BIGINT
);
CREATE INDEX devices_online ON devices (online, device_id);

CREATE TABLE device_tags (
    device_id TEXT NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    tag       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag, value, device_id);

CREATE TABLE streams (
    device_id        TEXT   NOT NULL,
    stream           TEXT   NOT NULL,
    last_seq         BIGINT NOT NULL DEFAULT 0,
    queued           BIGINT NOT NULL DEFAULT 0,
    received         BIGINT NOT NULL DEFAULT 0,
    duplicates       BIGINT NOT NULL DEFAULT 0,
    expired          BIGINT NOT NULL DEFAULT 0,
    max_seq          BIGINT NOT NULL DEFAULT 0,
    pruned_through   BIGINT NOT NULL DEFAULT 0,
    first_ts         BIGINT,
    last_ts          BIGINT,
    channels         BIGINT,
    last_received_at BIGINT,
    PRIMARY KEY (device_id, stream)
);

CREATE TABLE telemetry (
    device_id   TEXT   NOT NULL,
    stream      TEXT   NOT NULL,
    seq         BIGINT NOT NULL,
    ts          BIGINT NOT NULL,
    vals        BLOB   NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (device_id, stream, seq)
) WITHOUT ROWID;
CREATE INDEX telemetry_by_time ON telemetry (device_id, stream, ts, seq);

CREATE TABLE aggregates_1m (
    device_id TEXT   NOT NULL,
    stream    TEXT   NOT NULL,
    bucket    BIGINT NOT NULL,
    channel   BIGINT NOT NULL,
    samples   BIGINT NOT NULL,
    sum_v     DOUBLE PRECISION NOT NULL,
    min_v     DOUBLE PRECISION NOT NULL,
    max_v     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, stream, bucket, channel)
) WITHOUT ROWID;
CREATE INDEX aggregates_1m_by_bucket ON aggregates_1m (bucket);

CREATE TABLE evicted_ranges (
    device_id   TEXT   NOT NULL,
    stream      TEXT   NOT NULL,
    from_seq    BIGINT NOT NULL,
    to_seq      BIGINT NOT NULL,
    reason      TEXT   NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (device_id, stream, from_seq, to_seq, reason)
) WITHOUT ROWID;

CREATE TABLE archived_gaps (
    device_id TEXT   NOT NULL,
    stream    TEXT   NOT NULL,
    from_seq  BIGINT NOT NULL,
    to_seq    BIGINT NOT NULL,
    PRIMARY KEY (device_id, stream, from_seq)
) WITHOUT ROWID;

CREATE TABLE rejects (
    device_id   TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    count       BIGINT NOT NULL,
    first_at    BIGINT NOT NULL,
    last_at     BIGINT NOT NULL,
    last_topic  TEXT   NOT NULL,
    last_detail TEXT   NOT NULL,
    PRIMARY KEY (device_id, reason)
);
CREATE INDEX rejects_by_last_at ON rejects (last_at);

CREATE TABLE api_tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash TEXT    NOT NULL UNIQUE,
    scope      TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    revoked_at BIGINT
);
