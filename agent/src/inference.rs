//! On-device inference: windows of source streams → signed models → results in the durable queue.
//!
//! ```text
//!  writer ──Tap (try_send)──▶ [bounded std channel] ──▶ inference thread ──Produced──▶ writer ──▶ Queue
//!                                                         ▲ swap (between batches)
//!                                  InferenceHandle::swap ─┘
//! ```
//!
//! # Lifecycle
//!
//! At start-up [`load_models`] reads every `[[model]]` bundle, verifies its signature against
//! `inference.trusted_keys` and its weights' SHA-256, checks its input spec against the
//! source it windows, loads it (int8 is dequantized once) and runs its golden vectors. Any
//! failure refuses the start (exit code 2) with one message naming the bundle and the problem.
//! Then [`spawn`] starts one dedicated OS thread that owns every model.
//!
//! # Guarantees
//!
//! * **Invariant: capture never waits on inference.** The writer hands samples to the thread
//!   with `try_send` on a bounded channel (`inference.queue_samples`). When the thread falls
//!   behind, samples bypass inference: the windows they belonged to are skipped and counted in
//!   `inference_windows_skipped_total{reason="behind"}`, and windowing restarts after the gap. Raw forwarding
//!   and the queue are unaffected (with `forward_raw = "all"`).
//! * A stream's windows are evaluated in capture order; each result goes to the queue as one
//!   record of the inference stream `{source}.{model}`, which gets its own contiguous sequence
//!   numbers from the queue (a window whose evaluation failed produces no record, so it leaves
//!   no gap: it is counted in `inference_errors_total`).
//! * **Invariant: a swap is atomic between batches.** [`InferenceHandle::swap`] verifies the
//!   new bundle and runs its golden vectors *before* handing it to the thread, which installs it
//!   between two model calls: every window is evaluated exactly once, results before carry
//!   the old version and results after the new one. A refused bundle changes nothing.
//! * **Shadow evaluation** ([`InferenceHandle::shadow`], for OTA) runs a candidate model on the
//!   same batches as the serving one, after the serving model's call and on the same thread: it
//!   never changes the serving model's results or their order, and capture still never waits
//!   (a slower thread only means more windows skipped, as above). The comparison (same class
//!   label; same anomaly verdict) and both models' latencies come back once `windows` windows
//!   have been compared.
//! * Windows are `window` samples long, one every `hop` samples, per the manifest; a window
//!   is laid out `[channel][sample]` as [`LoadedModel::infer`] expects.
//! * **A misfit never silences a stream.** Sources refuse samples that do not fit their
//!   stream's schema (`source::schema`), so a model normally never sees one. As a second line
//!   of defence a sample of another channel count, or with NaN/Inf, is left out here: the
//!   windows that would hold it are skipped and counted in
//!   `inference_windows_skipped_total{reason="misfit"}` (a thread that fell behind counts
//!   under `reason="behind"`), and the next `window` good samples make the next window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_models::baseline::window_stats;
use ember_models::manifest::OutputSpec;
use ember_models::{Bundle, Device, LoadedModel, Output, TrustedKeys};
use ember_proto::{Capture, InferenceOutput, InferenceRecord, InputStats};

use crate::config::{
    Backend, CaptureSettings, ForwardRaw, InferenceSettings, Settings, SourceSettings,
};
use crate::metrics::Metrics;
use crate::queue::{InferenceItem, StoredInference};
use crate::source::Sample;

/// Why a model could not be put into service. Each names the bundle file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("cannot load the trusted model keys: {0}")]
    Keys(#[from] ember_models::keys::KeyError),
    #[error("model bundle {path}: {source}")]
    Read {
        path: String,
        source: ember_models::bundle::BundleFileError,
    },
    #[error("model bundle {path}: refused: {source}")]
    Verify {
        path: String,
        source: ember_models::BundleError,
    },
    #[error("model bundle {path}: cannot load the weights: {source}")]
    Load {
        path: String,
        source: ember_models::ModelError,
    },
    #[error("model bundle {path}: golden vectors fail on this device: {source}")]
    Golden {
        path: String,
        source: ember_models::ModelError,
    },
    #[error("model bundle {path}: does not fit source {source_stream:?}: {message}")]
    Spec {
        path: String,
        source_stream: String,
        message: String,
    },
    #[error(
        "model bundle {path}: inference stream {stream:?} is already produced by {other}: one model name per source"
    )]
    Duplicate {
        path: String,
        stream: String,
        other: String,
    },
    #[error(
        "source {source_stream:?} has forward_raw = \"anomalies\" but no anomaly model: add one or use \"all\"/\"none\""
    )]
    NoAnomalyModel { source_stream: String },
    #[error("inference stream name {stream:?} is not usable: {why}")]
    StreamName { stream: String, why: &'static str },
    #[error("cannot start the inference thread: {0}")]
    Thread(std::io::Error),
    #[error("inference backend {backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

/// Why a swap was refused (the current model keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Bundle(#[from] InferenceError),
    #[error("no model serves inference stream {stream:?}")]
    UnknownStream { stream: String },
    #[error(
        "the new model's input ({new}) differs from the serving model's ({old}): a swap must keep channels, window and hop"
    )]
    InputChanged { old: String, new: String },
    #[error(
        "the new model is {new:?}, the serving one {old:?}: a swap replaces a model by another version of itself"
    )]
    NameChanged { old: String, new: String },
    #[error("the inference thread has stopped")]
    Stopped,
}

/// A verified, loaded model with its identity.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    pub name: String,
    pub version: String,
    /// The source stream it windows and the inference stream it produces.
    pub source: Arc<str>,
    pub stream: Arc<str>,
    pub bundle: PathBuf,
    pub model: LoadedModel,
    /// Which raw windows go to the capture stream `{stream}.capture` (kept across swaps).
    pub capture: CaptureSettings,
}

impl ModelSlot {
    fn input_text(&self) -> String {
        let i = self.model.input();
        format!(
            "{} channels, window {}, hop {}",
            i.channels, i.window, i.hop
        )
    }
}

/// The burn device for a configured backend, constructed explicitly (never
/// `Device::default()`, which picks by a fixed priority that feature unification can change).
pub fn device(backend: Backend) -> Result<Device, InferenceError> {
    match backend {
        Backend::Flex => Ok(Device::flex()),
        Backend::Wgpu => wgpu_device(),
    }
}

