//! RocksDB: checkpointed aggregates, source positions, dedup keys, the close index and the outbox.
//!
//! Owns the on-disk layout (`keys`), the associative merge operator that folds aggregate deltas
//! without read-modify-write, and the compaction filter that enforces retention and the dedup
//! horizon. Callers must run every method off the async executor (they block on disk).
//!
//! Invariant: a source position is only ever written in the same WriteBatch as the aggregates
//! and dedup keys that it reflects (see `checkpoint`; the keys reach their column family later,
//! see `dedup`).

pub mod changelog;
pub mod checkpoint;
pub mod clock;
mod dedup;
pub mod dedup_filter;
pub mod failpoint;
pub mod format;
pub mod keys;
pub mod log;
mod meters;
mod outbox;
pub mod rated;
pub mod tenants;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use rocksdb::{
    BlockBasedOptions, DBCompressionType, Direction, IteratorMode, MergeOperands, Options, ReadOptions,
    SnapshotWithThreadMode, WriteBatch, WriteOptions, DB,
};

use crate::aggregate::AggState;
use keys::SeriesName;
pub use meters::{MeterCatalog, MeterShape};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("meter definitions changed incompatibly: {0}")]
    MeterChanged(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} unavailable: {detail}")]
    Unavailable { what: &'static str, detail: String },
    /// The data directory's stored formats are not this build's (`format`).
    #[error("cannot open the data directory: {0}")]
    Format(String),
}

/// A stored key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

pub struct RocksStore {
    db: DB,
    /// Next outbox sequence; only the checkpoint thread advances it.
    outbox_next: AtomicU64,
    /// Restores that wrote lines to re-emit (`E` keys; 1 at open: a crash may have left some),
    /// and how many of them checkpoints have moved to the outbox: unequal → look for `E` keys.
    reemit_restored: AtomicU64,
    reemit_moved: AtomicU64,
    /// Windows ending at or before this unix second have been closed and emitted.
    closed_before: AtomicI64,
    /// Close-index (`W`) keys known to be in the store, so checkpoints write each once.
    /// Process-local: after a restart they are rewritten once (puts are idempotent).
    indexed_windows: parking_lot::Mutex<rustc_hash::FxHashSet<checkpoint::IndexedWindow>>,
    /// Registered emitters' cursors (next outbox sequence each must deliver).
    emitters: parking_lot::Mutex<HashMap<String, u64>>,
    /// Options of the dedup column family, which its ingested runs must be written with.
    dedup_options: Options,
    /// Where dedup keys' SST files are built before ingestion (see `dedup`).
    dedup_dir: PathBuf,
    staged: parking_lot::Mutex<dedup::Staged>,
    /// Held through one ingestion of staged dedup keys (`dedup`).
    ingesting: parking_lot::Mutex<()>,
    /// The in-memory filter over the dedup column family's keys (`dedup_filter`).
    filters: dedup_filter::Filters,
    dedup_horizon_secs: i64,
    writer: u32,
    /// What expiry takes for now (`clock`): shared with the dedup compaction filter.
    expiry: clock::ExpiryClock,
    /// Which replicated sources have fed each tenant (`tenants`).
    pub tenant_sources: tenants::TenantSources,
}

/// Column family of the dedup keys (`D` keys): written as ingested sorted files, not through
/// the memtable (see `dedup`).
const DEDUP_CF: &str = "dedup";

/// Position name of the local ingest log (HTTP CloudEvents and OTLP batches).
pub const INGEST_LOG_SOURCE: &str = "ingest-log";
const META_CLOSED_BEFORE: &str = "closed_before";
const META_OUTBOX_NEXT: &str = "outbox_next";
/// This store's random id: the high half of every changelog flush id it writes, so that a
/// restore can tell its own unacknowledged flushes from another replica's (`store::changelog`).
const META_WRITER: &str = "writer";
/// The generation of the last committed checkpoint: queries combine a store snapshot with the
/// snapshots still in flight, and this says which of those the store snapshot already holds.
const META_GENERATION: &str = "checkpoint_generation";

/// RocksDB's merge callback. It runs inside RocksDB's C++ code, where a panic would abort the
/// process: states are checked at decoding, and any panic left is caught and reported as a
/// failed merge (RocksDB then answers that key with a corruption error).
fn merge_aggregates(key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        merge_operands(existing, operands)
    }))
    .unwrap_or_else(|_| {
        tracing::error!(key = ?key, "merging aggregate states panicked; the key reads as corrupt");
        None
    })
}

fn merge_operands(existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut state: Option<AggState> = match existing {
        Some(bytes) => Some(AggState::decode(bytes).ok()?),
        None => None,
    };
    for operand in operands {
        let delta = AggState::decode(operand).ok()?;
        match &mut state {
            Some(state) => state.merge(&delta).ok()?,
            None => state = Some(delta),
        }
    }
    // Returning None makes RocksDB report corruption instead of silently dropping usage.
    state.map(|state| state.encode())
}

fn unix_now_secs() -> i64 {
    crate::model::now_ms().div_euclid(1000)
}

/// The dedup column family: random 16-byte keys that do not compress, looked up in batches that
/// mostly miss (a bloom filter per file answers those from memory), dropped by compaction once
/// past the horizon. Its files arrive ingested (`dedup`).
fn dedup_cf_options(cache: &rocksdb::Cache, dedup_horizon_secs: i64, expiry: clock::ExpiryClock) -> Options {
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::None);
    options.set_compaction_filter(
        "tallyd_dedup_horizon_v1",
        move |_level: u32, _key: &[u8], value: &[u8]| {
            use rocksdb::compaction_filter::Decision;
            match value.try_into().map(u64::from_be_bytes) {
                Ok(first_seen) if (first_seen as i64) < expiry.now_secs() - dedup_horizon_secs => {
                    Decision::Remove
                }
                _ => Decision::Keep,
            }
        },
    );
    let mut table = table_options(cache);
    // Partitioned filters: a lookup loads one 4 KiB filter partition, not a file's whole
    // filter. A compacted dedup file holds millions of keys (a 5-20 MB filter); whole filters
    // did not stay in the shared cache, and the soak found request threads spending a fifth
    // of their time re-reading and checksumming them (RELIABILITY.md, "Soak"; BENCHMARKS.md,
    // "Dedup keys and the dedup filter").
    table.set_partition_filters(true);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_metadata_block_size(4096);
    table.set_pin_top_level_index_and_filter(true);
    options.set_block_based_table_factory(&table);
    options
}

