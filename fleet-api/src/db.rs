//! Storage: one sqlx `Any` pool over SQLite (embedded default) or PostgreSQL (production),
//! chosen by the URL's scheme, and the migrations for each.
//!
//! **Dialect rule.** Every query in this crate is written once, in the subset both engines
//! share: `$N` placeholders (SQLite accepts them), `INSERT ... ON CONFLICT ... DO NOTHING /
//! DO UPDATE SET x = excluded.x`, `RETURNING`, window functions (`LAG`), `CASE` instead of
//! `GREATEST`/`MAX(a, b)`, and explicit `CAST(... AS BIGINT)` around `SUM` of integers
//! (Postgres would return `NUMERIC`, which the `Any` driver cannot decode). Booleans are read
//! with [`get_bool`] because SQLite returns them as integers. Only the schema differs, so each
//! engine has its own migration folder (`migrations/sqlite`, `migrations/postgres`) with the same
//! tables, columns and keys; both are compiled into the binary.
//!
//! **Schema versions and rolling upgrades.** The schema version is the highest migration
//! applied. A build applies the migrations it knows that are missing (`ember-fleet migrate`,
//! or at start), and MUST start against a *newer* schema as long as that schema's
//! `schema_compat.min_reader` is at most [`SCHEMA_VERSION`]: the migrations it does not know
//! are ignored, never an error. A newer schema that older builds cannot read (a migration that
//! raised `min_reader`) refuses the start with [`FleetError::SchemaTooNew`]. PostgreSQL
//! migrations run under sqlx's advisory lock, so replicas and a migration Job starting together
//! apply each migration once.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: ingestion acknowledges a message to the
//! broker only after its batch is committed, so the commit must be on disk, not just in the OS
//! cache. Batching keeps that to one fsync per batch.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, Row};

use crate::config::{Backend, DatabaseSettings};
use crate::error::FleetError;

/// Migrations per backend, compiled in: `(version, description, sql)`.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "inference",
        include_str!("../migrations/sqlite/0002_inference.sql"),
    ),
    (3, "ota", include_str!("../migrations/sqlite/0003_ota.sql")),
    (
        4,
        "models",
        include_str!("../migrations/sqlite/0004_models.sql"),
    ),
    (
        5,
        "commits",
        include_str!("../migrations/sqlite/0005_commits.sql"),
    ),
    (
        6,
        "scale out",
        include_str!("../migrations/sqlite/0006_scale_out.sql"),
    ),
    (
        7,
        "ingest sources",
        include_str!("../migrations/sqlite/0007_ingest_sources.sql"),
    ),
    (
        8,
        "lake",
        include_str!("../migrations/sqlite/0008_lake.sql"),
    ),
    (
        9,
        "monitoring",
        include_str!("../migrations/sqlite/0009_monitoring.sql"),
    ),
    (
        10,
        "captures",
        include_str!("../migrations/sqlite/0010_captures.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "inference",
        include_str!("../migrations/postgres/0002_inference.sql"),
    ),
    (
        3,
        "ota",
        include_str!("../migrations/postgres/0003_ota.sql"),
    ),
    (
        4,
        "models",
        include_str!("../migrations/postgres/0004_models.sql"),
    ),
    (
        5,
        "commits",
        include_str!("../migrations/postgres/0005_commits.sql"),
    ),
    (
        6,
        "scale out",
        include_str!("../migrations/postgres/0006_scale_out.sql"),
    ),
    (
        7,
        "ingest sources",
        include_str!("../migrations/postgres/0007_ingest_sources.sql"),
    ),
    (
        8,
        "lake",
        include_str!("../migrations/postgres/0008_lake.sql"),
    ),
    (
        9,
        "monitoring",
        include_str!("../migrations/postgres/0009_monitoring.sql"),
    ),
    (
        10,
        "captures",
        include_str!("../migrations/postgres/0010_captures.sql"),
    ),
];

/// The schema version of this build: its highest migration (the same for both engines).
pub const SCHEMA_VERSION: i64 = 10;

