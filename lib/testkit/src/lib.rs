//! System-test harness for Ember: real processes, real sockets, conditions instead of sleeps.
//!
//! * [`TestBroker`]: a private `mosquitto` on an ephemeral 127.0.0.1 port, stoppable and
//!   restartable on the same port.
//! * [`Subscriber`]: an MQTT client (rumqttc, its own thread) that decodes everything the
//!   agent publishes and keeps a per-`(device, stream)` ledger of the sequence numbers it saw.
//! * [`tls`]: a throwaway PKI per test ([`tls::TestPki`]), a mutual-TLS Mosquitto with the
//!   Ember per-device ACL ([`TestBroker::start_tls`]) and TLS test clients.
//! * [`TestS3`]: a private S3-compatible server (`moto`) on an ephemeral 127.0.0.1 port.
//! * [`TestRabbitMq`]: a private RabbitMQ with its AMQP 1.0 plugin on an ephemeral 127.0.0.1
//!   port (the Event Hubs source's transport test).
//! * [`TestPubSub`]: a private Google Pub/Sub emulator on an ephemeral 127.0.0.1 port.
//! * [`docs`]: sections of the Markdown docs generated from the code (metric tables), checked
//!   by a test that prints the fix.
//! * [`bundles`]: signed variants of the committed model bundles (development key).
//! * [`TestAgent`]: the `ember-agent` binary as a child process, with a generated config, its
//!   own data dir, metrics endpoint and captured stderr.
//! * [`iot_core`]: a stand-in for AWS IoT Core's front door (TLS, SNI, ALPN, client id = the
//!   certificate's thing, payload and QoS limits, publish timing) relaying to a Mosquitto with
//!   IoT Core's limits ([`TestBroker::start_with_conf`]).
//! * [`iot_hub`]: a stand-in for Azure IoT Hub's MQTT front door (SAS, fixed topics, no
//!   retain) and a device-twin responder on the documented `$iothub/twin/…` topics.
//! * [`process`]: killing a child's whole process group (safely: see [`process::kill_group`]).
//! * [`node`]: the sensor-node firmware in `qemu-system-arm` ([`node::QemuNode`]) or on a real
//!   board (`EMBER_HIL_SERIAL`: [`node::BoardNode`]), chosen by [`node::HilNode::start`], and a
//!   TCP line to the agent that decodes the ground truth and flips bits ([`node::LineProxy`]).
//!
//! Rules the harness follows, and tests built on it should too:
//! * Every service gets its own free port (bind `127.0.0.1:0`, read the port, pass it on); no
//!   fixed ports, nothing but 127.0.0.1.
//! * Nothing waits a fixed time for something to happen: waits poll a condition until a
//!   timeout ([`Subscriber::wait_for`], [`TestAgent::wait_metric`], [`wait_until`]) and say
//!   what they waited for when they fail.
//! * A missing tool fails loudly (`mosquitto` not installed panics with the command that
//!   installs it); nothing is skipped.
//!
//! **Broker restarts and clean sessions.** The subscriber uses a clean session, so whatever
//! the broker accepts between its restart and the subscriber's new SUBSCRIBE reaches nobody,
//! although the broker acknowledged it to the agent (which then, correctly, deletes it). That
//! is a hole in the test setup, not in the agent, so tests restart the broker with
//! [`restart_broker`], which holds the agent (SIGSTOP) until the subscriber is subscribed again.

mod agent;
mod broker;
pub mod bundles;
pub mod docs;
pub mod iot_core;
pub mod iot_hub;
pub mod node;
mod postgres;
pub mod process;
mod pubsub;
mod rabbitmq;
mod s3;
mod subscriber;
pub mod tls;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub use agent::{Metrics, TestAgent, TestAgentBuilder, parse_prometheus, tail};
pub use broker::TestBroker;
pub use postgres::{PG_BIN_DIR, TestPostgres};
pub use pubsub::{PUBSUB_PROJECT, Pulled, TestPubSub};
pub use rabbitmq::{RABBITMQ_PASSWORD, RABBITMQ_USER, TestRabbitMq};
pub use s3::{S3Answer, TestS3};
pub use subscriber::{InferenceLog, RecordSeen, StreamLog, Subscriber, SubscriberView};

/// The subscription filter for everything agents publish (`ember/v1/<device>/<channel>`).
pub const ALL_TOPICS: &str = "ember/v1/#";

/// How often polling waits look again. Short enough not to slow tests down, long enough not
/// to steal the CPU from the processes under test.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it for a listener that is
/// closed again before this returns).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0 to find a free port");
    l.local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// `127.0.0.1:port`.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `cond` every [`POLL_INTERVAL`] until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Restarts a stopped broker on its port without losing messages to the clean-session
/// subscriber: the agent is paused (SIGSTOP) until the subscriber has subscribed again, so
/// nothing the agent publishes can reach the new broker before there is someone to deliver it
/// to. Panics if the subscriber does not come back within `timeout`.
pub fn restart_broker(
    broker: &mut TestBroker,
    sub: &Subscriber,
    agent: &TestAgent,
    timeout: Duration,
) {
    let running = agent.is_running();
    if running {
        agent.pause();
    }
    let before = sub.subscriptions();
    broker.restart();
    let back = sub.wait_for(|v| v.subscriptions > before, timeout);
    if running {
        agent.resume();
    }
    assert!(
        back,
        "the subscriber did not resubscribe within {timeout:?} after the broker restarted"
    );
}
