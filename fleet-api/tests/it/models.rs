//! The model registry: uploads verified against the trusted keys, list/get/download
//! byte-identical, refusals with the bundle error's text and nothing stored, Range resume,
//! per-device download authorization, deprecation, a restart, the size cap and the CLI; the
//! same through an S3 store (a real S3-compatible server, moto).
//!
//! Bundles: the committed `models/bundles/*.bundle` (1.0.0, development key) and variants made
//! with `ember_testkit::bundles` (re-signed with the development key).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use ember_fleet::config::{Backend, DatabaseSettings, Settings};
use ember_fleet::db::{Db, Sql};
use ember_host::client::{Body, FleetClient};
use ember_testkit::bundles::{committed, committed_path, dev_public_key_path, with_version};
use ember_testkit::{TestBroker, TestS3};
use serde_json::{Value, json};

use crate::api::token_cli;
use crate::on_both_backends;
use crate::support::{ADMIN, Kind, Store, TestFleet, client_id, config, fleet_bin};

on_both_backends!(registry_end_to_end);

/// An HTTP answer with a binary body.
pub(crate) struct Bin {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Bin {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (for failure messages).
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One request on its own connection; bodies are bytes, answers need a Content-Length.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Bin {
    let client = FleetClient::local(port);
    let client = match token {
        Some(t) => client.with_token(t),
        None => client,
    };
    let mut all = vec![("Connection", "close")];
    all.extend_from_slice(headers);
    let r = client
        .send(method, path, &all, body.map(Body::Bytes))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let bin = Bin {
        status: r.status,
        headers: r.headers,
        body: r.body,
    };
    if method != "HEAD" {
        let len: usize = bin
            .header("content-length")
            .unwrap_or_else(|| panic!("{method} {path}: no Content-Length"))
            .parse()
            .unwrap();
        assert_eq!(bin.body.len(), len, "{method} {path}: short body");
    }
    bin
}

fn sha256(b: &[u8]) -> String {
    ember_bundle::hex::sha256(b)
}

/// The test config with a data dir and the development key trusted.
fn registry_config(store: &Store, data_dir: &std::path::Path, port: u16, extra: &str) -> String {
    format!(
        "data_dir = \"{}\"\n{}",
        data_dir.display(),
        config(
            &store.url(),
            port,
            &client_id(),
            &format!(
                "[models]\ntrusted_keys = [\"{}\"]\n{extra}",
                dev_public_key_path().display()
            ),
        )
    )
}

fn start(text: &str) -> TestFleet {
    let fleet = TestFleet::spawn(text);
    fleet.wait_healthy();
    fleet
}

pub(crate) fn upload(fleet: &TestFleet, token: &str, bytes: &[u8]) -> Bin {
    http(
        fleet.port,
        "POST",
        "/api/v1/models",
        Some(token),
        &[("Content-Type", "application/octet-stream")],
        Some(bytes),
    )
}

/// Uploads `bytes` to the fleet on `port` with the admin token; the status.
pub(crate) fn upload_to(port: u16, bytes: &[u8]) -> u16 {
    http(
        port,
        "POST",
        "/api/v1/models",
        Some(ADMIN),
        &[("Content-Type", "application/octet-stream")],
        Some(bytes),
    )
    .status
}

/// Downloads `path` from the fleet on `port` with the admin token; panics unless 200.
pub(crate) fn download_from(port: u16, path: &str) -> Vec<u8> {
    let r = http(port, "GET", path, Some(ADMIN), &[], None);
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.body
}

fn download(fleet: &TestFleet, token: &str, path: &str, range: Option<&str>) -> Bin {
    let headers: Vec<(&str, &str)> = range.map(|r| ("Range", r)).into_iter().collect();
    http(fleet.port, "GET", path, Some(token), &headers, None)
}

/// Inserts a desired-state row as the rollout engine does.
fn assign(kind: Kind, db_url: &str, device: &str, model: &str, version: &str) {
    let settings = DatabaseSettings {
        url: db_url.to_string(),
        backend: match kind {
            Kind::Sqlite => Backend::Sqlite,
            Kind::Postgres => Backend::Postgres,
        },
        max_connections: 1,
        token_source: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = Db::connect(&settings).await.unwrap();
        let mut q = Sql::new(
            "INSERT INTO desired_models (device_id, model, version, rollout_id, revision, updated_at) VALUES (",
        );
        q.bind(device)
            .push(", ")
            .bind(model)
            .push(", ")
            .bind(version)
            .push(", 'r-test', 1, 1)");
        q.query().execute(db.pool()).await.unwrap();
        db.close().await;
    });
}

fn registry_end_to_end(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let data = tempfile::tempdir().unwrap();
    let text = registry_config(&store, data.path(), broker.port(), "");
    let fleet = start(&text);
    let port = fleet.port;

    // Upload the committed bundle: 201, entry describes the file.
    let original = committed("activity-f32");
    let r = upload(&fleet, ADMIN, &original);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["name"], "activity");
    assert_eq!(e["version"], "1.0.0");
    assert_eq!(e["kind"], "activity");
    assert_eq!(e["precision"], "f32");
    assert_eq!(e["sha256"], sha256(&original));
    assert_eq!(e["size"], original.len());
    assert_eq!(e["deprecated"], false);
    assert_eq!(r.header("location"), Some("/api/v1/models/activity/1.0.0"));
    assert!(
        data.path()
            .join(format!(
                "models/activity/1.0.0/{}.bundle",
                sha256(&original)
            ))
            .is_file(),
        "the blob is under <data_dir>/models/<name>/<version>/<sha256>.bundle"
    );

