//! The desired-state publisher: keeps every device's retained `ember/v1/{device}/desired`
//! message in step with the `desired_models` outbox that [`super::store`] fills.
//!
//! ```text
//! Service::step ──Notify──▶ publish: load_outbox (rows with published_revision < revision)
//!                             → DesiredState per device (registry sha256/size/url, shadow)
//!                             → retained QoS 1 on its own `<client_id>-desired` connection
//!                             → PUBACK → store::mark_published(revision it carried)
//! ```
//!
//! Guarantees:
//! * One publisher for the whole fleet: it runs only on the leader replica
//!   (`server::cluster::spawn_singleton`), and every replica's publisher connects under the
//!   same client id ([`publisher_client_id`]), so a new leader's connection evicts the old
//!   leader's at the broker. Everything the old one sent was processed before the new one's
//!   CONNACK, and the new one reads the outbox only after it: a revision can never reach the
//!   broker after a newer one (the stale desired state after a rollback that several
//!   concurrent publishers caused, issue 16).
//! * A desired row MUST be marked published only after the broker acknowledged (PUBACK) the
//!   retained message that carried it; a crash before that republishes it (retained messages
//!   are idempotent on the device side: it compares versions).
//! * At most one message per device is in flight, at most [`MAX_IN_FLIGHT`] in all; a row
//!   skipped because its device was busy is picked up once that message is acknowledged.
//! * The publisher SHOULD look at the outbox every [`PUBLISH_INTERVAL`] even when no step
//!   woke it, so rows written by another replica go out too.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ember_proto::ota::{DesiredModel, DesiredState, ShadowPolicy};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::service::{RolloutError, Service};
use super::store;
use crate::config::Settings;
use crate::db::{Db, Sql};
use crate::ota::registry::{self, ModelEntry};

/// How often the publisher looks at the outbox without being woken.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);
/// Outbox rows read per publisher pass.
const PUBLISH_BATCH: i64 = 2000;
/// Desired-state messages awaiting their PUBACK at once.
const MAX_IN_FLIGHT: usize = 256;

impl Service {
    /// The desired state of one device as published (all its models).
    pub async fn desired_state(&self, device: &str) -> Result<DesiredState, RolloutError> {
        let mut cache = Cache::default();
        Ok(self.build_desired(device, &mut cache).await?.0)
    }

    async fn build_desired(
        &self,
        device: &str,
        cache: &mut Cache,
    ) -> Result<(DesiredState, Vec<(String, i64)>), RolloutError> {
        let rows = store::desired_for(&self.db, device).await?;
        let mut d = DesiredState::new(device);
        let mut revisions = Vec::with_capacity(rows.len());
        for row in rows {
            revisions.push((row.model.clone(), row.revision));
            let entry = match &row.version {
                Some(v) => cache.entry(&self.db, &row.model, v).await?,
                None => None,
            };
            let shadow = match (&row.rollout_id, &row.version) {
                (Some(id), Some(_)) => cache.shadow(&self.db, id).await?,
                _ => None,
            };
            d.models.push(DesiredModel {
                name: row.model.clone(),
                version: row.version.clone(),
                sha256: entry.as_ref().map(|e| e.sha256.clone()),
                size: entry.as_ref().map(|e| u64::try_from(e.size).unwrap_or(0)),
                url: entry
                    .as_ref()
                    .map(|e| registry::download_path(&e.name, &e.version)),
                rollout: row.rollout_id.clone(),
                shadow,
            });
        }
        Ok((d, revisions))
    }

    /// Desired-model rows of a rollout not yet published.
    pub async fn pending_publish(&self, id: &str) -> Result<i64, RolloutError> {
        let mut q = Sql::new(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM desired_models WHERE published_revision < revision AND rollout_id = ",
        );
        q.bind(id);
        Ok(q.query().fetch_one(self.db.pool()).await?.try_get("n")?)
    }

