//! Several replicas on one database and one broker (issue 16), one test (or more) per finding:
//! each fails on the code before the fix.
//!
//! 1. A rollback is never overwritten at the broker by a stale publish of another replica.
//! 2. A replica removed (scale 3 → 2 → 3) strands no telemetry at the broker.
//! 3. A dashboard on one replica sees what another ingested.
//! 4. Bundles: a replica with its own `fs` store is refused; racing uploads of one version
//!    never leave the row and the stored bytes disagreeing.
//! 5. One leader does the singleton work, another takes over when it goes.
//! 6. A revoked bootstrap token stays revoked across restarts.
//! 7. An older build starts against a newer compatible schema; `ember-fleet migrate`.
//! 8. Several processes on one SQLite file, two live replicas with one client id, and an
//!    unstable client id with a persistent session are refused at start.
//!
//! The process-level harness (SIGKILL, 3 `ember-fleet` processes) is in `crate::replicas`.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_fleet::config::{Backend, DatabaseSettings, Settings};
use ember_fleet::db::Db;
use ember_testkit::bundles::{dev_public_key_path, variant};
use ember_testkit::{TestAgent, TestBroker, wait_until};
use serde_json::{Value, json};

use crate::ingest::assert_exactly_once;
use crate::live::read_until;
use crate::on_both_backends;
use crate::rollout_service::{Watcher, bring_up, create, register_model, wait_rollout};
use crate::support::mqtt::{Msg, batch, publish};
use crate::support::proxy::HoldProxy;
use crate::support::{
    ADMIN, Kind, Store, TestFleet, WAIT, agent_bin, complete, config, fleet_bin, http, now_us,
};

on_both_backends!(a_revoked_bootstrap_token_stays_revoked);

fn db_settings(store: &Store, kind: Kind) -> DatabaseSettings {
    DatabaseSettings {
        url: store.url(),
        backend: match kind {
            Kind::Sqlite => Backend::Sqlite,
            Kind::Postgres => Backend::Postgres,
        },
        max_connections: 2,
        token_source: None,
    }
}

/// Runs `f` on a fresh current-thread runtime.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Finding 6: each start stored `bootstrap_token` with `revoked_at = NULL`, so a revoked
/// bootstrap admin token came back with the next restart. Now it is stored only if absent.
fn a_revoked_bootstrap_token_stays_revoked(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    assert_eq!(fleet.get("/api/v1/devices").status, 200);
    block_on(async {
        let db = Db::connect(&db_settings(&store, kind)).await.expect("db");
        let tokens = ember_fleet::auth::list(&db).await.expect("list");
        let bootstrap = tokens
            .iter()
            .find(|t| t.name == "bootstrap")
            .expect("the bootstrap token is stored");
        assert!(
            ember_fleet::auth::revoke(&db, bootstrap.id)
                .await
                .expect("revoke")
        );
        db.close().await;
    });
    assert_eq!(fleet.get("/api/v1/devices").status, 401, "revoked at once");
    fleet.stop().expect("stops");
    // The same configuration (EMBER_FLEET_BOOTSTRAP_TOKEN still set) starts again.
    let fleet = TestFleet::spawn(&config(
        &store.url(),
        broker.port(),
        &crate::support::client_id(),
        "",
    ));
    let ok = wait_until(WAIT, || {
        http::try_request(fleet.port, "GET", "/api/v1/health", None, None)
            .is_ok_and(|r| r.status == 200)
    });
    assert!(ok, "the fleet did not come back");
    let r = fleet.get("/api/v1/devices");
    assert_eq!(
        r.status, 401,
        "a restart re-enabled the revoked bootstrap token: {}",
        r.body
    );
}

