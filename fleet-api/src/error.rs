//! The library's error type.

use std::path::PathBuf;

/// Everything that can stop the fleet service or one of its commands.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "cannot create the data directory {path}: {source} (check its permissions or set data_dir)"
    )]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the database {url}: {source} (check database.url and that the server runs)"
    )]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot sign in to the database: {0}")]
    Token(String),
    #[error("cannot migrate the database: {0} (was it written by a newer ember-fleet?)")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? set http.listen)"
    )]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot generate a random token: {0}")]
    Random(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("a task failed: {0}")]
    Task(String),
    #[error("cannot open the model store (models.store): {0}")]
    ModelStore(String),
    #[error(
        "the database schema (version {found}) needs ember-fleet with schema version {min_reader} or later; this build has {build}: upgrade this replica (a newer release migrated the database in a way older ones cannot read)"
    )]
    SchemaTooNew {
        found: i64,
        min_reader: i64,
        build: i64,
    },
    /// A deployment this service refuses to run in, with what to change.
    #[error("{0}")]
    Misconfigured(String),
}
