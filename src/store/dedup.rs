//! Dedup keys in the store: a durable run file per checkpoint, staged in memory, ingested into
//! their own column family in large sorted files.
//!
//! A dedup key per event is most of what tallyd writes. Put through a WriteBatch, each key cost
//! a WAL append and a skiplist insert among millions of random keys, then a flush and the
//! compactions after it: about a third of the daemon's CPU under load (BENCHMARKS.md §5).
//! Instead a checkpoint appends its keys, sorted, to a small run file (`dedup-runs/<g>.run`,
//! 16 bytes a key and a checksum), synced *before* its batch commits. The keys themselves stay
//! in the in-memory `DedupIndex`, which already answers for them; once the staged runs hold
//! `STAGE_MAX_KEYS` keys (or are `STAGE_MAX_SECS` old), one SST file is built from them and
//! ingested, RocksDB links it into the tree without memtable or WAL, and only then the keys
//! leave memory and their run files are deleted. Ingested files are as large as the memtable
//! flushes they replace, so compaction sees the same shape of data as before.
//!
//! Crash safety rests on the checkpoint generation, which the batch records (`M
//! checkpoint_generation`). At startup,
//! - a run of a generation the store has not committed belongs to a batch that never landed:
//!   its events will be replayed and claimed again, so the run is deleted;
//! - the runs of committed generations still in the directory are ingested before the store
//!   serves lookups (a key ingested twice is harmless).
//!
//! So every key of a committed checkpoint is at all times in memory, in a run file, or in the
//! column family.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rocksdb::{ColumnFamily, IngestExternalFileOptions, IteratorMode, SstFileWriter, WriteBatch};
use xxhash_rust::xxh3::xxh3_64;

use super::{keys, read_u64, RocksStore, StoreError, DEDUP_CF, META_GENERATION};

const RUN_SUFFIX: &str = ".run";
const RUN_MAGIC: &[u8; 8] = b"TLYDRUN1";
/// Staged keys that trigger an ingestion: ≈ 50 bytes of memory each (the index entry and the
/// staged copy), and an ingested file of ≈ 25 MB.
pub const STAGE_MAX_KEYS: usize = 1_000_000;
/// ... or their age: a quiet daemon does not keep keys in memory (and run files) for long.
const STAGE_MAX_SECS: u64 = 60;

/// Committed runs not yet ingested (the checkpoint thread's, behind the store's mutex).
#[derive(Default)]
pub(super) struct Staged {
    /// Each committed run: (first seen, its sorted keys).
    runs: Vec<(i64, Vec<u128>)>,
    keys: usize,
    /// The latest generation staged: ingesting covers every run up to it.
    generation: u64,
    since: Option<Instant>,
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
        // Sorted lookups let RocksDB skip its own sort and walk each file once (the sort was
        // ~9 % of a Kafka consumer's CPU); answers go back in the caller's order.
        let mut order: Vec<usize> = (0..dedup_keys.len()).collect();
        order.sort_unstable_by_key(|i| dedup_keys[*i]);
        let lookups: Vec<[u8; 17]> = order.iter().map(|i| keys::dedup_key(dedup_keys[*i])).collect();
        let cf = self.dedup_cf()?;
        let mut out = vec![false; dedup_keys.len()];
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

