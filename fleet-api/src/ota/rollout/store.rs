//! Persistence for rollouts: the state machine's value, its event history and the per-device
//! desired-model outbox, written together in one transaction per step.
//!
//! Tables (migrations `0003_ota.sql`): `rollouts` (the [`Rollout`] as JSON, with a `revision`),
//! `rollout_events`, `desired_models`.
//!
//! * A step MUST be stored with [`save`], which applies the step's [`Effect`]s in the same
//!   transaction as the new state: an `Assign`/`Revert` becomes a `desired_models` row with a
//!   bumped `revision`, an `Event` a `rollout_events` row. A crash between the two is therefore
//!   impossible, and the desired state is never ahead of or behind the rollout.
//! * `save` is conditional on the revision the caller loaded (optimistic locking); a replica
//!   that lost the race gets [`StoreError::Conflict`], reloads and steps again.
//! * `desired_models` is an outbox: a row whose `published_revision` is behind its `revision`
//!   is published (retained) by the desired-state publisher, which then calls
//!   [`mark_published`] with the revision it published. After a restart, everything not yet
//!   marked is published again, so a retained message is never lost (at worst repeated).

use sqlx::Row;

use crate::db::{Db, Sql, now_us};
use crate::ota::rollout::machine::{Effect, Rollout};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("stored rollout {id} is not readable: {message}")]
    Corrupt { id: String, message: String },
    #[error("rollout {id} changed since revision {revision} was read; reload and retry")]
    Conflict { id: String, revision: i64 },
    #[error("rollout {0} already exists")]
    Exists(String),
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: String,
    pub revision: i64,
    pub rollout: Rollout,
}

/// One entry of a rollout's history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub at: i64,
    pub kind: String,
    pub detail: String,
}

/// A desired-model row that still has to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub device_id: String,
    pub model: String,
    /// `None`: remove the model.
    pub version: Option<String>,
    pub rollout_id: Option<String>,
    pub revision: i64,
}

/// Stores a new rollout and applies the effects of its start.
pub async fn create(
    db: &Db,
    id: &str,
    rollout: &Rollout,
    effects: &[Effect],
) -> Result<Stored, StoreError> {
    let body = to_json(id, rollout)?;
    let now = now_us();
    let mut tx = db.pool().begin().await?;
    let mut q = Sql::new(
        "INSERT INTO rollouts (rollout_id, model, version, state, revision, body, created_at, updated_at) VALUES (",
    );
    q.bind(id)
        .push(", ")
        .bind(rollout.spec.model.as_str())
        .push(", ")
        .bind(rollout.spec.version.as_str())
        .push(", ")
        .bind(rollout.state.name())
        .push(", 1, ")
        .bind(body)
        .push(", ")
        .bind(now)
        .push(", ")
        .bind(now)
        .push(") ON CONFLICT (rollout_id) DO NOTHING");
    if q.query().execute(&mut *tx).await?.rows_affected() == 0 {
        return Err(StoreError::Exists(id.to_string()));
    }
    apply_effects(&mut tx, id, rollout, effects, now).await?;
    tx.commit().await?;
    Ok(Stored {
        id: id.to_string(),
        revision: 1,
        rollout: rollout.clone(),
    })
}

/// Stores the result of a step taken on `stored` (its `revision` is the one that was loaded)
/// and applies its effects. Returns the new revision.
pub async fn save(
    db: &Db,
    stored: &Stored,
    rollout: &Rollout,
    effects: &[Effect],
) -> Result<i64, StoreError> {
    let body = to_json(&stored.id, rollout)?;
    let now = now_us();
    let next = stored.revision + 1;
    let mut tx = db.pool().begin().await?;
    let mut q = Sql::new("UPDATE rollouts SET state = ");
    q.bind(rollout.state.name())
        .push(", body = ")
        .bind(body)
        .push(", revision = ")
        .bind(next)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE rollout_id = ")
        .bind(stored.id.as_str())
        .push(" AND revision = ")
        .bind(stored.revision);
    if q.query().execute(&mut *tx).await?.rows_affected() == 0 {
        return Err(StoreError::Conflict {
            id: stored.id.clone(),
            revision: stored.revision,
        });
    }
    apply_effects(&mut tx, &stored.id, rollout, effects, now).await?;
    tx.commit().await?;
    Ok(next)
}

