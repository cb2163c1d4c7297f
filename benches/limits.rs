//! The cost of one rate-limit decision, in process: tallyd's admission check (the gate every
//! edge calls, `state::limits::Limits::decide`, for one unit of a meter with a rate limit)
//! beside the `limitador` crate (in-memory storage) and `governor` (keyed, GCRA) on the same
//! workload: 10 k tenants, Zipf-skewed (s = 1), every tenant allowed 1000 a second with a
//! burst of 1000, on 1 and 2 threads sharing one limiter. Decisions per second are what
//! criterion's throughput line shows (BENCHMARKS.md, "Limits").

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use tallyd::model::SeriesKey;
use tallyd::state::limits::{Contributes, Limits};

const KEYS: usize = 10_000;
const SEQUENCE: usize = 1 << 20;

/// Key indices drawn from Zipf(s = 1) over `KEYS` keys (inverse CDF, seeded).
fn zipf_sequence() -> Vec<usize> {
    let weights: Vec<f64> = (1..=KEYS).map(|rank| 1.0 / rank as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(KEYS);
    let mut sum = 0.0;
    for weight in weights {
        sum += weight / total;
        cumulative.push(sum);
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(25);
    (0..SEQUENCE)
        .map(|_| {
            let u: f64 = rng.gen();
            cumulative.partition_point(|&c| c < u).min(KEYS - 1)
        })
        .collect()
}

struct Unit(SeriesKey);

impl Contributes for Unit {
    fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128)) {
        each(self.0, 1);
    }
}

const CONFIG: &str = r#"
[[meters]]
slug = "api_calls"
event_type = "api.request"
aggregation = "COUNT"

[rating]
default_plan = "metered"
[[plans]]
id = "metered"
currency = "USD"
[[plans.limits]]
meter = "api_calls"
kind = "rate"
limit = 1000
per = "second"
burst = 1000
"#;

struct Gate {
    names: tallyd::model::Names,
    meters: tallyd::meter::Meters,
    limits: Limits,
    keys: Vec<SeriesKey>,
}

fn gate() -> Gate {
    let config = tallyd::Config::load(CONFIG, &Default::default()).unwrap();
    let names = tallyd::model::Names::default();
    let meters = tallyd::meter::Meters::new(config.meters.clone(), &names);
    let limits = Limits::new();
    limits.set_plans(&Arc::new(config.plans));
    let meter = meters.by_slug("api_calls").unwrap().id;
    let keys = (0..KEYS)
        .map(|n| SeriesKey {
            meter,
            tenant: names.tenants.intern(&format!("tenant-{n}")),
            dims: 0,
            window_start: 0,
        })
        .collect();
    Gate {
        names,
        meters,
        limits,
        keys,
    }
}

/// Runs `iters` decisions split over `threads` threads on a shared limiter; the wall time.
fn run_threads(
    iters: u64,
    threads: usize,
    sequence: &Arc<Vec<usize>>,
    decide: Arc<dyn Fn(usize) -> bool + Send + Sync>,
) -> Duration {
    let per_thread = iters / threads as u64;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (sequence, decide) = (sequence.clone(), decide.clone());
            scope.spawn(move || {
                let mut allowed = 0u64;
                for i in 0..per_thread as usize {
                    let key = sequence[(i * threads + thread) % SEQUENCE];
                    allowed += u64::from(decide(key));
                }
                std::hint::black_box(allowed);
            });
        }
    });
    started.elapsed()
}

fn decisions(c: &mut Criterion) {
    let sequence = Arc::new(zipf_sequence());
    let mut group = c.benchmark_group("limits/decision");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(4));

    let tallyd = Arc::new(gate());
    let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
    let decide_tallyd: Arc<dyn Fn(usize) -> bool + Send + Sync> = {
        let gate = tallyd.clone();
        Arc::new(move |key| {
            gate.limits
                .decide(
                    &gate.names,
                    &gate.meters,
                    &[Unit(gate.keys[key])],
                    &[true],
                    tallyd::state::limits::Rates::Enforce,
                    &load,
                )
                .is_ok()
        })
    };

    let quota = governor::Quota::per_second(NonZeroU32::new(1000).unwrap())
        .allow_burst(NonZeroU32::new(1000).unwrap());
    let governor = Arc::new(governor::RateLimiter::<usize, _, _>::dashmap(quota));
    let decide_governor: Arc<dyn Fn(usize) -> bool + Send + Sync> = {
        let governor = governor.clone();
        Arc::new(move |key| governor.check_key(&key).is_ok())
    };

    let limitador = Arc::new(limitador::RateLimiter::new(KEYS as u64 * 2));
    limitador.add_limit(limitador::limit::Limit::new(
        "tallyd",
        1000,
        1,
        Vec::<&str>::new(),
        vec!["tenant"],
    ));
    let values: Arc<Vec<HashMap<String, String>>> = Arc::new(
        (0..KEYS)
            .map(|n| HashMap::from([("tenant".to_string(), format!("tenant-{n}"))]))
            .collect(),
    );
    let namespace = limitador::limit::Namespace::from("tallyd");
    let decide_limitador: Arc<dyn Fn(usize) -> bool + Send + Sync> = {
        let limitador = limitador.clone();
        Arc::new(move |key| {
            !limitador
                .check_rate_limited_and_update(&namespace, &values[key], 1, false)
                .unwrap()
                .limited
        })
    };

    for threads in [1usize, 2] {
        for (name, decide) in [
            ("tallyd", decide_tallyd.clone()),
            ("governor", decide_governor.clone()),
            ("limitador", decide_limitador.clone()),
        ] {
            group.bench_function(format!("{name}/{threads}_threads"), |b| {
                b.iter_custom(|iters| {
                    run_threads(iters.max(threads as u64), threads, &sequence, decide.clone())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
