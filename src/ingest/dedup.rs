//! In-memory half of dedup: keys reserved by in-flight requests or applied since the last
//! checkpoint. The other half is RocksDB (`D` keys, written by the checkpoint).
//!
//! Protocol, race-free without a global lock: a request first *reserves* a key here (an atomic
//! insert-if-absent), then checks the store. The checkpoint writes keys to the store *before*
//! removing them from here, so a key is always in at least one of the two places.

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

    /// Forgets keys that the store now holds.
    pub fn remove_all(&self, keys: &[u128]) {
        for key in keys {
            self.release(*key);
        }
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
