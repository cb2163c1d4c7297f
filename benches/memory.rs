//! Memory per active series: RSS growth of the engine holding N distinct series deltas
//! (SUM states; the common case), written by one writer. Prints one line per N. Run with
//! `cargo bench --bench memory` (takes about a minute, needs ~2 GB at 10 M).

use tallyd::aggregate::{Aggregation, Aggregator, Observation};
use tallyd::model::SeriesKey;

// The daemon's allocator (src/main.rs), so the figure is the daemon's.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    // `cargo bench` passes --bench; any other argument selects sizes, e.g. `-- 1000000`.
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000_000, 10_000_000]
    } else {
        sizes
    };
    for series in sizes {
        let before = rss_bytes();
        let engine = Aggregator::new();
        let writer = engine.writer();
        writer.observe_batch(|batch| {
            for i in 0..series {
                let key = SeriesKey {
                    meter: (i % 4) as u32,
                    tenant: (i / 4) as u32,
                    dims: 0,
                    window_start: 1_795_321_200,
                };
                batch
                    .observe(key, Aggregation::Sum, Observation::Value(1), 0, 0)
                    .unwrap();
            }
        });
        let after = rss_bytes();
        println!(
            "memory/active_series series={series} rss_growth_bytes={} bytes_per_series={:.1}",
            after.saturating_sub(before),
            after.saturating_sub(before) as f64 / series as f64
        );
        assert_eq!(engine.len(), series);
        drop(engine);
    }
}
