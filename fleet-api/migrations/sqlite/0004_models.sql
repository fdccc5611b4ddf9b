-- Model registry (issue 5). Keep in step with migrations/postgres/0004_models.sql.
-- One row per uploaded, verified bundle. The bundle's bytes live in the blob store under
-- `blob_key`; `sha256`/`size` describe the whole bundle file (what an agent checks after
-- downloading), `manifest` is the bundle's manifest JSON exactly as signed.
CREATE TABLE models (
    name        TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    precision   TEXT    NOT NULL,
    sha256      TEXT    NOT NULL,
    size        BIGINT  NOT NULL,
    key_id      TEXT    NOT NULL,
    manifest    TEXT    NOT NULL,
    blob_key    TEXT    NOT NULL,
    deprecated  INTEGER NOT NULL DEFAULT 0,
    created_at  BIGINT  NOT NULL,
    PRIMARY KEY (name, version)
);
