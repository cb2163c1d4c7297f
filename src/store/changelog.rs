//! The changelog: what lets a Kafka partition's state survive its owner (Kafka Streams' model).
//!
//! Every checkpoint that contains usage from a replicated partition first publishes, for that
//! partition, one *flush*: the absolute state (and window-record revision) of every series the
//! partition changed, the dedup keys it added, and the input offset all of that reflects. Only
//! when the broker has acknowledged the flush is the local checkpoint committed, so the
//! changelog is never behind any replica's store. A flush may span several messages (chunks);
//! a restore applies flushes in log order and only complete ones, so a flush cut short by a
//! crash is ignored and its input is replayed from the previous flush's offset.
//!
//! Restore (on assignment, when the changelog is ahead of the local store): absolute states
//! overwrite the local series (their merge operands), revisions and dedup keys are copied, open
//! windows are re-indexed for closing, and the partition's position becomes the last flush's.
//!
//! Compaction (Kafka's log compaction done by the owner, because it must stay atomic without
//! broker transactions): now and then the owner folds the complete flushes since the last base
//! into a new *base* flush (latest state per series, live dedup keys with their own first-seen
//! times, the newest position) and publishes it like any flush. Every chunk carries
//! `restore_from`, the changelog offset a restore may start at: the first offset after what the
//! newest complete base folded. A restore reads from the newest message's `restore_from`,
//! applies the newest complete base, then the complete flushes after what that base folded
//! (`restore_plan`). Everything older may be deleted by the topic's time retention, which must
//! exceed the compaction interval (ARCHITECTURE.md).
//!
//! Emission and rating state travels too (format v2): every key a checkpoint writes for the
//! partition's tenants' window records and rated records — `W` close index (a window closed
//! by the owner is not closed again by the next), `R` revisions, `Q` rated windows,
//! `L` period ledgers, `C` tenant periods, `T` settlement index — goes into the partition's
//! flush as it is written (`StateEntry`; a flush of only such entries when the partition had no
//! new usage, e.g. a window closing by time), so the next owner continues the revisions and
//! the ledgers exactly where this one stopped.
//!
//! And the records themselves (format v3): every outbox line the checkpoint writes for those
//! tenants goes in as an `E` entry (tenant, writer, outbox sequence → line). A flush is
//! published before its checkpoint commits, so the newest flush's lines may never have reached
//! the writer's outbox (it died in between). A restore writes the newest applied flush's lines
//! as `E` keys in its own batch, and the next checkpoint moves them into this replica's outbox:
//! identical `(record_id, revision)` lines, at worst a duplicate for an upserting consumer,
//! never a record missing until the window's next amendment. Folding keeps the newest flush's
//! lines only.
//!
//! Fences (format v4): Kafka hands a partition to a new owner without waiting for the old one
//! to hear of it (a zombie that has not yet polled its revocation keeps checkpointing), and
//! without broker transactions nothing stops the zombie's flushes from landing after the new
//! owner restored. So a writer that takes a source first publishes a *fence* (a chunk-less
//! message), restores everything before it, and stamps every chunk it writes afterwards with
//! the fence's offset, its `epoch`. A chunk is stale when another fence lies between its epoch
//! and its own offset (`is_stale`): restores and compactions leave it out. A writer learns it
//! was deposed when it sees a newer fence among the offsets between its own chunks
//! (`deposed_by`); it then emits nothing more for the source (the records its deposed flush
//! carried would repeat a revision with other contents).
//!
//! Limits: absolute states are per series, so a series must be fed by one partition (the topic
//! is keyed by tenant).

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use super::keys;
use super::{MeterCatalog, RocksStore, StoreError};

/// Message payloads stay well under Kafka's default 1 MB `message.max.bytes`.
const MAX_CHUNK_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesEntry {
    /// Series key suffix (meter, tenant, window, dims), as in the store's `A` keys.
    pub suffix: Vec<u8>,
    /// Absolute `AggState`, encoded.
    pub state: Vec<u8>,
    /// Last window-record revision emitted for the series (0: none yet).
    pub revision: u32,
}

/// One emission or rating key as a checkpoint wrote it (`value` None: deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The key kinds a `StateEntry` may carry: a restore writes nothing else.
pub const STATE_KINDS: [u8; 6] = [
    keys::OPEN_WINDOW,
    keys::REVISION,
    keys::RATED,
    keys::LEDGER,
    keys::TENANT_PERIOD,
    keys::PERIOD_CLOSE,
];

