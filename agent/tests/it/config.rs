//! `ember-agent check-config`: bad files are refused naming the key, a good one is printed
//! fully resolved.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::BIN;

const MIN: &str = "device_id = \"d1\"\n\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n";

fn check_config(dir: &Path, name: &str, text: &str) -> Output {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&path).arg("check-config");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EMBER_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run ember-agent")
}

/// Environment overrides reach the binary typed by their key: `EMBER_DEVICE_ID=1001` is the
/// device id "1001" (it was once parsed as an integer and refused), and the fleet's and the
/// tooling's variables exported in the same shell are not overrides; an unknown `EMBER_*`
/// variable is refused naming the variable.
#[test]
fn environment_overrides_are_typed_by_key_and_reserved_names_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, MIN).expect("write config");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&path).arg("check-config");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied())
            .output()
            .expect("run ember-agent")
    };
    let out = run(&[
        ("EMBER_DEVICE_ID", "1001"),
        ("EMBER_FLEET_URL", "http://127.0.0.1:8080"),
        ("EMBER_FLEET_TOKEN", "t"),
        ("EMBER_TEST_SEED", "3"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("device_id = \"1001\""), "{stdout}");
    let out = run(&[("EMBER_REPO", "/src/ember")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("EMBER_REPO") && stderr.contains("unset the variable"),
        "{stderr}"
    );
}

/// Each bad file exits with status 2 and a message on stderr that names the offending key.
#[test]
fn invalid_configs_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with = |extra: &str| format!("{MIN}{extra}");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown-top-level-key",
            with("colour = \"red\"\n"),
            "colour",
        ),
        ("unknown-mqtt-key", with("[mqtt]\nprot = 1883\n"), "prot"),
        ("port-zero", with("[mqtt]\nport = 0\n"), "mqtt.port"),
        ("port-too-big", with("[mqtt]\nport = 70000\n"), "port"),
        (
            "port-not-a-number",
            with("[mqtt]\nport = \"http\"\n"),
            "port",
        ),
        (
            "bad-fsync",
            with("[queue]\nfsync = \"sometimes\"\n"),
            "queue.fsync",
        ),
        (
            "interval-without-policy",
            with("[queue]\nfsync_interval_ms = 100\n"),
            "queue.fsync_interval_ms",
        ),
        (
            "tiny-queue",
            with("[queue]\nmax_bytes = 1000\n"),
            "queue.max_bytes",
        ),
        (
            "bad-full-policy",
            with("[queue]\nfull_policy = \"panic\"\n"),
            "queue.full_policy",
        ),
        (
            "bad-encoding",
            with("[mqtt]\nencoding = \"xml\"\n"),
            "mqtt.encoding",
        ),
        (
            "bad-metrics-listen",
            with("[metrics]\nlisten = \"nowhere\"\n"),
            "metrics.listen",
        ),
        (
            "missing-device-id",
            "[[source]]\ntype = \"sim\"\nstream = \"imu\"\n".into(),
            "device_id",
        ),
        (
            "bad-device-id",
            "device_id = \"a/b\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n".into(),
            "device_id",
        ),
        ("no-source", "device_id = \"d1\"\n".into(), "source"),
        (
            "duplicate-stream",
            with("\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n"),
            "source[1].stream",
        ),
        (
            "bad-source-type",
            with("\n[[source]]\ntype = \"radio\"\nstream = \"x\"\n"),
            "source[1].type",
        ),
        (
            "replay-without-path",
            with("\n[[source]]\ntype = \"replay\"\nstream = \"x\"\n"),
            "source[1].path",
        ),
        (
            "socket-not-loopback",
            with("\n[[source]]\ntype = \"socket\"\nstream = \"x\"\ntcp = \"10.0.0.1:7070\"\n"),
            "source[1].tcp",
        ),
        (
            "sim-rate-negative",
            with("\n[[source]]\ntype = \"sim\"\nstream = \"x\"\nrate_hz = -1\n"),
            "source[1].rate_hz",
        ),
        ("not-toml", "device_id = \n".into(), "line 1"),
    ];
    let mut failures = Vec::new();
    for (name, text, key) in &cases {
        let out = check_config(dir.path(), name, text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.code() != Some(2)
            || !stderr.contains(key)
            || !stderr.contains("invalid configuration")
            || !stdout.is_empty()
        {
            failures.push(format!("{name}: status {}, expected 2 and stderr naming {key:?}; stderr: {stderr}stdout: {stdout}", out.status));
        }
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A valid file: exit 0, and stdout is the resolved configuration as TOML, defaults filled in.
#[test]
fn valid_config_prints_resolved_toml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = check_config(
        dir.path(),
        "ok",
        &format!("{MIN}[mqtt]\nport = 1884\n[queue]\nfsync = \"never\"\n"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let resolved: toml::Table = toml::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check-config printed invalid TOML ({e}):\n{stdout}"));
    let get = |path: &[&str]| -> toml::Value {
        let mut v = toml::Value::Table(resolved.clone());
        for p in path {
            v = v
                .get(p)
                .cloned()
                .unwrap_or_else(|| panic!("no {path:?} in:\n{stdout}"));
        }
        v
    };
    assert_eq!(get(&["device_id"]).as_str(), Some("d1"));
    assert_eq!(
        get(&["mqtt", "port"]).as_integer(),
        Some(1884),
        "the file's value"
    );
    assert_eq!(
        get(&["mqtt", "host"]).as_str(),
        Some("127.0.0.1"),
        "a default"
    );
    assert_eq!(
        get(&["mqtt", "client_id"]).as_str(),
        Some("d1"),
        "defaults to the device id"
    );
    assert_eq!(
        get(&["queue", "max_bytes"]).as_integer(),
        Some(256 * 1024 * 1024)
    );
    assert!(
        stdout.contains("never"),
        "the fsync policy is shown:\n{stdout}"
    );
    let sources = get(&["sources"]);
    let first = sources
        .as_array()
        .and_then(|a| a.first())
        .expect("one source");
    assert_eq!(first.get("type").and_then(|t| t.as_str()), Some("sim"));
    assert_eq!(first.get("rate_hz").and_then(|t| t.as_float()), Some(100.0));
}
