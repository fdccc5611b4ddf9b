//! Replicas: who runs against this database, which one does the singleton work, and when a
//! replica may leave the broker's shared subscription for good.
//!
//! ```text
//! SQLite:     one process only: an exclusive lock on <db file>.lock, held while it runs;
//!             that process is always the leader and never leaves its MQTT session.
//! PostgreSQL: a dedicated connection per replica (not from the pool) holding two kinds of
//!             session-level advisory locks:
//!               identity  (IDENTITY_NS, hash(mqtt.client_id))  taken at start, or the start fails
//!               leader    (LEADER_KEY)                         tried every LOCK_CHECK
//!             the leader runs the singleton tasks (rollout driver, retention, desired-state
//!             publisher) through `spawn_singleton`.
//! ```
//!
//! Guarantees:
//! * Two live replicas MUST NOT share an `mqtt.client_id`: the second one's start fails naming
//!   the key (the broker would otherwise evict one connection for the other, forever). A
//!   replica killed with SIGKILL loses its locks as soon as PostgreSQL sees its connection
//!   close, so it restarts under the same id at once.
//! * At most one replica believes it is the leader at any time, up to the failure-detection
//!   window: the leader checks its lock connection every [`LOCK_CHECK`] with a
//!   [`CHECK_TIMEOUT`], and steps down (cancels its singleton tasks) as soon as a check fails,
//!   which is long before PostgreSQL drops a silent connection (TCP keepalive, minutes) and
//!   lets another replica take the lock. A dead leader's lock is released by PostgreSQL when
//!   its connection closes; another replica takes over within [`LOCK_CHECK`].
//! * Several processes on one SQLite file MUST fail at start, saying to use PostgreSQL.
//! * [`Membership::should_leave`] says whether another replica is alive right now: a replica
//!   that stops while others run leaves the shared subscription and ends its MQTT session
//!   (see `server::ingest`); the last one keeps its session so the broker queues for it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::Row;
use sqlx::postgres::PgConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Backend, Settings};
use crate::db::Db;
use crate::error::FleetError;
use crate::metrics::Metrics;

/// How often the lock connection is checked, and how often a follower tries to lead.
pub const LOCK_CHECK: Duration = Duration::from_secs(1);
/// A check that takes longer than this counts as a lost connection.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a (re)connection of the lock connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The advisory-lock namespace (upper 32 bits of the key) of replica identities ("EMBR").
const IDENTITY_NS: i64 = 0x454D_4252;
/// The advisory lock of the leader ("EMBL", 1).
const LEADER_KEY: i64 = (0x454D_424C << 32) | 1;

/// This replica's place among the replicas.
pub struct Membership {
    leader: watch::Receiver<bool>,
    /// SQLite: the sender of the constant `true` (PostgreSQL: owned by the election task).
    _leader_tx: Option<watch::Sender<bool>>,
    db: Db,
    task: Option<JoinHandle<()>>,
    stop: CancellationToken,
    /// SQLite: the exclusive lock file, held while the service runs.
    _sqlite_lock: Option<std::fs::File>,
}

impl Membership {
    /// Joins: SQLite takes the single-process lock; PostgreSQL takes this replica's identity
    /// lock (refusing a client id another live replica holds) and starts the leader election.
    pub async fn join(
        settings: &Settings,
        db: &Db,
        metrics: Arc<Metrics>,
    ) -> Result<Membership, FleetError> {
        match settings.database.backend {
            Backend::Sqlite => {
                let lock = lock_sqlite(&settings.database.url)?;
                // Nobody else can lead.
                let (tx, rx) = watch::channel(true);
                metrics.set("leader", &[], 1.0);
                Ok(Membership {
                    leader: rx,
                    _leader_tx: Some(tx),
                    db: db.clone(),
                    task: None,
                    stop: CancellationToken::new(),
                    _sqlite_lock: lock,
                })
            }
            Backend::Postgres => {
                let url = settings.database.url.clone();
                let client_id = settings.mqtt.client_id.clone();
                let identity = identity_key(&client_id);
                let mut conn = connect(&db.connect_url(&url)).await?;
                if !try_lock(&mut conn, identity).await? {
                    return Err(FleetError::Misconfigured(format!(
                        "another running ember-fleet replica on this database uses mqtt.client_id {client_id:?}: \
                         give each replica its own stable client id (in Kubernetes a StatefulSet with \
                         EMBER_FLEET_MQTT__CLIENT_ID=ember-fleet-$(POD_NAME)); two replicas with one id evict each other at the broker"
                    )));
                }
                let (tx, rx) = watch::channel(false);
                let stop = CancellationToken::new();
                metrics.set("leader", &[], 0.0);
                let lock_db = db.clone();
                let task = tokio::spawn(maintain(
                    move || lock_db.connect_url(&url),
                    client_id,
                    identity,
                    conn,
                    tx,
                    metrics,
                    stop.clone(),
                ));
                Ok(Membership {
                    leader: rx,
                    _leader_tx: None,
                    db: db.clone(),
                    task: Some(task),
                    stop,
                    _sqlite_lock: None,
                })
            }
        }
    }