async fn apply_effects(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    rollout: &Rollout,
    effects: &[Effect],
    now: i64,
) -> Result<(), StoreError> {
    let mut q = Sql::new(
        "SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) AS s FROM rollout_events WHERE rollout_id = ",
    );
    q.bind(id);
    let mut seq: i64 = q.query().fetch_one(&mut **tx).await?.try_get("s")?;
    for effect in effects {
        match effect {
            Effect::Event(e) => {
                seq += 1;
                let mut q = Sql::new(
                    "INSERT INTO rollout_events (rollout_id, seq, at, kind, detail) VALUES (",
                );
                q.bind(id)
                    .push(", ")
                    .bind(seq)
                    .push(", ")
                    .bind(i64::try_from(e.at).unwrap_or(i64::MAX))
                    .push(", ")
                    .bind(e.kind.as_str())
                    .push(", ")
                    .bind(e.detail.as_str())
                    .push(")");
                q.query().execute(&mut **tx).await?;
            }
            Effect::Assign { device } => {
                upsert_desired(
                    tx,
                    device,
                    &rollout.spec.model,
                    Some(&rollout.spec.version),
                    id,
                    now,
                )
                .await?;
            }
            Effect::Revert { device, to } => {
                upsert_desired(tx, device, &rollout.spec.model, to.as_deref(), id, now).await?;
            }
        }
    }
    Ok(())
}

async fn upsert_desired(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    device: &str,
    model: &str,
    version: Option<&str>,
    rollout_id: &str,
    now: i64,
) -> Result<(), StoreError> {
    let mut q = Sql::new(
        "INSERT INTO desired_models (device_id, model, version, rollout_id, revision, updated_at) VALUES (",
    );
    q.bind(device)
        .push(", ")
        .bind(model)
        .push(", ")
        .bind(version.map(str::to_string))
        .push(", ")
        .bind(rollout_id)
        .push(", 1, ")
        .bind(now)
        .push(
            ") ON CONFLICT (device_id, model) DO UPDATE SET version = excluded.version, \
             rollout_id = excluded.rollout_id, revision = desired_models.revision + 1, \
             updated_at = excluded.updated_at",
        );
    q.query().execute(&mut **tx).await?;
    Ok(())
}

/// Loads a rollout.
pub async fn load(db: &Db, id: &str) -> Result<Option<Stored>, StoreError> {
    let mut q = Sql::new("SELECT rollout_id, revision, body FROM rollouts WHERE rollout_id = ");
    q.bind(id);
    match q.query().fetch_optional(db.pool()).await? {
        Some(row) => Ok(Some(from_row(&row)?)),
        None => Ok(None),
    }
}

/// Rollouts still running or paused, oldest first (what a starting fleet resumes driving).
pub async fn list_unfinished(db: &Db) -> Result<Vec<Stored>, StoreError> {
    let rows = sqlx::query(
        "SELECT rollout_id, revision, body FROM rollouts WHERE state IN ('running', 'paused') ORDER BY created_at, rollout_id",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// A rollout's history, oldest first.
pub async fn events(db: &Db, id: &str) -> Result<Vec<StoredEvent>, StoreError> {
    let mut q = Sql::new("SELECT seq, at, kind, detail FROM rollout_events WHERE rollout_id = ");
    q.bind(id).push(" ORDER BY seq");
    let rows = q.query().fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(StoredEvent {
                seq: r.try_get("seq")?,
                at: r.try_get("at")?,
                kind: r.try_get("kind")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect()
}

/// Desired-model rows not yet published at their current revision.
pub async fn unpublished(db: &Db, limit: i64) -> Result<Vec<Desired>, StoreError> {
    let mut q = Sql::new(
        "SELECT device_id, model, version, rollout_id, revision FROM desired_models \
         WHERE published_revision < revision ORDER BY updated_at, device_id, model LIMIT ",
    );
    q.bind(limit);
    let rows = q.query().fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(Desired {
                device_id: r.try_get("device_id")?,
                model: r.try_get("model")?,
                version: r.try_get("version")?,
                rollout_id: r.try_get("rollout_id")?,
                revision: r.try_get("revision")?,
            })
        })
        .collect()
}

/// Every desired model of one device (what its retained desired-state message lists).
pub async fn desired_for(db: &Db, device: &str) -> Result<Vec<Desired>, StoreError> {
    let mut q = Sql::new(
        "SELECT device_id, model, version, rollout_id, revision FROM desired_models WHERE device_id = ",
    );
    q.bind(device).push(" ORDER BY model");
    let rows = q.query().fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(Desired {
                device_id: r.try_get("device_id")?,
                model: r.try_get("model")?,
                version: r.try_get("version")?,
                rollout_id: r.try_get("rollout_id")?,
                revision: r.try_get("revision")?,
            })
        })
        .collect()
}