/// Finding 1: every replica ran the desired-state publisher on the same outbox, so replica A
/// could publish revision r1 after replica B published the rollback r2; the broker kept r1,
/// the outbox looked clean and the device installed the version that was rolled back.
///
/// Replayed deterministically: replica A reaches the broker through a proxy that holds its
/// packets. The rollout is created on A (A's publisher, if it publishes, sends r1 into the
/// proxy), rolled back on B and published; then A's packets are released. The retained
/// desired state must be the rollback's, and stay so.
#[test]
fn a_rollback_is_never_overwritten_at_the_broker_by_a_stale_publish() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let proxy = HoldProxy::start(broker.port());
    let a = TestFleet::start_with(&store, proxy.port(), "ember-fleet-a", "");
    let b = TestFleet::start_with(&store, broker.port(), "ember-fleet-b", "");
    register_model(&store, Kind::Postgres, "activity", "2.0.0", false);
    bring_up(&b, broker.port(), &["d-0"], "activity");

    proxy.hold();
    let created = create(
        &a,
        json!({"model": "activity", "version": "2.0.0", "targets": {"devices": ["d-0"]},
               "waves": ["100%"]}),
    );
    let id = created["id"].as_str().expect("id").to_string();
    // Whichever replica publishes, r1 (2.0.0) is published or held: wait for one of the two.
    let topic = b"ember/v1/d-0/desired";
    let a_sent = wait_until(Duration::from_secs(5), || proxy.held_contains(topic));
    let watcher = Watcher::start(broker.port());
    if !a_sent {
        watcher.wait_version("d-0", "activity", "2.0.0");
    }

    let r = b.request(
        "POST",
        &format!("/api/v1/rollouts/{id}/rollback"),
        Some(ADMIN),
        None,
    );
    assert_eq!(r.status, 200, "rollback: {}", r.body);
    // Where B publishes the rollback itself, it reaches the broker now; where the publisher
    // is held behind the proxy, it cannot before the release.
    let rolled_back = |w: &Watcher| {
        w.latest("d-0").is_some_and(|d| {
            d.models
                .iter()
                .any(|m| m.name == "activity" && m.version.as_deref() == Some("1.0.0"))
        })
    };
    wait_until(Duration::from_secs(5), || rolled_back(&watcher));
    proxy.release();
    if a_sent {
        // A's held packets reached the broker and it answered them.
        let answered = wait_until(WAIT, || proxy.down_since_release() > 0);
        assert!(
            answered,
            "the broker never answered replica A after the release"
        );
    }
    wait_rollout(&b, &id, "rolled back and published", |v| {
        v["state"] == "rolled_back" && v["pending_publish"] == 0
    });
    // What a device connecting now is told (the retained message), checked by a fresh
    // subscriber, and what the watcher saw last.
    let ok = wait_until(WAIT, || {
        let fresh = Watcher::start(broker.port());
        let retained = wait_until(Duration::from_secs(2), || fresh.latest("d-0").is_some());
        retained && rolled_back(&fresh) && rolled_back(&watcher)
    });
    assert!(
        ok,
        "the broker keeps a stale desired state after the rollback: retained {:?}",
        watcher.latest("d-0")
    );
    drop(a);
}

/// Ten agents streaming (records leave them on the broker's PUBACK) to `fleets`; returns them.
fn agents(broker_port: u16, n: usize) -> Vec<TestAgent> {
    (0..n)
        .map(|i| {
            TestAgent::builder(agent_bin())
                .device_id(&format!("scale-{i}"))
                .broker_port(broker_port)
                .sim("imu", 40.0, 2)
                .mqtt("message_max_records", "5")
                .start()
        })
        .collect()
}

/// Stops every agent (their final status reports what they captured) and checks each device's
/// ledger on `fleet`: everything captured received once, nothing missing, nothing lost.
fn stop_and_check(fleet: &TestFleet, agents: &[TestAgent]) {
    for a in agents {
        a.sigterm();
    }
    for a in agents {
        assert!(
            a.wait_exit(WAIT).success(),
            "agent {}: {}",
            a.device_id(),
            a.last_run_stderr()
        );
    }
    for a in agents {
        let l = fleet.wait_ledger(a.device_id(), "imu", complete);
        assert_eq!(l["lost_count"], 0, "{}: {l}", a.device_id());
        assert_exactly_once(
            fleet,
            a.device_id(),
            "imu",
            l["captured"].as_u64().unwrap_or(0),
        );
    }
}

