-- Several replicas and rolling upgrades (issue 16). Keep in step with
-- migrations/sqlite/0006_scale_out.sql.
--
-- schema_compat.min_reader: the oldest schema version (the highest migration a build knows)
-- that may still run against this database. A migration that only adds (a table, a nullable or
-- defaulted column, an index) leaves it alone, so replicas of the previous release keep running
-- during a rolling upgrade; a migration that changes or removes what older builds read or write
-- sets it to its own version. A build whose schema version is below min_reader refuses to
-- start and says so (fleet-api/src/db.rs, check_compat).
CREATE TABLE schema_compat (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    min_reader BIGINT NOT NULL
);
INSERT INTO schema_compat (id, min_reader) VALUES (1, 6);

-- Facts every replica must agree on. 'models.fs_store': the id of the volume an `fs` model
-- store lives on (written into <data_dir>/models/.store-id by the first replica that used it).
CREATE TABLE fleet_facts (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
