-- The data lake (server/lake/): committed records exported as Parquet files to object storage,
-- exactly once per (device, stream, seq). Additive: leaves schema_compat.min_reader alone.
-- Keep in step with the other engine's 0008_lake.sql.
--
-- streams.lake_through: every record 1..=lake_through of the stream is in the lake (or was
-- never stored: an evicted or settled gap). Only raised, in the transaction that records the
-- export's files as written. Retention never deletes a row above it while the lake is on.
ALTER TABLE streams ADD COLUMN lake_through BIGINT NOT NULL DEFAULT 0;

-- One row per export of a stream's range (from_seq..=to_seq), inserted before any file is
-- written: a fleet that dies mid-export writes the very same files again from the very same
-- range (the file names are derived from it), so a restart never writes a record twice or
-- skips one. done_at is set in the transaction that raises streams.lake_through.
CREATE TABLE lake_exports (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id  TEXT   NOT NULL,
    stream     TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    from_seq   BIGINT NOT NULL,
    to_seq     BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    done_at    BIGINT,
    rows_out   BIGINT,
    UNIQUE (device_id, stream, from_seq)
);
CREATE INDEX lake_exports_pending ON lake_exports (done_at, id);

-- Every Parquet file the lake holds (its key below the lake's root), with the records it
-- covers. A file being merged by a compaction names it (compaction_id); the compaction's
-- output replaces the inputs' rows in one transaction, then the input objects are deleted.
CREATE TABLE lake_files (
    path          TEXT   PRIMARY KEY,
    kind          TEXT   NOT NULL,
    day           TEXT   NOT NULL,
    device_id     TEXT   NOT NULL,
    stream        TEXT   NOT NULL,
    min_seq       BIGINT NOT NULL,
    max_seq       BIGINT NOT NULL,
    rows_in       BIGINT NOT NULL,
    bytes         BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    compaction_id BIGINT
);
CREATE INDEX lake_files_by_partition ON lake_files (kind, day, device_id, stream);

-- A compaction: small files of one partition and stream merged into one (output). written_at:
-- the output is stored and has replaced the inputs' rows; done_at: the inputs' objects are
-- deleted. A restart finishes what a crash interrupted.
CREATE TABLE lake_compactions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT   NOT NULL,
    day        TEXT   NOT NULL,
    device_id  TEXT   NOT NULL,
    stream     TEXT   NOT NULL,
    output     TEXT   NOT NULL,
    inputs     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    written_at BIGINT,
    done_at    BIGINT
);
