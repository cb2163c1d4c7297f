//! The Kafka side of the changelog (format and restore semantics: `store::changelog`): the
//! producer checkpoints publish through, the reader a new owner restores from, and topic
//! provisioning at startup.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};
use std::time::{Duration, Instant};

use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::{
    client_config, create_topics, parse_position_name, producer_config, topic_partitions, DeliveryContext,
    KafkaSetupError,
};
use crate::state::{ChangelogSink, PublishError};
use crate::store::changelog::{chunk_base, deposed_by, flush_id, fold, restore_plan, ChangelogChunk};
use crate::store::format;
use crate::store::{MeterCatalog, RocksStore};
use crate::telemetry;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Why the changelog could not be published, read or compacted.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("changelog: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("`{0}` is not a Kafka partition")]
    NotAPartition(String),
    /// Publishing: the broker did not take every chunk.
    #[error("changelog {topic}: {detail}")]
    Publish { topic: String, detail: String },
    /// Reading: a gap, a message that is not a chunk, or one this build cannot read.
    #[error("changelog {topic}/{partition}: {detail}")]
    Read {
        topic: String,
        partition: i32,
        detail: String,
    },
}

/// Publishes checkpoint flushes (partition = the input partition the flush belongs to) and
/// compacts each source's changelog now and then (see `store::changelog`).
pub struct ChangelogProducer {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    config: KafkaConfig,
    producer: BaseProducer<DeliveryContext>,
    compaction: Compaction,
    /// The local store's id, stamped on bases as on flushes (`store::changelog::flush_id`).
    writer: u32,
    /// Per source: where a restore may start (stamped on every chunk published).
    restore_from: Mutex<FxHashMap<String, u64>>,
    /// Per source: bytes published and when the last base was (or publishing began).
    since_base: Mutex<FxHashMap<String, (u64, Instant)>>,
    /// Sources with a compaction running.
    compacting: Mutex<FxHashSet<String>>,
    /// Per source: the offset of the fence this writer published when it took the source
    /// (stamped on every chunk as its `epoch`; see `store::changelog`, "Fences").
    epochs: Mutex<FxHashMap<String, i64>>,
    /// Per source: the changelog offset through which this writer has looked for newer
    /// fences (its own chunks, and every other message it read between them).
    checked: Mutex<FxHashMap<String, i64>>,
    /// Reads what others wrote between this writer's chunks (kept: one connection).
    gap_reader: Mutex<Option<BaseConsumer>>,
    /// Publishes fences (kept: an idempotent producer's setup costs round trips, and a
    /// rebalance fences every assigned partition in turn while queries wait for it).
    fencer: Mutex<Option<BaseProducer<DeliveryContext>>>,
}

/// When to fold a source's flushes into a base, and what a base may drop.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    /// Fold after this many bytes of flushes (0: never by size).
    pub bytes: u64,
    /// Fold when this long has passed since the last base and anything was published.
    pub interval: Duration,
    pub dedup_horizon_secs: i64,
    pub retention_secs: i64,
}

fn changelog_producer(
    config: &KafkaConfig,
    what: &'static str,
) -> Result<BaseProducer<DeliveryContext>, KafkaSetupError> {
    Ok(producer_config(config)
        // Flushes can approach the chunk limit; allow them whatever the defaults.
        .set("message.max.bytes", "2000000")
        // One chunk per record batch: every chunk's offset can be fetched directly (some
        // brokers, tansu 0.6 among them, cannot fetch from inside a batch).
        .set("batch.num.messages", "1")
        .create_with_context(DeliveryContext::recording(what))?)
}

impl ChangelogProducer {
    pub fn new(
        config: &KafkaConfig,
        topic: String,
        compaction: Compaction,
        writer: u32,
    ) -> Result<ChangelogProducer, KafkaSetupError> {
        Ok(ChangelogProducer {
            inner: Arc::new(Inner {
                producer: changelog_producer(config, "changelog")?,
                topic,
                config: config.clone(),
                compaction,
                writer,
                restore_from: Mutex::new(FxHashMap::default()),
                since_base: Mutex::new(FxHashMap::default()),
                compacting: Mutex::new(FxHashSet::default()),
                epochs: Mutex::new(FxHashMap::default()),
                checked: Mutex::new(FxHashMap::default()),
                gap_reader: Mutex::new(None),
                fencer: Mutex::new(None),
            }),
        })
    }

