//! `ember-fleet demo`, the README's first command: embedded broker, the service on SQLite and
//! real agent processes (this binary run as `ember-fleet agent`, as in the README's build)
//! running the committed models; online within 30 s; the demo's registered models
//! and its staged rollout, walked page by page in Chromium until the rollout completes (the
//! screenshots in `docs/screenshots/` come from this run with `EMBER_UPDATE_SCREENSHOTS=1`);
//! the rollout CLI with the demo's admin token; a clean stop on SIGINT. `ember-fleet agent ARGS`
//! behaves as `ember-agent ARGS` (output and exit status), and `--agent-bin` still names a
//! separately built agent.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_testkit::free_port;

use crate::browser::{browser_script, require_browser};
use crate::support::{agent_bin, fleet_bin, http};

const AGENTS: usize = 3;
/// The browser walk, the rollout included (it waits for the rollout to complete).
const WALK_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn demo_brings_agents_online_rolls_out_a_model_and_stops_cleanly_on_sigint() {
    require_browser();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let started = Instant::now();
    let mut child = Command::new(fleet_bin())
        .args(["demo", "--agents", &AGENTS.to_string(), "--speed", "20"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .env("NO_COLOR", "1")
        // Unrelated variables of the user's shell never reach the agents' config overlay.
        .env("EMBER_REPO", "/home/someone/ember")
        .env("EMBER_MQTT__PORT", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember-fleet demo");
    // A failing assertion must not leave the demo and its agents running: SIGINT makes the
    // demo stop its agents first (a SIGKILL would orphan them).
    let _stop = StopOnDrop(child.id());

    // Stdout carries the banner; stderr the logs (kept for the failure message).
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });

    // The banner appears only once every agent is online in the registry.
    let banner = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            panic!(
                "no banner within 30 s; logs:\n{}",
                log.lock().unwrap().as_str()
            )
        });
    assert!(
        banner.contains(&format!("{AGENTS} agents online")),
        "{banner}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the banner names the dashboard URL");
    assert!(
        url.starts_with(&format!("http://127.0.0.1:{port}/dashboard/#token=")),
        "{url}"
    );
    let token = url.split("#token=").nth(1).unwrap().to_string();

    // The dashboard is served, and the API (with the printed read token) lists the agents online.
    let page = http::request(port, "GET", "/dashboard/", None, None);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<html"), "{}", page.body);
    let devices = http::request(port, "GET", "/api/v1/devices", Some(&token), None);
    assert_eq!(devices.status, 200, "{}", devices.body);
    let online = devices.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|d| d["online"] == true)
        .count();
    assert_eq!(online, AGENTS, "{}", devices.body);

    // Results of both committed models arrive from every agent.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 1..=AGENTS {
        let device = format!("demo-{i:02}");
        for model in ["activity", "anomaly"] {
            let path = format!("/api/v1/devices/{device}/streams/motion.{model}/inference");
            loop {
                let r = http::request(port, "GET", &path, Some(&token), None);
                if r.status == 200 && r.json()["items"].as_array().is_some_and(|a| !a.is_empty()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no {model} results from {device}: {} {}\nlogs:\n{}",
                    r.status,
                    r.body,
                    log.lock().unwrap().as_str()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    // The demo registered its bundles: the two the agents run and activity 1.1.0.
    let models = http::request(port, "GET", "/api/v1/models", Some(&token), None);
    assert_eq!(models.status, 200, "{}", models.body);
    let versions: Vec<String> = models.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m["name"].as_str().unwrap_or(""),
                m["version"].as_str().unwrap_or("")
            )
        })
        .collect();
    for v in ["activity 1.0.0", "activity 1.1.0", "anomaly 1.0.0"] {
        assert!(
            versions.iter().any(|x| x == v),
            "{v} is not registered: {versions:?}"
        );
    }

    // A little after the banner the rollout starts; the demo says how to control it.
    let rollout_line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no rollout line; logs:\n{}", log.lock().unwrap().as_str()));
    assert!(rollout_line.contains("rollout r-"), "{rollout_line}");
    let id = rollout_line
        .split_whitespace()
        .find(|w| w.starts_with("r-"))
        .map(|w| w.trim_end_matches(':').to_string())
        .expect("the rollout id");
    let control = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let token_file = dir.path().join("admin.token");
    assert!(
        control.contains(&format!("--token-file {}", token_file.display())),
        "{control}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the admin token file is readable by others"
        );
    }

    // Every page of the running demo in Chromium, until the rollout completes.
    let shots = if std::env::var_os("EMBER_UPDATE_SCREENSHOTS").is_some() {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/screenshots"))
    } else {
        dir.path().join("screenshots")
    };
    let cfg = serde_json::json!({
        "url": url, "agents": AGENTS, "rollout": id, "screenshots": shots,
    });
    let mut walk = browser_script("demo_walk.py", &cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    let walk_started = Instant::now();
    let walk_out = loop {
        if walk.try_wait().unwrap().is_some() {
            break walk.wait_with_output().unwrap();
        }
        if walk_started.elapsed() > WALK_TIMEOUT {
            let _ = walk.kill();
            break walk.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        walk_out.status.success(),
        "the demo walk failed:\n{}\n{}\ndemo logs:\n{}",
        String::from_utf8_lossy(&walk_out.stdout),
        String::from_utf8_lossy(&walk_out.stderr),
        log.lock().unwrap().as_str()
    );
    eprintln!(
        "demo walk: {}",
        String::from_utf8_lossy(&walk_out.stdout).trim()
    );
    for name in [
        "overview.png",
        "device.png",
        "models.png",
        "rollouts.png",
        "rollout.png",
    ] {
        let bytes = std::fs::read(shots.join(name)).unwrap_or_default();
        assert!(
            bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG"),
            "{name} was not written as a PNG"
        );
    }

    // The CLI the README shows, with the demo's admin token file.
    let show = Command::new(fleet_bin())
        .args([
            "rollout",
            "show",
            &id,
            "--url",
            &format!("http://127.0.0.1:{port}"),
        ])
        .arg("--token-file")
        .arg(&token_file)
        .env_remove("EMBER_FLEET_TOKEN")
        .output()
        .expect("run ember-fleet rollout show");
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(text.contains("completed"), "{text}");

    // The read token cannot change anything.
    let denied = http::request(
        port,
        "PUT",
        "/api/v1/devices/demo-01/tags",
        Some(&token),
        Some(r#"{"tags":{"site":"x"}}"#),
    );
    assert_eq!(denied.status, 403, "{}", denied.body);

    // SIGINT: agents drain and stop, then the fleet; the process exits 0.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop within 30 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exit.success(),
        "exit {exit}; logs:\n{}",
        log.lock().unwrap().as_str()
    );
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("Ember demo stopped")),
        "{rest:?}"
    );
    // No agent outlives the demo: each one's queue lock is free again.
    for i in 1..=AGENTS {
        let log = std::fs::read_to_string(dir.path().join(format!("agents/demo-{i:02}/agent.log")))
            .unwrap();
        assert!(
            log.contains("Stopped") || log.contains("stopped"),
            "demo-{i:02}:\n{log}"
        );
    }
}

