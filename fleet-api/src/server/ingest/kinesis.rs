//! The Kinesis source: reads the stream that terraform/aws's IoT topic rules fill, as an
//! [`IngestSource`].
//!
//! ```text
//! IoT Core ─rule─▶ Kinesis stream ──▶ shard reader (one task per leased shard)
//!   partition key = topic(3)            GetShardIterator (AFTER_SEQUENCE_NUMBER checkpoint)
//!   data = {"device","channel",         GetRecords ─▶ Intake ─▶ writer (1 tx: rows + checkpoint)
//!           "payload": base64}
//! ```
//!
//! Record format (written by the topic rule, never by a device): JSON with `device`
//! (`topic(3)`), `channel` (`topic(4)`, or `presence` for lifecycle events), `payload` (the MQTT
//! payload, base64) and `received_ms`.
//!
//! Guarantees:
//! * The device id is the record's partition key, which the rule took from the topic (or the
//!   client id) that IoT Core's policy ties to the certificate's thing: never from the payload
//!   (a payload naming another device is refused by classification, as for MQTT).
//! * Shards are leased in `ingest_leases` (see [`Leases`]): each replica takes at most its fair
//!   share (shards / live replicas, rounded up), renews every third of `lease_s`, and a shard
//!   whose lease expired (a replica killed) is taken over by another replica, which resumes
//!   after the shard's stored checkpoint.
//! * A record's sequence number is stored in the transaction that stores the record
//!   ([`super::source::save_checkpoints`]), so after a crash the stream is re-read from the last
//!   committed record: nothing lost, and the repeats are dropped by the idempotent inserts.
//! * Presence (`$aws/events/presence/disconnected/<thing>`) becomes the device's Last Will
//!   (an offline status with `ts = 0`); `connected` events are counted only (the agent
//!   publishes its own online status on connect).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ember_proto::{Channel, Encoding, Status};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::IngestState;
use super::source::{
    Acknowledge, BoxFuture, Checkpoint, IngestSource, Intake, Leases, NoAcks, Settle, SourceMessage,
};
use crate::cloud::aws::{AwsClient, AwsError};
use crate::config::{Backend, KinesisSettings};
use crate::db::{Db, now_us};
use crate::metrics::Metrics;

const SERVICE: &str = "kinesis";
/// Records per GetRecords call (Kinesis allows up to 10,000 or 10 MB).
const GET_LIMIT: u32 = 1000;
/// Pause between GetRecords calls that returned records: Kinesis allows 5 calls per second
/// per shard, shared by every consumer of the stream.
const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Reads a Kinesis stream, shards leased among the replicas.
pub struct KinesisSource {
    pub settings: KinesisSettings,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// This replica's stable identity (its `mqtt.client_id`): the leases' owner.
    pub owner: String,
}

impl KinesisSource {
    /// The lease table's name for this stream.
    pub fn source_name(stream: &str) -> String {
        format!("kinesis:{stream}")
    }
}

impl IngestSource for KinesisSource {
    fn name(&self) -> &'static str {
        "kinesis"
    }

    fn acknowledger(&self) -> Arc<dyn Acknowledge> {
        Arc::new(NoAcks)
    }

    fn run(
        self: Box<Self>,
        intake: Intake,
        state: Arc<IngestState>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.read(intake, state, shutdown).await })
    }
}