    /// Whether this replica leads now, and its changes.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Whether another replica is alive right now (holds its identity lock). SQLite: never.
    /// A failed query answers `false`: keeping the session is the safe side when unsure.
    pub async fn should_leave(&self) -> bool {
        if self.db.backend() != Backend::Postgres {
            return false;
        }
        match others_alive(&self.db).await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot count the other replicas; keeping the MQTT session.");
                false
            }
        }
    }

    /// Releases the locks (another replica takes over at once) and stops the election.
    pub async fn leave(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(CHECK_TIMEOUT, t).await;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            // Dropping the lock connection releases the locks.
            t.abort();
        }
    }
}

/// Live replicas on this database other than the caller (identity locks held by other
/// sessions).
pub async fn others_alive(db: &Db) -> Result<i64, sqlx::Error> {
    let q = format!(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM pg_locks WHERE locktype = 'advisory' \
         AND granted AND objsubid = 1 AND CAST(classid AS TEXT) = '{IDENTITY_NS}' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    );
    // This replica's own identity lock (held by its lock connection) is among them.
    let n: i64 = sqlx::query(&q).fetch_one(db.pool()).await?.try_get("n")?;
    Ok((n - 1).max(0))
}

/// The key of a client id's identity lock: the namespace in the upper half, a stable 32-bit
/// hash (FNV-1a) of the id in the lower half.
pub fn identity_key(client_id: &str) -> i64 {
    let mut h: u32 = 0x811c_9dc5;
    for b in client_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (IDENTITY_NS << 32) | i64::from(h)
}

async fn connect(url: &str) -> Result<PgConnection, FleetError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(FleetError::Connect {
            url: crate::config::mask_password(url),
            source,
        }),
        Err(_) => Err(FleetError::Connect {
            url: crate::config::mask_password(url),
            source: sqlx::Error::PoolTimedOut,
        }),
    }
}

async fn try_lock(conn: &mut PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query("SELECT pg_try_advisory_lock($1) AS ok")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?
        .try_get("ok")
}

/// Keeps the lock connection: checks it, tries to lead, reconnects after a failure.
async fn maintain(
    url: impl Fn() -> String + Send + 'static,
    client_id: String,
    identity: i64,
    conn: PgConnection,
    leader: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut conn = Some(conn);
    let step_down = |why: &str| {
        if *leader.borrow() {
            tracing::warn!(reason = why, "Stepping down as the leader.");
        }
        leader.send_replace(false);
        metrics.set("leader", &[], 0.0);
    };
    loop {
        match conn.as_mut() {
            Some(c) => {
                let leading = *leader.borrow();
                let check = async {
                    if leading {
                        sqlx::query("SELECT 1").execute(&mut *c).await.map(|_| true)
                    } else {
                        try_lock(c, LEADER_KEY).await
                    }
                };
                match tokio::time::timeout(CHECK_TIMEOUT, check).await {
                    Ok(Ok(true)) if !leading => {
                        tracing::info!(client_id = %client_id, "This replica is now the leader (rollout driver, retention, desired-state publisher).");
                        leader.send_replace(true);
                        metrics.set("leader", &[], 1.0);
                        metrics.inc("leader_elections_total", &[], 1);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        step_down("the lock connection failed");
                        tracing::warn!(error = %e, "The replica lock connection failed; reconnecting.");
                        conn = None;
                    }
                    Err(_) => {
                        step_down("the lock connection stopped answering");
                        conn = None;
                    }
                }
            }
            None => match connect(&url()).await {
                Ok(mut c) => match try_lock(&mut c, identity).await {
                    Ok(true) => conn = Some(c),
                    Ok(false) => tracing::error!(client_id = %client_id,
                        "Another replica took this replica's mqtt.client_id while its lock connection was down; retrying."),
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot take the replica identity lock; retrying.")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot reconnect the replica lock connection; retrying.")
                }
            },
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(LOCK_CHECK) => {}
        }
    }
    step_down("the replica is stopping");
    if let Some(c) = conn {
        // Closing the session releases every advisory lock it holds.
        let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
    }
}

