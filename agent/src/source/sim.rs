//! A deterministic multichannel signal generator: a stand-in for a real sensor.
//!
//! The signal is IMU-like: channel `c` is a sum of two sinusoids (a fundamental between 0.5 and
//! 3 Hz, like a walking cadence, plus its second harmonic) around an offset, with a little
//! noise. Channels 0-2 look like an accelerometer in m/s² (channel 2 carries gravity), channels
//! 3-5 like a gyroscope in rad/s; further channels repeat the pattern with other parameters.
//! Every parameter and every noise value is drawn from `fastrand::Rng::with_seed`, so sample
//! `k` of a given `(seed, channels, rate_hz)` is always the same: tests and benchmarks can
//! rely on it.
//!
//! Pacing (shared with `replay` through `Pacer`): sample `k` is due `k / rate_hz` seconds
//! after the start and carries the timestamp `start + k / rate_hz`, so timestamps are evenly
//! spaced and the long-run rate is exact. The task wakes at most once per millisecond and emits
//! every sample due by then, so 100 kHz costs 1000 wake-ups a second, not 100 000.
//!
//! Backpressure: a full channel makes the source wait. If it falls more than `MAX_LAG`
//! behind its schedule (the consumer stalled), it re-anchors the schedule at the present
//! instead of bursting out the backlog with stale timestamps: the timestamps then show a gap,
//! as they would for a real sensor whose readings nobody collected.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::schema::Guard;
use super::{Sample, SourceError, now_us};
use crate::metrics::Metrics;

/// The shortest sleep between two wake-ups; at higher rates each wake-up emits several samples.
pub(crate) const MIN_TICK: Duration = Duration::from_millis(1);

/// How far behind schedule a paced source may fall before it skips ahead (see module docs).
pub(crate) const MAX_LAG: Duration = Duration::from_secs(1);

/// Generates samples from `seed` at `rate_hz` until `shutdown` fires or the receiver closes.
#[allow(clippy::too_many_arguments)] // The signature the source dispatcher calls.
pub async fn run(
    stream: Arc<str>,
    rate_hz: f64,
    channels: usize,
    seed: u64,
    mut guard: Guard,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    check_rate(rate_hz)?;
    if !(1..=super::socket::MAX_VALUES).contains(&channels) {
        return Err(invalid_setting(format!(
            "sim source {stream:?}: channels = {channels} is out of range: use 1-{}",
            super::socket::MAX_VALUES
        )));
    }
    let span = tracing::info_span!("source", kind = "sim", stream = %stream);
    async move {
        tracing::info!(rate_hz, channels, seed, "Simulated source started.");
        let signal = Signal::new(seed, channels, rate_hz);
        let mut pacer = Pacer::new(rate_hz);
        loop {
            let now = Instant::now();
            pacer.catch_up(now);
            let due = pacer.due(now);
            while pacer.next < due {
                let k = pacer.next;
                let sample = Sample {
                    stream: stream.clone(),
                    ts_us: pacer.ts_us(k),
                    values: signal.sample(k),
                    origin: None,
                };
                pacer.next += 1;
                if guard.admit(&sample).is_err() {
                    // Only a recorded schema of another width gets here: counted and logged.
                    continue;
                }
                if !send(&tx, sample, &shutdown).await {
                    tracing::info!("Simulated source stopped.");
                    return Ok(());
                }
                metrics.captured.fetch_add(1, Relaxed);
            }
            if !pacer.sleep(now, &tx, &shutdown).await {
                tracing::info!("Simulated source stopped.");
                return Ok(());
            }
        }
    }
    .instrument(span)
    .await
}

/// The deterministic signal: a pure function of the sample index.
#[derive(Debug, Clone)]
pub struct Signal {
    seed: u64,
    rate_hz: f64,
    channels: Vec<Channel>,
}

#[derive(Debug, Clone, PartialEq)]
struct Channel {
    offset: f64,
    amplitude: f64,
    freq_hz: f64,
    phase: f64,
    harmonic: f64,
    noise: f64,
}

