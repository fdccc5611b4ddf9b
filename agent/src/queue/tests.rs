use super::format::{KEY_LEN, record_key};
use super::*;
use crate::config::{FsyncPolicy, FullPolicy, QueueSettings};
use crate::source::Sample;
use ember_proto::{InferenceRecord, ProtoError};
use proptest::prelude::*;
use std::collections::VecDeque;

fn settings(max_bytes: u64, policy: FullPolicy, fsync: FsyncPolicy) -> QueueSettings {
    QueueSettings {
        max_bytes,
        max_age_s: 3600,
        full_policy: policy,
        fsync,
        append_max_records: 1000,
        append_max_delay_ms: 10,
        cache_bytes: 1 << 20,
        reclaim_bytes: 1 << 20,
        min_free_bytes: 0,
    }
}

fn sample(stream: &str, i: u32) -> Sample {
    Sample {
        stream: stream.into(),
        ts_us: 1_000_000 + u64::from(i),
        values: vec![i as f32, 0.5, -1.0],
        origin: None,
    }
}

fn open(dir: &Path, s: QueueSettings) -> (Queue, OpenReport, Arc<Metrics>) {
    let m = Arc::new(Metrics::default());
    let (q, r) = Queue::open(dir, s, m.clone()).unwrap();
    (q, r, m)
}

const RECORD_BYTES: u64 = (KEY_LEN + 15 + 12) as u64;

#[test]
fn append_read_ack_and_reopen_keep_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
    {
        let (q, _, m) = open(dir.path(), s.clone());
        let batch: Vec<_> = (0..10).map(|i| sample("imu", i)).collect();
        assert_eq!(q.append(&batch).unwrap().accepted, 10);
        assert_eq!(q.len(), (10, 10 * RECORD_BYTES));
        let (sid, _) = q.stream_names()[0].clone();
        let got = q.read(sid, 1, 4).unwrap();
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(got[2].1.values, vec![2.0, 0.5, -1.0]);
        assert_eq!(q.ack(sid, 1, 4).unwrap(), 4);
        assert_eq!(
            q.ack(sid, 1, 4).unwrap(),
            0,
            "acking twice deletes nothing more"
        );
        assert_eq!(m.acked.load(Relaxed), 4);
        assert_eq!(q.first_seq(sid).unwrap(), Some(5));
    }
    let (q, report, _) = open(dir.path(), s);
    assert_eq!(report.records, 6);
    let (sid, name) = q.stream_names()[0].clone();
    assert_eq!(&*name, "imu");
    q.append(&[sample("imu", 99)]).unwrap();
    let all = q.read(sid, 0, 100).unwrap();
    assert_eq!(
        all.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9, 10, 11]
    );
    assert_eq!(q.stream_status()[0].last_seq, 11);
}

#[test]
fn drop_oldest_evicts_unsent_records_and_counts_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 100 * RECORD_BYTES;
    let (q, _, m) = open(
        dir.path(),
        settings(cap, FullPolicy::DropOldest, FsyncPolicy::EveryBatch),
    );
    for chunk in 0..5 {
        let batch: Vec<_> = (0..50).map(|i| sample("a", chunk * 50 + i)).collect();
        q.append(&batch).unwrap();
    }
    let (records, bytes) = q.len();
    assert!(bytes <= cap);
    assert_eq!(records, 100);
    let evicted = m.evicted_bytes.load(Relaxed);
    assert_eq!(evicted, 150);
    assert_eq!(m.enqueued.load(Relaxed), evicted + records);
    let st = &q.stream_status()[0];
    assert_eq!(
        st.evicted,
        vec![EvictedRange {
            from: 1,
            to: 150,
            reason: "bytes".into()
        }]
    );
    let sid = q.stream_names()[0].0;
    assert_eq!(q.first_seq(sid).unwrap(), Some(151));
}

