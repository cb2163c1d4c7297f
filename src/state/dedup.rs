//! In-memory half of dedup: keys reserved by in-flight requests, or counted and not yet in the
//! store's `dedup` column family (checkpoints stage them, the dedup stage moves them there in
//! bulk and then forgets them here). The other half is that column family.
//!
//! Protocol, race-free without a global lock: a request first *reserves* a key here (an atomic
//! insert-if-absent), then checks the store. A key leaves here only once the store has it, so
//! it is always in at least one of the two places.
//!
//! Each reservation names its request's [`Ticket`], open until the request's keys are durable
//! (its commit answered) or released. A key held under an *open* ticket is not yet a duplicate:
//! that request may still fail and release it (a client that hung up mid-commit, whose retry
//! arrives while the first attempt is still in the commit stage). So a claim that meets such a
//! key waits for that ticket to close, then claims again; it answers "duplicate" only for keys
//! counted durably. While it waits it holds nothing, so two requests that each hold a key the
//! other wants cannot wait for each other.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

/// How long a claim waits for another request holding some of its keys to finish committing
/// before it gives up (the caller answers "retry"). Commits take milliseconds; a holder open
/// this long is a Kafka batch waiting for its dead-letter output.
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(10);

/// The ticket of keys counted with no request left to wait for (replayed from the ingest log).
const COUNTED: u32 = 0;

/// A key as two words: a `(u128, u32)` entry would be padded to 32 bytes, this one takes 24.
type Slot = (u64, u64);

fn slot(key: u128) -> Slot {
    ((key >> 64) as u64, key as u64)
}

/// A request's claim on its dedup keys: open until dropped. Whoever holds the keys drops it only
/// once they are durable (the commit answered) or released, never before.
pub struct Ticket {
    id: u32,
    open: Arc<Mutex<FxHashSet<u32>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.id)
    }
}

/// Why a claim did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("another request holding some of these events has not finished committing")]
    InFlight,
}

pub struct DedupIndex {
    /// Key → the ticket that reserved it.
    shards: Box<[Mutex<FxHashMap<Slot, u32>>]>,
    /// Tickets still open. Ids wrap after 2^32 requests; a reused id only makes a claim wait
    /// for an unrelated request (a ticket is open for milliseconds), never answer wrongly.
    open: Arc<Mutex<FxHashSet<u32>>>,
    next: AtomicU32,
}

impl Default for DedupIndex {
    fn default() -> Self {
        DedupIndex {
            shards: (0..64).map(|_| Mutex::new(FxHashMap::default())).collect(),
            open: Arc::default(),
            next: AtomicU32::new(COUNTED + 1),
        }
    }
}

impl DedupIndex {
    /// A new open ticket for a request about to claim keys.
    pub fn ticket(&self) -> Ticket {
        let mut id = self.next.fetch_add(1, Ordering::Relaxed);
        if id == COUNTED {
            id = self.next.fetch_add(1, Ordering::Relaxed);
        }
        self.open.lock().insert(id);
        Ticket {
            id,
            open: self.open.clone(),
        }
    }

    /// Keys are xxh3 digests: their low bits are already uniform.
    fn shard_index(&self, key: u128) -> usize {
        (key as usize) & (self.shards.len() - 1)
    }

    fn shard(&self, key: u128) -> &Mutex<FxHashMap<Slot, u32>> {
        &self.shards[self.shard_index(key)]
    }

    /// `reserve` for a whole batch under one ticket, per key in order: `Ok(())` where the
    /// ticket now holds the key, `Err(holder)` where another ticket (or an earlier occurrence
    /// in this batch: the first one wins) holds it. Each shard is locked once for all of the
    /// batch's keys in it instead of once per key: a shard's mutex is a cache line the other
    /// threads also write, and per-key locking was a third of the reservation's cost
    /// (BENCHMARKS.md, "Dedup keys and the dedup filter").
    fn reserve_all_as(&self, keys: &[u128], ticket: u32) -> Vec<Result<(), u32>> {
        // (shard, position): sorting the pairs groups by shard and keeps positions in order.
        let mut order: Vec<(u32, u32)> = (0..keys.len())
            .map(|index| (self.shard_index(keys[index]) as u32, index as u32))
            .collect();
        order.sort_unstable();
        let mut reserved = vec![Ok(()); keys.len()];
        for run in order.chunk_by(|a, b| a.0 == b.0) {
            let mut map = self.shards[run[0].0 as usize].lock();
            for &(_, index) in run {
                let index = index as usize;
                match map.entry(slot(keys[index])) {
                    std::collections::hash_map::Entry::Vacant(vacant) => {
                        vacant.insert(ticket);
                    }
                    std::collections::hash_map::Entry::Occupied(held) => reserved[index] = Err(*held.get()),
                }
            }
        }
        reserved
    }

