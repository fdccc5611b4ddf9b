//! The model registry: verified, signed bundles the fleet can roll out.
//!
//! Table `models` (migration `0004_models.sql`), one row per (name, version); the bundle bytes
//! live in the blob store under `blob_key`.
//!
//! **Invariant:** a row exists only for a bundle whose signature verified against the fleet's
//! trusted keys when it was uploaded, and whose blob was durably stored before the row was
//! committed. A (name, version) is never overwritten: a new build needs a new version.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::{Db, Sql, get_bool};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A registered model version.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    /// The architecture kind (`activity`, `anomaly`).
    pub kind: String,
    /// `f32` or `int8`.
    pub precision: String,
    /// Lowercase hex sha256 of the whole bundle file.
    pub sha256: String,
    /// Bundle file size in bytes.
    pub size: i64,
    /// Id of the key that signed it.
    pub key_id: String,
    /// Deprecated versions stay downloadable (devices may run them) but cannot start a rollout.
    pub deprecated: bool,
    /// Upload time, microseconds since the epoch.
    pub created_at: i64,
    #[serde(skip)]
    pub blob_key: String,
}

const COLUMNS: &str =
    "name, version, kind, precision, sha256, size, key_id, blob_key, deprecated, created_at";

fn from_row(r: &AnyRow) -> Result<ModelEntry, sqlx::Error> {
    Ok(ModelEntry {
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        kind: r.try_get("kind")?,
        precision: r.try_get("precision")?,
        sha256: r.try_get("sha256")?,
        size: r.try_get("size")?,
        key_id: r.try_get("key_id")?,
        blob_key: r.try_get("blob_key")?,
        deprecated: get_bool(r, "deprecated")?,
        created_at: r.try_get("created_at")?,
    })
}

/// The registered (name, version), if any.
pub async fn lookup(
    db: &Db,
    name: &str,
    version: &str,
) -> Result<Option<ModelEntry>, RegistryError> {
    let mut q = Sql::new(&format!("SELECT {COLUMNS} FROM models WHERE name = "));
    q.bind(name).push(" AND version = ").bind(version);
    Ok(match q.query().fetch_optional(db.pool()).await? {
        Some(r) => Some(from_row(&r)?),
        None => None,
    })
}

/// The API path an agent downloads a version's bundle from.
pub fn download_path(name: &str, version: &str) -> String {
    format!("/api/v1/models/{name}/{version}/bundle")
}