    /// Writes and syncs the run of checkpoint `generation` (`sorted` ascending, no repeats),
    /// first seen at `seen_secs`. Must precede the batch that commits `generation`.
    pub(super) fn write_dedup_run(
        &self,
        generation: u64,
        sorted: &[u128],
        seen_secs: i64,
    ) -> Result<Option<PathBuf>, StoreError> {
        if sorted.is_empty() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dedup_dir)?;
        let path = self.run_path(generation);
        let mut bytes = Vec::with_capacity(32 + sorted.len() * 16);
        bytes.extend_from_slice(RUN_MAGIC);
        bytes.extend_from_slice(&seen_secs.to_be_bytes());
        bytes.extend_from_slice(&(sorted.len() as u64).to_be_bytes());
        for key in sorted {
            bytes.extend_from_slice(&key.to_be_bytes());
        }
        let checksum = xxh3_64(&bytes);
        bytes.extend_from_slice(&checksum.to_be_bytes());
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        // The directory entry too, so that a committed generation's run cannot vanish.
        std::fs::File::open(&self.dedup_dir)?.sync_all()?;
        Ok(Some(path))
    }

    /// After the batch of `generation` committed: stages its run's keys, and ingests every
    /// staged key when there are enough of them, or they are old enough, or `force`. Returns
    /// the keys now in the column family (the caller forgets them in memory).
    pub(super) fn stage_dedup_run(
        &self,
        generation: u64,
        sorted: Vec<u128>,
        seen_secs: i64,
        force: bool,
    ) -> Result<Vec<u128>, StoreError> {
        let mut staged = self.staged.lock();
        if !sorted.is_empty() {
            staged.keys += sorted.len();
            staged.runs.push((seen_secs, sorted));
            staged.generation = staged.generation.max(generation);
            staged.since.get_or_insert_with(Instant::now);
        }
        let due = staged.keys >= STAGE_MAX_KEYS
            || staged
                .since
                .is_some_and(|since| since.elapsed().as_secs() >= STAGE_MAX_SECS);
        if staged.keys == 0 || !(due || force) {
            return Ok(Vec::new());
        }
        let mut keys: Vec<(u128, i64)> = Vec::with_capacity(staged.keys);
        for (seen_secs, run) in &staged.runs {
            keys.extend(run.iter().map(|key| (*key, *seen_secs)));
        }
        // On error the runs stay staged for the next checkpoint to try again.
        self.ingest_keys(&mut keys)?;
        let generation = staged.generation;
        *staged = Staged::default();
        drop(staged);
        if let Err(error) = self.delete_runs_up_to(generation) {
            // Harmless: the next start ingests them again.
            tracing::warn!(%error, "ingested dedup runs not deleted");
        }
        Ok(keys.into_iter().map(|(key, _)| key).collect())
    }

    /// Ingests every staged key now (shutdown: the next start has no runs to read back).
    pub fn ingest_staged_dedup(&self) -> Result<Vec<u128>, StoreError> {
        self.stage_dedup_run(0, Vec::new(), 0, true)
    }

    /// Builds one SST file of `keys` (sorted here; a key staged twice keeps its first sighting)
    /// and ingests it. On error the keys are left in `keys`.
    fn ingest_keys(&self, keys: &mut Vec<(u128, i64)>) -> Result<(), StoreError> {
        keys.sort_unstable();
        keys.dedup_by_key(|(key, _)| *key);
        std::fs::create_dir_all(&self.dedup_dir)?;
        let path = self.dedup_dir.join("ingest.sst");
        let result = write_sst(&self.dedup_options, &path, keys).and_then(|()| {
            let mut options = IngestExternalFileOptions::default();
            // Linked, not copied; RocksDB removes our link once the file is part of the tree.
            options.set_move_files(true);
            self.db
                .ingest_external_file_cf_opts(self.dedup_cf()?, &options, vec![&path])
                .map_err(StoreError::from)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn delete_runs_up_to(&self, generation: u64) -> Result<(), StoreError> {
        for (run_generation, path) in self.runs()? {
            if run_generation <= generation {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    /// Startup: moves dedup keys of stores from before this column family into it, deletes runs
    /// whose batch never committed, ingests committed ones.
    pub(super) fn recover_dedup_runs(&self) -> Result<(), StoreError> {
        self.migrate_default_cf_dedup_keys()?;
        let committed = read_u64(&self.db, &keys::meta_key(META_GENERATION))?.unwrap_or(0);
        let mut keys = Vec::new();
        let mut runs = 0;
        for (generation, path) in self.runs()? {
            if generation > committed {
                tracing::info!(
                    generation,
                    committed,
                    "discarding the dedup run of an uncommitted checkpoint"
                );
                std::fs::remove_file(path)?;
            } else {
                read_run(&path, &mut keys)?;
                runs += 1;
            }
        }
        if runs > 0 {
            let count = keys.len();
            self.ingest_keys(&mut keys)?;
            self.delete_runs_up_to(committed)?;
            tracing::info!(
                runs,
                keys = count,
                "ingested the dedup runs of committed checkpoints"
            );
        }
        Ok(())
    }

    fn run_path(&self, generation: u64) -> PathBuf {
        self.dedup_dir.join(format!("{generation:020}{RUN_SUFFIX}"))
    }

    /// The runs in the directory, by generation. Files that are not runs are ignored.
    fn runs(&self) -> Result<Vec<(u64, PathBuf)>, StoreError> {
        let entries = match std::fs::read_dir(&self.dedup_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let mut runs = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let generation = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(RUN_SUFFIX))
                .and_then(|stem| stem.parse::<u64>().ok());
            if let Some(generation) = generation {
                runs.push((generation, path));
            }
        }
        runs.sort_unstable();
        Ok(runs)
    }

    /// Stores written before the dedup column family kept `D` keys in the default one.
    fn migrate_default_cf_dedup_keys(&self) -> Result<(), StoreError> {
        let dedup_cf = self.dedup_cf()?;
        let start = [keys::DEDUP];
        let mut batch = WriteBatch::default();
        let mut moved = 0usize;
        for item in self
            .db
            .iterator(IteratorMode::From(&start, rocksdb::Direction::Forward))
        {
            let (key, value) = item?;
            if key.first() != Some(&keys::DEDUP) {
                break;
            }
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

/// Appends a run file's (key, first seen) pairs, refusing a torn or altered file.
fn read_run(path: &Path, out: &mut Vec<(u128, i64)>) -> Result<(), StoreError> {
    let bytes = std::fs::read(path)?;
    let corrupt = |detail: &str| StoreError::Corrupt {
        what: "dedup run",
        detail: format!("{}: {detail}", path.display()),
    };
    if bytes.len() < 32 || &bytes[..8] != RUN_MAGIC {
        return Err(corrupt("not a dedup run"));
    }
    let (body, checksum) = bytes.split_at(bytes.len() - 8);
    if xxh3_64(body).to_be_bytes() != checksum {
        return Err(corrupt("checksum mismatch"));
    }
    let seen_secs = i64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
    let count = u64::from_be_bytes(body[16..24].try_into().expect("8 bytes"));
    let keys = &body[24..];
    if keys.len() as u64 != count.saturating_mul(16) {
        return Err(corrupt("length does not match its key count"));
    }
    out.extend(
        keys.chunks_exact(16)
            .map(|key| (u128::from_be_bytes(key.try_into().expect("16 bytes")), seen_secs)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checkpoint::Snapshot;

    const NOW: i64 = 1_700_000_000;

    fn commit(store: &RocksStore, generation: u64, dedup_keys: Vec<u128>) -> Vec<u128> {
        let snapshot = Snapshot {
            generation,
            dedup_keys,
            ..Default::default()
        };
        let prepared = store
            .prepare_checkpoint(
                &snapshot,
                &Default::default(),
                &Default::default(),
                NOW,
                60,
                &Default::default(),
            )
            .unwrap();
        store.commit_checkpoint(prepared).unwrap().1
    }

    fn run_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("dedup-runs"))
            .map(|entries| {
                entries
                    .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn committed_runs_survive_a_crash_and_uncommitted_ones_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        // Committed, staged: memory answers for these keys, the store does not have them yet.
        assert!(commit(&store, 1, vec![1, 2]).is_empty());
        assert!(commit(&store, 2, vec![3]).is_empty());
        assert_eq!(store.dedup_seen(&[1, 2, 3], NOW, 86_400).unwrap(), [false; 3]);
        // The run of a checkpoint whose batch never landed (a crash between the two writes).
        store.write_dedup_run(3, &[4], NOW).unwrap();
        assert_eq!(run_files(dir.path()).len(), 3);
        drop(store);

        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        assert_eq!(
            store.dedup_seen(&[1, 2, 3, 4], NOW, 86_400).unwrap(),
            [true, true, true, false],
            "committed keys are in the store after the restart, the uncommitted one is not"
        );
        assert!(run_files(dir.path()).is_empty(), "{:?}", run_files(dir.path()));
    }

    #[test]
    fn staged_keys_move_into_the_store_in_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        let first: Vec<u128> = (0..STAGE_MAX_KEYS as u128 - 1).map(|i| i * 7919).collect();
        assert!(commit(&store, 1, first.clone()).is_empty(), "below the threshold");
        // The run that reaches the threshold moves everything staged, in one file.
        let moved = commit(&store, 2, vec![u128::MAX, 7919]);
        assert_eq!(
            moved.len(),
            STAGE_MAX_KEYS,
            "7919 was staged twice and moves once"
        );
        assert!(run_files(dir.path()).is_empty());
        let probe = [0, 7919, u128::MAX, 5];
        assert_eq!(
            store.dedup_seen(&probe, NOW, 86_400).unwrap(),
            [true, true, true, false]
        );
        // An empty stage has nothing to move, forced or not.
        assert!(store.ingest_staged_dedup().unwrap().is_empty());
    }

    #[test]
    fn a_key_staged_twice_keeps_its_first_sighting() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 100).unwrap();
        store.write_dedup_run(1, &[9], NOW - 500).unwrap();
        store.stage_dedup_run(1, vec![9], NOW - 500, false).unwrap();
        store.write_dedup_run(2, &[9], NOW).unwrap();
        assert_eq!(store.stage_dedup_run(2, vec![9], NOW, true).unwrap(), [9]);
        // Seen 500 s ago, the horizon is 100 s: expired, though seen again since.
        assert_eq!(store.dedup_seen(&[9], NOW, 100).unwrap(), [false]);
        assert_eq!(store.dedup_seen(&[9], NOW, 1_000).unwrap(), [true]);
    }

    #[test]
    fn a_damaged_committed_run_stops_the_store_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        commit(&store, 1, vec![1, 2, 3]);
        drop(store);
        let run = dir.path().join("dedup-runs").join(&run_files(dir.path())[0]);
        let mut bytes = std::fs::read(&run).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&run, &bytes).unwrap();
        let error = RocksStore::open(dir.path(), 86_400, 86_400)
            .err()
            .expect("must not open");
        assert!(error.to_string().contains("checksum mismatch"), "{error}");
        // A torn one too (cut inside a key).
        std::fs::write(&run, &bytes[..40]).unwrap();
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