/// The process's one wgpu device: burn refuses to create a second, so it is made once (the
/// adapter is acquired here, so a machine without one fails at start, with instructions) and
/// cloned for every user.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, InferenceError> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            ember_models::Backend::Wgpu
                .device()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|message| InferenceError::Backend {
            backend: "wgpu",
            message,
        })
}

/// The config refuses `wgpu` in builds without the feature; this is the backstop.
#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, InferenceError> {
    Err(InferenceError::Backend {
        backend: "wgpu",
        message: "not compiled into this agent: build it with `--features wgpu`".into(),
    })
}

/// Reads the trusted public keys.
pub fn trusted_keys(settings: &InferenceSettings) -> Result<TrustedKeys, InferenceError> {
    Ok(TrustedKeys::from_files(&settings.trusted_keys)?)
}

/// Reads, verifies, loads and golden-checks one bundle (no source check).
pub fn prepare_bundle(
    path: &Path,
    trusted: &TrustedKeys,
    device: &Device,
) -> Result<(Bundle, LoadedModel), InferenceError> {
    let shown = path.display().to_string();
    let bundle = Bundle::read_file(path).map_err(|source| InferenceError::Read {
        path: shown.clone(),
        source,
    })?;
    bundle
        .verify(trusted)
        .map_err(|source| InferenceError::Verify {
            path: shown.clone(),
            source,
        })?;
    let model = LoadedModel::load(&bundle, device).map_err(|source| InferenceError::Load {
        path: shown.clone(),
        source,
    })?;
    model
        .run_golden()
        .map_err(|source| InferenceError::Golden {
            path: shown.clone(),
            source,
        })?;
    Ok((bundle, model))
}

/// Checks what can be known of a source before it runs: its declared channel count (`channels`
/// of any source) and a sim source's sample rate. (A replay's `rate_hz` is its playback pace,
/// not the data's sample rate. A stream whose schema is only recorded in the queue is checked
/// by the runtime once the queue is open; one fixed by its first sample is then held to it by
/// the source, and the model thread skips a window a misfit would be in.)
fn check_source(
    path: &Path,
    source: &SourceSettings,
    model: &LoadedModel,
) -> Result<(), InferenceError> {
    let spec = model.input();
    let mismatch = |message: String| InferenceError::Spec {
        path: path.display().to_string(),
        source_stream: source.stream().to_string(),
        message,
    };
    if let Some(channels) = source.declared_channels()
        && channels != spec.channels
    {
        return Err(mismatch(format!(
            "the model takes {} channels, the source produces {channels}",
            spec.channels
        )));
    }
    if let SourceSettings::Sim { rate_hz, .. } = source
        && (rate_hz - spec.sample_rate_hz).abs() > 1e-6 * spec.sample_rate_hz.max(1.0)
    {
        return Err(mismatch(format!(
            "the model was trained at {} Hz, the source samples at {rate_hz} Hz",
            spec.sample_rate_hz
        )));
    }
    Ok(())
}

/// Loads every configured model (see the module docs). Any failure refuses the start.
pub fn load_models(settings: &Settings) -> Result<Vec<ModelSlot>, InferenceError> {
    if settings.models.is_empty() {
        return Ok(Vec::new());
    }
    let trusted = trusted_keys(&settings.inference)?;
    let device = device(settings.inference.backend)?;
    let mut slots: Vec<ModelSlot> = Vec::new();
    for m in &settings.models {
        let (bundle, model) = prepare_bundle(&m.bundle, &trusted, &device)?;
        // The config checked that the source exists.
        if let Some(src) = settings.sources.iter().find(|s| s.stream() == m.source) {
            check_source(&m.bundle, src, &model)?;
        }
        let manifest = bundle.manifest();
        let stream = format!("{}.{}", m.source, manifest.name);
        ember_proto::check_name(&stream).map_err(|why| InferenceError::StreamName {
            stream: stream.clone(),
            why,
        })?;
        if let Some(other) = slots.iter().find(|s| *s.stream == *stream) {
            return Err(InferenceError::Duplicate {
                path: m.bundle.display().to_string(),
                stream,
                other: other.bundle.display().to_string(),
            });
        }
        slots.push(ModelSlot {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            source: m.source.as_str().into(),
            stream: stream.into(),
            bundle: m.bundle.clone(),
            model,
            capture: m.capture.clone(),
        });
    }
    if settings.inference.forward_raw == ForwardRaw::Anomalies {
        for s in &slots {
            let has_anomaly = slots.iter().any(|o| {
                o.source == s.source
                    && matches!(o.model.output_spec(), OutputSpec::AnomalyScore { .. })
            });
            if !has_anomaly {
                return Err(InferenceError::NoAnomalyModel {
                    source_stream: s.source.to_string(),
                });
            }
        }
    }
    Ok(slots)
}

/// One sample of a model-fed source, with the number that links results to it (`source_seq`).
#[derive(Debug, Clone)]
pub struct Tap {
    pub stream: Arc<str>,
    pub seq: u64,
    pub ts_us: u64,
    pub values: Vec<f32>,
}

/// What the inference thread hands the writer to append.
#[derive(Debug)]
pub enum Produced {
    Result(InferenceItem),
    /// A raw sample to forward (`forward_raw = "anomalies"`).
    Raw(Sample),
}

struct SwapRequest {
    slot: ModelSlot,
    done: std::sync::mpsc::Sender<()>,
}

/// What the OTA client asks of the inference thread, between batches.
enum Control {
    Swap(SwapRequest),
    Shadow(ShadowRequest),
    CancelShadow(Arc<str>),
}

struct ShadowRequest {
    stream: Arc<str>,
    model: LoadedModel,
    windows: u32,
    done: std::sync::mpsc::Sender<ShadowOutcome>,
}

/// How a candidate model compared with the serving one on the same live windows.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowOutcome {
    /// Windows compared.
    pub windows: u32,
    /// Windows on which both gave the same class label (classifiers) or anomaly verdict.
    pub agreed: u32,
    /// Time spent in the serving model's and the candidate's calls on the compared batches.
    pub serving_us: u64,
    pub candidate_us: u64,
    /// The candidate failed to evaluate a batch (the comparison stopped there).
    pub error: Option<String>,
}

