//! The Mosquitto configuration Ember ships (`ember-fleet pki mosquitto-conf`, the testkit's TLS
//! broker), run by a real Mosquitto: it keeps what it accepted across a restart, accepts the
//! agent's largest message, and binds a device's client id to its certificate, so one device
//! cannot take over another's connection (docs/operations.md, docs/security.md).

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ember_fleet::cli::pki;
use ember_testkit::tls::{
    CertFiles, RawClient, TestPki, client_config, identity_plugin, mqtt_options, try_connect_as,
};
use ember_testkit::{TestBroker, free_port, wait_until};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use crate::support::{WAIT, agent_bin, fleet_bin};

/// A PKI made with the `ember-fleet pki` commands and a Mosquitto running its generated
/// config on a free port.
struct GeneratedBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl GeneratedBroker {
    /// `init-ca`, `server-cert`, `client-cert`, a device certificate per id in `devices`,
    /// then `mosquitto-conf` with the testkit's build of the identity plugin and `extra`.
    fn generate(devices: &[&str], extra: &[&str]) -> GeneratedBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let pki = |args: &[&str]| {
            let out = Command::new(fleet_bin())
                .arg("pki")
                .args(args)
                .arg("--dir")
                .arg(dir.path())
                .output()
                .expect("run ember-fleet pki");
            assert!(
                out.status.success(),
                "ember-fleet pki {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        pki(&["init-ca"]);
        pki(&["server-cert"]);
        pki(&["client-cert"]);
        for id in devices {
            pki(&["device-cert", "--device-id", id]);
        }
        let plugin = identity_plugin();
        let port_arg = port.to_string();
        let mut args = vec![
            "mosquitto-conf",
            "--port",
            &port_arg,
            "--identity-plugin",
            plugin.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        pki(&args);
        GeneratedBroker {
            dir,
            port,
            child: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conf(&self) -> String {
        fs::read_to_string(self.path("mosquitto.conf")).expect("mosquitto.conf")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("mosquitto.log")).unwrap_or_default()
    }

    /// Starts Mosquitto on the generated file (plus a log file; as root it must stay root to
    /// read the 0600 keys, like scripts/secure-broker.sh does) and waits for its port.
    fn start(&mut self) {
        let mut conf = self.conf();
        let root = fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        if root {
            conf = format!("user root\n{conf}");
        }
        conf.push_str(&format!(
            "log_dest file {}\nlog_type all\nconnection_messages true\n",
            self.path("mosquitto.log").display()
        ));
        fs::write(self.path("run.conf"), conf).expect("run.conf");
        let bin = [
            "/usr/sbin/mosquitto",
            "/usr/local/sbin/mosquitto",
            "/usr/bin/mosquitto",
        ]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("mosquitto");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(self.path("run.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        let port = self.port;
        let up = wait_until(WAIT, || {
            matches!(child.try_wait(), Ok(None))
                && TcpStream::connect(ember_testkit::localhost(port)).is_ok()
        });
        assert!(
            up,
            "mosquitto did not start on the generated config:\n{}\nlog:\n{}",
            self.conf(),
            self.log()
        );
        self.child = Some(child);
    }

    /// Stops the broker with `signal` (TERM: a clean stop that saves its state; KILL: a
    /// crash) and waits until it has exited.
    fn stop(&mut self, signal: &str) {
        let mut child = self.child.take().expect("a running broker");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        assert!(
            wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_)))),
            "mosquitto did not exit after SIG{signal}"
        );
    }

    /// The fleet's certificate, or a device's.
    fn cert(&self, who: &str) -> CertFiles {
        let (cert, key) = if who == "fleet" {
            (self.path("fleet.pem"), self.path("fleet.key"))
        } else {
            (
                self.path(&format!("devices/{who}.pem")),
                self.path(&format!("devices/{who}.key")),
            )
        };
        CertFiles {
            cert_pem: fs::read_to_string(&cert).expect("cert"),
            key_pem: fs::read_to_string(&key).expect("key"),
            cert,
            key,
            not_after: 0,
        }
    }

    fn tls(&self, who: &str) -> Arc<rustls::ClientConfig> {
        let ca = fs::read_to_string(self.path("ca.pem")).expect("ca.pem");
        client_config(&ca, Some(&self.cert(who)))
    }
}

impl Drop for GeneratedBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publishes one QoS 1 message on a fresh connection (packets up to `max_packet` bytes) and
/// waits: `Ok` on PUBACK, `Err` with what ended the connection otherwise.
fn publish_once(
    client_id: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut opts = mqtt_options(client_id, port, tls);
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut el) = AsyncClient::new(opts, 4);
        client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| e.to_string())?;
        let attempt = async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a)))
                        if a.code != rumqttc::ConnectReturnCode::Success =>
                    {
                        return Err(format!("CONNACK {:?}", a.code));
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or_else(|_| Err("no PUBACK within 10 s".into()))
    })
}

