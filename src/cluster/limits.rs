//! Cluster mode, the limits leg: every replica follows the signal topic (`[limits]
//! signal_topic`, compacted, written by each partition owner's `emit::signals`) from its start,
//! so each edge knows which tenants' hard quotas their owners found exhausted and refuses
//! those tenants' events before forwarding them (`state::limits::Replicated`). The owners
//! still decide every event exactly; the edge only answers sooner and spares the topic.
//! Records are signed like the members topic's (`tallyd-signature`, HMAC-SHA256 of key and
//! value with `cluster.secret`); others are ignored and counted
//! (`tallyd_cluster_unsigned_records_total`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::consumer_config;
use crate::state::Shared;

/// Follows the signal topic on a thread of its own until `shutdown`.
pub fn spawn(
    kafka: &KafkaConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut config = consumer_config(kafka);
    // Assigned every partition, read from the start, never committed: a reader, not a member
    // of the ingest group.
    config
        .set("group.id", format!("{}.signals-reader", kafka.group_id))
        .set("isolation.level", "read_uncommitted");
    let topic = shared.config.limits.signal_topic.clone();
    let secret = shared
        .config
        .cluster
        .as_ref()
        .map(|cluster| cluster.secret.clone().into_bytes())
        .unwrap_or_default();
    std::thread::Builder::new()
        .name("tallyd-signals-in".into())
        .spawn(move || {
            let consumer: BaseConsumer = match config.create() {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::error!(%error, "no signal topic reader; edges forward without admitting");
                    return;
                }
            };
            // The topic may not exist yet (the first owner creates it): look until it does.
            while !shutdown.is_cancelled() {
                match assign_all(&consumer, &topic) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(error) => tracing::debug!(%error, topic, "signal topic not readable yet"),
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            tracing::info!(topic, "following limit states");
            while !shutdown.is_cancelled() {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(message)) => {
                        let Some(value) = message.payload() else { continue };
                        if !signed(&message, &secret) {
                            metrics::counter!(crate::telemetry::CLUSTER_UNSIGNED_RECORDS).increment(1);
                            tracing::warn!(
                                offset = message.offset(),
                                "signal-topic record without this cluster's signature ignored \
                                 (another cluster, an older tallyd, or a forgery)"
                            );
                            continue;
                        }
                        if let Err(error) = shared.limits.replicated.apply(value) {
                            tracing::warn!(%error, offset = message.offset(), "unreadable limit state skipped");
                        }
                    }
                    Some(Err(error)) => tracing::warn!(%error, topic, "signal topic read failed"),
                    None => {}
                }
            }
        })
}

/// Whether a signal-topic record carries this cluster's signature over its key and value (a
/// writer to the topic without the secret could otherwise refuse any tenant at every edge).
fn signed(message: &rdkafka::message::BorrowedMessage<'_>, secret: &[u8]) -> bool {
    use rdkafka::message::Headers;
    let signature = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|header| header.key == crate::cluster::forward::SIGNATURE_HEADER)
            .and_then(|header| header.value)
    });
    let key = message
        .key()
        .and_then(|key| std::str::from_utf8(key).ok())
        .unwrap_or_default();
    crate::cluster::members::verify(secret, key, message.payload().unwrap_or_default(), signature)
}

/// Assigns every partition of `topic` from its start; false while the topic has none.
fn assign_all(consumer: &BaseConsumer, topic: &str) -> Result<bool, rdkafka::error::KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let Some(partitions) = metadata
        .topics()
        .iter()
        .find(|found| found.name() == topic && found.error().is_none())
        .map(|found| found.partitions().len())
        .filter(|count| *count > 0)
    else {
        return Ok(false);
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(true)
}
