//! The aggregation engine: per-series deltas since the last checkpoint, in share-nothing maps
//! owned by their writers and merged when a checkpoint takes them.
//!
//! Input: observations from a `Writer` (one per writer thread: the commit stage today, one per
//! Kafka partition consumer later), either folded in directly (`Writer::observe_batch`, the pull
//! path) or as `PreAggregated` batches built off-thread by a push edge (`Writer::apply`).
//! Output: `Aggregator::take`, the delta of every series that changed since the previous take,
//! handed to the checkpoint; and `collect`, for queries.
//!
//! Each writer's map sits behind its own mutex, taken once per batch by its writer and only
//! otherwise by `take`/`collect`: in steady state the lock is uncontended and no two writers
//! share a cache line, so throughput scales with writers. A series written by two writers is
//! merged at `take` (every state is mergeable). The engine holds *deltas*, not totals: RocksDB
//! holds the checkpointed totals, so memory is bounded by what changed within one flush interval.
//!
//! Must not: do I/O, or hold a map lock across anything slower than map updates.

pub mod distribution;
pub mod state;
pub mod streams;
pub mod unique;

use std::collections::hash_map::Entry;
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::model::SeriesKey;
pub use state::{AggState, Aggregation, MergeError, Observation, Wide};

/// Series deltas folded locally before they touch shared state.
#[derive(Debug, Default, Clone)]
pub struct PreAggregated {
    pub series: FxHashMap<SeriesKey, AggState>,
}

