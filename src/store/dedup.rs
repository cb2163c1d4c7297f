//! Dedup keys in the store: one value per checkpoint in its WriteBatch, staged in memory,
//! ingested into their own column family in large sorted files.
//!
//! A dedup key per event is most of what tallyd writes. Put one by one through a WriteBatch,
//! each key cost a WAL append and a skiplist insert among millions of random keys, then a flush
//! and the compactions after it: about a third of the daemon's CPU under load (BENCHMARKS.md, "Dedup keys and the dedup filter").
//! Instead a checkpoint's batch carries all its keys as *one* value (`d | generation`,
//! 16 bytes a key): atomic with the aggregates and positions they belong to, one memtable
//! entry. The keys stay in the in-memory `DedupIndex`, which already answers for them; once
//! `STAGE_MAX_KEYS` are staged (or they are `STAGE_MAX_SECS` old), the dedup stage (its own
//! thread, `pipeline::dedup`) builds one SST file from them and ingests it into
//! the `dedup` column family (RocksDB links it into the tree, no memtable, no WAL), and only
//! then do the keys leave memory and their `d` values get deleted.
//!
//! So every key of a committed checkpoint is at all times in memory and its `d` value, or in
//! the column family. At startup every `d` value left (all committed: they are written by the
//! batches themselves) is ingested before the store serves a lookup; a key ingested twice is
//! harmless.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rocksdb::{
    ColumnFamily, IngestExternalFileOptions, IteratorMode, ReadOptions, SstFileWriter, WriteBatch,
};

use super::dedup_filter::FilterBuilt;
use super::{keys, RocksStore, StoreError, DEDUP_CF};

/// Staged keys that trigger an ingestion: ≈ 50 bytes of memory each (the index entry and the
/// staged copy); an ingested file of ≈ 35 MB (measured: 34 981 024 bytes for 1 M keys).
pub const STAGE_MAX_KEYS: usize = 1_000_000;
/// ... or their age: a quiet daemon does not keep keys in memory for long.
const STAGE_MAX_SECS: u64 = 60;

/// Committed runs not yet ingested: the checkpoint stage adds them, the dedup stage takes them.
#[derive(Default)]
pub(super) struct Staged {
    /// Each committed run: (first seen, its keys).
    runs: Vec<(i64, Vec<u128>)>,
    keys: usize,
    /// The latest generation staged: its `d` value and every earlier one go once ingested.
    generation: u64,
    since: Option<Instant>,
}

impl Staged {
    fn due(&self) -> bool {
        self.keys >= STAGE_MAX_KEYS
            || self
                .since
                .is_some_and(|since| since.elapsed().as_secs() >= STAGE_MAX_SECS)
    }

