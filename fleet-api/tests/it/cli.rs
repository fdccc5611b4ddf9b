//! The `ember-fleet` binary: configuration errors, `check-config`, tokens, and the SIGTERM
//! drain.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use ember_testkit::{TestBroker, free_port, wait_until};

use crate::support::mqtt::{Msg, batch, publish};
use crate::support::{Kind, Store, TestFleet, WAIT, client_id, config, fleet_bin, http, now_us};

/// `ember-fleet` with no `EMBER_FLEET_*` variables from the test's environment.
fn fleet_cmd() -> Command {
    let mut cmd = Command::new(fleet_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EMBER_FLEET_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1");
    // The default client id comes from HOSTNAME; a generated one (a container's) is refused
    // for `run` and `check-config` (scale_out::an_unstable_client_id_is_refused_at_start).
    cmd.env("HOSTNAME", "ember-fleet-test");
    cmd
}

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("fleet.toml");
    // (config file, environment, the key the error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[mqtt]\nprot = 1883\n", &[], "prot"),
        (
            "[ingest]\nbatch_max_records = 0\n",
            &[],
            "ingest.batch_max_records",
        ),
        ("", &[("EMBER_FLEET_MQTT__PORT", "abc")], "port"),
        (
            "",
            &[("EMBER_FLEET_DATABASE__URL", "mysql://db/x")],
            "database.url",
        ),
        (
            "",
            &[("EMBER_FLEET_BOOTSTRAP_TOKEN", "short")],
            "bootstrap_token",
        ),
    ];
    for (text, env, key) in cases {
        fs::write(&file, text).expect("write config");
        for sub in [&["check-config"][..], &["run"][..]] {
            let out = fleet_cmd()
                .arg("--config")
                .arg(&file)
                .args(sub)
                .envs(env.iter().copied())
                .output()
                .expect("run ember-fleet");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{text:?} {env:?} {sub:?}: {stderr}"
            );
            assert!(
                stderr.contains(key),
                "{text:?} {env:?}: should name {key}: {stderr}"
            );
        }
    }
}

#[test]
fn check_config_prints_the_resolved_config_without_secrets() {
    let out = fleet_cmd()
        .arg("check-config")
        .env(
            "EMBER_FLEET_DATABASE__URL",
            "postgres://fleet:hunter2@db.example/fleet",
        )
        .env("EMBER_FLEET_BOOTSTRAP_TOKEN", "0123456789abcdef0123")
        .env("EMBER_FLEET_MQTT__SHARE_GROUP", "fleet-a")
        .output()
        .expect("run ember-fleet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fleet:***@db.example"), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("0123456789abcdef0123"),
        "{stdout}"
    );
    assert!(stdout.contains("share_group = \"fleet-a\""), "{stdout}");
    assert!(stdout.contains("backend = \"postgres\""), "{stdout}");

    let out = fleet_cmd()
        .args(["token", "generate"])
        .output()
        .expect("run");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("ef_") && token.len() == 67, "{token}");
}

/// The CLI's variables (`EMBER_FLEET_URL`, `EMBER_FLEET_CA_FILE`, `EMBER_FLEET_TOKEN`) exported
/// in the operator's shell never stop the commands that read the configuration (they once
/// failed with "unknown field `url`"), and `model` and `rollout` both follow
/// `EMBER_FLEET_URL`. An unknown `EMBER_FLEET_*` variable is named, with the fix.
#[test]
fn the_cli_variables_are_not_settings_and_both_http_commands_follow_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}/fleet.db", dir.path().display());
    // Nothing listens on this port: the error must name the URL taken from the environment.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let with_cli_env = |args: &[&str]| {
        fleet_cmd()
            .args(args)
            .env("EMBER_FLEET_DATABASE__URL", &db)
            .env("EMBER_FLEET_URL", &url)
            .env("EMBER_FLEET_CA_FILE", dir.path().join("ca.pem"))
            .env("EMBER_FLEET_TOKEN", "ef_not-a-real-token")
            .output()
            .expect("run ember-fleet")
    };
    for args in [
        &["check-config"][..],
        &["token", "create", "--scope", "read"][..],
    ] {
        let out = with_cli_env(args);
        assert!(
            out.status.success(),
            "ember-fleet {args:?} with EMBER_FLEET_URL set: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // http:// ignores the CA file; the unreachable fleet is named by the URL from the env.
    for args in [&["model", "list"][..], &["rollout", "list"][..]] {
        let out = with_cli_env(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot reach the fleet at {url}/api/v1/")),
            "{args:?}: {stderr}"
        );
    }
    let out = fleet_cmd()
        .arg("check-config")
        .env("EMBER_FLEET_MQTT__PROT", "1883")
        .output()
        .expect("run ember-fleet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("EMBER_FLEET_MQTT__PROT") && stderr.contains("unset the variable"),
        "{stderr}"
    );
}

/// The real binary: SIGTERM while messages arrive; it drains (stores and acknowledges what it
/// took) and exits 0. A new instance with the same client id then gets the rest from the
/// broker: every record exactly once.
#[test]
fn sigterm_drains_and_exits_0() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let id = client_id();
    let text = format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
        config(
            &store.url(),
            broker.port(),
            &id,
            "[log]\nformat = \"json\"\n"
        )
        .replace("[log]\nlevel = \"warn\"\n", "")
    );
    let file = dir.path().join("fleet.toml");
    fs::write(&file, &text).expect("write config");
    let stderr_path = dir.path().join("stderr.log");
    let mut child = fleet_cmd()
        .arg("--config")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn ember-fleet");
    let healthy = wait_until(WAIT, || {
        http::try_request(port, "GET", "/api/v1/health", None, None).is_ok_and(|r| r.status == 200)
    });
    assert!(
        healthy,
        "not healthy: {}",
        fs::read_to_string(&stderr_path).unwrap_or_default()
    );

    let ts = now_us();
    let msgs: Vec<Msg> = (0..50)
        .map(|i| Msg::telemetry(&batch("term-dev", "imu", i * 20 + 1..=i * 20 + 20, ts)))
        .collect();
    publish(broker.port(), msgs);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let code = child.wait().expect("wait").code();
    let log = fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(exited, "ember-fleet did not exit after SIGTERM: {log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("Draining"), "{log}");
    assert!(
        log.lines().all(|l| l.starts_with('{')),
        "json log format: {log}"
    );

    let fleet = TestFleet::start_with(&store, broker.port(), &id, "");
    fleet.wait_ledger("term-dev", "imu", |l| l["received"] == 1000);
    let records = fleet.all_records("term-dev", "imu", 1000);
    assert_eq!(records.len(), 1000);
}
