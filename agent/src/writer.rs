//! The writer task: the only task that appends to the queue or changes its files.
//!
//! It takes samples from the sources' bounded channel, appends them in batches (up to
//! `queue.append_max_records`, or whatever arrived within `append_max_delay_ms`), commits on
//! the fsync policy's tick and runs the queue's housekeeping (`maintain`: age eviction, disk
//! reclaim, recovery after a storage error) between batches. With models it hands model-fed
//! samples to the inference thread with `try_send` (capture never waits on inference) and
//! appends the results and forwarded raw samples that come back.
//!
//! **Invariant:** no other task appends, commits, evicts by age or compacts (the uplink only
//! reads and acks), so storage lifecycle operations never race each other.
//!
//! At shutdown it appends whatever is still in the channel and commits; once every sample is
//! handed over it cancels `done` and keeps up housekeeping until the agent exits. `force`
//! stops it at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ForwardRaw, FsyncPolicy, Settings};
use crate::inference::{InferenceHandle, Produced, Tap};
use crate::queue::{Enqueue, InferenceItem, Queue};
use crate::source::Sample;

/// How often the writer runs queue housekeeping (age eviction, disk reclaim, recovery).
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// The writer's side of inference: which samples to hand to the model thread, and the
/// results (and forwarded raw samples) coming back.
pub struct WriterInference {
    pub handle: InferenceHandle,
    /// Source streams that feed a model.
    pub fed: HashSet<Arc<str>>,
    pub forward: ForwardRaw,
    pub rx: mpsc::Receiver<Produced>,
}

/// Appends samples to the queue in batches (up to `append_max_records`, or whatever arrived
/// within `append_max_delay_ms`), commits on the fsync policy's tick, and does housekeeping.
/// With models, it also hands model-fed samples to the inference thread (never waiting: see
/// `inference`) and appends the results that come back.
pub async fn run(
    settings: Arc<Settings>,
    queue: Arc<Queue>,
    mut rx: mpsc::Receiver<Sample>,
    mut inference: Option<WriterInference>,
    done: CancellationToken,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let max = settings.queue.append_max_records;
    let delay = Duration::from_millis(settings.queue.append_max_delay_ms.max(1));
    let commit_every = match settings.queue.fsync {
        FsyncPolicy::EveryBatch => None,
        FsyncPolicy::Interval { ms } => Some(Duration::from_millis(ms)),
        // sled's own cadence: flushed (not fsynced) every 500 ms.
        FsyncPolicy::Never => Some(Duration::from_millis(500)),
    };
    let mut last_commit = tokio::time::Instant::now();
    let mut last_maintain = tokio::time::Instant::now();
    let mut batch: Vec<Sample> = Vec::with_capacity(max);
    let mut results: Vec<InferenceItem> = Vec::new();
    let mut forwarded: Vec<Sample> = Vec::new();
    // Capture numbers of model-fed samples that are not queued (`forward_raw` other than
    // "all"): the `source_seq` of their results.
    let mut capture_seq: HashMap<Arc<str>, u64> = HashMap::new();
    let mut open = true;
    let mut inf_open = inference.is_some();
    while open || inf_open || !batch.is_empty() {
        if (open || inf_open) && batch.len() < max {
            let deadline = tokio::time::sleep(delay);
            tokio::pin!(deadline);
            // Housekeeping runs between batches, never starved by a busy channel.
            let chores =
                tokio::time::sleep_until(next_chore(last_commit, last_maintain, commit_every));
            tokio::pin!(chores);
            // Collect a batch: wait for the first sample, then take what arrives in `delay`.
            loop {
                let room = max - batch.len();
                let waiting = !batch.is_empty() || !results.is_empty() || !forwarded.is_empty();
                tokio::select! {
                    biased;
                    _ = force.cancelled() => { open = false; inf_open = false; batch.clear(); break; }
                    n = rx.recv_many(&mut batch, room), if open => {
                        if n == 0 { open = false; break; }
                        if batch.len() >= max { break; }
                    }
                    p = recv_produced(&mut inference), if inf_open => match p {
                        Some(Produced::Result(item)) => {
                            results.push(item);
                            if results.len() >= max { break; }
                        }
                        Some(Produced::Raw(sample)) => forwarded.push(sample),
                        None => { inf_open = false; break; }
                    },
                    _ = &mut deadline, if waiting => break,
                    _ = &mut chores => break,
                }
            }
        }
        if !batch.is_empty() {
            let todo = std::mem::take(&mut batch);
            let remaining = match inference.as_ref() {
                None => append_all(&queue, todo, &settings, &force, false).await.0,
                Some(inf) => {
                    let (queued, direct): (Vec<Sample>, Vec<Sample>) =
                        todo.into_iter().partition(|s| {
                            inf.forward == ForwardRaw::All || !inf.fed.contains(&s.stream)
                        });
                    for s in direct {
                        let seq = capture_seq.entry(s.stream.clone()).or_insert(0);
                        *seq += 1;
                        inf.handle.tap(Tap {
                            stream: s.stream,
                            seq: *seq,
                            ts_us: s.ts_us,
                            values: s.values,
                        });
                    }
                    let (remaining, accepted) =
                        append_all(&queue, queued, &settings, &force, true).await;
                    for (seq, s) in accepted {
                        if inf.fed.contains(&s.stream) {
                            inf.handle.tap(Tap {
                                stream: s.stream,
                                seq,
                                ts_us: s.ts_us,
                                values: s.values,
                            });
                        }
                    }
                    remaining
                }
            };
            if force.is_cancelled() {
                break;
            }
            batch = remaining;
        }
        if !open && batch.is_empty() {
            // Every sample has been handed over: let the inference thread flush and stop.
            if let Some(inf) = inference.as_mut() {
                inf.handle.close_taps();
            }
        }
        if !forwarded.is_empty() {
            let todo = std::mem::take(&mut forwarded);
            append_all(&queue, todo, &settings, &force, false).await;
        }
        if !results.is_empty() {
            let todo = std::mem::take(&mut results);
            append_all(&queue, todo, &settings, &force, false).await;
        }
        if force.is_cancelled() {
            break;
        }
        let now = tokio::time::Instant::now();
        if commit_every.is_some_and(|every| now >= last_commit + every) {
            commit(&queue).await;
            last_commit = now;
        }
        if now >= last_maintain + MAINTAIN_EVERY {
            maintain(&queue).await;
            last_maintain = now;
        }
    }
    if !force.is_cancelled() {
        commit(&queue).await;
    }
    done.cancel();
    // Every source may have finished (a replay with `loop = false`) while the agent keeps
    // running and draining: housekeeping (age eviction, reclaim, recovery) goes on until exit.
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = force.cancelled() => break,
            _ = tokio::time::sleep(MAINTAIN_EVERY) => maintain(&queue).await,
        }
    }
}

