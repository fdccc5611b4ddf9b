//! **API boundary: ingestion sources.** Where device messages come from, behind one small
//! interface, so that the broker (MQTT, the default), AWS Kinesis Data Streams, Google Pub/Sub
//! or Azure Event Hubs all feed the same [`super::writer`] (classification, batching,
//! idempotent inserts) without a copy of it.
//!
//! A source hands the writer [`SourceMessage`]s through an [`Intake`]:
//! * `device`: the device id from what the transport vouches for (the MQTT topic the broker's
//!   ACL bound to the client, the Kinesis partition key an IoT topic rule took from that topic,
//!   Event Hubs' `iothub-connection-device-id`), never from the payload; the writer still
//!   refuses a payload that names another device;
//! * `channel`: what the message is (telemetry, inference, status, heartbeat);
//! * `payload`: the bytes the agent published (JSON or CBOR);
//! * `ack`: how the message is settled once stored (see [`Settle`]).
//!
//! Guarantees the writer gives every source:
//! * A message's [`Settle::Checkpoint`] is written in the SAME transaction as the message's
//!   rows, and only while the source still holds the partition's lease ([`Leases`]), so a crash
//!   at any point re-reads from the last stored position and the idempotent inserts drop the
//!   repeats: nothing lost, nothing stored twice.
//! * A [`Settle::After`] token is handed to the source's [`Acknowledge`] only after the commit
//!   (the MQTT PUBACK; a Pub/Sub ack id would be the same).
//! * [`Intake::send`] waits while the writer's bounded channel is full: backpressure reaches the
//!   source, which stops reading (Kinesis, Pub/Sub) or stops acknowledging (MQTT).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ember_proto::Channel;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::IngestState;
use super::classify::{Item, Reject, classify};
use super::writer::{AckToken, Inbound};
use crate::db::{Db, Sql, now_us};
use crate::metrics::Metrics;

/// A boxed future, for the object-safe traits below.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A position in a partitioned log (a Kinesis shard's sequence number, an Event Hubs
/// partition's offset), stored with the batch that holds the message at that position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log, e.g. `kinesis:<stream>`.
    pub source: String,
    /// The partition (shard id).
    pub partition: String,
    /// The message's position; the next read starts after it.
    pub position: String,
    /// The replica holding the partition's lease; a checkpoint of a lease lost meanwhile is
    /// not written.
    pub owner: String,
}

/// How a message is settled once its batch is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Nothing to do (MQTT QoS 0).
    Nothing,
    /// Hand this token to the source's [`Acknowledge`] after the commit (MQTT PUBACK).
    After(AckToken),
    /// Store this position in the batch's transaction (Kinesis, Event Hubs).
    Checkpoint(Checkpoint),
}

/// One device message from a source.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub device: String,
    pub channel: Channel,
    pub payload: Vec<u8>,
    /// Fleet clock, microseconds.
    pub received_at: i64,
    pub ack: Settle,
}

/// Acknowledges messages after their batch committed, for sources that settle that way.
pub trait Acknowledge: Send + Sync + 'static {
    fn ack<'a>(&'a self, token: AckToken, metrics: &'a Metrics) -> BoxFuture<'a, ()>;
}

/// For sources with nothing to acknowledge after a commit (their checkpoints are in it).
pub struct NoAcks;

impl Acknowledge for NoAcks {
    fn ack<'a>(&'a self, _: AckToken, _: &'a Metrics) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The writer's side of a source: classification and the bounded channel.
#[derive(Clone)]
pub struct Intake {
    tx: mpsc::Sender<Inbound>,
    max_payload_bytes: usize,
}

/// The writer is gone (shutdown forced): stop reading.
#[derive(Debug)]
pub struct Closed;

impl Intake {
    pub fn new(tx: mpsc::Sender<Inbound>, max_payload_bytes: usize) -> Intake {
        Intake {
            tx,
            max_payload_bytes,
        }
    }

    /// Classifies `m` (size, schema, device match, exactly as for MQTT) and queues it for the
    /// writer, waiting while the channel is full.
    pub async fn send(&self, m: SourceMessage) -> Result<(), Closed> {
        let item = self.classify(&m);
        self.send_classified(m, item).await
    }

    /// Classifies `m` as [`Intake::send`] does, for a source that acts on a refusal before
    /// handing the message over (the Pub/Sub source copies it to its dead-letter topic).
    pub fn classify(&self, m: &SourceMessage) -> Result<Item, Reject> {
        let topic = format!("{}/{}/{}", ember_proto::topic::PREFIX, m.device, m.channel);
        classify(&topic, &m.payload, self.max_payload_bytes)
    }

