-- Rollouts (issue 5). Keep in step with migrations/postgres/0003_ota.sql.
-- `body` is the whole rollout state machine (fleet-api/src/rollout.rs) as JSON; `revision`
-- guards against two replicas stepping the same rollout at once (optimistic locking).
CREATE TABLE rollouts (
    rollout_id TEXT    PRIMARY KEY,
    model      TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    revision   BIGINT  NOT NULL,
    body       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);
CREATE INDEX rollouts_state ON rollouts (state, model);

CREATE TABLE rollout_events (
    rollout_id TEXT   NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    kind       TEXT   NOT NULL,
    detail     TEXT   NOT NULL,
    PRIMARY KEY (rollout_id, seq)
);

-- The desired model per device and name: an outbox. A row whose published_revision is behind
-- its revision still has to be published (retained) on ember/v1/{device}/desired.
-- version NULL: the device should remove this model.
CREATE TABLE desired_models (
    device_id          TEXT   NOT NULL,
    model              TEXT   NOT NULL,
    version            TEXT,
    rollout_id         TEXT,
    revision           BIGINT NOT NULL,
    published_revision BIGINT NOT NULL DEFAULT 0,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (device_id, model)
);
CREATE INDEX desired_models_unpublished ON desired_models (published_revision, revision);