impl ShadowOutcome {
    pub fn agreement(&self) -> f64 {
        if self.windows == 0 {
            0.0
        } else {
            f64::from(self.agreed) / f64::from(self.windows)
        }
    }

    /// Mean candidate latency over mean serving latency, on the same batches.
    pub fn latency_ratio(&self) -> f64 {
        self.candidate_us.max(1) as f64 / self.serving_us.max(1) as f64
    }
}

struct Shadow {
    model: LoadedModel,
    want: u32,
    outcome: ShadowOutcome,
    done: std::sync::mpsc::Sender<ShadowOutcome>,
}

/// The samples waiting for the inference thread: at most `cap`, as with
/// `sync_channel(cap)`, but its memory grows and shrinks with what is queued. `sync_channel`
/// reserves every slot up front (1 MiB at the default 16,384 samples), all of it resident once
/// the ring has gone round: a tenth of a device agent's memory.
#[derive(Clone)]
struct TapSender {
    tx: std::sync::mpsc::Sender<Tap>,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

impl TapSender {
    /// Queues `t` unless `cap` samples are waiting or the thread is gone.
    fn try_send(&self, t: Tap) -> bool {
        // Counted before the send and uncounted after the receive: never below zero.
        if self.queued.fetch_add(1, Relaxed) >= self.cap {
            self.queued.fetch_sub(1, Relaxed);
            return false;
        }
        if self.tx.send(t).is_err() {
            self.queued.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }
}

struct TapReceiver {
    rx: Receiver<Tap>,
    queued: Arc<AtomicUsize>,
}

impl TapReceiver {
    fn recv_timeout(&self, wait: Duration) -> Result<Tap, RecvTimeoutError> {
        let t = self.rx.recv_timeout(wait)?;
        self.queued.fetch_sub(1, Relaxed);
        Ok(t)
    }

    fn try_recv(&self) -> Option<Tap> {
        let t = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(1, Relaxed);
        Some(t)
    }
}

fn tap_channel(cap: usize) -> (TapSender, TapReceiver) {
    let (tx, rx) = std::sync::mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        TapSender {
            tx,
            queued: queued.clone(),
            cap,
        },
        TapReceiver { rx, queued },
    )
}

/// Feeds the inference thread and swaps its models. Cloneable; the thread stops once every
/// handle's tap side is gone (see [`InferenceHandle::close_taps`]).
#[derive(Clone)]
pub struct InferenceHandle {
    taps: Option<TapSender>,
    swaps: std::sync::mpsc::Sender<Control>,
    active: Arc<Mutex<Vec<ModelSlot>>>,
    metrics: Arc<Metrics>,
    trusted: Arc<TrustedKeys>,
    device: Device,
}

impl InferenceHandle {
    /// Hands a sample to the thread without waiting. Returns false (and counts it) when the
    /// thread is behind.
    pub fn tap(&self, t: Tap) -> bool {
        let Some(tx) = &self.taps else {
            return false;
        };
        let queued = tx.try_send(t);
        if !queued {
            self.metrics.inference_samples_skipped.fetch_add(1, Relaxed);
        }
        queued
    }

    /// Drops this handle's tap sender: when no handle has one, the thread flushes and stops.
    pub fn close_taps(&mut self) {
        self.taps = None;
    }

    /// The models serving now: `(inference stream, name, version)`.
    pub fn active(&self) -> Vec<(String, String, String)> {
        lock(&self.active)
            .iter()
            .map(|s| (s.stream.to_string(), s.name.clone(), s.version.clone()))
            .collect()
    }

    /// Verifies `bundle` (signature, weights, golden vectors) and, if it is good, replaces the
    /// model of inference stream `stream` between two batches. Returns once it serves. A bad
    /// bundle is refused and the current model keeps serving.
    pub fn swap(&self, stream: &str, bundle: &Path) -> Result<(), SwapError> {
        let slot = self.candidate(stream, bundle)?;
        let (done, wait) = std::sync::mpsc::channel();
        self.swaps
            .send(Control::Swap(SwapRequest { slot, done }))
            .map_err(|_| SwapError::Stopped)?;
        wait.recv().map_err(|_| SwapError::Stopped)
    }

    /// Verifies `bundle` like [`InferenceHandle::swap`], then runs it beside the model of
    /// `stream` on that model's next `windows` windows without changing what is served. The
    /// outcome arrives on the returned channel once `windows` windows were compared (a newer
    /// shadow request for the same stream replaces this one, closing the channel).
    pub fn shadow(
        &self,
        stream: &str,
        bundle: &Path,
        windows: u32,
    ) -> Result<Receiver<ShadowOutcome>, SwapError> {
        let slot = self.candidate(stream, bundle)?;
        let (done, wait) = std::sync::mpsc::channel();
        self.swaps
            .send(Control::Shadow(ShadowRequest {
                stream: slot.stream.clone(),
                model: slot.model,
                windows: windows.max(1),
                done,
            }))
            .map_err(|_| SwapError::Stopped)?;
        Ok(wait)
    }

    /// Stops a shadow evaluation of `stream`, if one runs.
    pub fn cancel_shadow(&self, stream: &str) {
        let _ = self.swaps.send(Control::CancelShadow(stream.into()));
    }