    /// True once the writer is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Queues `m` with what [`Intake::classify`] made of it.
    pub async fn send_classified(
        &self,
        m: SourceMessage,
        item: Result<Item, Reject>,
    ) -> Result<(), Closed> {
        let (ack, checkpoint) = match m.ack {
            Settle::Nothing => (None, None),
            Settle::After(t) => (Some(t), None),
            Settle::Checkpoint(c) => (None, Some(c)),
        };
        self.tx
            .send(Inbound {
                ack,
                checkpoint,
                received_at: m.received_at,
                item,
            })
            .await
            .map_err(|_| Closed)
    }
}

/// A source of device messages. `run` reads until `shutdown`, hands every message to `intake`,
/// keeps `state` (the health check) current, and returns once it stopped reading; the writer
/// then drains what was handed over. Sources with post-commit acknowledgements return their
/// [`Acknowledge`] from `acknowledger` (called once, before `run`).
pub trait IngestSource: Send + 'static {
    /// For logs and metrics: `mqtt`, `kinesis`, ...
    fn name(&self) -> &'static str;
    fn acknowledger(&self) -> Arc<dyn Acknowledge>;
    fn run(
        self: Box<Self>,
        intake: Intake,
        state: Arc<IngestState>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

/// Writes the batch's checkpoints: per partition the last position in batch order (a source
/// hands over each partition's messages in order), only where `owner` still holds the lease.
pub(super) async fn save_checkpoints(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    batch: &[Inbound],
) -> Result<(), sqlx::Error> {
    let mut last: Vec<&Checkpoint> = Vec::new();
    for c in batch.iter().filter_map(|m| m.checkpoint.as_ref()) {
        match last
            .iter_mut()
            .find(|l| l.source == c.source && l.partition == c.partition)
        {
            Some(l) => *l = c,
            None => last.push(c),
        }
    }
    // Sorted, so that concurrent writers lock lease rows in one order.
    last.sort_by(|a, b| (&a.source, &a.partition).cmp(&(&b.source, &b.partition)));
    for c in last {
        let mut q = Sql::new("UPDATE ingest_leases SET position = ");
        q.bind(c.position.as_str());
        q.push(", updated_at = ").bind(now_us());
        q.push(" WHERE source = ").bind(c.source.as_str());
        q.push(" AND partition_id = ").bind(c.partition.as_str());
        q.push(" AND owner = ").bind(c.owner.as_str());
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Partition leases shared by the replicas, in the database (`ingest_leases`): a partition is
/// read by the replica holding its unexpired lease; a replica that stops renewing loses it to
/// another after `ttl_us`.
#[derive(Clone)]
pub struct Leases {
    pub db: Db,
    pub source: String,
    pub owner: String,
    pub ttl_us: i64,
}

impl Leases {
    /// Takes (or renews) the lease of `partition` if it is free, expired or already ours;
    /// returns `Some(position)` (the stored checkpoint, if any) when we hold it.
    pub async fn acquire(&self, partition: &str) -> Result<Option<Option<String>>, sqlx::Error> {
        let now = now_us();
        let mut q = Sql::new(
            "INSERT INTO ingest_leases (source, partition_id, owner, expires_at, position, updated_at) VALUES (",
        );
        q.bind(self.source.as_str()).push(", ");
        q.bind(partition).push(", ");
        q.bind(self.owner.as_str()).push(", ");
        q.bind(now + self.ttl_us).push(", NULL, ");
        let now_p = q.param(now);
        q.push(&now_p);
        q.push(
            ") ON CONFLICT (source, partition_id) DO UPDATE SET owner = excluded.owner, \
             expires_at = excluded.expires_at, updated_at = excluded.updated_at \
             WHERE ingest_leases.owner = excluded.owner OR ingest_leases.expires_at < ",
        );
        q.push(&now_p);
        q.push(" RETURNING position");
        let row = q.query().fetch_optional(self.db.pool()).await?;
        row.map(|r| r.try_get::<Option<String>, _>("position"))
            .transpose()
    }

    /// Extends our lease; false when it is no longer ours.
    pub async fn renew(&self, partition: &str) -> Result<bool, sqlx::Error> {
        let now = now_us();
        let mut q = Sql::new("UPDATE ingest_leases SET expires_at = ");
        q.bind(now + self.ttl_us);
        q.push(", updated_at = ").bind(now);
        q.push(" WHERE source = ").bind(self.source.as_str());
        q.push(" AND partition_id = ").bind(partition);
        q.push(" AND owner = ").bind(self.owner.as_str());
        Ok(q.query().execute(self.db.pool()).await?.rows_affected() == 1)
    }

    /// Gives our lease up at once (the position stays), so another replica can take over.
    pub async fn release(&self, partition: &str) -> Result<(), sqlx::Error> {
        let mut q = Sql::new("UPDATE ingest_leases SET expires_at = 0 WHERE source = ");
        q.bind(self.source.as_str());
        q.push(" AND partition_id = ").bind(partition);
        q.push(" AND owner = ").bind(self.owner.as_str());
        q.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// Gives up every lease of ours (after the writer drained, at shutdown).
    pub async fn release_all(&self) -> Result<(), sqlx::Error> {
        let mut q = Sql::new("UPDATE ingest_leases SET expires_at = 0 WHERE source = ");
        q.bind(self.source.as_str());
        q.push(" AND owner = ").bind(self.owner.as_str());
        q.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// The stored position of every partition (for tests and the status page).
    pub async fn positions(&self) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
        let mut q = Sql::new("SELECT partition_id, position FROM ingest_leases WHERE source = ");
        q.bind(self.source.as_str());
        q.push(" ORDER BY partition_id");
        let rows = q.query().fetch_all(self.db.pool()).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("partition_id")?, r.try_get("position")?)))
            .collect()
    }
}