/// When the collect loop stops waiting for samples to do housekeeping: the next commit (on an
/// fsync interval) or the next maintenance, whichever is due first. Both are reset when they
/// run, so this is always ahead of the last chore. (It once took the older of the two *last*
/// times plus the shorter period, which stays in the past when commits are not on a timer,
/// `fsync = "every_batch"`, the default, or come faster than maintenance: from the first
/// second on, an agent whose channel was not always busy woke at once, forever, and held a
/// core.)
fn next_chore(
    last_commit: tokio::time::Instant,
    last_maintain: tokio::time::Instant,
    commit_every: Option<Duration>,
) -> tokio::time::Instant {
    let maintain_at = last_maintain + MAINTAIN_EVERY;
    commit_every.map_or(maintain_at, |every| maintain_at.min(last_commit + every))
}

async fn recv_produced(inference: &mut Option<WriterInference>) -> Option<Produced> {
    match inference.as_mut() {
        Some(inf) => inf.rx.recv().await,
        None => None,
    }
}

/// Appends `items`, waiting for space under `full_policy = block`. Returns what could not be
/// appended (only when forced to stop) and, with `keep`, each appended item with its seq.
async fn append_all<T: Enqueue + Send + 'static>(
    queue: &Arc<Queue>,
    mut samples: Vec<T>,
    settings: &Settings,
    force: &CancellationToken,
    keep: bool,
) -> (Vec<T>, Vec<(u64, T)>) {
    let mut kept = Vec::new();
    loop {
        let q = queue.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut seqs = Vec::new();
            let r = q.append_numbered(&samples, keep.then_some(&mut seqs));
            (r, samples, seqs)
        })
        .await;
        let (r, back, seqs) = match result {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "The queue writer panicked; samples of this batch are lost.");
                return (Vec::new(), kept);
            }
        };
        samples = back;
        match r {
            Ok(out) => {
                let accepted: Vec<T> = samples.drain(..out.accepted).collect();
                if keep {
                    kept.extend(seqs.into_iter().zip(accepted));
                }
                if samples.is_empty() {
                    return (Vec::new(), kept);
                }
                tracing::debug!(
                    waiting = samples.len(),
                    "Queue full: waiting for the uplink to free space."
                );
                // Wait for a useful amount of room (hysteresis), not for the first freed
                // record: fewer, larger batches mean fewer fsyncs and less flash wear.
                let want = samples
                    .iter()
                    .map(Enqueue::size)
                    .sum::<u64>()
                    .min(settings.queue.max_bytes / 8);
                loop {
                    tokio::select! {
                        _ = force.cancelled() => return (samples, kept),
                        _ = queue.space_freed().notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if queue.room() >= want {
                        break;
                    }
                }
            }
            Err(e) => {
                // Disk full or an I/O error: keep the samples and retry; sources feel
                // backpressure through the bounded channel meanwhile.
                tracing::error!(error = %e, records = samples.len(), "Cannot append to the queue; retrying in 1 s.");
                tokio::select! {
                    _ = force.cancelled() => return (samples, kept),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let q = queue.clone();
                let _ = tokio::task::spawn_blocking(move || q.recover()).await;
            }
        }
    }
}

