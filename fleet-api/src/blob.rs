//! Where the fleet keeps blobs: model bundles (`ota::registry`) and the data lake's Parquet
//! files (`server::lake`). A local directory (`FsStore`: a temporary file with a unique name,
//! fsynced, hard-linked into place create-only, the directory fsynced) or an object store
//! (`ObjStore`: S3, GCS or Azure Blob through `object_store`, one PUT per object, credentials
//! from the provider's environment variables or instance metadata, never from the config).
//! Keys are `/`-separated relative paths; a key with an empty, `.` or `..` segment is refused.

use std::path::{Path, PathBuf};
#[cfg(feature = "cloud")]
use std::sync::Arc;

#[cfg(feature = "cloud")]
use object_store::{ObjectStore, PutOptions, PutPayload};

/// Why a blob operation failed (the text names the object and never carries credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BlobError(pub String);

/// Where bundle bytes live.
pub enum BlobStore {
    Fs(FsStore),
    /// Only in builds with the `cloud` feature (the default).
    #[cfg(feature = "cloud")]
    Object(ObjStore),
}

impl BlobStore {
    /// Stores `bytes` under `key` durably (replacing a leftover without a row).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BlobError> {
        match self {
            BlobStore::Fs(fs) => {
                let path = fs.path(key)?;
                tokio::task::spawn_blocking(move || write_durably(&path, &bytes))
                    .await
                    .map_err(|e| BlobError(e.to_string()))?
            }
            #[cfg(feature = "cloud")]
            BlobStore::Object(o) => {
                let path = o.path(key)?;
                o.store
                    .put_opts(&path, PutPayload::from(bytes), PutOptions::default())
                    .await
                    .map_err(|e| o.err("write", &path, e))?;
                Ok(())
            }
        }
    }

    /// Removes the blob `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self {
            BlobStore::Fs(fs) => {
                let path = fs.path(key)?;
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(store_err("remove", &path, e)),
                }
            }
            #[cfg(feature = "cloud")]
            BlobStore::Object(o) => {
                use futures_util::StreamExt;
                let path = o.path(key)?;
                // `delete_stream` (the trait's boxed, Send stream) with one location.
                let one = futures_util::stream::once(std::future::ready(Ok(path.clone()))).boxed();
                match o.store.delete_stream(one).next().await {
                    None | Some(Ok(_)) | Some(Err(object_store::Error::NotFound { .. })) => Ok(()),
                    Some(Err(e)) => Err(o.err("delete", &path, e)),
                }
            }
        }
    }

    /// Bytes `[start, end)` of the blob `key`.
    pub async fn read_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, BlobError> {
        match self {
            BlobStore::Fs(fs) => {
                let path = fs.path(key)?;
                tokio::task::spawn_blocking(move || read_range(&path, start, end))
                    .await
                    .map_err(|e| BlobError(e.to_string()))?
            }
            #[cfg(feature = "cloud")]
            BlobStore::Object(o) => {
                let path = o.path(key)?;
                if start >= end {
                    return Ok(Vec::new());
                }
                // `get_ranges` (the trait's boxed, Send future) with one range: a ranged GET.
                let bytes: Vec<u8> = o
                    .store
                    .get_ranges(&path, std::slice::from_ref(&(start..end)))
                    .await
                    .map_err(|e| o.err("read", &path, e))?
                    .concat();
                if bytes.len() as u64 != end - start {
                    return Err(BlobError(format!(
                        "{}/{path} is shorter than its registry row says",
                        o.display
                    )));
                }
                Ok(bytes)
            }
        }
    }
}

/// Objects in a bucket (S3, GCS) or container (Azure) under a prefix.
#[cfg(feature = "cloud")]
pub struct ObjStore {
    store: Arc<dyn ObjectStore>,
    prefix: object_store::path::Path,
    /// `scheme://bucket` (for messages; the URL never carries credentials).
    display: String,
}

