//! The aggregation engine: per-series deltas since the last checkpoint, sharded by series hash.
//!
//! Input: `PreAggregated` batches (events already deduplicated and folded per series by the
//! ingest edge, off the shared state). Output: `Aggregator::take`, the delta of every series that
//! changed since the previous take, handed to the checkpoint; and `collect`, for queries.
//!
//! Shared state is touched once per batch per shard: a batch is split by shard and each shard's
//! lock is taken once for all of that batch's series. With pre-aggregation the lock is amortised
//! over many events, and two writers rarely meet on one shard. The engine holds *deltas*, not
//! totals: RocksDB holds the checkpointed totals, so memory is bounded by what changed within
//! one flush interval, not by the number of series ever seen.
//!
//! Must not: do I/O, or hold a shard lock across anything slower than a map update.

pub mod state;
pub mod unique;

use std::collections::hash_map::Entry;
use std::hash::BuildHasher;

use parking_lot::Mutex;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::model::SeriesKey;
pub use state::{AggState, Aggregation, MergeError, Observation, Wide};

/// Series deltas folded locally before they touch shared state.
#[derive(Debug, Default, Clone)]
pub struct PreAggregated {
    pub series: FxHashMap<SeriesKey, AggState>,
    /// Reused by `Aggregator::apply` to group a batch by shard without allocating.
    scratch: Vec<(SeriesKey, AggState)>,
    order: Vec<u32>,
}

impl PreAggregated {
    /// Sized for `events` observations, so a batch never rehashes while it is built.
    pub fn with_capacity(events: usize) -> PreAggregated {
        PreAggregated {
            series: FxHashMap::with_capacity_and_hasher(events, Default::default()),
            ..PreAggregated::default()
        }
    }

    pub fn observe(
        &mut self,
        key: SeriesKey,
        aggregation: Aggregation,
        observation: Observation,
        ts_ms: i64,
        unique_limit: u32,
    ) -> Result<(), MergeError> {
        match self.series.entry(key) {
            Entry::Occupied(mut state) => state.get_mut().observe(observation, ts_ms),
            Entry::Vacant(slot) => {
                slot.insert(AggState::from_observation(
                    aggregation,
                    observation,
                    ts_ms,
                    unique_limit,
                ));
                Ok(())
            }
        }
    }

    pub fn merge_state(&mut self, key: SeriesKey, state: &AggState) -> Result<(), MergeError> {
        match self.series.get_mut(&key) {
            Some(existing) => existing.merge(state),
            None => {
                self.series.insert(key, state.clone());
                Ok(())
            }
        }
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

fn merge_into(
    map: &mut FxHashMap<SeriesKey, AggState>,
    key: SeriesKey,
    state: AggState,
) -> Result<(), MergeError> {
    match map.entry(key) {
        Entry::Occupied(mut existing) => existing.get_mut().merge(&state),
        Entry::Vacant(slot) => {
            slot.insert(state);
            Ok(())
        }
    }
}

pub struct Aggregator {
    shards: Box<[Mutex<FxHashMap<SeriesKey, AggState>>]>,
}

impl Aggregator {
    /// `shards` is rounded up to a power of two.
    pub fn new(shards: usize) -> Aggregator {
        let count = shards.max(1).next_power_of_two();
        Aggregator {
            shards: (0..count).map(|_| Mutex::new(FxHashMap::default())).collect(),
        }
    }

    fn shard_of(&self, key: &SeriesKey) -> usize {
        // Fx's low bits are weak for small integers; take the high bits.
        (FxBuildHasher.hash_one(key) >> 40) as usize & (self.shards.len() - 1)
    }

    /// Folds a pre-aggregated batch into the shared deltas, draining it: the caller may reuse
    /// its allocation for the next batch.
    pub fn apply(&self, batch: &mut PreAggregated) -> Result<(), MergeError> {
        // Group by shard so each shard's lock is taken once per batch: sort 4-byte
        // `shard << 24 | position` words rather than the entries themselves.
        let PreAggregated {
            series,
            scratch,
            order,
        } = batch;
        scratch.clear();
        order.clear();
        for (position, (key, state)) in series.drain().enumerate() {
            order.push(((self.shard_of(&key) as u32) << 24) | position as u32);
            scratch.push((key, state));
        }
        debug_assert!(
            scratch.len() < 1 << 24,
            "invariant: batches hold fewer than 2^24 series"
        );
        order.sort_unstable();
        let mut run = 0;
        while run < order.len() {
            let shard_index = (order[run] >> 24) as usize;
            let mut shard = self.shards[shard_index].lock();
            while run < order.len() && (order[run] >> 24) as usize == shard_index {
                let (key, state) = &mut scratch[(order[run] & 0xff_ffff) as usize];
                merge_into(&mut shard, *key, std::mem::replace(state, AggState::Count(0)))?;
                run += 1;
            }
        }
        scratch.clear();
        Ok(())
    }

    /// Takes every delta accumulated since the previous take, leaving the engine empty.
    pub fn take(&self) -> Vec<(SeriesKey, AggState)> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let map = std::mem::take(&mut *shard.lock());
            out.extend(map);
        }
        out
    }