struct Reader {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl KinesisSource {
    async fn read(self, intake: Intake, state: Arc<IngestState>, shutdown: CancellationToken) {
        let allow_http = self.settings.endpoint.starts_with("http://");
        let client = match AwsClient::from_env(&self.settings.region, allow_http) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "Cannot set up the Kinesis client; ingestion does not start.");
                return;
            }
        };
        let k = Arc::new(Shared {
            client,
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
        });
        let leases = Leases {
            db: self.db.clone(),
            source: KinesisSource::source_name(&self.settings.stream),
            owner: self.owner.clone(),
            ttl_us: i64::try_from(self.settings.lease_s).unwrap_or(30) * 1_000_000,
        };
        let tick = Duration::from_millis(self.settings.lease_s * 1000 / 3);
        let mut readers: HashMap<String, Reader> = HashMap::new();
        let mut backoff = BACKOFF_MIN;
        tracing::info!(stream = %self.settings.stream, endpoint = %self.settings.endpoint,
            owner = %self.owner, "Reading the Kinesis stream.");
        loop {
            // Readers that ended by themselves (a closed shard after resharding, a lost lease).
            readers.retain(|_, r| !r.task.is_finished());
            let wait = match self.rebalance(&k, &leases, &intake, &mut readers).await {
                Ok(()) => {
                    state.connected.store(true, Ordering::Release);
                    state.subscribed.store(true, Ordering::Release);
                    backoff = BACKOFF_MIN;
                    tick
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "Could not balance the Kinesis shards; trying again.");
                    state.subscribed.store(false, Ordering::Release);
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
            };
            self.metrics
                .set("kinesis_shards_leased", &[], readers.len() as f64);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Stop reading; what was handed over is drained by the writer, which stores the
        // checkpoints while the leases (not renewed any more) are still ours.
        for r in readers.values() {
            r.stop.cancel();
        }
        for (_, r) in readers.drain() {
            let _ = r.task.await;
        }
        state.subscribed.store(false, Ordering::Release);
        self.metrics.set("kinesis_shards_leased", &[], 0.0);
    }

    /// One round: renew what we hold, give up what we no longer hold or hold beyond our
    /// share, take free or expired shards up to our share.
    async fn rebalance(
        &self,
        k: &Arc<Shared>,
        leases: &Leases,
        intake: &Intake,
        readers: &mut HashMap<String, Reader>,
    ) -> Result<(), String> {
        let shards = k.list_shards().await.map_err(|e| e.to_string())?;
        let others = match self.db.backend() {
            Backend::Postgres => crate::server::cluster::others_alive(&self.db)
                .await
                .map_err(|e| e.to_string())?,
            Backend::Sqlite => 0,
        };
        let replicas = usize::try_from(others).unwrap_or(0) + 1;
        let share = shards.len().div_ceil(replicas).max(1);

        let held: Vec<String> = readers.keys().cloned().collect();
        for shard in held {
            let keep = leases.renew(&shard).await.map_err(|e| e.to_string())?;
            if !keep || !shards.contains(&shard) {
                tracing::info!(%shard, "Lost the lease of a Kinesis shard; stopping its reader.");
                if let Some(r) = readers.remove(&shard) {
                    r.stop.cancel();
                    let _ = r.task.await;
                }
            }
        }
        if readers.len() > share {
            // Hand one shard over per round, so that a replica joining gets its share.
            if let Some(shard) = readers.keys().next().cloned()
                && let Some(r) = readers.remove(&shard)
            {
                r.stop.cancel();
                let _ = r.task.await;
                leases.release(&shard).await.map_err(|e| e.to_string())?;
                tracing::info!(%shard, share, "Released a Kinesis shard to another replica.");
            }
        }
        for shard in &shards {
            if readers.len() >= share {
                break;
            }
            if readers.contains_key(shard) {
                continue;
            }
            if let Some(position) = leases.acquire(shard).await.map_err(|e| e.to_string())? {
                tracing::info!(%shard, position = position.as_deref().unwrap_or("(start)"),
                    "Took the lease of a Kinesis shard.");
                let stop = CancellationToken::new();
                let task = tokio::spawn(read_shard(
                    k.clone(),
                    intake.clone(),
                    leases.source.clone(),
                    leases.owner.clone(),
                    shard.clone(),
                    position,
                    stop.clone(),
                ));
                readers.insert(shard.clone(), Reader { stop, task });
            }
        }
        Ok(())
    }
}

struct Shared {
    client: AwsClient,
    settings: KinesisSettings,
    metrics: Arc<Metrics>,
}

impl Shared {
    async fn call(&self, action: &str, body: Value) -> Result<Value, AwsError> {
        let r = self
            .client
            .json_call(
                SERVICE,
                &self.settings.endpoint,
                &format!("Kinesis_20131202.{action}"),
                &body,
            )
            .await;
        if let Err(AwsError::Api { kind, .. }) = &r {
            self.metrics
                .inc("kinesis_errors_total", &[("kind", kind.as_str())], 1);
        }
        r
    }

