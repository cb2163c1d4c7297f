//! Engine and checkpoint benchmarks (criterion, fixed seeds).
//!
//! | scenario            | series | distribution | batch | threads | baseline                       |
//! |---------------------|--------|--------------|-------|---------|--------------------------------|
//! | hot_set             | 10 k   | Zipf s=1.1   | 1000  | 1, 2    | single-threaded HashMap (Fx)   |
//! | random_1m           | 1 M    | uniform      | 1000  | 1, 2    | single-threaded HashMap (Fx)   |
//! | checkpoint          | 1 k – 100 k changed series, RocksDB WriteBatch, synced         |
//!
//! `engine`: each thread folds into its own writer map (the pull path); `engine_pre_aggregated`:
//! batches are pre-aggregated first, as the HTTP edge does. `take_from_2_writers` is the cost a
//! checkpoint pays to collect (and merge) the deltas afterwards.
//! Events are pre-decoded `(SeriesKey, value)` pairs: this measures aggregation alone.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxBuildHasher;
use tallyd::aggregate::{Aggregation, Aggregator, Observation, PreAggregated};
use tallyd::model::{Names, SeriesKey};
use tallyd::store::checkpoint::Snapshot;
use tallyd::store::{MeterCatalog, MeterShape, RocksStore};

const EVENTS: usize = 1_000_000;
const BATCH: usize = 1000;

fn key_of(series: usize) -> SeriesKey {
    SeriesKey {
        meter: (series % 4) as u32,
        tenant: (series / 4 % 50_000) as u32,
        dims: (series / 200_000) as u32,
        window_start: 1_795_321_200,
    }
}

fn zipf_events(series: usize, s: f64, seed: u64) -> Vec<(SeriesKey, i128)> {
    let mut cdf = Vec::with_capacity(series);
    let mut total = 0.0;
    for rank in 0..series {
        total += 1.0 / ((rank + 1) as f64).powf(s);
        cdf.push(total);
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..EVENTS)
        .map(|_| {
            let u: f64 = rng.gen::<f64>() * total;
            let rank = cdf.partition_point(|p| *p < u).min(series - 1);
            (key_of(rank), rng.gen_range(1..1000))
        })
        .collect()
}

fn uniform_events(series: usize, seed: u64) -> Vec<(SeriesKey, i128)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..EVENTS)
        .map(|_| (key_of(rng.gen_range(0..series)), rng.gen_range(1..1000)))
        .collect()
}

/// The pull path: each thread folds its batches straight into its own writer map.
fn run_direct(engine: &Aggregator, events: &[(SeriesKey, i128)]) {
    let writer = engine.writer();
    for chunk in events.chunks(BATCH) {
        writer.observe_batch(|batch| {
            for (key, value) in chunk {
                batch
                    .observe(*key, Aggregation::Sum, Observation::Value(*value), 0, 0)
                    .unwrap();
            }
        });
    }
}

/// The push path: batches pre-aggregated (as an HTTP request is), then applied.
fn run_pre_aggregated(engine: &Aggregator, events: &[(SeriesKey, i128)]) {
    let writer = engine.writer();
    let mut batch = PreAggregated::with_capacity(BATCH);
    for chunk in events.chunks(BATCH) {
        for (key, value) in chunk {
            batch
                .observe(*key, Aggregation::Sum, Observation::Value(*value), 0, 0)
                .unwrap();
        }
        writer.apply(&mut batch).unwrap();
    }
}

type Run = fn(&Aggregator, &[(SeriesKey, i128)]);

fn run_threads(engine: &Aggregator, events: &[(SeriesKey, i128)], threads: usize, run: Run) {
    let per_thread = events.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for part in events.chunks(per_thread) {
            scope.spawn(move || run(engine, part));
        }
    });
}