    /// The bundle at `bundle`, verified and loaded, as a replacement for the model of `stream`.
    fn candidate(&self, stream: &str, bundle: &Path) -> Result<ModelSlot, SwapError> {
        let (b, model) = prepare_bundle(bundle, &self.trusted, &self.device)?;
        let current = lock(&self.active)
            .iter()
            .find(|s| &*s.stream == stream)
            .cloned()
            .ok_or_else(|| SwapError::UnknownStream {
                stream: stream.to_string(),
            })?;
        let manifest = b.manifest();
        if manifest.name != current.name {
            return Err(SwapError::NameChanged {
                old: current.name,
                new: manifest.name.clone(),
            });
        }
        let slot = ModelSlot {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            bundle: bundle.to_path_buf(),
            model,
            ..current.clone()
        };
        let (old_in, new_in) = (current.model.input(), slot.model.input());
        if (old_in.channels, old_in.window, old_in.hop)
            != (new_in.channels, new_in.window, new_in.hop)
        {
            return Err(SwapError::InputChanged {
                old: current.input_text(),
                new: slot.input_text(),
            });
        }
        Ok(slot)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the inference thread for `slots`. Results and forwarded raw samples go to `out`.
pub fn spawn(
    slots: Vec<ModelSlot>,
    settings: &InferenceSettings,
    metrics: Arc<Metrics>,
    out: tokio::sync::mpsc::Sender<Produced>,
) -> Result<(InferenceHandle, std::thread::JoinHandle<()>), InferenceError> {
    let trusted = Arc::new(trusted_keys(settings)?);
    let device = device(settings.backend)?;
    let (tap_tx, tap_rx) = tap_channel(settings.queue_samples);
    let (swap_tx, swap_rx) = std::sync::mpsc::channel();
    let active = Arc::new(Mutex::new(slots.clone()));
    publish_models(&metrics, &slots);
    let engine = Engine::new(slots, settings, metrics.clone(), out, active.clone());
    let thread = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || engine.run(tap_rx, swap_rx))
        .map_err(InferenceError::Thread)?;
    Ok((
        InferenceHandle {
            taps: Some(tap_tx),
            swaps: swap_tx,
            active,
            metrics,
            trusted,
            device,
        },
        thread,
    ))
}

fn publish_models(metrics: &Metrics, slots: &[ModelSlot]) {
    let mut m = lock(&metrics.models);
    m.clear();
    for s in slots {
        m.insert(s.name.clone(), s.version.clone());
    }
}

/// Cuts one stream into windows.
struct Windower {
    channels: usize,
    window: usize,
    hop: usize,
    /// `(seq, ts_us, values)` of the last `window` samples.
    buf: VecDeque<(u64, u64, Vec<f32>)>,
    /// Samples since windowing (re)started.
    count: u64,
    /// The seq the next sample should have (0: none seen yet).
    expected: u64,
    /// The seq at which the next window would end, were nothing skipped.
    next_end: u64,
    /// The gap before the next sample is a misfit left out, not samples the thread missed.
    misfit: bool,
}

/// What offering one sample to a [`Windower`] did.
#[derive(Default)]
struct Offer {
    /// Why the sample was left out, if it does not fit the model.
    misfit: Option<String>,
    /// Windows skipped before it because the thread was behind, or because of a misfit.
    behind: u64,
    misfits: u64,
    window: Option<Window>,
}

struct Window {
    slot: usize,
    data: Vec<f32>,
    first_ts: u64,
    last_ts: u64,
    first_seq: u64,
    last_seq: u64,
}

impl Windower {
    fn new(channels: usize, window: usize, hop: usize) -> Self {
        Windower {
            channels,
            window,
            hop: hop.max(1),
            buf: VecDeque::with_capacity(window),
            count: 0,
            expected: 0,
            next_end: 0,
            misfit: false,
        }
    }

    /// Offers a sample. Second line of defence behind the sources' schema check: a sample the
    /// model cannot take (another channel count, NaN/Inf) is left out, so the windows that
    /// would hold it are skipped (`reason="misfit"`, counted when the next sample arrives) and
    /// windowing restarts after it: the next `window` good samples make the next window.
    fn offer(&mut self, t: &Tap, slot: usize) -> Offer {
        let misfit = if t.values.len() != self.channels {
            Some(format!(
                "has {} values, the model takes {}",
                t.values.len(),
                self.channels
            ))
        } else {
            t.values
                .iter()
                .position(|v| !v.is_finite())
                .map(|c| format!("has a non-finite value in channel {c}"))
        };
        if misfit.is_some() {
            self.misfit = true;
            return Offer {
                misfit,
                ..Offer::default()
            };
        }
        let was_misfit = std::mem::take(&mut self.misfit);
        let (skipped, window) = self.push(t, slot);
        let (behind, misfits) = if was_misfit {
            (0, skipped)
        } else {
            (skipped, 0)
        };
        Offer {
            misfit: None,
            behind,
            misfits,
            window,
        }
    }

    /// Adds a sample; returns the number of windows skipped by a gap before it, and the window
    /// it completes, if any.
    fn push(&mut self, t: &Tap, slot: usize) -> (u64, Option<Window>) {
        let mut skipped = 0;
        if self.expected != 0 && t.seq != self.expected {
            // Samples were skipped (the thread was behind): restart after the gap.
            let restart_end = t.seq + self.window as u64 - 1;
            if self.next_end != 0 && restart_end > self.next_end {
                skipped = (restart_end - self.next_end).div_ceil(self.hop as u64);
            }
            self.buf.clear();
            self.count = 0;
        }
        if self.count == 0 {
            self.next_end = t.seq + self.window as u64 - 1;
        }
        self.expected = t.seq + 1;
        self.buf.push_back((t.seq, t.ts_us, t.values.clone()));
        if self.buf.len() > self.window {
            self.buf.pop_front();
        }
        self.count += 1;
        if t.seq != self.next_end {
            return (skipped, None);
        }
        self.next_end += self.hop as u64;
        let mut data = Vec::with_capacity(self.channels * self.window);
        for c in 0..self.channels {
            data.extend(self.buf.iter().map(|(_, _, v)| v[c]));
        }
        let (first_seq, first_ts) = self.buf.front().map_or((0, 0), |(s, ts, _)| (*s, *ts));
        (
            skipped,
            Some(Window {
                slot,
                data,
                first_ts,
                last_ts: t.ts_us,
                first_seq,
                last_seq: t.seq,
            }),
        )
    }
}

/// Raw samples kept for `forward_raw = "anomalies"`.
#[derive(Default)]
struct RawKeeper {
    recent: VecDeque<Tap>,
    /// Samples with seq up to this are forwarded as they arrive.
    forward_until: u64,
    /// Highest seq forwarded.
    forwarded: u64,
}

struct Engine {
    slots: Vec<ModelSlot>,
    windowers: Vec<Windower>,
    by_source: HashMap<Arc<str>, Vec<usize>>,
    raw: HashMap<Arc<str>, RawKeeper>,
    forward: ForwardRaw,
    context: u64,
    keep: usize,
    pending: Vec<Window>,
    oldest: Option<Instant>,
    max_batch: usize,
    max_delay: Duration,
    metrics: Arc<Metrics>,
    out: tokio::sync::mpsc::Sender<Produced>,
    active: Arc<Mutex<Vec<ModelSlot>>>,
    last_error_log: Option<Instant>,
    last_misfit_log: Option<Instant>,
    /// Candidate models under shadow evaluation, by inference stream.
    shadows: HashMap<Arc<str>, Shadow>,
    /// Per slot: the capture policy's recent captures (rate limit) and random state.
    captures: Vec<CaptureState>,
}

/// A slot's capture policy at run time.
struct CaptureState {
    recent: VecDeque<Instant>,
    /// xorshift64* state for `capture.sample` (seeded per slot; no security role).
    rng: u64,
}

impl CaptureState {
    fn new(seed: u64) -> CaptureState {
        CaptureState {
            recent: VecDeque::new(),
            rng: seed | 1,
        }
    }

