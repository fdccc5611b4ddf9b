//! **API boundary: desired-state sinks.** Where the desired-state publisher delivers each
//! device's desired state. The built-in sink is the broker (retained QoS 1 on the publisher's
//! own MQTT connection, [`super::publisher`]; AWS IoT Core with the fleet's certificate is such a
//! broker); [`DesiredStateSink`] is the interface for request/response transports: AWS IoT
//! Core's data plane with the fleet's IAM role ([`IotDataSink`]), an Azure IoT Hub twin PATCH.
//!
//! Contract: [`DesiredStateSink::deliver`] returns `Ok` only once the transport confirmed that
//! `payload` is now the device's current desired state (replacing any earlier one: a retained
//! message, a twin's desired properties). That confirmation replaces the MQTT PUBACK in the
//! outbox bookkeeping: only then is the outbox row marked published
//! (`store::mark_published`), so a crash or an error republishes it (devices compare
//! versions, so a repeat is harmless). The publisher still runs on the leader replica only.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::publisher::PUBLISH_INTERVAL;
use super::service::Service;
#[cfg(feature = "cloud")]
use crate::cloud::aws::{AwsClient, AwsError};

/// A boxed future, for the object-safe trait below.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a delivery failed; the row stays unpublished and is tried again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// A transport that makes a payload the device's current desired state.
pub trait DesiredStateSink: Send + Sync + 'static {
    /// For logs: `aws-iot-data`, `azure-twin`, ...
    fn name(&self) -> &'static str;
    /// Delivers `payload` (the device's encoded `DesiredState`); `Ok` once confirmed.
    fn deliver<'a>(
        &'a self,
        device: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), SinkError>>;
}

/// AWS IoT Core's data plane: `POST /topics/ember%2Fv1%2F<device>%2Fdesired?qos=1&retain=true`
/// on the account's ATS endpoint, signed with the fleet's IAM role (IRSA on EKS; needs
/// `iot:Publish` and `iot:RetainPublish` on the desired topics, terraform/aws/modules/eks).
#[cfg(feature = "cloud")]
pub struct IotDataSink {
    pub client: AwsClient,
    /// `https://<prefix>-ats.iot.<region>.amazonaws.com` (or a local emulator's URL).
    pub endpoint: String,
}

#[cfg(feature = "cloud")]
impl DesiredStateSink for IotDataSink {
    fn name(&self) -> &'static str {
        "aws-iot-data"
    }

    fn deliver<'a>(
        &'a self,
        device: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let topic = format!("{}/{device}/desired", ember_proto::topic::PREFIX);
            let url = format!(
                "{}/topics/{}?qos=1&retain=true",
                self.endpoint.trim_end_matches('/'),
                topic.replace('/', "%2F")
            );
            let (status, body) = self
                .client
                .send(
                    "iot-data",
                    "iotdevicegateway",
                    http::Method::POST,
                    &url,
                    &[("content-type", "application/octet-stream")],
                    payload.to_vec(),
                )
                .await
                .map_err(|e: AwsError| SinkError(e.to_string()))?;
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(SinkError(format!(
                    "IoT data plane answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )))
            }
        })
    }
}

impl Service {
    /// The publisher over a [`DesiredStateSink`]: delivers every unpublished outbox row's
    /// device state, marks the rows published after each confirmed delivery, until `shutdown`.
    pub async fn publish_to(
        self: Arc<Self>,
        sink: Arc<dyn DesiredStateSink>,
        shutdown: CancellationToken,
    ) {
        tracing::info!(sink = sink.name(), "Publishing desired states.");
        let mut interval = tokio::time::interval(PUBLISH_INTERVAL);
        loop {
            let mut more = false;
            match self.load_outbox(&HashSet::new()).await {
                Ok(msgs) => {
                    for msg in &msgs {
                        if shutdown.is_cancelled() {
                            break;
                        }
                        match sink.deliver(&msg.device, &msg.payload).await {
                            Ok(()) => {
                                self.published(msg).await;
                                more = true;
                            }
                            Err(e) => {
                                tracing::warn!(device = %msg.device, sink = sink.name(), error = %e,
                                    "Could not deliver a desired state; it is tried again.");
                                more = false;
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Could not read the desired-state outbox; trying again.");
                }
            }
            if more {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = interval.tick() => {}
            }
        }
        tracing::info!(sink = sink.name(), "The desired-state publisher stopped.");
    }
}

/// A sink that could not be set up: every delivery fails with the reason (logged each time),
/// so the outbox keeps its rows rather than the publisher silently using another transport.
struct Unavailable(String);

impl DesiredStateSink for Unavailable {
    fn name(&self) -> &'static str {
        "unavailable"
    }

    fn deliver<'a>(&'a self, _: &'a str, _: &'a [u8]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { Err(SinkError(self.0.clone())) })
    }
}

/// The configured sink, or `None` for the built-in MQTT publisher.
pub fn from_settings(
    settings: &crate::config::Settings,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Option<Arc<dyn DesiredStateSink>> {
    #[cfg(not(feature = "cloud"))]
    let _ = metrics;
    match &settings.desired.sink {
        crate::config::DesiredSink::Mqtt => None,
        // Refused by `Settings::check_build` already, for callers that skip it.
        #[cfg(not(feature = "cloud"))]
        crate::config::DesiredSink::AzureTwin(_)
        | crate::config::DesiredSink::AwsIotData { .. } => Some(Arc::new(Unavailable(
            "this desired.sink needs ember-fleet built with its `cloud` feature".into(),
        ))),
        #[cfg(feature = "cloud")]
        crate::config::DesiredSink::AzureTwin(t) => Some(
            match super::azure_twin::AzureTwinSink::from_settings(t, metrics.clone()) {
                Ok(sink) => Arc::new(sink),
                Err(e) => Arc::new(Unavailable(e.to_string())),
            },
        ),
        #[cfg(feature = "cloud")]
        crate::config::DesiredSink::AwsIotData { endpoint, region } => Some(
            match AwsClient::from_env(region, endpoint.starts_with("http://")) {
                Ok(client) => Arc::new(IotDataSink {
                    client,
                    endpoint: endpoint.clone(),
                }),
                Err(e) => Arc::new(Unavailable(e.to_string())),
            },
        ),
    }
}
