//! Google Cloud Pub/Sub, for `ember-fleet bridge` ([`crate::bridge`]) and the Pub/Sub ingestion
//! source ([`crate::server::ingest::pubsub`]), through the `gcloud-pubsub` client (ARCHITECTURE.md
//! says why that one).
//!
//! Credentials: with `PUBSUB_EMULATOR_HOST` set, the emulator at that address (plaintext, no
//! credentials, the project `local-project` unless one is configured); otherwise Google's
//! Application Default Credentials, which on GKE are Workload Identity's metadata server (the
//! pod's Kubernetes service account bound to a Google service account: no key file anywhere).
//! The project comes from the configuration, a full resource name, or the metadata server.

use gcloud_pubsub::client::{Client, ClientConfig};

/// What can go wrong talking to Pub/Sub; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    #[error(
        "cannot get Google credentials: {0} (on GKE: is the pod's service account bound to a Google service account through Workload Identity? elsewhere: set GOOGLE_APPLICATION_CREDENTIALS, or PUBSUB_EMULATOR_HOST for the emulator)"
    )]
    Credentials(String),
    #[error(
        "no Google Cloud project: set {key} or a full resource name (projects/<project>/...), or run where the metadata server tells it"
    )]
    NoProject { key: &'static str },
    #[error("cannot set up the Pub/Sub client: {0} (check the network path to Pub/Sub)")]
    Client(String),
    #[error("Pub/Sub refused {what}: {status} (does it exist, and may this identity use it?)")]
    Api { what: String, status: String },
}

/// A resource name split into its project (if the name is a full one) and its id.
pub fn split_name<'a>(name: &'a str, kind: &str) -> (Option<&'a str>, &'a str) {
    if let Some(rest) = name.strip_prefix("projects/") {
        let mut parts = rest.splitn(3, '/');
        if let (Some(p), Some(k), Some(id)) = (parts.next(), parts.next(), parts.next())
            && k == kind
        {
            return (Some(p), id);
        }
    }
    (None, name)
}

/// A Pub/Sub client for `project` (or the project a full `name` states, or the one the
/// credentials know). `key` names the setting to blame when no project is found.
pub async fn client(
    project: Option<&str>,
    name: &str,
    kind: &str,
    key: &'static str,
) -> Result<Client, GcpError> {
    // tonic's TLS (and the token fetch's reqwest) use the process's rustls provider: ring,
    // like the rest of the fleet.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = ClientConfig::default();
    let from_name = split_name(name, kind).0;
    if let Some(p) = project.or(from_name) {
        config.project_id = Some(p.to_string());
    }
    let config = config
        .with_auth()
        .await
        .map_err(|e| GcpError::Credentials(e.to_string()))?;
    if config.project_id.is_none() {
        return Err(GcpError::NoProject { key });
    }
    Client::new(config).await.map_err(|e| match e {
        gcloud_pubsub::client::Error::ProjectIdNotFound => GcpError::NoProject { key },
        e => GcpError::Client(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_project_and_id() {
        assert_eq!(
            split_name("projects/p1/topics/t1", "topics"),
            (Some("p1"), "t1")
        );
        assert_eq!(split_name("t1", "topics"), (None, "t1"));
        assert_eq!(
            split_name("projects/p1/subscriptions/s", "topics"),
            (None, "projects/p1/subscriptions/s")
        );
    }
}
