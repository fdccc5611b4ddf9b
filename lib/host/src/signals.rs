//! The two-stage shutdown both daemons use: the first SIGTERM or SIGINT cancels `shutdown`
//! (drain gracefully, bounded by the program's grace period); the second cancels `force` and
//! exits the process at once with status 130.

use tokio_util::sync::CancellationToken;

/// What the handler logs at each stage (the consequences differ per program).
#[derive(Debug, Clone, Copy)]
pub struct Messages {
    /// Logged at INFO on the first signal.
    pub draining: &'static str,
    /// Logged at WARN on the second signal, just before exiting.
    pub exiting: &'static str,
}

/// Installs the SIGTERM and SIGINT handlers and spawns the task that drives the two stages.
/// Must run inside a tokio runtime with signal support.
pub fn spawn_two_stage(
    shutdown: CancellationToken,
    force: CancellationToken,
    messages: Messages,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!("{}", messages.draining);
                shutdown.cancel();
            } else {
                tracing::warn!("{}", messages.exiting);
                force.cancel();
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
