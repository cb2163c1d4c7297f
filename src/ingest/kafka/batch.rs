//! One Kafka batch, from copied messages to engine writers, without touching Kafka: decode (per
//! event, replay-stable: lateness against the message timestamp) → dead letters for what is
//! invalid or refused → dedup (reserve, then the store) → pre-aggregate per partition → apply
//! to the partition's writer together with its next offset. The consumer delivers the dead
//! letters between `fold` and `apply`; benchmarks drive `Folder` directly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use super::{position_name, SOURCE};
use crate::aggregate::{PreAggregated, Writer};
use crate::ingest::decode::{self, BodyKind, EventContext};
use crate::model::now_ms;
use crate::pipeline::Shared;
use crate::telemetry;

/// One consumed message, copied out of librdkafka's buffer.
pub struct KafkaMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub header_id: Option<String>,
    /// Forwarded OTLP usage (`otlp::forward`), not CloudEvents.
    pub forwarded: bool,
}

/// A dead-letter record: the refused event (or the whole message when it is not JSON).
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub reason: &'static str,
    pub error: String,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub index: Option<usize>,
}

/// Totals a batch adds to the metrics.
#[derive(Default)]
pub struct BatchOutcome {
    pub accepted: usize,
    pub duplicates: usize,
    pub unmetered: usize,
    pub late: usize,
    pub invalid: usize,
    pub refused: Vec<&'static str>,
}

/// A folded batch waiting for its dead letters to be delivered.
pub struct FoldedBatch {
    pub dead_letters: Vec<DeadLetter>,
    parts: FxHashMap<(Arc<str>, i32), (PreAggregated, Vec<u128>)>,
    pub next: FxHashMap<(Arc<str>, i32), u64>,
    pub first: FxHashMap<(Arc<str>, i32), i64>,
    pub outcome: BatchOutcome,
    messages: usize,
}

impl FoldedBatch {
    /// Adds another share of the same batch.
    fn absorb(&mut self, other: FoldedBatch, shared: &Shared) {
        self.dead_letters.extend(other.dead_letters);
        for (key, (batch, keys)) in other.parts {
            let (into, into_keys) = self.parts.entry(key).or_default();
            for (series, state) in &batch.series {
                if let Err(error) = into.merge_state(*series, state) {
                    tracing::error!(%error, "aggregate overflow merging a Kafka batch");
                    shared.ready.store(false, Ordering::Release);
                }
            }
            into_keys.extend(keys);
        }
        for (key, next) in other.next {
            let entry = self.next.entry(key).or_default();
            *entry = (*entry).max(next);
        }
        for (key, first) in other.first {
            let entry = self.first.entry(key).or_insert(i64::MAX);
            *entry = (*entry).min(first);
        }
        let (ours, theirs) = (&mut self.outcome, other.outcome);
        ours.accepted += theirs.accepted;
        ours.duplicates += theirs.duplicates;
        ours.unmetered += theirs.unmetered;
        ours.late += theirs.late;
        ours.invalid += theirs.invalid;
        ours.refused.extend(theirs.refused);
        self.messages += other.messages;
    }
}

/// The consumer's side of the engine: one writer per partition. With a changelog, each writer
/// is tagged with its partition so a checkpoint knows which series and dedup keys to publish.
pub struct Folder {
    shared: Arc<Shared>,
    replicated: bool,
    writers: FxHashMap<(Arc<str>, i32), Writer>,
}

impl Folder {
    pub fn new(shared: Arc<Shared>, replicated: bool) -> Folder {
        Folder {
            shared,
            replicated,
            writers: FxHashMap::default(),
        }
    }