    /// Takes `source` for this writer: publishes a fence on its changelog partition and returns
    /// the fence's offset. Every chunk this writer publishes for the source from now on names
    /// it (`epoch`); a restore reads up to it; a writer that took the source before is deposed.
    pub fn fence(&self, source: &str, partition: i32, restore_from: u64) -> Result<i64, ChangelogError> {
        let inner = &self.inner;
        let mut fencer = inner.fencer.lock();
        if fencer.is_none() {
            *fencer = Some(changelog_producer(&inner.config, "changelog fence")?);
        }
        let producer = fencer.as_ref().expect("invariant: just created");
        let _ = producer.context().take_delivered();
        let fence = ChangelogChunk::fence(source, inner.writer, restore_from);
        send_all(producer, &inner.topic, std::slice::from_ref(&fence))?;
        let Some((_, offset)) = producer
            .context()
            .take_delivered()
            .into_iter()
            .find(|(delivered, _)| *delivered == partition)
        else {
            return Err(ChangelogError::Publish {
                topic: inner.topic.clone(),
                detail: format!("no offset reported for the fence of {source}"),
            });
        };
        inner.epochs.lock().insert(source.to_string(), offset);
        inner.checked.lock().insert(source.to_string(), offset);
        tracing::debug!(source, epoch = offset, "changelog fenced");
        Ok(offset)
    }

    /// A restore (or the check that skipped it) learned where the source's restores start.
    pub fn set_restore_from(&self, source: &str, offset: u64) {
        let mut pointers = self.inner.restore_from.lock();
        let pointer = pointers.entry(source.to_string()).or_insert(0);
        *pointer = (*pointer).max(offset);
    }
}

/// Sends `chunks` and waits until the broker acknowledged all of them.
fn send_all(
    producer: &BaseProducer<DeliveryContext>,
    topic: &str,
    chunks: &[ChangelogChunk],
) -> Result<u64, ChangelogError> {
    let publish = |detail: String| ChangelogError::Publish {
        topic: topic.to_string(),
        detail,
    };
    let failures_before = producer.context().failures.load(Ordering::Acquire);
    let mut bytes = 0;
    let chunk_version = format::version("changelog_chunk").to_string();
    for chunk in chunks {
        let Some((_, partition)) = parse_position_name(&chunk.source) else {
            return Err(ChangelogError::NotAPartition(chunk.source.clone()));
        };
        let payload = chunk.encode();
        bytes += payload.len() as u64;
        let mut record = BaseRecord::<str, [u8]>::to(topic)
            .partition(partition)
            .key(chunk.source.as_str())
            .payload(payload.as_slice())
            .headers(OwnedHeaders::new().insert(Header {
                key: format::FORMAT_HEADER,
                value: Some(&chunk_version),
            }));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(20));
                }
                Err((error, _)) => return Err(publish(error.to_string())),
            }
        }
    }
    producer
        .flush(TIMEOUT)
        .map_err(|error| publish(error.to_string()))?;
    if producer.context().failures.load(Ordering::Acquire) != failures_before {
        return Err(publish("some chunks were not delivered".into()));
    }
    Ok(bytes)
}