    /// Every shard of the stream, open or closed (a closed one may still hold unread records).
    async fn list_shards(&self) -> Result<Vec<String>, AwsError> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let body = match &next {
                Some(t) => json!({ "NextToken": t }),
                None => json!({ "StreamName": self.settings.stream }),
            };
            let v = self.call("ListShards", body).await?;
            for s in v["Shards"].as_array().into_iter().flatten() {
                if let Some(id) = s["ShardId"].as_str() {
                    shards.push(id.to_string());
                }
            }
            match v["NextToken"].as_str() {
                Some(t) => next = Some(t.to_string()),
                None => break,
            }
        }
        shards.sort();
        Ok(shards)
    }

    async fn iterator(&self, shard: &str, after: Option<&str>) -> Result<String, AwsError> {
        let body = match after {
            Some(seq) => json!({
                "StreamName": self.settings.stream, "ShardId": shard,
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": seq
            }),
            None => json!({
                "StreamName": self.settings.stream, "ShardId": shard,
                "ShardIteratorType": "TRIM_HORIZON"
            }),
        };
        let v = self.call("GetShardIterator", body).await?;
        v["ShardIterator"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AwsError::Transport {
                service: SERVICE,
                detail: "GetShardIterator answered without ShardIterator".into(),
            })
    }
}