#[cfg(feature = "cloud")]
impl ObjStore {
    /// `scheme://bucket`, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Builds the client for `url` from the provider's environment variables, then `options`
    /// (lowercase builder keys such as `aws_endpoint_url`).
    pub fn open(url: &str, options: &[(String, String)]) -> Result<ObjStore, BlobError> {
        use object_store::aws::AmazonS3Builder;
        use object_store::azure::MicrosoftAzureBuilder;
        use object_store::gcp::GoogleCloudStorageBuilder;

        // reqwest finds the process-wide rustls provider; install ring (what the rest of the
        // fleet uses) unless someone installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bad = |e: &dyn std::fmt::Display| BlobError(format!("{url}: {e}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad(&"not an object-storage URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let base = format!("{scheme}://{bucket}");
        // Each provider's builder takes the same `(key, value)` options, parsed into its own
        // config-key type.
        fn configure<B, K: std::str::FromStr>(
            mut builder: B,
            options: &[(String, String)],
            set: fn(B, K, String) -> B,
            bad: &dyn Fn(&dyn std::fmt::Display) -> BlobError,
        ) -> Result<B, BlobError> {
            for (k, v) in options {
                let key = k
                    .to_ascii_lowercase()
                    .parse()
                    .map_err(|_| bad(&format!("unknown store option {k:?}")))?;
                builder = set(builder, key, v.clone());
            }
            Ok(builder)
        }
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" => {
                let b = AmazonS3Builder::from_env().with_url(&base);
                let b = configure(b, options, |b, k, v| b.with_config(k, v), &bad)?;
                Arc::new(b.build().map_err(|e| bad(&e))?)
            }
            "gs" => {
                let b = GoogleCloudStorageBuilder::from_env().with_url(&base);
                let b = configure(b, options, |b, k, v| b.with_config(k, v), &bad)?;
                Arc::new(b.build().map_err(|e| bad(&e))?)
            }
            "az" => {
                let b = MicrosoftAzureBuilder::from_env().with_url(&base);
                let b = configure(b, options, |b, k, v| b.with_config(k, v), &bad)?;
                Arc::new(b.build().map_err(|e| bad(&e))?)
            }
            other => return Err(bad(&format!("unsupported scheme {other:?}"))),
        };
        Ok(ObjStore {
            store,
            prefix: object_store::path::Path::from(prefix),
            display: base,
        })
    }

    fn path(&self, key: &str) -> Result<object_store::path::Path, BlobError> {
        check_key(key)?;
        Ok(key
            .split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part)))
    }

    /// Names the object and the failure (the error's text never carries credentials).
    fn err(
        &self,
        what: &str,
        path: &object_store::path::Path,
        e: object_store::Error,
    ) -> BlobError {
        BlobError(format!("cannot {what} {}/{path}: {e}", self.display))
    }
}

/// Keys are `<name>/<version>.bundle` with checked name and version; refuse anything that
/// could leave the root or prefix anyway.
fn check_key(key: &str) -> Result<(), BlobError> {
    if key
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
        || key.starts_with('/')
    {
        return Err(BlobError(format!("invalid blob key {key:?}")));
    }
    Ok(())
}

/// Files under a root directory.
pub struct FsStore {
    pub(crate) root: PathBuf,
}

impl FsStore {
    /// Files under `root` (created on the first write).
    pub fn new(root: PathBuf) -> FsStore {
        FsStore { root }
    }
}

impl FsStore {
    fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

pub(crate) fn store_err(what: &str, path: &Path, e: std::io::Error) -> BlobError {
    BlobError(format!("cannot {what} {}: {e}", path.display()))
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
    let dir = path
        .parent()
        .ok_or_else(|| BlobError(format!("{} has no directory", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| store_err("create", dir, e))?;
    write_create_only(path, bytes)
}

/// Writes `bytes` to `path` only if `path` does not exist yet, durably: a temporary file with
/// a unique name (several replicas may write into one shared directory), fsynced, then
/// hard-linked to `path` (atomic and create-only), the temporary name removed, the directory
/// fsynced. An existing `path` is left alone (keys are content-addressed: it holds the same
/// bytes).
pub(crate) fn write_create_only(path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| BlobError(format!("{} has no directory", path.display())))?;
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| BlobError(e.to_string()))?;
    let unique: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{unique}.tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| store_err("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| store_err("write", &tmp, e))?;
        f.sync_all().map_err(|e| store_err("sync", &tmp, e))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(store_err("link", path, e)),
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| store_err("sync", dir, e))
}

fn read_range(path: &Path, start: u64, end: u64) -> Result<Vec<u8>, BlobError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| store_err("open", path, e))?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| store_err("seek in", path, e))?;
    let len = end.saturating_sub(start);
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(len)
        .read_to_end(&mut out)
        .map_err(|e| store_err("read", path, e))?;
    if out.len() as u64 != len {
        return Err(BlobError(format!(
            "{} is shorter than its registry row says",
            path.display()
        )));
    }
    Ok(out)
}
