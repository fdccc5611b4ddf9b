//! Micro-benchmarks of the durable queue: append (one batch = one durable commit) and drain
//! (read + range delete), for each fsync policy. `cargo bench -p ember-bench --bench queue`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_agent::config::{FsyncPolicy, FullPolicy, QueueSettings};
use ember_agent::metrics::Metrics;
use ember_agent::queue::Queue;
use ember_agent::source::Sample;

const BATCH: usize = 100;

fn settings(fsync: FsyncPolicy) -> QueueSettings {
    QueueSettings {
        max_bytes: 1 << 34,
        max_age_s: 86_400,
        full_policy: FullPolicy::DropOldest,
        fsync,
        append_max_records: 1000,
        append_max_delay_ms: 20,
        cache_bytes: 2 << 20,
        reclaim_bytes: 1 << 40,
        min_free_bytes: 0,
    }
}

fn batch(n: usize, base: u32) -> Vec<Sample> {
    let stream: Arc<str> = "imu".into();
    (0..n)
        .map(|i| Sample {
            stream: stream.clone(),
            ts_us: u64::from(base) + i as u64,
            values: vec![0.25; 6],
            origin: None,
        })
        .collect()
}

fn policies() -> [(&'static str, FsyncPolicy); 3] {
    [
        ("every_batch", FsyncPolicy::EveryBatch),
        ("interval_1000ms", FsyncPolicy::Interval { ms: 1000 }),
        ("never", FsyncPolicy::Never),
    ]
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_append");
    g.throughput(Throughput::Elements(BATCH as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (name, policy) in policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) =
            Queue::open(dir.path(), settings(policy), Arc::new(Metrics::default())).expect("open");
        let samples = batch(BATCH, 0);
        let mut last_commit = Instant::now();
        g.bench_with_input(BenchmarkId::from_parameter(name), &policy, |b, policy| {
            b.iter(|| {
                q.append(&samples).expect("append");
                // The writer commits on the interval tick; model that cost here too.
                if let FsyncPolicy::Interval { ms } = policy
                    && last_commit.elapsed() >= Duration::from_millis(*ms)
                {
                    q.commit().expect("commit");
                    last_commit = Instant::now();
                }
            })
        });
    }
    g.finish();
}

fn drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_drain");
    g.throughput(Throughput::Elements(BATCH as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (name, policy) in policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) =
            Queue::open(dir.path(), settings(policy), Arc::new(Metrics::default())).expect("open");
        let sid = {
            q.append(&batch(1, 0)).expect("append");
            q.commit().expect("commit");
            q.stream_names()[0].0
        };
        let mut next = 1u64;
        g.bench_with_input(BenchmarkId::from_parameter(name), &policy, |b, _| {
            b.iter_custom(|iters| {
                // Refill outside the timed part, then time read + range delete.
                for i in 0..iters {
                    q.append(&batch(BATCH, i as u32)).expect("append");
                }
                q.commit().expect("commit");
                let t = Instant::now();
                for _ in 0..iters {
                    let recs = q.read(sid, next, BATCH).expect("read");
                    let last = recs.last().map_or(next, |(s, _)| *s);
                    q.ack(sid, next, last).expect("ack");
                    next = last + 1;
                }
                t.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, append, drain);
criterion_main!(benches);
