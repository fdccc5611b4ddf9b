//! Wires the agent together: sources → bounded channel → writer (durable queue) → uplink.
//!
//! ```text
//!  source tasks ──Sample──▶ [bounded mpsc] ──▶ writer ──append──▶ Queue (sled) ──read──▶ uplink ──▶ MQTT
//!                                               │  commit / maintain              ◀──ack (PUBACK)──┘
//! ```
//!
//! **Invariant:** the writer (`writer.rs`) is the only task that appends to the queue or
//! changes its files (`commit`, `maintain`, `compact`), so storage lifecycle operations never
//! race each other.
//!
//! Shutdown: the first SIGTERM/SIGINT cancels `shutdown`. Sources stop, the writer appends
//! whatever is still in the channel and commits, and the uplink drains the queue for up to
//! `shutdown.grace_ms` before disconnecting cleanly. A second signal cancels `force` and the
//! process exits at once; with `fsync = every_batch` nothing appended can be lost that way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::inference::{self, InferenceError};
use crate::metrics::{self, Metrics};
use crate::queue::{Queue, QueueError};
use crate::source::{self, Sample};
use crate::uplink::{DrainOutcome, Uplink};
use crate::writer::{self, WriterInference};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(
        "cannot listen for metrics on {addr}: {source} (change metrics.listen or free the port)"
    )]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("internal task failed: {0}")]
    Task(String),
    /// A model could not be put into service: the agent refuses to start (exit code 2).
    #[error(transparent)]
    Model(#[from] InferenceError),
    /// A stream's declared schema contradicts the recorded one, or a model's input (exit 2).
    #[error("{0}")]
    Schema(String),
}

/// Each source's recorded channel count, checked against the declared one and against the
/// models that window the stream (see `source::schema`).
fn check_schemas(
    settings: &Settings,
    queue: &Queue,
    slots: &[inference::ModelSlot],
) -> Result<Vec<Option<usize>>, AgentError> {
    let mut recorded = Vec::new();
    for (i, s) in settings.sources.iter().enumerate() {
        let stream = s.stream();
        let stored = queue.channels(stream);
        if let (Some(declared), Some(stored)) = (s.declared_channels(), stored)
            && declared != stored
        {
            return Err(AgentError::Schema(format!(
                "source[{i}].channels: stream {stream:?} is recorded with {stored} channels in {}, the configuration declares {declared}: a stream's schema does not change; give the source a new stream name (or set channels = {stored})",
                settings.data_dir.display()
            )));
        }
        let channels = s.declared_channels().or(stored);
        for slot in slots.iter().filter(|m| &*m.source == stream) {
            let want = slot.model.input().channels;
            if let Some(c) = channels
                && c != want
            {
                return Err(AgentError::Schema(format!(
                    "model {} ({}) takes {want} channels but stream {stream:?} has {c}: feed the model a stream of {want} channels",
                    slot.name,
                    slot.bundle.display()
                )));
            }
        }
        recorded.push(stored);
    }
    Ok(recorded)
}

/// What a run ended with.
#[derive(Debug)]
pub struct RunReport {
    pub outcome: DrainOutcome,
    pub queued_at_exit: u64,
}

