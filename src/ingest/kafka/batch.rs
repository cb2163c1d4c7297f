//! One Kafka batch, from copied messages to engine writers, without touching Kafka: decode (per
//! event, replay-stable: lateness against the message timestamp) → dead letters for what is
//! invalid or refused → dedup (reserve, then the store) → pre-aggregate per partition → apply
//! to the partition's writer together with its next offset. The consumer delivers the dead
//! letters between `fold` and `apply`; benchmarks drive `Folder` directly.

use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use super::dead_letter::DeadLetter;
use super::SOURCE;
use crate::aggregate::{MergeError, PreAggregated, Writer};
use crate::cluster::forward::{ForwardedUnit, ForwardedUsage};
use crate::ingest::admission::{claim_and_fold, Countable, FoldError, Limited, RefusalReason, Tally};
use crate::ingest::decode::{self, BodyKind, EventContext};
use crate::kafka::position_name;
use crate::model::now_ms;
use crate::state::dedup::Ticket;
use crate::state::limits::{Contributes, Holds};
use crate::state::Shared;
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
    /// Forwarded OTLP usage (`cluster::forward`), not CloudEvents.
    pub forwarded: bool,
    /// Forwarded usage's `tallyd-signature` header: HMAC-SHA256 of the payload with the
    /// cluster secret (anything else is not from a replica and is dead-lettered).
    pub signature: Option<Vec<u8>>,
}

/// A folded batch waiting for its dead letters to be delivered.
pub struct FoldedBatch {
    pub dead_letters: Vec<DeadLetter>,
    parts: FxHashMap<(Arc<str>, i32), (PreAggregated, Vec<u128>)>,
    pub next: FxHashMap<(Arc<str>, i32), u64>,
    pub first: FxHashMap<(Arc<str>, i32), i64>,
    /// What the batch adds to the ingest metrics.
    pub outcome: Tally,
    messages: usize,
    /// The claim on the parts' dedup keys, one for every share of the batch (a key in two
    /// shares is a duplicate within the batch, not a request to wait for): closed when the
    /// batch is dropped, after `apply`.
    ticket: Option<Ticket>,
    /// What its units hold of quotas until `apply` (and charged to rate keys).
    holds: Holds,
}

impl FoldedBatch {
    /// The dedup keys the batch claimed (owned until applied, or released).
    pub fn dedup_keys(&self) -> impl Iterator<Item = u128> + '_ {
        self.parts.values().flat_map(|(_, keys)| keys.iter().copied())
    }

    /// Adds another share of the same batch.
    fn absorb(&mut self, other: FoldedBatch, shared: &Shared) {
        self.dead_letters.extend(other.dead_letters);
        for (key, (batch, keys)) in other.parts {
            let (into, into_keys) = self.parts.entry(key).or_default();
            for (series, state) in &batch.series {
                if let Err(error) = into.merge_state(*series, state) {
                    shared.engine_failed(&format!("cannot merge a Kafka batch's shares: {error}"));
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
        self.outcome.absorb(other.outcome);
        self.messages += other.messages;
        self.holds.extend(other.holds);
    }
}

/// A unit of a Kafka batch (an event, or a forwarded point) in its partition's group.
struct InPartition<'a> {
    group: usize,
    unit: &'a dyn Countable,
    /// Its message's timestamp (unix ms; rate limits charge the unit then).
    logged_ms: i64,
}

impl Contributes for InPartition<'_> {
    fn contributions(&self, each: &mut dyn FnMut(crate::model::SeriesKey, i128)) {
        self.unit.contributions(each);
    }

    fn logged_ms(&self) -> Option<i64> {
        Some(self.logged_ms)
    }
}