async fn commit(queue: &Arc<Queue>) {
    let q = queue.clone();
    match tokio::task::spawn_blocking(move || q.commit()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "Queue commit failed; records stay unsent until the next one succeeds.")
        }
        Err(e) => tracing::error!(error = %e, "Queue commit panicked."),
    }
}

async fn maintain(queue: &Arc<Queue>) {
    let q = queue.clone();
    match tokio::task::spawn_blocking(move || q.maintain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "Queue maintenance failed."),
        Err(e) => tracing::error!(error = %e, "Queue maintenance panicked."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// An idle writer (sources open, nothing arriving) sleeps until its next chore, for every
    /// fsync policy. It once woke at once, forever, from its first second on (holding a core;
    /// `next_chore`): the runtime's busy time (wall time spent polling tasks, which a
    /// preempted busy loop still accrues) then was most of the run. Each policy runs on its
    /// own thread, all at once.
    #[cfg(target_has_atomic = "64")]
    #[test]
    fn an_idle_writer_sleeps_between_chores() {
        const RUN: Duration = Duration::from_secs(3);
        let policies = [
            "",
            "fsync = \"interval_ms\"\nfsync_interval_ms = 100\n",
            "fsync = \"interval_ms\"\nfsync_interval_ms = 5000\n",
            "fsync = \"never\"\n",
        ];
        let runs: Vec<_> = policies
            .iter()
            .map(|queue| {
                let toml = format!(
                    "device_id = \"d1\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n[queue]\n{queue}"
                );
                std::thread::spawn(move || {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let settings = Settings::from_toml(&toml, "test.toml", Vec::new())
                        .expect("settings");
                    let (queue, _) = Queue::open(
                        dir.path(),
                        settings.queue.clone(),
                        Arc::new(Metrics::default()),
                    )
                    .expect("queue");
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        let (tx, rx) = mpsc::channel::<Sample>(16);
                        let force = CancellationToken::new();
                        let writer = tokio::spawn(run(
                            Arc::new(settings),
                            Arc::new(queue),
                            rx,
                            None,
                            CancellationToken::new(),
                            CancellationToken::new(),
                            force.clone(),
                        ));
                        tokio::time::sleep(RUN).await;
                        force.cancel();
                        drop(tx);
                        writer.await.expect("writer");
                    });
                    (toml, rt.metrics().worker_total_busy_duration(0))
                })
            })
            .collect();
        for r in runs {
            let (toml, busy) = r.join().expect("run");
            assert!(
                busy < RUN / 4,
                "an idle writer kept its runtime busy for {busy:?} of {RUN:?} (it must sleep between chores), with:\n{toml}"
            );
        }
    }
}
