-- Field capture and labelling (docs/capture.md). Additive: leaves schema_compat.min_reader
-- alone. Keep in step with the other engine's 0010_captures.sql.
--
-- A capture stream ({source}.{model}.capture) is an inference stream: its results are rows of
-- `inference` (and its ledger is theirs). Each of its records also carries the raw window the
-- result is about, stored here in the same transaction, with its current label.
CREATE TABLE captures (
    device_id    TEXT   NOT NULL,
    stream       TEXT   NOT NULL,
    seq          BIGINT NOT NULL,
    trigger_kind TEXT   NOT NULL,
    channels     BIGINT NOT NULL,
    window_vals  BYTEA     NOT NULL,
    label        TEXT,
    labelled_by  TEXT,
    labelled_at  BIGINT,
    PRIMARY KEY (device_id, stream, seq)
);
CREATE INDEX captures_by_label ON captures (label, device_id);

-- Every labelling, in commit order: id is the previous largest plus one, taken in the
-- labelling transaction (two concurrent labellings conflict on it and one retries), so a
-- committed id is never smaller than one already visible; the lake exports them by id.
CREATE TABLE capture_labels (
    id          BIGINT PRIMARY KEY,
    device_id   TEXT   NOT NULL,
    stream      TEXT   NOT NULL,
    seq         BIGINT NOT NULL,
    label       TEXT   NOT NULL,
    labelled_by TEXT   NOT NULL,
    labelled_at BIGINT NOT NULL
);
