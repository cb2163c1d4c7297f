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
//! Limits: absolute states are per series, so a series must be fed by one partition (the topic
//! is keyed by tenant); the changelog is an append-only log of flushes (no compaction yet:
//! size it by retention, see ARCHITECTURE.md).

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

/// One message of the changelog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangelogChunk {
    /// The replicated source, e.g. `kafka/usage/3`.
    pub source: String,
    /// Unique per flush attempt (a retried or replayed flush gets a new id).
    pub flush_id: u64,
    pub chunk: u32,
    pub chunks: u32,
    /// The source's next input offset once this flush is applied.
    pub position: u64,
    /// First-seen time of `dedup_keys`, unix seconds.
    pub seen_secs: i64,
    pub series: Vec<SeriesEntry>,
    pub dedup_keys: Vec<u128>,
}

impl ChangelogChunk {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: changelog chunks serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<ChangelogChunk, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    pub fn is_last(&self) -> bool {
        self.chunk + 1 == self.chunks
    }
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
    let mut chunks = Vec::new();
    let empty = |chunks: &Vec<ChangelogChunk>| ChangelogChunk {
        source: source.to_string(),
        flush_id,
        chunk: chunks.len() as u32,
        chunks: 0,
        position,
        seen_secs,
        series: Vec::new(),
        dedup_keys: Vec::new(),
    };
    let mut current = empty(&chunks);
    let mut bytes = 0;
    for entry in series {
        let size = entry.suffix.len() + entry.state.len() + 8;
        if bytes + size > MAX_CHUNK_BYTES && !current.series.is_empty() {
            chunks.push(std::mem::replace(&mut current, empty(&chunks)));
            current.chunk = chunks.len() as u32;
            bytes = 0;
        }
        bytes += size;
        current.series.push(entry);
    }
    for key in dedup_keys {
        if bytes + 17 > MAX_CHUNK_BYTES {
            chunks.push(std::mem::replace(&mut current, empty(&chunks)));
            current.chunk = chunks.len() as u32;
            bytes = 0;
        }
        bytes += 17;
        current.dedup_keys.push(key);
    }
    chunks.push(current);
    let total = chunks.len() as u32;
    for chunk in &mut chunks {
        chunk.chunks = total;
    }
    chunks
}

/// Reassembles a source's flushes from its changelog messages (in log order): the complete
/// ones, in order. Chunks of other sources and of incomplete flushes are left out.
pub fn complete_flushes(
    source: &str,
    messages: impl IntoIterator<Item = ChangelogChunk>,
) -> Vec<Vec<ChangelogChunk>> {
    let mut flushes = Vec::new();
    let mut current: Vec<ChangelogChunk> = Vec::new();
    for chunk in messages.into_iter().filter(|c| c.source == source) {
        let continues = current
            .last()
            .is_some_and(|last| last.flush_id == chunk.flush_id && last.chunk + 1 == chunk.chunk);
        if !continues {
            // A new flush starts: whatever was pending never completed.
            current.clear();
            if chunk.chunk != 0 {
                continue;
            }
        }
        let last = chunk.is_last();
        current.push(chunk);
        if last {
            flushes.push(std::mem::take(&mut current));
        }
    }
    flushes
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
        for chunk in flushes.iter().flatten() {
            for entry in &chunk.series {
                let name = keys::decode_series_suffix(&entry.suffix).ok_or_else(|| StoreError::Corrupt {
                    what: "changelog series key",
                    detail: format!("{:?}", entry.suffix),
                })?;
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
                batch.put(keys::dedup_key(*key), (chunk.seen_secs as u64).to_be_bytes());
            }
        }
        batch.put(keys::position_key(source), position.to_be_bytes());
        self.write(batch, true)?;
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
}