fn stored(fleet: &TestFleet) -> f64 {
    fleet
        .metrics()
        .get("records_total{outcome=\"stored\"}")
        .copied()
        .unwrap_or(0.0)
}

/// Finding 2: a replica that stopped for good kept its persistent session, and the broker kept
/// handing that session its share of the shared subscription: records the agents had already
/// deleted (on PUBACK) were never stored. Now a replica that stops while others run leaves
/// the shared subscription and ends its session. Scale 3 → 2 → 3 while 10 agents stream
/// (the third replica comes back under a new name, as a Deployment's pod would): nothing lost.
#[test]
fn scale_3_2_3_while_10_agents_stream_loses_nothing() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let f0 = TestFleet::start_with(&store, broker.port(), "ember-fleet-0", "");
    let f1 = TestFleet::start_with(&store, broker.port(), "ember-fleet-1", "");
    let f2 = TestFleet::start_with(&store, broker.port(), "ember-fleet-2", "");
    let agents = agents(broker.port(), 10);
    let ok = wait_until(WAIT, || stored(&f2) >= 50.0 && stored(&f0) >= 50.0);
    assert!(ok, "the replicas did not share the telemetry");

    // 3 → 2: the third replica is removed.
    f2.stop().expect("the third replica stops cleanly");
    let before = stored(&f0) + stored(&f1);
    let ok = wait_until(WAIT, || stored(&f0) + stored(&f1) >= before + 400.0);
    assert!(ok, "the two remaining replicas did not take over");

    // 2 → 3: a new replica joins.
    let f3 = TestFleet::start_with(&store, broker.port(), "ember-fleet-3", "");
    let ok = wait_until(WAIT, || stored(&f3) >= 50.0);
    assert!(ok, "the new replica did not get a share");
    stop_and_check(&f0, &agents);
    drop((f1, f3));
}