    /// Runs taken for an ingestion that failed go back in front of those staged since.
    fn put_back(&mut self, mut taken: Staged) {
        taken.runs.append(&mut self.runs);
        self.runs = taken.runs;
        self.keys += taken.keys;
        self.generation = self.generation.max(taken.generation);
        self.since = match (taken.since, self.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// A RocksDB (key, value) pair as its iterators yield it.
type Entry = (Box<[u8]>, Box<[u8]>);

/// A checkpoint's run as its `d` value: first-seen seconds, then the keys (any order).
pub(super) fn encode_run(keys: &[u128], seen_secs: i64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + keys.len() * 16);
    bytes.extend_from_slice(&seen_secs.to_be_bytes());
    for key in keys {
        bytes.extend_from_slice(&key.to_be_bytes());
    }
    bytes
}

fn decode_run(bytes: &[u8], out: &mut Vec<(u128, i64)>) -> Option<()> {
    let seen_secs = i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let keys = &bytes[8..];
    if keys.len() % 16 != 0 {
        return None;
    }
    out.extend(
        keys.chunks_exact(16)
            .map(|key| (u128::from_be_bytes(key.try_into().expect("16 bytes")), seen_secs)),
    );
    Some(())
}

impl RocksStore {
    pub(super) fn dedup_cf(&self) -> Result<&ColumnFamily, StoreError> {
        self.db.cf_handle(DEDUP_CF).ok_or_else(|| StoreError::Corrupt {
            what: "column family",
            detail: format!("{DEDUP_CF} column family missing"),
        })
    }

    /// For each dedup key, whether it was checkpointed within the horizon.
    pub fn dedup_seen(
        &self,
        dedup_keys: &[u128],
        now_secs: i64,
        horizon_secs: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let mut out = vec![false; dedup_keys.len()];
        // Never expire by a later time than compaction may (`clock`).
        let now_secs = now_secs.min(self.expiry.now_secs());
        // Keys the filter never saw were never stored (`dedup_filter`): only the rest are read.
        let mut order: Vec<usize> = match self.filters.current() {
            Some(filter) => (0..dedup_keys.len())
                .filter(|i| filter.may_contain(dedup_keys[*i]))
                .collect(),
            None => (0..dedup_keys.len()).collect(),
        };
        let filtered = (dedup_keys.len() - order.len()) as u64;
        metrics::counter!(crate::telemetry::DEDUP_LOOKUPS, "answer" => "filter").increment(filtered);
        metrics::counter!(crate::telemetry::DEDUP_LOOKUPS, "answer" => "store").increment(order.len() as u64);
        if order.is_empty() {
            return Ok(out);
        }
        // Sorted lookups let RocksDB skip its own sort and walk each file once (the sort was
        // ~9 % of a Kafka consumer's CPU); answers go back in the caller's order.
        order.sort_unstable_by_key(|i| dedup_keys[*i]);
        let lookups: Vec<[u8; 17]> = order.iter().map(|i| keys::dedup_key(dedup_keys[*i])).collect();
        let cf = self.dedup_cf()?;
        for (slot, result) in order.iter().zip(self.db.batched_multi_get_cf(cf, &lookups, true)) {
            out[*slot] = match result? {
                // Expired keys may linger until compaction; they no longer count.
                Some(value) => match <[u8; 8]>::try_from(&*value) {
                    Ok(bytes) => (u64::from_be_bytes(bytes) as i64) >= now_secs - horizon_secs,
                    Err(_) => true,
                },
                None => false,
            };
        }
        Ok(out)
    }

    /// Caps the dedup filter's memory (0 turns it off: every lookup reads the column family).
    /// Takes effect at the next build.
    pub fn set_dedup_filter_max_bytes(&self, bytes: u64) {
        self.filters.set_max_bytes(bytes);
    }

    /// Keys in the current dedup filter (None: not built, or off).
    pub fn dedup_filter_keys(&self) -> Option<u64> {
        self.filters.current().map(|filter| filter.inserted())
    }

    /// Whether the dedup filter should be built (again): see `dedup_filter`.
    pub fn dedup_filter_build_due(&self) -> bool {
        self.filters.build_due()
    }

    /// Builds the dedup filter afresh from the column family (`dedup_filter`) and makes lookups
    /// use it. None when the filter is off or `stop` was set during the scan.
    pub fn build_dedup_filter(&self, stop: &AtomicBool) -> Result<Option<FilterBuilt>, StoreError> {
        self.build_dedup_filter_with(stop, || {})
    }

    /// `after_iterator` runs once the scan's view of the column family is fixed (tests write
    /// there what only the writers' side of the protocol can put in the new filter).
    fn build_dedup_filter_with(
        &self,
        stop: &AtomicBool,
        after_iterator: impl FnOnce(),
    ) -> Result<Option<FilterBuilt>, StoreError> {
        let cf = self.dedup_cf()?;
        let estimate = self
            .db
            .property_int_value_cf(cf, "rocksdb.estimate-num-keys")?
            .unwrap_or(0);
        // Registered before the iterator exists: a key stored after this is added by its writer.
        let Some(filter) = self.filters.begin(estimate) else {
            return Ok(None);
        };
        let mut read = ReadOptions::default();
        read.fill_cache(false);
        read.set_readahead_size(4 << 20);
        let mut iterator = self.db.raw_iterator_cf_opt(cf, read);
        after_iterator();
        iterator.seek_to_first();
        // Keys well past the horizon (a day of slack for callers' clocks) are never seen again.
        let oldest = self.expiry.now_secs() - self.dedup_horizon_secs - 86_400;
        let mut batch = Vec::with_capacity(4096);
        let mut complete = true;
        while iterator.valid() {
            if let (Some(key), Some(value)) = (iterator.key(), iterator.value()) {
                let key = key.get(1..).and_then(|bytes| <[u8; 16]>::try_from(bytes).ok());
                let seen = <[u8; 8]>::try_from(value).map(|bytes| u64::from_be_bytes(bytes) as i64);
                // An unreadable value counts as seen in lookups: keep it.
                if let Some(key) = key.filter(|_| !matches!(seen, Ok(s) if s < oldest)) {
                    batch.push(u128::from_be_bytes(key));
                }
            }
            if batch.len() == batch.capacity() {
                filter.insert_all(batch.drain(..));
                if stop.load(Ordering::Relaxed) {
                    complete = false;
                    break;
                }
            }
            iterator.next();
        }
        filter.insert_all(batch.drain(..));
        let status = iterator.status();
        if !complete || status.is_err() {
            self.filters.abandon(&filter);
            status?;
            return Ok(None);
        }
        Ok(Some(self.filters.finish(&filter)))
    }

    /// After the batch of `generation` committed: stages its run's keys for the dedup stage.
    pub(super) fn stage_dedup_run(&self, generation: u64, run: Vec<u128>, seen_secs: i64) {
        let mut staged = self.staged.lock();
        if !run.is_empty() {
            staged.keys += run.len();
            staged.runs.push((seen_secs, run));
            staged.generation = staged.generation.max(generation);
            staged.since.get_or_insert_with(Instant::now);
        }
    }

    /// Whether enough keys are staged, or they are old enough, to ingest them.
    pub fn dedup_ingest_due(&self) -> bool {
        self.staged.lock().due()
    }

    /// Ingests every key staged now into the column family and deletes their `d` values;
    /// returns them (the caller forgets them in memory). Checkpoints go on staging meanwhile:
    /// the staged runs are taken out under the lock and put back if the ingestion fails.
    pub fn ingest_staged_dedup(&self) -> Result<Vec<u128>, StoreError> {
        // One ingestion at a time: each deletes the `d` values up to its own generation, which
        // must not include runs another one has taken and not yet ingested.
        let _ingesting = self.ingesting.lock();
        let taken = std::mem::take(&mut *self.staged.lock());
        if taken.keys == 0 {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut keys: Vec<(u128, i64)> = Vec::with_capacity(taken.keys);
        for (seen_secs, run) in &taken.runs {
            keys.extend(run.iter().map(|key| (*key, *seen_secs)));
        }
        if let Err(error) = self.ingest_keys(&mut keys) {
            self.staged.lock().put_back(taken);
            return Err(error);
        }
        // Every run up to this generation was taken here: runs staged since are later ones.
        if let Err(error) = self.delete_runs_up_to(taken.generation) {
            // Harmless: the next start ingests them again.
            tracing::warn!(%error, "ingested dedup runs not deleted");
        }
        tracing::debug!(
            keys = keys.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "staged dedup keys ingested"
        );
        Ok(keys.into_iter().map(|(key, _)| key).collect())
    }

    /// Builds one SST file of `keys` (sorted here; a key staged twice keeps its first sighting)
    /// and ingests it.
    fn ingest_keys(&self, keys: &mut Vec<(u128, i64)>) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dedup_dir)?;
        let path = self.dedup_dir.join("ingest.sst");
        keys.sort_unstable();
        keys.dedup_by_key(|(key, _)| *key);
        let result = write_sst(&self.dedup_options, &path, keys).and_then(|()| {
            warm_page_cache(&path);
            let mut options = IngestExternalFileOptions::default();
            // Linked, not copied; RocksDB removes our link once the file is part of the tree.
            options.set_move_files(true);
            // In the filter first (`dedup_filter`'s rule), then in the column family.
            let cf = self.dedup_cf()?;
            self.filters.noting(keys.iter().map(|(key, _)| *key), || {
                self.db
                    .ingest_external_file_cf_opts(cf, &options, vec![&path])
                    .map_err(StoreError::from)
            })
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// Deletes the `d` values of every generation up to `generation` (not synced: a crash that
    /// loses the deletion only makes the next start ingest them again).
    fn delete_runs_up_to(&self, generation: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range(
            keys::dedup_run_key(0),
            keys::dedup_run_key(generation.saturating_add(1)),
        );
        self.write(batch, false)
    }

    /// Startup: moves dedup keys of stores from before this column family into it, and ingests
    /// every checkpoint's run not ingested before the stop.
    pub(super) fn recover_dedup_runs(&self) -> Result<(), StoreError> {
        self.migrate_default_cf_dedup_keys()?;
        let mut keys = Vec::new();
        let mut last = None;
        for item in self.entries_of_kind(keys::DEDUP_RUN) {
            let (key, value) = item?;
            let generation = key
                .get(1..)
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_be_bytes);
            match (generation, decode_run(&value, &mut keys)) {
                (Some(generation), Some(())) => last = Some(generation),
                _ => {
                    return Err(StoreError::Corrupt {
                        what: "dedup run",
                        detail: format!("{key:?}: {} bytes", value.len()),
                    })
                }
            }
        }
        if let Some(generation) = last {
            let count = keys.len();
            self.ingest_keys(&mut keys)?;
            self.delete_runs_up_to(generation)?;
            tracing::info!(keys = count, "ingested the dedup runs of the last checkpoints");
        }
        Ok(())
    }

    /// Every default-CF entry whose key starts with `kind`.
    fn entries_of_kind(&self, kind: u8) -> impl Iterator<Item = Result<Entry, rocksdb::Error>> + '_ {
        self.db
            .iterator(IteratorMode::From(&[kind], rocksdb::Direction::Forward))
            .take_while(move |item| item.as_ref().map_or(true, |(key, _)| key.first() == Some(&kind)))
    }

    /// Stores written before the dedup column family kept `D` keys in the default one. (Only
    /// at open, before any dedup filter is built: the first build's scan finds them.)
    fn migrate_default_cf_dedup_keys(&self) -> Result<(), StoreError> {
        let dedup_cf = self.dedup_cf()?;
        let mut batch = WriteBatch::default();
        let mut moved = 0usize;
        for item in self.entries_of_kind(keys::DEDUP) {
            let (key, value) = item?;
            batch.put_cf(dedup_cf, &key, &value);
            batch.delete(&key);
            moved += 1;
            if batch.len() >= 100_000 {
                self.write(std::mem::take(&mut batch), true)?;
            }
        }
        if moved > 0 {
            self.write(batch, true)?;
            tracing::info!(keys = moved, "moved dedup keys into their own column family");
        }
        Ok(())
    }
}

fn write_sst(options: &rocksdb::Options, path: &Path, sorted: &[(u128, i64)]) -> Result<(), StoreError> {
    let mut writer = SstFileWriter::create(options);
    writer.open(path)?;
    for (key, seen_secs) in sorted {
        writer.put(keys::dedup_key(*key), (*seen_secs as u64).to_be_bytes())?;
    }
    // Syncs the file before it is linked into the tree.
    writer.finish()?;
    Ok(())
}

/// Reads a file just written by `SstFileWriter` back into the OS page cache. RocksDB's writer
/// drops every page it writes (`invalidate_page_cache`, which its C API cannot turn off), so
/// the first lookups of a true duplicate in a new file each waited for a random disk read on
/// the request path (≈ 66 µs here, ≈ 10 per 1,000-point OTLP export with 1 % retried points:
/// 0.6 ms of its median latency; BENCHMARKS.md, "Dedup keys and the dedup filter"). One sequential read in the dedup stage
/// (≈ 35 ms per million keys) keeps recent keys where the kernel would have kept them; the
/// file is linked into the tree, so the cached pages are the tree's. Best effort: a failure
/// only costs those disk reads later.
fn warm_page_cache(path: &Path) {
    let warmed =
        std::fs::File::open(path).and_then(|mut file| std::io::copy(&mut file, &mut std::io::sink()));
    if let Err(error) = warmed {
        tracing::debug!(%error, path = %path.display(), "dedup file not read back into the page cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::unix_now_secs;

    const NOW: i64 = 1_700_000_000;

    fn commit(store: &RocksStore, generation: u64, dedup_keys: Vec<u128>) {
        store.commit_dedup_keys_for_tests(generation, dedup_keys, NOW)
    }

    fn runs_left(store: &RocksStore) -> usize {
        store.entries_of_kind(keys::DEDUP_RUN).count()
    }

    #[test]
    fn committed_runs_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        // Committed, staged: memory answers for these keys, the column family does not yet.
        commit(&store, 1, vec![1, 2]);
        commit(&store, 2, vec![3]);
        assert_eq!(store.dedup_seen(&[1, 2, 3], NOW, 86_400).unwrap(), [false; 3]);
        assert_eq!(runs_left(&store), 2);
        // A crash: memory is gone, the runs in the batches are not.
        drop(store);

        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        assert_eq!(
            store.dedup_seen(&[1, 2, 3, 4], NOW, 86_400).unwrap(),
            [true, true, true, false]
        );
        assert_eq!(runs_left(&store), 0, "ingested runs are deleted");
        drop(store);
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        assert_eq!(store.dedup_seen(&[1, 3], NOW, 86_400).unwrap(), [true, true]);
    }

    #[test]
    fn a_crash_between_ingestion_and_deleting_the_runs_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        commit(&store, 1, vec![5, 6]);
        // The file is in the column family, the process dies before the `d` value goes.
        let mut keys = vec![(5, NOW), (6, NOW)];
        store.ingest_keys(&mut keys).unwrap();
        assert_eq!(runs_left(&store), 1);
        drop(store);
        // The next start ingests the run again: the same keys twice, still found once each.
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        assert_eq!(runs_left(&store), 0);
        assert_eq!(
            store.dedup_seen(&[5, 6, 7], NOW, 86_400).unwrap(),
            [true, true, false]
        );
        assert!(
            store.ingest_staged_dedup().unwrap().is_empty(),
            "nothing staged after a start"
        );
    }

    #[test]
    fn staged_keys_move_into_the_store_in_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        let first: Vec<u128> = (0..STAGE_MAX_KEYS as u128 - 1).map(|i| i * 7919).collect();
        commit(&store, 1, first);
        assert!(!store.dedup_ingest_due(), "below the threshold");
        // The run that reaches the threshold makes everything staged due, for one file.
        commit(&store, 2, vec![7919, u128::MAX]);
        assert!(store.dedup_ingest_due());
        let moved = store.ingest_staged_dedup().unwrap();
        assert_eq!(
            moved.len(),
            STAGE_MAX_KEYS,
            "7919 was staged twice and moves once"
        );
        assert!(!store.dedup_ingest_due());
        assert_eq!(runs_left(&store), 0);
        let probe = [0, 7919, u128::MAX, 5];
        assert_eq!(
            store.dedup_seen(&probe, NOW, 86_400).unwrap(),
            [true, true, true, false]
        );
        // An empty stage has nothing to move.
        assert!(store.ingest_staged_dedup().unwrap().is_empty());
    }

    #[test]
    fn a_failed_ingestion_keeps_every_key_staged() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        commit(&store, 1, vec![1, 2]);
        // A file where the SST is built: the ingestion fails before anything moved.
        std::fs::write(&store.dedup_dir, b"in the way").unwrap();
        assert!(store.ingest_staged_dedup().is_err());
        commit(&store, 2, vec![3]);
        assert_eq!(runs_left(&store), 2, "no run deleted");
        std::fs::remove_file(&store.dedup_dir).unwrap();
        let mut moved = store.ingest_staged_dedup().unwrap();
        moved.sort_unstable();
        assert_eq!(moved, [1, 2, 3], "the failed run was put back");
        assert_eq!(runs_left(&store), 0);
        assert_eq!(store.dedup_seen(&[1, 2, 3], NOW, 86_400).unwrap(), [true; 3]);
    }