/// Both column families: bloom filters (point lookups mostly miss), index and filter blocks in
/// the shared cache, L0's pinned.
fn table_options(cache: &rocksdb::Cache) -> BlockBasedOptions {
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_block_cache(cache);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table
}

impl RocksStore {
    pub fn open(path: &Path, retention_secs: i64, dedup_horizon_secs: i64) -> Result<RocksStore, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(DBCompressionType::Lz4);
        // What the memtables hold is replayed from the WAL after a crash; RocksDB's default
        // size keeps that replay short (dedup keys, the bulk of all writes, bypass it).
        options.set_write_buffer_size(64 << 20);
        options.set_merge_operator_associative("tallyd_aggregate_v1", merge_aggregates);
        // Nothing expires until the stored mark is read (compactions may start at open).
        let expiry = clock::ExpiryClock::new();
        let retention_clock = expiry.clone();
        options.set_compaction_filter(
            "tallyd_retention_v1",
            move |_level: u32, key: &[u8], _value: &[u8]| {
                use rocksdb::compaction_filter::Decision;
                let now = retention_clock.now_secs();
                match key.first() {
                    Some(&keys::AGGREGATE)
                    | Some(&keys::REVISION)
                    | Some(&keys::RATED)
                    | Some(&keys::LEDGER) => match keys::suffix_window_start(&key[1..]) {
                        Some(start) if start < now - retention_secs => Decision::Remove,
                        _ => Decision::Keep,
                    },
                    _ => Decision::Keep,
                }
            },
        );
        // Filters and index blocks must stay cached: with the crate's 8 MB default, millions of
        // dedup keys' filters were evicted and re-read (and checksummed) on every lookup batch,
        // 53 % of a Kafka consumer's CPU. L0 filters (the newest keys, the most looked up) are
        // pinned. One cache serves both column families.
        let cache = rocksdb::Cache::new_lru_cache(256 << 20);
        options.set_block_based_table_factory(&table_options(&cache));
        options.increase_parallelism(2);