    // Download: byte-identical, ETag = sha256.
    let whole = download(&fleet, ADMIN, "/api/v1/models/activity/1.0.0/bundle", None);
    assert_eq!(whole.status, 200);
    assert!(
        whole.body == original,
        "the download differs from the upload"
    );
    assert_eq!(
        whole.header("etag"),
        Some(format!("\"{}\"", sha256(&original)).as_str())
    );
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));

    // Range resume: first half, then the rest.
    let n = original.len();
    let half = n / 2;
    let first = download(
        &fleet,
        ADMIN,
        "/api/v1/models/activity/1.0.0/bundle",
        Some(&format!("bytes=0-{}", half - 1)),
    );
    assert_eq!(first.status, 206);
    assert_eq!(
        first.header("content-range"),
        Some(format!("bytes 0-{}/{n}", half - 1).as_str())
    );
    let rest = download(
        &fleet,
        ADMIN,
        "/api/v1/models/activity/1.0.0/bundle",
        Some(&format!("bytes={half}-")),
    );
    assert_eq!(rest.status, 206);
    assert_eq!(
        rest.header("content-range"),
        Some(format!("bytes {half}-{}/{n}", n - 1).as_str())
    );
    let mut joined = first.body.clone();
    joined.extend_from_slice(&rest.body);
    assert!(joined == original, "resumed download differs");
    let past = download(
        &fleet,
        ADMIN,
        "/api/v1/models/activity/1.0.0/bundle",
        Some(&format!("bytes={n}-")),
    );
    assert_eq!(past.status, 416);
    assert_eq!(
        past.header("content-range"),
        Some(format!("bytes */{n}").as_str())
    );

    // Duplicate: 409, nothing replaced.
    let r = upload(&fleet, ADMIN, &original);
    assert_eq!(r.status, 409);
    assert!(
        r.message().contains("already registered"),
        "{}",
        r.message()
    );

    // Refusals: 400 with the bundle error's text, nothing stored.
    let v9 = with_version("activity-f32", "9.9.9");
    let mut tampered = v9.clone();
    let at = tampered.len() - 500; // in the weights
    tampered[at] ^= 0x10;
    let untrusted = ember_bundle::rebundle(
        &original,
        &ember_bundle::SigningKey::from_bytes(&[7u8; 32]),
        |m| m["version"] = "9.9.9".into(),
        |_| {},
    )
    .unwrap();
    let raw = ember_bundle::RawBundle::read(&v9).unwrap();
    let unsigned =
        ember_bundle::RawBundle::new(raw.manifest_bytes().to_vec(), raw.weights().to_vec())
            .unwrap()
            .to_bytes();
    // Signed by a trusted key, but named ".." (would escape the blob directory).
    let mut m: Value = serde_json::from_slice(raw.manifest_bytes()).unwrap();
    m["name"] = "..".into();
    let mut dots =
        ember_bundle::RawBundle::new(serde_json::to_vec(&m).unwrap(), raw.weights().to_vec())
            .unwrap();
    dots.sign(&ember_testkit::bundles::dev_signing_key());
    let dots = dots.to_bytes();
    let cases: [(&str, &[u8], &str); 6] = [
        ("named ..", &dots, "manifest field `name`"),
        (
            "tampered",
            &tampered,
            "weights do not match the manifest's sha256",
        ),
        (
            "truncated",
            &v9[..v9.len() - 30],
            "bundle is truncated: the signature",
        ),
        ("untrusted", &untrusted, "which is not trusted here"),
        ("unsigned", &unsigned, "bundle is not signed"),
        (
            "not a bundle",
            b"{\"hello\": 1}",
            "not an Ember model bundle",
        ),
    ];
    for (what, bytes, message) in cases {
        let r = upload(&fleet, ADMIN, bytes);
        assert_eq!(r.status, 400, "{what}");
        assert_eq!(r.json()["error"]["code"], "invalid_bundle", "{what}");
        assert!(r.message().contains(message), "{what}: {}", r.message());
    }
    assert_eq!(
        http(
            port,
            "GET",
            "/api/v1/models/activity/9.9.9",
            Some(ADMIN),
            &[],
            None
        )
        .status,
        404
    );
    assert!(!data.path().join("models/activity/9.9.9").exists());

    // Scopes: a read token reads but cannot upload or deprecate.
    let read = token_cli(&fleet.db_url, &["create", "--scope", "read"]);
    let r = upload(&fleet, &read, &v9);
    assert_eq!(r.status, 403, "read token uploaded");
    assert!(r.message().contains("admin"), "{}", r.message());
    let r = http(port, "GET", "/api/v1/models", Some(&read), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(
        http(port, "GET", "/api/v1/models", None, &[], None).status,
        401
    );

    // More versions: semver order, another model.
    for v in ["1.10.0", "1.2.0", "1.1.0"] {
        let r = upload(&fleet, ADMIN, &with_version("activity-f32", v));
        assert_eq!(r.status, 201, "{v}: {}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(
        upload(&fleet, ADMIN, &committed("anomaly-int8")).status,
        201
    );
    let versions: Vec<String> = http(
        port,
        "GET",
        "/api/v1/models/activity",
        Some(&read),
        &[],
        None,
    )
    .json()["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions, ["1.0.0", "1.1.0", "1.2.0", "1.10.0"]);
    // The list pages in the same order.
    let page1 = http(
        port,
        "GET",
        "/api/v1/models?limit=3",
        Some(ADMIN),
        &[],
        None,
    )
    .json();
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let page2 = http(
        port,
        "GET",
        &format!("/api/v1/models?limit=3&cursor={cursor}"),
        Some(ADMIN),
        &[],
        None,
    )
    .json();
    let listed: Vec<String> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|e| {
            format!(
                "{}@{}",
                e["name"].as_str().unwrap(),
                e["version"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            "activity@1.0.0",
            "activity@1.1.0",
            "activity@1.2.0",
            "activity@1.10.0",
            "anomaly@1.0.0"
        ]
    );
    assert!(page2["next_cursor"].is_null());
    let detail = http(
        port,
        "GET",
        "/api/v1/models/anomaly/1.0.0",
        Some(ADMIN),
        &[],
        None,
    )
    .json();
    assert_eq!(detail["precision"], "int8");
    assert_eq!(detail["manifest"]["output"]["kind"], "anomaly_score");
    assert_eq!(detail["download"], "/api/v1/models/anomaly/1.0.0/bundle");
    // Bad path input is a 400 that says what is wrong.
    let r = http(
        port,
        "GET",
        "/api/v1/models/Activity/1.0",
        Some(ADMIN),
        &[],
        None,
    );
    assert_eq!(r.status, 400);
    assert!(r.message().contains("model name"), "{}", r.message());
    let r = http(
        port,
        "GET",
        "/api/v1/models/activity/1.0",
        Some(ADMIN),
        &[],
        None,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("not a semantic version"),
        "{}",
        r.message()
    );

    // Device tokens: only their own desired assignment.
    let dev1 = token_cli(&fleet.db_url, &["create", "--scope", "device:dev-1"]);
    let dev2 = token_cli(&fleet.db_url, &["create", "--scope", "device:dev-2"]);
    assign(kind, &fleet.db_url, "dev-1", "activity", "1.1.0");
    let v110 = with_version("activity-f32", "1.1.0");
    let own = download(&fleet, &dev1, "/api/v1/models/activity/1.1.0/bundle", None);
    assert_eq!(own.status, 200);
    assert!(own.body == v110);
    let resumed = download(
        &fleet,
        &dev1,
        "/api/v1/models/activity/1.1.0/bundle",
        Some("bytes=100-"),
    );
    assert_eq!(resumed.status, 206);
    assert!(resumed.body[..] == v110[100..]);
    for (token, path, who) in [
        (
            &dev1,
            "/api/v1/models/activity/1.0.0/bundle",
            "unassigned version",
        ),
        (
            &dev2,
            "/api/v1/models/activity/1.1.0/bundle",
            "another device's assignment",
        ),
        (
            &dev1,
            "/api/v1/models/anomaly/1.0.0/bundle",
            "unassigned model",
        ),
    ] {
        let r = download(&fleet, token, path, None);
        assert_eq!(r.status, 403, "{who}");
        assert!(
            r.message().contains("is not assigned"),
            "{who}: {}",
            r.message()
        );
    }
    for path in [
        "/api/v1/models",
        "/api/v1/models/activity",
        "/api/v1/models/activity/1.1.0",
    ] {
        assert_eq!(
            http(port, "GET", path, Some(&dev1), &[], None).status,
            403,
            "device token on {path}"
        );
    }
    assert_eq!(upload(&fleet, &dev1, &v9).status, 403);

    // Deprecate and undo (admin only); a deprecated version stays downloadable.
    let dep = |token: &str, body: &Value| {
        http(
            port,
            "POST",
            "/api/v1/models/activity/1.0.0/deprecate",
            Some(token),
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    };
    assert_eq!(dep(&read, &json!({"deprecated": true})).status, 403);
    let r = dep(ADMIN, &json!({"deprecated": true}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["deprecated"], true);
    assert_eq!(dep(ADMIN, &json!({"deprecated": "yes"})).status, 400);
    assert_eq!(
        http(
            port,
            "POST",
            "/api/v1/models/activity/7.0.0/deprecate",
            Some(ADMIN),
            &[("Content-Type", "application/json")],
            Some(b"{\"deprecated\": true}"),
        )
        .status,
        404
    );
    assert_eq!(
        download(&fleet, ADMIN, "/api/v1/models/activity/1.0.0/bundle", None).status,
        200
    );

    let m = fleet.metrics();
    assert_eq!(
        m.get("model_uploads_total{outcome=\"registered\"}"),
        Some(&5.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("model_uploads_total{outcome=\"invalid\"}"),
        Some(&6.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("model_uploads_total{outcome=\"duplicate\"}"),
        Some(&1.0),
        "{m:?}"
    );
    assert!(
        m.get("model_download_bytes_total")
            .is_some_and(|b| *b >= 3.0 * n as f64),
        "{m:?}"
    );

    // Restart: the registry (rows and blobs) is still there.
    fleet.stop().unwrap();
    let fleet = start(&text);
    let d = http(
        fleet.port,
        "GET",
        "/api/v1/models/activity/1.0.0",
        Some(ADMIN),
        &[],
        None,
    )
    .json();
    assert_eq!(d["deprecated"], true);
    let r = download(&fleet, ADMIN, "/api/v1/models/activity/1.0.0/bundle", None);
    assert!(r.body == original, "after a restart the download differs");
    let r = dep_after_restart(&fleet);
    assert_eq!(r.json()["deprecated"], false);
    assert_eq!(
        http(fleet.port, "GET", "/api/v1/models", Some(ADMIN), &[], None).json()["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

/// `models.store = "s3://ember-models/registry"` against moto on 127.0.0.1: upload, list,
/// byte-identical and ranged downloads through the fleet, the object really in the bucket
/// under the prefix, a duplicate refused, and a restart that still serves it. Nothing is
/// written under `<data_dir>/models`.
#[test]
fn registry_in_s3() {
    let s3 = TestS3::start();
    s3.create_bucket("ember-models");
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let data = tempfile::tempdir().unwrap();
    let text = registry_config(
        &store,
        data.path(),
        broker.port(),
        "store = \"s3://ember-models/registry\"",
    );
    let start_s3 = || {
        let mut settings = Settings::from_toml(&text, "test", Vec::new()).unwrap();
        // What AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, ... say in production.
        settings.models.store_options = s3.client_options();
        let fleet = TestFleet::spawn_settings(settings, 0);
        fleet.wait_healthy();
        fleet
    };
    let fleet = start_s3();

    let original = committed("activity-f32");
    let r = upload(&fleet, ADMIN, &original);
    assert_eq!(r.status, 201, "{}\nmoto: {}", r.text(), s3.log_text());
    assert_eq!(r.json()["sha256"], sha256(&original));
    let direct = s3.get(
        "ember-models",
        &format!("registry/activity/1.0.0/{}.bundle", sha256(&original)),
    );
    assert_eq!(direct.status, 200, "the object is not in the bucket");
    assert!(
        direct.body == original,
        "the object in the bucket differs from the upload"
    );
    assert!(
        !data.path().join("models").exists(),
        "an S3 store writes nothing under <data_dir>/models"
    );

    let list = http(fleet.port, "GET", "/api/v1/models", Some(ADMIN), &[], None).json();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["name"], "activity");
    assert_eq!(items[0]["version"], "1.0.0");

    let path = "/api/v1/models/activity/1.0.0/bundle";
    let whole = download(&fleet, ADMIN, path, None);
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert!(
        whole.body == original,
        "the download differs from the upload"
    );
    let n = original.len();
    let (a, b) = (n / 3, 2 * n / 3);
    let mid = download(&fleet, ADMIN, path, Some(&format!("bytes={a}-{}", b - 1)));
    assert_eq!(mid.status, 206, "{}", mid.text());
    assert_eq!(
        mid.header("content-range"),
        Some(format!("bytes {a}-{}/{n}", b - 1).as_str())
    );
    assert!(mid.body == original[a..b], "the ranged download differs");

    let r = upload(&fleet, ADMIN, &original);
    assert_eq!(r.status, 409, "{}", r.text());

    fleet.stop().unwrap();
    let fleet = start_s3();
    let whole = download(&fleet, ADMIN, path, None);
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert!(
        whole.body == original,
        "after a restart the download differs"
    );
    let tail = download(&fleet, ADMIN, path, Some(&format!("bytes={b}-")));
    assert_eq!(tail.status, 206);
    assert!(
        tail.body == original[b..],
        "after a restart the range differs"
    );
}

/// A `models.store` that is neither `fs` nor a supported object-storage URL is a config error
/// naming the key and the accepted forms; a supported URL resolves.
#[test]
fn model_store_urls() {
    for bad in [
        "s4://bucket/x",
        "s3://",
        "s3://key:secret@bucket/x",
        "ftp://host/x",
        "files",
        "s3://bucket/../x",
    ] {
        let err = Settings::from_toml(
            &format!("[models]\nstore = \"{bad}\"\n"),
            "test",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("models.store"), "{bad}: {err}");
        assert!(err.contains("s3://bucket/prefix"), "{bad}: {err}");
        assert!(!err.contains("secret"), "credentials echoed: {err}");
    }
    for good in ["s3://b/p", "gs://b/p/q", "az://container", "fs"] {
        let s = Settings::from_toml(
            &format!("[models]\nstore = \"{good}\"\n"),
            "test",
            Vec::new(),
        )
        .unwrap();
        assert!(
            s.to_toml().contains(&format!("store = \"{good}\"")),
            "{}",
            s.to_toml()
        );
    }
}

fn dep_after_restart(fleet: &TestFleet) -> Bin {
    http(
        fleet.port,
        "POST",
        "/api/v1/models/activity/1.0.0/deprecate",
        Some(ADMIN),
        &[("Content-Type", "application/json")],
        Some(b"{\"deprecated\": false}"),
    )
}

/// A bundle over `models.max_bundle_bytes` is refused with 413 naming the limit; no trusted
/// keys means every upload is refused with a message saying how to configure them.
#[test]
fn size_cap_and_missing_trusted_keys() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let data = tempfile::tempdir().unwrap();
    let fleet = start(&registry_config(
        &store,
        data.path(),
        broker.port(),
        "max_bundle_bytes = 4096",
    ));
    let r = upload(&fleet, ADMIN, &committed("anomaly-int8"));
    assert_eq!(r.status, 413);
    assert!(r.message().contains("4096 bytes"), "{}", r.message());
    assert!(
        r.message().contains("models.max_bundle_bytes"),
        "{}",
        r.message()
    );
    fleet.stop().unwrap();

    let text = format!(
        "data_dir = \"{}\"\n{}",
        data.path().display(),
        config(&store.url(), broker.port(), &client_id(), "")
    );
    let fleet = start(&text);
    let r = upload(&fleet, ADMIN, &committed("anomaly-int8"));
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("models.trusted_keys"),
        "{}",
        r.message()
    );
}

/// A configured trusted key that is missing or not a public key stops the fleet before it
/// starts, naming the key.
#[test]
fn bad_trusted_key_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("dev.key");
    std::fs::copy(dev_public_key_path().with_extension("key"), &secret).unwrap();
    for (paths, says) in [
        (
            format!("[\"{}\"]", dir.path().join("nope.pub").display()),
            "cannot read key file",
        ),
        (format!("[\"{}\"]", secret.display()), "ed25519-public"),
    ] {
        let err = Settings::from_toml(
            &format!("[models]\ntrusted_keys = {paths}\n"),
            "test",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("models.trusted_keys[0]"), "{err}");
        assert!(err.contains(says), "{err}");
    }
    // The environment form: comma-separated paths.
    let s = Settings::from_toml(
        "",
        "test",
        vec![(
            "EMBER_FLEET_MODELS__TRUSTED_KEYS".to_string(),
            format!(
                "{},{}",
                dev_public_key_path().display(),
                dev_public_key_path().display()
            ),
        )],
    )
    .unwrap();
    assert_eq!(s.models.trusted_keys.len(), 2);
    assert_eq!(s.models.keys.ids().count(), 1);
}

fn model_cli(port: u16, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(fleet_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EMBER_FLEET_") {
            cmd.env_remove(k);
        }
    }
    if let Some(t) = token {
        cmd.env("EMBER_FLEET_TOKEN", t);
    }
    cmd.arg("model")
        .arg("--url")
        .arg(format!("http://127.0.0.1:{port}"))
        .args(args)
        .output()
        .unwrap()
}

/// `ember-fleet model upload|list|show|deprecate` against a running fleet.
#[test]
fn cli_upload_list_show_deprecate() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let data = tempfile::tempdir().unwrap();
    let fleet = start(&registry_config(&store, data.path(), broker.port(), ""));
    let port = fleet.port;
    let path = committed_path("activity-int8");
    let path = path.to_str().unwrap();

    let out = model_cli(port, Some(ADMIN), &["upload", path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Registered activity 1.0.0"), "{stdout}");

    // Again: the 409 message reaches the user, exit status 1.
    let out = model_cli(port, Some(ADMIN), &["upload", path]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 409") && stderr.contains("already registered"),
        "{stderr}"
    );

    // A tampered file: the bundle error's text.
    let mut bytes = committed("anomaly-f32");
    let at = bytes.len() - 300;
    bytes[at] ^= 1;
    let bad = data.path().join("bad.bundle");
    std::fs::write(&bad, &bytes).unwrap();
    let out = model_cli(port, Some(ADMIN), &["upload", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 400") && stderr.contains("weights do not match"),
        "{stderr}"
    );

    // The token from a file.
    let token_file = data.path().join("token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).unwrap();
    let out = model_cli(
        port,
        None,
        &["--token-file", token_file.to_str().unwrap(), "list"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("activity\t1.0.0\tactivity\tint8"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");

    let out = model_cli(port, Some(ADMIN), &["show", "activity", "1.0.0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["manifest"]["precision"], "int8");

    let out = model_cli(port, Some(ADMIN), &["deprecate", "activity", "1.0.0"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is deprecated"));
    let out = model_cli(port, Some(ADMIN), &["show", "activity"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\tdeprecated"));
    let out = model_cli(
        port,
        Some(ADMIN),
        &["deprecate", "activity", "1.0.0", "--undo"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no longer deprecated"));

    // No token: says how to give one.
    let out = model_cli(port, None, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EMBER_FLEET_TOKEN"));
}
