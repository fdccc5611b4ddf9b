//! `database.token_source = "azure-workload-identity"`: the fleet signs in to PostgreSQL with
//! Entra ID access tokens that it gets by exchanging AKS's projected service-account token, and
//! renews them. Here a small OAuth token endpoint in the test process stands in for Entra ID
//! (test support, not Entra: it checks the request's form and hands out the token the test
//! chooses), and a real PostgreSQL 15 demands that token as the role's password (SCRAM).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use ember_testkit::{TestBroker, TestPostgres};

use crate::support::WAIT;
use crate::support::http;
use crate::support::replicas::{FleetProcess, wait_for};

/// The managed identity's name: the PostgreSQL role Entra sign-in maps it to.
const ROLE: &str = "ember-fleet-mi";
const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.federated.sig";

#[derive(Default)]
struct Endpoint {
    token: String,
    requests: usize,
    bad_requests: Vec<String>,
}

/// An OAuth 2.0 token endpoint: every POST with the workload-identity form gets `token`
/// (valid 1 s, so the fleet renews as early as it does: after 30 s).
fn token_endpoint(state: Arc<Mutex<Endpoint>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let (mut head, mut len) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body).to_string();
            let mut st = state.lock().expect("lock");
            st.requests += 1;
            let ok = head.starts_with("POST /tenant-7/oauth2/v2.0/token ")
                && body.contains(&format!("client_assertion={ASSERTION}"))
                && body.contains("client_id=client-7")
                && body.contains("grant_type=client_credentials")
                && body.contains("ossrdbms-aad.database.windows.net");
            let answer = if ok {
                format!(
                    r#"{{"token_type":"Bearer","expires_in":1,"access_token":"{}"}}"#,
                    st.token
                )
            } else {
                st.bad_requests.push(format!("{head}{body}"));
                r#"{"error":"invalid_request"}"#.to_string()
            };
            drop(st);
            let mut s = s;
            let _ = write!(
                s,
                "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                if ok { 200 } else { 400 },
                answer.len()
            );
        }
    });
    port
}

fn health(port: u16) -> Option<(u16, String)> {
    http::try_request(port, "GET", "/api/v1/health", None, None)
        .ok()
        .map(|r| (r.status, r.body))
}

/// The fleet migrates and serves as the identity's role with the first token; after the role's
/// password (the token) changes and its connections are cut, new connections fail until the
/// fleet renews its token (from the endpoint, at 80 % of the lifetime, at least 30 s), and then
/// succeed: the health check's database ping says which.
#[test]
fn the_fleet_signs_in_to_postgres_with_workload_identity_tokens_and_renews_them() {
    let pg = TestPostgres::start();
    pg.psql(
        "postgres",
        &format!("CREATE ROLE \"{ROLE}\" LOGIN PASSWORD 'token-1'"),
    );
    pg.psql(
        "postgres",
        &format!("CREATE DATABASE ember OWNER \"{ROLE}\""),
    );
    pg.require_password(ROLE);
    let state = Arc::new(Mutex::new(Endpoint {
        token: "token-1".into(),
        ..Endpoint::default()
    }));
    let endpoint = token_endpoint(state.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let federated = dir.path().join("azure-identity-token");
    std::fs::write(&federated, format!("{ASSERTION}\n")).expect("write");
    let authority = format!("http://127.0.0.1:{endpoint}/");
    let federated = federated.display().to_string();
    let env = [
        ("AZURE_TENANT_ID", "tenant-7"),
        ("AZURE_CLIENT_ID", "client-7"),
        ("AZURE_AUTHORITY_HOST", authority.as_str()),
        ("AZURE_FEDERATED_TOKEN_FILE", federated.as_str()),
        (
            "EMBER_FLEET_DATABASE__TOKEN_SOURCE",
            "azure-workload-identity",
        ),
    ];
    let broker = TestBroker::start();
    let url = format!("postgres://{ROLE}@127.0.0.1:{}/ember", pg.port());
    let data = tempfile::tempdir().expect("tempdir");
    let fleet = FleetProcess::start_env(
        &url,
        broker.port(),
        "ember-fleet-entra",
        data.path(),
        "",
        &env,
    );
    // Healthy: it signed in with token-1 and migrated as the role.
    assert_eq!(
        pg.psql(
            "ember",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'telemetry'"
        ),
        ROLE
    );
    assert!(state.lock().expect("lock").bad_requests.is_empty());

    // The password changes (a new token); cut the role's connections: new ones fail until the
    // fleet renews its token.
    let cut = || {
        pg.psql(
            "postgres",
            &format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{ROLE}'"),
        )
    };
    let before = {
        let mut st = state.lock().expect("lock");
        st.token = "token-2".into();
        st.requests
    };
    pg.psql(
        "postgres",
        &format!("ALTER ROLE \"{ROLE}\" PASSWORD 'token-2'"),
    );
    cut();
    wait_for(
        "the old token to be refused on a new connection",
        WAIT,
        || {
            health(fleet.port)
                .is_some_and(|(s, b)| s == 503 && b.contains("\"database\":\"error\""))
        },
    );
    wait_for("the fleet to renew its token", WAIT, || {
        state.lock().expect("lock").requests > before
    });
    cut();
    wait_for(
        "the fleet to sign in again with the new token",
        WAIT,
        || health(fleet.port).is_some_and(|(s, b)| s == 200 && b.contains("\"database\":\"ok\"")),
    );
    let st = state.lock().expect("lock");
    assert!(st.bad_requests.is_empty(), "{:?}", st.bad_requests);
    let log = fleet.log_text();
    assert!(log.contains("Renewed the Entra ID token"), "{log}");
    assert!(
        !log.contains("token-2") && !log.contains("token-1"),
        "a token was logged:\n{log}"
    );
}