/// How long a caller waits for a pooled connection before the request fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send + 's>>
    {
        let migrations = self
            .0
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

/// The connection pool and which engine is behind it.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// With `database.token_source`: the URL carrying the current token, for connections the
    /// fleet opens outside the pool ([`Db::connect_url`]).
    signed_url: std::sync::Arc<std::sync::RwLock<Option<String>>>,
    /// `database.url` as configured, for [`Db::own_url`].
    configured_url: std::sync::Arc<str>,
}

impl Db {
    /// Connects (creating the SQLite file and its directory if needed) without migrating.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Db, FleetError> {
        sqlx::any::install_default_drivers();
        let mut url = settings.url.clone();
        if settings.backend == Backend::Sqlite {
            url = prepare_sqlite(&url)?;
        }
        let backend = settings.backend;
        let options = AnyPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers (the API) never block the writer (ingestion).
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                    }
                    Ok(())
                })
            });
        #[cfg(not(feature = "cloud"))]
        if settings.token_source.is_some() {
            // Refused by `Settings::check_build` already, for callers that skip it.
            return Err(FleetError::Token(
                "database.token_source needs ember-fleet built with its `cloud` feature".into(),
            ));
        }
        #[cfg(feature = "cloud")]
        let signer = match settings.token_source {
            Some(crate::config::TokenSource::AzureWorkloadIdentity) => {
                let mut s = EntraSigner::new().map_err(|e| FleetError::Token(e.to_string()))?;
                url = s.url_with_token(&settings.url).await?;
                Some(s)
            }
            None => None,
        };
        let pool = options
            .connect(&url)
            .await
            .map_err(|source| FleetError::Connect {
                url: crate::config::mask_password(&settings.url),
                source,
            })?;
        let signed_url = std::sync::Arc::new(std::sync::RwLock::new(None));
        #[cfg(feature = "cloud")]
        if let Some(s) = signer {
            *signed_url.write().unwrap_or_else(|p| p.into_inner()) = Some(url.clone());
            tokio::spawn(s.renew(pool.clone(), settings.url.clone(), signed_url.clone()));
        }
        Ok(Db {
            pool,
            backend,
            signed_url,
            configured_url: settings.url.as_str().into(),
        })
    }

    /// The URL a connection outside the pool (the replica lock, LISTEN) opens with: the
    /// configured one, or with `database.token_source` the one carrying the current token.
    pub fn connect_url(&self, configured: &str) -> String {
        self.signed_url
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| configured.to_string())
    }

    /// [`Db::connect_url`] of the URL this pool was opened with: for a connection of its own
    /// (the ingest writer's PostgreSQL `COPY` connection).
    pub fn own_url(&self) -> String {
        self.connect_url(&self.configured_url)
    }

    /// Connects and brings the schema up to date (or checks that a newer one is compatible).
    pub async fn open(settings: &DatabaseSettings) -> Result<Db, FleetError> {
        let db = Db::connect(settings).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Applies the migrations this build knows that are missing (idempotent; Postgres takes an
    /// advisory lock, so replicas starting together migrate once). Against a newer schema it
    /// applies nothing and checks that this build may run on it ([`Db::check_compat`]).
    pub async fn migrate(&self) -> Result<Migrated, FleetError> {
        let before = self.schema_version().await?;
        if before > SCHEMA_VERSION {
            self.check_compat(before).await?;
        }
        let source = match self.backend {
            Backend::Sqlite => Embedded(SQLITE_MIGRATIONS),
            Backend::Postgres => Embedded(POSTGRES_MIGRATIONS),
        };
        let mut migrator = Migrator::new(source).await?;
        // Migrations of a newer release are not an error (rolling upgrades).
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        let after = self.schema_version().await?;
        Ok(Migrated {
            before,
            after,
            build: SCHEMA_VERSION,
        })
    }

    /// The highest applied migration (0 on an empty database).
    pub async fn schema_version(&self) -> Result<i64, FleetError> {
        let exists = match self.backend {
            Backend::Sqlite => {
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
            Backend::Postgres => {
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
            }
        };
        let n: i64 = sqlx::query(exists)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        if n == 0 {
            return Ok(0);
        }
        let row = sqlx::query(
            "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) AS v FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("v")?)
    }

    /// Refuses a schema (at version `found`) that this build cannot run on: one whose
    /// `schema_compat.min_reader` is above [`SCHEMA_VERSION`].
    async fn check_compat(&self, found: i64) -> Result<(), FleetError> {
        let min_reader: i64 = sqlx::query("SELECT min_reader FROM schema_compat WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get("min_reader"))
            .transpose()?
            .unwrap_or(found);
        if min_reader > SCHEMA_VERSION {
            return Err(FleetError::SchemaTooNew {
                found,
                min_reader,
                build: SCHEMA_VERSION,
            });
        }
        tracing::info!(
            schema = found,
            build = SCHEMA_VERSION,
            min_reader,
            "The database schema is newer than this build and compatible with it."
        );
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `SELECT 1`, for the health check.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// What [`Db::migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The schema version before.
    pub before: i64,
    /// The schema version after.
    pub after: i64,
    /// This build's schema version ([`SCHEMA_VERSION`]).
    pub build: i64,
}

/// The file of a SQLite URL (`None` for an in-memory database or another engine).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    if path.is_empty() || path == ":memory:" || rest.contains("mode=memory") {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

/// Creates the SQLite file's directory and asks sqlx to create the file (`mode=rwc`).
fn prepare_sqlite(url: &str) -> Result<String, FleetError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if !path.is_empty()
        && path != ":memory:"
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|source| FleetError::DataDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    Ok(match query {
        Some(q) if q.split('&').any(|kv| kv.starts_with("mode=")) => url.to_string(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    })
}

// ---- helpers shared by the query modules ---------------------------------------------------

/// A value bound to a [`Sql`] placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    I64(Option<i64>),
    F64(f64),
    Bool(bool),
    Text(Option<String>),
    Blob(Vec<u8>),
}

impl From<i64> for Param {
    fn from(v: i64) -> Param {
        Param::I64(Some(v))
    }
}
impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Param {
        Param::I64(v)
    }
}
impl From<f64> for Param {
    fn from(v: f64) -> Param {
        Param::F64(v)
    }
}
impl From<bool> for Param {
    fn from(v: bool) -> Param {
        Param::Bool(v)
    }
}
impl From<&str> for Param {
    fn from(v: &str) -> Param {
        Param::Text(Some(v.to_string()))
    }
}
impl From<String> for Param {
    fn from(v: String) -> Param {
        Param::Text(Some(v))
    }
}
impl From<Option<String>> for Param {
    fn from(v: Option<String>) -> Param {
        Param::Text(v)
    }
}
impl From<Vec<u8>> for Param {
    fn from(v: Vec<u8>) -> Param {
        Param::Blob(v)
    }
}

/// A SQL statement assembled at run time with numbered `$N` placeholders.
#[derive(Debug, Default, Clone)]
pub struct Sql {
    pub text: String,
    params: Vec<Param>,
}

impl Sql {
    pub fn new(text: &str) -> Sql {
        Sql {
            text: text.to_string(),
            params: Vec::new(),
        }
    }

    /// Appends SQL text.
    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    /// Binds a value and returns its placeholder (`$N`) without appending it, so a value
    /// used twice is bound once.
    pub fn param(&mut self, value: impl Into<Param>) -> String {
        self.params.push(value.into());
        format!("${}", self.params.len())
    }

    /// Binds a value and appends its placeholder.
    pub fn bind(&mut self, value: impl Into<Param>) -> &mut Self {
        let p = self.param(value);
        self.text.push_str(&p);
        self
    }

    pub fn params_len(&self) -> usize {
        self.params.len()
    }

    /// The statement with its values bound, ready to execute or fetch.
    pub fn query(&self) -> sqlx::query::Query<'_, sqlx::Any, AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for p in &self.params {
            q = match p {
                Param::I64(v) => q.bind(*v),
                Param::F64(v) => q.bind(*v),
                Param::Bool(v) => q.bind(*v),
                Param::Text(v) => q.bind(v.as_deref()),
                Param::Blob(v) => q.bind(v.as_slice()),
            };
        }
        q
    }
}

/// Reads a boolean column from either engine (SQLite returns integers).
pub fn get_bool(row: &AnyRow, col: &str) -> Result<bool, sqlx::Error> {
    match row.try_get::<bool, _>(col) {
        Ok(b) => Ok(b),
        Err(_) => row.try_get::<i64, _>(col).map(|i| i != 0),
    }
}

/// Microseconds since the Unix epoch, now (the fleet's clock).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs `f`, recording its latency in `db_seconds{op}` and failures in `db_errors_total{op}`.
pub async fn timed<T, F>(
    metrics: &crate::metrics::Metrics,
    op: &str,
    f: F,
) -> Result<T, sqlx::Error>
where
    F: Future<Output = Result<T, sqlx::Error>>,
{
    let t0 = Instant::now();
    let r = f.await;
    metrics.observe("db_seconds", &[("op", op)], t0.elapsed().as_secs_f64());
    if r.is_err() {
        metrics.inc("db_errors_total", &[("op", op)], 1);
    }
    r
}

/// Signs in to PostgreSQL with Entra ID tokens (`database.token_source =
/// "azure-workload-identity"`, [`crate::cloud::azure`]): the token is the password of new
/// connections; PostgreSQL checks it only when a connection opens, so open connections
/// outlive it. A task renews it at 80 % of its lifetime and gives the pool the new URL, until
/// the pool closes; a failed renewal is retried every 30 s while the old token still holds.
#[cfg(feature = "cloud")]
struct EntraSigner {
    identity: crate::cloud::azure::WorkloadIdentity,
    http: reqwest::Client,
    expires_in: std::time::Duration,
}

#[cfg(feature = "cloud")]
impl EntraSigner {
    fn new() -> Result<EntraSigner, crate::cloud::azure::EntraError> {
        // reqwest finds the process-wide rustls provider; install ring (what the rest of the
        // fleet uses) unless someone installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().build().map_err(|e| {
            crate::cloud::azure::EntraError::Http {
                url: "(client)".into(),
                detail: e.to_string(),
            }
        })?;
        Ok(EntraSigner {
            identity: crate::cloud::azure::WorkloadIdentity::from_env()?,
            http,
            expires_in: std::time::Duration::ZERO,
        })
    }

    async fn url_with_token(&mut self, url: &str) -> Result<String, FleetError> {
        let t = self
            .identity
            .token(&self.http, crate::cloud::azure::POSTGRES_SCOPE)
            .await
            .map_err(|e| FleetError::Token(e.to_string()))?;
        self.expires_in = t.expires_in;
        Ok(crate::cloud::azure::with_password(url, &t.token))
    }

    async fn renew(
        mut self,
        pool: AnyPool,
        url: String,
        signed_url: std::sync::Arc<std::sync::RwLock<Option<String>>>,
    ) {
        const RETRY: std::time::Duration = std::time::Duration::from_secs(30);
        let mut wait = self.expires_in.mul_f64(0.8).max(RETRY);
        loop {
            tokio::time::sleep(wait).await;
            if pool.is_closed() {
                return;
            }
            match self.url_with_token(&url).await {
                Ok(signed) => match signed.parse::<sqlx::any::AnyConnectOptions>() {
                    Ok(o) => {
                        pool.set_connect_options(o);
                        *signed_url.write().unwrap_or_else(|p| p.into_inner()) = Some(signed);
                        tracing::info!(
                            valid_s = self.expires_in.as_secs(),
                            "Renewed the Entra ID token for PostgreSQL."
                        );
                        wait = self.expires_in.mul_f64(0.8).max(RETRY);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "The database URL with the new token does not parse; keeping the old token.");
                        wait = RETRY;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, retry_s = RETRY.as_secs(), "Cannot renew the Entra ID token for PostgreSQL; new connections use the old one until it expires.");
                    wait = RETRY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/fleet.db");
        let url = format!("sqlite://{}", p.display());
        assert_eq!(prepare_sqlite(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(dir.path().join("a/b").is_dir());
        let ro = format!("{url}?mode=ro");
        assert_eq!(prepare_sqlite(&ro).unwrap(), ro);
    }
}