fn engine_benches(c: &mut Criterion) {
    for (name, events) in [
        ("hot_set_10k_zipf", zipf_events(10_000, 1.1, 7)),
        ("random_1m_uniform", uniform_events(1_000_000, 11)),
    ] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(EVENTS as u64));
        group.sample_size(10);
        group.bench_function("hashmap_baseline_1_thread", |b| {
            b.iter_batched(
                HashMap::<SeriesKey, i128, FxBuildHasher>::default,
                |mut map| {
                    for (key, value) in &events {
                        *map.entry(*key).or_insert(0) += *value;
                    }
                    map
                },
                BatchSize::LargeInput,
            )
        });
        for threads in [1, 2] {
            for (path, run) in [
                ("engine", run_direct as Run),
                ("engine_pre_aggregated", run_pre_aggregated),
            ] {
                group.bench_with_input(
                    BenchmarkId::new(path, format!("{threads}_threads")),
                    &threads,
                    |b, &threads| {
                        b.iter_batched(
                            Aggregator::new,
                            |engine| {
                                run_threads(&engine, &events, threads, run);
                                // Returned, so that dropping 1 M series is not timed.
                                engine
                            },
                            BatchSize::LargeInput,
                        )
                    },
                );
            }
        }
        // What a checkpoint pays to collect these deltas from two writers (merging shared series).
        group.bench_function("take_from_2_writers", |b| {
            b.iter_batched(
                || {
                    let engine = Aggregator::new();
                    run_threads(&engine, &events, 2, run_direct);
                    engine
                },
                |engine| black_box(engine.take().unwrap().deltas),
                BatchSize::LargeInput,
            )
        });
        group.finish();
    }
}