    /// A uniform number in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Which trigger, if any, captures this window, within `max_per_minute`.
    fn decide(
        &mut self,
        policy: &CaptureSettings,
        out: &InferenceOutput,
        now: Instant,
    ) -> Option<&'static str> {
        if !policy.enabled() {
            return None;
        }
        let trigger = match out {
            InferenceOutput::Anomaly {
                anomalous: true, ..
            } if policy.anomalies => Some("anomaly"),
            InferenceOutput::Class { probabilities, .. }
                if policy
                    .below_confidence
                    .is_some_and(|t| probabilities.iter().copied().fold(0.0f32, f32::max) < t) =>
            {
                Some("low_confidence")
            }
            _ => None,
        };
        let trigger = match trigger {
            Some(t) => Some(t),
            None if policy.sample > 0.0 && self.uniform() < policy.sample => Some("sample"),
            None => None,
        };
        trigger?;
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= policy.max_per_minute as usize {
            return None;
        }
        self.recent.push_back(now);
        trigger
    }
}

impl Engine {
    fn new(
        slots: Vec<ModelSlot>,
        settings: &InferenceSettings,
        metrics: Arc<Metrics>,
        out: tokio::sync::mpsc::Sender<Produced>,
        active: Arc<Mutex<Vec<ModelSlot>>>,
    ) -> Self {
        let mut by_source: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        let mut windowers = Vec::new();
        let mut keep = 0;
        let slots_len = slots.len();
        for (i, s) in slots.iter().enumerate() {
            by_source.entry(s.source.clone()).or_default().push(i);
            let input = s.model.input();
            windowers.push(Windower::new(input.channels, input.window, input.hop));
            let context = settings.anomaly_context_windows;
            // Enough history for the context before a window, plus the samples that arrive
            // while a batch waits to be run.
            keep = keep.max(input.window + context * input.hop + settings.max_batch * input.hop);
        }
        let raw = by_source
            .keys()
            .map(|k| (k.clone(), RawKeeper::default()))
            .collect();
        Engine {
            slots,
            windowers,
            by_source,
            raw,
            forward: settings.forward_raw,
            context: settings.anomaly_context_windows as u64,
            keep: keep + 1024,
            pending: Vec::new(),
            oldest: None,
            max_batch: settings.max_batch,
            max_delay: Duration::from_millis(settings.max_delay_ms),
            metrics,
            out,
            active,
            last_error_log: None,
            last_misfit_log: None,
            captures: (0..slots_len)
                .map(|i| {
                    CaptureState::new(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1) ^ seed_from_clock())
                })
                .collect(),
            shadows: HashMap::new(),
        }
    }

    fn run(mut self, taps: TapReceiver, swaps: Receiver<Control>) {
        loop {
            // Swaps land here, between batches: never inside one.
            while let Ok(req) = swaps.try_recv() {
                self.install(req);
            }
            let wait = match self.oldest {
                Some(t) => self.max_delay.saturating_sub(t.elapsed()),
                // Wake up now and then to take swaps while no data flows.
                None => Duration::from_millis(50),
            };
            match taps.recv_timeout(wait) {
                Ok(t) => {
                    self.on_sample(t);
                    // Take what is already waiting without blocking, up to a batch.
                    while self.pending.len() < self.max_batch {
                        match taps.try_recv() {
                            Some(t) => self.on_sample(t),
                            None => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    while let Ok(req) = swaps.try_recv() {
                        self.install(req);
                    }
                    self.run_pending();
                    return;
                }
            }
            let due = self.oldest.is_some_and(|t| t.elapsed() >= self.max_delay);
            if self.pending.len() >= self.max_batch || due {
                self.run_pending();
            }
        }
    }

    fn install(&mut self, control: Control) {
        let req = match control {
            Control::Swap(req) => req,
            Control::Shadow(req) => {
                tracing::info!(stream = %req.stream, windows = req.windows, "Shadow evaluation started.");
                self.shadows.insert(
                    req.stream,
                    Shadow {
                        model: req.model,
                        want: req.windows,
                        outcome: ShadowOutcome {
                            windows: 0,
                            agreed: 0,
                            serving_us: 0,
                            candidate_us: 0,
                            error: None,
                        },
                        done: req.done,
                    },
                );
                return;
            }
            Control::CancelShadow(stream) => {
                self.shadows.remove(&stream);
                return;
            }
        };
        if let Some(i) = self.slots.iter().position(|s| s.stream == req.slot.stream) {
            tracing::info!(
                stream = %req.slot.stream, from = %self.slots[i].version, to = %req.slot.version,
                bundle = %req.slot.bundle.display(), "Model swapped."
            );
            self.slots[i] = req.slot;
            *lock(&self.active) = self.slots.clone();
            publish_models(&self.metrics, &self.slots);
        }
        let _ = req.done.send(());
    }

    fn on_sample(&mut self, t: Tap) {
        let Some(idx) = self.by_source.get(&t.stream).cloned() else {
            return;
        };
        for i in idx {
            let offer = self.windowers[i].offer(&t, i);
            if let Some(why) = &offer.misfit {
                let msg = format!(
                    "sample {} of {} {why}: the windows holding it are skipped (model {})",
                    t.seq, t.stream, self.slots[i].name,
                );
                self.log_misfit(&msg);
            }
            self.metrics
                .inference_windows_skipped
                .fetch_add(offer.behind, Relaxed);
            self.metrics
                .inference_windows_misfit
                .fetch_add(offer.misfits, Relaxed);
            let window = offer.window;
            if let Some(window) = window {
                self.oldest.get_or_insert_with(Instant::now);
                self.pending.push(window);
            }
        }
        if self.forward == ForwardRaw::Anomalies {
            self.keep_raw(t);
        }
    }

    fn keep_raw(&mut self, t: Tap) {
        let keep = self.keep;
        let Some(k) = self.raw.get_mut(&t.stream) else {
            return;
        };
        if t.seq <= k.forward_until && t.seq > k.forwarded {
            k.forwarded = t.seq;
            let s = Sample {
                stream: t.stream.clone(),
                ts_us: t.ts_us,
                values: t.values.clone(),
                origin: None,
            };
            let _ = self.out.blocking_send(Produced::Raw(s));
        }
        k.recent.push_back(t);
        while k.recent.len() > keep {
            k.recent.pop_front();
        }
    }

    /// Forwards the raw samples of `first..=last` and of `context` windows either side.
    fn forward_around(&mut self, source: &Arc<str>, first: u64, last: u64, hop: u64) {
        let span = self.context * hop;
        let (lo, hi) = (first.saturating_sub(span), last + span);
        let Some(k) = self.raw.get_mut(source) else {
            return;
        };
        for t in k.recent.iter() {
            if t.seq >= lo && t.seq <= hi && t.seq > k.forwarded {
                k.forwarded = t.seq;
                let s = Sample {
                    stream: t.stream.clone(),
                    ts_us: t.ts_us,
                    values: t.values.clone(),
                    origin: None,
                };
                let _ = self.out.blocking_send(Produced::Raw(s));
            }
        }
        k.forward_until = k.forward_until.max(hi);
    }

    fn run_pending(&mut self) {
        self.oldest = None;
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        // Group by model, keeping each stream's window order.
        let mut groups: BTreeMap<usize, Vec<Window>> = BTreeMap::new();
        for w in pending {
            groups.entry(w.slot).or_default().push(w);
        }
        for (slot, windows) in groups {
            let mut rest = windows;
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().min(self.max_batch));
                self.run_batch(slot, rest);
                rest = tail;
            }
        }
    }

