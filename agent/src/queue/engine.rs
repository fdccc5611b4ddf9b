//! The storage engine behind the queue: a narrow ordered key-value trait and its sled
//! implementation.
//!
//! The queue only needs atomic batches of puts and deletes, ordered range scans, and two
//! durability levels (`flush`: survive a process crash; `sync`: survive power loss). Anything
//! that offers those (redb, a hand-written log) could replace sled without touching the queue:
//! `Queue<E: Engine>` is generic over it, and `Queue::<E>::open_engine` opens one.

use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::QueueError;

/// A key-value pair as stored.
pub type Entry = (Vec<u8>, Vec<u8>);

/// What [`Engine::for_each`] calls with each key and value; an error stops the walk.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), QueueError> + 'a;

/// What the queue needs from a storage engine.
pub trait Engine: Send + Sync + Sized {
    /// Opens (or creates) a database in the directory `path`, with about `cache_bytes` of
    /// cache and, when `background_flush_ms` is set, a background flush at that interval.
    /// A database that is damaged MUST be reported as [`QueueError::Open`] (the queue moves it
    /// aside and starts empty); an I/O error MUST NOT be (a full disk is not corruption), nor a
    /// database locked by another process ([`QueueError::Locked`]).
    fn open(
        path: &Path,
        cache_bytes: u64,
        background_flush_ms: Option<u64>,
    ) -> Result<Self, QueueError>;
    /// Visits every entry in ascending key order (recovery at open, compaction).
    fn for_each(&self, visit: &mut Visit<'_>) -> Result<(), QueueError>;
    /// Applies all puts and deletes atomically: after a crash either all or none are visible.
    fn apply(&self, puts: Vec<Entry>, deletes: Vec<Vec<u8>>) -> Result<(), QueueError>;
    /// The value stored under `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, QueueError>;
    /// Up to `limit` entries with `from <= key <= to`, ascending.
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Entry>, QueueError>;
    /// Deletes each of `keys` that exists (not atomically as a group); returns how many existed
    /// and their total size. Cheaper than a range scan for a handful of keys.
    fn remove_keys(&self, keys: &[&[u8]]) -> Result<(u64, u64), QueueError>;
    /// Deletes every entry with `from <= key <= to` in one atomic batch; returns how many
    /// entries were deleted and their total size (key + value bytes).
    fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<(u64, u64), QueueError>;
    /// Hands buffered writes to the OS: survives a process crash, not a power loss.
    fn flush(&self) -> Result<(), QueueError>;
    /// Makes every applied batch durable across power loss.
    fn sync(&self) -> Result<(), QueueError>;
}

/// sled 0.34 as the engine.
///
/// Two sled traps are handled here, both measured on this project's machines:
/// * `Db::flush` ends in `sync_file_range`, which does not persist file metadata and is not a
///   durability barrier (sled issue #1452; only sled's background thread calls `fsync`, every
///   500 ms). [`SledEngine::sync`] therefore also calls `fsync` on sled's data file itself.
/// * sled never shrinks its file after deletes; the queue reclaims space by compacting into a
///   fresh database (see `Queue::maintain` and `Queue::compact`).
pub struct SledEngine {
    db: sled::Db,
    data_file: File,
    path: PathBuf,
}

impl SledEngine {
    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `catch_unwind` without the default hook's "thread ... panicked" line for a panic on this
/// thread: sled panics on some damaged files, the queue handles that (it moves the database
/// aside and says so), and a panic message in the log would read as a crash. Panics on other
/// threads meanwhile are reported as usual.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    type Hook = dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync;
    let previous: std::sync::Arc<Hook> = std::sync::Arc::from(std::panic::take_hook());
    let here = std::thread::current().id();
    let others = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != here {
            others(info);
        }
    }));
    let result = catch_unwind(AssertUnwindSafe(f));
    drop(std::panic::take_hook());
    std::panic::set_hook(Box::new(move |info| previous(info)));
    result
}

fn sled_err(e: sled::Error) -> QueueError {
    QueueError::Engine(e.to_string())
}

impl Engine for SledEngine {
    /// sled panics on some kinds of corruption instead
    /// of returning an error; such a panic is caught and reported as [`QueueError::Open`].
    fn open(
        path: &Path,
        cache_bytes: u64,
        background_flush_ms: Option<u64>,
    ) -> Result<Self, QueueError> {
        let open_err = |detail: String| QueueError::Open {
            path: path.to_path_buf(),
            detail,
        };
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(background_flush_ms)
            .mode(sled::Mode::LowSpace);
        // The previous instance's file lock can outlive its Drop by a moment (sled's threads).
        let mut attempt = 0;
        let db = loop {
            let cfg = config.clone();
            match catch_quietly(move || cfg.open()) {
                Ok(Ok(db)) => break db,
                Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                    if attempt >= 50 {
                        return Err(QueueError::Locked {
                            path: path.to_path_buf(),
                        });
                    }
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                // An I/O error (disk full, permissions) says nothing about the data: never treat
                // it as corruption, or a full disk would make the agent throw its queue away.
                Ok(Err(sled::Error::Io(e))) => {
                    return Err(QueueError::Io {
                        what: format!("opening the queue database at {}", path.display()),
                        source: e,
                    });
                }
                Ok(Err(e)) => return Err(open_err(e.to_string())),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "no reason given".into());
                    // Worded without "panicked": the agent did not crash, and operators grep for it.
                    return Err(open_err(format!(
                        "sled aborted reading the damaged database: {msg}"
                    )));
                }
            }
        };
        let data_file = File::open(path.join("db"))
            .map_err(|e| open_err(format!("cannot open sled's data file: {e}")))?;
        Ok(SledEngine {
            db,
            data_file,
            path: path.to_path_buf(),
        })
    }

    fn for_each(&self, visit: &mut Visit<'_>) -> Result<(), QueueError> {
        for item in self.db.iter() {
            let (k, v) = item.map_err(sled_err)?;
            visit(&k, &v)?;
        }
        Ok(())
    }

    fn apply(&self, puts: Vec<Entry>, deletes: Vec<Vec<u8>>) -> Result<(), QueueError> {
        let mut batch = sled::Batch::default();
        for k in deletes {
            batch.remove(k);
        }
        for (k, v) in puts {
            batch.insert(k, v);
        }
        self.db.apply_batch(batch).map_err(sled_err)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.db.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Entry>, QueueError> {
        let mut out = Vec::new();
        for item in self.db.range(from..=to).take(limit) {
            let (k, v) = item.map_err(sled_err)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn remove_keys(&self, keys: &[&[u8]]) -> Result<(u64, u64), QueueError> {
        let (mut n, mut bytes) = (0u64, 0u64);
        for k in keys {
            if let Some(v) = self.db.remove(k).map_err(sled_err)? {
                n += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        Ok((n, bytes))
    }

    fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<(u64, u64), QueueError> {
        let mut batch = sled::Batch::default();
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in self.db.range(from..=to) {
            let (k, v) = item.map_err(sled_err)?;
            n += 1;
            bytes += (k.len() + v.len()) as u64;
            batch.remove(k);
        }
        if n > 0 {
            self.db.apply_batch(batch).map_err(sled_err)?;
        }
        Ok((n, bytes))
    }

    fn flush(&self) -> Result<(), QueueError> {
        self.db.flush().map(|_| ()).map_err(sled_err)
    }

    fn sync(&self) -> Result<(), QueueError> {
        self.db.flush().map_err(sled_err)?;
        self.data_file.sync_all().map_err(|e| QueueError::Io {
            what: "fsync of the queue's data file".into(),
            source: e,
        })
    }
}