/// `ember-fleet agent ARGS` is `ember-agent ARGS`: the same output and exit status for its
/// version, a resolved configuration, an invalid one (status 2, the key named) and a usage
/// error (clap's status 2, naming `ember-agent`).
#[test]
fn the_demo_builds_embedded_agent_is_ember_agent() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "device_id = \"x\"\nno_such_key = 1\n").unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/examples/agent.toml");
    let cases: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["--version".into()],
        vec!["check-config".into(), "--config".into(), example.into()],
        vec!["check-config".into(), "--config".into(), bad.clone().into()],
        vec!["--no-such-flag".into()],
    ];
    let run = |mut cmd: Command| {
        // Only PATH: the test's own EMBER_* variables would reach the configuration overlay.
        let out = cmd
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in cases {
        let mut embedded = Command::new(fleet_bin());
        embedded.arg("agent").args(&args);
        let mut agent = Command::new(agent_bin());
        agent.args(&args);
        let (embedded, agent) = (run(embedded), run(agent));
        assert_eq!(embedded, agent, "{args:?}");
        assert!(agent.0.is_some(), "{args:?}: {agent:?}");
    }
    let (code, _, stderr) = {
        let mut cmd = Command::new(fleet_bin());
        cmd.args(["agent", "check-config", "--config"]).arg(&bad);
        run(cmd)
    };
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no_such_key"), "{stderr}");
}

/// `--agent-bin` names a separately built agent; one that does not exist stops the demo before
/// it writes or binds anything.
#[test]
fn the_demo_refuses_an_agent_bin_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ember-agent");
    let out = Command::new(fleet_bin())
        .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("demo"))
        .arg("--agent-bin")
        .arg(&missing)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("no ember-agent binary at {}", missing.display())),
        "{stderr}"
    );
    assert!(!dir.path().join("demo").exists(), "{stderr}");
}

/// Sends SIGINT to the demo when the test ends, however it ends, and waits (at most 30 s) for
/// it to stop its agents; a demo already gone makes this a no-op.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let pid = self.0.to_string();
        let alive = || {
            Command::new("kill")
                .args(["-0", &pid])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !alive() {
            return;
        }
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