impl ChangelogSink for ChangelogProducer {
    fn publish(&self, chunks: &mut [ChangelogChunk]) -> Result<Vec<String>, PublishError> {
        let inner = &self.inner;
        {
            let pointers = inner.restore_from.lock();
            let epochs = inner.epochs.lock();
            for chunk in chunks.iter_mut() {
                chunk.restore_from = pointers.get(&chunk.source).copied().unwrap_or(0);
                chunk.epoch = epochs.get(&chunk.source).copied().unwrap_or(-1);
            }
        }
        let _ = inner.producer.context().take_delivered();
        send_all(&inner.producer, &inner.topic, chunks).map_err(|error| PublishError(Box::new(error)))?;
        let delivered = inner.producer.context().take_delivered();
        let deposed = inner
            .deposed(chunks, &delivered)
            .map_err(|error| PublishError(Box::new(error)))?;
        let mut due = Vec::new();
        {
            let mut since_base = inner.since_base.lock();
            for chunk in chunks.iter() {
                let size = chunk.encode().len() as u64;
                let (bytes, since) = since_base
                    .entry(chunk.source.clone())
                    .or_insert((0, Instant::now()));
                *bytes += size;
                let by_size = inner.compaction.bytes > 0 && *bytes >= inner.compaction.bytes;
                let by_time = since.elapsed() >= inner.compaction.interval;
                if (by_size || by_time) && !due.contains(&chunk.source) {
                    due.push(chunk.source.clone());
                }
            }
        }
        for source in due {
            if !inner.compacting.lock().insert(source.clone()) {
                continue;
            }
            let worker = inner.clone();
            let spawned = std::thread::Builder::new()
                .name("tallyd-compact".into())
                .spawn(move || {
                    crate::state::background_priority();
                    worker.compact(&source);
                    worker.compacting.lock().remove(&source);
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start changelog compaction");
            }
        }
        Ok(deposed)
    }
}

impl Inner {
    /// The sources of `chunks` (just delivered at `delivered`) that another writer fenced
    /// since this one took them: found among the offsets between this writer's own chunks.
    /// With one source per changelog partition and no rival, there are none to read.
    fn deposed(
        &self,
        chunks: &[ChangelogChunk],
        delivered: &[(i32, i64)],
    ) -> Result<Vec<String>, ChangelogError> {
        let mut deposed = Vec::new();
        let mut sources: Vec<&str> = chunks.iter().map(|chunk| chunk.source.as_str()).collect();
        sources.sort_unstable();
        sources.dedup();
        for source in sources {
            let Some((_, partition)) = parse_position_name(source) else {
                return Err(ChangelogError::NotAPartition(source.to_string()));
            };
            let ours: FxHashSet<i64> = delivered
                .iter()
                .filter(|(p, _)| *p == partition)
                .map(|(_, offset)| *offset)
                .collect();
            let Some(&last) = ours.iter().max() else {
                continue;
            };
            // The epoch the chunks were stamped with (a fence may have moved it since).
            let epoch = chunks
                .iter()
                .find(|chunk| chunk.source == source)
                .map_or(-1, |chunk| chunk.epoch);
            if epoch < 0 {
                // Never fenced here (no assignment published one): nothing to be deposed from.
                continue;
            }
            let from = self
                .checked
                .lock()
                .get(source)
                .map_or(epoch, |checked| (*checked).max(epoch))
                + 1;
            let others: Vec<i64> = (from..=last).filter(|offset| !ours.contains(offset)).collect();
            if let (Some(&first), Some(&end)) = (others.first(), others.last()) {
                let mut reader = self.gap_reader.lock();
                if reader.is_none() {
                    *reader = Some(reader_for(&self.config, "fence-check")?);
                }
                let reader = reader.as_ref().expect("invariant: just created");
                let read = read_range(
                    reader,
                    &self.topic,
                    partition,
                    first,
                    end + 1,
                    Duration::from_secs(30),
                )?;
                let between: Vec<(i64, ChangelogChunk)> = read
                    .into_iter()
                    .filter(|(offset, _)| !ours.contains(offset))
                    .collect();
                if let Some(fence) = deposed_by(source, &between, epoch, self.writer) {
                    metrics::counter!(telemetry::CHANGELOG_DEPOSED).increment(1);
                    tracing::warn!(
                        source,
                        epoch,
                        fence,
                        "another replica took this partition (its fence is in the changelog); \
                         emitting nothing more for it until it is assigned here again"
                    );
                    deposed.push(source.to_string());
                }
            }
            self.checked.lock().insert(source.to_string(), last);
        }
        Ok(deposed)
    }

