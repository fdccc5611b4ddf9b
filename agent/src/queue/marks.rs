//! The queue's small files beside the database, each replaced atomically and durably:
//! `queue.mark` (durable high-water marks, to detect a database that came back shorter) and
//! `queue.seq` (sequence reservations, so a reset never reuses a number).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use ember_proto::EvictedRange;

use super::format::{meta_json, meta_key};
use super::{
    Engine, Inner, MAX_EVICTED_RANGES, OpenReport, Queue, QueueError, StreamId, StreamState, io_err,
};
use crate::metrics::Metrics;

/// `queue.mark`: see the module docs.
const MARK_FILE: &str = "queue.mark";

impl<E: Engine> Queue<E> {
    /// Writes each stream's durable high-water mark to `queue.mark`, if it moved.
    pub(super) fn save_marks(&self) -> Result<(), QueueError> {
        let mut saved = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = saved.clone();
        for s in &self.lock().streams {
            let m = now.entry(s.name.to_string()).or_insert(0);
            *m = (*m).max(s.durable_upto);
        }
        if now != *saved {
            replace_file(
                &self.root,
                MARK_FILE,
                &serde_json::to_vec(&now).unwrap_or_default(),
            )?;
            *saved = now;
        }
        Ok(())
    }
}

pub(super) fn read_marks(root: &Path) -> BTreeMap<String, u64> {
    let path = root.join(MARK_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "The queue's durable marks are unreadable; lost records cannot be detected at this start.");
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "Cannot read the queue's durable marks; lost records cannot be detected at this start.");
            BTreeMap::new()
        }
    }
}
/// Finds streams the database holds fewer records of than were once durable (sled recovered
/// a damaged or truncated file to an earlier state without an error): reports the missing
/// numbers as an evicted `corrupt` range and continues numbering after them.
pub(super) fn apply_marks<E: Engine>(
    inner: &mut Inner<E>,
    marks: &BTreeMap<String, u64>,
    report: &mut OpenReport,
    metrics: &Metrics,
) -> Result<(), QueueError> {
    let engine = inner.engine()?;
    let mut puts = Vec::new();
    let mut lost_total = 0;
    for (name, &mark) in marks {
        let sid = match inner.by_name.get(name.as_str()) {
            Some(&sid) => sid,
            None => {
                let sid = inner.streams.len() as StreamId;
                let arc: Arc<str> = name.as_str().into();
                inner.by_name.insert(arc.clone(), sid);
                inner.streams.push(StreamState {
                    name: arc,
                    next_seq: 1,
                    durable_upto: 0,
                    sent_upto: 0,
                    records: 0,
                    bytes: 0,
                    evicted: Vec::new(),
                    channels: None,
                    origin: None,
                    durable_origin: None,
                    pending_origins: Default::default(),
                    meta_dirty: true,
                });
                sid
            }
        };
        let st = &mut inner.streams[sid as usize];
        if st.next_seq > mark {
            continue;
        }
        let (from, to) = (st.next_seq, mark);
        tracing::error!(
            stream = %st.name, from, to,
            "The queue database came back without records it had stored (damaged or truncated); they are lost, and numbering continues after them."
        );
        st.evicted.push(EvictedRange {
            from,
            to,
            reason: "corrupt".into(),
        });
        if st.evicted.len() > MAX_EVICTED_RANGES {
            st.evicted.remove(0);
        }
        st.next_seq = mark + 1;
        st.durable_upto = mark;
        st.meta_dirty = false;
        puts.push((meta_key(sid), meta_json(&st.meta())));
        lost_total += to - from + 1;
    }
    if !puts.is_empty() {
        engine.apply(puts, Vec::new())?;
        engine.sync()?;
        metrics.corrupt.fetch_add(lost_total, Relaxed);
        report.corrupt += lost_total;
    }
    Ok(())
}
pub(super) fn read_reservations(root: &Path) -> Result<BTreeMap<String, u64>, QueueError> {
    let path = root.join("queue.seq");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "Sequence reservations are unreadable; starting without them.");
            Ok(BTreeMap::new())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(QueueError::Io { what: format!("reading {}", path.display()), source: e }),
    }
}
pub(super) fn write_reservations(
    root: &Path,
    reserved: &BTreeMap<String, u64>,
) -> Result<(), QueueError> {
    replace_file(
        root,
        "queue.seq",
        &serde_json::to_vec(reserved).unwrap_or_default(),
    )
}
/// Replaces `root/name` with `bytes` atomically and durably (write a temp file, fsync, rename,
/// fsync the directory).
fn replace_file(root: &Path, name: &str, bytes: &[u8]) -> Result<(), QueueError> {
    ember_host::fs::replace(&root.join(name), bytes).map_err(io_err(format!("replacing {name}")))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    ember_host::fs::sync_dir(dir).map_err(io_err(format!("fsync of directory {}", dir.display())))
}
