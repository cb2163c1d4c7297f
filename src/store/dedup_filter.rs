//! One in-memory filter over every key in the `dedup` column family, so that a fresh key (nearly
//! every key) is answered with one cache line instead of RocksDB's `MultiGet`.
//!
//! The column family answers a lookup file by file and level by level (a bloom probe, a version
//! reference, key comparisons each): about a third of the Kafka consumer's time, and most of its
//! dedup claim's ≈ 0.8 µs per event (BENCHMARKS.md, "Dedup keys and the dedup filter"). A split-block bloom filter
//! (32-byte blocks, one bit in each of eight 32-bit words, the layout Parquet and Impala use)
//! answers "never stored" from memory; only the keys it may hold (duplicates, and ≈ 0.1 % of
//! fresh keys at full capacity) go to RocksDB.
//!
//! The one rule that keeps dedup exact: **every key the column family holds within the horizon
//! is in the filter lookups consult.** Writers add their keys to every filter being written
//! (`Filters::writing`) before they write the column family, holding that set's read lock
//! across both; a build registers its new filter there (write lock) *before* it opens the
//! iterator it scans, so each key is either in the scan or added by its writer. Lookups switch
//! to the new filter only once the scan is complete. Until the first build at start, lookups go
//! to RocksDB as they did before this filter existed.
//!
//! A bloom filter cannot delete: expired keys stay until the next build, which scans the column
//! family again (skipping keys well past the horizon) into a filter sized for twice the keys
//! found. Builds happen when the filter holds more keys than it was sized for, so their cost is
//! at most two scanned keys per inserted key; at the memory cap (`storage.dedup_filter_max_mib`)
//! a filter that is full again after a build is rebuilt at most hourly, and its false-positive
//! rate rises: lookups degrade gracefully towards RocksDB, never to a wrong answer.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

/// Filter bits per key it is sized for: ≈ 0.1 % false positives when full (Parquet's
/// split-block tables: 16.9 bits for 0.1 %), ≈ 2 bytes per key.
const BITS_PER_KEY: u64 = 16;
/// The smallest filter (in keys): 8 MiB, so a new store is not rebuilt every few seconds.
const MIN_KEYS: u64 = 1 << 22;
/// A build leaves room for as many keys again as it found.
const GROWTH: u64 = 2;
/// At the memory cap, a filter full again after a build waits this long before the next one.
const SATURATED_REBUILD_SECS: u64 = 3600;

/// The salts of the split-block bloom filter (Apache Parquet's specification): one odd
/// multiplier per word picks that word's bit.
const SALT: [u32; 8] = [
    0x47b6_137b,
    0x4497_4d91,
    0x8824_ad5b,
    0xa2b7_289d,
    0x7054_95c7,
    0x2df1_424b,
    0x9efc_4947,
    0x5c6b_fb31,
];

/// 32 bytes, aligned so that a block never straddles two cache lines.
#[repr(align(32))]
#[derive(Default)]
struct Block([AtomicU32; 8]);

/// A split-block bloom filter over 128-bit dedup keys. Lookups are lock-free. Inserts take
/// turns (`writer`), so a word is updated with a plain load and store: a locked read-modify-
/// write per word serialised the cache misses of a bulk insert (one key per DRAM round trip,
/// 7 % of a Kafka pipeline's samples). `Relaxed` suffices because a key only matters to a
/// lookup once its writer has released a lock the lookup's caller takes afterwards (the
/// `DedupIndex` shard that held the key until it was stored, or the filter set).
pub struct KeyFilter {
    blocks: Box<[Block]>,
    writer: Mutex<()>,
    /// Keys it was sized for.
    capacity: u64,
    /// Keys added (a key added twice counts twice: an over-estimate, which only builds earlier).
    inserted: AtomicU64,
}

