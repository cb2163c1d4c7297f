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
    /// Keys are xxh3 digests: their low bits are already uniform.
    fn shard_index(&self, key: u128) -> usize {
        (key as usize) & (self.shards.len() - 1)
    }

    fn shard(&self, key: u128) -> &Mutex<FxHashSet<u128>> {
        &self.shards[self.shard_index(key)]
    }

    /// `reserve` for a whole batch, per key in order: true where the caller now owns the key.
    /// Each shard is locked once for all of the batch's keys in it instead of once per key: a
    /// shard's mutex is a cache line the other threads also write, and per-key locking was a
    /// third of the reservation's cost (BENCHMARKS.md, "Dedup keys and the dedup filter"). When a batch holds a key twice, its
    /// first occurrence wins (within a shard, keys go in their batch order).
    pub fn reserve_all(&self, keys: &[u128]) -> Vec<bool> {
        // (shard, position): sorting the pairs groups by shard and keeps positions in order.
        let mut order: Vec<(u32, u32)> = (0..keys.len())
            .map(|index| (self.shard_index(keys[index]) as u32, index as u32))
            .collect();
        order.sort_unstable();
        let mut fresh = vec![false; keys.len()];
        for run in order.chunk_by(|a, b| a.0 == b.0) {
            let mut set = self.shards[run[0].0 as usize].lock();
            for &(_, index) in run {
                fresh[index as usize] = set.insert(keys[index as usize]);
            }
        }
        fresh
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
        let mut fresh = self.reserve_all(keys);
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
    fn reserving_a_batch_answers_as_reserving_its_keys_one_by_one() {
        let (batched, single) = (DedupIndex::default(), DedupIndex::default());
        // Keys across every shard, repeats inside the batch, some held before the batch.
        let keys: Vec<u128> = (0..5_000u128)
            .map(|i| (i % 3_000).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
            .collect();
        for key in keys.iter().step_by(7) {
            assert!(batched.reserve(*key));
            assert!(single.reserve(*key));
        }
        let expected: Vec<bool> = keys.iter().map(|key| single.reserve(*key)).collect();
        assert_eq!(batched.reserve_all(&keys), expected);
        let held_before: std::collections::HashSet<u128> = keys.iter().step_by(7).copied().collect();
        assert_eq!(
            expected.iter().filter(|fresh| **fresh).count(),
            3_000 - held_before.len()
        );
        assert_eq!(batched.len(), single.len());
        assert!(batched.reserve_all(&[]).is_empty());
    }

    #[test]
    fn concurrent_reservations_have_one_winner() {
        let index = DedupIndex::default();
        let winners = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (index, winners) = (&index, &winners);
                scope.spawn(move || {
                    let keys: Vec<u128> = (0..1000u128).collect();
                    // Half of the threads reserve one key at a time, half in batches.
                    let won = if thread % 2 == 0 {
                        keys.iter().filter(|key| index.reserve(**key)).count()
                    } else {
                        keys.chunks(64)
                            .map(|batch| index.reserve_all(batch).into_iter().filter(|mine| *mine).count())
                            .sum()
                    };
                    winners.fetch_add(won, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
        assert_eq!(winners.into_inner(), 1000);
    }
}