impl Countable for InPartition<'_> {
    fn dedup_key(&self) -> Option<u128> {
        self.unit.dedup_key()
    }

    fn is_late(&self) -> bool {
        self.unit.is_late()
    }

    fn fold_into(&self, batch: &mut PreAggregated) -> Result<(), MergeError> {
        self.unit.fold_into(batch)
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
    /// thread was the bottleneck with the checkpoint thread half idle (BENCHMARKS.md, "Kafka pipeline").
    pub fn fold_parallel(&self, messages: &[KafkaMessage], threads: usize) -> FoldedBatch {
        let threads = threads.clamp(1, 8);
        if threads == 1 || messages.len() < 2 * 256 {
            return self.fold(messages);
        }
        let share = messages.len().div_ceil(threads);
        let ticket = self.shared.dedup.ticket();
        let mut folded = std::thread::scope(|scope| {
            let ticket = &ticket;
            let handles: Vec<_> = messages
                .chunks(share)
                .map(|chunk| scope.spawn(move || self.fold_under(chunk, ticket)))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("invariant: folding does not panic"))
                .collect::<Vec<_>>()
        })
        .into_iter();
        let mut merged = folded.next().unwrap_or_else(|| self.fold_under(&[], &ticket));
        for part in folded {
            merged.absorb(part, &self.shared);
        }
        merged.ticket = Some(ticket);
        merged
    }

    /// Decode → dead letters → dedup → pre-aggregate per partition (applies nothing yet).
    pub fn fold(&self, messages: &[KafkaMessage]) -> FoldedBatch {
        let ticket = self.shared.dedup.ticket();
        let mut folded = self.fold_under(messages, &ticket);
        folded.ticket = Some(ticket);
        folded
    }

    /// `fold` claiming under `ticket`.
    fn fold_under(&self, messages: &[KafkaMessage], ticket: &Ticket) -> FoldedBatch {
        let shared = &self.shared;
        let acceptance = shared.acceptance();
        let mut outcome = Tally::default();
        let mut dead_letters = Vec::new();
        // Every message's events, flattened; `owner[i]` is the message of event i.
        let mut raws: Vec<&str> = Vec::with_capacity(messages.len());
        let mut owner: Vec<usize> = Vec::with_capacity(messages.len());
        // Forwarded OTLP usage: (message, point) per point.
        let mut forwarded: Vec<(usize, ForwardedUnit)> = Vec::new();
        for (position, message) in messages.iter().enumerate() {
            if message.forwarded {
                let payload = message.payload.as_deref().unwrap_or_default();
                // Only replicas forward usage: it must carry the cluster's signature, or a
                // producer could inject raw aggregate states and other tenants' dedup keys.
                let authentic = match &shared.config.cluster {
                    Some(cluster) => message.signature.as_deref().is_some_and(|signature| {
                        crate::cluster::forward::verify(cluster.secret.as_bytes(), payload, signature)
                    }),
                    None => false,
                };
                let decoded = if authentic {
                    ForwardedUsage::decode(payload)
                        .map_err(|error| format!("forwarded usage does not decode: {error}"))
                        .and_then(|usage| {
                            usage
                                .intern(&shared.names, &shared.meters)
                                .map_err(|error| error.to_string())
                        })
                } else {
                    Err(
                        "forwarded usage without a valid cluster signature (only replicas in cluster mode \
                         forward usage; refused)"
                            .to_string(),
                    )
                };
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
                // The topic's producers are trusted (broker ACLs decide who may write).
                tenant: None,
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
            dead_letters.push(self.event_dead_letter(messages, &owner, &raws, index, "invalid", text));
        }
        for refusal in &decoded.refused {
            outcome.refuse(refusal.reason);
            dead_letters.push(self.event_dead_letter(
                messages,
                &owner,
                &raws,
                refusal.index,
                refusal.reason.as_str(),
                refusal.message.clone(),
            ));
        }
        outcome.unmetered = decoded.unmetered;

        // Claim and pre-aggregate exactly as the push edges do, one group per partition;
        // forwarded points with a key after the events.
        let mut partitions: Vec<(Arc<str>, i32)> = Vec::new();
        let mut group_of_message: Vec<usize> = Vec::with_capacity(messages.len());
        for message in messages {
            let key = (message.topic.clone(), message.partition);
            let group = match partitions.iter().position(|known| *known == key) {
                Some(group) => group,
                None => {
                    partitions.push(key);
                    partitions.len() - 1
                }
            };
            group_of_message.push(group);
        }
        let units: Vec<InPartition<'_>> = decoded
            .metered
            .iter()
            .map(|event| InPartition {
                group: group_of_message[owner[event.index]],
                unit: event as &dyn Countable,
                logged_ms: messages[owner[event.index]].timestamp_ms,
            })
            .chain(forwarded.iter().map(|(position, point)| InPartition {
                group: group_of_message[*position],
                unit: point as &dyn Countable,
                logged_ms: messages[*position].timestamp_ms,
            }))
            .collect();
        let now = now_ms();
        let claimed = loop {
            // Rate limits cannot refuse what the log already holds: they are charged and
            // signalled (in cluster mode edges refuse by what the owners signal).
            let claimed = claim_and_fold(
                shared,
                ticket,
                now,
                &units,
                partitions.len(),
                |i| units[i].group,
                Limited::Log,
            );
            match claimed {
                Ok(claimed) => break claimed,
                Err(FoldError::Rate(_)) => unreachable!("invariant: Kafka batches are not rate limited"),
                Err(error) => {
                    // Without the store we cannot tell duplicates apart: wait, never guess.
                    tracing::error!(%error, "dedup lookup failed; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        outcome.accepted = claimed.accepted;
        outcome.duplicates = claimed.duplicates;
        outcome.late = claimed.late;
        let refusals = claimed
            .overflowed
            .iter()
            .map(|&index| {
                (
                    index,
                    RefusalReason::Overflow,
                    "its usage overflows the series (totals are exact up to 38 digits)".to_string(),
                )
            })
            .chain(
                claimed
                    .over_quota
                    .iter()
                    .map(|(index, message)| (*index, RefusalReason::QuotaExceeded, message.clone())),
            );
        for (index, reason, message) in refusals {
            outcome.refuse(reason);
            match decoded.metered.get(index) {
                Some(event) => dead_letters.push(self.event_dead_letter(
                    messages,
                    &owner,
                    &raws,
                    event.index,
                    reason.as_str(),
                    message,
                )),
                None => {
                    let (position, _) = &forwarded[index - decoded.metered.len()];
                    let message_bytes = messages[*position].payload.as_deref().unwrap_or_default();
                    dead_letters.push(dead_letter_of(
                        &messages[*position],
                        None,
                        message_bytes,
                        reason.as_str(),
                        message,
                    ));
                }
            }
        }
        let holds = claimed.holds;
        let parts = partitions.into_iter().zip(claimed.groups).collect();

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
            ticket: None,
            holds,
        }
    }

    /// The dead letter of event `index` of the flattened batch.
    fn event_dead_letter(
        &self,
        messages: &[KafkaMessage],
        owner: &[usize],
        raws: &[&str],
        index: usize,
        reason: &'static str,
        error: String,
    ) -> DeadLetter {
        let message = &messages[owner[index]];
        // The event's position inside its message (arrays carry several).
        let event_index = index - owner.partition_point(|m| *m < owner[index]);
        dead_letter_of(message, Some(event_index), raws[index].as_bytes(), reason, error)
    }

    /// Folds a batch into the partitions' engine writers with their next offsets.
    pub fn apply(&mut self, mut folded: FoldedBatch) {
        let shared = self.shared.clone();
        // With limits, the decision ends as the batch lands (its units were taken when
        // decided; within a minute of a reload the batch's usage replaces its holds), and no
        // period's total is read while a partition's batch is between the two.
        let applying = shared.limits.is_active().then(|| shared.limits.applying());
        // Applied: what the batch charged to rate keys stays charged.
        let mut holds = std::mem::take(&mut folded.holds.quotas);
        for ((topic, partition), next) in std::mem::take(&mut folded.next) {
            let (mut batch, mut keys) = folded
                .parts
                .remove(&(topic.clone(), partition))
                .unwrap_or_default();
            if applying.is_some() {
                // Every unit of the batch was decided (events and forwarded points: no
                // cumulative state), so its holds, given with the first part, say it all.
                shared
                    .limits
                    .lock()
                    .applied(&batch, &std::mem::take(&mut holds), true);
            }
            let writer = self.writer_for(&topic, partition);
            let position = [(position_name(&topic, partition), next)];
            if let Err(error) = writer.commit(&mut batch, &mut keys, position) {
                // Applied in part: no later checkpoint may store this partition's offsets, and
                // the daemon stops so that the partition replays from its last checkpoint.
                self.shared
                    .engine_failed(&format!("cannot apply a Kafka batch: {error}"));
            }
        }
        drop(applying);
        shared.limits.release_quotas(&holds);
        metrics::counter!(telemetry::KAFKA_MESSAGES).increment(folded.messages as u64);
        folded.outcome.record(SOURCE);
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
                    signature: None,
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

    /// Forwarded usage is taken only from a replica: signed with the cluster secret. Unsigned,
    /// wrongly signed, or arriving at a replica not in cluster mode, it is dead-lettered; and a
    /// signed record whose state is malformed (an empty HyperLogLog sketch, which once aborted
    /// the process inside RocksDB's merge) is refused at decoding.
    #[test]
    fn forwarded_usage_needs_the_cluster_signature_and_valid_states() {
        use crate::cluster::forward::{sign, ForwardedPoint, ForwardedUpdate, ForwardedUsage};
        const SECRET: &str = "test-cluster-secret-0123456789abcdef";
        let usage = |count: u64| ForwardedUsage {
            tenant: "acme".into(),
            points: vec![ForwardedPoint {
                dedup_key: Some(u128::from(count)),
                updates: vec![ForwardedUpdate {
                    meter: "api_calls".into(),
                    window_start: now_ms().div_euclid(60_000) * 60,
                    dims: vec![("method".into(), "GET".into()), ("route".into(), "/".into())],
                    state: crate::aggregate::AggState::Count(count),
                }],
            }],
        };
        let message = |offset: i64, payload: Vec<u8>, signature: Option<String>| KafkaMessage {
            topic: "usage".into(),
            partition: 0,
            offset,
            timestamp_ms: now_ms(),
            key: Some(b"acme".to_vec()),
            payload: Some(payload),
            header_id: None,
            forwarded: true,
            signature: signature.map(String::into_bytes),
        };
        let signed = usage(3).encode();
        let forged = usage(4).encode();
        // The state is the record's last field: Count(7) is [1, 7]; [5, 1, 0] is Unique(Sketch
        // with no registers).
        let mut malformed = usage(7).encode();
        assert_eq!(malformed[malformed.len() - 2..], [1, 7]);
        malformed.truncate(malformed.len() - 2);
        malformed.extend([5, 1, 0]);
        let batch = vec![
            message(0, signed.clone(), Some(sign(SECRET.as_bytes(), &signed))),
            message(1, forged.clone(), None),
            message(
                2,
                forged.clone(),
                Some(sign(b"another-secret-0123456789abcdef", &forged)),
            ),
            message(3, malformed.clone(), Some(sign(SECRET.as_bytes(), &malformed))),
        ];
        let dir = tempfile::tempdir().unwrap();
        let stages = Stages::for_tests_with(dir.path(), 3_600_000, |config| {
            config.cluster = Some(crate::config::ClusterConfig {
                advertise_url: None,
                members_topic: "m".into(),
                ingest_topic: "usage".into(),
                secret: SECRET.into(),
            });
        });
        let folded = Folder::new(stages.shared.clone(), false).fold(&batch);
        assert_eq!((folded.outcome.accepted, folded.outcome.invalid), (1, 3));
        let offsets: Vec<i64> = folded.dead_letters.iter().map(|letter| letter.offset).collect();
        assert_eq!(offsets, [1, 2, 3]);
        assert!(
            folded.dead_letters[0].error.contains("signature"),
            "{}",
            folded.dead_letters[0].error
        );
        assert!(
            folded.dead_letters[2].error.contains("malformed"),
            "{}",
            folded.dead_letters[2].error
        );
        let counted: Vec<u64> = folded
            .parts
            .values()
            .flat_map(|(part, _)| part.series.values())
            .map(|state| match state {
                crate::aggregate::AggState::Count(count) => *count,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(counted, [3]);
        drop(folded);
        assert!(stages.drain());

        // A replica not in cluster mode takes no forwarded usage, signed or not.
        let dir = tempfile::tempdir().unwrap();
        let stages = Stages::for_tests(dir.path(), 3_600_000);
        let folded = Folder::new(stages.shared.clone(), false).fold(&batch[..1]);
        assert_eq!((folded.outcome.accepted, folded.outcome.invalid), (0, 1));
        drop(folded);
        assert!(stages.drain());
    }
}
