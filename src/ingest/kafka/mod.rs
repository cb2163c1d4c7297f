//! The Kafka source: CloudEvents JSON from a consumer group, counted exactly once.
//!
//! One dedicated thread polls a `BaseConsumer` (several times cheaper per message than a
//! `StreamConsumer`), copies up to `max_batch_messages` payloads, then decodes, deduplicates and
//! pre-aggregates them as one batch and folds it into its own engine writer together with each
//! partition's next offset (`Writer::commit`). The checkpoint therefore stores every partition's
//! offset in the same RocksDB WriteBatch as the aggregates it produced; on assignment the
//! consumer seeks there (or to the group's committed offset when that is further: another
//! replica counted up to it). Kafka's committed offset is only advisory here: it is committed
//! after each checkpoint, for lag monitoring and for the next owner of the partition.
//!
//! Decisions are replay-stable: lateness is judged against the message timestamp, not the wall
//! clock, so a crash and replay refuse and accept exactly the same events. Invalid and refused
//! events go to the dead-letter topic (headers give the reason) before the offset that passes
//! them is applied: nothing is lost and a poison message never blocks its partition.
//!
//! Revocation (rebalance or shutdown): the pending batch is applied, a checkpoint is forced and
//! the revoked partitions' offsets are committed synchronously before they are released, so the
//! next owner starts exactly where this replica's durable state ends.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;

pub mod batch;
pub mod changelog;
mod dead_letter;
mod orphans;
mod rebalance;

pub use batch::{Folder, KafkaMessage};
use dead_letter::DeadLetterProducer;

use crate::cluster::Cluster;
use crate::config::KafkaConfig;
use crate::kafka::{consumer_config, log_librdkafka, parse_position_name, KafkaSetupError};
use crate::model::now_ms;
use crate::state::Shared;
use crate::store::checkpoint::Snapshot;
use crate::telemetry;

const SOURCE: crate::ingest::admission::Source = crate::ingest::admission::Source::Kafka;
/// How long a revocation may wait for its checkpoint before giving the partitions up anyway
/// (then the next owner replays from the previous checkpoint: nothing lost, see ARCHITECTURE.md).
const REVOKE_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);

/// Batch state shared by the poll loop and the rebalance callback (same thread; the mutex only
/// satisfies `Sync`).
struct Batcher {
    pending: Vec<KafkaMessage>,
    folder: Folder,
}

pub struct SourceContext {
    shared: Arc<Shared>,
    config: KafkaConfig,
    checkpoints: SyncSender<Arc<Snapshot>>,
    batcher: Mutex<Batcher>,
    dlq: DeadLetterProducer,
    /// Partitions this replica owns (for offset commits and lag labels).
    owned: Mutex<BTreeSet<(String, i32)>>,
    /// Assigned partitions whose restore failed: paused, never consumed (readiness is down).
    blocked: Mutex<BTreeSet<(String, i32)>>,
    /// `!blocked.is_empty()`, readable per message without the lock.
    any_blocked: AtomicBool,
    /// Next offset each owned partition should deliver (gap detection).
    expected: Mutex<FxHashMap<(String, i32), i64>>,
    /// Cluster mode: told about every ownership change (query routing).
    cluster: Option<Arc<Cluster>>,
    /// Learns each restored partition's restore point.
    changelog: Option<Arc<changelog::ChangelogProducer>>,
}

/// The part of librdkafka's statistics JSON that tallyd reads.
#[derive(serde::Deserialize)]
struct Stats {
    #[serde(default)]
    topics: std::collections::HashMap<String, TopicStats>,
}

#[derive(serde::Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: std::collections::HashMap<String, PartitionStats>,
}

#[derive(serde::Deserialize)]
struct PartitionStats {
    partition: i32,
    #[serde(default = "unknown_lag")]
    consumer_lag: i64,
}