/// Records that `revision` of a desired row was published (never moves backwards).
pub async fn mark_published(
    db: &Db,
    device: &str,
    model: &str,
    revision: i64,
) -> Result<(), StoreError> {
    let mut q = Sql::new("UPDATE desired_models SET published_revision = ");
    q.bind(revision)
        .push(" WHERE device_id = ")
        .bind(device)
        .push(" AND model = ")
        .bind(model)
        .push(" AND published_revision < ")
        .bind(revision);
    q.query().execute(db.pool()).await?;
    Ok(())
}

fn to_json(id: &str, rollout: &Rollout) -> Result<String, StoreError> {
    serde_json::to_string(rollout).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        message: e.to_string(),
    })
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<Stored, StoreError> {
    let id: String = row.try_get("rollout_id")?;
    let body: String = row.try_get("body")?;
    let rollout = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
        id: id.clone(),
        message: e.to_string(),
    })?;
    Ok(Stored {
        revision: row.try_get("revision")?,
        id,
        rollout,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Backend, DatabaseSettings};
    use crate::ota::rollout::machine::{Command, DeviceState, RolloutSpec, RolloutState};

    async fn sqlite() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let settings = DatabaseSettings {
            url: format!("sqlite://{}", dir.path().join("t.db").display()),
            backend: Backend::Sqlite,
            max_connections: 2,
            token_source: None,
        };
        let db = Db::open(&settings).await.unwrap();
        (dir, db)
    }

    fn targets(n: usize) -> BTreeMap<String, Option<String>> {
        (0..n)
            .map(|i| (format!("dev-{i}"), Some("1.0.0".to_string())))
            .collect()
    }

    #[tokio::test]
    async fn a_rollout_is_stored_with_its_effects_and_survives_a_reload() {
        let (_dir, db) = sqlite().await;
        let spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 0);
        let (mut r, fx) = Rollout::start(spec, targets(10), 0).unwrap();
        let stored = create(&db, "r-1", &r, &fx).await.unwrap();
        assert!(matches!(
            create(&db, "r-1", &r, &fx).await,
            Err(StoreError::Exists(_))
        ));

        // The canary's assignment is waiting in the outbox.
        let out = unpublished(&db, 100).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].device_id, "dev-0");
        assert_eq!(out[0].version.as_deref(), Some("2.0.0"));

        // A step, saved; a stale save conflicts.
        let fx = r.report("dev-0", DeviceState::Active, 1);
        let rev = save(&db, &stored, &r, &fx).await.unwrap();
        assert_eq!(rev, 2);
        assert!(matches!(
            save(&db, &stored, &r, &[]).await,
            Err(StoreError::Conflict { revision: 1, .. })
        ));
        let back = load(&db, "r-1").await.unwrap().unwrap();
        assert_eq!(back.revision, 2);
        assert_eq!(back.rollout, r);
        assert_eq!(list_unfinished(&db).await.unwrap().len(), 1);

        // Publishing clears the outbox; a later change re-queues the row.
        for d in unpublished(&db, 100).await.unwrap() {
            mark_published(&db, &d.device_id, &d.model, d.revision)
                .await
                .unwrap();
        }
        assert!(unpublished(&db, 100).await.unwrap().is_empty());
        let fx = r.command(Command::Rollback, 2).unwrap();
        save(&db, &back, &r, &fx).await.unwrap();
        let out = unpublished(&db, 100).await.unwrap();
        assert!(out.iter().all(|d| d.version.as_deref() == Some("1.0.0")));
        assert!(
            out.iter()
                .any(|d| d.device_id == "dev-0" && d.revision == 2)
        );
        assert_eq!(
            desired_for(&db, "dev-0").await.unwrap()[0]
                .version
                .as_deref(),
            Some("1.0.0")
        );

        let history = events(&db, "r-1").await.unwrap();
        let kinds: Vec<&str> = history.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds.first(), Some(&"created"));
        assert_eq!(kinds.last(), Some(&"rolled_back"));
        assert!(history.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert!(list_unfinished(&db).await.unwrap().is_empty());
        assert_eq!(
            load(&db, "r-1").await.unwrap().unwrap().rollout.state,
            RolloutState::RolledBack
        );
        db.close().await;
    }
}