    fn run_batch(&mut self, slot: usize, windows: Vec<Window>) {
        let s = &self.slots[slot];
        let mut input = Vec::with_capacity(windows.len() * s.model.window_len());
        for w in &windows {
            input.extend_from_slice(&w.data);
        }
        let started = Instant::now();
        let result = s.model.infer(&input);
        let latency = started.elapsed();
        let latency_us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        let output = match result {
            Ok(o) => o,
            Err(e) => {
                self.metrics
                    .inference_errors
                    .fetch_add(windows.len() as u64, Relaxed);
                let msg = format!("model {} failed on {} windows: {e}", s.name, windows.len());
                self.log_error(&msg);
                return;
            }
        };
        self.metrics
            .inference_latency_us_sum
            .fetch_add(latency.as_micros() as u64, Relaxed);
        self.metrics.inference_batches.fetch_add(1, Relaxed);
        self.metrics
            .inference_windows
            .fetch_add(windows.len() as u64, Relaxed);
        let labels = match s.model.output_spec() {
            OutputSpec::Classes { labels } => labels.clone(),
            OutputSpec::AnomalyScore { .. } => Vec::new(),
        };
        if !self.shadows.is_empty() {
            let stream = s.stream.clone();
            self.shadow_batch(&stream, &input, &output, &labels, latency);
        }
        let s = &self.slots[slot];
        let (name, version, stream, source) = (
            s.name.clone(),
            s.version.clone(),
            s.stream.clone(),
            s.source.clone(),
        );
        let hop = s.model.input().hop as u64;
        let (samples, channels, norm) = (
            s.model.input().window,
            s.model.input().channels,
            s.model.input().normalization.clone(),
        );
        let capture_policy = s.capture.clone();
        let capture_stream: Arc<str> = format!("{stream}.capture").into();
        for (i, w) in windows.iter().enumerate() {
            let values = output.window(i);
            let out = match &output {
                Output::Classes { .. } => {
                    let class = argmax(values);
                    InferenceOutput::Class {
                        label: labels.get(class).cloned().unwrap_or_default(),
                        class: class as u32,
                        probabilities: values.to_vec(),
                    }
                }
                Output::Anomaly { threshold, .. } => {
                    let score = values.first().copied().unwrap_or(f32::NAN);
                    InferenceOutput::Anomaly {
                        score,
                        threshold: *threshold,
                        anomalous: score > *threshold,
                    }
                }
            };
            if self.forward == ForwardRaw::Anomalies
                && matches!(
                    out,
                    InferenceOutput::Anomaly {
                        anomalous: true,
                        ..
                    }
                )
            {
                self.forward_around(&source, w.first_seq, w.last_seq, hop);
            }
            let trigger = self.captures[slot].decide(&capture_policy, &out, Instant::now());
            let stored = StoredInference {
                source: source.to_string(),
                record: InferenceRecord {
                    seq: 0,
                    ts: w.last_ts,
                    window_start: w.first_ts,
                    source_seq: w.last_seq,
                    model: name.clone(),
                    version: version.clone(),
                    latency_us,
                    output: out,
                    input: {
                        let (mean_z, std_ratio) =
                            window_stats(&w.data, samples, &norm.mean, &norm.std);
                        Some(InputStats { mean_z, std_ratio })
                    },
                    capture: None,
                },
            };
            let captured = trigger.map(|t| {
                let mut c = stored.clone();
                c.record.capture = Some(Capture {
                    trigger: t.to_string(),
                    channels: channels as u32,
                    window: w.data.clone(),
                });
                (t, c)
            });
            let mut items = vec![(stream.clone(), stored)];
            if let Some((t, c)) = captured {
                items.push((capture_stream.clone(), c));
                self.metrics.count_capture(t);
            }
            for (stream, stored) in items {
                match InferenceItem::new(stream, &stored) {
                    Ok(item) => {
                        if self.out.blocking_send(Produced::Result(item)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        self.metrics.inference_errors.fetch_add(1, Relaxed);
                        self.log_error(&format!("cannot encode a result: {e}"));
                    }
                }
            }
        }
    }

    /// Runs the shadow candidate of `stream` (if any) on the batch the serving model just
    /// evaluated, and compares window by window. Sends the outcome once enough windows were seen.
    fn shadow_batch(
        &mut self,
        stream: &Arc<str>,
        input: &[f32],
        serving: &Output,
        serving_labels: &[String],
        serving_latency: Duration,
    ) {
        let Some(sh) = self.shadows.get_mut(stream) else {
            return;
        };
        let started = Instant::now();
        let result = sh.model.infer(input);
        let candidate_latency = started.elapsed();
        let o = &mut sh.outcome;
        match result {
            Ok(candidate) => {
                let n = serving
                    .windows()
                    .min(candidate.windows())
                    .min((sh.want - o.windows) as usize);
                let candidate_labels: &[String] = match sh.model.output_spec() {
                    OutputSpec::Classes { labels } => labels,
                    OutputSpec::AnomalyScore { .. } => &[],
                };
                for w in 0..n {
                    if same_verdict(serving, serving_labels, &candidate, candidate_labels, w) {
                        o.agreed += 1;
                    }
                }
                o.windows += n as u32;
                o.serving_us += serving_latency.as_micros() as u64;
                o.candidate_us += candidate_latency.as_micros() as u64;
            }
            Err(e) => o.error = Some(e.to_string()),
        }
        if (o.windows >= sh.want || o.error.is_some())
            && let Some(sh) = self.shadows.remove(stream)
        {
            tracing::info!(
                stream = %stream, windows = sh.outcome.windows, agreed = sh.outcome.agreed,
                "Shadow evaluation finished."
            );
            let _ = sh.done.send(sh.outcome);
        }
    }

    fn log_misfit(&mut self, msg: &str) {
        if self
            .last_misfit_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_misfit_log = Some(Instant::now());
            tracing::warn!(
                problem = %msg,
                "A sample does not fit its model; windows without it are counted in inference_windows_skipped_total{{reason=\"misfit\"}}."
            );
        }
    }