/// One message of the changelog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangelogChunk {
    /// The replicated source, e.g. `kafka/usage/3`.
    pub source: String,
    /// Unique per flush attempt (a retried or replayed flush gets a new id): the writing
    /// store's id in the high 32 bits, random low bits (`flush_id`).
    pub flush_id: u64,
    pub chunk: u32,
    pub chunks: u32,
    /// The source's next input offset once this flush is applied.
    pub position: u64,
    /// First-seen time of `dedup_keys`, unix seconds.
    pub seen_secs: i64,
    pub series: Vec<SeriesEntry>,
    pub dedup_keys: Vec<u128>,
    /// A base folds every complete flush up to changelog offset `folded_through`.
    pub base: bool,
    pub folded_through: i64,
    /// Bases: dedup keys with their own first-seen time (unix seconds).
    pub dedup_seen: Vec<(u128, i64)>,
    /// Where a restore of this source may start reading (set when published; 0: the log start).
    pub restore_from: u64,
    /// Emission and rating keys of the partition's tenants (v2; v1 chunks have none).
    pub state: Vec<StateEntry>,
    /// The changelog offset of the fence its writer published when it took the source (v4;
    /// -1: unfenced, written before fences existed). See "Fences" above.
    pub epoch: i64,
}

/// Versions 2 and 3 of `ChangelogChunk` (before `epoch`), still read.
#[derive(Deserialize)]
struct ChangelogChunkV3 {
    source: String,
    flush_id: u64,
    chunk: u32,
    chunks: u32,
    position: u64,
    seen_secs: i64,
    series: Vec<SeriesEntry>,
    dedup_keys: Vec<u128>,
    base: bool,
    folded_through: i64,
    dedup_seen: Vec<(u128, i64)>,
    restore_from: u64,
    state: Vec<StateEntry>,
}

/// Version 1 of `ChangelogChunk` (before `state`), still read.
#[derive(Deserialize)]
struct ChangelogChunkV1 {
    source: String,
    flush_id: u64,
    chunk: u32,
    chunks: u32,
    position: u64,
    seen_secs: i64,
    series: Vec<SeriesEntry>,
    dedup_keys: Vec<u128>,
    base: bool,
    folded_through: i64,
    dedup_seen: Vec<(u128, i64)>,
    restore_from: u64,
}

impl ChangelogChunk {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: changelog chunks serialize")
    }

    /// A chunk of this build's version (`format::version("changelog_chunk")`).
    pub fn decode(bytes: &[u8]) -> Result<ChangelogChunk, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// A chunk written at `version` (the message's `tallyd-format` header).
    pub fn decode_version(bytes: &[u8], version: u8) -> Result<ChangelogChunk, postcard::Error> {
        if version >= 4 {
            return ChangelogChunk::decode(bytes);
        }
        if version >= 2 {
            let v3: ChangelogChunkV3 = postcard::from_bytes(bytes)?;
            return Ok(ChangelogChunk {
                source: v3.source,
                flush_id: v3.flush_id,
                chunk: v3.chunk,
                chunks: v3.chunks,
                position: v3.position,
                seen_secs: v3.seen_secs,
                series: v3.series,
                dedup_keys: v3.dedup_keys,
                base: v3.base,
                folded_through: v3.folded_through,
                dedup_seen: v3.dedup_seen,
                restore_from: v3.restore_from,
                state: v3.state,
                epoch: -1,
            });
        }
        let v1: ChangelogChunkV1 = postcard::from_bytes(bytes)?;
        Ok(ChangelogChunk {
            source: v1.source,
            flush_id: v1.flush_id,
            chunk: v1.chunk,
            chunks: v1.chunks,
            position: v1.position,
            seen_secs: v1.seen_secs,
            series: v1.series,
            dedup_keys: v1.dedup_keys,
            base: v1.base,
            folded_through: v1.folded_through,
            dedup_seen: v1.dedup_seen,
            restore_from: v1.restore_from,
            state: Vec::new(),
            epoch: -1,
        })
    }

    /// The fence a writer publishes when it takes `source` (a message with no chunks: never
    /// part of a flush). `restore_from` as on flushes, 0 when the writer does not know it yet.
    pub fn fence(source: &str, writer: u32, restore_from: u64) -> ChangelogChunk {
        ChangelogChunk {
            source: source.to_string(),
            flush_id: flush_id(writer),
            chunk: 0,
            chunks: 0,
            position: 0,
            seen_secs: 0,
            series: Vec::new(),
            dedup_keys: Vec::new(),
            base: false,
            folded_through: -1,
            dedup_seen: Vec::new(),
            restore_from,
            state: Vec::new(),
            epoch: -1,
        }
    }

    pub fn is_fence(&self) -> bool {
        self.chunks == 0
    }

    pub fn is_last(&self) -> bool {
        self.chunk + 1 == self.chunks
    }

    /// The id of the store that wrote this chunk (`RocksStore::writer`).
    pub fn writer(&self) -> u32 {
        (self.flush_id >> 32) as u32
    }
}

/// A new flush id for a flush `writer` publishes. The writer lets a restore tell a flush this
/// store published but crashed before committing locally (it replays that input itself) from
/// one another replica wrote (its state must be restored).
pub fn flush_id(writer: u32) -> u64 {
    (u64::from(writer) << 32) | u64::from(rand::random::<u32>())
}