fn checkpoint_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(&dir.path().join("db"), 400 * 86_400, 35 * 86_400).unwrap();
    let names = Names::default();
    let mut catalog = MeterCatalog::new();
    for meter in 0..4 {
        names.meters.intern(&format!("meter-{meter}"));
        catalog.insert(
            format!("meter-{meter}"),
            MeterShape {
                aggregation: "SUM".into(),
                scale: 6,
                window_secs: 60,
            },
        );
    }
    for tenant in 0..50_000 {
        names.tenants.intern(&format!("tenant-{tenant}"));
    }
    names.dims.intern(&[("model".to_string(), "a".to_string())]);
    names.dims.intern(&[("model".to_string(), "b".to_string())]);
    names.dims.intern(&[("model".to_string(), "c".to_string())]);
    names.dims.intern(&[("model".to_string(), "d".to_string())]);
    names.dims.intern(&[("model".to_string(), "e".to_string())]);
    // A window far in the future: it stays open, so this measures the write path alone.
    let now_secs = 1_795_321_200;
    let mut group = c.benchmark_group("checkpoint");
    group.sample_size(10);
    for changed in [1_000usize, 10_000, 100_000] {
        group.throughput(Throughput::Elements(changed as u64));
        let mut seq = 0u64;
        group.bench_with_input(
            BenchmarkId::new("changed_series", changed),
            &changed,
            |b, &changed| {
                b.iter_batched(
                    || {
                        seq += 1;
                        Snapshot {
                            positions: vec![("ingest-log".into(), seq)],
                            generation: seq,
                            deltas: (0..changed)
                                .map(|i| {
                                    let mut key = key_of(i);
                                    key.window_start = now_secs + 3600;
                                    (key, tallyd::aggregate::AggState::Sum((i as i128).into()))
                                })
                                .collect(),
                            dedup_keys: Vec::new(),
                            sources: Vec::new(),
                            streams: Vec::new(),
                        }
                    },
                    |snapshot| {
                        let prepared = store
                            .prepare_checkpoint(
                                &snapshot,
                                &names,
                                &catalog,
                                now_secs,
                                60,
                                &Default::default(),
                            )
                            .unwrap();
                        black_box(store.commit_checkpoint(prepared).unwrap());
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();

    // Rating: a checkpoint in which `closing` series' windows close, with every tenant on a
    // graduated plan for every meter vs no plan: the difference is the cost of rating (ledger
    // reads and writes, rated records in the outbox) per record.
    let graduated = tallyd::rate::ChargeModel::Graduated {
        tiers: vec![
            tallyd::rate::Tier {
                up_to: Some(1000.into()),
                unit_price: "0.002".parse().unwrap(),
                flat_price: 0.into(),
            },
            tallyd::rate::Tier {
                up_to: None,
                unit_price: "0.001".parse().unwrap(),
                flat_price: 1.into(),
            },
        ],
    };
    let rated = tallyd::rate::plan::Plans {
        plans: vec![tallyd::rate::plan::Plan {
            id: "bench".into(),
            version: 1,
            currency: "USD".into(),
            period: tallyd::rate::period::BillingPeriod::Month { anchor_day: 1 },
            charges: (0..4)
                .map(|meter| tallyd::rate::Charge {
                    meter: format!("meter-{meter}"),
                    model: graduated.clone(),
                    free_units: 100.into(),
                    discount_percent: 0.into(),
                    minor_units: 2,
                })
                .collect(),
            minimum_spend: 0.into(),
            prepaid_commitment: 0.into(),
            limits: Vec::new(),
        }],
        tenants: HashMap::new(),
        default_plan: Some("bench".into()),
    };
    let unrated = tallyd::rate::plan::Plans::default();
    let mut group = c.benchmark_group("rating");
    group.sample_size(10);
    let mut window = 0i64;
    for closing in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(closing as u64));
        for (label, plans) in [("rated", &rated), ("unrated", &unrated)] {
            group.bench_with_input(BenchmarkId::new(label, closing), &closing, |b, &closing| {
                b.iter_batched(
                    || {
                        // A fresh past window each time: it closes in this checkpoint.
                        window += 1;
                        Snapshot {
                            positions: vec![("ingest-log".into(), window as u64)],
                            generation: window as u64,
                            deltas: (0..closing)
                                .map(|i| {
                                    let mut key = key_of(i);
                                    key.window_start = now_secs - 30 * 86_400 + window * 60;
                                    (
                                        key,
                                        tallyd::aggregate::AggState::Sum((i as i128 * 1_000_000).into()),
                                    )
                                })
                                .collect(),
                            dedup_keys: Vec::new(),
                            sources: Vec::new(),
                            streams: Vec::new(),
                        }
                    },
                    |snapshot| {
                        let prepared = store
                            .prepare_checkpoint(&snapshot, &names, &catalog, now_secs, 60, plans)
                            .unwrap();
                        black_box(store.commit_checkpoint(prepared).unwrap());
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();

    // Cluster mode: the same rated closing checkpoint from a replicated source (a Kafka
    // partition this replica owns), which also collects every emission and rating key and
    // outbox line of the batch into the partition's changelog flush (`state_entries`, `E`
    // lines), beside the same store work without a source.
    let cluster_dir = tempfile::tempdir().unwrap();
    let cluster_store = RocksStore::open(&cluster_dir.path().join("db"), 400 * 86_400, 35 * 86_400).unwrap();
    let source = "kafka/usage/0".to_string();
    cluster_store
        .tenant_sources
        .set_owned(Some([source.clone()].into_iter().collect()));
    let mut group = c.benchmark_group("cluster_rating");
    group.sample_size(10);
    let closing = 1_000usize;
    group.throughput(Throughput::Elements(closing as u64));
    for (label, replicated) in [("single", false), ("cluster", true)] {
        let target = if replicated { &cluster_store } else { &store };
        group.bench_function(label, |b| {
            b.iter_batched(
                || {
                    window += 1;
                    let deltas: Vec<_> = (0..closing)
                        .map(|i| {
                            let mut key = key_of(i);
                            key.window_start = now_secs - 30 * 86_400 + window * 60;
                            (
                                key,
                                tallyd::aggregate::AggState::Sum((i as i128 * 1_000_000).into()),
                            )
                        })
                        .collect();
                    let sources = if replicated {
                        vec![tallyd::aggregate::SourceCut {
                            source: source.clone(),
                            series: deltas.iter().map(|(key, _)| *key).collect(),
                            dedup_keys: Vec::new(),
                        }]
                    } else {
                        Vec::new()
                    };
                    let position = if replicated {
                        source.clone()
                    } else {
                        "ingest-log".into()
                    };
                    Snapshot {
                        positions: vec![(position, window as u64)],
                        generation: window as u64,
                        deltas,
                        dedup_keys: Vec::new(),
                        sources,
                        streams: Vec::new(),
                    }
                },
                |snapshot| {
                    let prepared = target
                        .prepare_checkpoint(&snapshot, &names, &catalog, now_secs, 60, &rated)
                        .unwrap();
                    black_box(&prepared.changelog);
                    black_box(target.commit_checkpoint(prepared).unwrap());
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, engine_benches, checkpoint_benches);
criterion_main!(benches);