    /// Per key in order: true where the caller now owns the key (as counted: no request to
    /// wait for). Tests and benchmarks; requests claim under their ticket.
    pub fn reserve_all(&self, keys: &[u128]) -> Vec<bool> {
        self.reserve_all_as(keys, COUNTED)
            .iter()
            .map(Result::is_ok)
            .collect()
    }

    /// Holds a key counted by a replayed log record. True if it was not present.
    pub fn reserve(&self, key: u128) -> bool {
        // One entry, no batch bookkeeping: replay calls this for every logged key.
        match self.shard(key).lock().entry(slot(key)) {
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(COUNTED);
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        }
    }

    pub fn release(&self, key: u128) {
        self.shard(key).lock().remove(&slot(key));
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
            by_shard[self.shard_index(*key)].push(*key);
        }
        for (shard, keys) in self.shards.iter().zip(by_shard) {
            for slice in keys.chunks(SLICE) {
                let mut map = shard.lock();
                for key in slice {
                    map.remove(&slot(*key));
                }
            }
        }
    }

    /// The keys among `held` still held by a ticket that is open (and is not `mine`).
    fn held_open(&self, held: &[(u128, u32)], mine: u32) -> Vec<(u128, u32)> {
        // Most batches meet no held key: skip the lock every request would otherwise take.
        if held.is_empty() {
            return Vec::new();
        }
        let open = self.open.lock();
        held.iter()
            .filter(|(_, holder)| *holder != mine && open.contains(holder))
            .copied()
            .collect()
    }

    /// True while `key` is still held by `holder` and `holder` is open.
    fn still_held_open(&self, key: u128, holder: u32) -> bool {
        let held_by = self.shard(key).lock().get(&slot(key)).copied();
        held_by == Some(holder) && self.open.lock().contains(&holder)
    }

    /// The whole protocol for one batch under `ticket`: reserve each key, look the reserved
    /// ones up in the store, release those already seen. Returns, per key, whether the ticket
    /// now owns it (fresh: count it, then hand the key to a checkpoint). A key held by another
    /// request that has not finished committing is waited for (module docs). On an error
    /// nothing stays reserved.
    pub fn claim(
        &self,
        store: &crate::store::RocksStore,
        keys: &[u128],
        now_secs: i64,
        horizon_secs: i64,
        ticket: &Ticket,
    ) -> Result<Vec<bool>, ClaimError> {
        let deadline = Instant::now() + MAX_CLAIM_WAIT;
        let mut pause = Duration::from_millis(1);
        loop {
            let reserved = self.reserve_all_as(keys, ticket.id);
            let held: Vec<(u128, u32)> = keys
                .iter()
                .zip(&reserved)
                .filter_map(|(key, reserved)| reserved.err().map(|holder| (*key, holder)))
                .collect();
            let mine: Vec<u128> = keys
                .iter()
                .zip(&reserved)
                .filter_map(|(key, reserved)| reserved.is_ok().then_some(*key))
                .collect();
            let in_flight = self.held_open(&held, ticket.id);
            if !in_flight.is_empty() {
                // Hold nothing while waiting, then start over.
                self.remove_all(&mine);
                if Instant::now() >= deadline {
                    return Err(ClaimError::InFlight);
                }
                while Instant::now() < deadline
                    && in_flight
                        .iter()
                        .any(|(key, holder)| self.still_held_open(*key, *holder))
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                continue;
            }
            let seen = match store.dedup_seen(&mine, now_secs, horizon_secs) {
                Ok(seen) => seen,
                Err(error) => {
                    self.remove_all(&mine);
                    return Err(error.into());
                }
            };
            let mut seen = seen.into_iter();
            let mut fresh: Vec<bool> = reserved.iter().map(Result::is_ok).collect();
            for (key, mine) in keys.iter().zip(fresh.iter_mut()) {
                if *mine && seen.next() == Some(true) {
                    self.release(*key);
                    *mine = false;
                }
            }
            return Ok(fresh);
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
    fn claim_counts_each_key_once_across_memory_and_store() {
        let (_dir, store) = store();
        let index = DedupIndex::default();
        // Key 1 is durable (checkpointed), key 2 is in flight elsewhere, 3 repeats in the batch.
        store.commit_dedup_keys_for_tests(0, vec![1], 1_000);
        // (In the daemon, memory holds a committed key until the store ingests it.)
        assert_eq!(store.ingest_staged_dedup().unwrap(), [1]);
        assert!(index.reserve(2));
        let fresh = index
            .claim(&store, &[1, 2, 3, 3, 4], 1_000, 86_400, &index.ticket())
            .unwrap();
        assert_eq!(fresh, [false, false, true, false, true]);
        // The batch owns 3 and 4 until a checkpoint takes them; 1 was released again.
        assert_eq!(held(&index), [2, 3, 4]);
    }

    fn held(index: &DedupIndex) -> Vec<u128> {
        let mut held: Vec<u128> = index
            .shards
            .iter()
            .flat_map(|shard| {
                let map = shard.lock();
                map.keys()
                    .map(|(high, low)| (u128::from(*high) << 64) | u128::from(*low))
                    .collect::<Vec<_>>()
            })
            .collect();
        held.sort_unstable();
        held
    }

    fn store() -> (tempfile::TempDir, crate::store::RocksStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RocksStore::open(dir.path(), 86_400, 86_400).unwrap();
        (dir, store)
    }

    /// The hung-up client's case: its request holds the keys and is still committing when the
    /// retry claims them. The retry must not be told "duplicate" until that commit is decided.
    #[test]
    fn a_claim_waits_for_a_committing_holder_and_takes_what_it_releases() {
        let (_dir, store) = store();
        for commit_succeeds in [false, true] {
            let index = DedupIndex::default();
            let first = index.ticket();
            assert_eq!(
                index.claim(&store, &[1, 2], 1_000, 86_400, &first).unwrap(),
                [true, true]
            );
            let retry = std::thread::scope(|scope| {
                let retry = scope.spawn(|| index.claim(&store, &[1, 2, 3], 1_000, 86_400, &index.ticket()));
                std::thread::sleep(Duration::from_millis(50));
                assert!(
                    !retry.is_finished(),
                    "the retry waits while the first request commits"
                );
                if !commit_succeeds {
                    // The commit stage's failure path: release, answer, drop the request.
                    index.remove_all(&[1, 2]);
                }
                drop(first);
                retry.join().unwrap().unwrap()
            });
            let expected = if commit_succeeds {
                [false, false, true]
            } else {
                [true, true, true]
            };
            assert_eq!(retry, expected, "commit succeeds: {commit_succeeds}");
            assert_eq!(held(&index), [1, 2, 3]);
        }
    }

    /// Requests that each hold a key the other wants, some failing their commit: no deadlock,
    /// and every key ends committed by exactly one of them.
    #[test]
    fn crossed_claims_with_failing_commits_count_each_key_once() {
        let (_dir, store) = store();
        let index = DedupIndex::default();
        let committed = Mutex::new(FxHashMap::<u128, usize>::default());
        for round in 0..200u128 {
            let keys = [round * 2 + 1_000, round * 2 + 1_001];
            std::thread::scope(|scope| {
                for thread in 0..2 {
                    let (index, store, committed) = (&index, &store, &committed);
                    scope.spawn(move || {
                        let order = if thread == 0 { keys } else { [keys[1], keys[0]] };
                        let ticket = index.ticket();
                        let fresh = index.claim(store, &order, 1_000, 86_400, &ticket).unwrap();
                        let mine: Vec<u128> = order
                            .iter()
                            .zip(&fresh)
                            .filter(|(_, f)| **f)
                            .map(|(k, _)| *k)
                            .collect();
                        std::thread::sleep(Duration::from_micros(50));
                        // Thread 0's commit fails on odd rounds.
                        if thread == 0 && round % 2 == 1 {
                            index.remove_all(&mine);
                        } else {
                            let mut committed = committed.lock();
                            for key in mine {
                                *committed.entry(key).or_default() += 1;
                            }
                        }
                        drop(ticket);
                    });
                }
            });
        }
        let committed = committed.into_inner();
        assert_eq!(committed.len(), 400, "every key committed");
        assert!(
            committed.values().all(|count| *count == 1),
            "no key committed twice"
        );
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