/// Runs the agent until `shutdown` (then drains) or `force` (then stops at once).
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<RunReport, AgentError> {
    let metrics = Arc::new(Metrics::default());
    // OTA first: crash-loop accounting and the verified active slot decide which bundle each
    // model loads (crate::ota).
    let (settings, ota_startup) = if settings.ota.enabled {
        let m = metrics.clone();
        tokio::task::spawn_blocking(move || {
            let mut settings = settings;
            let startup = crate::ota::startup(&mut settings, &m);
            (settings, Some(startup))
        })
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?
    } else {
        (settings, None)
    };
    let settings = Arc::new(settings);
    // Before anything is opened: TLS files that stopped loading since the config was checked.
    let tls = crate::tls::setup(&settings, &metrics).map_err(AgentError::Tls)?;

    // Models first: a bad bundle refuses the start before any file is written.
    let slots = {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || inference::load_models(&s))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))??
    };
    for s in &slots {
        tracing::info!(
            model = %s.name, version = %s.version, source = %s.source, stream = %s.stream,
            bundle = %s.bundle.display(), "Model verified, golden vectors pass; serving."
        );
    }

    let queue = {
        let (dir, qs, m) = (
            settings.data_dir.clone(),
            settings.queue.clone(),
            metrics.clone(),
        );
        let (queue, report) = tokio::task::spawn_blocking(move || Queue::open(&dir, qs, m))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))??;
        if let Some(reset) = &report.reset {
            tracing::error!(
                reason = %reset.reason, moved_to = %reset.moved_to.display(),
                "The queue was unreadable and was replaced by an empty one; its records are lost."
            );
        }
        if report.corrupt > 0 {
            tracing::warn!(
                records = report.corrupt,
                "Dropped corrupt records found in the queue at start-up."
            );
        }
        tracing::info!(
            device = %settings.device_id, records = report.records, bytes = report.bytes,
            data_dir = %settings.data_dir.display(), "Opened the durable queue."
        );
        Arc::new(queue)
    };
    // Before any port is bound: a schema that contradicts the recorded one refuses the start.
    let recorded = check_schemas(&settings, &queue, &slots)?;

    let metrics_task = match settings.metrics.listen {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsBind { addr, source })?;
            tracing::info!(%addr, "Serving Prometheus metrics at /metrics.");
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                settings.device_id.clone(),
                force.clone(),
            )))
        }
        None => None,
    };

    let (tx, rx) = mpsc::channel::<Sample>(crate::config::DEFAULT_SAMPLE_CHANNEL);
    let mut sources = Vec::new();
    for (s, recorded) in settings.sources.clone().into_iter().zip(recorded) {
        let (tx, m, stop) = (tx.clone(), metrics.clone(), shutdown.clone());
        let durable: Arc<dyn source::DurableOrigin> = queue.clone();
        let name = s.stream().to_string();
        sources.push(tokio::spawn(async move {
            match source::run(s, recorded, durable, tx, m, stop).await {
                Ok(()) => tracing::info!(stream = %name, "Source finished."),
                Err(e) => tracing::error!(stream = %name, error = %e, "Source failed; the other sources carry on."),
            }
        }));
    }
    drop(tx);

    let mut inference_thread = None;
    let writer_inference = if slots.is_empty() {
        None
    } else {
        let fed = slots.iter().map(|s| s.source.clone()).collect();
        let (out_tx, out_rx) = mpsc::channel(crate::config::DEFAULT_SAMPLE_CHANNEL);
        let (handle, thread) =
            inference::spawn(slots, &settings.inference, metrics.clone(), out_tx)?;
        inference_thread = Some(thread);
        Some(WriterInference {
            handle,
            fed,
            forward: settings.inference.forward_raw,
            rx: out_rx,
        })
    };

    let ota_shared = ota_startup
        .as_ref()
        .map(|s| crate::ota::OtaShared::new(s.reports()));
    if let (Some(startup), Some(shared)) = (ota_startup, &ota_shared) {
        let fault = crate::ota::FaultHook::from_env();
        for (model, version) in startup.serving() {
            fault.arm(&model, &version);
        }
        let handle = writer_inference.as_ref().map(|w| w.handle.clone());
        crate::ota::spawn(
            settings.clone(),
            startup,
            handle,
            shared.clone(),
            metrics.clone(),
        )
        .map_err(|e| AgentError::Task(format!("cannot start the OTA thread: {e}")))?;
    }

    let writer_done = CancellationToken::new();
    let writer = tokio::spawn(writer::run(
        settings.clone(),
        queue.clone(),
        rx,
        writer_inference,
        writer_done.clone(),
        shutdown.clone(),
        force.clone(),
    ));
    // Serving: tell systemd (Type=notify), feed its watchdog from this runtime, and say when
    // the drain starts (crate::notify; nothing happens outside systemd).
    let notify_task = match crate::notify::Notifier::from_env() {
        Ok(Some(n)) => {
            if let Err(e) = n.send("READY=1") {
                tracing::warn!(error = %e, "Could not notify systemd that the agent is ready.");
            }
            let (stop, interval) = (shutdown.clone(), crate::notify::watchdog_interval());
            Some(tokio::spawn(async move {
                // The watchdog is fed through the drain too: it ends when the process does.
                let mut stopping = false;
                loop {
                    let tick = async {
                        match interval {
                            Some(i) => tokio::time::sleep(i).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled(), if !stopping => {
                            stopping = true;
                            let _ = n.send("STOPPING=1");
                        }
                        _ = tick => {
                            let _ = n.send("WATCHDOG=1");
                        }
                    }
                }
            }))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd.");
            None
        }
    };
    let uplink = Uplink::new(settings.clone(), queue.clone(), metrics.clone())
        .with_tls(tls)
        .with_ota(ota_shared.clone());
    let outcome = uplink
        .run(shutdown.clone(), writer_done.clone(), force.clone())
        .await;
    // The OTA thread stops at its next wait (a download in progress resumes at the next start).
    if let Some(o) = &ota_shared {
        o.close();
    }

    // The uplink has finished: make sure everything else stops too.
    shutdown.cancel();
    if !force.is_cancelled() {
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
    for s in sources {
        s.abort();
    }
    force.cancel();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(t) = notify_task {
        t.abort();
    }
    if let Some(t) = inference_thread
        && t.is_finished()
    {
        let _ = t.join();
    }
    let q = queue.clone();
    let _ = tokio::task::spawn_blocking(move || q.close()).await;
    let queued_at_exit = queue.len().0;
    match outcome {
        DrainOutcome::Drained => tracing::info!("Queue drained; agent stopped."),
        DrainOutcome::GraceExpired => {
            tracing::warn!(
                records = queued_at_exit,
                "Stopped with records still queued; they will be sent after the next start."
            )
        }
    }
    Ok(RunReport {
        outcome,
        queued_at_exit,
    })
}
