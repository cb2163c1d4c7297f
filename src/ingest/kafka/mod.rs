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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;

pub mod batch;
pub mod changelog;

use batch::DeadLetter;
pub use batch::{Folder, KafkaMessage};

use crate::cluster::Cluster;
use crate::config::KafkaConfig;
use crate::model::now_ms;
use crate::pipeline::Shared;
use crate::store::checkpoint::Snapshot;
use crate::telemetry;

/// Checkpoint position names of Kafka partitions start with this.
pub const POSITION_PREFIX: &str = "kafka/";
const SOURCE: &str = "kafka";
/// How long a revocation may wait for its checkpoint before giving the partitions up anyway
/// (then the next owner replays from the previous checkpoint: nothing lost, see ARCHITECTURE.md).
const REVOKE_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Batch state shared by the poll loop and the rebalance callback (same thread; the mutex only
/// satisfies `Sync`).
struct Batcher {
    pending: Vec<KafkaMessage>,
    folder: Folder,
}

/// Counts failed deliveries of a producer (dead letters, changelog).
pub(crate) struct DeliveryContext {
    pub(crate) failures: AtomicU64,
    pub(crate) what: &'static str,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            tracing::error!(%error, output = self.what, "record not delivered; retrying");
            self.failures.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub struct SourceContext {
    shared: Arc<Shared>,
    config: KafkaConfig,
    checkpoints: SyncSender<Arc<Snapshot>>,
    batcher: Mutex<Batcher>,
    dlq: BaseProducer<DeliveryContext>,
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

fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
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

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(telemetry::KAFKA_REBALANCES, "kind" => "assign").increment(1);
                self.seek_positions(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(error) = result {
                    tracing::error!(%error, "cannot take the assigned partitions");
                }
                let blocked = self.blocked.lock();
                if !blocked.is_empty() {
                    let mut paused = TopicPartitionList::new();
                    for (topic, partition) in blocked.iter() {
                        paused.add_partition(topic, *partition);
                    }
                    if let Err(error) = consumer.pause(&paused) {
                        tracing::error!(%error, "cannot pause partitions whose restore failed");
                    }
                }
                drop(blocked);
                let mut owned = self.owned.lock();
                let mut expected = self.expected.lock();
                for element in tpl.elements() {
                    let key = (element.topic().to_string(), element.partition());
                    match element.offset() {
                        Offset::Offset(start) => expected.insert(key.clone(), start),
                        _ => expected.remove(&key),
                    };
                    owned.insert(key);
                }
                drop(expected);
                self.announce(&owned);
                drop(owned);
                tracing::info!(partitions = %describe(tpl), "partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(telemetry::KAFKA_REBALANCES, "kind" => "revoke").increment(1);
                // A lost assignment (session timeout) already belongs to someone else: still
                // checkpoint what we counted, but the offset commit will be refused.
                self.release(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "cannot release the revoked partitions");
                }
                tracing::info!(partitions = %describe(tpl), "partitions revoked");
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
                let mut owned = self.owned.lock();
                owned.clear();
                self.announce(&owned);
            }
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset()))
        .collect::<Vec<_>>()
        .join(",")
}

impl SourceContext {
    fn announce(&self, owned: &BTreeSet<(String, i32)>) {
        if let Some(cluster) = &self.cluster {
            cluster.set_owned(
                owned
                    .iter()
                    .map(|(topic, partition)| (topic.as_str(), *partition)),
            );
        }
    }

