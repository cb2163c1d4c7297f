//! librdkafka client setup shared by every Kafka user: the source (`ingest::kafka`), the rated
//! record emitter (`emit::kafka`), the changelog and the cluster's members topic. Owns the
//! settings tallyd's guarantees depend on (idempotent producers, manual offsets), the
//! operator's pass-through properties, topic creation, the producers' delivery counter and the
//! names under which partition offsets are checkpointed.
//!
//! Must not: know what flows through the clients (events, records, chunks): that is the callers'.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientContext, Message};

use crate::config::KafkaConfig;

/// Checkpoint position names of Kafka partitions start with this.
pub const POSITION_PREFIX: &str = "kafka/";

/// `kafka/<topic>/<partition>`: where a partition's next offset is checkpointed.
pub fn position_name(topic: &str, partition: i32) -> String {
    format!("{POSITION_PREFIX}{topic}/{partition}")
}

/// `kafka/<topic>/<partition>` → (topic, partition).
pub fn parse_position_name(name: &str) -> Option<(&str, i32)> {
    let rest = name.strip_prefix(POSITION_PREFIX)?;
    let (topic, partition) = rest.rsplit_once('/')?;
    Some((topic, partition.parse().ok()?))
}

/// Why a Kafka client or topic could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error("kafka topic `{0}` does not exist; create it (keyed by tenant) first")]
    TopicMissing(String),
    #[error("changelog topic `{topic}` has {partitions} partitions; it needs at least {needed} (one per input partition)")]
    TooFewPartitions {
        topic: String,
        partitions: i32,
        needed: i32,
    },
    #[error("cannot create kafka topic `{topic}`: {error}")]
    CreateTopic { topic: String, error: RDKafkaErrorCode },
    #[error("kafka setup task failed: {0}")]
    Task(String),
    #[error("cannot start a kafka thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("{0} is already installed")]
    AlreadyInstalled(&'static str),
}

/// Settings every client shares: the brokers, statistics for the lag gauges, log level.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("statistics.interval.ms", "5000")
        .set_log_level(RDKafkaLogLevel::Warning);
    client
}

/// The consumer's librdkafka settings: tallyd's own, then the operator's pass-through.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", &config.group_id)
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "100000");
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    // Exactly-once needs these whatever the pass-through says (validation refuses them there).
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    client
}

/// A producer's settings (dead letters, changelog, forwarding): idempotent, acks from all
/// in-sync replicas, then the operator's pass-through.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client.set("linger.ms", "5");
    pass_through_producer(&mut client, &config.properties);
    client
}

/// Adds the operator's properties that apply to producers, then the settings the delivery
/// contract depends on, whatever the pass-through says.
pub fn pass_through_producer(client: &mut ClientConfig, properties: &[(String, String)]) {
    for (key, value) in properties {
        // Consumer-only settings would only produce librdkafka warnings here.
        if !is_consumer_only(key) {
            client.set(key, value);
        }
    }
    client.set("enable.idempotence", "true").set("acks", "all");
}

fn is_consumer_only(key: &str) -> bool {
    key.starts_with("fetch.")
        || key.starts_with("queued.")
        || matches!(
            key,
            "auto.offset.reset"
                | "isolation.level"
                | "session.timeout.ms"
                | "heartbeat.interval.ms"
                | "max.poll.interval.ms"
                | "partition.assignment.strategy"
                | "group.instance.id"
                | "group.protocol"
                | "check.crcs"
                | "auto.commit.interval.ms"
        )
}

/// librdkafka's log lines, through tracing.
pub fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// Counts failed deliveries of a producer (dead letters, changelog, rated records): a caller
/// compares the count before and after a flush to know whether everything it sent arrived.
pub struct DeliveryContext {
    pub failures: AtomicU64,
    /// What the producer carries, for the log.
    pub what: &'static str,
    /// `recording`: the (partition, offset) of each delivered record, until taken.
    delivered: Option<parking_lot::Mutex<Vec<(i32, i64)>>>,
}

impl DeliveryContext {
    pub fn new(what: &'static str) -> DeliveryContext {
        DeliveryContext {
            failures: AtomicU64::new(0),
            what,
            delivered: None,
        }
    }