/// Reads SSE from `port` until a telemetry event of `device` arrives, publishing a new batch
/// of it on `publish_port` every second (the other replica's listener may still be starting).
fn sse_sees(port: u16, publish_port: u16, device: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    write!(
        s,
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("writes");
    let mut seen = String::new();
    read_until(&mut s, &mut seen, |t| t.contains("event: ingest"));
    let deadline = Instant::now() + WAIT;
    let mut seq = 1;
    let needle = format!("\"device_id\":\"{device}\"");
    loop {
        publish(
            publish_port,
            vec![Msg::telemetry(&batch(device, "imu", seq..=seq, now_us()))],
        );
        seq += 1;
        let until = Instant::now() + Duration::from_secs(1);
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            use std::io::Read;
            if let Ok(n) = s.read(&mut buf) {
                assert!(n > 0, "the event stream ended; read:\n{seen}");
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            if seen.contains("event: telemetry") && seen.contains(&needle) {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "a dashboard on one replica never saw telemetry another replica ingested; read:\n{seen}"
        );
    }
}

/// Finding 3: the live event stream was an in-process broadcast, so a dashboard connected to
/// replica B missed what replica A ingested. Replica A alone reads broker 1 (where the device
/// publishes), replica B another broker; B's event stream shows A's telemetry.
#[test]
fn live_events_reach_a_dashboard_on_another_replica() {
    let broker_a = TestBroker::start();
    let broker_b = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let a = TestFleet::start_with(&store, broker_a.port(), "ember-fleet-a", "");
    let b = TestFleet::start_with(&store, broker_b.port(), "ember-fleet-b", "");
    let seen = sse_sees(b.port, broker_a.port(), "relayed-dev");
    assert!(seen.contains("event: telemetry"), "{seen}");
    let relayed = b
        .metrics()
        .get("events_received_from_replicas_total")
        .copied()
        .unwrap_or(0.0);
    assert!(relayed >= 1.0, "B counts the events it got from A");
    drop(a);
}

fn registry_text(store: &Store, broker: u16, client: &str, data_dir: &std::path::Path) -> String {
    format!(
        "data_dir = \"{}\"\n{}",
        data_dir.display(),
        config(
            &store.url(),
            broker,
            client,
            &format!(
                "[models]\ntrusted_keys = [\"{}\"]\n",
                dev_public_key_path().display()
            ),
        )
    )
}

/// Finding 4 (a): with several replicas the `fs` store must be one shared volume. A second
/// replica whose `<data_dir>/models` is its own local disk could never serve the bundles the
/// first one stored: its start is refused, naming `models.store`. A replica on the same
/// directory (a shared volume) starts.
#[test]
fn a_replica_with_its_own_fs_model_store_is_refused() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let shared = tempfile::tempdir().expect("temp dir");
    let own = tempfile::tempdir().expect("temp dir");
    let a = TestFleet::spawn(&registry_text(
        &store,
        broker.port(),
        "ember-fleet-a",
        shared.path(),
    ));
    a.wait_healthy();
    let b = TestFleet::spawn(&registry_text(
        &store,
        broker.port(),
        "ember-fleet-b",
        own.path(),
    ));
    let e = b
        .stop()
        .expect_err("a replica with another fs store must not start")
        .to_string();
    assert!(
        e.contains("models.store") && e.contains("shared volume"),
        "the refusal says what to change: {e}"
    );
    let c = TestFleet::spawn(&registry_text(
        &store,
        broker.port(),
        "ember-fleet-c",
        shared.path(),
    ));
    c.wait_healthy();
    drop((a, c));
}

/// Finding 4 (b): two replicas each took an upload of the same version (different builds),
/// both passed the "not registered yet" check, both wrote `<name>/<version>.bundle`, and one
/// row won: the row's sha256 and the bytes served could disagree. Blob keys are now
/// content-addressed. Ten versions, each uploaded as two different builds at once through two
/// replicas on one shared store: every version serves exactly the bytes its row names.
#[test]
fn racing_uploads_of_one_version_never_disagree_with_their_row() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let shared = tempfile::tempdir().expect("temp dir");
    let a = TestFleet::spawn(&registry_text(
        &store,
        broker.port(),
        "ember-fleet-a",
        shared.path(),
    ));
    a.wait_healthy();
    let b = TestFleet::spawn(&registry_text(
        &store,
        broker.port(),
        "ember-fleet-b",
        shared.path(),
    ));
    b.wait_healthy();
    for i in 0..10 {
        let version = format!("3.0.{i}");
        let build = |tag: u8| {
            let v = version.clone();
            variant(
                "activity-f32",
                move |m| m["version"] = v.into(),
                move |w| {
                    if let Some(x) = w.first_mut() {
                        *x ^= tag;
                    }
                },
            )
        };
        let (one, two) = (build(1), build(2));
        assert_ne!(one, two);
        let (pa, pb) = (a.port, b.port);
        let t1 = std::thread::spawn(move || crate::models::upload_to(pa, &one));
        let t2 = std::thread::spawn(move || crate::models::upload_to(pb, &two));
        let statuses = [t1.join().expect("upload"), t2.join().expect("upload")];
        assert!(
            statuses.contains(&201),
            "one upload of {version} registers it: {statuses:?}"
        );
        let row = a.get_json(&format!("/api/v1/models/activity/{version}"));
        for fleet in [&a, &b] {
            let body = crate::models::download_from(
                fleet.port,
                &format!("/api/v1/models/activity/{version}/bundle"),
            );
            assert_eq!(
                Value::from(ember_bundle::hex::sha256(&body)),
                row["sha256"],
                "version {version}: the bytes served differ from the registered build"
            );
        }
    }
}

fn leaders(fleets: &[&TestFleet]) -> Vec<usize> {
    fleets
        .iter()
        .enumerate()
        .filter(|(_, f)| f.metrics().get("leader").copied() == Some(1.0))
        .map(|(i, _)| i)
        .collect()
}

