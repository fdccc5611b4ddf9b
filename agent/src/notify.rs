//! systemd's service notifications (`sd_notify(3)`) without libsystemd: datagrams to the socket
//! named by `NOTIFY_SOCKET`. Under the packaged unit (`Type=notify`, `WatchdogSec=`;
//! `agent/debian/ember-agent.service`) the agent says `READY=1` once it serves, `WATCHDOG=1`
//! at half the watchdog interval from the async runtime (so a frozen runtime stops feeding it
//! and systemd restarts the agent), and `STOPPING=1` when the drain starts. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager's notification socket.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); `None` when unset.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abs) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abs.as_bytes())?
            }
            None => SocketAddr::from_pathname(&name)?,
        };
        let sock = UnixDatagram::unbound()?;
        Ok(Some(Notifier { sock, addr }))
    }

    /// Sends one state string (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=...`).
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
    }
}

/// How often to feed the watchdog: half of `WATCHDOG_USEC`, if it is set for this process
/// (`WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_string_lossy().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