        let dedup_options = dedup_cf_options(&cache, dedup_horizon_secs, expiry.clone());
        let default_cf =
            rocksdb::ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, options.clone());
        let dedup_cf = rocksdb::ColumnFamilyDescriptor::new(DEDUP_CF, dedup_options.clone());
        let db = DB::open_cf_descriptors(&options, path, [default_cf, dedup_cf])?;
        // Before anything is read: a store from another version is refused, never misread.
        format::check(&db)?;
        let outbox_next = read_u64(&db, &keys::meta_key(META_OUTBOX_NEXT))?.unwrap_or(0);
        let closed_before = read_u64(&db, &keys::meta_key(META_CLOSED_BEFORE))?
            .map(|v| v as i64)
            .unwrap_or(i64::MIN);
        let stored_clock = read_u64(&db, &keys::meta_key(clock::META_CLOCK))?.map(|secs| secs as i64);
        expiry.start(stored_clock);
        let writer = match read_u64(&db, &keys::meta_key(META_WRITER))? {
            Some(id) => id as u32,
            None => {
                let id = rand::random::<u32>();
                let mut options = rocksdb::WriteOptions::default();
                options.set_sync(true);
                db.put_opt(keys::meta_key(META_WRITER), u64::from(id).to_be_bytes(), &options)?;
                id
            }
        };
        let tenant_sources = tenants::TenantSources::load(&db)?;
        let store = RocksStore {
            db,
            tenant_sources,
            outbox_next: AtomicU64::new(outbox_next),
            reemit_restored: AtomicU64::new(1),
            reemit_moved: AtomicU64::new(0),
            closed_before: AtomicI64::new(closed_before),
            indexed_windows: Default::default(),
            emitters: Default::default(),
            dedup_options,
            dedup_dir: path.join("dedup-ingest"),
            staged: Default::default(),
            ingesting: Default::default(),
            filters: Default::default(),
            dedup_horizon_secs,
            writer,
            expiry,
        };
        store.recover_dedup_runs()?;
        Ok(store)
    }

    /// The generation of the last checkpoint committed as of `snapshot` (0 before any).
    pub fn checkpoint_generation(
        &self,
        snapshot: &SnapshotWithThreadMode<'_, DB>,
    ) -> Result<u64, StoreError> {
        let key = keys::meta_key(META_GENERATION);
        match snapshot.get(&key)? {
            None => Ok(0),
            Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    what: "u64 value",
                    detail: META_GENERATION.into(),
                }),
        }
    }

    /// What expiry takes for now (`clock`).
    pub fn expiry_clock(&self) -> &clock::ExpiryClock {
        &self.expiry
    }

    /// The checkpointed ingest-log position: every record with a lower sequence is in the store.
    pub fn ingest_log_position(&self) -> Result<u64, StoreError> {
        Ok(self.position(INGEST_LOG_SOURCE)?.unwrap_or(0))
    }

    /// This store's id in changelog flush ids (`store::changelog::flush_id`).
    pub fn writer(&self) -> u32 {
        self.writer
    }

    /// A source's checkpointed next position, if it ever had one.
    pub fn position(&self, source: &str) -> Result<Option<u64>, StoreError> {
        read_u64(&self.db, &keys::position_key(source))
    }

    pub fn snapshot(&self) -> SnapshotWithThreadMode<'_, DB> {
        self.db.snapshot()
    }

    /// All checkpointed series of `meter` (optionally one tenant) with a window start in
    /// `[from_secs, to_secs)`, read at `snapshot`.
    pub fn scan_series(
        &self,
        snapshot: &SnapshotWithThreadMode<'_, DB>,
        meter: &str,
        tenant: Option<&str>,
        from_secs: i64,
        to_secs: i64,
    ) -> Result<Vec<(SeriesName, AggState)>, StoreError> {
        let prefix = keys::aggregate_prefix(meter, tenant);
        let mut start = prefix.clone();
        if tenant.is_some() {
            // Within one tenant the window is next in the key: seek straight to `from`.
            start.extend_from_slice(&keys::time_bytes(from_secs));
        }
        let mut out = Vec::new();
        let iterator = snapshot.iterator_opt(
            IteratorMode::From(&start, Direction::Forward),
            ReadOptions::default(),
        );
        for item in iterator {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let name = keys::decode_series_suffix(&key[1..]).ok_or_else(|| StoreError::Corrupt {
                what: "aggregate key",
                detail: format!("{key:?}"),
            })?;
            if name.window_start < from_secs || name.window_start >= to_secs {
                continue;
            }
            let state = AggState::decode(&value).map_err(|error| StoreError::Corrupt {
                what: "aggregate state",
                detail: error.to_string(),
            })?;
            out.push((name, state));
        }
        Ok(out)
    }

    pub fn closed_before(&self) -> i64 {
        self.closed_before.load(Ordering::Acquire)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        failpoint::check(failpoint::STORE_WRITE)?;
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?)
    }

    /// Every cumulative stream's checkpointed last point (loaded once, at startup).
    pub fn stream_states(&self) -> Result<Vec<(u128, crate::aggregate::streams::StreamState)>, StoreError> {
        let mut out = Vec::new();
        let start = [keys::STREAM];
        for item in self.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            if key.first() != Some(&keys::STREAM) {
                break;
            }
            let corrupt = |detail: String| StoreError::Corrupt {
                what: "stream state",
                detail,
            };
            let id: [u8; 16] = key[1..]
                .try_into()
                .map_err(|_| corrupt(format!("key of {} bytes", key.len())))?;
            let state = crate::aggregate::streams::StreamState::decode(&value)
                .map_err(|error| corrupt(error.to_string()))?;
            out.push((u128::from_be_bytes(id), state));
        }
        Ok(out)
    }

    /// Iterates keys of one kind from `start` (inclusive) while `keep` holds.
    /// Keys and values from `start` while `keep(key)`.
    pub fn scan_entries(
        &self,
        start: &[u8],
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(start, Direction::Forward)) {
            let (key, value) = item?;
            if !keep(&key) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    pub fn scan_keys(
        &self,
        start: &[u8],
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(start, Direction::Forward)) {
            let (key, _) = item?;
            if !keep(&key) {
                break;
            }
            out.push(key.to_vec());
        }
        Ok(out)
    }

    /// Compacts the whole key space now (applies retention immediately; used by tests and ops).
    pub fn compact_all(&self) {
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        if let Ok(cf) = self.dedup_cf() {
            self.db.compact_range_cf::<&[u8], &[u8]>(cf, None, None);
        }
    }

    /// Approximate on-disk size, for metrics.
    pub fn live_data_bytes(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.live-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

fn read_u64(db: &DB, key: &[u8]) -> Result<Option<u64>, StoreError> {
    match db.get(key)? {
        None => Ok(None),
        Some(bytes) => match <[u8; 8]>::try_from(bytes.as_slice()) {
            Ok(array) => Ok(Some(u64::from_be_bytes(array))),
            Err(_) => Err(StoreError::Corrupt {
                what: "u64 value",
                detail: String::from_utf8_lossy(key).into_owned(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::checkpoint::Snapshot;
    use super::*;
    use crate::aggregate::{Aggregation, Observation};
    use crate::meter::{JsonPath, Meter};
    use crate::model::{Names, SeriesKey, WindowSize};

    const NOW: i64 = 1_795_321_200; // a minute boundary

    fn meter(slug: &str, aggregation: Aggregation, scale: u32) -> Meter {
        Meter {
            id: 0,
            slug: slug.into(),
            description: None,
            source: crate::meter::MeterSource::CloudEvents,
            event_type: "t".into(),
            aggregation,
            value_property: Some(JsonPath::parse("$.v").unwrap()),
            group_by: Vec::new(),
            group_by_attributes: Vec::new(),
            window_size: WindowSize::Minute,
            scale,
            unique_exact_limit: 10,
            allow_negative: false,
            max_gap_secs: 900,
            per_event_fee: None,
        }
    }

    fn lines(store: &RocksStore) -> Vec<serde_json::Value> {
        store
            .pending_outbox()
            .unwrap()
            .into_iter()
            .map(|(_, line)| serde_json::from_slice(&line).unwrap())
            .collect()
    }

    fn checkpoint(store: &RocksStore, names: &Names, catalog: &MeterCatalog, snapshot: Snapshot, now: i64) {
        let prepared = store
            .prepare_checkpoint(&snapshot, names, catalog, now, 60, &Default::default())
            .unwrap();
        store.commit_checkpoint(prepared).unwrap();
    }

    /// A checkpoint with no new usage (windows still close on time).
    fn idle(next_log_seq: u64) -> Snapshot {
        Snapshot {
            positions: vec![(INGEST_LOG_SOURCE.into(), next_log_seq)],
            ..Snapshot::default()
        }
    }

    /// A store with one SUM meter, `tokens`, and the names its tests intern.
    fn tokens_store(path: &Path) -> (RocksStore, Names, MeterCatalog) {
        let store = RocksStore::open(path, 400 * 86_400, 86_400).unwrap();
        let catalog = store
            .guard_meters(&[meter("tokens", Aggregation::Sum, 0)])
            .unwrap();
        (store, Names::default(), catalog)
    }

    #[test]
    fn windows_close_once_and_late_deltas_emit_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let (store, names, catalog) = tokens_store(dir.path());
        let key = SeriesKey {
            meter: names.meters.intern("tokens"),
            tenant: names.tenants.intern("acme"),
            dims: 0,
            window_start: NOW,
        };
        let delta = |v| {
            vec![(
                key,
                AggState::from_observation(Aggregation::Sum, Observation::Value(v), 0, 0),
            )]
        };

        // Window [NOW, NOW+60) is open until NOW+120: nothing emitted, position recorded.
        let snapshot = Snapshot {
            generation: 5,
            positions: vec![(INGEST_LOG_SOURCE.into(), 5)],
            deltas: delta(10),
            dedup_keys: vec![42],
            sources: Vec::new(),
            streams: Vec::new(),
        };
        checkpoint(&store, &names, &catalog, snapshot, NOW + 30);
        assert!(lines(&store).is_empty());
        assert_eq!(store.ingest_log_position().unwrap(), 5);
        // Staged (the daemon's memory answers for it) until the store ingests it in bulk.
        assert_eq!(store.dedup_seen(&[42], NOW + 30, 86_400).unwrap(), vec![false]);
        assert_eq!(store.ingest_staged_dedup().unwrap(), [42]);
        assert_eq!(
            store.dedup_seen(&[42, 43], NOW + 30, 86_400).unwrap(),
            vec![true, false]
        );

        // More usage in the same open window, then the window closes with the merged total.
        let snapshot = Snapshot {
            generation: 6,
            positions: vec![(INGEST_LOG_SOURCE.into(), 6)],
            deltas: delta(5),
            dedup_keys: vec![],
            sources: Vec::new(),
            streams: Vec::new(),
        };
        checkpoint(&store, &names, &catalog, snapshot, NOW + 60);
        assert!(lines(&store).is_empty());
        checkpoint(&store, &names, &catalog, idle(6), NOW + 120);
        let emitted = lines(&store);
        assert_eq!(emitted.len(), 1);
        assert_eq!(
            (emitted[0]["revision"].clone(), emitted[0]["quantity"].clone()),
            (1.into(), "15".into())
        );

        // Closing is once: a later checkpoint emits nothing new.
        store.clear_outbox(u64::MAX - 1).unwrap();
        checkpoint(&store, &names, &catalog, idle(6), NOW + 500);
        assert!(lines(&store).is_empty());

        // A late delta amends the window: same record id, next revision, whole new total.
        checkpoint(
            &store,
            &names,
            &catalog,
            Snapshot {
                generation: 7,
                positions: vec![(INGEST_LOG_SOURCE.into(), 7)],
                deltas: delta(7),
                dedup_keys: vec![],
                sources: Vec::new(),
                streams: Vec::new(),
            },
            NOW + 600,
        );
        let amended = lines(&store);
        assert_eq!(amended.len(), 1);
        assert_eq!(amended[0]["record_id"], emitted[0]["record_id"]);
        assert_eq!(
            (amended[0]["revision"].clone(), amended[0]["quantity"].clone()),
            (2.into(), "22".into())
        );
    }

    #[test]
    fn every_window_closes_whichever_checkpoint_first_changed_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, names, catalog) = tokens_store(dir.path());
        let tokens = names.meters.intern("tokens");
        let delta = |tenant: &str, window_start: i64, v: i128| {
            (
                SeriesKey {
                    meter: tokens,
                    tenant: names.tenants.intern(tenant),
                    dims: 0,
                    window_start,
                },
                AggState::from_observation(Aggregation::Sum, Observation::Value(v), 0, 0),
            )
        };
        let snapshot = |generation: u64, deltas| Snapshot {
            generation,
            positions: vec![(INGEST_LOG_SOURCE.into(), generation)],
            deltas,
            ..Snapshot::default()
        };
        let open_windows = || {
            store
                .scan_keys(&[keys::OPEN_WINDOW], |key| {
                    key.first() == Some(&keys::OPEN_WINDOW)
                })
                .unwrap()
                .len()
        };
        // `a` is indexed by the first checkpoint, `b` (same window) by the second, `c` (the
        // next window) by the third; `a` changes again in between.
        checkpoint(
            &store,
            &names,
            &catalog,
            snapshot(1, vec![delta("a", NOW, 1)]),
            NOW + 10,
        );
        checkpoint(
            &store,
            &names,
            &catalog,
            snapshot(2, vec![delta("b", NOW, 2), delta("a", NOW, 3)]),
            NOW + 20,
        );
        checkpoint(
            &store,
            &names,
            &catalog,
            snapshot(3, vec![delta("c", NOW + 60, 4)]),
            NOW + 70,
        );
        assert_eq!(open_windows(), 3, "one close-index key per tenant window");
        assert!(lines(&store).is_empty());

        let closed = |now| {
            checkpoint(&store, &names, &catalog, idle(3), now);
            let mut closed: Vec<(String, String)> = lines(&store)
                .iter()
                .map(|line| {
                    (
                        line["tenant"].as_str().unwrap().into(),
                        line["quantity"].as_str().unwrap().into(),
                    )
                })
                .collect();
            closed.sort();
            store.clear_outbox(u64::MAX - 1).unwrap();
            closed
        };
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(t, q)| (t.to_string(), q.to_string()))
                .collect()
        };
        assert_eq!(closed(NOW + 120), owned(&[("a", "4"), ("b", "2")]));
        assert_eq!(open_windows(), 1);
        assert_eq!(closed(NOW + 180), owned(&[("c", "4")]));
        assert_eq!(open_windows(), 0);
    }

    #[test]
    fn forgotten_streams_are_deleted_with_the_checkpoint() {
        use crate::aggregate::streams::StreamState;
        let dir = tempfile::tempdir().unwrap();
        let (store, names, catalog) = tokens_store(dir.path());
        let state = StreamState {
            start_ns: 1,
            time_ns: 2,
            value: 3,
        };
        let with_streams = |generation, streams| Snapshot {
            generation,
            positions: vec![(INGEST_LOG_SOURCE.into(), generation)],
            streams,
            ..Snapshot::default()
        };
        checkpoint(
            &store,
            &names,
            &catalog,
            with_streams(1, vec![(7, Some(state)), (8, Some(state))]),
            NOW,
        );
        assert_eq!(store.stream_states().unwrap().len(), 2);
        checkpoint(&store, &names, &catalog, with_streams(2, vec![(7, None)]), NOW);
        assert_eq!(store.stream_states().unwrap(), vec![(8, state)]);
    }

    #[test]
    fn a_meter_shape_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        store.guard_meters(&[meter("gb", Aggregation::Sum, 6)]).unwrap();
        store.guard_meters(&[meter("gb", Aggregation::Sum, 6)]).unwrap();
        let error = store
            .guard_meters(&[meter("gb", Aggregation::Sum, 3)])
            .unwrap_err();
        assert!(error.to_string().contains("meter `gb`"), "{error}");
        assert!(store.guard_meters(&[meter("gb", Aggregation::Max, 6)]).is_err());
        // A removed meter stays in the catalogue so its data can still be read.
        let catalog = store.guard_meters(&[]).unwrap();
        assert_eq!(catalog["gb"].scale, 6);
    }

    #[test]
    fn retention_and_dedup_horizon_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::model::now_ms() / 1000;
        let store = RocksStore::open(dir.path(), 3_600, 100).unwrap();
        let old = keys::with_kind(keys::AGGREGATE, &keys::series_suffix("m", "t", now - 7_200, &[]));
        let fresh = keys::with_kind(keys::AGGREGATE, &keys::series_suffix("m", "t", now, &[]));
        let mut batch = WriteBatch::default();
        batch.put(&old, AggState::Sum(1.into()).encode());
        batch.put(&fresh, AggState::Sum(2.into()).encode());
        store.write(batch, true).unwrap();
        for (key, seen) in [(1, now - 200), (2, now)] {
            store.stage_dedup_run(0, vec![key], seen);
            assert_eq!(store.ingest_staged_dedup().unwrap(), [key]);
        }
        // Expired dedup keys stop counting before compaction removes them.
        assert_eq!(store.dedup_seen(&[1, 2], now, 100).unwrap(), vec![false, true]);
        store.compact_all();
        assert!(
            store.get(&old).unwrap().is_none(),
            "window past retention is dropped"
        );
        assert!(store.get(&fresh).unwrap().is_some());
        let dedup_cf = store.dedup_cf().unwrap();
        assert!(
            store.db.get_cf(dedup_cf, keys::dedup_key(1)).unwrap().is_none(),
            "dedup key past horizon is dropped"
        );
        assert!(store.db.get_cf(dedup_cf, keys::dedup_key(2)).unwrap().is_some());
    }

    #[test]
    fn merge_operator_folds_deltas_without_read_modify_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        let key = keys::with_kind(keys::AGGREGATE, &keys::series_suffix("m", "t", 0, &[]));
        for value in [3, 4, 5] {
            let mut batch = WriteBatch::default();
            batch.merge(&key, AggState::Max(value.into()).encode());
            store.write(batch, false).unwrap();
        }
        store.compact_all();
        let mut batch = WriteBatch::default();
        batch.merge(&key, AggState::Max(1.into()).encode());
        store.write(batch, false).unwrap();
        assert_eq!(
            AggState::decode(&store.get(&key).unwrap().unwrap()).unwrap(),
            AggState::Max(5.into())
        );
        // A mismatched operand is an error, not silently dropped usage.
        let mut batch = WriteBatch::default();
        batch.merge(&key, AggState::Sum(1.into()).encode());
        store.write(batch, false).unwrap();
        assert!(store.get(&key).is_err());
    }

    /// Two stores of the `tokens` meter: a partition's owner and the replica that takes it over.
    /// acme's `tokens` series in the window starting at NOW.
    fn acme_tokens(names: &Names) -> SeriesKey {
        SeriesKey {
            meter: names.meters.intern("tokens"),
            tenant: names.tenants.intern("acme"),
            dims: 0,
            window_start: NOW,
        }
    }

    /// A checkpoint cut of `value` for `key` from replicated `source`, at `position`.
    fn usage_from(source: &str, key: SeriesKey, generation: u64, position: u64, value: i128) -> Snapshot {
        Snapshot {
            generation,
            positions: vec![(source.to_string(), position)],
            sources: vec![crate::aggregate::SourceCut {
                source: source.to_string(),
                series: vec![key],
                dedup_keys: Vec::new(),
            }],
            deltas: vec![(
                key,
                AggState::from_observation(Aggregation::Sum, Observation::Value(value), 0, 0),
            )],
            ..Snapshot::default()
        }
    }

    fn origin_and_replica() -> ([tempfile::TempDir; 2], RocksStore, RocksStore, MeterCatalog) {
        let meters = [meter("tokens", Aggregation::Sum, 0)];
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let origin = RocksStore::open(dirs[0].path(), 400 * 86_400, 86_400).unwrap();
        let replica = RocksStore::open(dirs[1].path(), 400 * 86_400, 86_400).unwrap();
        let catalog = origin.guard_meters(&meters).unwrap();
        replica.guard_meters(&meters).unwrap();
        (dirs, origin, replica, catalog)
    }

    #[test]
    fn changelog_restore_reproduces_the_source_state() {
        use crate::aggregate::SourceCut;
        let names = Names::default();
        let (_dirs, origin, replica, catalog) = origin_and_replica();
        // With dedup filters built before anything is stored, the restored and ingested keys
        // reach lookups only through the writers' side of the filter protocol.
        for store in [&origin, &replica] {
            let stop = std::sync::atomic::AtomicBool::new(false);
            assert_eq!(store.build_dedup_filter(&stop).unwrap().unwrap().keys, 0);
        }
        let source = "kafka/usage/3".to_string();
        let mut published = Vec::new();
        let mut expected: std::collections::BTreeMap<i64, i128> = Default::default();
        for round in 0..4i64 {
            let deltas: Vec<(SeriesKey, AggState)> = (0..5i64)
                .map(|w| {
                    let key = SeriesKey {
                        meter: names.meters.intern("tokens"),
                        tenant: names.tenants.intern("acme"),
                        dims: 0,
                        window_start: NOW - 600 + w * 60,
                    };
                    let value = (round * 10 + w + 1) as i128;
                    *expected.entry(key.window_start).or_default() += value;
                    (
                        key,
                        AggState::from_observation(Aggregation::Sum, Observation::Value(value), 0, 0),
                    )
                })
                .collect();
            let snapshot = Snapshot {
                generation: round as u64 + 1,
                positions: vec![(source.clone(), (round as u64 + 1) * 100)],
                sources: vec![SourceCut {
                    source: source.clone(),
                    series: deltas.iter().map(|(key, _)| *key).collect(),
                    dedup_keys: vec![round as u128],
                }],
                deltas,
                dedup_keys: vec![round as u128],
                streams: Vec::new(),
            };
            let prepared = origin
                .prepare_checkpoint(&snapshot, &names, &catalog, NOW + round, 60, &Default::default())
                .unwrap();
            published.extend(prepared.changelog.clone());
            origin.commit_checkpoint(prepared).unwrap();
        }
        let flushes = changelog::complete_flushes(&source, published);
        assert_eq!(flushes.len(), 4);
        assert_eq!(
            replica.restore_source(&source, &flushes, &catalog).unwrap(),
            Some(400)
        );
        assert_eq!(replica.position(&source).unwrap(), Some(400));
        assert_eq!(origin.ingest_staged_dedup().unwrap().len(), 4);
        for store in [&origin, &replica] {
            let snapshot = store.snapshot();
            let rows = store
                .scan_series(&snapshot, "tokens", Some("acme"), 0, i64::MAX)
                .unwrap();
            let totals: std::collections::BTreeMap<i64, i128> = rows
                .into_iter()
                .map(|(name, state)| (name.window_start, state.value_string(0).parse::<i128>().unwrap()))
                .collect();
            assert_eq!(totals, expected);
            assert_eq!(
                store.dedup_seen(&[0, 3, 9], NOW, 86_400).unwrap(),
                [true, true, false]
            );
        }
        // The replica that took the partition over knows where acme's usage is.
        assert_eq!(replica.tenant_sources.sources_of("acme"), [source.as_str()]);
    }

    /// Cluster run #13's finding (RELIABILITY.md, 6): the group gave a partition to another
    /// replica before its old owner heard of it, and the old owner (a zombie) emitted a
    /// revision the new one then emitted with other contents. Against a real Kafka-protocol
    /// broker (librdkafka's mock cluster): the new owner fences the partition's changelog and
    /// restores what came before; the zombie's next publish finds the fence between its own
    /// chunks, so its checkpoint, prepared again, emits and publishes nothing for the
    /// partition; the new owner emits the window once; a third replica restoring the whole
    /// changelog gets the new owner's state, not the zombie's late flush.
    #[test]
    fn a_zombie_owner_is_fenced_and_emits_nothing_the_new_owner_does_not() {
        use crate::ingest::kafka::changelog::{restore_partition, ChangelogProducer, Compaction};
        use crate::state::ChangelogSink;
        const TOPIC: &str = "usage.changelog";
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 4, 1).unwrap();
        let config = crate::config::KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topics: vec!["usage".into()],
            group_id: "fence-test".into(),
            dlq_topic: "usage.dlq".into(),
            id_header: "ce_id".into(),
            create_time_tolerance_ms: 3_600_000,
            max_batch_messages: 100,
            max_pending_series: 1000,
            fold_threads: 1,
            changelog_topic: Some(TOPIC.into()),
            changelog_compact_bytes: 0,
            changelog_compact_interval_secs: 3600,
            properties: Vec::new(),
        };
        let compaction = Compaction {
            bytes: 0,
            interval: std::time::Duration::from_secs(3600),
            dedup_horizon_secs: 86_400,
            retention_secs: 400 * 86_400,
        };
        let names = Names::default();
        let (_dirs, zombie, owner, catalog) = origin_and_replica();
        let source = "kafka/usage/3";
        for store in [&zombie, &owner] {
            store
                .tenant_sources
                .set_owned(Some([source.to_string()].into_iter().collect()));
        }
        let sink = |store: &RocksStore| {
            ChangelogProducer::new(&config, TOPIC.into(), compaction, store.writer()).unwrap()
        };
        let (zombie_sink, owner_sink) = (sink(&zombie), sink(&owner));
        let restore = |store: &RocksStore, fencer: Option<&ChangelogProducer>| {
            restore_partition(&config, TOPIC, store, &catalog, source, 3, fencer).unwrap()
        };
        let key = acme_tokens(&names);
        let prepare = |store: &RocksStore, snapshot: &Snapshot, now: i64| {
            store
                .prepare_checkpoint(snapshot, &names, &catalog, now, 60, &Default::default())
                .unwrap()
        };
        let none: Vec<String> = Vec::new();

        // The zombie-to-be takes the partition and counts 5.
        assert!(!restore(&zombie, Some(&zombie_sink)).0);
        let mut first = prepare(&zombie, &usage_from(source, key, 1, 10, 5), NOW + 30);
        assert_eq!(zombie_sink.publish(&mut first.changelog).unwrap(), none);
        zombie.commit_checkpoint(first).unwrap();
        // The group hands the partition to the other replica: it fences and restores.
        assert!(restore(&owner, Some(&owner_sink)).0);
        assert_eq!(owner.position(source).unwrap(), Some(10));

        // The owner counts 7 more and emits the closed window as 12.
        let mut owned = prepare(&owner, &usage_from(source, key, 2, 20, 7), NOW + 200);
        assert_eq!(owner_sink.publish(&mut owned.changelog).unwrap(), none);
        owner.commit_checkpoint(owned).unwrap();
        let emitted = lines(&owner);
        assert_eq!(emitted.len(), 1);
        assert_eq!(
            (&emitted[0]["revision"], &emitted[0]["quantity"]),
            (&1.into(), &"12".into())
        );

        // The zombie has not heard: it counted other events (9) and its window closes too.
        let late = usage_from(source, key, 2, 20, 9);
        let mut stale = prepare(&zombie, &late, NOW + 200);
        assert_eq!(
            stale.stats.records, 1,
            "prepared while it still believed it owned the partition"
        );
        assert_eq!(zombie_sink.publish(&mut stale.changelog).unwrap(), [source]);
        drop(stale);
        zombie.tenant_sources.depose(source);
        assert_eq!(zombie.tenant_sources.take_deposed(), [source]);
        let again = prepare(&zombie, &late, NOW + 200);
        assert!(again.changelog.is_empty());
        assert_eq!(again.stats.records, 0);
        zombie.commit_checkpoint(again).unwrap();
        assert!(lines(&zombie).is_empty());

        // The owner goes on (another window); the zombie's chunk it finds between its own is
        // no fence: it is not deposed.
        let next = SeriesKey {
            window_start: NOW + 120,
            ..key
        };
        let mut owned = prepare(&owner, &usage_from(source, next, 3, 30, 1), NOW + 210);
        assert_eq!(owner_sink.publish(&mut owned.changelog).unwrap(), none);
        owner.commit_checkpoint(owned).unwrap();

        // A third replica restoring the whole changelog gets the owner's 12, not the zombie's
        // 14 published after it.
        let dir = tempfile::tempdir().unwrap();
        let (third, _, _) = tokens_store(dir.path());
        assert!(restore(&third, None).0);
        assert_eq!(third.position(source).unwrap(), Some(30));
        let rows = third
            .scan_series(&third.snapshot(), "tokens", Some("acme"), 0, i64::MAX)
            .unwrap();
        let totals: Vec<(i64, String)> = rows
            .iter()
            .map(|(name, state)| (name.window_start - NOW, state.value_string(0)))
            .collect();
        assert_eq!(totals, [(0, "12".to_string()), (120, "1".to_string())]);
        // Assigned here again, the old zombie fences anew and may own the partition again.
        restore(&zombie, Some(&zombie_sink));
        zombie.tenant_sources.reassigned(source);
        assert!(!zombie.tenant_sources.is_deposed(source));
    }

    /// A tenant counted on two partitions (a producer broke the key contract) has no whole
    /// total anywhere: its windows close with no window or rated record, whether this replica
    /// saw both partitions or another replica reported the second one (members topic), while a
    /// tenant on one partition is emitted as always.
    #[test]
    fn a_split_tenants_windows_close_without_records() {
        let names = Names::default();
        let dir = tempfile::tempdir().unwrap();
        let (store, _, catalog) = tokens_store(dir.path());
        let sources = ["kafka/usage/0", "kafka/usage/1"];
        store
            .tenant_sources
            .set_owned(Some(sources.iter().map(|s| s.to_string()).collect()));
        let acme = acme_tokens(&names);
        let globex = SeriesKey {
            tenant: names.tenants.intern("globex"),
            ..acme
        };
        let initech = SeriesKey {
            tenant: names.tenants.intern("initech"),
            ..acme
        };
        // acme on both partitions here; globex on one here, on another per the cluster.
        let mut both = usage_from(sources[0], acme, 1, 10, 5);
        let other = usage_from(sources[1], acme, 1, 10, 7);
        both.positions.extend(other.positions);
        both.sources.extend(other.sources);
        both.deltas.extend(other.deltas);
        for (key, value) in [(globex, 3), (initech, 4)] {
            let more = usage_from(sources[1], key, 1, 10, value);
            both.sources[1].series.extend(more.sources[0].series.clone());
            both.deltas.extend(more.deltas);
        }
        store
            .tenant_sources
            .set_split_check(std::sync::Arc::new(|tenant: &str| tenant == "globex"));
        checkpoint(&store, &names, &catalog, both, NOW + 30);
        assert!(store.tenant_sources.is_split("acme"));
        let prepared = store
            .prepare_checkpoint(
                &Snapshot::default(),
                &names,
                &catalog,
                NOW + 200,
                60,
                &Default::default(),
            )
            .unwrap();
        assert_eq!(prepared.stats.held, 2);
        store.commit_checkpoint(prepared).unwrap();
        let emitted: Vec<(String, String)> = lines(&store)
            .iter()
            .map(|line| {
                (
                    line["tenant"].as_str().unwrap().to_string(),
                    line["quantity"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(emitted, [("initech".to_string(), "4".to_string())]);
        // Closed once: nothing held again.
        let again = store
            .prepare_checkpoint(
                &Snapshot::default(),
                &names,
                &catalog,
                NOW + 300,
                60,
                &Default::default(),
            )
            .unwrap();
        assert_eq!((again.stats.held, again.stats.records), (0, 0));
    }

    /// Cluster mode: a window closes and is emitted only by the owner of its tenant's
    /// partition, and the owner's flushes carry what it emitted (here: a window closing by
    /// time, with no usage in that checkpoint), so the next owner neither emits it again nor
    /// restarts its revisions.
    #[test]
    fn only_the_owner_emits_and_its_flushes_carry_the_emission_state() {
        let names = Names::default();
        let (_dirs, origin, replica, catalog) = origin_and_replica();
        let source = "kafka/usage/3".to_string();
        let owning = |store: &RocksStore, owns: bool| {
            store
                .tenant_sources
                .set_owned(Some(owns.then(|| source.clone()).into_iter().collect()))
        };
        owning(&origin, true);
        owning(&replica, false);
        let key = acme_tokens(&names);
        let usage = |generation: u64, position: u64, value: i128| {
            usage_from(&source, key, generation, position, value)
        };
        let mut published = Vec::new();
        let run = |store: &RocksStore,
                   snapshot: Snapshot,
                   now: i64,
                   published: &mut Vec<changelog::ChangelogChunk>| {
            let prepared = store
                .prepare_checkpoint(&snapshot, &names, &catalog, now, 60, &Default::default())
                .unwrap();
            published.extend(prepared.changelog.clone());
            store.commit_checkpoint(prepared).unwrap();
        };
        // Usage in the open window [NOW, NOW+60), then the window closes by time (NOW+120).
        run(&origin, usage(1, 10, 5), NOW + 30, &mut published);
        run(
            &origin,
            Snapshot {
                generation: 2,
                ..Snapshot::default()
            },
            NOW + 200,
            &mut published,
        );
        let emitted = lines(&origin);
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0]["revision"], 1);
        let flushes = changelog::complete_flushes(&source, published.clone());
        assert_eq!(
            flushes.len(),
            2,
            "the closing checkpoint published a flush of its own"
        );
        assert!(flushes[1][0].series.is_empty() && !flushes[1][0].state.is_empty());

        // A replica holding acme's series but not the partition emits nothing for it.
        replica.restore_source(&source, &flushes[..1], &catalog).unwrap();
        // A checkpoint with no new usage: windows close by time only.
        let closing_only = |generation| Snapshot {
            generation,
            ..Snapshot::default()
        };
        run(&replica, closing_only(1), NOW + 200, &mut Vec::new());
        assert!(lines(&replica).is_empty(), "{:?}", lines(&replica));
        // It takes the partition over: the closing is not repeated (the newest flush's line is
        // re-emitted as it was: its owner might have died before committing it), and a late
        // delta amends the window as revision 2 with the whole total.
        replica.restore_source(&source, &flushes[1..], &catalog).unwrap();
        owning(&replica, true);
        run(&replica, closing_only(2), NOW + 300, &mut Vec::new());
        assert_eq!(lines(&replica), emitted, "an identical line, not a new closing");
        run(&replica, usage(3, 20, 7), NOW + 400, &mut Vec::new());
        let amended = lines(&replica);
        assert_eq!(amended.len(), 2, "{amended:?}");
        assert_eq!(
            (
                amended[1]["revision"].clone(),
                amended[1]["quantity"].clone(),
                amended[1]["record_id"].clone()
            ),
            (2.into(), "12".into(), emitted[0]["record_id"].clone())
        );
    }

    /// A window that closed while its partition was owned elsewhere is still indexed when the
    /// partition comes back; a late delta for it in that same checkpoint emitted it twice at
    /// revision 1 (once as an amendment, once from the index) and rated it twice (the crash
    /// campaign's doubled ledgers). It is emitted once, with the whole total.
    #[test]
    fn a_window_closed_elsewhere_and_amended_on_return_is_emitted_once() {
        let names = Names::default();
        let (_dirs, origin, replica, catalog) = origin_and_replica();
        let source = "kafka/usage/3".to_string();
        origin
            .tenant_sources
            .set_owned(Some([source.clone()].into_iter().collect()));
        let key = acme_tokens(&names);
        let snapshot = usage_from(&source, key, 1, 10, 5);
        let prepared = origin
            .prepare_checkpoint(&snapshot, &names, &catalog, NOW + 30, 60, &Default::default())
            .unwrap();
        let flushes = changelog::complete_flushes(&source, prepared.changelog.clone());
        // The replica holds the open window but not the partition while the window closes.
        replica.tenant_sources.set_owned(Some(Default::default()));
        replica.restore_source(&source, &flushes, &catalog).unwrap();
        checkpoint(
            &replica,
            &names,
            &catalog,
            Snapshot {
                generation: 1,
                ..Snapshot::default()
            },
            NOW + 200,
        );
        assert!(lines(&replica).is_empty());
        // The partition comes back with a late delta for that window.
        replica
            .tenant_sources
            .set_owned(Some([source.clone()].into_iter().collect()));
        let late = usage_from(&source, key, 2, 11, 7);
        checkpoint(&replica, &names, &catalog, late, NOW + 300);
        let emitted = lines(&replica);
        let got: Vec<_> = emitted
            .iter()
            .map(|line| (line["revision"].clone(), line["quantity"].clone()))
            .collect();
        assert_eq!(got, [(1.into(), "12".into())]);
    }

    /// The owner publishes a flush and dies before its checkpoint commits: the window record it
    /// was closing never reached its outbox. The replica that restores that flush re-emits its
    /// lines (identical record id and revision), also when it restores from a base that folded
    /// the flush, and continues the revisions from there. Before, the restore applied the
    /// flush's revision as if the record had gone out: it appeared only with an amendment.
    #[test]
    fn a_flush_whose_checkpoint_never_committed_is_emitted_by_the_replica_that_restores_it() {
        let names = Names::default();
        let (_dirs, origin, replica, catalog) = origin_and_replica();
        let source = "kafka/usage/3".to_string();
        for store in [&origin, &replica] {
            store
                .tenant_sources
                .set_owned(Some([source.clone()].into_iter().collect()));
        }
        let key = acme_tokens(&names);
        let usage = |generation: u64, position: u64, value: i128| {
            usage_from(&source, key, generation, position, value)
        };
        let mut published = Vec::new();
        let committed = origin
            .prepare_checkpoint(
                &usage(1, 10, 5),
                &names,
                &catalog,
                NOW + 30,
                60,
                &Default::default(),
            )
            .unwrap();
        published.extend(committed.changelog.clone());
        origin.commit_checkpoint(committed).unwrap();
        // The window closes by time; the flush is published, then the owner dies.
        let closing = Snapshot {
            generation: 2,
            ..Snapshot::default()
        };
        let lost = origin
            .prepare_checkpoint(&closing, &names, &catalog, NOW + 200, 60, &Default::default())
            .unwrap();
        published.extend(lost.changelog.clone());
        drop(lost);
        assert!(lines(&origin).is_empty());
        let flushes = changelog::complete_flushes(&source, published);
        assert_eq!(flushes.len(), 2);

        // A restore of the older flush alone has nothing to re-emit (its window was open).
        replica.restore_source(&source, &flushes[..1], &catalog).unwrap();
        checkpoint(&replica, &names, &catalog, Snapshot::default(), NOW + 30);
        assert!(lines(&replica).is_empty(), "{:?}", lines(&replica));
        replica.restore_source(&source, &flushes, &catalog).unwrap();
        checkpoint(&replica, &names, &catalog, Snapshot::default(), NOW + 300);
        let emitted = lines(&replica);
        let summary = |lines: &[serde_json::Value]| -> Vec<(serde_json::Value, serde_json::Value)> {
            lines
                .iter()
                .map(|line| (line["revision"].clone(), line["quantity"].clone()))
                .collect()
        };
        assert_eq!(summary(&emitted), [(1.into(), "5".into())]);
        // Moved once: the next checkpoint emits nothing more.
        checkpoint(&replica, &names, &catalog, Snapshot::default(), NOW + 310);
        assert_eq!(lines(&replica).len(), 1);
        // A late delta amends it as revision 2 with the whole total.
        checkpoint(&replica, &names, &catalog, usage(3, 11, 7), NOW + 400);
        let after = lines(&replica);
        assert_eq!(summary(&after[1..]), [(2.into(), "12".into())]);
        assert_eq!(after[1]["record_id"], emitted[0]["record_id"]);

        // A third replica restoring from a base that folded both flushes re-emits the same line.
        let folded = changelog::fold(&flushes, 0, 0);
        let base = changelog::complete_flushes(&source, changelog::chunk_base(&source, 9, folded, 1));
        let dir = tempfile::tempdir().unwrap();
        let (third, _, third_catalog) = tokens_store(dir.path());
        third.restore_source(&source, &base, &third_catalog).unwrap();
        checkpoint(&third, &names, &third_catalog, Snapshot::default(), NOW + 300);
        assert_eq!(lines(&third), emitted);
    }

    /// Tenants are learned from the sources that fed them, kept across a restart, and a tenant
    /// on a second source is a conflict (the metric and the warning are its signal).
    #[test]
    fn tenant_sources_are_learned_kept_and_conflicts_found() {
        use crate::aggregate::SourceCut;
        let dir = tempfile::tempdir().unwrap();
        let (store, names, catalog) = tokens_store(dir.path());
        let key = |tenant: &str| SeriesKey {
            meter: names.meters.intern("tokens"),
            tenant: names.tenants.intern(tenant),
            dims: 0,
            window_start: NOW,
        };
        let cut = |generation: u64, pairs: &[(&str, &str)]| Snapshot {
            generation,
            positions: pairs
                .iter()
                .map(|(_, source)| (source.to_string(), generation))
                .collect(),
            sources: pairs
                .iter()
                .map(|(tenant, source)| SourceCut {
                    source: source.to_string(),
                    series: vec![key(tenant)],
                    dedup_keys: Vec::new(),
                })
                .collect(),
            ..Snapshot::default()
        };
        checkpoint(
            &store,
            &names,
            &catalog,
            cut(1, &[("acme", "kafka/u/0"), ("beta", "kafka/u/1")]),
            NOW,
        );
        checkpoint(&store, &names, &catalog, cut(2, &[("acme", "kafka/u/0")]), NOW);
        assert!(store.tenant_sources.conflicts().is_empty());
        // acme's events now also arrive on partition 2 (another partitioner, a null key).
        checkpoint(&store, &names, &catalog, cut(3, &[("acme", "kafka/u/2")]), NOW);
        let conflicts = vec![(
            "acme".to_string(),
            vec!["kafka/u/0".to_string(), "kafka/u/2".to_string()],
        )];
        assert_eq!(store.tenant_sources.conflicts(), conflicts);
        drop(store);
        let store = RocksStore::open(dir.path(), 400 * 86_400, 86_400).unwrap();
        assert_eq!(store.tenant_sources.conflicts(), conflicts);
        assert_eq!(store.tenant_sources.sources_of("beta"), ["kafka/u/1"]);
    }
}