#[test]
fn eviction_never_takes_records_handed_to_the_uplink() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 20 * RECORD_BYTES;
    let (q, _, m) = open(
        dir.path(),
        settings(cap, FullPolicy::DropOldest, FsyncPolicy::EveryBatch),
    );
    q.append(&(0..20).map(|i| sample("a", i)).collect::<Vec<_>>())
        .unwrap();
    let sid = q.stream_names()[0].0;
    assert_eq!(q.read(sid, 1, 5).unwrap().len(), 5); // seq 1..=5 in flight
    q.append(&(20..30).map(|i| sample("a", i)).collect::<Vec<_>>())
        .unwrap();
    let st = &q.stream_status()[0];
    assert_eq!(
        st.evicted,
        vec![EvictedRange {
            from: 6,
            to: 15,
            reason: "bytes".into()
        }]
    );
    assert_eq!(m.evicted_bytes.load(Relaxed), 10);
    let left: Vec<u64> = q
        .read(sid, 0, 100)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        left,
        [1, 2, 3, 4, 5]
            .into_iter()
            .chain(16..=30)
            .collect::<Vec<_>>()
    );
}

#[test]
fn waiting_for_the_fleet_eviction_takes_the_oldest_records_even_if_sent() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 20 * RECORD_BYTES;
    let (q, _, m) = open(
        dir.path(),
        settings(cap, FullPolicy::DropOldest, FsyncPolicy::EveryBatch),
    );
    q.set_evict_sent(true);
    q.append(&(0..20).map(|i| sample("a", i)).collect::<Vec<_>>())
        .unwrap();
    let sid = q.stream_names()[0].0;
    assert_eq!(q.read(sid, 1, 5).unwrap().len(), 5); // 1..=5 sent, not committed
    q.append(&(20..30).map(|i| sample("a", i)).collect::<Vec<_>>())
        .unwrap();
    let st = &q.stream_status()[0];
    assert_eq!(
        st.evicted,
        vec![EvictedRange {
            from: 1,
            to: 10,
            reason: "bytes".into()
        }]
    );
    assert_eq!(st.head, Some(11), "the head is reported");
    assert_eq!(m.evicted_bytes.load(Relaxed), 10);
    assert_eq!(q.len().0, 20);
}

#[test]
fn trim_deletes_what_the_fleet_committed_and_nothing_beyond_the_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _, m) = open(
        dir.path(),
        settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch),
    );
    q.append(&(0..10_000).map(|i| sample("a", i)).collect::<Vec<_>>())
        .unwrap();
    let sid = q.stream_names()[0].0;
    assert_eq!(q.trim(sid, 6000).unwrap(), 6000, "across several chunks");
    assert_eq!(q.first_seq(sid).unwrap(), Some(6001));
    assert_eq!(q.stream_status()[0].head, Some(6001));
    assert_eq!(
        q.trim(sid, 6000).unwrap(),
        0,
        "a stale watermark deletes nothing"
    );
    // A watermark beyond the last record deletes up to the last record only.
    assert_eq!(q.trim(sid, u64::MAX).unwrap(), 4000);
    assert!(q.is_empty());
    assert_eq!(q.stream_status()[0].head, None);
    assert_eq!(m.acked.load(Relaxed), 10_000);
    q.append(&[sample("a", 1)]).unwrap();
    assert_eq!(q.stream_status()[0].last_seq, 10_001, "numbers go on");
    assert_eq!(q.trim(sid, 10_000).unwrap(), 0);
    assert_eq!(q.len().0, 1);
}

#[test]
fn block_policy_refuses_until_acks_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _, m) = open(
        dir.path(),
        settings(
            10 * RECORD_BYTES,
            FullPolicy::Block,
            FsyncPolicy::EveryBatch,
        ),
    );
    let batch: Vec<_> = (0..15).map(|i| sample("a", i)).collect();
    assert_eq!(q.append(&batch).unwrap().accepted, 10);
    assert_eq!(q.append(&batch[10..]).unwrap().accepted, 0);
    let sid = q.stream_names()[0].0;
    q.read(sid, 1, 3).unwrap();
    q.ack(sid, 1, 3).unwrap();
    assert_eq!(q.append(&batch[10..]).unwrap().accepted, 3);
    assert_eq!(m.evicted_bytes.load(Relaxed), 0);
}