/// A fleet-identity subscriber to every device's telemetry that takes packets up to 1 MiB
/// (the testkit's raw client stops at rumqttc's default of 10 KiB) and records payload sizes.
struct LargeSubscriber {
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LargeSubscriber {
    fn start(client_id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> LargeSubscriber {
        let mut opts = mqtt_options(client_id, port, tls);
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let thread = {
            let (sizes, stop) = (sizes.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let (client, mut el) = AsyncClient::new(opts, 16);
                    client
                        .subscribe("ember/v1/+/telemetry", QoS::AtLeastOnce)
                        .await
                        .expect("subscribe");
                    loop {
                        let ev = tokio::select! {
                            _ = stop.notified() => break,
                            ev = el.poll() => ev,
                        };
                        match ev {
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                let _ = subscribed_tx.send(());
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                sizes.lock().expect("lock").push(p.payload.len())
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                });
            })
        };
        subscribed_rx
            .recv_timeout(WAIT)
            .expect("the large subscriber could not subscribe");
        LargeSubscriber {
            sizes,
            stop,
            thread: Some(thread),
        }
    }

    fn sizes(&self) -> Vec<usize> {
        self.sizes.lock().expect("lock").clone()
    }
}

impl Drop for LargeSubscriber {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `persistence true` keeps a retained message (the fleet's desired state) and a persistent
/// session's queued message across a clean restart (SIGTERM); a crash (SIGKILL) loses what
/// arrived since the last save, as docs/operations.md says.
#[test]
fn generated_config_keeps_what_it_accepted_across_a_restart() {
    let mut b = GeneratedBroker::generate(&["dev-a"], &[]);
    let conf = b.conf();
    let data = fs::canonicalize(b.path("data")).expect("mosquitto-conf creates data/");
    assert!(conf.contains(&format!(
        "persistence true\npersistence_location {}\n",
        data.display()
    )));
    b.start();
    let port = b.port;

    // The fleet's persistent session (clean session off), subscribed, then away.
    let session = "ember-fleet-persist";
    let fleet_session = |b: &GeneratedBroker| {
        let mut o = mqtt_options(session, port, b.tls("fleet"));
        o.set_clean_session(false);
        o
    };
    let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let run_session = |opts: rumqttc::MqttOptions, subscribe: bool| {
        let received = received.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, mut el) = AsyncClient::new(opts, 16);
            if subscribe {
                client
                    .subscribe("ember/v1/+/telemetry", QoS::AtLeastOnce)
                    .await
                    .expect("subscribe");
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => received
                            .lock()
                            .expect("lock")
                            .push(String::from_utf8_lossy(&p.payload).into_owned()),
                        Ok(Event::Incoming(Packet::SubAck(_))) if subscribe => return,
                        Ok(_) => {}
                        Err(e) => panic!("the fleet session failed: {e}"),
                    }
                }
            })
            .await;
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while el.poll().await.is_ok() {}
            })
            .await;
        });
    };
    run_session(fleet_session(&b), true);

    publish_once(
        "ember-fleet-desired",
        port,
        b.tls("fleet"),
        "ember/v1/dev-a/desired",
        b"retained-desired".to_vec(),
        true,
    )
    .expect("the fleet publishes desired state");
    publish_once(
        "dev-a",
        port,
        b.tls("dev-a"),
        "ember/v1/dev-a/telemetry",
        b"queued-for-the-fleet".to_vec(),
        false,
    )
    .expect("the device publishes");

    b.stop("TERM");
    assert!(
        data.join("mosquitto.db").is_file(),
        "a clean stop saves the state; log:\n{}",
        b.log()
    );
    b.start();

    // The device reads its retained desired state; the fleet's session gets what was queued.
    let device = RawClient::connect("dev-a", port, b.tls("dev-a"));
    device.subscribe("ember/v1/dev-a/desired");
    assert!(
        wait_until(WAIT, || device
            .received()
            .iter()
            .any(|(_, p)| p == b"retained-desired")),
        "the retained desired state did not survive the restart: {:?}\nlog:\n{}",
        device.received(),
        b.log()
    );
    drop(device);
    run_session(fleet_session(&b), false);
    assert_eq!(
        received.lock().expect("lock").as_slice(),
        ["queued-for-the-fleet"],
        "the fleet's queued message did not survive the restart; log:\n{}",
        b.log()
    );

    // A crash: a retained message newer than the last save (autosave_interval 60 s, not
    // reached here) is lost.
    publish_once(
        "ember-fleet-desired",
        port,
        b.tls("fleet"),
        "ember/v1/dev-a/desired",
        b"after-the-last-save".to_vec(),
        true,
    )
    .expect("the fleet publishes desired state");
    b.stop("KILL");
    b.start();
    let device = RawClient::connect("dev-a", port, b.tls("dev-a"));
    device.subscribe("ember/v1/dev-a/desired");
    assert!(
        wait_until(WAIT, || !device.received().is_empty()),
        "the state saved at the clean stop must be back"
    );
    let payloads: Vec<Vec<u8>> = device.received().into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        payloads,
        vec![b"retained-desired".to_vec()],
        "after SIGKILL the broker restarts from its last save"
    );
}