    #[test]
    fn a_key_staged_twice_keeps_its_first_sighting() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 100).unwrap();
        store.stage_dedup_run(1, vec![9], NOW - 500);
        store.stage_dedup_run(2, vec![9], NOW);
        assert_eq!(store.ingest_staged_dedup().unwrap(), [9]);
        // Seen 500 s ago, the horizon is 100 s: expired, though seen again since.
        assert_eq!(store.dedup_seen(&[9], NOW, 100).unwrap(), [false]);
        assert_eq!(store.dedup_seen(&[9], NOW, 1_000).unwrap(), [true]);
    }

    /// Small numbers made uniform, as real (xxh3) keys are (the filter relies on it).
    fn key(n: u128) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&n.to_le_bytes())
    }

    fn build(store: &RocksStore) -> FilterBuilt {
        store
            .build_dedup_filter(&AtomicBool::new(false))
            .unwrap()
            .expect("filter on")
    }

    #[test]
    fn keys_stored_while_the_filter_is_built_are_found() {
        let now = unix_now_secs();
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        store.stage_dedup_run(1, vec![key(1)], now);
        store.ingest_staged_dedup().unwrap();
        // Key 2 is ingested after the scan's view is fixed: only its writer can add it.
        let built = store
            .build_dedup_filter_with(&AtomicBool::new(false), || {
                store.stage_dedup_run(2, vec![key(2)], now);
                store.ingest_staged_dedup().unwrap();
            })
            .unwrap()
            .unwrap();
        assert_eq!(built.keys, 2, "one key scanned, one added by its writer");
        let filter = store.filters.current().unwrap();
        assert!(filter.may_contain(key(1)) && filter.may_contain(key(2)));
        assert_eq!(
            store.dedup_seen(&[key(1), key(2), key(3)], now, 86_400).unwrap(),
            [true, true, false]
        );
        // And after it, straight into the current filter.
        store.stage_dedup_run(3, vec![key(3)], now);
        store.ingest_staged_dedup().unwrap();
        assert_eq!(store.dedup_seen(&[key(3)], now, 86_400).unwrap(), [true]);
        assert_eq!(store.dedup_filter_keys(), Some(3));
    }

    #[test]
    fn a_stopped_build_leaves_lookups_on_the_store() {
        let now = unix_now_secs();
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        store.stage_dedup_run(1, (0..10_000).collect(), now);
        store.ingest_staged_dedup().unwrap();
        assert!(store
            .build_dedup_filter(&AtomicBool::new(true))
            .unwrap()
            .is_none());
        assert!(store.filters.current().is_none() && store.dedup_filter_build_due());
        assert_eq!(
            store.dedup_seen(&[5, 10_000], now, 86_400).unwrap(),
            [true, false]
        );
    }

    #[test]
    fn a_build_skips_keys_long_expired() {
        let now = unix_now_secs();
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 100).unwrap();
        // Beyond the horizon and its day of slack; within the slack; fresh.
        store.stage_dedup_run(1, vec![key(1)], now - 100 - 86_401);
        store.stage_dedup_run(2, vec![key(2)], now - 100 - 86_399);
        store.stage_dedup_run(3, vec![key(3)], now);
        store.ingest_staged_dedup().unwrap();
        assert_eq!(build(&store).keys, 2);
        let filter = store.filters.current().unwrap();
        assert!(!filter.may_contain(key(1)) && filter.may_contain(key(2)) && filter.may_contain(key(3)));
        assert_eq!(
            store.dedup_seen(&[key(1), key(2), key(3)], now, 100).unwrap(),
            [false, false, true]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// The filter only ever saves reads: with it, every answer is the store's own.
        #[test]
        fn lookups_answer_the_same_with_the_filter_as_without(
            stored in proptest::collection::vec((0u128..400, 0i64..300), 0..200),
            probes in proptest::collection::vec(0u128..500, 1..200),
            built_after in 0usize..200,
            horizon in 50i64..250,
        ) {
            let now = unix_now_secs();
            let dir = tempfile::tempdir().unwrap();
            let with = RocksStore::open(&dir.path().join("with"), 86_400, 86_400).unwrap();
            let without = RocksStore::open(&dir.path().join("without"), 86_400, 86_400).unwrap();
            without.set_dedup_filter_max_bytes(0);
            // Uniform keys fill different filter blocks; some stored before the build, the rest
            // after it.
            let spread = key;
            for (i, (key, age)) in stored.iter().enumerate() {
                if i == built_after {
                    build(&with);
                }
                for store in [&with, &without] {
                    store.stage_dedup_run(i as u64, vec![spread(*key)], now - age);
                    store.ingest_staged_dedup().unwrap();
                }
            }
            if built_after >= stored.len() {
                build(&with);
            }
            let probes: Vec<u128> = probes.into_iter().map(spread).collect();
            proptest::prop_assert_eq!(
                with.dedup_seen(&probes, now, horizon).unwrap(),
                without.dedup_seen(&probes, now, horizon).unwrap()
            );
            proptest::prop_assert!(without.filters.current().is_none());
        }
    }

    #[test]
    fn a_damaged_run_stops_the_store_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        let mut batch = WriteBatch::default();
        // Cut inside a key.
        batch.put(keys::dedup_run_key(7), &encode_run(&[1, 2], NOW)[..30]);
        store.write(batch, true).unwrap();
        drop(store);
        let error = RocksStore::open(dir.path(), 86_400, 86_400)
            .err()
            .expect("must not open");
        assert!(error.to_string().contains("dedup run"), "{error}");
    }

    #[test]
    fn dedup_keys_of_older_stores_move_to_their_column_family() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        let mut batch = WriteBatch::default();
        for key in [11u128, 12] {
            batch.put(keys::dedup_key(key), (NOW as u64).to_be_bytes());
        }
        store.write(batch, true).unwrap();
        assert_eq!(store.dedup_seen(&[11, 12], NOW, 86_400).unwrap(), [false, false]);
        drop(store);
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        assert_eq!(
            store.dedup_seen(&[11, 12, 13], NOW, 86_400).unwrap(),
            [true, true, false]
        );
        assert!(store.get(&keys::dedup_key(11)).unwrap().is_none());
    }
}
