//! A full disk, for real: the queue on a small tmpfs mounted for the test (needs root, as in
//! CI). The queue must hold its free-space reserve by evicting (counted as `disk`), survive
//! the disk filling up behind its back without a panic or a lost record, and recover by
//! reopening its database once space is back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use ember_agent::config::{FsyncPolicy, FullPolicy, QueueSettings};
use ember_agent::metrics::Metrics;
use ember_agent::queue::Queue;
use ember_agent::source::Sample;

struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn settings() -> QueueSettings {
    QueueSettings {
        max_bytes: 1 << 30,
        max_age_s: 3600,
        full_policy: FullPolicy::DropOldest,
        fsync: FsyncPolicy::EveryBatch,
        append_max_records: 1000,
        append_max_delay_ms: 10,
        cache_bytes: 1 << 20,
        reclaim_bytes: 1 << 40,
        min_free_bytes: 3 << 20,
    }
}

fn batch(base: u64, n: u64) -> Vec<Sample> {
    let stream: Arc<str> = "imu".into();
    (0..n)
        .map(|i| Sample {
            stream: stream.clone(),
            ts_us: base + i,
            values: vec![(base + i) as f32; 6],
            origin: None,
        })
        .collect()
}

fn fill(path: &PathBuf) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn full_disk_is_survived_and_recovered_without_losing_queued_records() {
    let fs = Tmpfs::mount(16);
    let data = fs.path().join("data");
    let metrics = Arc::new(Metrics::default());
    let (q, _) = Queue::open(&data, settings(), metrics.clone()).expect("open");

    // 1. Fill the queue until the free-space reserve is reached: eviction keeps it there.
    let mut base = 0;
    for _ in 0..2000 {
        let r = q
            .append(&batch(base, 500))
            .expect("appends below the reserve must succeed");
        base += r.accepted as u64;
        if metrics.evicted_disk.load(Relaxed) > 5_000 {
            break;
        }
    }
    let evicted = metrics.evicted_disk.load(Relaxed);
    assert!(
        evicted > 0,
        "the queue never reached its free-space reserve"
    );
    assert_eq!(metrics.enqueued.load(Relaxed), q.len().0 + evicted);
    let free = fs2::available_space(fs.path()).expect("statvfs");
    assert!(free > 0, "the reserve must keep the disk from filling up");

    // 2. Something else fills the disk: appends fail or are refused, nothing panics.
    let filler = fs.path().join("filler");
    fill(&filler);
    for i in 0..20 {
        if let Ok(r) = q.append(&batch(1_000_000 + i * 100, 100)) {
            assert!(r.accepted <= 100);
        }
    }

    // 3. Space comes back: the queue reopens its database and carries on.
    std::fs::remove_file(&filler).expect("remove filler");
    let mut recovered = false;
    for _ in 0..50 {
        if q.recover() {
            recovered = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(recovered, "the queue did not recover after space was freed");
    q.append(&batch(2_000_000, 10))
        .expect("append after recovery");

    // Every record counted as enqueued is either still queued or was evicted (and counted).
    let (queued, _) = q.len();
    let evicted = metrics.evicted_disk.load(Relaxed) + metrics.evicted_bytes.load(Relaxed);
    assert_eq!(
        metrics.enqueued.load(Relaxed),
        queued + evicted,
        "records went missing across the full disk"
    );
    let sid = q.stream_names()[0].0;
    let all = q.read(sid, 0, usize::MAX).expect("read");
    assert_eq!(all.len() as u64, queued);
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "sequence numbers must increase"
    );
    let last = q.stream_status()[0].last_seq;
    assert_eq!(all.last().map(|r| r.0), Some(last));
    drop(all);
    drop(q);

    // And the same survives a restart.
    let (q, report) = Queue::open(&data, settings(), Arc::new(Metrics::default())).expect("reopen");
    assert!(
        report.reset.is_none(),
        "a full disk must never be mistaken for corruption"
    );
    assert_eq!(q.len().0, queued);
}