/// Splits one source's flush into chunks that fit a Kafka message.
pub fn chunk_flush(
    source: &str,
    flush_id: u64,
    position: u64,
    seen_secs: i64,
    series: Vec<SeriesEntry>,
    dedup_keys: Vec<u128>,
) -> Vec<ChangelogChunk> {
    chunk_flush_with_state(
        source,
        flush_id,
        position,
        seen_secs,
        series,
        dedup_keys,
        Vec::new(),
    )
}

/// `chunk_flush` with the emission and rating keys the checkpoint wrote for the source's tenants.
pub fn chunk_flush_with_state(
    source: &str,
    flush_id: u64,
    position: u64,
    seen_secs: i64,
    series: Vec<SeriesEntry>,
    dedup_keys: Vec<u128>,
    state: Vec<StateEntry>,
) -> Vec<ChangelogChunk> {
    let header = ChangelogChunk {
        source: source.to_string(),
        flush_id,
        chunk: 0,
        chunks: 0,
        position,
        seen_secs,
        series: Vec::new(),
        dedup_keys: Vec::new(),
        base: false,
        folded_through: -1,
        dedup_seen: Vec::new(),
        restore_from: 0,
        state: Vec::new(),
        epoch: -1,
    };
    split(header, series, dedup_keys, Vec::new(), state)
}

/// A base: the fold of a source's complete flushes through changelog offset `folded_through`.
pub fn chunk_base(source: &str, flush_id: u64, folded: Folded, folded_through: i64) -> Vec<ChangelogChunk> {
    let header = ChangelogChunk {
        source: source.to_string(),
        flush_id,
        chunk: 0,
        chunks: 0,
        position: folded.position,
        seen_secs: 0,
        series: Vec::new(),
        dedup_keys: Vec::new(),
        base: true,
        folded_through,
        dedup_seen: Vec::new(),
        restore_from: 0,
        state: Vec::new(),
        epoch: -1,
    };
    split(header, folded.series, Vec::new(), folded.dedup_seen, folded.state)
}

fn split(
    header: ChangelogChunk,
    series: Vec<SeriesEntry>,
    dedup_keys: Vec<u128>,
    dedup_seen: Vec<(u128, i64)>,
    state: Vec<StateEntry>,
) -> Vec<ChangelogChunk> {
    let mut chunks: Vec<ChangelogChunk> = Vec::new();
    let mut current = header.clone();
    let mut bytes = 0;
    let mut room = |size: usize, current: &mut ChangelogChunk, chunks: &mut Vec<ChangelogChunk>| {
        let nonempty = !current.series.is_empty()
            || !current.dedup_keys.is_empty()
            || !current.dedup_seen.is_empty()
            || !current.state.is_empty();
        if bytes + size > MAX_CHUNK_BYTES && nonempty {
            chunks.push(std::mem::replace(current, header.clone()));
            current.chunk = chunks.len() as u32;
            bytes = 0;
        }
        bytes += size;
    };
    for entry in series {
        room(
            entry.suffix.len() + entry.state.len() + 8,
            &mut current,
            &mut chunks,
        );
        current.series.push(entry);
    }
    for key in dedup_keys {
        room(17, &mut current, &mut chunks);
        current.dedup_keys.push(key);
    }
    for pair in dedup_seen {
        room(27, &mut current, &mut chunks);
        current.dedup_seen.push(pair);
    }
    for entry in state {
        room(
            entry.key.len() + entry.value.as_ref().map_or(0, Vec::len) + 8,
            &mut current,
            &mut chunks,
        );
        current.state.push(entry);
    }
    chunks.push(current);
    let total = chunks.len() as u32;
    for chunk in &mut chunks {
        chunk.chunks = total;
    }
    chunks
}

/// A source's state folded from flushes: the latest entry per series, live dedup keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Folded {
    pub series: Vec<SeriesEntry>,
    pub dedup_seen: Vec<(u128, i64)>,
    pub position: u64,
    /// The latest value (or deletion) of each emission and rating key.
    pub state: Vec<StateEntry>,
}

