-- ember-fleet schema v2 (SQLite): model results from `ember/v1/<device>/inference`. Keep in step
-- with migrations/postgres/0002_inference.sql.
--
-- An inference stream (`{source}.{model}`) has its own sequence numbers and a row in `streams`
-- like a sensor stream; `streams.kind` says which table holds its records, so the ledger and
-- retention read the right one. A device MUST NOT use one name for both kinds.

ALTER TABLE streams ADD COLUMN kind TEXT NOT NULL DEFAULT 'telemetry';

CREATE TABLE inference (
    device_id     TEXT    NOT NULL,
    stream        TEXT    NOT NULL,
    seq           BIGINT  NOT NULL,
    ts            BIGINT  NOT NULL,
    window_start  BIGINT  NOT NULL,
    source_seq    BIGINT  NOT NULL,
    model         TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    latency_us    BIGINT  NOT NULL,
    -- 'class': label, class, probabilities (little-endian f32s); 'anomaly': score, threshold.
    output_kind   TEXT    NOT NULL,
    label         TEXT,
    class         BIGINT,
    probabilities BLOB,
    score         DOUBLE PRECISION,
    threshold     DOUBLE PRECISION,
    anomalous     INTEGER NOT NULL DEFAULT 0,
    received_at   BIGINT  NOT NULL,
    PRIMARY KEY (device_id, stream, seq)
) WITHOUT ROWID;
CREATE INDEX inference_by_time ON inference (device_id, stream, ts, seq);
CREATE INDEX inference_anomalies ON inference (anomalous, ts);

-- Per device, stream, minute (by `ts`) and label ('' for anomaly results).
CREATE TABLE inference_1m (
    device_id   TEXT   NOT NULL,
    stream      TEXT   NOT NULL,
    bucket      BIGINT NOT NULL,
    label       TEXT   NOT NULL,
    results     BIGINT NOT NULL,
    anomalies   BIGINT NOT NULL,
    scored      BIGINT NOT NULL,
    score_sum   DOUBLE PRECISION NOT NULL,
    score_max   DOUBLE PRECISION,
    latency_sum BIGINT NOT NULL,
    PRIMARY KEY (device_id, stream, bucket, label)
) WITHOUT ROWID;
CREATE INDEX inference_1m_by_bucket ON inference_1m (bucket);