    fn log_error(&mut self, msg: &str) {
        // Rate-limited: a model that fails on every window must not flood the log.
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_error_log = Some(Instant::now());
            tracing::error!(error = %msg, "Inference failed; windows without a result are counted in inference_errors_total.");
        }
    }
}

/// Whether two models agree on window `w`: the same class label (by name, so a model whose
/// labels were reordered disagrees) or the same anomaly verdict.
fn same_verdict(
    a: &Output,
    a_labels: &[String],
    b: &Output,
    b_labels: &[String],
    w: usize,
) -> bool {
    match (a, b) {
        (Output::Classes { .. }, Output::Classes { .. }) => {
            let (ka, kb) = (argmax(a.window(w)), argmax(b.window(w)));
            match (a_labels.get(ka), b_labels.get(kb)) {
                (Some(la), Some(lb)) => la == lb,
                _ => ka == kb,
            }
        }
        (Output::Anomaly { threshold: ta, .. }, Output::Anomaly { threshold: tb, .. }) => {
            let (sa, sb) = (a.window(w)[0], b.window(w)[0]);
            (sa > *ta) == (sb > *tb)
        }
        _ => false,
    }
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// A seed for the capture sampler that differs between runs and devices.
fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bundles_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/bundles")
    }

    /// Every committed bundle verifies with the dev key and reproduces its golden vectors on
    /// flex. CI also runs this under qemu-aarch64 (`--target aarch64-unknown-linux-gnu`),
    /// where the agent is built as for devices: without `wgpu`, so ember-models runs every
    /// model through its plan and has no burn forward pass to fall back on.
    #[test]
    fn golden_vectors_of_every_committed_bundle_pass_on_flex() {
        golden_vectors_pass_on(Backend::Flex);
    }

    /// The same through the agent's wgpu path (CI: Mesa lavapipe, in `scripts/test.sh`'s
    /// step `host-tests`). A machine without a Vulkan adapter fails here with instructions.
    #[cfg(feature = "wgpu")]
    #[test]
    fn golden_vectors_of_every_committed_bundle_pass_on_wgpu() {
        golden_vectors_pass_on(Backend::Wgpu);
    }

    fn golden_vectors_pass_on(backend: Backend) {
        let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/keys/dev/dev.pub");
        let trusted = TrustedKeys::from_files(&[key]).unwrap();
        let device = device(backend).unwrap_or_else(|e| panic!("{e}"));
        let mut seen = 0;
        for entry in std::fs::read_dir(bundles_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("bundle") {
                continue;
            }
            let (_, model) = prepare_bundle(&path, &trusted, &device)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // On flex every committed model runs through ember-models' inference plan: the
            // device build (no `wgpu`, so no burn modules) could run no other way.
            assert_eq!(
                model.planned(),
                backend == Backend::Flex,
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 4, "expected the 4 committed bundles, found {seen}");
    }

    /// The device build (no `wgpu`, so ember-models without burn's modules; CI runs it under
    /// qemu-aarch64) refuses at load what only burn's modules could run, naming the build
    /// that can, instead of failing on the first window.
    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn without_burn_modules_int8_kept_quantized_is_refused_at_load() {
        let bundle = Bundle::read_file(&bundles_dir().join("activity-int8.bundle")).unwrap();
        let flex = device(Backend::Flex).unwrap();
        let e = LoadedModel::load_with(
            &bundle,
            &flex,
            ember_models::LoadOptions { dequantize: false },
        )
        .unwrap_err();
        assert!(
            matches!(e, ember_models::ModelError::Unplanned { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("burn-modules"), "{e}");
        // The default load of the same bundle runs through the plan.
        assert!(LoadedModel::load(&bundle, &flex).unwrap().planned());
    }

    #[test]
    fn the_tap_queue_holds_at_most_its_capacity_and_frees_room_as_the_thread_takes() {
        let (tx, rx) = tap_channel(2);
        assert!(tx.try_send(tap(1)));
        assert!(tx.clone().try_send(tap(2)));
        assert!(!tx.try_send(tap(3)), "a third sample must not fit");
        assert_eq!(rx.try_recv().map(|t| t.seq), Some(1));
        assert!(tx.try_send(tap(4)));
        assert!(!tx.try_send(tap(5)));
        let seqs: Vec<u64> = [rx.recv_timeout(Duration::from_secs(1)).ok(), rx.try_recv()]
            .into_iter()
            .flatten()
            .map(|t| t.seq)
            .collect();
        assert_eq!(seqs, vec![2, 4]);
        assert!(rx.try_recv().is_none());
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Timeout)
        ));
        drop(rx);
        assert!(
            !tx.try_send(tap(6)),
            "nothing is queued once the thread is gone"
        );
        assert_eq!(tx.queued.load(Relaxed), 0);
    }

    fn tap(seq: u64) -> Tap {
        Tap {
            stream: "s".into(),
            seq,
            ts_us: seq * 10,
            values: vec![seq as f32, -(seq as f32)],
        }
    }

    #[test]
    fn windows_follow_window_and_hop_and_restart_after_a_gap() {
        let mut w = Windower::new(2, 4, 2);
        let mut ends = Vec::new();
        for seq in 1..=8 {
            let (skipped, win) = w.push(&tap(seq), 0);
            assert_eq!(skipped, 0);
            if let Some(win) = win {
                ends.push(win.last_seq);
                if win.last_seq == 4 {
                    // [channel][sample]
                    assert_eq!(win.data, vec![1., 2., 3., 4., -1., -2., -3., -4.]);
                    assert_eq!((win.first_seq, win.first_ts), (1, 10));
                }
            }
        }
        assert_eq!(ends, vec![4, 6, 8]);
        // 9..=12 lost: windows ending at 10 and 12 (and 14, which needs 11) are skipped;
        // the restarted stream's first window ends at 13 + 3 = 16.
        let (skipped, win) = w.push(&tap(13), 0);
        assert!(win.is_none());
        assert_eq!(skipped, 3);
        let mut ends = Vec::new();
        for seq in 14..=18 {
            if let (_, Some(win)) = w.push(&tap(seq), 0) {
                ends.push(win.last_seq);
            }
        }
        assert_eq!(ends, vec![16, 18]);
    }

    fn tap_of(seq: u64, values: Vec<f32>) -> Tap {
        Tap {
            stream: "imu".into(),
            seq,
            ts_us: seq * 1000,
            values,
        }
    }

    /// A sample of kind `k` that does not fit a 3-channel model.
    fn misfit_values(k: u8) -> Vec<f32> {
        match k % 4 {
            0 => vec![1.0; 2],
            1 => vec![1.0; 65],
            2 => vec![1.0, f32::NAN, 1.0],
            _ => vec![f32::INFINITY, 1.0, 1.0],
        }
    }

    /// The windows (first and last seq) of a run of good samples: `window` long, every `hop`.
    fn windows_of_run(first: u64, len: u64, window: u64, hop: u64) -> Vec<(u64, u64)> {
        if len < window {
            return Vec::new();
        }
        (0..=(len - window) / hop)
            .map(|k| (first + k * hop, first + k * hop + window - 1))
            .collect()
    }

    proptest! {
        /// Any interleaving of good and misfit samples reaching the model thread: every window
        /// it forms holds only good samples, in order; each run of good samples between misfits
        /// yields exactly the windows it would yield alone (a misfit costs only the windows
        /// that would hold it, never the stream); skipped windows are counted as misfits.
        #[test]
        fn misfits_cost_only_the_windows_that_would_hold_them(
            plan in proptest::collection::vec(proptest::option::of(any::<u8>()), 1..400),
            window in 1u64..20,
            hop in 1u64..10,
        ) {
            let mut w = Windower::new(3, window as usize, hop as usize);
            let mut produced = Vec::new();
            let mut expected = Vec::new();
            let mut run_start = 1u64;
            let mut misfit_windows = 0;
            let mut behind = 0;
            for (i, step) in plan.iter().enumerate() {
                let seq = i as u64 + 1;
                let values = match step {
                    None => vec![seq as f32, 0.0, 1.0],
                    Some(k) => misfit_values(*k),
                };
                let offer = w.offer(&tap_of(seq, values), 0);
                prop_assert_eq!(offer.misfit.is_some(), step.is_some());
                misfit_windows += offer.misfits;
                behind += offer.behind;
                if let Some(win) = offer.window {
                    // [channel][sample]: channel 0 holds the seqs of the samples.
                    let seqs: Vec<u64> = win.data[..window as usize].iter().map(|v| *v as u64).collect();
                    prop_assert_eq!(seqs, (win.first_seq..=win.last_seq).collect::<Vec<_>>());
                    produced.push((win.first_seq, win.last_seq));
                }
                if step.is_some() {
                    expected.extend(windows_of_run(run_start, seq - run_start, window, hop));
                    run_start = seq + 1;
                }
            }
            let end = plan.len() as u64 + 1;
            expected.extend(windows_of_run(run_start, end - run_start, window, hop));
            prop_assert_eq!(produced, expected);
            prop_assert_eq!(behind, 0);
            if plan.iter().all(Option::is_none) {
                prop_assert_eq!(misfit_windows, 0);
            }
        }
    }

    /// A misfit in the middle of a stream: the windows that would hold it are counted as
    /// skipped for a misfit, and the next window forms as soon as enough good samples follow.
    #[test]
    fn a_misfit_skips_its_windows_and_the_next_window_runs() {
        let mut w = Windower::new(3, 4, 2);
        let mut windows = Vec::new();
        let mut misfits = 0;
        for seq in 1..=20u64 {
            let values = if seq == 7 {
                vec![0.0; 65]
            } else {
                vec![seq as f32, 0.0, 0.0]
            };
            let offer = w.offer(&tap_of(seq, values), 0);
            misfits += offer.misfits;
            if let Some(win) = offer.window {
                windows.push(win.last_seq);
            }
        }
        // Ends 4, 6 before; 8 and 10 would hold seq 7; after it the grid restarts at 8.
        assert_eq!(windows, vec![4, 6, 11, 13, 15, 17, 19]);
        assert_eq!(misfits, 2);
    }
}