fn retention_passes(f: &TestFleet) -> f64 {
    f.metrics()
        .get("db_seconds_count{op=\"retention\"}")
        .copied()
        .unwrap_or(0.0)
}

/// Finding 5: the rollout driver and retention ran on every replica (every replica loaded
/// every running rollout every second). Now exactly one replica, the leader, runs them: of
/// three replicas only one makes retention passes; when it stops another takes over.
#[test]
fn one_leader_runs_the_singleton_work_and_another_takes_over() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let extra = "[retention]\ninterval_s = 1";
    let f0 = TestFleet::start_with(&store, broker.port(), "ember-fleet-0", extra);
    let f1 = TestFleet::start_with(&store, broker.port(), "ember-fleet-1", extra);
    let f2 = TestFleet::start_with(&store, broker.port(), "ember-fleet-2", extra);
    let all = [&f0, &f1, &f2];
    let ok = wait_until(WAIT, || {
        leaders(&all).len() == 1 && all.iter().map(|f| retention_passes(f)).sum::<f64>() >= 3.0
    });
    assert!(ok, "no single leader: {:?}", leaders(&all));
    let passes: Vec<f64> = all.iter().map(|f| retention_passes(f)).collect();
    assert_eq!(
        passes.iter().filter(|p| **p > 0.0).count(),
        1,
        "retention ran on several replicas: {passes:?}"
    );
    let leader = leaders(&all)[0];
    let mut fleets = [Some(f0), Some(f1), Some(f2)];
    fleets[leader]
        .take()
        .expect("leader")
        .stop()
        .expect("the leader stops cleanly");
    let rest: Vec<&TestFleet> = fleets.iter().flatten().collect();
    let ok = wait_until(WAIT, || {
        leaders(&rest).len() == 1 && rest.iter().any(|f| retention_passes(f) > 0.0)
    });
    assert!(ok, "no replica took over from the stopped leader");
}

/// Finding 7: an older replica that restarted after a newer one migrated crash-looped on the
/// migration it did not know. Now a build starts against a newer schema whose
/// `schema_compat.min_reader` it satisfies, and refuses, saying why, one it does not.
/// `ember-fleet migrate` applies the migrations once and says so.
#[test]
fn an_older_build_starts_against_a_newer_compatible_schema() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let migrate = |expect_ok: bool| {
        let mut cmd = Command::new(fleet_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_FLEET_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .arg("migrate")
            .env("EMBER_FLEET_DATABASE__URL", store.url())
            .env("EMBER_FLEET_MQTT__CLIENT_ID", "ember-fleet-migrate")
            .output()
            .expect("run ember-fleet migrate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.success(), expect_ok, "{text}");
        text
    };
    let first = migrate(true);
    assert!(first.contains("from version 0 to"), "{first}");
    let again = migrate(true);
    assert!(again.contains("up to date"), "{again}");

    // A newer release applied migration 999 (additive: min_reader unchanged).
    let future = ember_fleet::db::SCHEMA_VERSION + 993;
    block_on(async {
        let db = Db::connect(&db_settings(&store, Kind::Postgres))
            .await
            .expect("db");
        sqlx::query("CREATE TABLE future_feature (id BIGINT PRIMARY KEY)")
            .execute(db.pool())
            .await
            .expect("create");
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'future feature', TRUE, '\\x00'::bytea, 1)",
        )
        .bind(future)
        .execute(db.pool())
        .await
        .expect("record the newer migration");
        db.close().await;
    });
    let fleet = TestFleet::start_with(&store, broker.port(), "ember-fleet-old", "");
    fleet
        .stop()
        .expect("the older build runs against the newer schema");
    let newer = migrate(true);
    assert!(newer.contains("newer than this build"), "{newer}");

    // A later release made a change older builds cannot read.
    block_on(async {
        let db = Db::connect(&db_settings(&store, Kind::Postgres))
            .await
            .expect("db");
        sqlx::query("UPDATE schema_compat SET min_reader = $1")
            .bind(future)
            .execute(db.pool())
            .await
            .expect("raise min_reader");
        db.close().await;
    });
    let refused = TestFleet::spawn(&config(&store.url(), broker.port(), "ember-fleet-old", ""));
    let e = refused
        .stop()
        .expect_err("an incompatible schema is refused")
        .to_string();
    assert!(e.contains("upgrade this replica"), "{e}");
    let text = migrate(false);
    assert!(text.contains("upgrade this replica"), "{text}");
}