impl Signal {
    pub fn new(seed: u64, channels: usize, rate_hz: f64) -> Signal {
        let mut rng = fastrand::Rng::with_seed(seed);
        let channels = (0..channels)
            .map(|c| {
                let accel = c % 6 < 3;
                let (offset, amplitude) = if accel {
                    // Gravity on the z axis of each accelerometer triple.
                    (if c % 6 == 2 { 9.81 } else { 0.0 }, 0.5 + 1.5 * rng.f64())
                } else {
                    (0.0, 0.1 + 0.9 * rng.f64())
                };
                Channel {
                    offset,
                    amplitude,
                    freq_hz: 0.5 + 2.5 * rng.f64(),
                    phase: std::f64::consts::TAU * rng.f64(),
                    harmonic: 0.1 + 0.3 * rng.f64(),
                    noise: 0.02 * amplitude,
                }
            })
            .collect();
        Signal {
            seed,
            rate_hz,
            channels,
        }
    }

    /// Sample `k`, i.e. the values at `k / rate_hz` seconds after the start.
    pub fn sample(&self, k: u64) -> Vec<f32> {
        let t = k as f64 / self.rate_hz;
        // Noise is seeded per sample so that sample k does not depend on which samples came before.
        let mut rng = fastrand::Rng::with_seed(self.seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.channels
            .iter()
            .map(|ch| {
                let w = std::f64::consts::TAU * ch.freq_hz * t + ch.phase;
                // Triangular noise in [-noise, noise]: cheap and bounded.
                let noise = ch.noise * (rng.f64() - rng.f64());
                (ch.offset + ch.amplitude * (w.sin() + ch.harmonic * (2.0 * w).sin()) + noise)
                    as f32
            })
            .collect()
    }
}

/// The schedule of a paced source: when sample `k` is due and which timestamp it carries.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    rate_hz: f64,
    start: Instant,
    start_us: u64,
    /// Index of the next sample to emit.
    pub(crate) next: u64,
}

impl Pacer {
    pub(crate) fn new(rate_hz: f64) -> Pacer {
        Pacer::starting_at(rate_hz, Instant::now(), now_us())
    }

    pub(crate) fn starting_at(rate_hz: f64, start: Instant, start_us: u64) -> Pacer {
        Pacer {
            rate_hz,
            start,
            start_us,
            next: 0,
        }
    }

    /// One past the index of the last sample due at `now` (sample 0 is due at the start).
    pub(crate) fn due(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        // `as` saturates, so an absurd elapsed time cannot wrap.
        ((elapsed * self.rate_hz).floor() as u64).saturating_add(1)
    }

    /// The timestamp of sample `k`: evenly spaced from the start.
    pub(crate) fn ts_us(&self, k: u64) -> u64 {
        self.start_us
            .saturating_add((k as f64 * 1e6 / self.rate_hz).round() as u64)
    }

    /// When sample `k` is due; `None` if that is too far away to represent.
    pub(crate) fn deadline(&self, k: u64) -> Option<Instant> {
        let offset = Duration::try_from_secs_f64(k as f64 / self.rate_hz).ok()?;
        self.start.checked_add(offset)
    }

    /// If the next sample is more than `MAX_LAG` overdue, moves the schedule forward so that
    /// it is due `now`; returns how far it moved.
    pub(crate) fn catch_up(&mut self, now: Instant) -> Option<Duration> {
        let lag = now.saturating_duration_since(self.deadline(self.next)?);
        if lag <= MAX_LAG {
            return None;
        }
        self.start += lag;
        self.start_us = self.start_us.saturating_add(lag.as_micros() as u64);
        tracing::warn!(
            behind_ms = lag.as_millis() as u64,
            "Source fell behind its schedule (the consumer is slower than the configured rate); skipping ahead, so timestamps will show a gap."
        );
        Some(lag)
    }

    /// Sleeps until the next sample is due, but at least [`MIN_TICK`] after `woke` (when the
    /// last wake-up began). Returns `false` if the source should stop instead.
    pub(crate) async fn sleep(
        &self,
        woke: Instant,
        tx: &mpsc::Sender<Sample>,
        shutdown: &CancellationToken,
    ) -> bool {
        let earliest = woke + MIN_TICK;
        // A deadline too far away to represent: wake once a day to check again.
        let wake = self
            .deadline(self.next)
            .unwrap_or_else(|| woke + Duration::from_secs(86_400))
            .max(earliest);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = tx.closed() => false,
            _ = tokio::time::sleep_until(wake) => true,
        }
    }
}

/// Sends `sample`, waiting while the channel is full. Returns `false` if the source should stop:
/// `shutdown` fired or the receiver is gone.
pub(crate) async fn send(
    tx: &mpsc::Sender<Sample>,
    sample: Sample,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        sent = tx.send(sample) => sent.is_ok(),
    }
}