/// Folds complete flushes (in log order; a base counts as a flush): later absolute states win;
/// dedup keys first seen before `min_seen_secs` and windows starting before `min_window_start`
/// are dropped (the store's compaction filter drops them too).
pub fn fold(flushes: &[Vec<ChangelogChunk>], min_seen_secs: i64, min_window_start: i64) -> Folded {
    let mut series: std::collections::BTreeMap<Vec<u8>, SeriesEntry> = std::collections::BTreeMap::new();
    let mut seen: rustc_hash::FxHashMap<u128, i64> = rustc_hash::FxHashMap::default();
    let mut state: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = std::collections::BTreeMap::new();
    let mut position = 0;
    // Lines to re-emit: the newest flush's only (a restore re-emits no others).
    let mut reemit: Vec<StateEntry> = Vec::new();
    for flush in flushes {
        reemit.clear();
        for chunk in flush {
            position = chunk.position;
            for entry in &chunk.series {
                series.insert(entry.suffix.clone(), entry.clone());
            }
            for entry in &chunk.state {
                if entry.key.first() == Some(&keys::REEMIT) {
                    reemit.push(entry.clone());
                } else {
                    state.insert(entry.key.clone(), entry.value.clone());
                }
            }
            let keys = chunk
                .dedup_keys
                .iter()
                .map(|key| (*key, chunk.seen_secs))
                .chain(chunk.dedup_seen.iter().copied());
            for (key, at) in keys {
                // The first sighting is what the horizon counts from.
                let first = seen.entry(key).or_insert(at);
                *first = (*first).min(at);
            }
        }
    }
    let series = series
        .into_values()
        .filter(|entry| {
            keys::decode_series_suffix(&entry.suffix).is_none_or(|name| name.window_start >= min_window_start)
        })
        .collect();
    let mut dedup_seen: Vec<(u128, i64)> = seen.into_iter().filter(|(_, at)| *at >= min_seen_secs).collect();
    dedup_seen.sort_unstable();
    // Per-window keys past retention go, as the store's compaction filter drops them.
    let state = state
        .into_iter()
        .filter(|(key, _)| match key.first() {
            Some(&keys::REVISION) | Some(&keys::RATED) | Some(&keys::LEDGER) => {
                keys::suffix_window_start(&key[1..]).is_none_or(|start| start >= min_window_start)
            }
            // Close-index entries, by the end they are sorted by: past retention, a deletion
            // has nothing left to delete anywhere.
            Some(&keys::OPEN_WINDOW) | Some(&keys::PERIOD_CLOSE) => {
                keys::time_from_bytes(&key[1..]).is_none_or(|end| end >= min_window_start)
            }
            _ => true,
        })
        .map(|(key, value)| StateEntry { key, value })
        .chain(reemit)
        .collect();
    Folded {
        series,
        dedup_seen,
        position,
        state,
    }
}

/// What a restore applies, in order, from the messages read (with their offsets, in log
/// order): the newest complete base, then the complete flushes after what it folded; without a
/// base, every complete flush.
pub fn restore_plan(source: &str, messages: Vec<(i64, ChangelogChunk)>) -> Vec<Vec<ChangelogChunk>> {
    let mut offsets = Vec::new();
    let flushes = complete_flushes_at(source, messages, &mut offsets);
    let newest_base = flushes.iter().rposition(|flush| flush[0].base);
    match newest_base {
        None => flushes,
        Some(b) => {
            let folded_through = flushes[b][0].folded_through;
            let mut plan = Vec::with_capacity(flushes.len() - b);
            let mut later = Vec::new();
            for (i, (flush, first_offset)) in flushes.into_iter().zip(offsets).enumerate() {
                if i == b {
                    plan.push(flush);
                } else if !flush[0].base && first_offset > folded_through {
                    later.push(flush);
                }
            }
            plan.extend(later);
            plan
        }
    }
}

/// Reassembles a source's flushes from its changelog messages (in log order): the complete
/// ones, in order. Chunks of other sources and of incomplete flushes are left out.
pub fn complete_flushes(
    source: &str,
    messages: impl IntoIterator<Item = ChangelogChunk>,
) -> Vec<Vec<ChangelogChunk>> {
    let mut offsets = Vec::new();
    complete_flushes_at(source, messages.into_iter().map(|chunk| (0, chunk)), &mut offsets)
}

/// `complete_flushes`, also giving each flush's first offset in `offsets`. Fences and the
/// chunks of deposed writers (`is_stale`) are left out before flushes are reassembled, so a
/// deposed writer's chunk interleaved with the holder's flush does not cut it short.
fn complete_flushes_at(
    source: &str,
    messages: impl IntoIterator<Item = (i64, ChangelogChunk)>,
    offsets: &mut Vec<i64>,
) -> Vec<Vec<ChangelogChunk>> {
    let messages: Vec<(i64, ChangelogChunk)> = messages
        .into_iter()
        .filter(|(_, chunk)| chunk.source == source)
        .collect();
    let fences = fences_of(&messages);
    let mut flushes = Vec::new();
    let mut current: Vec<ChangelogChunk> = Vec::new();
    let mut first_offset = 0;
    for (offset, chunk) in messages {
        if chunk.is_fence() || is_stale(&fences, offset, chunk.epoch, chunk.writer()) {
            continue;
        }
        let continues = current
            .last()
            .is_some_and(|last| last.flush_id == chunk.flush_id && last.chunk + 1 == chunk.chunk);
        if !continues {
            // A new flush starts: whatever was pending never completed.
            current.clear();
            if chunk.chunk != 0 {
                continue;
            }
            first_offset = offset;
        }
        let last = chunk.is_last();
        current.push(chunk);
        if last {
            flushes.push(std::mem::take(&mut current));
            offsets.push(first_offset);
        }
    }
    flushes
}