impl PreAggregated {
    /// Sized for `events` observations, so a batch never rehashes while it is built.
    pub fn with_capacity(events: usize) -> PreAggregated {
        PreAggregated {
            series: FxHashMap::with_capacity_and_hasher(events, Default::default()),
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

/// All writers' delta maps.
#[derive(Default)]
pub struct Aggregator {
    writers: Mutex<Vec<Arc<Mutex<WriterMap>>>>,
}

/// What one writer accumulated since the last take. The deltas, the dedup keys of the events
/// they hold and the source positions they reflect change under one lock, so a take sees all
/// three at the same cut: that is what lets a checkpoint store positions honestly.
#[derive(Default)]
struct WriterMap {
    deltas: PreAggregated,
    dedup_keys: Vec<u128>,
    /// Source name (e.g. `ingest-log`, `kafka/usage/3`) → next position to read.
    positions: FxHashMap<String, u64>,
    /// Cumulative streams moved by the deltas above, or forgotten (newest change per stream):
    /// durable with the same positions.
    streams: streams::StreamChanges,
    /// A writer dedicated to one replicated source (a Kafka partition whose state has a
    /// changelog): the take reports which series and dedup keys came from it.
    tag: Option<String>,
}

/// Everything taken from the engine at one cut.
#[derive(Debug, Default)]
pub struct Cut {
    pub deltas: Vec<(SeriesKey, AggState)>,
    pub dedup_keys: Vec<u128>,
    /// The newest position each source reached within the cut (sources that made no progress
    /// since the previous take are absent).
    pub positions: Vec<(String, u64)>,
    /// Cumulative stream states the deltas reflect (`None`: forgotten).
    pub streams: Vec<(u128, Option<streams::StreamState>)>,
    /// Per tagged writer: what it contributed to this cut.
    pub sources: Vec<SourceCut>,
}

/// The series and dedup keys one tagged writer (one Kafka partition) contributed to a cut.
#[derive(Debug, Default, Clone)]
pub struct SourceCut {
    pub source: String,
    pub series: Vec<SeriesKey>,
    pub dedup_keys: Vec<u128>,
}

/// A writer's handle: the only code that adds to its map.
pub struct Writer {
    map: Arc<Mutex<WriterMap>>,
}

impl Writer {
    /// Folds observations straight into the writer's map, under one lock acquisition.
    pub fn observe_batch<R>(&self, fold: impl FnOnce(&mut PreAggregated) -> R) -> R {
        fold(&mut self.map.lock().deltas)
    }

    /// Folds a pre-aggregated batch in, draining it: the caller may reuse its allocation.
    pub fn apply(&self, batch: &mut PreAggregated) -> Result<(), MergeError> {
        self.commit(batch, &mut Vec::new(), std::iter::empty())
    }

    /// Folds a batch in together with the dedup keys of its events and the source positions it
    /// advances to, atomically with respect to `Aggregator::take`. Drains `batch` and `keys`.
    pub fn commit(
        &self,
        batch: &mut PreAggregated,
        keys: &mut Vec<u128>,
        positions: impl IntoIterator<Item = (String, u64)>,
    ) -> Result<(), MergeError> {
        self.commit_with_streams(batch, keys, &mut FxHashMap::default(), positions)
    }

    /// `commit`, plus the cumulative stream states the batch's deltas were derived with.
    /// Drains `streams` too.
    pub fn commit_with_streams(
        &self,
        batch: &mut PreAggregated,
        keys: &mut Vec<u128>,
        streams: &mut streams::StreamChanges,
        positions: impl IntoIterator<Item = (String, u64)>,
    ) -> Result<(), MergeError> {
        let mut map = self.map.lock();
        let map = &mut *map;
        for (key, state) in batch.series.drain() {
            merge_into(&mut map.deltas.series, key, state)?;
        }
        // One writer (the commit thread) moves streams, in log order: the newest state wins.
        map.streams.extend(streams.drain());
        map.dedup_keys.append(keys);
        for (source, next) in positions {
            map.positions.insert(source, next);
        }
        Ok(())
    }
}

impl Aggregator {
    pub fn new() -> Aggregator {
        Aggregator::default()
    }

    /// Registers a writer with a map of its own.
    pub fn writer(&self) -> Writer {
        self.register(None)
    }

    /// A writer for one replicated source (see `SourceCut`).
    pub fn tagged_writer(&self, source: String) -> Writer {
        self.register(Some(source))
    }

    fn register(&self, tag: Option<String>) -> Writer {
        let map = Arc::new(Mutex::new(WriterMap {
            tag,
            ..WriterMap::default()
        }));
        self.writers.lock().push(map.clone());
        Writer { map }
    }

    fn maps(&self) -> Vec<Arc<Mutex<WriterMap>>> {
        self.writers.lock().clone()
    }

    /// Takes every delta (with its dedup keys and positions) accumulated since the previous
    /// take, leaving the engine empty. A series changed by several writers comes out once, merged.
    ///
    /// On a merge overflow the taken deltas are lost to this process, so the caller must not
    /// store any position past them: it keeps the previous checkpoint and replays.
    pub fn take(&self) -> Result<Cut, MergeError> {
        let mut cut = Cut::default();
        let mut taken: Vec<FxHashMap<SeriesKey, AggState>> = Vec::new();
        for map in self.maps() {
            let mut map = map.lock();
            let series = std::mem::take(&mut map.deltas.series);
            if let Some(tag) = &map.tag {
                if !series.is_empty() || !map.dedup_keys.is_empty() {
                    cut.sources.push(SourceCut {
                        source: tag.clone(),
                        series: series.keys().copied().collect(),
                        dedup_keys: map.dedup_keys.clone(),
                    });
                }
            }
            if !series.is_empty() {
                taken.push(series);
            }
            cut.dedup_keys.append(&mut map.dedup_keys);
            cut.positions.extend(map.positions.drain());
            cut.streams.extend(map.streams.drain());
        }
        cut.positions.sort_unstable();
        let Some(mut merged) = taken.pop() else {
            return Ok(cut);
        };
        for map in taken {
            for (key, state) in map {
                merge_into(&mut merged, key, state)?;
            }
        }
        cut.deltas = merged.into_iter().collect();
        Ok(cut)
    }

    /// Copies the deltas whose key passes `filter` (for queries that must see unflushed usage).
    /// A series held by several writers appears once per writer; callers merge.
    pub fn collect(&self, filter: impl Fn(&SeriesKey) -> bool) -> Vec<(SeriesKey, AggState)> {
        let mut out = Vec::new();
        for map in self.maps() {
            let map = map.lock();
            out.extend(
                map.deltas
                    .series
                    .iter()
                    .filter(|(key, _)| filter(key))
                    .map(|(key, state)| (*key, state.clone())),
            );
        }
        out
    }

    /// Series entries with an unflushed delta (a series held by two writers counts twice).
    pub fn len(&self) -> usize {
        self.maps().iter().map(|map| map.lock().deltas.len()).sum()
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

    fn update_of(event: &Event) -> (SeriesKey, Aggregation, Observation) {
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
        (key, aggregation, observation)
    }

    fn observe_all(batch: &mut PreAggregated, events: &[Event]) {
        for event in events {
            let (key, aggregation, observation) = update_of(event);
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
            take_every in 1usize..5,
            direct in any::<bool>(),
        ) {
            let expected = sequential(&events);

            let mut shuffled = events.clone();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            use rand::{seq::SliceRandom, SeedableRng};
            shuffled.shuffle(&mut rng);

            let engine = Aggregator::new();
            let chunks: Vec<Vec<Event>> = shuffled.chunks(batch_size).map(|c| c.to_vec()).collect();
            let taken = parking_lot::Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for worker in 0..threads {
                    let chunks = &chunks;
                    let engine = &engine;
                    let taken = &taken;
                    scope.spawn(move || {
                        let writer = engine.writer();
                        for (i, chunk) in chunks.iter().enumerate().skip(worker).step_by(threads) {
                            if direct {
                                // The pull path: straight into the writer's map.
                                writer.observe_batch(|batch| {
                                    for event in chunk {
                                        let (key, aggregation, observation) = update_of(event);
                                        batch.observe(key, aggregation, observation, event.ts_ms, 20).unwrap();
                                    }
                                });
                            } else {
                                // The push path: pre-aggregated off-thread, then applied.
                                let mut batch = PreAggregated::default();
                                observe_all(&mut batch, chunk);
                                writer.apply(&mut batch).unwrap();
                            }
                            if i % take_every == 0 {
                                taken.lock().extend(engine.take().unwrap().deltas);
                            }
                        }
                    });
                }
            });
            let mut all = taken.into_inner();
            all.extend(engine.take().unwrap().deltas);
            prop_assert_eq!(totals(all), expected);
        }
    }

    #[test]
    fn take_empties_the_engine_merges_writers_and_collect_filters() {
        let engine = Aggregator::new();
        let (first, second) = (engine.writer(), engine.writer());
        let key_of = |tenant| SeriesKey {
            meter: 0,
            tenant,
            dims: 0,
            window_start: 0,
        };
        let mut batch = PreAggregated::default();
        for tenant in 0..10 {
            batch
                .observe(key_of(tenant), Aggregation::Sum, Observation::Value(5), 0, 0)
                .unwrap();
        }
        first.apply(&mut batch).unwrap();
        assert!(batch.is_empty(), "apply drains the batch");
        second.observe_batch(|batch| {
            batch
                .observe(key_of(0), Aggregation::Sum, Observation::Value(7), 0, 0)
                .unwrap();
        });
        assert_eq!(engine.len(), 11);
        assert_eq!(engine.collect(|key| key.tenant < 3).len(), 4);
        let taken = engine.take().unwrap().deltas;
        assert_eq!(taken.len(), 10, "a series from two writers comes out once");
        let tenant_zero = taken.iter().find(|(key, _)| key.tenant == 0).unwrap();
        assert_eq!(tenant_zero.1, AggState::Sum(12.into()));
        assert!(engine.is_empty());
        assert!(engine.take().unwrap().deltas.is_empty());
    }
}