    /// The publisher: keeps every device's retained desired state in step with the outbox
    /// until `shutdown`. Its own MQTT connection ([`publisher_client_id`], clean session) with
    /// the fleet's broker settings and TLS. Run it on the leader only.
    pub async fn publish(self: Arc<Self>, settings: Arc<Settings>, shutdown: CancellationToken) {
        if let Some(sink) = super::sink::from_settings(&settings, &self.metrics) {
            return self.publish_to(sink, shutdown).await;
        }
        let m = &settings.mqtt;
        let min_backoff = Duration::from_millis(m.reconnect_min_ms);
        let mut backoff = min_backoff;
        'connection: while !shutdown.is_cancelled() {
            let mut opts = MqttOptions::new(publisher_client_id(m), &m.host, m.port);
            opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
            opts.set_clean_session(true);
            if let Some(user) = &m.username {
                opts.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
            }
            if let Err(e) = crate::tls::apply_mqtt(&mut opts, m) {
                tracing::error!(error = %e, "Cannot set up TLS to the broker; desired states are not published.");
                return;
            }
            opts.set_request_channel_capacity(MAX_IN_FLIGHT * 2);
            let (client, mut el) = AsyncClient::new(opts, MAX_IN_FLIGHT * 2);
            let mut p = Publishing::default();
            let mut connected = false;
            let mut dirty = true;
            let mut interval = tokio::time::interval(PUBLISH_INTERVAL);
            loop {
                if connected {
                    while p.sent.len() + p.in_flight.len() < MAX_IN_FLIGHT {
                        let Some(msg) = p.queue.pop_front() else {
                            break;
                        };
                        let topic = format!("ember/v1/{}/desired", msg.device);
                        if let Err(e) =
                            client.try_publish(topic, QoS::AtLeastOnce, true, msg.payload.clone())
                        {
                            tracing::warn!(error = %e, "Could not queue a desired state; reconnecting.");
                            continue 'connection;
                        }
                        p.sent.push_back(msg);
                    }
                    if dirty && p.queue.is_empty() {
                        dirty = false;
                        match self.load_outbox(&p.busy()).await {
                            Ok(msgs) if !msgs.is_empty() => {
                                p.queue.extend(msgs);
                                continue;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "Could not read the desired-state outbox; trying again.");
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break 'connection,
                    _ = self.wake.notified() => dirty = true,
                    _ = interval.tick() => dirty = true,
                    ev = el.poll() => match ev {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if ack.code == ConnectReturnCode::Success {
                                connected = true;
                                dirty = true;
                                backoff = min_backoff;
                                tracing::info!("The desired-state publisher is connected.");
                            } else {
                                tracing::error!(code = ?ack.code, "The broker refused the desired-state publisher.");
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            if let Some(msg) = p.sent.pop_front() {
                                p.in_flight.insert(pkid, msg);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(msg) = p.in_flight.remove(&ack.pkid) {
                                self.published(&msg).await;
                                if p.is_idle() {
                                    // Rows skipped because their device was in flight.
                                    dirty = true;
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                                "The desired-state publisher lost the broker; what was not acknowledged is published again.");
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'connection,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_millis(m.reconnect_max_ms));
                            continue 'connection;
                        }
                    }
                }
            }
        }
        tracing::info!("The desired-state publisher stopped.");
    }

    pub(super) async fn load_outbox(
        &self,
        busy: &HashSet<String>,
    ) -> Result<Vec<OutMsg>, RolloutError> {
        let rows = store::unpublished(&self.db, PUBLISH_BATCH).await?;
        let mut devices: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for r in rows {
            if !busy.contains(&r.device_id) && seen.insert(r.device_id.clone()) {
                devices.push(r.device_id);
            }
        }
        let mut cache = Cache::default();
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            let (state, revisions) = self.build_desired(&device, &mut cache).await?;
            let payload = ember_proto::message::encode(&state, ember_proto::Encoding::Json)
                .map_err(|e| RolloutError::Invalid(format!("desired state of {device}: {e}")))?;
            out.push(OutMsg {
                device,
                payload,
                revisions,
            });
        }
        Ok(out)
    }

    pub(super) async fn published(&self, msg: &OutMsg) {
        self.metrics.inc("desired_published_total", &[], 1);
        for (model, revision) in &msg.revisions {
            if let Err(e) = store::mark_published(&self.db, &msg.device, model, *revision).await {
                tracing::warn!(device = %msg.device, error = %e,
                    "Could not record a published desired state; it is published again.");
            }
        }
    }
}

/// The desired-state publisher's client id, the same on every replica that shares the
/// subscription group (the broker lets one connection hold it: a new leader evicts the old):
/// `ember-fleet-desired`, `ember-fleet-desired-<share group>` for another group, or
/// `<client_id>-desired` without a group (one replica).
pub fn publisher_client_id(m: &crate::config::MqttSettings) -> String {
    if m.share_group.is_empty() {
        format!("{}-desired", m.client_id)
    } else if m.share_group == crate::config::DEFAULT_SHARE_GROUP {
        "ember-fleet-desired".to_string()
    } else {
        format!("ember-fleet-desired-{}", m.share_group)
    }
}

/// One retained message on its way.
pub(super) struct OutMsg {
    pub(super) device: String,
    pub(super) payload: Vec<u8>,
    /// (model, revision) of each desired row it carries.
    revisions: Vec<(String, i64)>,
}

#[derive(Default)]
struct Publishing {
    queue: VecDeque<OutMsg>,
    /// Handed to the client, packet id not known yet (the client sends in order).
    sent: VecDeque<OutMsg>,
    in_flight: HashMap<u16, OutMsg>,
}

impl Publishing {
    fn busy(&self) -> HashSet<String> {
        self.queue
            .iter()
            .chain(self.sent.iter())
            .chain(self.in_flight.values())
            .map(|m| m.device.clone())
            .collect()
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.sent.is_empty() && self.in_flight.is_empty()
    }
}

/// Registry entries and shadow policies read during one publisher pass.
#[derive(Default)]
struct Cache {
    entries: HashMap<(String, String), Option<ModelEntry>>,
    shadows: HashMap<String, Option<ShadowPolicy>>,
}

impl Cache {
    async fn entry(
        &mut self,
        db: &Db,
        model: &str,
        version: &str,
    ) -> Result<Option<ModelEntry>, RolloutError> {
        let key = (model.to_string(), version.to_string());
        if let Some(e) = self.entries.get(&key) {
            return Ok(e.clone());
        }
        let e = registry::lookup(db, model, version).await?;
        self.entries.insert(key, e.clone());
        Ok(e)
    }

    async fn shadow(&mut self, db: &Db, id: &str) -> Result<Option<ShadowPolicy>, RolloutError> {
        if let Some(s) = self.shadows.get(id) {
            return Ok(*s);
        }
        let s = store::load(db, id)
            .await?
            .and_then(|s| s.rollout.spec.shadow);
        self.shadows.insert(id.to_string(), s);
        Ok(s)
    }
}