#[test]
fn interval_policy_hides_records_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _, _) = open(
        dir.path(),
        settings(
            1 << 30,
            FullPolicy::DropOldest,
            FsyncPolicy::Interval { ms: 100 },
        ),
    );
    q.append(&[sample("a", 1), sample("a", 2)]).unwrap();
    let sid = q.stream_names()[0].0;
    assert!(q.read(sid, 0, 10).unwrap().is_empty(), "not durable yet");
    q.commit().unwrap();
    assert_eq!(q.read(sid, 0, 10).unwrap().len(), 2);
}

#[test]
fn corrupt_records_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
    let (q, _, m) = open(dir.path(), s.clone());
    q.append(&(0..5).map(|i| sample("a", i)).collect::<Vec<_>>())
        .unwrap();
    let sid = q.stream_names()[0].0;
    // Damage record 3 behind the queue's back.
    let engine = q.lock().engine().unwrap();
    let key = record_key(sid, 3);
    let mut bad = engine.scan(&key, &key, 1).unwrap().remove(0).1;
    bad[7] ^= 0x40;
    engine.apply(vec![(key.to_vec(), bad)], Vec::new()).unwrap();
    let got: Vec<u64> = q
        .read(sid, 0, 10)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(got, vec![1, 2, 4, 5]);
    assert_eq!(m.corrupt.load(Relaxed), 1);
    assert_eq!(q.len().0, 4);
    assert_eq!(
        q.stream_status()[0].evicted,
        vec![EvictedRange {
            from: 3,
            to: 3,
            reason: "corrupt".into()
        }]
    );
    drop(engine);
    drop(q);
    // And at open.
    let (q, _, _) = open(dir.path(), s.clone());
    let engine = q.lock().engine().unwrap();
    let key = record_key(sid, 4);
    engine
        .apply(vec![(key.to_vec(), vec![1, 2, 3])], Vec::new())
        .unwrap();
    engine.sync().unwrap();
    drop(engine);
    drop(q);
    let (q, report, _) = open(dir.path(), s);
    assert_eq!(report.corrupt, 1);
    assert_eq!(q.len().0, 3);
}

#[test]
fn compaction_gives_disk_space_back_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::Never);
    let (q, _, _) = open(dir.path(), s.clone());
    for chunk in 0..100 {
        let batch: Vec<_> = (0..1000).map(|i| sample("a", chunk * 1000 + i)).collect();
        q.append(&batch).unwrap();
    }
    q.commit().unwrap();
    let sid = q.stream_names()[0].0;
    q.ack(sid, 1, 99_990).unwrap();
    q.close().unwrap();
    let before = q.disk_bytes();
    q.compact().unwrap();
    let after = q.disk_bytes();
    assert!(
        after * 4 < before,
        "disk usage should fall: before {before}, after {after}"
    );
    let left: Vec<u64> = q
        .read(sid, 0, 100)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, (99_991..=100_000).collect::<Vec<_>>());
    q.append(&[sample("a", 0)]).unwrap();
    q.commit().unwrap();
    assert_eq!(q.stream_status()[0].last_seq, 100_001);
    drop(q);
    let (q, _, _) = open(dir.path(), s);
    assert_eq!(q.len().0, 11);
}

#[test]
fn unreadable_database_is_moved_aside_and_numbers_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
    {
        let (q, _, _) = open(dir.path(), s.clone());
        q.append(&(0..10).map(|i| sample("a", i)).collect::<Vec<_>>())
            .unwrap();
    }
    // Replace sled's config with garbage: sled refuses to open it.
    std::fs::write(dir.path().join("queue/conf"), b"\xff\xfe garbage").unwrap();
    let (q, report, m) = open(dir.path(), s);
    let reset = report.reset.expect("the queue should report a reset");
    assert!(reset.moved_to.exists());
    assert_eq!(m.queue_resets.load(Relaxed), 1);
    q.append(&[sample("a", 1)]).unwrap();
    let st = &q.stream_status()[0];
    assert!(
        st.last_seq > 10,
        "sequence numbers must not be reused after a reset: {}",
        st.last_seq
    );
    assert_eq!(st.evicted[0].reason, "reset");
}