/// Finding 8 (a): two processes on one SQLite file both ran, each believing it was alone
/// (two publishers, two drivers, and SQLite's single writer). The second is refused at start,
/// saying to use PostgreSQL.
#[test]
fn a_second_process_on_one_sqlite_file_is_refused() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let a = TestFleet::start(&store, broker.port());
    let b = TestFleet::spawn(&config(
        &store.url(),
        broker.port(),
        &crate::support::client_id(),
        "",
    ));
    let e = b
        .stop()
        .expect_err("a second process on one SQLite file must not start")
        .to_string();
    assert!(
        e.contains("postgres://"),
        "the refusal says what to change: {e}"
    );
    // Once the first one stopped, the file is free again.
    a.stop().expect("stops");
    let c = TestFleet::start(&store, broker.port());
    drop(c);
}

/// Finding 8 (b): two live replicas with one client id evict each other at the broker
/// forever; the second one's start is refused, naming the key. A replica that stopped frees
/// its id at once.
#[test]
fn two_live_replicas_with_one_client_id_are_refused() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let a = TestFleet::start_with(&store, broker.port(), "ember-fleet-same", "");
    let b = TestFleet::spawn(&config(&store.url(), broker.port(), "ember-fleet-same", ""));
    let e = b
        .stop()
        .expect_err("a duplicate client id must not start")
        .to_string();
    assert!(e.contains("mqtt.client_id"), "{e}");
    a.stop().expect("stops");
    let c = TestFleet::start_with(&store, broker.port(), "ember-fleet-same", "");
    drop(c);
}

/// Finding 8 (c): `run` with a persistent session under the default client id, derived from
/// a generated host name (a Deployment's pod), exits 2 naming `mqtt.client_id` and the fix;
/// so does an unexpanded `$(POD_NAME)`. `token` and `migrate`, which never connect to the
/// broker, still work there.
#[test]
fn an_unstable_client_id_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A refused start exits at once; one that is not refused serves until stopped, so it is
    // killed after the wait and counted as started.
    let run = |env: &[(&str, &str)], sub: &str| -> (Option<i32>, String) {
        let mut cmd = Command::new(fleet_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_FLEET_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .arg(sub)
            .env(
                "EMBER_FLEET_DATABASE__URL",
                format!("sqlite://{}", dir.path().join("f.db").display()),
            )
            .env("EMBER_FLEET_HTTP__LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ember-fleet");
        let mut status = None;
        let exited = wait_until(Duration::from_secs(20), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        if !exited {
            stderr.push_str("\n(it started and served: killed after 20 s)");
        }
        (status.and_then(|s| s.code()), stderr)
    };
    for env in [
        &[("HOSTNAME", "ember-fleet-7d9f8b6c5-x2kqz")][..],
        &[("EMBER_FLEET_MQTT__CLIENT_ID", "ember-fleet-$(POD_NAME)")][..],
    ] {
        let (code, stderr) = run(env, "run");
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains("mqtt.client_id"), "{env:?}: {stderr}");
    }
    let (code, stderr) = run(&[("HOSTNAME", "ember-fleet-7d9f8b6c5-x2kqz")], "migrate");
    assert_eq!(code, Some(0), "{stderr}");
    let s = Settings::from_toml("", "t", vec![("HOSTNAME".into(), "ember-fleet-0".into())])
        .expect("a StatefulSet name is fine");
    s.check_replica_identity().expect("stable");
}
