//! The model registry: verified, signed bundles the fleet can roll out.
//!
//! Table `models` (migration `0004_models.sql`), one row per (name, version); the bundle bytes
//! live in the blob store under `blob_key`.
//!
//! **Blob store.** Blob keys are content-addressed: `<name>/<version>/<sha256>.bundle` (rows
//! written before issue 16 name `<name>/<version>.bundle`, still served). Two uploads of one
//! version with different bytes therefore never write the same object, and whichever row wins
//! the insert names its own object: the row's sha256 and the bytes served can never disagree,
//! whatever the replicas race. Writing one key twice writes the same bytes.
//!
//! `models.store = "fs"` (the default): a bundle is a file under `<data_dir>/models/`. An
//! upload writes a temporary file with a unique name in the target directory, fsyncs it, links
//! it to its final name only if that name is free (create-only: `link(2)`), removes the
//! temporary name and fsyncs the directory, and only then commits the row. A crash between the
//! two leaves a file without a row (harmless, the next upload of the same bytes reuses it); a
//! row never points at a missing or partial file. With several replicas the directory MUST be
//! one shared volume: the first replica writes a random id into `<data_dir>/models/.store-id`
//! and records it in the database (`fleet_facts`, `models.fs_store`); a replica whose
//! directory holds another id (its own local disk) refuses to start ([`Registry::open`]).
//!
//! `models.store = "s3://bucket/prefix"` (or `gs://`, `az://`): a bundle is the object
//! `<prefix>/<key>`, written with one PUT (atomic in object stores: readers
//! see the old object or the whole new one) that MUST succeed before the row is committed;
//! downloads are ranged GETs. Credentials, region and endpoint come from the provider's
//! standard environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`, including
//! `AWS_ENDPOINT_URL`/`AWS_ALLOW_HTTP` for S3-compatible servers) or instance metadata; they
//! are never read from the config file and never logged. TLS uses rustls with the ring
//! provider, like the rest of the fleet.
//!
//! **Upload.** [`Registry::upload`] parses the container (`ember_bundle::RawBundle`), checks
//! the manifest head and verifies the signature against `models.trusted_keys` and the weights
//! against the manifest's sha256. Uploads are serialized within the process (one writer per
//! (name, version) file).
//!
//! **Invariant:** a row exists only for a bundle whose signature verified against the fleet's
//! trusted keys when it was uploaded, and whose blob was durably stored before the row was
//! committed. A (name, version) is never overwritten: a new build needs a new version.

use std::path::Path;

use ember_bundle::{BundleError, RawBundle, TrustedKeys, Version};
use sqlx::Row;
use sqlx::any::AnyRow;

#[cfg(feature = "cloud")]
use crate::blob::ObjStore;
use crate::blob::{BlobError, BlobStore, FsStore, store_err, write_create_only};
use crate::config::{ModelSettings, ModelStore};
use crate::db::{Db, Sql, get_bool, now_us};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The upload is not a valid bundle, or not one signed by a trusted key.
    #[error("{0}")]
    Bundle(BundleError),
    /// The upload is valid but no key is trusted at all.
    #[error(
        "{0} (this fleet trusts no signing key yet: add public key files to models.trusted_keys)"
    )]
    NoTrustedKeys(BundleError),
    #[error(
        "model {name} version {version} is already registered (sha256 {sha256}); a version is never replaced: upload the new build as a new version"
    )]
    Duplicate {
        name: String,
        version: String,
        sha256: String,
    },
    #[error("blob store: {0}")]
    Store(String),
    /// A deployment the registry refuses (several replicas on different `fs` directories).
    #[error("{0}")]
    Misconfigured(String),
}

/// The `fleet_facts` row naming the volume of an `fs` store.
const FS_STORE_FACT: &str = "models.fs_store";
/// The file in an `fs` store's root that names its volume.
const STORE_ID_FILE: &str = ".store-id";

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

/// Sorts entries by name, then by semantic-version precedence (oldest first).
pub fn sort_entries(entries: &mut [ModelEntry]) {
    entries.sort_by_cached_key(|e| {
        (
            e.name.clone(),
            Version::parse(&e.version).ok(),
            e.version.clone(),
        )
    });
}

/// Every registered version, sorted by name and semantic version.
pub async fn list(db: &Db) -> Result<Vec<ModelEntry>, RegistryError> {
    let rows = Sql::new(&format!("SELECT {COLUMNS} FROM models"))
        .query()
        .fetch_all(db.pool())
        .await?;
    let mut out = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    sort_entries(&mut out);
    Ok(out)
}

/// The versions of one model, sorted by semantic version (empty if the name is unknown).
pub async fn versions(db: &Db, name: &str) -> Result<Vec<ModelEntry>, RegistryError> {
    let mut q = Sql::new(&format!("SELECT {COLUMNS} FROM models WHERE name = "));
    q.bind(name);
    let rows = q.query().fetch_all(db.pool()).await?;
    let mut out = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    sort_entries(&mut out);
    Ok(out)
}