/// The generated `max_packet_size` takes the largest packet an agent with the default
/// `mqtt.message_max_bytes` sends, and closes (without a PUBACK) the connection of a client
/// that sends more: nothing is acknowledged and then dropped. The default in `pki` is the
/// agent's own (`ember-agent check-config`).
#[test]
fn generated_config_accepts_the_agents_largest_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        "device_id = \"dev-size\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n",
    )
    .expect("agent.toml");
    let out = Command::new(agent_bin())
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .env_remove("EMBER_DEVICE_ID")
        .output()
        .expect("ember-agent check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_max: u32 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("message_max_bytes = "))
        .expect("check-config prints mqtt.message_max_bytes")
        .trim()
        .parse()
        .expect("a number");
    assert_eq!(
        agent_max,
        pki::AGENT_DEFAULT_MESSAGE_MAX_BYTES,
        "pki::AGENT_DEFAULT_MESSAGE_MAX_BYTES must follow the agent's default"
    );

    let mut b = GeneratedBroker::generate(&["dev-a"], &[]);
    let limit = pki::max_packet_size(agent_max).expect("limit");
    assert!(
        limit >= agent_max + 1024,
        "the agent's largest packet must fit"
    );
    assert!(b.conf().contains(&format!("\nmax_packet_size {limit}\n")));
    b.start();
    let sub = LargeSubscriber::start("ember-fleet-sub", b.port, b.tls("fleet"));
    // A QoS 1 PUBLISH of `remaining` bytes after its fixed header carries the topic (2 + len),
    // the packet id (2) and the payload. The agent's MQTT client counts the whole packet
    // (1 + 3 length bytes at this size + remaining) against message_max_bytes + 1024;
    // Mosquitto refuses remaining + 1 > max_packet_size.
    let topic = "ember/v1/dev-a/telemetry";
    let payload_for = |remaining: usize| vec![b'x'; remaining - 4 - topic.len()];
    let largest = payload_for(agent_max as usize + 1024 - 4);
    publish_once(
        "dev-a",
        b.port,
        b.tls("dev-a"),
        topic,
        largest.clone(),
        false,
    )
    .expect("the agent's largest packet must be acknowledged");
    assert!(
        wait_until(WAIT, || sub.sizes().contains(&largest.len())),
        "the largest message did not reach the fleet: {:?}",
        sub.sizes()
    );
    // One byte over the broker's limit: connection closed, no PUBACK.
    let over = payload_for(limit as usize);
    let r = publish_once("dev-a", b.port, b.tls("dev-a"), topic, over, false);
    assert!(r.is_err(), "an oversized packet must not be acknowledged");
    assert!(
        b.log().contains("disconnected due to oversize packet"),
        "{}",
        b.log()
    );
}