/// Reads one shard from after `position` until `stop`, the shard's end, or the writer closing.
async fn read_shard(
    k: Arc<Shared>,
    intake: Intake,
    source: String,
    owner: String,
    shard: String,
    position: Option<String>,
    stop: CancellationToken,
) {
    let mut last = position;
    let mut iterator: Option<String> = None;
    let mut backoff = BACKOFF_MIN;
    let poll = Duration::from_millis(k.settings.poll_ms);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let it = match &iterator {
            Some(it) => it.clone(),
            None => match k.iterator(&shard, last.as_deref()).await {
                Ok(it) => it,
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "Could not get a Kinesis shard iterator; retrying.");
                    if pause(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let v = match k
            .call(
                "GetRecords",
                json!({ "ShardIterator": it, "Limit": GET_LIMIT }),
            )
            .await
        {
            Ok(v) => v,
            Err(e) => {
                let expired =
                    matches!(&e, AwsError::Api { kind, .. } if kind == "ExpiredIteratorException");
                if expired {
                    iterator = None;
                    continue;
                }
                if !e.is_retryable() {
                    tracing::warn!(%shard, error = %e, "Kinesis refused GetRecords; retrying.");
                }
                if pause(&stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let records = v["Records"].as_array().cloned().unwrap_or_default();
        for r in &records {
            let Some(seq) = r["SequenceNumber"].as_str() else {
                continue;
            };
            let checkpoint = Checkpoint {
                source: source.clone(),
                partition: shard.clone(),
                position: seq.to_string(),
                owner: owner.clone(),
            };
            let device = r["PartitionKey"].as_str().unwrap_or_default().to_string();
            let data = r["Data"].as_str().unwrap_or_default();
            match envelope(&device, data) {
                Envelope::Message { channel, payload } => {
                    k.metrics
                        .inc("kinesis_records_total", &[("outcome", "message")], 1);
                    let m = SourceMessage {
                        device,
                        channel,
                        payload,
                        received_at: now_us(),
                        ack: Settle::Checkpoint(checkpoint),
                    };
                    if intake.send(m).await.is_err() {
                        return;
                    }
                }
                Envelope::Presence { connected } => {
                    k.metrics
                        .inc("kinesis_records_total", &[("outcome", "presence")], 1);
                    if !connected {
                        // The device's Last Will, as the broker would have published it.
                        let will = Status::offline(&device);
                        let payload =
                            ember_proto::message::encode(&will, Encoding::Json).unwrap_or_default();
                        let m = SourceMessage {
                            device,
                            channel: Channel::Status,
                            payload,
                            received_at: now_us(),
                            ack: Settle::Checkpoint(checkpoint),
                        };
                        if intake.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Envelope::Malformed(detail) => {
                    k.metrics
                        .inc("kinesis_records_total", &[("outcome", "malformed")], 1);
                    tracing::warn!(%shard, seq, %device, %detail,
                        "A Kinesis record is not a topic rule's envelope; storing it as a reject.");
                    // Stored as a reject (undecodable telemetry) so that the position moves on.
                    let m = SourceMessage {
                        device,
                        channel: Channel::Telemetry,
                        payload: detail.into_bytes(),
                        received_at: now_us(),
                        ack: Settle::Checkpoint(checkpoint),
                    };
                    if intake.send(m).await.is_err() {
                        return;
                    }
                }
            }
            last = Some(seq.to_string());
        }
        if let Some(ms) = v["MillisBehindLatest"].as_f64() {
            k.metrics.set(
                "kinesis_millis_behind_latest",
                &[("shard", shard.as_str())],
                ms,
            );
        }
        match v["NextShardIterator"].as_str() {
            Some(next) => iterator = Some(next.to_string()),
            None => {
                tracing::info!(%shard, "The Kinesis shard is closed and fully read.");
                return;
            }
        }
        let wait = if records.is_empty() {
            poll
        } else {
            MIN_CALL_INTERVAL
        };
        if pause(&stop, wait).await {
            return;
        }
    }
}

/// Waits `d`; true when `stop` fired first.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

enum Envelope {
    Message { channel: Channel, payload: Vec<u8> },
    Presence { connected: bool },
    Malformed(String),
}

/// Decodes the topic rule's JSON envelope (`data`: the record's base64 Data).
fn envelope(device: &str, data: &str) -> Envelope {
    let bad = |d: &str| Envelope::Malformed(d.to_string());
    let Ok(bytes) = B64.decode(data) else {
        return bad("the record's data is not base64");
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return bad("the record is not JSON");
    };
    if v["device"].as_str() != Some(device) {
        return bad("the envelope's device differs from the partition key");
    }
    let Some(channel) = v["channel"].as_str() else {
        return bad("the envelope has no channel");
    };
    let Some(payload) = v["payload"].as_str().and_then(|p| B64.decode(p).ok()) else {
        return bad("the envelope's payload is missing or not base64");
    };
    if channel == "presence" {
        let event: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        return match event["eventType"].as_str() {
            Some("connected") => Envelope::Presence { connected: true },
            Some("disconnected") => Envelope::Presence { connected: false },
            _ => bad("a presence event without eventType"),
        };
    }
    match Channel::from_str(channel) {
        Ok(channel) => Envelope::Message { channel, payload },
        Err(()) => bad("the envelope's channel is not an Ember channel"),
    }
}

/// Drives a source into a writer until `shutdown`, then drains (used for every source but
/// MQTT, whose reader also carries the PUBACKs on its connection: `super::run`).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    settings: Arc<crate::config::Settings>,
    k: KinesisSettings,
    db: Db,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    events: Arc<crate::server::events::Events>,
    rollouts: Arc<crate::ota::rollout::service::Service>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let source = Box::new(KinesisSource {
        settings: k.clone(),
        db: db.clone(),
        metrics: metrics.clone(),
        owner: settings.mqtt.client_id.clone(),
    });
    let leases = Leases {
        db: db.clone(),
        source: KinesisSource::source_name(&k.stream),
        owner: settings.mqtt.client_id.clone(),
        ttl_us: 0,
    };
    super::drive(
        source, settings, db, metrics, state, events, rollouts, shutdown, force,
    )
    .await;
    // Everything handed over is stored: let another replica take the shards at once.
    if let Err(e) = leases.release_all().await {
        tracing::warn!(error = %e, "Could not release the Kinesis shard leases; they expire by themselves.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(v: Value) -> String {
        B64.encode(serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn envelopes_are_decoded_and_checked_against_the_partition_key() {
        let ok = wrap(json!({"device": "d1", "channel": "telemetry", "payload": B64.encode(b"x")}));
        assert!(matches!(envelope("d1", &ok),
            Envelope::Message { channel: Channel::Telemetry, ref payload } if payload == b"x"));
        assert!(matches!(envelope("d2", &ok), Envelope::Malformed(_)));
        let presence = wrap(json!({"device": "d1", "channel": "presence",
            "payload": B64.encode(br#"{"eventType":"disconnected","clientId":"d1"}"#)}));
        assert!(matches!(
            envelope("d1", &presence),
            Envelope::Presence { connected: false }
        ));
        let odd = wrap(json!({"device": "d1", "channel": "desired", "payload": ""}));
        assert!(matches!(envelope("d1", &odd), Envelope::Malformed(_)));
        assert!(matches!(envelope("d1", "%%%"), Envelope::Malformed(_)));
    }
}
