//! In-memory half of dedup: keys reserved by in-flight requests, or counted and not yet in the
//! store's `dedup` column family (checkpoints stage them, the dedup stage moves them there in
//! bulk and then forgets them here). The other half is that column family.
//!
//! Protocol, race-free without a global lock: a request first *reserves* a key here (an atomic
//! insert-if-absent), then checks the store. A key leaves here only once the store has it, so
//! it is always in at least one of the two places.

use parking_lot::Mutex;
use rustc_hash::FxHashSet;

pub struct DedupIndex {
    shards: Box<[Mutex<FxHashSet<u128>>]>,
}

impl Default for DedupIndex {
    fn default() -> Self {
        DedupIndex {
            shards: (0..64).map(|_| Mutex::new(FxHashSet::default())).collect(),
        }
    }
}

impl DedupIndex {
    fn shard(&self, key: u128) -> &Mutex<FxHashSet<u128>> {
        // Keys are xxh3 digests: their low bits are already uniform.
        &self.shards[(key as usize) & (self.shards.len() - 1)]
    }

    /// True if the key was not present (the caller now owns it).
    pub fn reserve(&self, key: u128) -> bool {
        self.shard(key).lock().insert(key)
    }

    pub fn release(&self, key: u128) {
        self.shard(key).lock().remove(&key);
    }

    /// Releases the keys of a request that was not counted.
    pub fn remove_all(&self, keys: &[u128]) {
        for key in keys {
            self.release(*key);
        }
    }

    /// Forgets keys that the store now holds: a million at a time, grouped by shard, and each
    /// shard locked for a slice of them only, so reservations are never held up for long.
    pub fn forget(&self, keys: &[u128]) {
        const SLICE: usize = 4096;
        let mut by_shard: Vec<Vec<u128>> = vec![Vec::new(); self.shards.len()];
        for key in keys {
            by_shard[(*key as usize) & (self.shards.len() - 1)].push(*key);
        }
        for (shard, keys) in self.shards.iter().zip(by_shard) {
            for slice in keys.chunks(SLICE) {
                let mut set = shard.lock();
                for key in slice {
                    set.remove(key);
                }
            }
        }
    }

    /// The whole protocol for one batch: reserve each key, look the reserved ones up in the
    /// store, release those already seen. Returns, per key, whether the caller now owns it
    /// (fresh: count it, then hand the key to a checkpoint). On a store error nothing stays
    /// reserved.
    pub fn claim(
        &self,
        store: &crate::store::RocksStore,
        keys: &[u128],
        now_secs: i64,
        horizon_secs: i64,
    ) -> Result<Vec<bool>, crate::store::StoreError> {
        let mut fresh: Vec<bool> = keys.iter().map(|key| self.reserve(*key)).collect();
        let reserved: Vec<u128> = keys
            .iter()
            .zip(&fresh)
            .filter_map(|(key, mine)| mine.then_some(*key))
            .collect();
        let seen = match store.dedup_seen(&reserved, now_secs, horizon_secs) {
            Ok(seen) => seen,
            Err(error) => {
                self.remove_all(&reserved);
                return Err(error);
            }
        };
        let mut seen = seen.into_iter();
        for (key, mine) in keys.iter().zip(fresh.iter_mut()) {
            if *mine && seen.next() == Some(true) {
                self.release(*key);
                *mine = false;
            }
        }
        Ok(fresh)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_exclusive_until_released() {
        let index = DedupIndex::default();
        assert!(index.reserve(7));
        assert!(!index.reserve(7));
        index.release(7);
        assert!(index.reserve(7));
        index.remove_all(&[7]);
        assert!(index.is_empty());
    }

    #[test]
    fn claim_counts_each_key_once_across_memory_and_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        let index = DedupIndex::default();
        // Key 1 is durable (checkpointed), key 2 is in flight elsewhere, 3 repeats in the batch.
        store.commit_dedup_keys_for_tests(0, vec![1], 1_000);
        // (In the daemon, memory holds a committed key until the store ingests it.)
        assert_eq!(store.ingest_staged_dedup().unwrap(), [1]);
        assert!(index.reserve(2));
        let fresh = index.claim(&store, &[1, 2, 3, 3, 4], 1_000, 86_400).unwrap();
        assert_eq!(fresh, [false, false, true, false, true]);
        // The batch owns 3 and 4 until a checkpoint takes them; 1 was released again.
        let mut held: Vec<u128> = index
            .shards
            .iter()
            .flat_map(|shard| shard.lock().iter().copied().collect::<Vec<_>>())
            .collect();
        held.sort_unstable();
        assert_eq!(held, [2, 3, 4]);
    }

    #[test]
    fn forget_drops_exactly_the_keys_given() {
        let index = DedupIndex::default();
        // Enough keys that every shard is locked for several slices.
        let keys: Vec<u128> = (0..300_000u128)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for key in &keys {
            assert!(index.reserve(*key));
        }
        let (gone, kept) = keys.split_at(200_000);
        index.forget(gone);
        assert_eq!(index.len(), kept.len());
        assert!(
            kept.iter().all(|key| !index.reserve(*key)),
            "kept keys stay reserved"
        );
        assert!(
            gone.iter().all(|key| index.reserve(*key)),
            "forgotten keys are free again"
        );
    }

    #[test]
    fn concurrent_reservations_have_one_winner() {
        let index = DedupIndex::default();
        let winners = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for key in 0..1000u128 {
                        if index.reserve(key) {
                            winners.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(winners.into_inner(), 1000);
    }
}
