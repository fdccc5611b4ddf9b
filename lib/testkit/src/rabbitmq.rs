//! A private RabbitMQ per test, speaking AMQP 1.0 (the `rabbitmq_amqp1_0` plugin of Debian's
//! `rabbitmq-server`): the real AMQP 1.0 broker the Event Hubs source's transport is tested
//! against.

use std::fs;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::kill_group;
use crate::{POLL_INTERVAL, free_port, localhost};

/// Where Debian's `rabbitmq-server` package puts the server's own start script (the one in
/// /usr/sbin switches to the `rabbitmq` user and its system-wide data directory).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Erlang starts in seconds, RabbitMQ's boot steps take a few more on a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// The user the plugin maps AMQP 1.0 connections to (SASL PLAIN).
pub const RABBITMQ_USER: &str = "guest";
pub const RABBITMQ_PASSWORD: &str = "guest";

/// `rabbitmq-server` with the AMQP 1.0 plugin on an ephemeral 127.0.0.1 port, its node name,
/// Erlang distribution port, epmd port, data, logs and cookie in a temp dir. Killed (the whole
/// process group, and its epmd) when dropped.
pub struct TestRabbitMq {
    port: u16,
    epmd_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestRabbitMq {
    /// Starts RabbitMQ and waits until its AMQP listener accepts connections after the
    /// server reported its start-up complete.
    ///
    /// Panics if `rabbitmq-server` is not installed (saying how to install it) or does not
    /// start.
    pub fn start() -> TestRabbitMq {
        assert!(
            Path::new(SERVER).exists(),
            "this test needs RabbitMQ with its AMQP 1.0 plugin ({SERVER} is missing): run \
             `apt-get install rabbitmq-server` or `bash scripts/install-deps.sh`"
        );
        let mut last_err = String::new();
        // The ports were free when picked; another process may take one before the node binds.
        for _ in 0..3 {
            let mut r = TestRabbitMq {
                port: free_port(),
                epmd_port: free_port(),
                dir: tempfile::Builder::new()
                    .prefix("ember-rabbitmq-")
                    .tempdir()
                    .expect("cannot create a temp dir for RabbitMQ"),
                child: None,
            };
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last_err = e,
            }
        }
        panic!("RabbitMQ did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// RabbitMQ's output (for failure messages).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("rabbitmq.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let dist_port = free_port();
        fs::write(d.join("enabled_plugins"), "[rabbitmq_amqp1_0].\n")
            .map_err(|e| format!("cannot write enabled_plugins: {e}"))?;
        fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n\
                 amqp1_0.default_user = {RABBITMQ_USER}\n",
                self.port
            ),
        )
        .map_err(|e| format!("cannot write rabbitmq.conf: {e}"))?;
        let log_path = d.join("rabbitmq.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log_path.display()))?;
        let node = format!("ember-{}-{}@localhost", std::process::id(), self.port);
        let mut child = Command::new(SERVER)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", d.join("plugins-expand"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: the start script, beam and its helpers die together.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {SERVER}: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.stop_epmd();
                return Err(format!(
                    "rabbitmq-server exited with {status} (port {}); its output:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            if self.log_text().contains("Server startup complete")
                && TcpStream::connect_timeout(&localhost(self.port), Duration::from_millis(200))
                    .is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_group(&mut child);
                self.stop_epmd();
                return Err(format!(
                    "RabbitMQ did not accept AMQP on port {} within {START_TIMEOUT:?}; its output:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            std::thread::sleep(POLL_INTERVAL * 5);
        }
    }

    /// The node started an epmd of its own on `epmd_port`; it outlives the node unless told,
    /// and refuses while the dying node is still registered: ask until it is gone.
    fn stop_epmd(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = Command::new("epmd")
                .args(["-port", &self.epmd_port.to_string(), "-kill"])
                .stdin(Stdio::null())
                .output();
            let Ok(out) = out else { return };
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            // "Killed", or no epmd there any more ("Cannot connect to local epmd").
            if text.contains("Killed") || text.contains("Cannot connect") {
                return;
            }
            std::thread::sleep(POLL_INTERVAL * 5);
        }
    }
}

impl Drop for TestRabbitMq {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
        self.stop_epmd();
    }
}