/// Runs `task` on this replica only while it leads: started when leadership is gained,
/// cancelled (its token) when it is lost or at `shutdown`, started again when regained.
pub fn spawn_singleton<F, Fut>(
    name: &'static str,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: F,
) -> JoinHandle<()>
where
    F: Fn(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            while !*leader.borrow_and_update() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = leader.changed() => if r.is_err() { return },
                }
            }
            tracing::debug!(task = name, "Starting a singleton task.");
            let token = shutdown.child_token();
            let mut handle = tokio::spawn(task(token.clone()));
            let finished = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break false,
                    _ = &mut handle => break true,
                    r = leader.changed() => {
                        if r.is_err() || !*leader.borrow_and_update() {
                            break false;
                        }
                    }
                }
            };
            token.cancel();
            if !finished
                && tokio::time::timeout(CHECK_TIMEOUT, &mut handle)
                    .await
                    .is_err()
            {
                handle.abort();
            }
            if shutdown.is_cancelled() {
                return;
            }
            if finished {
                // The task ended by itself (it gave up): wait for the next term.
                while *leader.borrow_and_update() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = leader.changed() => if r.is_err() { return },
                    }
                }
            }
            tracing::debug!(
                task = name,
                "Stopped a singleton task (no longer the leader)."
            );
        }
    })
}

/// Takes the exclusive lock of a SQLite database (`<file>.lock` beside it); `None` for an
/// in-memory database.
fn lock_sqlite(url: &str) -> Result<Option<std::fs::File>, FleetError> {
    use fs2::FileExt;
    let Some(path) = crate::db::sqlite_path(url) else {
        return Ok(None);
    };
    let mut lock_path = path.clone().into_os_string();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| FleetError::DataDir {
            path: lock_path.clone(),
            source,
        })?;
    if file.try_lock_exclusive().is_err() {
        return Err(FleetError::Misconfigured(format!(
            "another ember-fleet process is using the SQLite database {} (it holds {}): SQLite \
             supports one fleet process; to run several replicas set database.url = \"postgres://...\" \
             (and models.store to object storage), see docs/scale-out.md",
            path.display(),
            lock_path.display()
        )));
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A singleton task runs while the replica leads, is cancelled when it stops leading,
    /// starts again when it leads again, and ends at shutdown.
    #[tokio::test]
    async fn a_singleton_runs_only_while_leading() {
        let (tx, rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let running = Arc::new(AtomicUsize::new(0));
        let starts = Arc::new(AtomicUsize::new(0));
        let task = {
            let (running, starts) = (running.clone(), starts.clone());
            move |stop: CancellationToken| {
                let (running, starts) = (running.clone(), starts.clone());
                async move {
                    starts.fetch_add(1, Ordering::SeqCst);
                    running.fetch_add(1, Ordering::SeqCst);
                    stop.cancelled().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            }
        };
        let h = spawn_singleton("test", rx, shutdown.clone(), task);
        tokio::task::yield_now().await;
        assert_eq!(starts.load(Ordering::SeqCst), 0, "a follower runs nothing");
        tx.send_replace(true);
        eventually("it starts when leading", || {
            running.load(Ordering::SeqCst) == 1
        })
        .await;
        tx.send_replace(false);
        eventually("it stops when no longer leading", || {
            running.load(Ordering::SeqCst) == 0
        })
        .await;
        tx.send_replace(true);
        eventually("it starts again", || {
            running.load(Ordering::SeqCst) == 1 && starts.load(Ordering::SeqCst) == 2
        })
        .await;
        shutdown.cancel();
        h.await.expect("joins");
        assert_eq!(running.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn identity_keys_are_stable_and_namespaced() {
        let a = identity_key("ember-fleet-0");
        assert_eq!(a, identity_key("ember-fleet-0"));
        assert_ne!(a, identity_key("ember-fleet-1"));
        assert_eq!(a >> 32, IDENTITY_NS);
        assert_ne!(a, LEADER_KEY);
    }
}
