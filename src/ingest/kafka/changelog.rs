//! The Kafka side of the changelog (format and restore semantics: `store::changelog`): the
//! producer checkpoints publish through, the reader a new owner restores from, and topic
//! provisioning at startup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{client_config, parse_position_name, producer_config, DeliveryContext};
use crate::config::KafkaConfig;
use crate::pipeline::ChangelogSink;
use crate::store::changelog::{complete_flushes, ChangelogChunk};
use crate::store::{MeterCatalog, RocksStore};
use crate::telemetry;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes checkpoint flushes; partition = the input partition the flush belongs to.
pub struct ChangelogProducer {
    topic: String,
    producer: BaseProducer<DeliveryContext>,
}

impl ChangelogProducer {
    pub fn new(config: &KafkaConfig, topic: String) -> anyhow::Result<ChangelogProducer> {
        let producer = producer_config(config)
            // Flushes can approach the chunk limit; allow them whatever the defaults.
            .set("message.max.bytes", "2000000")
            // One chunk per record batch: every chunk's offset can be fetched directly (some
            // brokers, tansu 0.6 among them, cannot fetch from inside a batch).
            .set("batch.num.messages", "1")
            .create_with_context(DeliveryContext {
                failures: AtomicU64::new(0),
                what: "changelog",
            })?;
        Ok(ChangelogProducer { topic, producer })
    }
}

impl ChangelogSink for ChangelogProducer {
    fn publish(&self, chunks: &[ChangelogChunk]) -> Result<(), String> {
        let failures_before = self.producer.context().failures.load(Ordering::Acquire);
        for chunk in chunks {
            let Some((_, partition)) = parse_position_name(&chunk.source) else {
                return Err(format!("`{}` is not a Kafka partition", chunk.source));
            };
            let payload = chunk.encode();
            let mut record = BaseRecord::<str, [u8]>::to(&self.topic)
                .partition(partition)
                .key(chunk.source.as_str())
                .payload(payload.as_slice());
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(20));
                    }
                    Err((error, _)) => return Err(format!("changelog {}: {error}", self.topic)),
                }
            }
        }
        self.producer
            .flush(TIMEOUT)
            .map_err(|error| format!("changelog {}: {error}", self.topic))?;
        if self.producer.context().failures.load(Ordering::Acquire) != failures_before {
            return Err(format!(
                "changelog {}: some chunks were not delivered",
                self.topic
            ));
        }
        Ok(())
    }
}

/// Brings a partition's local state up to its changelog, unless the store is already current.
/// Returns whether a restore happened.
pub fn restore_partition(
    config: &KafkaConfig,
    changelog_topic: &str,
    store: &RocksStore,
    catalog: &MeterCatalog,
    source: &str,
    partition: i32,
) -> anyhow::Result<bool> {
    // A group id only so that librdkafka accepts `assign`; the reader never joins or commits.
    let reader: BaseConsumer = client_config(config)
        .set("group.id", format!("{}.restore", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let (low, high) = reader.fetch_watermarks(changelog_topic, partition, TIMEOUT)?;
    if high <= low {
        return Ok(false);
    }
    let local = store.position(source)?;
    // Fast path: the newest message is a complete flush of this source the store already has.
    if let Some(local) = local {
        let last = read_range(
            &reader,
            changelog_topic,
            partition,
            high - 1,
            high,
            Duration::from_secs(5),
        )
        .unwrap_or_default();
        if let Some(chunk) = last.last() {
            if chunk.source == source && chunk.is_last() && chunk.position <= local {
                metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "skipped").increment(1);
                return Ok(false);
            }
        }
    }
    let started = Instant::now();
    let chunks: Vec<ChangelogChunk> = read_range(
        &reader,
        changelog_topic,
        partition,
        low,
        high,
        Duration::from_secs(300),
    )?
    .into_iter()
    .filter(|chunk| chunk.source == source)
    .collect();
    let flushes = complete_flushes(source, chunks);
    let Some(position) = flushes.last().and_then(|f| f.last()).map(|c| c.position) else {
        return Ok(false);
    };
    if local.is_some_and(|local| local >= position) {
        metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "skipped").increment(1);
        return Ok(false);
    }
    store.restore_source(source, &flushes, catalog)?;
    metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "restored").increment(1);
    tracing::info!(
        source,
        flushes = flushes.len(),
        from = ?local,
        to = position,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restored partition state from the changelog"
    );
    Ok(true)
}

/// Reads changelog messages with offsets in [from, to).
fn read_range(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    patience: Duration,
) -> anyhow::Result<Vec<ChangelogChunk>> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&assignment)?;
    let mut out = Vec::new();
    let mut next = from;
    let deadline = Instant::now() + patience;
    while next < to {
        anyhow::ensure!(
            Instant::now() < deadline,
            "changelog {topic}/{partition}: stuck at offset {next} of {to}"
        );
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                next = message.offset() + 1;
                let payload = message.payload().unwrap_or_default();
                match ChangelogChunk::decode(payload) {
                    Ok(chunk) => out.push(chunk),
                    Err(error) => anyhow::bail!(
                        "changelog {topic}/{partition} offset {}: not a tallyd changelog message: {error}",
                        message.offset()
                    ),
                }
            }
            Some(Err(error)) => anyhow::bail!("changelog {topic}/{partition}: {error}"),
            None => {}
        }
    }
    Ok(out)
}

/// Creates the dead-letter and changelog topics when missing (the changelog with as many
/// partitions as the widest input topic: flushes go to the partition of their input).
pub async fn provision_topics(config: &KafkaConfig) -> anyhow::Result<()> {
    let probe_config = config.clone();
    let partitions = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, i32)>> {
        let probe: BaseConsumer = client_config(&probe_config).create()?;
        let metadata = probe.fetch_metadata(None, TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none())
            .map(|topic| (topic.name().to_string(), topic.partitions().len() as i32))
            .collect())
    })
    .await??;
    let count = |name: &str| partitions.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
    let mut widest = 0;
    for topic in &config.topics {
        match count(topic) {
            Some(n) => widest = widest.max(n),
            None => anyhow::bail!("kafka topic `{topic}` does not exist; create it (keyed by tenant) first"),
        }
    }
    let mut wanted = Vec::new();
    if count(&config.dlq_topic).is_none() {
        wanted.push(NewTopic::new(
            &config.dlq_topic,
            widest,
            TopicReplication::Fixed(-1),
        ));
    }
    if let Some(changelog) = &config.changelog_topic {
        match count(changelog) {
            Some(n) if n < widest => anyhow::bail!(
                "changelog topic `{changelog}` has {n} partitions; it needs at least {widest} (one per input partition)"
            ),
            Some(_) => {}
            None => wanted.push(NewTopic::new(changelog, widest, TopicReplication::Fixed(-1))),
        }
    }
    create_topics(config, &wanted).await
}

/// Creates `wanted` topics, tolerating ones that already exist, within a bounded wait.
pub async fn create_topics(config: &KafkaConfig, wanted: &[NewTopic<'_>]) -> anyhow::Result<()> {
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
            Err((topic, error)) => anyhow::bail!("cannot create kafka topic `{topic}`: {error}"),
        }
    }
    Ok(())
}