/// The manifest JSON of a version, exactly as signed.
pub async fn manifest(db: &Db, name: &str, version: &str) -> Result<Option<String>, RegistryError> {
    let mut q = Sql::new("SELECT manifest FROM models WHERE name = ");
    q.bind(name).push(" AND version = ").bind(version);
    Ok(match q.query().fetch_optional(db.pool()).await? {
        Some(r) => Some(r.try_get("manifest")?),
        None => None,
    })
}

/// Sets or clears the deprecated flag; `None` if there is no such version.
pub async fn set_deprecated(
    db: &Db,
    name: &str,
    version: &str,
    deprecated: bool,
) -> Result<Option<ModelEntry>, RegistryError> {
    let mut q = Sql::new("UPDATE models SET deprecated = ");
    q.bind(deprecated)
        .push(" WHERE name = ")
        .bind(name)
        .push(" AND version = ")
        .bind(version);
    if q.query().execute(db.pool()).await?.rows_affected() == 0 {
        return Ok(None);
    }
    lookup(db, name, version).await
}

/// Whether `device` may download `name`/`version`: it has that version as its desired
/// assignment (`desired_models`, written by the rollout engine, including a rollback's
/// `Revert`).
pub async fn device_may_download(
    db: &Db,
    device: &str,
    name: &str,
    version: &str,
) -> Result<bool, RegistryError> {
    let mut q = Sql::new("SELECT 1 AS one FROM desired_models WHERE device_id = ");
    q.bind(device)
        .push(" AND model = ")
        .bind(name)
        .push(" AND version = ")
        .bind(version);
    Ok(q.query().fetch_optional(db.pool()).await?.is_some())
}

/// The registry: the database, the blob store and the trusted keys.
pub struct Registry {
    db: Db,
    store: BlobStore,
    keys: TrustedKeys,
    /// Serializes uploads (check, blob write, row insert).
    upload: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the configured blob store: an object store is first reached by the first upload
    /// or download; an `fs` store is checked to be the volume every other replica on this
    /// database uses ([`RegistryError::Misconfigured`] otherwise).
    pub async fn open(
        db: Db,
        data_dir: &Path,
        settings: &ModelSettings,
    ) -> Result<Registry, RegistryError> {
        let registry = Registry::new(db, data_dir, settings)?;
        // SQLite runs one process (server::cluster): nobody else can use another directory.
        if let BlobStore::Fs(fs) = &registry.store
            && registry.db.backend() == crate::config::Backend::Postgres
        {
            let root = fs.root.clone();
            let local = tokio::task::spawn_blocking(move || fs_store_id(&root))
                .await
                .map_err(|e| RegistryError::Store(e.to_string()))??;
            let mut q = Sql::new("INSERT INTO fleet_facts (name, value) VALUES (");
            q.bind(FS_STORE_FACT).push(", ").bind(local.as_str());
            q.push(") ON CONFLICT (name) DO NOTHING");
            q.query().execute(registry.db.pool()).await?;
            let mut q = Sql::new("SELECT value FROM fleet_facts WHERE name = ");
            q.bind(FS_STORE_FACT);
            let recorded: String = q
                .query()
                .fetch_one(registry.db.pool())
                .await?
                .try_get("value")?;
            if recorded != local {
                return Err(RegistryError::Misconfigured(format!(
                    "models.store = \"fs\": {} is not the model store the other replicas of this database use \
                     (its {STORE_ID_FILE} says {local}, the database says {recorded}); a replica's local disk cannot \
                     serve the bundles another replica stored: set models.store to object storage \
                     (\"s3://bucket/prefix\", \"gs://...\", \"az://...\") or mount one shared volume at every replica's \
                     <data_dir>/models (moving the directory? keep its {STORE_ID_FILE})",
                    fs.root.display()
                )));
            }
        }
        Ok(registry)
    }

    /// Opens the configured blob store without checking it against the database (no I/O).
    pub fn new(
        db: Db,
        data_dir: &Path,
        settings: &ModelSettings,
    ) -> Result<Registry, RegistryError> {
        let store = match &settings.store {
            ModelStore::Fs => BlobStore::Fs(FsStore::new(data_dir.join("models"))),
            #[cfg(feature = "cloud")]
            ModelStore::Object { url } => {
                let store = ObjStore::open(url, &settings.store_options)?;
                tracing::info!(store = %store.display(), "Model bundles go to object storage.");
                BlobStore::Object(store)
            }
            // Refused by `Settings::check_build` already, for callers that skip it.
            #[cfg(not(feature = "cloud"))]
            ModelStore::Object { url } => {
                return Err(BlobError(format!(
                    "models.store = {url:?} needs ember-fleet built with its `cloud` feature"
                ))
                .into());
            }
        };
        Ok(Registry {
            db,
            store,
            keys: settings.keys.clone(),
            upload: tokio::sync::Mutex::new(()),
        })
    }

