//! Durable file replace: the one implementation of "write a temp file, fsync it, rename it over
//! the target, fsync the directory" that every state file in Ember uses (queue marks, OTA
//! slots and downloads, the registry's blobs, PKI files, device keys).
//!
//! Guarantees (POSIX rename semantics, on a file system that honours fsync):
//! - A reader, or the process after a crash or power cut, sees either the complete old content
//!   or the complete new content at the target path, never a mix, a truncated file or no file
//!   (when there was one before).
//! - When a function returns `Ok`, the new content and the directory entry are on stable
//!   storage.
//! - With [`Durable::create_new`] an existing target is never replaced (the final step is a
//!   hard link, which fails atomically with `AlreadyExists`).
//! - A crash can leave one temp file `.<name>.tmp.<pid>.<n>` beside the target; it is never
//!   read as the target. On an error before the rename the temp file is removed.
//!
//! The crash test (`tests::killed_writers_leave_a_complete_file`) kills writers with SIGKILL at
//! random points and checks the target after each kill.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How a file is written; see the module docs for the guarantees.
#[derive(Debug, Clone, Copy)]
pub struct Durable {
    mode: u32,
    create_new: bool,
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            mode: 0o644,
            create_new: false,
        }
    }
}

impl Durable {
    /// Replace the target if it exists, mode 0644 for a new file.
    pub fn new() -> Durable {
        Durable::default()
    }

    /// The new file's permission bits (0600 for private keys): set when the temp file is
    /// created, so the content is never readable with wider permissions.
    pub fn mode(mut self, mode: u32) -> Durable {
        self.mode = mode;
        self
    }

    /// Refuse (with `AlreadyExists`) instead of replacing an existing target.
    pub fn create_new(mut self) -> Durable {
        self.create_new = true;
        self
    }

    /// Writes `bytes` to `path` durably.
    pub fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.write_with(path, |f| f.write_all(bytes))
    }

    /// Writes what `fill` writes into the temp file to `path` durably.
    pub fn write_with(
        &self,
        path: &Path,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<()> {
        let tmp = temp_path(path)?;
        let result = (|| -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(self.mode)
                .open(&tmp)?;
            fill(&mut f)?;
            f.sync_all()?;
            drop(f);
            if self.create_new {
                std::fs::hard_link(&tmp, path)?;
                std::fs::remove_file(&tmp)?;
            } else {
                std::fs::rename(&tmp, path)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        sync_parent(path)
    }
}

/// `Durable::new().write(path, bytes)`.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    Durable::new().write(path, bytes)
}

/// Makes an already written file the target, durably: fsyncs `from`, renames it over `to` and
/// fsyncs `to`'s directory. `from` must be in the same file system (e.g. `<to>.part`).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    File::open(from)?.sync_all()?;
    std::fs::rename(from, to)?;
    sync_parent(to)
}

/// Fsyncs a directory, so the entries created or renamed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(parent(path))
}

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent(path).join(format!(
        ".{}.tmp.{}.{n}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    #[test]
    fn replace_and_create_new() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        replace(&p, b"one").unwrap();
        replace(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let e = Durable::new().create_new().write(&p, b"three").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let k = dir.path().join("key.pem");
        Durable::new()
            .mode(0o600)
            .create_new()
            .write(&k, b"k")
            .unwrap();
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Nothing but the targets is left behind.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["key.pem", "state.json"]);
    }

    #[test]
    fn a_failed_fill_leaves_the_target_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        replace(&p, b"old").unwrap();
        let e = Durable::new()
            .write_with(&p, |f| {
                f.write_all(b"partial")?;
                Err(io::Error::other("disk full"))
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rename_moves_a_part_file() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("b.bundle.part");
        std::fs::write(&part, b"blob").unwrap();
        let dest = dir.path().join("b.bundle");
        rename(&part, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"blob");
        assert!(!part.exists());
    }

    /// The child side of the crash test: replaces the file in a loop until killed. Each
    /// version is 64 KiB of one repeated byte plus that byte again as a trailer, so a reader
    /// can tell a complete version from a torn one.
    #[test]
    fn crash_child() {
        let Some(path) = std::env::var_os("HOST_FS_CRASH_CHILD") else {
            return;
        };
        let path = PathBuf::from(path);
        for i in 0u64.. {
            let b = (i % 251) as u8;
            let mut bytes = vec![b; 64 * 1024];
            bytes.push(b);
            replace(&path, &bytes).expect("replace");
        }
    }

    #[test]
    fn killed_writers_leave_a_complete_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        replace(&path, &[7u8; 64 * 1024 + 1]).unwrap();
        let exe = std::env::current_exe().unwrap();
        for round in 0..20u64 {
            let mut child = Command::new(&exe)
                .args(["--exact", "fs::tests::crash_child", "--nocapture"])
                .env("HOST_FS_CRASH_CHILD", &path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Kill at a different point of the write loop each round.
            std::thread::sleep(Duration::from_millis(20 + (round * 37) % 90));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let bytes = std::fs::read(&path).expect("the target always exists");
            assert_eq!(bytes.len(), 64 * 1024 + 1, "round {round}: torn file");
            assert!(
                bytes.iter().all(|&b| b == bytes[0]),
                "round {round}: mixed versions"
            );
        }
        // Each kill leaves at most one temp file beside the target.
        let temps = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".state.bin.tmp.")
            })
            .count();
        assert!(temps <= 20, "{temps} temp files");
    }
}