    /// A context that keeps where each record landed (`take_delivered`).
    pub fn recording(what: &'static str) -> DeliveryContext {
        DeliveryContext {
            delivered: Some(parking_lot::Mutex::new(Vec::new())),
            ..DeliveryContext::new(what)
        }
    }

    /// The (partition, offset) of every record delivered since the last call (recording only).
    pub fn take_delivered(&self) -> Vec<(i32, i64)> {
        self.delivered
            .as_ref()
            .map(|delivered| std::mem::take(&mut *delivered.lock()))
            .unwrap_or_default()
    }
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) => {
                if let Some(delivered) = &self.delivered {
                    delivered.lock().push((message.partition(), message.offset()));
                }
            }
            Err((error, _)) => {
                tracing::error!(%error, output = self.what, "record not delivered; retrying");
                self.failures.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// Partition counts of every topic the brokers know (blocking).
pub fn topic_partitions(
    config: &KafkaConfig,
    timeout: Duration,
) -> Result<Vec<(String, i32)>, KafkaSetupError> {
    let probe: BaseConsumer = client_config(config).create()?;
    let metadata = probe.fetch_metadata(None, timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| (topic.name().to_string(), topic.partitions().len() as i32))
        .collect())
}

/// Creates `wanted` topics, tolerating ones that already exist, within a bounded wait.
pub async fn create_topics(config: &KafkaConfig, wanted: &[NewTopic<'_>]) -> Result<(), KafkaSetupError> {
    if wanted.is_empty() {
        return Ok(());
    }
    let mut admin_config: ClientConfig = client_config(config);
    let admin: AdminClient<DefaultClientContext> = admin_config.set("client.id", "tallyd-admin").create()?;
    let names: Vec<&str> = wanted.iter().map(|topic| topic.name).collect();
    let request = admin.create_topics(
        wanted,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    );
    let results = match tokio::time::timeout(Duration::from_secs(15), request).await {
        Ok(results) => results?,
        Err(_) => {
            // Some brokers (librdkafka's mock cluster) never answer CreateTopics. Go on: a
            // missing topic shows up as failing, retried publishes.
            tracing::warn!(topics = ?names, "no answer to CreateTopics; create these topics yourself");
            return Ok(());
        }
    };
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, "created kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, error)) => return Err(KafkaSetupError::CreateTopic { topic, error }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_names_round_trip() {
        let name = position_name("usage.v2", 17);
        assert_eq!(name, "kafka/usage.v2/17");
        assert_eq!(parse_position_name(&name), Some(("usage.v2", 17)));
        assert_eq!(parse_position_name("ingest-log"), None);
        assert_eq!(parse_position_name("kafka/usage/x"), None);
    }

    #[test]
    fn exactly_once_settings_cannot_be_overridden() {
        let config = KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["usage".into()],
            group_id: "g".into(),
            dlq_topic: "usage.dlq".into(),
            id_header: "ce_id".into(),
            create_time_tolerance_ms: 3_600_000,
            max_batch_messages: 10,
            max_pending_series: 10,
            fold_threads: 2,
            changelog_topic: None,
            changelog_compact_bytes: 0,
            changelog_compact_interval_secs: 60,
            properties: vec![
                ("fetch.min.bytes".into(), "1".into()),
                ("auto.offset.reset".into(), "latest".into()),
            ],
        };
        let consumer = consumer_config(&config);
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("auto.offset.reset"), Some("latest"));
        assert_eq!(consumer.get("fetch.min.bytes"), Some("1"));
        let producer = producer_config(&config);
        assert_eq!(producer.get("fetch.min.bytes"), None);
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn producers_keep_idempotence_whatever_the_pass_through_says() {
        let properties: Vec<(String, String)> = [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("fetch.wait.max.ms", "5"),
            ("compression.type", "lz4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut client = ClientConfig::new();
        pass_through_producer(&mut client, &properties);
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("compression.type"), Some("lz4"));
        assert_eq!(
            client.get("fetch.wait.max.ms"),
            None,
            "consumer-only settings are not passed to producers"
        );
    }
}
