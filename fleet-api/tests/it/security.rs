//! Security: scoped API tokens, HTTPS, mutual TLS to the broker, and no secret in any log
//! (docs/security.md).

use std::fs;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use ember_fleet::auth::{self, Scope};
use ember_fleet::config::Settings;
use ember_fleet::db::Db;
use ember_host::client::{ClientError, FleetClient};
use ember_testkit::tls::{TestPki, client_config};
use ember_testkit::{TestAgent, TestBroker, free_port, wait_until};
use serde_json::{Value, json};

use crate::support::{ADMIN, Kind, Store, TestFleet, WAIT, agent_bin, fleet_bin};

/// Stores a new token with `scope` in the fleet's database; returns it.
fn token(db_url: &str, scope: &Scope) -> String {
    let settings = Settings::from_toml(
        &format!("[database]\nurl = \"{db_url}\"\n"),
        "t",
        Vec::new(),
    )
    .expect("settings");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let db = Db::open(&settings.database).await.expect("open db");
        let (_, t) = auth::create(&db, scope, "test")
            .await
            .expect("create token");
        db.close().await;
        t
    })
}

/// Every mutating route refuses a read token and a device token (403); a device token reads
/// its own device and nothing else.
#[test]
fn scoped_tokens_are_enforced() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    for id in ["dev-1", "dev-2"] {
        let r = fleet.request(
            "POST",
            "/api/v1/devices",
            Some(ADMIN),
            Some(&json!({"device_id": id, "tags": {"site": "north"}})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let read = token(&fleet.db_url, &Scope::Read);
    let dev1 = token(&fleet.db_url, &Scope::Device("dev-1".into()));
    let tags = json!({"tags": {"site": "south"}});
    let new_dev = json!({"device_id": "dev-3"});

    // (method, path, body) of every mutating route.
    let writes: [(&str, &str, Option<&Value>); 3] = [
        ("POST", "/api/v1/devices", Some(&new_dev)),
        ("PUT", "/api/v1/devices/dev-1/tags", Some(&tags)),
        ("PUT", "/api/v1/devices/dev-2/tags", Some(&tags)),
    ];
    for tok in [&read, &dev1] {
        for (method, path, body) in writes {
            let r = fleet.request(method, path, Some(tok), body);
            assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
            assert_eq!(r.error_code(), "forbidden");
        }
    }
    // Nothing changed.
    let d1 = fleet.get_json("/api/v1/devices/dev-1");
    assert_eq!(d1["tags"]["site"], "north", "{d1}");
    assert_eq!(fleet.get("/api/v1/devices/dev-3").status, 404);

    // The read token reads everything.
    for path in [
        "/api/v1/devices",
        "/api/v1/devices/dev-2",
        "/api/v1/rejects",
    ] {
        assert_eq!(
            fleet.request("GET", path, Some(&read), None).status,
            200,
            "{path}"
        );
    }
    // The device token: its own device's resources only.
    for path in [
        "/api/v1/devices/dev-1",
        "/api/v1/devices/dev-1/streams",
        "/api/v1/devices/dev-1/ledger",
        "/api/v1/devices/dev-1/streams/imu/telemetry",
        "/api/v1/devices/dev-1/streams/imu/aggregates",
    ] {
        let r = fleet.request("GET", path, Some(&dev1), None);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    for path in [
        "/api/v1/devices/dev-2",
        "/api/v1/devices/dev-2/streams",
        "/api/v1/devices/dev-2/ledger",
        "/api/v1/devices/dev-2/streams/imu/telemetry",
        "/api/v1/devices/dev-2/streams/imu/aggregates",
        "/api/v1/devices",
        "/api/v1/devices?search=dev",
        "/api/v1/rejects",
        "/api/v1/rejects?device=dev-2",
    ] {
        let r = fleet.request("GET", path, Some(&dev1), None);
        assert_eq!(r.status, 403, "{path}: {}", r.body);
    }
    // A device token for an unknown device learns nothing either way.
    let ghost = token(&fleet.db_url, &Scope::Device("ghost".into()));
    assert_eq!(
        fleet
            .request("GET", "/api/v1/devices/dev-1", Some(&ghost), None)
            .status,
        403
    );
    assert_eq!(
        fleet
            .request("GET", "/api/v1/devices/dev-1", Some("ef_unknown"), None)
            .status,
        401
    );
    fleet.stop().expect("clean stop");
}

/// One request over HTTPS through the fleet's client, trusting only the test CA in
/// `ca_file`; returns (status, body).
fn https(
    port: u16,
    ca_file: &std::path::Path,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let client = FleetClient::new(&format!("https://127.0.0.1:{port}"), Some(ca_file))?;
    let client = match token {
        Some(t) => client.with_token(t),
        None => client,
    };
    let r = client.send(method, path, &[("Connection", "close")], None)?;
    Ok((r.status, r.text()))
}

fn toml_path(p: &std::path::Path) -> String {
    format!("'{}'", p.display())
}

/// Kills the child on drop (a failing test must not leave a fleet running).
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The base64 lines of a PEM block (the secret part), for searching logs.
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect()
}

/// Agent, broker and fleet all on TLS (mutual TLS on MQTT, HTTPS for the API), logging at
/// debug level; data flows end to end and a device token reads its device over HTTPS. Then no
/// private key and no token appears in any captured output.
#[test]
fn full_tls_scenario_logs_no_secrets() {
    let pki = TestPki::new("Ember test CA");
    let broker = TestBroker::start_tls(&pki);
    let store = Store::new(Kind::Sqlite);
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet_cert = pki.fleet();
    let https_cert = pki.server();
    let admin = auth::generate().expect("a token");
    let port = free_port();
    let text = format!(
        "bootstrap_token = \"{admin}\"\n\
         [log]\nlevel = \"info,ember_fleet=debug\"\n\
         [database]\nurl = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n\
         [http.tls]\ncert_file = {}\nkey_file = {}\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"fleet-sec\"\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
         [mqtt.tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
        store.url(),
        toml_path(&https_cert.cert),
        toml_path(&https_cert.key),
        broker.port(),
        toml_path(pki.ca_file()),
        toml_path(&fleet_cert.cert),
        toml_path(&fleet_cert.key),
    );
    let file = dir.path().join("fleet.toml");
    fs::write(&file, &text).expect("write config");
    let fleet_log = dir.path().join("fleet.log");
    let run = |args: &[&str], stderr: fs::File| {
        let mut cmd = Command::new(fleet_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NO_COLOR", "1")
            .arg("--config")
            .arg(&file)
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr);
        cmd
    };
    let fleet = Reaper(
        run(&["run"], fs::File::create(&fleet_log).expect("log file"))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ember-fleet"),
    );
    let ca = pki.ca_file();
    let healthy = wait_until(WAIT, || {
        https(port, ca, "GET", "/api/v1/health", None).is_ok_and(|(s, _)| s == 200)
    });
    assert!(
        healthy,
        "fleet not healthy over HTTPS:\n{}",
        fs::read_to_string(&fleet_log).unwrap_or_default()
    );
    // Plain HTTP on the HTTPS port gets no API answer.
    let plain = crate::support::http::try_request(port, "GET", "/api/v1/health", None, None);
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status != 200));

    // A device token, created with the CLI (printed once, on stdout).
    let cli_log = dir.path().join("cli.log");
    let out = run(
        &[
            "token",
            "create",
            "--scope",
            "device:dev-s",
            "--name",
            "dev-s",
        ],
        fs::File::create(&cli_log).expect("log file"),
    )
    .output()
    .expect("token create");
    assert!(
        out.status.success(),
        "{}",
        fs::read_to_string(&cli_log).unwrap_or_default()
    );
    let dev_token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(dev_token.starts_with("ef_"), "{dev_token}");

    let agent_cert = pki.client("dev-s", "dev-s", 30);
    let agent = TestAgent::builder(agent_bin())
        .device_id("dev-s")
        .broker_port(broker.port())
        .tls(pki.ca_file(), &agent_cert)
        .set("log", "level", "\"debug\"")
        .sim("imu", 200.0, 3)
        .start();
    let ledger_path = "/api/v1/devices/dev-s/ledger";
    let mut last = String::new();
    let flowing = wait_until(WAIT, || {
        match https(port, ca, "GET", ledger_path, Some(&dev_token)) {
            Ok((200, body)) => {
                last = body.clone();
                serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["streams"][0]["received"].as_u64())
                    .is_some_and(|n| n >= 200)
            }
            Ok((s, body)) => {
                last = format!("{s}: {body}");
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(
        flowing,
        "telemetry did not reach the fleet over mTLS: {last}\nfleet log:\n{}",
        fs::read_to_string(&fleet_log).unwrap_or_default()
    );
    let (status, _) = https(port, ca, "GET", "/api/v1/devices", Some(&dev_token)).expect("https");
    assert_eq!(status, 403, "a device token may not list the fleet");
    let (status, _) = https(port, ca, "GET", "/api/v1/devices", Some(&admin)).expect("https");
    assert_eq!(status, 200);

    agent.sigterm();
    assert!(agent.wait_exit(WAIT).success(), "{}", agent.stderr_text());
    let mut fleet = fleet;
    let _ = Command::new("kill")
        .args(["-TERM", &fleet.0.id().to_string()])
        .status();
    assert!(
        wait_until(WAIT, || matches!(fleet.0.try_wait(), Ok(Some(_)))),
        "the fleet did not stop"
    );

    let mut logs = vec![
        ("fleet", fs::read_to_string(&fleet_log).unwrap_or_default()),
        (
            "token create (stderr)",
            fs::read_to_string(&cli_log).unwrap_or_default(),
        ),
        ("agent", agent.stderr_text()),
        ("broker", broker.log_text()),
    ];
    logs.push((
        "all",
        logs.iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    ));
    assert!(
        logs[0].1.contains("HTTPS"),
        "the fleet log is captured: {}",
        logs[0].1
    );
    assert!(
        logs[2].1.contains("Connected to the MQTT broker"),
        "{}",
        logs[2].1
    );
    let mut secrets: Vec<(String, String)> = vec![
        ("admin token".into(), admin.clone()),
        ("device token".into(), dev_token.clone()),
    ];
    for (what, pem) in [
        ("agent key", &agent_cert.key_pem),
        ("fleet key", &fleet_cert.key_pem),
        ("HTTPS key", &https_cert.key_pem),
    ] {
        for line in pem_body_lines(pem) {
            secrets.push((what.to_string(), line));
        }
    }
    let ca_key = fs::read_to_string(pki.dir().join("ca.key")).expect("CA key");
    for line in pem_body_lines(&ca_key) {
        secrets.push(("CA key".into(), line));
    }
    for (name, text) in &logs {
        assert!(!text.contains("PRIVATE KEY"), "{name} log shows a PEM key");
        for (what, secret) in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{name} log contains the {what}"
            );
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The whole PKI on the command line: `ember-fleet pki` creates a CA, the broker's and the
/// fleet's certificates and the Mosquitto config; the device makes its key and CSR
/// (`ember-agent keygen`, `csr`: the key never leaves it); `pki sign-csr` issues the
/// certificate. A real Mosquitto runs the generated config, and the device's data reaches the
/// fleet identity over mutual TLS.
#[test]
fn pki_cli_and_csr_flow_end_to_end() {
    let pki_dir = tempfile::tempdir().expect("temp dir");
    let device_dir = tempfile::tempdir().expect("temp dir");
    let dir = pki_dir.path();
    let fleet = |args: &[&str]| {
        let mut c = Command::new(fleet_bin());
        c.arg("pki").args(args).arg("--dir").arg(dir);
        run_ok(&mut c)
    };
    fleet(&["init-ca"]);
    fleet(&["server-cert"]);
    fleet(&["client-cert"]);
    let port = free_port();
    let plugin = ember_testkit::tls::identity_plugin();
    fleet(&[
        "mosquitto-conf",
        "--port",
        &port.to_string(),
        "--identity-plugin",
        plugin.to_str().expect("utf-8"),
        // The testkit's subscriber plays the fleet here, with its own client ids.
        "--fleet-client-id-prefix",
        "ember-testkit-sub-",
    ]);
    for key in ["ca.key", "server.key", "fleet.key"] {
        let mode = fs::metadata(dir.join(key)).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{key}"
        );
    }

    // On the device.
    let key = device_dir.path().join("device.key");
    let agent = |args: &[&str]| {
        let mut c = Command::new(agent_bin());
        c.args(args).env_remove("EMBER_DEVICE_ID");
        run_ok(&mut c)
    };
    agent(&["keygen", "--out", key.to_str().expect("utf-8")]);
    let csr = agent(&[
        "csr",
        "--device-id",
        "dev-csr",
        "--key",
        key.to_str().expect("utf-8"),
    ]);
    assert!(csr.contains("BEGIN CERTIFICATE REQUEST") && !csr.contains("PRIVATE"));
    let csr_file = dir.join("dev-csr.csr");
    fs::write(&csr_file, &csr).expect("write csr");
    // At the fleet: only the CSR travels.
    let cert_path = fleet(&["sign-csr", "--csr", csr_file.to_str().expect("utf-8")]);
    let cert_path = std::path::PathBuf::from(cert_path.trim());
    assert_eq!(cert_path, dir.join("devices/dev-csr.pem"));
    // A CSR whose common name is no device id is refused.
    let bad_key = device_dir.path().join("bad.key");
    agent(&["keygen", "--out", bad_key.to_str().expect("utf-8")]);
    let mut c = Command::new(agent_bin());
    let bad = c
        .args([
            "csr",
            "--device-id",
            "ember:fleet",
            "--key",
            bad_key.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run");
    assert!(!bad.status.success(), "the agent refuses a non-device id");

    // The broker from the generated config.
    let mut conf = fs::read_to_string(dir.join("mosquitto.conf")).expect("conf");
    let root = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if root {
        // See ember_testkit::tls: as root, Mosquitto would drop to a user that cannot read the keys.
        conf = format!("user root\n{conf}");
    }
    let log = dir.join("mosquitto.log");
    conf.push_str(&format!("log_dest file {}\n", log.display()));
    fs::write(dir.join("run.conf"), conf).expect("conf");
    let bin = [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file())
    .unwrap_or("mosquitto");
    let broker = Reaper(
        Command::new(bin)
            .arg("-c")
            .arg(dir.join("run.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto"),
    );
    assert!(
        wait_until(WAIT, || TcpStream::connect(ember_testkit::localhost(port))
            .is_ok()),
        "mosquitto did not start: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let ca_pem = fs::read_to_string(dir.join("ca.pem")).expect("ca");
    let fleet_id = ember_testkit::tls::CertFiles {
        cert: dir.join("fleet.pem"),
        key: dir.join("fleet.key"),
        cert_pem: fs::read_to_string(dir.join("fleet.pem")).expect("fleet.pem"),
        key_pem: fs::read_to_string(dir.join("fleet.key")).expect("fleet.key"),
        not_after: 0,
    };
    let sub = ember_testkit::Subscriber::start_tls(
        port,
        "ember/v1/#",
        client_config(&ca_pem, Some(&fleet_id)),
    );
    let device_cert = ember_testkit::tls::CertFiles {
        cert: cert_path,
        key,
        cert_pem: String::new(),
        key_pem: String::new(),
        not_after: 0,
    };
    let agent = TestAgent::builder(agent_bin())
        .device_id("dev-csr")
        .broker_port(port)
        .tls(&dir.join("ca.pem"), &device_cert)
        .sim("imu", 100.0, 2)
        .start();
    assert!(
        sub.wait_for(|v| v.unique("dev-csr", "imu") >= 20, WAIT),
        "no data from the CSR-issued device; agent:\n{}\nbroker:\n{}",
        agent.stderr_text(),
        fs::read_to_string(&log).unwrap_or_default()
    );
    drop(broker);
}