/// The fences one source's messages reveal, by offset, with their writers: each fence read,
/// and each epoch a chunk names (its writer's fence, also when that fence lies before what
/// was read).
fn fences_of(messages: &[(i64, ChangelogChunk)]) -> Vec<(i64, u32)> {
    let mut fences: Vec<(i64, u32)> = messages
        .iter()
        .map(|(offset, chunk)| {
            (
                if chunk.is_fence() { *offset } else { chunk.epoch },
                chunk.writer(),
            )
        })
        .filter(|(fence, _)| *fence >= 0)
        .collect();
    fences.sort_unstable();
    fences.dedup();
    fences
}

/// Whether the chunk at `offset` that `writer` wrote under its fence at `epoch` comes from a
/// deposed writer: *another* writer fenced the source after `epoch` and before the chunk. Its
/// writer no longer owned the source (a zombie: it had not yet heard of the rebalance), and the
/// new owner restored without it, so applying it would move state backwards. The writer's own
/// newer fence does not make it stale: a checkpoint in flight while its writer took the
/// partition again is still that writer's newest state.
pub fn is_stale(fences: &[(i64, u32)], offset: i64, epoch: i64, writer: u32) -> bool {
    let after = fences.partition_point(|(fence, _)| *fence <= epoch);
    fences[after..]
        .iter()
        .take_while(|(fence, _)| *fence < offset)
        .any(|(_, by)| *by != writer)
}

/// The first fence of `source` after `epoch` by a writer other than `writer` in `messages`
/// (with offsets, in log order): `writer`, which took the source at `epoch`, is deposed.
pub fn deposed_by(source: &str, messages: &[(i64, ChangelogChunk)], epoch: i64, writer: u32) -> Option<i64> {
    messages
        .iter()
        .filter(|(_, chunk)| chunk.source == source && chunk.writer() != writer)
        .map(|(offset, chunk)| if chunk.is_fence() { *offset } else { chunk.epoch })
        .filter(|fence| *fence > epoch)
        .min()
}