/// The shipped config: a device connects only with its own device id as client id, the
/// fleet identity only with client ids starting with `ember-fleet`, and a device certificate
/// named like the fleet's client ids is refused. A refused attempt leaves the connected
/// client alone.
#[test]
fn generated_config_binds_client_ids_to_certificates() {
    let mut b = GeneratedBroker::generate(&["dev-a", "dev-b", "ember-fleet-x"], &[]);
    b.start();
    let port = b.port;
    let a = RawClient::connect("dev-a", port, b.tls("dev-a"));
    a.subscribe("ember/v1/dev-a/desired");

    let r = try_connect_as("dev-a", port, b.tls("dev-b"));
    assert!(r.is_err(), "B's certificate took client id dev-a");
    let r = try_connect_as("ember-fleet-1", port, b.tls("dev-b"));
    assert!(r.is_err(), "a device took a fleet client id");
    let r = try_connect_as("fleet-1", port, b.tls("fleet"));
    assert!(
        r.is_err(),
        "the fleet identity used a client id outside its prefix"
    );
    let r = try_connect_as("ember-fleet-x", port, b.tls("ember-fleet-x"));
    assert!(
        r.is_err(),
        "a device named like the fleet's client ids got in"
    );
    assert_eq!(try_connect_as("dev-b", port, b.tls("dev-b")), Ok(()));
    publish_once(
        "ember-fleet-1-desired",
        port,
        b.tls("fleet"),
        "ember/v1/dev-a/desired",
        b"still-there".to_vec(),
        false,
    )
    .expect("the fleet identity with an ember-fleet client id");
    assert!(
        wait_until(WAIT, || a
            .received()
            .iter()
            .any(|(_, p)| p == b"still-there")),
        "A must still be connected and receive: {:?}",
        a.received()
    );
    assert!(a.is_connected());
    assert!(
        !a.received().iter().any(|(t, _)| t == "<error>"),
        "A's connection was interrupted: {:?}",
        a.received()
    );
    let log = b.log();
    assert_eq!(
        log.matches("as dev-a (").count(),
        1,
        "A connected once and was never replaced:\n{log}"
    );
    assert!(log.contains(
        "ember_identity: refused certificate \"dev-b\" connecting with client id \"dev-a\""
    ));
}

/// The takeover, on the testkit's TLS broker (the one every TLS system test uses): device B's
/// certificate connecting with device A's client id is refused at CONNECT while A is
/// connected, and A's connection stays up; B with its own id gets in.
#[test]
fn a_device_cannot_take_over_another_devices_client_id() {
    let pki = TestPki::new("Ember test CA");
    let broker = TestBroker::start_tls(&pki);
    let port = broker.port();
    let a_cert = pki.client("dev-a", "dev-a", 30);
    let b_cert = pki.client("dev-b", "dev-b", 30);
    let a = RawClient::connect("dev-a", port, client_config(pki.ca_pem(), Some(&a_cert)));
    a.subscribe("ember/v1/dev-a/desired");

    let r = try_connect_as("dev-a", port, client_config(pki.ca_pem(), Some(&b_cert)));
    assert!(
        r.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
        "B's certificate with A's client id must be refused at CONNECT: {r:?}\n{}",
        broker.log_text()
    );

    // A is still connected: the fleet's message reaches it on its first connection.
    let fleet = RawClient::connect(
        "fleet-writer",
        port,
        client_config(pki.ca_pem(), Some(&pki.fleet())),
    );
    fleet.publish("ember/v1/dev-a/desired", b"to-a".to_vec());
    assert!(
        wait_until(WAIT, || a.received().iter().any(|(_, p)| p == b"to-a")),
        "A did not receive the fleet's message: {:?}",
        a.received()
    );
    assert!(
        a.is_connected() && !a.received().iter().any(|(t, _)| t == "<error>"),
        "A's connection was interrupted: {:?}",
        a.received()
    );

    let b = RawClient::connect("dev-b", port, client_config(pki.ca_pem(), Some(&b_cert)));
    assert!(b.is_connected());
    let log = broker.log_text();
    assert_eq!(log.matches(" as dev-a ").count(), 1, "{log}");
}