    /// Copies the deltas whose key passes `filter` (for queries that must see unflushed usage).
    pub fn collect(&self, filter: impl Fn(&SeriesKey) -> bool) -> Vec<(SeriesKey, AggState)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.lock();
            out.extend(
                map.iter()
                    .filter(|(key, _)| filter(key))
                    .map(|(key, state)| (*key, state.clone())),
            );
        }
        out
    }

    /// Series with an unflushed delta.
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
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    struct Event {
        meter: u32,
        tenant: u32,
        window: i64,
        ts_ms: i64,
        value: i64,
    }

    const AGGREGATIONS: [Aggregation; 6] = [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::Max,
        Aggregation::Min,
        Aggregation::Latest,
        Aggregation::UniqueCount,
    ];

    fn arb_events() -> impl Strategy<Value = Vec<Event>> {
        proptest::collection::vec(
            (0u32..6, 0u32..4, 0i64..3, 0i64..1_000, -1_000i64..1_000).prop_map(
                |(meter, tenant, window, ts_ms, value)| Event {
                    meter,
                    tenant,
                    window,
                    ts_ms,
                    value,
                },
            ),
            0..300,
        )
    }

    fn observe_all(batch: &mut PreAggregated, events: &[Event]) {
        for event in events {
            let aggregation = AGGREGATIONS[event.meter as usize];
            let key = SeriesKey {
                meter: event.meter,
                tenant: event.tenant,
                dims: 0,
                window_start: event.window * 60,
            };
            let observation = if aggregation == Aggregation::UniqueCount {
                Observation::Unique(event.value.rem_euclid(50) as u64)
            } else {
                Observation::Value(event.value as i128)
            };
            // A small unique limit so that the sketch path is exercised too.
            batch
                .observe(key, aggregation, observation, event.ts_ms, 20)
                .unwrap();
        }
    }

    fn totals(deltas: Vec<(SeriesKey, AggState)>) -> BTreeMap<SeriesKey, AggState> {
        let mut out: BTreeMap<SeriesKey, AggState> = BTreeMap::new();
        for (key, state) in deltas {
            match out.get_mut(&key) {
                Some(existing) => existing.merge(&state).unwrap(),
                None => {
                    out.insert(key, state);
                }
            }
        }
        out
    }

    fn sequential(events: &[Event]) -> BTreeMap<SeriesKey, AggState> {
        let mut batch = PreAggregated::default();
        observe_all(&mut batch, events);
        totals(batch.series.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Order, batch split, shard count, thread count and the flush points between takes
        /// must not change any series' total.
        #[test]
        fn totals_independent_of_order_batching_threads_and_flushes(
            events in arb_events(),
            seed in any::<u64>(),
            batch_size in 1usize..50,
            threads in 1usize..4,
            shards in 1usize..16,
            take_every in 1usize..5,
        ) {
            let expected = sequential(&events);

            let mut shuffled = events.clone();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            use rand::{seq::SliceRandom, SeedableRng};
            shuffled.shuffle(&mut rng);

            let engine = Aggregator::new(shards);
            let chunks: Vec<Vec<Event>> = shuffled.chunks(batch_size).map(|c| c.to_vec()).collect();
            let taken = parking_lot::Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for worker in 0..threads {
                    let chunks = &chunks;
                    let engine = &engine;
                    let taken = &taken;
                    scope.spawn(move || {
                        for (i, chunk) in chunks.iter().enumerate().skip(worker).step_by(threads) {
                            let mut batch = PreAggregated::default();
                            observe_all(&mut batch, chunk);
                            engine.apply(&mut batch).unwrap();
                            if i % take_every == 0 {
                                taken.lock().extend(engine.take());
                            }
                        }
                    });
                }
            });
            let mut all = taken.into_inner();
            all.extend(engine.take());
            prop_assert_eq!(totals(all), expected);
        }
    }

    #[test]
    fn take_empties_the_engine_and_collect_filters() {
        let engine = Aggregator::new(4);
        let mut batch = PreAggregated::default();
        for tenant in 0..10 {
            let key = SeriesKey {
                meter: 0,
                tenant,
                dims: 0,
                window_start: 0,
            };
            batch
                .observe(key, Aggregation::Sum, Observation::Value(5), 0, 0)
                .unwrap();
        }
        engine.apply(&mut batch).unwrap();
        assert!(batch.is_empty(), "apply drains the batch");
        assert_eq!(engine.len(), 10);
        assert_eq!(engine.collect(|key| key.tenant < 3).len(), 3);
        assert_eq!(engine.take().len(), 10);
        assert!(engine.is_empty());
    }
}