    /// Verifies and stores an uploaded bundle; returns its entry. Refuses invalid, unsigned,
    /// untrusted or tampered bundles ([`RegistryError::Bundle`]) and a (name, version) that is
    /// already registered ([`RegistryError::Duplicate`]).
    pub async fn upload(&self, bytes: Vec<u8>) -> Result<ModelEntry, RegistryError> {
        let raw = RawBundle::read(&bytes).map_err(RegistryError::Bundle)?;
        let head = raw.verify(&self.keys).map_err(|e| match e {
            e @ BundleError::UntrustedKey { .. } if self.keys.is_empty() => {
                RegistryError::NoTrustedKeys(e)
            }
            e => RegistryError::Bundle(e),
        })?;
        let key_id = raw
            .signature()
            .map(|s| s.key_id.to_string())
            .unwrap_or_default();
        let sha256 = ember_bundle::hex::sha256(&bytes);
        let _guard = self.upload.lock().await;
        if let Some(existing) = lookup(&self.db, &head.name, &head.version).await? {
            return Err(RegistryError::Duplicate {
                name: head.name,
                version: head.version,
                sha256: existing.sha256,
            });
        }
        let blob_key = blob_key(&head.name, &head.version, &sha256);
        let size = i64::try_from(bytes.len())
            .map_err(|_| RegistryError::Store("bundle too large".into()))?;
        self.store.put(&blob_key, bytes).await?;
        let entry = ModelEntry {
            name: head.name,
            version: head.version,
            kind: head.architecture.kind,
            precision: head.precision,
            sha256,
            size,
            key_id,
            deprecated: false,
            created_at: now_us(),
            blob_key,
        };
        let manifest = String::from_utf8_lossy(raw.manifest_bytes()).into_owned();
        let mut q = Sql::new(
            "INSERT INTO models (name, version, kind, precision, sha256, size, key_id, manifest, blob_key, deprecated, created_at) VALUES (",
        );
        q.bind(entry.name.as_str())
            .push(", ")
            .bind(entry.version.as_str())
            .push(", ")
            .bind(entry.kind.as_str())
            .push(", ")
            .bind(entry.precision.as_str())
            .push(", ")
            .bind(entry.sha256.as_str())
            .push(", ")
            .bind(entry.size)
            .push(", ")
            .bind(entry.key_id.as_str())
            .push(", ")
            .bind(manifest)
            .push(", ")
            .bind(entry.blob_key.as_str())
            .push(", ")
            .bind(false)
            .push(", ")
            .bind(entry.created_at)
            .push(")");
        match q.query().execute(self.db.pool()).await {
            Ok(_) => {}
            // Another replica registered it meanwhile (its blob write raced ours: both were
            // verified bundles of this name and version; the row names the winner's sha256).
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let winner = lookup(&self.db, &entry.name, &entry.version).await?;
                if winner
                    .as_ref()
                    .is_some_and(|w| w.blob_key != entry.blob_key)
                    && let Err(e) = self.store.delete(&entry.blob_key).await
                {
                    tracing::warn!(error = %e, key = %entry.blob_key,
                        "Could not remove the object of an upload that lost the race for its version (unreferenced, harmless).");
                }
                let sha256 = winner.map(|e| e.sha256).unwrap_or_default();
                return Err(RegistryError::Duplicate {
                    name: entry.name,
                    version: entry.version,
                    sha256,
                });
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(model = %entry.name, version = %entry.version, size = entry.size,
            key_id = %entry.key_id, "Registered a model bundle.");
        Ok(entry)
    }

    /// Bytes `[start, end)` of a version's bundle.
    pub async fn read(
        &self,
        entry: &ModelEntry,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        Ok(self.store.read_range(&entry.blob_key, start, end).await?)
    }
}

/// The content-addressed key of a bundle: `<name>/<version>/<sha256>.bundle`.
pub fn blob_key(name: &str, version: &str, sha256: &str) -> String {
    format!("{name}/{version}/{sha256}.bundle")
}

/// The id of the volume an `fs` store lives on: read from `<root>/.store-id`, or created
/// there (create-only, so replicas starting together on one shared volume agree).
fn fs_store_id(root: &Path) -> Result<String, RegistryError> {
    let path = root.join(STORE_ID_FILE);
    let read = |path: &Path| -> Result<Option<String>, RegistryError> {
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            Ok(_) => Err(RegistryError::Store(format!("{} is empty", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_err("read", path, e).into()),
        }
    };
    if let Some(id) = read(&path)? {
        return Ok(id);
    }
    std::fs::create_dir_all(root).map_err(|e| store_err("create", root, e))?;
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| RegistryError::Store(e.to_string()))?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    write_create_only(&path, format!("{id}\n").as_bytes())?;
    // Whoever created it first decides.
    read(&path)?.ok_or_else(|| RegistryError::Store(format!("{} vanished", path.display())))
}

impl From<BlobError> for RegistryError {
    fn from(e: BlobError) -> RegistryError {
        RegistryError::Store(e.0)
    }
}