impl KeyFilter {
    pub fn with_capacity(keys: u64) -> KeyFilter {
        let blocks = (keys.max(1) * BITS_PER_KEY).div_ceil(256);
        KeyFilter {
            blocks: (0..blocks).map(|_| Block::default()).collect(),
            writer: Mutex::new(()),
            capacity: blocks * 256 / BITS_PER_KEY,
            inserted: AtomicU64::new(0),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.blocks.len() as u64 * 32
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }

    /// The key's block and the bit in each of its words. The block comes from the key's high
    /// 64 bits, so keys inserted in order (ingestions and scans are sorted) sweep the filter
    /// front to back instead of missing the cache on every key. That relies on the keys being
    /// uniform, as xxh3 digests are (small test keys all share block 0: false positives only).
    fn locate(&self, key: u128) -> (&Block, [u32; 8]) {
        let high = (key >> 64) as u64;
        let index = ((high as u128 * self.blocks.len() as u128) >> 64) as usize;
        let hash = (((key as u64) ^ high).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
        (
            &self.blocks[index],
            SALT.map(|salt| 1u32 << (hash.wrapping_mul(salt) >> 27)),
        )
    }

    pub fn insert_all(&self, keys: impl IntoIterator<Item = u128>) {
        let _turn = self.writer.lock();
        let mut count = 0;
        for key in keys {
            let (block, mask) = self.locate(key);
            for (word, bit) in block.0.iter().zip(mask) {
                let bits = word.load(Ordering::Relaxed);
                // Most bits of a filling filter are set already: no store, no dirty line.
                if bits & bit == 0 {
                    word.store(bits | bit, Ordering::Relaxed);
                }
            }
            count += 1;
        }
        self.inserted.fetch_add(count, Ordering::Relaxed);
    }

    /// False: the key was never inserted. True: it may have been.
    pub fn may_contain(&self, key: u128) -> bool {
        let (block, mask) = self.locate(key);
        block
            .0
            .iter()
            .zip(mask)
            .all(|(word, bit)| word.load(Ordering::Relaxed) & bit != 0)
    }
}

/// The filters of one store: what lookups consult and what writers add to.
pub(super) struct Filters {
    /// None until the first build completes: every lookup then goes to RocksDB.
    current: RwLock<Option<Arc<KeyFilter>>>,
    /// Every filter a writer must add its keys to: the current one and, during a build, the
    /// next. Writers hold the read lock across adding and writing the column family.
    writing: RwLock<Vec<Arc<KeyFilter>>>,
    /// The memory cap (0: no filter, every lookup goes to RocksDB).
    max_bytes: AtomicU64,
    /// When the current filter was built.
    built_at: Mutex<Option<Instant>>,
}

impl Default for Filters {
    fn default() -> Self {
        Filters {
            current: RwLock::new(None),
            writing: RwLock::new(Vec::new()),
            max_bytes: AtomicU64::new(512 << 20),
            built_at: Mutex::new(None),
        }
    }
}

/// What one build found and made.
#[derive(Debug, Clone, Copy)]
pub struct FilterBuilt {
    pub keys: u64,
    pub bytes: u64,
}

impl Filters {
    /// The filter lookups consult (None: not built yet, or off).
    pub fn current(&self) -> Option<Arc<KeyFilter>> {
        if self.max_bytes.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.current.read().clone()
    }

    /// Off (0) only hides the filter from lookups: writers go on adding to it, so turning it
    /// on again can never expose a filter that missed a key.
    pub fn set_max_bytes(&self, bytes: u64) {
        self.max_bytes.store(bytes, Ordering::Relaxed);
    }

    fn max_keys(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed) * 8 / BITS_PER_KEY
    }

    /// Adds `keys` to every filter being written, then runs `write` (the column family write)
    /// before a build can register a new filter.
    pub fn noting<R>(&self, keys: impl Iterator<Item = u128> + Clone, write: impl FnOnce() -> R) -> R {
        let writing = self.writing.read();
        for filter in writing.iter() {
            filter.insert_all(keys.clone());
        }
        write()
    }

    /// Whether a build is due: none yet, or the current filter holds more keys than it was
    /// sized for (and either can grow or was built long enough ago to shed expired keys).
    pub fn build_due(&self) -> bool {
        let max_keys = self.max_keys();
        if max_keys == 0 {
            return false;
        }
        let Some(current) = self.current() else {
            return true;
        };
        current.inserted() > current.capacity()
            && (current.capacity() < max_keys
                || self
                    .built_at
                    .lock()
                    .is_none_or(|at| at.elapsed().as_secs() >= SATURATED_REBUILD_SECS))
    }

    /// Registers a new filter for `live_estimate` keys (writers add to it from now on).
    pub fn begin(&self, live_estimate: u64) -> Option<Arc<KeyFilter>> {
        let max_keys = self.max_keys();
        if max_keys == 0 {
            return None;
        }
        let live = self.current().map_or(live_estimate, |current| current.inserted());
        let keys = (live.saturating_mul(GROWTH)).clamp(MIN_KEYS.min(max_keys), max_keys);
        let filter = Arc::new(KeyFilter::with_capacity(keys));
        self.writing.write().push(filter.clone());
        Some(filter)
    }

    /// The scan into `filter` is complete: lookups consult it, writers stop adding to the old.
    pub fn finish(&self, filter: &Arc<KeyFilter>) -> FilterBuilt {
        *self.current.write() = Some(filter.clone());
        *self.built_at.lock() = Some(Instant::now());
        self.writing.write().retain(|other| Arc::ptr_eq(other, filter));
        FilterBuilt {
            keys: filter.inserted(),
            bytes: filter.bytes(),
        }
    }

    /// The scan failed or stopped: writers stop adding to it; lookups never saw it.
    pub fn abandon(&self, filter: &Arc<KeyFilter>) {
        self.writing.write().retain(|other| !Arc::ptr_eq(other, filter));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    proptest! {
        #[test]
        fn an_inserted_key_is_always_found(keys in prop::collection::vec(any::<u128>(), 1..2000), capacity in 1u64..5000) {
            let filter = KeyFilter::with_capacity(capacity);
            filter.insert_all(keys.iter().copied());
            for key in &keys {
                prop_assert!(filter.may_contain(*key));
            }
            prop_assert_eq!(filter.inserted(), keys.len() as u64);
        }
    }

    #[test]
    fn false_positives_stay_near_the_design_rate() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let filter = KeyFilter::with_capacity(200_000);
        assert!(filter.capacity() >= 200_000);
        filter.insert_all((0..filter.capacity()).map(|_| rng.gen::<u128>()));
        let probes = 1_000_000;
        let hits = (0..probes).filter(|_| filter.may_contain(rng.gen())).count();
        // 0.1 % expected when full; a layout or salt mistake gives several percent.
        assert!(hits < probes / 400, "{hits} false positives in {probes}");
        // An empty filter holds nothing.
        let empty = KeyFilter::with_capacity(1000);
        assert!((0..10_000).all(|_| !empty.may_contain(rng.gen())));
    }

    /// Small numbers made uniform, as real (xxh3) keys are.
    fn key(n: u128) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&n.to_le_bytes())
    }

    #[test]
    fn a_build_sees_writes_from_the_moment_it_begins_until_it_finishes() {
        let filters = Filters::default();
        assert!(filters.build_due(), "no filter yet");
        // Written before any build: in no filter (the scan finds it in the column family).
        filters.noting([key(1)].into_iter(), || ());
        let first = filters.begin(0).unwrap();
        filters.noting([key(2)].into_iter(), || ());
        assert!(filters.current().is_none(), "lookups wait for the scan");
        filters.finish(&first);
        assert!(!first.may_contain(key(1)) && first.may_contain(key(2)));
        assert!(!filters.build_due());

        // A rebuild: writers add to both until it finishes, then to the new one only.
        let second = filters.begin(0).unwrap();
        filters.noting([key(3)].into_iter(), || ());
        assert!(Arc::ptr_eq(&filters.current().unwrap(), &first));
        filters.finish(&second);
        filters.noting([key(4)].into_iter(), || ());
        assert!(first.may_contain(key(3)) && second.may_contain(key(3)));
        assert!(!first.may_contain(key(4)) && second.may_contain(key(4)));

        // An abandoned build stops receiving keys; the current one still does.
        let third = filters.begin(0).unwrap();
        filters.abandon(&third);
        filters.noting([key(5)].into_iter(), || ());
        assert!(!third.may_contain(key(5)) && second.may_contain(key(5)));
    }

    #[test]
    fn a_full_filter_is_rebuilt_bigger_and_the_cap_holds() {
        let filters = Filters::default();
        filters.set_max_bytes(32 << 20);
        let first = filters.begin(0).unwrap();
        filters.finish(&first);
        assert_eq!(first.capacity(), MIN_KEYS);
        filters.noting(0..MIN_KEYS as u128 + 1, || ());
        assert!(filters.build_due(), "more keys than it was sized for");
        let second = filters.begin(0).unwrap();
        // Sized from what the current one holds, not the (stale) estimate.
        assert_eq!(second.capacity(), (2 * (MIN_KEYS + 1)).div_ceil(16) * 16);
        filters.finish(&second);
        // At the cap: 32 MiB is 16 Mi keys.
        second.insert_all(0..16 << 20);
        let third = filters.begin(0).unwrap();
        assert_eq!(third.bytes(), 32 << 20);
        filters.finish(&third);
        third.insert_all(0..(16 << 20) + 1);
        assert!(
            !filters.build_due(),
            "saturated at the cap: not rebuilt within the hour"
        );
        // Off: nothing to build, lookups go to the store.
        filters.set_max_bytes(0);
        assert!(filters.current().is_none() && !filters.build_due() && filters.begin(1).is_none());
    }
}