#[test]
fn second_open_of_the_same_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
    let (_q, _, _) = open(dir.path(), s.clone());
    let err = match Queue::open(dir.path(), s, Arc::new(Metrics::default())) {
        Err(e) => e,
        Ok(_) => panic!("second open must fail"),
    };
    assert!(matches!(err, QueueError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("another ember-agent"));
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, u8)>), // (stream, n)
    Send(u8, u8),          // read up to n of a stream from its head and ack them
    SendNoAck(u8, u8),     // read (mark in flight) without acking
    Reopen,
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => proptest::collection::vec((0u8..3, 1u8..40), 1..4).prop_map(Op::Append),
        3 => (0u8..3, 1u8..60).prop_map(|(s, n)| Op::Send(s, n)),
        1 => (0u8..3, 1u8..20).prop_map(|(s, n)| Op::SendNoAck(s, n)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Compact),
    ]
}

/// A second storage engine, for the tests only: a `BTreeMap` rewritten whole to
/// `<dir>/entries` (length-prefixed pairs, through `ember_host::fs::replace`) at each change.
/// Slow and simple; it exists to prove that `Queue<E: Engine>` needs nothing of sled.
struct FileEngine {
    file: PathBuf,
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl FileEngine {
    fn persist(&self, map: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), QueueError> {
        let mut bytes = Vec::new();
        for (k, v) in map {
            for part in [k, v] {
                bytes.extend_from_slice(&(part.len() as u32).to_le_bytes());
                bytes.extend_from_slice(part);
            }
        }
        ember_host::fs::replace(&self.file, &bytes).map_err(|e| QueueError::Engine(e.to_string()))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap()
    }
}

impl Engine for FileEngine {
    fn open(path: &Path, _: u64, _: Option<u64>) -> Result<Self, QueueError> {
        std::fs::create_dir_all(path).map_err(|e| QueueError::Engine(e.to_string()))?;
        let file = path.join("entries");
        let mut map = BTreeMap::new();
        if let Ok(bytes) = std::fs::read(&file) {
            let mut parts = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
                parts.push(bytes[at + 4..at + 4 + len].to_vec());
                at += 4 + len;
            }
            for kv in parts.chunks(2) {
                map.insert(kv[0].clone(), kv[1].clone());
            }
        }
        Ok(FileEngine {
            file,
            map: Mutex::new(map),
        })
    }

    fn for_each(&self, visit: &mut Visit<'_>) -> Result<(), QueueError> {
        for (k, v) in self.lock().iter() {
            visit(k, v)?;
        }
        Ok(())
    }