    /// Folds `source`'s complete flushes since its last base into a new base and, once the
    /// broker has it, moves the source's restore point past what it folded. Failures only
    /// delay compaction: restores stay correct from the old restore point.
    fn compact(&self, source: &str) {
        let started = Instant::now();
        match self.try_compact(source) {
            Ok(Some((series, keys, pointer))) => {
                metrics::counter!(telemetry::CHANGELOG_COMPACTIONS, "outcome" => "ok").increment(1);
                tracing::info!(
                    source,
                    series,
                    dedup_keys = keys,
                    restore_from = pointer,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "changelog compacted"
                );
            }
            Ok(None) => {}
            Err(error) => {
                metrics::counter!(telemetry::CHANGELOG_COMPACTIONS, "outcome" => "failed").increment(1);
                tracing::warn!(%error, source, "changelog compaction failed; retrying after the next interval");
                // Not on every checkpoint: wait for the size or time trigger again.
                self.since_base
                    .lock()
                    .insert(source.to_string(), (0, Instant::now()));
            }
        }
    }

    fn try_compact(&self, source: &str) -> Result<Option<(usize, usize, u64)>, ChangelogError> {
        let Some((_, partition)) = parse_position_name(source) else {
            return Err(ChangelogError::NotAPartition(source.to_string()));
        };
        let pointer = self.restore_from.lock().get(source).copied().unwrap_or(0);
        let reader = reader_for(&self.config, "compact")?;
        let (low, high) = reader.fetch_watermarks(&self.topic, partition, TIMEOUT)?;
        let start = start_offset(&self.topic, partition, pointer, low)?;
        let messages = read_source(&reader, &self.topic, partition, start, high, source)?;
        let epoch = self.epochs.lock().get(source).copied().unwrap_or(-1);
        if let Some(fence) = deposed_by(source, &messages, epoch, self.writer) {
            // Another replica took the source: its restore point is not ours to move.
            tracing::info!(
                source,
                epoch,
                fence,
                "not compacting a changelog another replica now writes"
            );
            return Ok(None);
        }
        // Everything through the last complete flush is folded; a flush still being written
        // starts after it and stays outside (restores apply it after the base).
        let Some(folded_through) = messages
            .iter()
            .rev()
            .find(|(_, chunk)| chunk.is_last())
            .map(|(offset, _)| *offset)
        else {
            return Ok(None);
        };
        let plan = restore_plan(
            source,
            messages
                .into_iter()
                .filter(|(offset, _)| *offset <= folded_through)
                .collect(),
        );
        if plan.is_empty() {
            return Ok(None);
        }
        let now = crate::model::now_ms().div_euclid(1000);
        let folded = fold(
            &plan,
            now - self.compaction.dedup_horizon_secs,
            now - self.compaction.retention_secs,
        );
        let (series, keys) = (folded.series.len(), folded.dedup_seen.len());
        let mut base = chunk_base(source, flush_id(self.writer), folded, folded_through);
        for chunk in &mut base {
            chunk.restore_from = pointer;
            chunk.epoch = epoch;
        }
        let producer = changelog_producer(&self.config, "changelog base")?;
        send_all(&producer, &self.topic, &base)?;
        let next = (folded_through + 1) as u64;
        let mut pointers = self.restore_from.lock();
        let current = pointers.entry(source.to_string()).or_insert(0);
        *current = (*current).max(next);
        drop(pointers);
        self.since_base
            .lock()
            .insert(source.to_string(), (0, Instant::now()));
        Ok(Some((series, keys, next)))
    }
}

/// A consumer that only reads with `assign` (the group id is required, never joined).
fn reader_for(config: &KafkaConfig, purpose: &str) -> Result<BaseConsumer, ChangelogError> {
    Ok(client_config(config)
        .set("group.id", format!("{}.{purpose}", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?)
}

/// Where to start reading a source's changelog: its restore point, which retention must not
/// have deleted (that would lose state: refuse, the operator raises `retention.ms`).
fn start_offset(topic: &str, partition: i32, restore_from: u64, low: i64) -> Result<i64, ChangelogError> {
    let start = restore_from as i64;
    if start < low {
        return Err(ChangelogError::Read {
            topic: topic.to_string(),
            partition,
            detail: format!(
                "offsets from {start} are needed but retention deleted everything before {low}; \
                 the topic's retention.ms must exceed kafka.changelog_compact_interval_secs"
            ),
        });
    }
    Ok(start)
}

/// Brings a partition's local state up to its changelog, unless the store is already current.
/// With `fencer` (the replica's changelog producer) the source is first fenced for this writer
/// and the restore reads everything before the fence. Returns whether a restore happened, and
/// where the source's restores start (0: log start).
pub fn restore_partition(
    config: &KafkaConfig,
    changelog_topic: &str,
    store: &RocksStore,
    catalog: &MeterCatalog,
    source: &str,
    partition: i32,
    fencer: Option<&ChangelogProducer>,
) -> Result<(bool, u64), ChangelogError> {
    let reader = reader_for(config, "restore")?;
    let (low, mut high) = reader.fetch_watermarks(changelog_topic, partition, TIMEOUT)?;
    // The newest message before `high` is where restores start, and whether the store has it.
    let newest_before = |high: i64| {
        if high <= low {
            return None;
        }
        read_range(
            &reader,
            changelog_topic,
            partition,
            high - 1,
            high,
            Duration::from_secs(5),
        )
        .unwrap_or_default()
        .pop()
        .map(|(_, chunk)| chunk)
        .filter(|chunk| chunk.source == source)
    };
    if let Some(fencer) = fencer {
        let pointer = newest_before(high).map_or(0, |chunk| chunk.restore_from);
        // Whatever lands after the fence is the deposed writer's: left out, never read here.
        high = fencer.fence(source, partition, pointer)?;
    }
    if high <= low {
        return Ok((false, 0));
    }
    let local = store.position(source)?;
    let newest = newest_before(high);
    let restore_from = newest.as_ref().map_or(0, |chunk| chunk.restore_from);
    if let (Some(local), Some(chunk)) = (local, &newest) {
        // Only this store's own last flush proves the store holds everything: another
        // writer's also carries emission state (revisions) this store may not have.
        if chunk.is_last() && chunk.writer() == store.writer() && chunk.position <= local {
            metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "skipped").increment(1);
            return Ok((false, restore_from));
        }
    }
    // Another source wrote last (several input topics share the changelog): read it all.
    // A fence whose writer did not know the restore point says nothing about it.
    let start = match newest {
        Some(chunk) if !(chunk.is_fence() && chunk.restore_from == 0) => {
            start_offset(changelog_topic, partition, restore_from, low)?
        }
        _ => low,
    };
    let started = Instant::now();
    let messages = read_source(&reader, changelog_topic, partition, start, high, source)?;
    let read = messages.len();
    let plan = restore_plan(source, messages);
    let Some(position) = plan.last().and_then(|f| f.last()).map(|c| c.position) else {
        return Ok((false, restore_from));
    };
    // At the same position, another writer's flush may still carry emission state this store
    // lacks (windows it closed by time): apply it; its series equal the local ones.
    let own_last = plan
        .last()
        .is_some_and(|flush| flush[0].writer() == store.writer());
    if local.is_some_and(|local| local > position || (local == position && own_last)) {
        metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "skipped").increment(1);
        return Ok((false, restore_from));
    }
    // Ahead only by flushes this store published and then crashed before committing: its own
    // sources (this partition from `local`, the ingest log) replay that input. Restoring would
    // overwrite series that HTTP and OTLP usage also feeds in single mode with states that
    // predate the local checkpoint, losing that usage.
    if let Some(local) = local {
        let mut ahead = plan
            .iter()
            .filter(|flush| flush.last().is_some_and(|chunk| chunk.position > local))
            .peekable();
        if ahead.peek().is_some() && ahead.all(|flush| flush[0].writer() == store.writer()) {
            metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "own_flush").increment(1);
            tracing::info!(
                source,
                local,
                changelog = position,
                "the changelog is ahead by this store's own unacknowledged flush; replaying the input instead"
            );
            return Ok((false, restore_from));
        }
    }
    store.restore_source(source, &plan, catalog)?;
    metrics::counter!(telemetry::CHANGELOG_RESTORES, "outcome" => "restored").increment(1);
    tracing::info!(
        source,
        read_from = start,
        messages = read,
        flushes = plan.len(),
        from_base = plan.first().is_some_and(|flush| flush[0].base),
        from = ?local,
        to = position,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restored partition state from the changelog"
    );
    Ok((true, restore_from))
}