fn unknown_lag() -> i64 {
    -1
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<Stats>(statistics) else {
            return;
        };
        let owned = self.owned.lock();
        for (topic, topic_stats) in &stats.topics {
            for partition in topic_stats.partitions.values() {
                // -1 is librdkafka's "unassigned" pseudo-partition; lag -1 means unknown yet.
                if partition.partition < 0 || partition.consumer_lag < 0 {
                    continue;
                }
                if owned.contains(&(topic.clone(), partition.partition)) {
                    metrics::gauge!(telemetry::KAFKA_LAG, "topic" => topic.clone(), "partition" => partition.partition.to_string())
                        .set(partition.consumer_lag as f64);
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::error!(%error, "librdkafka: {reason}");
    }
}

impl SourceContext {
    /// Offsets skipped between where a partition resumed (or its previous batch ended) and its
    /// next message. Transaction markers and compaction make small legitimate gaps; a broker
    /// that cannot fetch from inside a record batch makes large ones (tansu 0.6 does): counted,
    /// logged, never silently.
    fn check_gaps(&self, first: &FxHashMap<(Arc<str>, i32), i64>, next: &FxHashMap<(Arc<str>, i32), u64>) {
        let mut expected = self.expected.lock();
        for (key, lowest) in first {
            let name = (key.0.to_string(), key.1);
            if let Some(want) = expected.get(&name) {
                if *lowest > *want {
                    metrics::counter!(telemetry::KAFKA_OFFSET_GAPS).increment((*lowest - *want) as u64);
                    tracing::warn!(
                        topic = %key.0,
                        partition = key.1,
                        expected = *want,
                        got = *lowest,
                        "offsets skipped by the broker (transaction markers, compaction, or a broker bug)"
                    );
                }
            }
            if let Some(after) = next.get(key) {
                expected.insert(name, *after as i64);
            }
        }
    }

    /// A partition assigned but not restored: its messages must not be counted.
    fn is_blocked(&self, topic: &str, partition: i32) -> bool {
        self.any_blocked.load(Ordering::Acquire)
            && self.blocked.lock().contains(&(topic.to_string(), partition))
    }

    fn process_pending(&self) {
        let mut batcher = self.batcher.lock();
        if batcher.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut batcher.pending);
        let folded = batcher.folder.fold_parallel(&pending, self.config.fold_threads);
        // Dead letters are durable in Kafka before the offsets that pass them are applied.
        self.dlq.deliver(&folded.dead_letters);
        self.check_gaps(&folded.first, &folded.next);
        batcher.folder.apply(folded);
    }

    /// Commits to Kafka the offsets that checkpoints have made durable (advisory: lag
    /// monitoring and the starting point of a partition's next owner).
    fn commit_durable(&self, consumer: &BaseConsumer<Self>) {
        let durable = std::mem::take(&mut *self.shared.durable_positions.lock());
        if durable.is_empty() {
            return;
        }
        let owned = self.owned.lock();
        let mut commit = TopicPartitionList::new();
        let mut oldest_ms = i64::MAX;
        for (name, next, checkpoint_ms) in &durable {
            if let Some((topic, partition)) = parse_position_name(name) {
                if owned.contains(&(topic.to_string(), partition)) {
                    let _ = commit.add_partition_offset(topic, partition, Offset::Offset(*next as i64));
                    oldest_ms = oldest_ms.min(*checkpoint_ms);
                }
            }
        }
        drop(owned);
        if commit.count() == 0 {
            return;
        }
        match consumer.commit(&commit, CommitMode::Async) {
            Ok(()) => {
                let delay = (now_ms() - oldest_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(telemetry::KAFKA_COMMIT_DELAY).record(delay);
            }
            Err(error) => {
                tracing::warn!(%error, "offset commit failed (advisory; retried after the next checkpoint)")
            }
        }
    }
}

/// The running source: `stop` ends it after a final checkpoint and a clean group leave.
pub struct KafkaSource {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl KafkaSource {
    /// Provisions topics, connects, subscribes and starts the consumer thread.
    pub async fn start(
        shared: Arc<Shared>,
        config: KafkaConfig,
        checkpoints: SyncSender<Arc<Snapshot>>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<KafkaSource, KafkaSetupError> {
        changelog::provision_topics(&config).await?;
        let changelog = match &config.changelog_topic {
            Some(topic) => {
                let compaction = changelog::Compaction {
                    bytes: config.changelog_compact_bytes,
                    interval: Duration::from_secs(config.changelog_compact_interval_secs),
                    dedup_horizon_secs: shared.config.dedup_horizon_secs,
                    retention_secs: shared.config.retention_secs,
                };
                let sink = Arc::new(changelog::ChangelogProducer::new(
                    &config,
                    topic.clone(),
                    compaction,
                    shared.store.writer(),
                )?);
                if shared.changelog.set(sink.clone()).is_err() {
                    return Err(KafkaSetupError::AlreadyInstalled("a changelog sink"));
                }
                Some(sink)
            }
            None => None,
        };
        let dlq = DeadLetterProducer::new(&config)?;
        let context = SourceContext {
            batcher: Mutex::new(Batcher {
                pending: Vec::with_capacity(config.max_batch_messages),
                folder: Folder::new(shared.clone(), config.changelog_topic.is_some()),
            }),
            shared: shared.clone(),
            checkpoints,
            dlq,
            owned: Mutex::new(BTreeSet::new()),
            blocked: Mutex::new(BTreeSet::new()),
            any_blocked: AtomicBool::new(false),
            expected: Mutex::new(FxHashMap::default()),
            cluster,
            changelog,
            config,
        };
        let consumer: BaseConsumer<SourceContext> =
            consumer_config(&context.config).create_with_context(context)?;
        let topics: Vec<&str> = consumer
            .context()
            .config
            .topics
            .iter()
            .map(String::as_str)
            .collect();
        consumer.subscribe(&topics)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = crate::state::spawn_stage("tallyd-kafka", shared, move || run(consumer, thread_stop))?;
        Ok(KafkaSource { stop, thread })
    }

    /// Stops consuming, checkpoints everything consumed, commits offsets, leaves the group.
    pub fn stop(self) -> bool {
        self.stop.store(true, Ordering::Release);
        self.thread.join().is_ok()
    }
}

fn run(consumer: BaseConsumer<SourceContext>, stop: Arc<AtomicBool>) {
    let context = consumer.context().clone();
    let max_batch = context.config.max_batch_messages;
    let mut topics: Vec<Arc<str>> = Vec::new();
    let mut orphans = orphans::OrphanWatch::new(session_timeout(&context.config));
    while !stop.load(Ordering::Acquire) {
        // Block briefly for the first message, then drain what is already fetched.
        let mut timeout = Duration::from_millis(100);
        let mut polled = 0;
        while polled < max_batch {
            match consumer.poll(timeout) {
                Some(Ok(message)) => {
                    polled += 1;
                    timeout = Duration::ZERO;
                    if context.is_blocked(message.topic(), message.partition()) {
                        continue;
                    }
                    let pending = copy_message(&message, &mut topics, &context.config);
                    context.batcher.lock().pending.push(pending);
                }
                Some(Err(error)) => {
                    metrics::counter!(telemetry::KAFKA_ERRORS).increment(1);
                    tracing::warn!(%error, "kafka consumer error");
                    break;
                }
                None => break,
            }
        }
        context.process_pending();
        context.stop_deposed(&consumer);
        context.commit_durable(&consumer);
        if context.shared.engine.len() > context.config.max_pending_series {
            backpressure(&consumer, &context, &stop);
        }
        if orphans.should_rejoin(&consumer, &context.config.topics) {
            // Leaving runs the revoke callback (checkpoint, commit); joining again asks for
            // a rebalance that hands out the orphaned partitions.
            consumer.unsubscribe();
            let names: Vec<&str> = context.config.topics.iter().map(String::as_str).collect();
            if let Err(error) = consumer.subscribe(&names) {
                tracing::error!(%error, "cannot subscribe again after leaving the group");
                context.shared.fault("kafka-subscribe", error.to_string());
            }
        }
    }
    context.process_pending();
    if !context
        .shared
        .checkpoint_now(&context.checkpoints, REVOKE_CHECKPOINT_TIMEOUT)
    {
        tracing::error!("final Kafka checkpoint not written; partitions replay from the previous one");
    }
    context.commit_durable(&consumer);
    // Dropping the consumer leaves the group; the revoke callback commits what is durable.
    drop(consumer);
    tracing::info!("kafka source stopped");
}

/// The group's session timeout (`session.timeout.ms`, librdkafka's default 45 s).
fn session_timeout(config: &KafkaConfig) -> Duration {
    let millis = config
        .properties
        .iter()
        .find(|(key, _)| key == "session.timeout.ms")
        .and_then(|(_, value)| value.parse::<u64>().ok())
        .unwrap_or(45_000);
    Duration::from_millis(millis)
}

/// Pauses every assigned partition until a checkpoint drains the engine below half the limit
/// (the rebalance callbacks keep being served: `poll` runs throughout).
fn backpressure(consumer: &BaseConsumer<SourceContext>, context: &SourceContext, stop: &AtomicBool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    if consumer.pause(&assignment).is_err() {
        return;
    }
    metrics::counter!(telemetry::KAFKA_PAUSES).increment(1);
    let started = Instant::now();
    let mut topics: Vec<Arc<str>> = Vec::new();
    while context.shared.engine.len() > context.config.max_pending_series / 2 && !stop.load(Ordering::Acquire)
    {
        // Messages fetched before the pause still arrive; they are kept, in order.
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
            if !context.is_blocked(message.topic(), message.partition()) {
                let pending = copy_message(&message, &mut topics, &context.config);
                context.batcher.lock().pending.push(pending);
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            tracing::warn!("checkpoints are not keeping up; resuming consumption anyway");
            break;
        }
    }
    let _ = consumer.resume(&assignment);
}

/// The time a message's events are judged against (lateness, the future bound): the broker's
/// append time where the topic records it; a producer-set CreateTime only within
/// `tolerance_ms` behind the consumer's clock and never ahead of it, so a producer cannot
/// make a months-old event look fresh (and amend an invoiced period) by stamping it old.
/// Replays judge the same message the same way as long as the consumer's lag stays within the
/// tolerance.
pub fn judged_time_ms(timestamp: rdkafka::Timestamp, wall_ms: i64, tolerance_ms: i64) -> i64 {
    match timestamp {
        rdkafka::Timestamp::LogAppendTime(broker_ms) => broker_ms,
        rdkafka::Timestamp::CreateTime(producer_ms) => {
            producer_ms.clamp(wall_ms.saturating_sub(tolerance_ms), wall_ms)
        }
        rdkafka::Timestamp::NotAvailable => wall_ms,
    }
}

fn copy_message(
    message: &BorrowedMessage<'_>,
    topics: &mut Vec<Arc<str>>,
    config: &KafkaConfig,
) -> KafkaMessage {
    let id_header = config.id_header.as_str();
    // Topic names are interned so a batch does not allocate one per message.
    let topic = match topics.iter().find(|t| ***t == *message.topic()) {
        Some(topic) => topic.clone(),
        None => {
            let topic: Arc<str> = message.topic().into();
            topics.push(topic.clone());
            topic
        }
    };
    let header_id = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == id_header)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    let forwarded = message.headers().is_some_and(|headers| {
        headers.iter().any(|h| {
            h.key == "content-type" && h.value == Some(crate::cluster::forward::CONTENT_TYPE.as_bytes())
        })
    });
    let signature = forwarded
        .then(|| {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == crate::cluster::forward::SIGNATURE_HEADER)
                    .and_then(|h| h.value)
                    .map(<[u8]>::to_vec)
            })
        })
        .flatten();
    KafkaMessage {
        forwarded,
        signature,
        topic,
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: judged_time_ms(message.timestamp(), now_ms(), config.create_time_tolerance_ms),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        header_id,
    }
}

#[cfg(test)]
mod tests {
    use super::judged_time_ms;
    use rdkafka::Timestamp;

    const NOW: i64 = 1_800_000_000_000;
    const HOUR: i64 = 3_600_000;

    /// A producer stamping a message 40 days old cannot make a 40-day-old event look on time:
    /// its CreateTime counts only within the tolerance, and never from the future; the
    /// broker's append time is trusted as it is.
    #[test]
    fn producer_timestamps_count_only_within_the_tolerance() {
        let judged = |timestamp| judged_time_ms(timestamp, NOW, HOUR);
        assert_eq!(judged(Timestamp::CreateTime(NOW - 10_000)), NOW - 10_000);
        assert_eq!(judged(Timestamp::CreateTime(NOW - 40 * 24 * HOUR)), NOW - HOUR);
        assert_eq!(judged(Timestamp::CreateTime(NOW + 24 * HOUR)), NOW);
        assert_eq!(judged(Timestamp::CreateTime(i64::MIN)), NOW - HOUR);
        assert_eq!(
            judged(Timestamp::LogAppendTime(NOW - 40 * 24 * HOUR)),
            NOW - 40 * 24 * HOUR
        );
        assert_eq!(judged(Timestamp::NotAvailable), NOW);
    }
}