    fn apply(&self, puts: Vec<Entry>, deletes: Vec<Vec<u8>>) -> Result<(), QueueError> {
        let mut map = self.lock();
        for k in deletes {
            map.remove(&k);
        }
        map.extend(puts);
        self.persist(&map)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Entry>, QueueError> {
        Ok(self
            .lock()
            .range(from.to_vec()..=to.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn remove_keys(&self, keys: &[&[u8]]) -> Result<(u64, u64), QueueError> {
        let mut map = self.lock();
        let (mut n, mut bytes) = (0, 0);
        for k in keys {
            if let Some(v) = map.remove(*k) {
                n += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        self.persist(&map)?;
        Ok((n, bytes))
    }

    fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<(u64, u64), QueueError> {
        let mut map = self.lock();
        let keys: Vec<Vec<u8>> = map
            .range(from.to_vec()..=to.to_vec())
            .map(|(k, _)| k.clone())
            .collect();
        let (mut n, mut bytes) = (0, 0);
        for k in keys {
            if let Some(v) = map.remove(&k) {
                n += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        self.persist(&map)?;
        Ok((n, bytes))
    }

    fn flush(&self) -> Result<(), QueueError> {
        Ok(())
    }

    fn sync(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The queue against a model: per-stream VecDeques of (seq, value), with a byte cap and
    /// drop_oldest eviction, reopened and compacted at random points.
    #[test]
    fn queue_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        queue_matches_model_on::<SledEngine>(ops)?;
    }

    /// The same model run on another storage engine: the queue is generic over `Engine`.
    #[test]
    fn queue_on_another_engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        queue_matches_model_on::<FileEngine>(ops)?;
    }
}

fn queue_matches_model_on<E: Engine>(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let open = |dir: &Path, s: QueueSettings| {
        Queue::<E>::open_engine(dir, s, Arc::new(Metrics::default())).unwrap()
    };
    {
        let dir = tempfile::tempdir().unwrap();
        let cap = 150 * RECORD_BYTES;
        let s = settings(cap, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
        let (mut q, _) = open(dir.path(), s.clone());
        let names = ["s0", "s1", "s2"];
        let mut model: Vec<VecDeque<(u64, f32)>> = vec![VecDeque::new(); 3];
        let mut next: Vec<u64> = vec![1; 3];
        let mut in_flight: Vec<u64> = vec![0; 3];
        let mut counter = 0u32;
        let (mut appended, mut acked, mut evicted) = (0u64, 0u64, 0u64);
        for op in ops {
            match op {
                Op::Append(parts) => {
                    let mut batch = Vec::new();
                    let batch_start = next.clone();
                    for (st, n) in parts {
                        for _ in 0..n {
                            counter += 1;
                            batch.push(Sample {
                                stream: names[st as usize].into(),
                                ts_us: u64::from(counter),
                                values: vec![counter as f32, 1.0, 2.0],
                                origin: None,
                            });
                        }
                    }
                    prop_assert_eq!(q.append(&batch).unwrap().accepted, batch.len());
                    for smp in &batch {
                        let i = names.iter().position(|n| **n == *smp.stream).unwrap();
                        // Model eviction, before the new record goes in: oldest capture time
                        // first, skipping in-flight records; over the cap if nothing is left.
                        while (model.iter().map(|m| m.len() as u64).sum::<u64>() + 1) * RECORD_BYTES
                            > cap
                        {
                            let victim = (0..3)
                                .filter_map(|j| {
                                    model[j]
                                        .iter()
                                        .position(|(sq, _)| {
                                            *sq > in_flight[j] && *sq < batch_start[j]
                                        })
                                        .map(|p| (model[j][p].1, j, p))
                                })
                                .min_by(|a, b| a.0.total_cmp(&b.0));
                            let Some((_, j, p)) = victim else { break };
                            model[j].remove(p);
                            evicted += 1;
                        }
                        model[i].push_back((next[i], smp.values[0]));
                        next[i] += 1;
                        appended += 1;
                    }
                }
                Op::Send(st, n) | Op::SendNoAck(st, n) => {
                    let i = st as usize;
                    let ack = matches!(op, Op::Send(..));
                    let Some(sid) = q
                        .stream_names()
                        .iter()
                        .find(|(_, nm)| **nm == *names[i])
                        .map(|(s, _)| *s)
                    else {
                        continue;
                    };
                    let got = q.read(sid, 0, n as usize).unwrap();
                    let want: Vec<(u64, f32)> = model[i].iter().take(n as usize).copied().collect();
                    prop_assert_eq!(
                        got.iter()
                            .map(|(s, r)| (*s, r.values[0]))
                            .collect::<Vec<_>>(),
                        want.clone()
                    );
                    if let Some((last, _)) = want.last() {
                        in_flight[i] = in_flight[i].max(*last);
                        if ack {
                            let n = q.ack(sid, want[0].0, *last).unwrap();
                            prop_assert_eq!(n, want.len() as u64);
                            acked += n;
                            model[i].drain(..want.len());
                        }
                    }
                }
                Op::Reopen => {
                    drop(q);
                    q = open(dir.path(), s.clone()).0;
                    in_flight = vec![0; 3]; // a restart forgets what was in flight
                }
                Op::Compact => q.compact().unwrap(),
            }
            let queued: u64 = model.iter().map(|m| m.len() as u64).sum();
            prop_assert_eq!(q.len().0, queued);
            prop_assert_eq!(appended, acked + evicted + queued);
            for (i, name) in names.iter().enumerate() {
                if let Some(st) = q.stream_status().iter().find(|st| st.stream == *name) {
                    prop_assert_eq!(st.last_seq, next[i] - 1);
                    let ev: u64 = st.evicted.iter().map(|r| r.to - r.from + 1).sum();
                    let _ = ev;
                }
            }
        }
    }
    Ok(())
}

fn result(i: u64) -> InferenceItem {
    let stored = StoredInference {
        source: "imu".into(),
        record: InferenceRecord {
            seq: 0,
            ts: 2_000_000 + i,
            window_start: 1_000_000 + i,
            source_seq: 100 + i,
            model: "activity".into(),
            version: "1.0.0".into(),
            latency_us: 70,
            output: ember_proto::InferenceOutput::Anomaly {
                score: i as f32,
                threshold: 0.5,
                anomalous: i > 0,
            },
            input: None,
            capture: None,
        },
    };
    InferenceItem::new("imu.anomaly".into(), &stored).unwrap()
}

/// Inference results (stored value v2) share the queue with samples (v1): their own stream
/// and sequence numbers, read back intact after a reopen, damage detected by the CRC.
#[test]
fn inference_records_round_trip_beside_samples() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
    {
        let (q, _, _) = open(dir.path(), s.clone());
        q.append(&[sample("imu", 1), sample("imu", 2)]).unwrap();
        let mut seqs = Vec::new();
        let items: Vec<_> = (0..3).map(result).collect();
        q.append_numbered(&items, Some(&mut seqs)).unwrap();
        assert_eq!(seqs, vec![1, 2, 3], "a stream of its own, numbered from 1");
        q.close().unwrap();
    }
    let (q, report, _) = open(dir.path(), s);
    assert_eq!((report.records, report.corrupt), (5, 0));
    let sid = q
        .stream_names()
        .iter()
        .find(|(_, n)| &**n == "imu.anomaly")
        .map(|(sid, _)| *sid)
        .unwrap();
    let got = q.read(sid, 1, 10).unwrap();
    assert_eq!(got.len(), 3);
    for (i, (seq, r)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(r.ts_us, 2_000_000 + i as u64);
        let inf = r.inference.as_ref().unwrap();
        assert_eq!(inf.record.source_seq, 100 + i as u64);
        assert_eq!(inf.source, "imu");
    }
    let key = record_key(sid, 1);
    let mut v = result(0).encode(&key);
    assert!(decode_value(&key, &v).is_ok());
    let last = v.len() - 1;
    v[last] ^= 1;
    assert!(matches!(
        decode_value(&key, &v),
        Err(ProtoError::Checksum { .. })
    ));
}

#[test]
fn a_streams_schema_is_recorded_by_its_first_sample_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(1 << 30, FullPolicy::DropOldest, FsyncPolicy::EveryBatch);
    {
        let (q, _, _) = open(dir.path(), s.clone());
        assert_eq!(q.channels("imu"), None);
        q.append(&[sample("imu", 1), sample("imu", 2)]).unwrap();
        q.append(&[result(1)]).unwrap();
        assert_eq!(q.channels("imu"), Some(3));
        let (sid, _) = q.stream_names()[0].clone();
        // Delivered and trimmed: the records go, the schema stays.
        q.ack(sid, 1, 2).unwrap();
        q.close().unwrap();
    }
    let (q, _, _) = open(dir.path(), s);
    assert_eq!(q.channels("imu"), Some(3));
    let st = q.stream_status();
    let imu = st.iter().find(|s| s.stream == "imu").unwrap();
    assert_eq!(imu.channels, Some(3));
    let inf = st.iter().find(|s| s.stream != "imu").unwrap();
    assert_eq!(inf.channels, None, "an inference stream has no schema");
}