impl RocksStore {
    /// Applies a source's complete flushes in one synced WriteBatch; returns the position it
    /// now resumes from (None: nothing to apply).
    pub fn restore_source(
        &self,
        source: &str,
        flushes: &[Vec<ChangelogChunk>],
        catalog: &MeterCatalog,
    ) -> Result<Option<u64>, StoreError> {
        let Some(position) = flushes.last().and_then(|f| f.last()).map(|c| c.position) else {
            return Ok(None);
        };
        let closed_before = self.closed_before();
        let mut batch = WriteBatch::default();
        let dedup_cf = self.dedup_cf()?;
        // The tenants whose series the restore copies: this replica now knows where they are.
        let mut tenants: Vec<String> = Vec::new();
        // Only the newest flush's lines are re-emitted: every older flush's writer committed
        // (and so emitted) them before publishing the next, or the restore that followed it
        // re-emitted them.
        let newest = flushes.len() - 1;
        let mut reemits = 0;
        for (chunk, index) in flushes
            .iter()
            .enumerate()
            .flat_map(|(index, flush)| flush.iter().map(move |chunk| (chunk, index)))
        {
            for entry in &chunk.series {
                let name = keys::decode_series_suffix(&entry.suffix).ok_or_else(|| StoreError::Corrupt {
                    what: "changelog series key",
                    detail: format!("{:?}", entry.suffix),
                })?;
                if tenants.last() != Some(&name.tenant) {
                    tenants.push(name.tenant.clone());
                }
                batch.put(keys::with_kind(keys::AGGREGATE, &entry.suffix), &entry.state);
                if entry.revision > 0 {
                    batch.put(
                        keys::with_kind(keys::REVISION, &entry.suffix),
                        entry.revision.to_be_bytes(),
                    );
                }
                // Open windows must close here now; a closed window never emitted (revision 0,
                // its owner died first) is indexed too so the next checkpoint emits it.
                let window_secs = catalog.get(&name.meter).map_or(60, |shape| shape.window_secs);
                let window_end = name.window_start + window_secs;
                if window_end > closed_before || entry.revision == 0 {
                    let prefix_len = keys::window_prefix_len(&name.meter, &name.tenant);
                    batch.put(
                        keys::open_window_key(window_end, &entry.suffix[..prefix_len]),
                        b"",
                    );
                }
            }
            for key in &chunk.dedup_keys {
                batch.put_cf(
                    dedup_cf,
                    keys::dedup_key(*key),
                    (chunk.seen_secs as u64).to_be_bytes(),
                );
            }
            for (key, seen_secs) in &chunk.dedup_seen {
                batch.put_cf(dedup_cf, keys::dedup_key(*key), (*seen_secs as u64).to_be_bytes());
            }
            // After the series: a revision carried here is the one emitted last.
            for entry in &chunk.state {
                if entry.key.first() == Some(&keys::REEMIT) {
                    match (&entry.value, keys::tenant_of_state_key(&entry.key)) {
                        (Some(line), Some(_)) if index == newest => {
                            batch.put(&entry.key, line);
                            reemits += 1;
                        }
                        (Some(_), Some(_)) => {}
                        _ => {
                            return Err(StoreError::Corrupt {
                                what: "changelog line to re-emit",
                                detail: format!("{:?}", entry.key),
                            })
                        }
                    }
                    continue;
                }
                if !entry.key.first().is_some_and(|kind| STATE_KINDS.contains(kind)) {
                    return Err(StoreError::Corrupt {
                        what: "changelog state key",
                        detail: format!("{:?}", entry.key),
                    });
                }
                match &entry.value {
                    Some(value) => batch.put(&entry.key, value),
                    None => batch.delete(&entry.key),
                }
            }
        }
        batch.put(keys::position_key(source), position.to_be_bytes());
        let learned = self.tenant_sources.learn(
            tenants.iter().map(|tenant| (tenant.as_str(), source)),
            &mut batch,
            super::unix_now_secs(),
        );
        let dedup_keys = flushes.iter().flatten().flat_map(|chunk| {
            (chunk.dedup_keys.iter().copied()).chain(chunk.dedup_seen.iter().map(|(key, _)| *key))
        });
        self.filters.noting(dedup_keys, || self.write(batch, true))?;
        self.tenant_sources.apply(learned);
        if reemits > 0 {
            // Written: the next checkpoint moves them to the outbox.
            self.reemit_restored
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(Some(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32) -> SeriesEntry {
        SeriesEntry {
            suffix: vec![i as u8; 40],
            state: vec![1; 20],
            revision: i,
        }
    }

    #[test]
    fn large_flushes_split_and_reassemble() {
        let series: Vec<SeriesEntry> = (0..20_000).map(entry).collect();
        let keys: Vec<u128> = (0..50_000).collect();
        let chunks = chunk_flush("kafka/usage/1", 9, 500, 77, series.clone(), keys.clone());
        assert!(chunks.len() > 2);
        assert!(chunks.iter().all(|c| c.encode().len() < 1 << 20));
        let decoded: Vec<ChangelogChunk> = chunks
            .iter()
            .map(|c| ChangelogChunk::decode(&c.encode()).unwrap())
            .collect();
        let flushes = complete_flushes("kafka/usage/1", decoded);
        assert_eq!(flushes.len(), 1);
        let back: Vec<SeriesEntry> = flushes[0].iter().flat_map(|c| c.series.clone()).collect();
        let back_keys: Vec<u128> = flushes[0].iter().flat_map(|c| c.dedup_keys.clone()).collect();
        assert_eq!((back, back_keys), (series, keys));
    }

    #[test]
    fn incomplete_and_foreign_flushes_are_ignored() {
        let first = chunk_flush("kafka/usage/1", 1, 100, 0, vec![entry(1)], vec![]);
        let mut torn = chunk_flush(
            "kafka/usage/1",
            2,
            200,
            0,
            (0..30_000).map(entry).collect(),
            vec![],
        );
        assert!(torn.len() > 1);
        torn.truncate(torn.len() - 1); // the crash: last chunk never written
        let other = chunk_flush("kafka/other/1", 3, 900, 0, vec![entry(5)], vec![]);
        let retried = chunk_flush("kafka/usage/1", 4, 180, 0, vec![entry(2)], vec![]);
        let log = [first, torn, other, retried].concat();
        let flushes = complete_flushes("kafka/usage/1", log);
        let positions: Vec<u64> = flushes.iter().map(|f| f[0].position).collect();
        assert_eq!(positions, [100, 180]);
    }

    /// Stamps `chunks` as a writer under the fence at `epoch` publishes them, from `offset` on.
    fn at(offset: i64, epoch: i64, chunks: Vec<ChangelogChunk>) -> Vec<(i64, ChangelogChunk)> {
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, mut chunk)| {
                chunk.epoch = epoch;
                (offset + i as i64, chunk)
            })
            .collect()
    }

    /// Run #13's zombie owner: writer 1 (fenced at 0) keeps publishing after writer 2 fenced the
    /// source at 3 and restored what came before. Restores and folds leave writer 1's later
    /// flush out (its chunk interleaved inside writer 2's two-chunk flush included), and writer
    /// 1 learns from the messages between its own chunks that it was deposed.
    #[test]
    fn flushes_of_a_deposed_writer_are_left_out_and_it_learns_so() {
        const SOURCE: &str = "kafka/usage/1";
        let writer = |w: u32| u64::from(w) << 32;
        let mut log = vec![(0, ChangelogChunk::fence(SOURCE, 1, 0))];
        log.extend(at(
            1,
            0,
            chunk_flush(SOURCE, writer(1) | 1, 100, 0, vec![entry(1)], vec![11]),
        ));
        log.extend(at(
            2,
            0,
            chunk_flush(SOURCE, writer(1) | 2, 110, 0, vec![entry(2)], vec![12]),
        ));
        log.push((3, ChangelogChunk::fence(SOURCE, 2, 0)));
        // The zombie's next flush lands after the fence: stale.
        let zombie = at(
            4,
            0,
            chunk_flush(SOURCE, writer(1) | 3, 120, 0, vec![entry(3)], vec![13]),
        );
        log.extend(zombie.clone());
        let big = at(
            5,
            3,
            chunk_flush(
                SOURCE,
                writer(2) | 4,
                130,
                0,
                (0..30_000).map(entry).collect(),
                vec![14],
            ),
        );
        assert!(big.len() > 1);
        // Another zombie chunk between the new owner's two chunks.
        let mut later = at(
            6,
            0,
            chunk_flush(SOURCE, writer(1) | 5, 125, 0, vec![entry(4)], vec![15]),
        );
        later[0].0 = big[0].0 + 1;
        let mut big_rest: Vec<(i64, ChangelogChunk)> = big[1..].to_vec();
        for (i, (offset, _)) in big_rest.iter_mut().enumerate() {
            *offset = later[0].0 + 1 + i as i64;
        }
        log.push(big[0].clone());
        log.extend(later);
        log.extend(big_rest);
        let plan = restore_plan(SOURCE, log.clone());
        let positions: Vec<u64> = plan.iter().map(|flush| flush[0].position).collect();
        assert_eq!(positions, [100, 110, 130]);
        let (_, keys, position, _) = apply(&plan);
        assert_eq!(position, 130);
        assert!(!keys.contains(&13) && !keys.contains(&15));
        // A restore that starts after the fence (its base folded it) still tells the zombie's
        // chunks by the epoch the new owner's chunks name.
        let after: Vec<_> = log.iter().filter(|(offset, _)| *offset >= 4).cloned().collect();
        let positions: Vec<u64> = restore_plan(SOURCE, after)
            .iter()
            .map(|f| f[0].position)
            .collect();
        assert_eq!(positions, [130]);
        // What the zombie reads between its own chunks (offsets 3.. before its chunk at 4).
        assert_eq!(deposed_by(SOURCE, &log[..4], 0, 1), Some(3));
        assert_eq!(deposed_by(SOURCE, &log[..3], 0, 1), None);
        assert_eq!(
            deposed_by(SOURCE, &log, 3, 2),
            None,
            "the holder is not deposed by itself"
        );
        assert_eq!(deposed_by("kafka/other/1", &log, 0, 1), None);
    }

    /// A writer that takes its source again (a rebalance that revoked and reassigned it)
    /// fences anew while a checkpoint prepared under its older fence is being published: that
    /// flush is still its newest state (its dedup keys are in no later flush), not stale.
    #[test]
    fn a_writers_own_newer_fence_does_not_make_its_flushes_stale() {
        const SOURCE: &str = "kafka/usage/4";
        let writer = |w: u32| u64::from(w) << 32;
        let mut log = vec![(0, ChangelogChunk::fence(SOURCE, 1, 0))];
        log.push((1, ChangelogChunk::fence(SOURCE, 1, 0)));
        log.extend(at(
            2,
            0,
            chunk_flush(SOURCE, writer(1) | 1, 100, 0, vec![entry(1)], vec![21]),
        ));
        log.extend(at(
            3,
            1,
            chunk_flush(SOURCE, writer(1) | 2, 110, 0, vec![entry(2)], vec![22]),
        ));
        let plan = restore_plan(SOURCE, log.clone());
        let (_, keys, position, _) = apply(&plan);
        assert_eq!((position, keys.len()), (110, 2));
        assert_eq!(deposed_by(SOURCE, &log, 0, 1), None);
        // Another writer's fence in between does make the older-epoch flush stale.
        let mut rival = log.clone();
        rival.insert(2, (2, ChangelogChunk::fence(SOURCE, 2, 0)));
        for (i, (offset, _)) in rival.iter_mut().enumerate() {
            *offset = i as i64;
        }
        let positions: Vec<u64> = restore_plan(SOURCE, rival)
            .iter()
            .map(|f| f[0].position)
            .collect();
        assert!(positions.is_empty(), "{positions:?}");
    }

    /// Chunks written before fences existed (epoch -1) still restore, up to the first fence.
    #[test]
    fn unfenced_flushes_count_until_the_first_fence() {
        const SOURCE: &str = "kafka/usage/2";
        let mut log = at(0, -1, chunk_flush(SOURCE, 1, 100, 0, vec![entry(1)], vec![]));
        log.push((1, ChangelogChunk::fence(SOURCE, 7, 0)));
        log.extend(at(2, -1, chunk_flush(SOURCE, 2, 90, 0, vec![entry(2)], vec![])));
        log.extend(at(3, 1, chunk_flush(SOURCE, 3, 110, 0, vec![entry(3)], vec![])));
        let positions: Vec<u64> = restore_plan(SOURCE, log).iter().map(|f| f[0].position).collect();
        assert_eq!(positions, [100, 110]);
    }

    /// What applying `flushes` in order leaves: series → (state, revision), dedup keys,
    /// position, emission and rating keys (None: deleted).
    type Applied = (
        std::collections::BTreeMap<Vec<u8>, (Vec<u8>, u32)>,
        std::collections::BTreeSet<u128>,
        u64,
        std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    );

    fn apply(flushes: &[Vec<ChangelogChunk>]) -> Applied {
        let mut series = std::collections::BTreeMap::new();
        let mut keys = std::collections::BTreeSet::new();
        let mut state = std::collections::BTreeMap::new();
        let mut position = 0;
        for chunk in flushes.iter().flatten() {
            position = chunk.position;
            for entry in &chunk.series {
                series.insert(entry.suffix.clone(), (entry.state.clone(), entry.revision));
            }
            keys.extend(chunk.dedup_keys.iter().copied());
            keys.extend(chunk.dedup_seen.iter().map(|(key, _)| *key));
            for entry in &chunk.state {
                state.insert(entry.key.clone(), entry.value.clone());
            }
        }
        (series, keys, position, state)
    }

    proptest::proptest! {
        /// Restoring from a log with a base (folded while later flushes kept arriving, possibly
        /// followed by a torn base) gives exactly the state of applying every flush, whether the
        /// restore reads from the log start or only from the base's restore point (retention
        /// may have deleted everything before it).
        #[test]
        fn a_base_plus_later_flushes_restores_the_same_state(
            flushes in proptest::collection::vec(
                (proptest::collection::vec((0u8..6, 0u8..255), 0..4), proptest::collection::vec(0u128..40, 0..3)),
                1..12,
            ),
            fold_count in 0usize..12,
            delay in 0usize..4,
            torn in proptest::bool::ANY,
        ) {
            let source = "kafka/usage/0";
            let flushes: Vec<Vec<ChangelogChunk>> = flushes
                .into_iter()
                .enumerate()
                .map(|(i, (series, keys))| {
                    // Each series' window also moves an emission key: set, or deleted.
                    let state = series
                        .iter()
                        .map(|(id, value)| StateEntry {
                            key: vec![keys::RATED, *id],
                            value: (value % 4 != 0).then(|| vec![*value]),
                        })
                        .collect();
                    let series = series
                        .into_iter()
                        .map(|(id, state)| SeriesEntry { suffix: vec![id; 8], state: vec![state], revision: i as u32 })
                        .collect();
                    chunk_flush_with_state(source, i as u64, 10 * (i as u64 + 1), i as i64, series, keys, state)
                })
                .collect();
            let fold_count = fold_count.min(flushes.len());
            let publish_at = (fold_count + delay).min(flushes.len());
            let mut log: Vec<(i64, ChangelogChunk)> = Vec::new();
            let mut folded_through = -1;
            let mut pointer = 0;
            let publish_base = |log: &mut Vec<(i64, ChangelogChunk)>, folded_through: i64| {
                let base = chunk_base(source, 1000, fold(&flushes[..fold_count], i64::MIN, i64::MIN), folded_through);
                for chunk in base {
                    log.push((log.len() as i64, chunk));
                }
                folded_through + 1
            };
            for (i, flush) in flushes.iter().enumerate() {
                if i == publish_at && fold_count > 0 {
                    pointer = publish_base(&mut log, folded_through);
                }
                for chunk in flush {
                    log.push((log.len() as i64, chunk.clone()));
                }
                if i + 1 == fold_count {
                    folded_through = log.len() as i64 - 1;
                }
            }
            if publish_at == flushes.len() && fold_count > 0 {
                pointer = publish_base(&mut log, folded_through);
            }
            if torn {
                // A newer base cut short by a crash: ignored.
                let mut partial = chunk_base(source, 2000, fold(&flushes, i64::MIN, i64::MIN), log.len() as i64 - 1);
                partial[0].chunks += 1;
                log.push((log.len() as i64, partial.remove(0)));
            }
            let expected = apply(&flushes);
            proptest::prop_assert_eq!(&apply(&restore_plan(source, log.clone())), &expected);
            let from_pointer: Vec<_> = log.into_iter().filter(|(offset, _)| *offset >= pointer).collect();
            proptest::prop_assert_eq!(&apply(&restore_plan(source, from_pointer)), &expected);
        }
    }

    #[test]
    fn folding_drops_expired_dedup_keys_and_keeps_first_sightings() {
        let old = chunk_flush("s", 1, 10, 100, vec![], vec![1, 2]);
        let new = chunk_flush("s", 2, 20, 500, vec![entry(3)], vec![2, 3]);
        let folded = fold(&[old, new], 200, i64::MIN);
        // key 2 was first seen at 100: it expires with key 1.
        assert_eq!(folded.dedup_seen, vec![(3, 500)]);
        assert_eq!(folded.position, 20);
        assert_eq!(folded.series, vec![entry(3)]);
    }
}