/// Whether the `n`-th rejection (1-based) of one source should be logged: the first ten, then
/// every thousandth, so a stream of garbage cannot flood the log.
pub(crate) fn should_warn(n: u64) -> bool {
    n <= 10 || n.is_multiple_of(1000)
}

/// Rejects a rate that would make the schedule meaningless (the config already checks it).
pub(crate) fn check_rate(rate_hz: f64) -> Result<(), SourceError> {
    if rate_hz.is_finite() && rate_hz > 0.0 {
        Ok(())
    } else {
        Err(invalid_setting(format!(
            "rate_hz = {rate_hz} is not a positive rate: use a rate in (0, 100000] Hz"
        )))
    }
}

pub(crate) fn invalid_setting(message: String) -> SourceError {
    SourceError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        message,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn recv(rx: &mut mpsc::Receiver<Sample>) -> Sample {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("timed out waiting for a sample")
            .expect("source closed the channel")
    }

    async fn join(task: tokio::task::JoinHandle<Result<(), SourceError>>) {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("source did not stop in time")
            .expect("source task panicked")
            .expect("source returned an error");
    }

    #[test]
    fn signal_is_deterministic_and_seed_dependent() {
        let a = Signal::new(7, 6, 100.0);
        let b = Signal::new(7, 6, 100.0);
        let c = Signal::new(8, 6, 100.0);
        for k in [0, 1, 2, 99, 12_345, u64::MAX / 3] {
            assert_eq!(a.sample(k), b.sample(k), "sample {k}");
            assert_ne!(a.sample(k), c.sample(k), "sample {k}");
        }
        // Sample k does not depend on whether earlier samples were computed.
        assert_eq!(Signal::new(7, 6, 100.0).sample(500), a.sample(500));
    }

    #[test]
    fn signal_looks_like_an_imu() {
        let s = Signal::new(1, 12, 100.0);
        let n = 1000;
        let mut mean = [0.0f64; 12];
        for k in 0..n {
            let v = s.sample(k);
            assert_eq!(v.len(), 12);
            for (c, x) in v.iter().enumerate() {
                assert!(x.is_finite());
                assert!(x.abs() < 20.0, "channel {c} value {x} out of range");
                mean[c] += f64::from(*x) / n as f64;
            }
        }
        // Gravity sits on the z accelerometer channel of each triple of six.
        assert!((mean[2] - 9.81).abs() < 1.0, "z mean {}", mean[2]);
        assert!((mean[8] - 9.81).abs() < 1.0, "z mean {}", mean[8]);
        assert!(mean[0].abs() < 1.0 && mean[3].abs() < 1.0);
        // The signal moves: consecutive samples differ.
        assert_ne!(s.sample(10), s.sample(11));
    }

    #[test]
    fn pacer_schedule_is_exact() {
        let start = Instant::now();
        let p = Pacer::starting_at(1000.0, start, 1_000_000);
        assert_eq!(p.due(start), 1);
        assert_eq!(p.due(start + Duration::from_micros(999)), 1);
        assert_eq!(p.due(start + Duration::from_millis(1)), 2);
        assert_eq!(p.due(start + Duration::from_secs(10)), 10_001);
        assert_eq!(p.ts_us(0), 1_000_000);
        assert_eq!(p.ts_us(1), 1_001_000);
        assert_eq!(p.ts_us(10_000), 11_000_000);
        assert_eq!(p.deadline(5), Some(start + Duration::from_millis(5)));

        // A rate that does not divide a second still stays on schedule in the long run.
        let p = Pacer::starting_at(3.0, start, 0);
        assert_eq!(p.ts_us(1), 333_333);
        assert_eq!(p.ts_us(2), 666_667);
        assert_eq!(p.ts_us(3_000_000), 1_000_000_000_000);
        assert_eq!(p.due(start + Duration::from_secs(100)), 301);

        // 100 kHz: ten samples are due per 0.1 ms.
        let p = Pacer::starting_at(100_000.0, start, 0);
        assert_eq!(p.due(start + Duration::from_micros(100)), 11);
        assert_eq!(p.ts_us(7), 70);
    }

    #[test]
    fn pacer_skips_ahead_only_when_far_behind() {
        let start = Instant::now();
        let mut p = Pacer::starting_at(100.0, start, 0);
        p.next = 50; // due at 0.5 s
        assert_eq!(p.catch_up(start + Duration::from_millis(1400)), None);
        assert_eq!(p.ts_us(50), 500_000);
        let moved = p
            .catch_up(start + Duration::from_millis(2500))
            .expect("should skip ahead");
        assert_eq!(moved, Duration::from_secs(2));
        // The next sample is now due at once and stamped with the present.
        assert_eq!(p.deadline(50), Some(start + Duration::from_millis(2500)));
        assert_eq!(p.ts_us(50), 2_500_000);
        assert_eq!(p.ts_us(51), 2_510_000);
    }

    #[test]
    fn tiny_rates_do_not_overflow() {
        let start = Instant::now();
        let p = Pacer::starting_at(1e-300, start, 5);
        assert_eq!(p.due(start + Duration::from_secs(1_000_000)), 1);
        assert_eq!(p.deadline(1), None);
        assert_eq!(p.ts_us(1), u64::MAX);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let logged: Vec<u64> = (1..=5000).filter(|n| should_warn(*n)).collect();
        assert_eq!(
            logged,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 2000, 3000, 4000, 5000]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn emits_evenly_spaced_deterministic_samples() {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(1024);
        let task = tokio::spawn(run(
            "imu".into(),
            1000.0,
            6,
            42,
            Guard::open(&metrics),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));

        let mut got = Vec::new();
        for _ in 0..50 {
            got.push(recv(&mut rx).await);
        }
        shutdown.cancel();
        join(task).await;
        let mut rest = 0;
        while rx.try_recv().is_ok() {
            rest += 1;
        }
        assert_eq!(metrics.captured.load(Relaxed), 50 + rest);

        let signal = Signal::new(42, 6, 1000.0);
        for (k, s) in got.iter().enumerate() {
            assert_eq!(&*s.stream, "imu");
            assert_eq!(s.values, signal.sample(k as u64), "sample {k}");
            assert_eq!(
                s.ts_us - got[0].ts_us,
                k as u64 * 1000,
                "sample {k} is not 1 ms after the first"
            );
        }
        let now = now_us();
        assert!(
            got[0].ts_us <= now && now - got[0].ts_us < 60_000_000,
            "first timestamp is not recent"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn high_rates_emit_several_samples_per_tick() {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(100_000);
        let task = tokio::spawn(run(
            "fast".into(),
            100_000.0,
            3,
            1,
            Guard::open(&metrics),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        let mut prev: Option<u64> = None;
        for k in 0..20_000u64 {
            let s = recv(&mut rx).await;
            assert_eq!(s.values.len(), 3);
            if let Some(p) = prev {
                assert_eq!(s.ts_us - p, 10, "sample {k}");
            }
            prev = Some(s.ts_us);
        }
        shutdown.cancel();
        join(task).await;
        assert!(metrics.captured.load(Relaxed) >= 20_000);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stops_on_shutdown_while_blocked_on_a_full_channel() {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(2);
        let task = tokio::spawn(run(
            "imu".into(),
            10_000.0,
            6,
            1,
            Guard::open(&metrics),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        // Wait until the channel is full, so the source is blocked in send.
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.captured.load(Relaxed) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("source never filled the channel");
        shutdown.cancel();
        join(task).await;
        assert_eq!(
            metrics.captured.load(Relaxed),
            2,
            "nothing is counted that was not sent"
        );
        assert!(rx.recv().await.is_some());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stops_when_the_receiver_is_dropped() {
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = mpsc::channel(8);
        // A slow rate, so the source is asleep (not sending) when the receiver goes away.
        let task = tokio::spawn(run(
            "imu".into(),
            0.01,
            6,
            1,
            Guard::open(&metrics),
            tx,
            metrics.clone(),
            CancellationToken::new(),
        ));
        recv(&mut rx).await;
        drop(rx);
        join(task).await;
        assert_eq!(metrics.captured.load(Relaxed), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rejects_impossible_settings() {
        let metrics = Arc::new(Metrics::default());
        for (rate, channels) in [(0.0, 6), (f64::NAN, 6), (-1.0, 6), (100.0, 0), (100.0, 257)] {
            let (tx, _rx) = mpsc::channel(8);
            let err = run(
                "imu".into(),
                rate,
                channels,
                1,
                Guard::open(&metrics),
                tx,
                metrics.clone(),
                CancellationToken::new(),
            )
            .await
            .expect_err("settings should be refused");
            let msg = err.to_string();
            assert!(msg.contains("rate_hz") || msg.contains("channels"), "{msg}");
        }
    }
}
