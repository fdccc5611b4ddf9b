//! A private Mosquitto broker per test.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{POLL_INTERVAL, free_port, localhost};

/// How long a starting broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for a SIGTERMed broker before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A `mosquitto` process with its own config (in a temp dir) on an ephemeral 127.0.0.1 port.
///
/// The config allows anonymous clients, keeps nothing on disk (`persistence false`) and lifts
/// Mosquitto's per-client queue limits (`max_queued_messages 0`): with the default of 1000
/// queued messages the broker silently drops QoS1 messages for a subscriber that falls behind
/// a fast publisher, and tests would blame the agent.
///
/// Killed when dropped.
pub struct TestBroker {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
    /// Mutual TLS and the Ember ACL instead of an anonymous plaintext listener.
    tls: Option<crate::tls::BrokerTls>,
    /// `persistence true` in the broker's temp dir (see [`TestBroker::start_persistent`]).
    persistent: bool,
    autosave: u32,
    /// Appended to the generated configuration.
    extra: String,
}

impl TestBroker {
    /// Starts a broker and waits until its port accepts connections.
    ///
    /// Panics if `mosquitto` is not installed (saying how to install it) or does not start.
    pub fn start() -> TestBroker {
        TestBroker::start_with(None)
    }

    /// Like [`TestBroker::start`], but the broker keeps its state on disk the way a production
    /// Mosquitto should (`persistence true`, saved every `autosave_interval` seconds and on a
    /// clean shutdown), so a restart brings back retained messages, persistent sessions and
    /// their queued messages, except what arrived since the last save. Mosquitto 2.0.11 does
    /// not bring back shared subscriptions (`$share/...`).
    pub fn start_persistent(autosave_interval_s: u32) -> TestBroker {
        let mut b = TestBroker::new_unstarted(None);
        b.persistent = true;
        b.autosave = autosave_interval_s;
        b.start_on_free_port();
        b
    }

    pub(crate) fn start_with(tls: Option<crate::tls::BrokerTls>) -> TestBroker {
        let mut b = TestBroker::new_unstarted(tls);
        b.start_on_free_port();
        b
    }

    pub(crate) fn start_extra(extra: &str) -> TestBroker {
        let mut b = TestBroker::new_unstarted(None);
        b.extra = extra.to_string();
        b.start_on_free_port();
        b
    }

    fn new_unstarted(tls: Option<crate::tls::BrokerTls>) -> TestBroker {
        let dir = tempfile::Builder::new()
            .prefix("ember-broker-")
            .tempdir()
            .expect("cannot create a temp dir for the broker");
        TestBroker {
            port: 0,
            dir,
            child: None,
            starts: 0,
            tls,
            persistent: false,
            autosave: 0,
            extra: String::new(),
        }
    }

    fn start_on_free_port(&mut self) {
        // The port was free when picked; another process may take it before mosquitto binds it.
        let mut last_err = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id while it runs (benchmarks read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the broker (SIGTERM, then SIGKILL if it lingers) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the broker with SIGKILL (no chance to save its state) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        let mut last_err = String::new();
        // The port can be held for a moment by a connection of the old process.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "mosquitto did not restart on port {}: {last_err}",
            self.port
        );
    }

    /// The broker's log (all runs).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = mosquitto_path();
        let conf = self.dir.path().join("mosquitto.conf");
        let log = self.dir.path().join("mosquitto.log");
        let mut text = match &self.tls {
            Some(tls) => tls.config(self.port, &log),
            None => config(self.port, &log),
        };
        if self.persistent {
            let data = self.dir.path().join("data");
            fs::create_dir_all(&data)
                .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
            text = text.replace("persistence false\n", "");
            text.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval {}\n",
                data.display(),
                self.autosave
            ));
        }
        text.push_str(&self.extra);
        fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        self.starts += 1;
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "mosquitto exited with {status} (port {}); its log:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            if TcpStream::connect_timeout(&localhost(self.port), Duration::from_millis(200)).is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "mosquitto did not accept connections on port {} within {START_TIMEOUT:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn config(port: u16, log: &Path) -> String {
    format!(
        "# Generated by ember-testkit.\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         max_queued_messages 0\n\
         max_queued_bytes 0\n\
         max_inflight_messages 100\n\
         set_tcp_nodelay true\n\
         log_dest file {}\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_timestamp_format %H:%M:%S\n",
        log.display()
    )
}

/// The `mosquitto` binary: on `PATH`, or where Debian installs it (`/usr/sbin`, often not on
/// a user's `PATH`).
fn mosquitto_path() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect()
        })
        .unwrap_or_default();
    candidates.extend(
        [
            "/usr/sbin/mosquitto",
            "/usr/local/sbin/mosquitto",
            "/usr/bin/mosquitto",
        ]
        .map(PathBuf::from),
    );
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "the system tests need the Mosquitto MQTT broker, and `mosquitto` is not installed: \
             run `sudo apt-get install mosquitto` (Debian/Ubuntu) or `bash scripts/install-deps.sh`"
        )
    })
}

/// Sends a signal with the `kill` utility (the workspace forbids `unsafe`, so no `libc::kill`).
pub(crate) fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = status {
        let _ = writeln!(
            std::io::stderr(),
            "ember-testkit: cannot run `kill -{sig} {pid}`: {e}"
        );
    }
}