    /// `fold` on up to `threads` threads, each taking a contiguous share of the batch, then
    /// merged. Correct for any split: dedup claims are race-free across threads, states merge
    /// commutatively, offsets take the maximum. (Which copy of a duplicate wins may change; on
    /// a topic keyed by tenant, as required, all copies sit on the same partition.) Decoding is most of the cost and the consumer
    /// thread was the bottleneck with the checkpoint thread half idle (BENCHMARKS.md §5).
    pub fn fold_parallel(&self, messages: &[KafkaMessage], threads: usize) -> FoldedBatch {
        let threads = threads.clamp(1, 8);
        if threads == 1 || messages.len() < 2 * 256 {
            return self.fold(messages);
        }
        let share = messages.len().div_ceil(threads);
        let mut folded = std::thread::scope(|scope| {
            let handles: Vec<_> = messages
                .chunks(share)
                .map(|chunk| scope.spawn(move || self.fold(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("invariant: folding does not panic"))
                .collect::<Vec<_>>()
        })
        .into_iter();
        let mut merged = folded.next().unwrap_or_else(|| self.fold(&[]));
        for part in folded {
            merged.absorb(part, &self.shared);
        }
        merged
    }

    /// Decode → dead letters → dedup → pre-aggregate per partition (applies nothing yet).
    pub fn fold(&self, messages: &[KafkaMessage]) -> FoldedBatch {
        let shared = &self.shared;
        let acceptance = shared.config.acceptance();
        let mut outcome = BatchOutcome::default();
        let mut dead_letters = Vec::new();
        // Every message's events, flattened; `owner[i]` is the message of event i.
        let mut raws: Vec<&str> = Vec::with_capacity(messages.len());
        let mut owner: Vec<usize> = Vec::with_capacity(messages.len());
        // Forwarded OTLP usage: (message, dedup key, updates) per point.
        let mut forwarded: Vec<(usize, crate::ingest::otlp::forward::PointUpdates)> = Vec::new();
        for (position, message) in messages.iter().enumerate() {
            if message.forwarded {
                let payload = message.payload.as_deref().unwrap_or_default();
                let decoded = crate::ingest::otlp::forward::ForwardedUsage::decode(payload)
                    .map_err(|error| format!("forwarded usage does not decode: {error}"))
                    .and_then(|usage| usage.intern(&shared.names, &shared.meters));
                match decoded {
                    Ok(points) => forwarded.extend(points.into_iter().map(|point| (position, point))),
                    Err(error) => {
                        outcome.invalid += 1;
                        dead_letters.push(dead_letter_of(message, None, payload, "invalid", error));
                    }
                }
                continue;
            }
            let Some(payload) = message.payload.as_deref() else {
                outcome.invalid += 1;
                dead_letters.push(dead_letter_of(
                    message,
                    None,
                    b"",
                    "invalid",
                    "message has no payload".into(),
                ));
                continue;
            };
            // The usual message is one event object: decoding it validates it, so it skips
            // the separate validating scan `split_body` makes (arrays still go through it).
            let single = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            if let (true, Ok(text)) = (single, std::str::from_utf8(payload)) {
                owner.push(position);
                raws.push(text);
                continue;
            }
            match decode::split_body(payload, BodyKind::Either) {
                Ok(events) => {
                    owner.extend(std::iter::repeat_n(position, events.len()));
                    raws.extend(events.into_iter().map(RawValue::get));
                }
                Err(error) => {
                    outcome.invalid += 1;
                    dead_letters.push(dead_letter_of(
                        message,
                        None,
                        payload,
                        "invalid",
                        format!("{}: {}", error.field, error.reason),
                    ));
                }
            }
        }
        let (decoded, errors) = decode::decode_each(&raws, &shared.meters, &shared.names, acceptance, |i| {
            let message = &messages[owner[i]];
            EventContext {
                now_ms: message.timestamp_ms,
                id: message.header_id.as_deref(),
            }
        });
        // Every problem of one event in one dead letter.
        let mut errors = errors.into_iter().peekable();
        while let Some(first) = errors.next() {
            let index = first.index.unwrap_or(0);
            let mut text = format!("{}: {}", first.field, first.reason);
            while let Some(next) = errors.next_if(|e| e.index == first.index) {
                text.push_str(&format!("; {}: {}", next.field, next.reason));
            }
            outcome.invalid += 1;
            let message = &messages[owner[index]];
            let event_index = index - owner.partition_point(|m| *m < owner[index]);
            dead_letters.push(dead_letter_of(
                message,
                Some(event_index),
                raws[index].as_bytes(),
                "invalid",
                text,
            ));
        }
        for refusal in &decoded.refused {
            let message = &messages[owner[refusal.index]];
            let event_index = refusal.index - owner.partition_point(|m| *m < owner[refusal.index]);
            outcome.refused.push(refusal.reason.as_str());
            dead_letters.push(dead_letter_of(
                message,
                Some(event_index),
                raws[refusal.index].as_bytes(),
                refusal.reason.as_str(),
                refusal.message.clone(),
            ));
        }
        outcome.unmetered = decoded.unmetered;

        // Dedup exactly as HTTP ingest does (`DedupIndex::claim`); forwarded points with a key
        // after the events.
        let keys: Vec<u128> = decoded
            .metered
            .iter()
            .map(|event| event.dedup_key)
            .chain(forwarded.iter().filter_map(|(_, (key, _))| *key))
            .collect();
        let now_secs = now_ms().div_euclid(1000);
        let fresh = loop {
            match shared
                .dedup
                .claim(&shared.store, &keys, now_secs, shared.config.dedup_horizon_secs)
            {
                Ok(fresh) => break fresh,
                Err(error) => {
                    // Without the store we cannot tell duplicates apart: wait, never guess.
                    tracing::error!(%error, "dedup lookup failed; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        // Per partition: its pre-aggregated batch and the dedup keys of the events in it.
        let mut parts: FxHashMap<(Arc<str>, i32), (PreAggregated, Vec<u128>)> = FxHashMap::default();
        let mut fresh = fresh.into_iter();
        let mut forwarded_duplicates = 0;
        for (event, fresh) in decoded.metered.iter().zip(fresh.by_ref()) {
            if !fresh {
                continue;
            }
            outcome.accepted += 1;
            let message = &messages[owner[event.index]];
            let (batch, fresh_keys) = parts
                .entry((message.topic.clone(), message.partition))
                .or_insert_with(|| (PreAggregated::with_capacity(64), Vec::new()));
            fresh_keys.push(event.dedup_key);
            outcome.late += usize::from(event.late);
            if let Err(error) = event.fold_into(batch) {
                // An i128 overflow (totals beyond 10^38 units): unreachable with real usage;
                // logged loudly and readiness dropped rather than crashing the partition.
                tracing::error!(%error, index = event.index, "aggregate overflow in a Kafka batch");
                shared.ready.store(false, Ordering::Release);
            }
        }
        outcome.duplicates = decoded.metered.len() - outcome.accepted;
        for (position, (key, updates)) in forwarded {
            if key.is_some() && fresh.next() != Some(true) {
                forwarded_duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            let message = &messages[position];
            let (batch, fresh_keys) = parts
                .entry((message.topic.clone(), message.partition))
                .or_insert_with(|| (PreAggregated::with_capacity(64), Vec::new()));
            fresh_keys.extend(key);
            for (series, state) in &updates {
                if let Err(error) = batch.merge_state(*series, state) {
                    tracing::error!(%error, "aggregate overflow in forwarded usage");
                    shared.ready.store(false, Ordering::Release);
                }
            }
        }
        outcome.duplicates += forwarded_duplicates;

        // Every partition in the batch advances (also those whose messages counted nothing).
        let mut next: FxHashMap<(Arc<str>, i32), u64> = FxHashMap::default();
        let mut first: FxHashMap<(Arc<str>, i32), i64> = FxHashMap::default();
        for message in messages {
            let key = (message.topic.clone(), message.partition);
            let offset = next.entry(key.clone()).or_default();
            *offset = (*offset).max(message.offset as u64 + 1);
            let lowest = first.entry(key).or_insert(i64::MAX);
            *lowest = (*lowest).min(message.offset);
        }
        FoldedBatch {
            dead_letters,
            parts,
            next,
            first,
            outcome,
            messages: messages.len(),
        }
    }

    /// Folds a batch into the partitions' engine writers with their next offsets.
    pub fn apply(&mut self, mut folded: FoldedBatch) {
        for ((topic, partition), next) in std::mem::take(&mut folded.next) {
            let (mut batch, mut keys) = folded
                .parts
                .remove(&(topic.clone(), partition))
                .unwrap_or_default();
            let writer = self.writer_for(&topic, partition);
            let position = [(position_name(&topic, partition), next)];
            if let Err(error) = writer.commit(&mut batch, &mut keys, position) {
                tracing::error!(%error, "aggregate overflow applying a Kafka batch");
                self.shared.ready.store(false, Ordering::Release);
            }
        }
        record(&folded.outcome, folded.messages);
    }

    fn writer_for(&mut self, topic: &Arc<str>, partition: i32) -> &Writer {
        let (shared, replicated) = (&self.shared, self.replicated);
        self.writers.entry((topic.clone(), partition)).or_insert_with(|| {
            let source = position_name(topic, partition);
            if replicated {
                shared.engine.tagged_writer(source)
            } else {
                shared.engine.writer()
            }
        })
    }
}

fn dead_letter_of(
    message: &KafkaMessage,
    index: Option<usize>,
    value: &[u8],
    reason: &'static str,
    error: String,
) -> DeadLetter {
    DeadLetter {
        key: message.key.clone(),
        value: if value.is_empty() {
            message.payload.clone().unwrap_or_default()
        } else {
            value.to_vec()
        },
        reason,
        error,
        topic: message.topic.clone(),
        partition: message.partition,
        offset: message.offset,
        index,
    }
}

fn record(outcome: &BatchOutcome, messages: usize) {
    let count = |what: &'static str, n: usize| {
        if n > 0 {
            metrics::counter!(telemetry::INGEST_EVENTS, "source" => SOURCE, "outcome" => what)
                .increment(n as u64);
        }
    };
    metrics::counter!(telemetry::KAFKA_MESSAGES).increment(messages as u64);
    count("accepted", outcome.accepted + outcome.unmetered);
    count("duplicate", outcome.duplicates);
    count("invalid", outcome.invalid);
    count("refused", outcome.refused.len());
    for reason in &outcome.refused {
        metrics::counter!(telemetry::INGEST_REFUSED, "source" => SOURCE, "reason" => *reason).increment(1);
    }
    if outcome.invalid > 0 {
        metrics::counter!(telemetry::INGEST_REFUSED, "source" => SOURCE, "reason" => "invalid")
            .increment(outcome.invalid as u64);
    }
    if outcome.unmetered > 0 {
        metrics::counter!(telemetry::INGEST_UNMETERED, "source" => SOURCE)
            .increment(outcome.unmetered as u64);
    }
    if outcome.late > 0 {
        metrics::counter!(telemetry::INGEST_LATE, "source" => SOURCE).increment(outcome.late as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pipeline::Stages;

    fn messages() -> Vec<KafkaMessage> {
        let topic: Arc<str> = "usage".into();
        let now = now_ms();
        let time = crate::model::rfc3339_ms(now - 1_000);
        (0..3_000i64)
            .map(|i| {
                // Every 7th message repeats an earlier id; every 500th is not JSON.
                let id = if i % 7 == 6 { i / 2 } else { i };
                let payload = if i % 500 == 499 {
                    b"{oops".to_vec()
                } else {
                    format!(
                        r#"{{"specversion":"1.0","id":"e{id}","source":"t","type":"llm.prompt","subject":"tenant-{}","time":"{time}","data":{{"tokens":{},"model":"m{}"}}}}"#,
                        id % 13,
                        id % 101 + 1,
                        id % 3
                    )
                    .into_bytes()
                };
                KafkaMessage {
                    topic: topic.clone(),
                    // Keyed by tenant, as the topic must be: a retry lands on its original's partition.
                    partition: (id % 13 % 3) as i32,
                    offset: i,
                    timestamp_ms: now,
                    key: None,
                    payload: Some(payload),
                    header_id: None,
                    forwarded: false,
                }
            })
            .collect()
    }

    /// The split into threads changes nothing: same counts, offsets, dead letters and states.
    #[test]
    fn parallel_folding_equals_sequential_folding() {
        let batch = messages();
        let mut results = Vec::new();
        for threads in [1, 3] {
            let dir = tempfile::tempdir().unwrap();
            let stages = Stages::for_tests(dir.path(), 1000);
            let folder = Folder::new(stages.shared.clone(), false);
            let folded = folder.fold_parallel(&batch, threads);
            // Series by name, not by interned id: threads intern tenants in racing order.
            let names = &stages.shared.names;
            let mut states: Vec<(String, Vec<u8>)> = folded
                .parts
                .iter()
                .flat_map(|((_, partition), (part, _))| {
                    part.series.iter().map(move |(key, state)| {
                        let name = format!(
                            "p{partition} {} {} {:?} {}",
                            names.meters.resolve(key.meter),
                            names.tenants.resolve(key.tenant),
                            names.dims.resolve(key.dims),
                            key.window_start
                        );
                        (name, state.encode())
                    })
                })
                .collect();
            states.sort();
            let mut keys: Vec<u128> = folded.parts.values().flat_map(|(_, keys)| keys.clone()).collect();
            keys.sort_unstable();
            let mut next: Vec<_> = folded.next.iter().map(|(k, v)| (k.1, *v)).collect();
            next.sort_unstable();
            let o = &folded.outcome;
            results.push((
                (
                    o.accepted,
                    o.duplicates,
                    o.invalid,
                    folded.dead_letters.len(),
                    folded.messages,
                ),
                next,
                keys,
                states,
            ));
            drop(folder);
            assert!(stages.drain());
        }
        // Independent count: distinct ids among the JSON messages are accepted, the rest are
        // duplicates; the 6 non-JSON messages are invalid and dead-lettered.
        let ids: Vec<i64> = (0..3_000i64)
            .filter(|i| i % 500 != 499)
            .map(|i| if i % 7 == 6 { i / 2 } else { i })
            .collect();
        let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(results[0].0, (distinct, ids.len() - distinct, 6, 6, 3_000));
        let (sequential, parallel) = (&results[0], &results[1]);
        assert_eq!(sequential.0, parallel.0, "counts");
        assert_eq!(sequential.1, parallel.1, "next offsets");
        assert_eq!(sequential.2, parallel.2, "dedup keys");
        let differing: Vec<_> = sequential
            .3
            .iter()
            .zip(&parallel.3)
            .filter(|(a, b)| a != b)
            .take(3)
            .collect();
        assert_eq!(sequential.3.len(), parallel.3.len(), "series count");
        assert!(differing.is_empty(), "series states differ: {differing:?}");
    }
}
