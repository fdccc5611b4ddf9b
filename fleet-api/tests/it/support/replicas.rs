//! `ember-fleet` replicas as real processes (the binary built for these tests), for what an
//! in-process fleet cannot show: SIGKILL, a process replaced, several replicas at once.
//!
//! Each replica has its own config file, data dir, log file and HTTP port; it keeps its HTTP
//! port and client id across [`FleetProcess::restart`] (a StatefulSet's pod coming back).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_testkit::{free_port, wait_until};
use serde_json::Value;

use super::{WAIT, config, fleet_bin, http};

/// One `ember-fleet run` process; killed when dropped.
pub struct FleetProcess {
    pub port: u16,
    pub client_id: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
    /// Extra environment of the process (e.g. AWS credentials for a local emulator).
    env: Vec<(String, String)>,
}

impl FleetProcess {
    /// Starts a replica on `db_url` against the broker with `client_id` and `extra` config
    /// (TOML tables), and waits until it is healthy.
    /// `data_dir` is shared by the replicas of one test (their `fs` model store is one shared
    /// volume).
    pub fn start(
        db_url: &str,
        broker_port: u16,
        client_id: &str,
        data_dir: &std::path::Path,
        extra: &str,
    ) -> FleetProcess {
        Self::start_full(db_url, broker_port, client_id, data_dir, "", extra, &[])
    }

    /// [`FleetProcess::start`] with extra environment variables.
    pub fn start_env(
        db_url: &str,
        broker_port: u16,
        client_id: &str,
        data_dir: &std::path::Path,
        extra: &str,
        env: &[(&str, &str)],
    ) -> FleetProcess {
        Self::start_full(db_url, broker_port, client_id, data_dir, "", extra, env)
    }

    /// [`FleetProcess::start`] with more `[mqtt]` keys (`mqtt`, lines such as
    /// `"session_expiry_s = 2"`).
    pub fn start_with_mqtt(
        db_url: &str,
        broker_port: u16,
        client_id: &str,
        data_dir: &std::path::Path,
        mqtt: &str,
        extra: &str,
    ) -> FleetProcess {
        Self::start_full(db_url, broker_port, client_id, data_dir, mqtt, extra, &[])
    }

    fn start_full(
        db_url: &str,
        broker_port: u16,
        client_id: &str,
        data_dir: &std::path::Path,
        mqtt: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> FleetProcess {
        let dir = tempfile::Builder::new()
            .prefix("ember-replica-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let text = format!(
            "data_dir = \"{}\"\n{}",
            data_dir.display(),
            config(
                db_url,
                broker_port,
                client_id,
                &format!("{mqtt}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}"),
            )
        );
        std::fs::write(dir.path().join("fleet.toml"), text).expect("write the config");
        let mut p = FleetProcess {
            port,
            client_id: client_id.to_string(),
            dir,
            child: None,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        p.spawn();
        p.wait_healthy();
        p
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the log");
        let mut cmd = Command::new(fleet_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_FLEET_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(self.dir.path().join("fleet.toml"))
            .arg("run")
            .env("EMBER_FLEET_LOG", "info,sqlx=warn")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start ember-fleet");
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("fleet.log")
    }

    /// Everything the replica logged (all its runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until `/api/v1/health` answers 200; panics with the log if it exits first.
    pub fn wait_healthy(&mut self) {
        let port = self.port;
        let mut exited = None;
        let ok = wait_until(WAIT, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                exited = Some(status);
                return true;
            }
            http::try_request(port, "GET", "/api/v1/health", None, None)
                .is_ok_and(|r| r.status == 200)
        });
        assert!(
            exited.is_none(),
            "replica {} exited while starting ({exited:?}); its log:\n{}",
            self.client_id,
            self.log_text()
        );
        assert!(
            ok,
            "replica {} did not become healthy within {WAIT:?}; its log:\n{}",
            self.client_id,
            self.log_text()
        );
    }

    /// SIGKILL: no drain, no goodbye; the broker keeps its persistent session.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and the drain; panics unless it exits 0 within the wait.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let mut status = None;
        let ok = wait_until(WAIT, || {
            status = c.try_wait().ok().flatten();
            status.is_some()
        });
        if !ok {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(
            ok && status.is_some_and(|s| s.success()),
            "replica {} did not stop cleanly ({status:?}); its log:\n{}",
            self.client_id,
            self.log_text()
        );
    }

    /// Starts it again (same config, port and client id) and waits until it is healthy.
    pub fn restart(&mut self) {
        self.sigkill();
        self.spawn();
        self.wait_healthy();
    }

    /// Sets (Some) or removes (None) an environment variable of the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Starts it again without waiting for health (it may abort on a fault hook first).
    pub fn respawn(&mut self) {
        self.sigkill();
        self.spawn();
    }

    /// GET with the admin token (None while it does not answer).
    pub fn try_get_json(&self, path: &str) -> Option<Value> {
        let r = http::try_request(self.port, "GET", path, Some(super::ADMIN), None).ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// The replica's `/metrics` (names without `ember_fleet_`); empty while it is down.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let Ok(r) = http::try_request(self.port, "GET", "/metrics", None, None) else {
            return BTreeMap::new();
        };
        r.body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((
                    k.strip_prefix("ember_fleet_").unwrap_or(k).to_string(),
                    v.parse().ok()?,
                ))
            })
            .collect()
    }

    /// A metric's value (0 when absent).
    pub fn metric(&self, key: &str) -> f64 {
        self.metrics().get(key).copied().unwrap_or(0.0)
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Waits until `cond` holds, polling; panics with `what` otherwise.
pub fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(wait_until(timeout, cond), "{what} within {timeout:?}");
}