/// `source`'s changelog messages with offsets in [from, to), with their offsets.
fn read_source(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    source: &str,
) -> Result<Vec<(i64, ChangelogChunk)>, ChangelogError> {
    Ok(
        read_range(reader, topic, partition, from, to, Duration::from_secs(300))?
            .into_iter()
            .filter(|(_, chunk)| chunk.source == source)
            .collect(),
    )
}

/// Reads changelog messages with offsets in [from, to).
fn read_range(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    patience: Duration,
) -> Result<Vec<(i64, ChangelogChunk)>, ChangelogError> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&assignment)?;
    let mut out = Vec::new();
    let mut next = from;
    let deadline = Instant::now() + patience;
    let read_error = |detail: String| ChangelogError::Read {
        topic: topic.to_string(),
        partition,
        detail,
    };
    while next < to {
        if Instant::now() >= deadline {
            return Err(read_error(format!("stuck at offset {next} of {to}")));
        }
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                next = message.offset() + 1;
                // Messages from before versions were stamped are version 1.
                let version = message
                    .headers()
                    .and_then(|headers| headers.iter().find(|h| h.key == format::FORMAT_HEADER))
                    .and_then(|header| header.value)
                    .map_or(Some(1), |value| {
                        std::str::from_utf8(value).ok()?.parse::<u8>().ok()
                    });
                let Some(version) = version.filter(|version| format::readable("changelog_chunk", *version))
                else {
                    return Err(read_error(format!(
                        "offset {}: a changelog message of a format this build cannot read ({version:?}); run the version that wrote it",
                        message.offset()
                    )));
                };
                let payload = message.payload().unwrap_or_default();
                match ChangelogChunk::decode_version(payload, version) {
                    Ok(chunk) => out.push((message.offset(), chunk)),
                    Err(error) => {
                        return Err(read_error(format!(
                            "offset {}: not a tallyd changelog message: {error}",
                            message.offset()
                        )))
                    }
                }
            }
            Some(Err(error)) => return Err(read_error(error.to_string())),
            None => {}
        }
    }
    Ok(out)
}

/// Creates the dead-letter and changelog topics when missing (the changelog with as many
/// partitions as the widest input topic: flushes go to the partition of their input).
pub async fn provision_topics(config: &KafkaConfig) -> Result<(), KafkaSetupError> {
    let probe_config = config.clone();
    let partitions = tokio::task::spawn_blocking(move || topic_partitions(&probe_config, TIMEOUT))
        .await
        .map_err(|error| KafkaSetupError::Task(error.to_string()))??;
    let count = |name: &str| partitions.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
    let mut widest = 0;
    for topic in &config.topics {
        match count(topic) {
            Some(n) => widest = widest.max(n),
            None => return Err(KafkaSetupError::TopicMissing(topic.clone())),
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
            Some(n) if n < widest => {
                return Err(KafkaSetupError::TooFewPartitions {
                    topic: changelog.clone(),
                    partitions: n,
                    needed: widest,
                })
            }
            Some(_) => {}
            None => wanted.push(NewTopic::new(changelog, widest, TopicReplication::Fixed(-1))),
        }
    }
    create_topics(config, &wanted).await
}