    /// Sets each assigned partition's start offset: the checkpointed position, or the group's
    /// committed offset when another replica got further (it holds that usage).
    fn seek_positions(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => Some(committed),
            Err(error) => {
                tracing::warn!(%error, "cannot read committed offsets; using checkpointed positions");
                None
            }
        };
        let assigned: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in assigned {
            if let Some(changelog_topic) = &self.config.changelog_topic {
                // The previous owner published this partition's state before committing it:
                // catch the store up before deciding where to resume.
                let source = position_name(&topic, partition);
                let shared = &self.shared;
                match changelog::restore_partition(
                    &self.config,
                    changelog_topic,
                    &shared.store,
                    &shared.catalog,
                    &source,
                    partition,
                ) {
                    Ok((_, restore_from)) => {
                        if let Some(producer) = &self.changelog {
                            producer.set_restore_from(&source, restore_from);
                        }
                    }
                    Err(error) => {
                        // Resuming without the restore could count twice: hold the partition back.
                        tracing::error!(%error, source, "cannot restore from the changelog; not consuming it");
                        shared.ready.store(false, Ordering::Release);
                        self.blocked.lock().insert((topic.clone(), partition));
                        self.any_blocked.store(true, Ordering::Release);
                        continue;
                    }
                }
            }
            let local = match self.shared.store.position(&position_name(&topic, partition)) {
                Ok(local) => local.map(|next| next as i64),
                Err(error) => {
                    tracing::error!(%error, topic, partition, "cannot read the checkpointed position");
                    None
                }
            };
            let group = committed
                .as_ref()
                .and_then(|c| c.find_partition(&topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                });
            let start = match (local, group) {
                (Some(local), Some(group)) => Some(local.max(group)),
                (one, other) => one.or(other),
            };
            if let Some(start) = start {
                if let Err(error) = tpl.set_partition_offset(&topic, partition, Offset::Offset(start)) {
                    tracing::error!(%error, topic, partition, "cannot set the start offset");
                }
            }
        }
    }

    /// Applies what was consumed, checkpoints it, and commits the revoked partitions' offsets.
    fn release(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        self.process_pending();
        if !self
            .shared
            .checkpoint_now(&self.checkpoints, REVOKE_CHECKPOINT_TIMEOUT)
        {
            tracing::error!("revoked partitions released without a fresh checkpoint; the next owner replays");
        }
        let mut commit = TopicPartitionList::new();
        let mut owned = self.owned.lock();
        for element in tpl.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            owned.remove(&(topic.to_string(), partition));
            let mut blocked = self.blocked.lock();
            blocked.remove(&(topic.to_string(), partition));
            self.any_blocked.store(!blocked.is_empty(), Ordering::Release);
            drop(blocked);
            metrics::gauge!(telemetry::KAFKA_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
                .set(0.0);
            if let Ok(Some(next)) = self.shared.store.position(&position_name(topic, partition)) {
                let _ = commit.add_partition_offset(topic, partition, Offset::Offset(next as i64));
            }
        }
        self.announce(&owned);
        drop(owned);
        if commit.count() > 0 {
            if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(%error, "offset commit on revoke failed (advisory; positions are checkpointed)");
            }
        }
    }

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
        self.deliver_dead_letters(&folded.dead_letters);
        self.check_gaps(&folded.first, &folded.next);
        batcher.folder.apply(folded);
    }

    fn deliver_dead_letters(&self, dead_letters: &[DeadLetter]) {
        if dead_letters.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let failures_before = self.dlq.context().failures.load(Ordering::Relaxed);
            let mut sent_all = true;
            for letter in dead_letters {
                if let Err(error) = self.send_dead_letter(letter) {
                    tracing::error!(%error, topic = %self.config.dlq_topic, "cannot queue a dead letter");
                    sent_all = false;
                    break;
                }
            }
            let flushed = self.dlq.flush(Duration::from_secs(30));
            let delivered = sent_all
                && flushed.is_ok()
                && self.dlq.context().failures.load(Ordering::Relaxed) == failures_before;
            if delivered {
                metrics::counter!(telemetry::KAFKA_DEAD_LETTERS).increment(dead_letters.len() as u64);
                return;
            }
            // The partition waits rather than skipping a refused event silently; a retry may
            // write some dead letters twice (consumers key them by topic/partition/offset/index).
            tracing::error!(
                retry_in_ms = backoff.as_millis() as u64,
                "dead letters not delivered"
            );
            metrics::counter!(telemetry::EMIT_FAILURES, "output" => "kafka_dlq").increment(1);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn send_dead_letter(&self, letter: &DeadLetter) -> KafkaResult<()> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let index = letter.index.map(|i| i.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "tallyd.reason",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "tallyd.error",
                value: Some(letter.error.as_str()),
            })
            .insert(Header {
                key: "tallyd.source.topic",
                value: Some(&*letter.topic),
            })
            .insert(Header {
                key: "tallyd.source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "tallyd.source.offset",
                value: Some(offset.as_str()),
            });
        if let Some(index) = &index {
            headers = headers.insert(Header {
                key: "tallyd.event.index",
                value: Some(index.as_str()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.config.dlq_topic)
            .payload(letter.value.as_slice())
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        loop {
            match self.dlq.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    self.dlq.poll(Duration::from_millis(50));
                }
                Err((error, _)) => return Err(error),
            }
        }
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

/// The dead-letter producer's settings: idempotent, acks from all in-sync replicas.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    for (key, value) in &config.properties {
        // Consumer-only settings would only produce librdkafka warnings here.
        if !is_consumer_only(key) {
            client.set(key, value);
        }
    }
    client
}

pub(crate) fn is_consumer_only(key: &str) -> bool {
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
    ) -> anyhow::Result<KafkaSource> {
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
                )?);
                if shared.changelog.set(sink.clone()).is_err() {
                    anyhow::bail!("a changelog sink is already installed");
                }
                Some(sink)
            }
            None => None,
        };
        let dlq: BaseProducer<DeliveryContext> =
            producer_config(&config).create_with_context(DeliveryContext {
                failures: AtomicU64::new(0),
                what: "dead-letter",
            })?;
        let context = SourceContext {
            batcher: Mutex::new(Batcher {
                pending: Vec::with_capacity(config.max_batch_messages),
                folder: Folder::new(shared.clone(), config.changelog_topic.is_some()),
            }),
            shared,
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
        let thread = std::thread::Builder::new()
            .name("tallyd-kafka".into())
            .spawn(move || run(consumer, thread_stop))?;
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
                    let pending = copy_message(&message, &mut topics, &context.config.id_header);
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
        context.commit_durable(&consumer);
        if context.shared.engine.len() > context.config.max_pending_series {
            backpressure(&consumer, &context, &stop);
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
                let pending = copy_message(&message, &mut topics, &context.config.id_header);
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

fn copy_message(message: &BorrowedMessage<'_>, topics: &mut Vec<Arc<str>>, id_header: &str) -> KafkaMessage {
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
            h.key == "content-type" && h.value == Some(crate::ingest::otlp::forward::CONTENT_TYPE.as_bytes())
        })
    });
    KafkaMessage {
        forwarded,
        topic,
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis().unwrap_or_else(now_ms),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        header_id,
    }
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
}
