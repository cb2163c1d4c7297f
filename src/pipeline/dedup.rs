//! The dedup stage, its own thread: moves the dedup keys that checkpoints staged into
//! the store's `dedup` column family in bulk (`store::dedup`), then forgets them in memory.
//!
//! Building and ingesting the file of a million keys is a burst of about half a second (sort,
//! SST file, ingestion) and forgetting them another 100 ms: on the checkpoint thread it held
//! back the checkpoints behind it, and with them the freshness of queries and the pending-series
//! bound that pushes back on producers. Here nothing waits for it: until it is done the keys are
//! answered from memory. It runs at the background stages' lower priority
//! (`state::background_priority`); renicing it alone, further, was tried and dropped: it takes the
//! index's shard locks, RocksDB's and the allocator's, and a preempted holder stalls every request
//! behind it (ARCHITECTURE.md, "Known limits").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;
use crate::telemetry;

/// How often the stage looks whether staged keys became old enough to move.
const POLL: Duration = Duration::from_secs(1);
/// How often the filter thread looks whether a build is due without being woken.
const FILTER_POLL: Duration = Duration::from_secs(60);
/// After a failed build, the wait before the next try.
const FILTER_RETRY: Duration = Duration::from_secs(10);

pub struct DedupLoop {
    pub shared: Arc<Shared>,
    /// A checkpoint found an ingestion due; closed when the checkpoint stage stops.
    pub wake: Receiver<()>,
}

impl DedupLoop {
    pub fn run(self) {
        // The filter over stored keys is built (and rebuilt) on its own thread: a scan of the
        // column family takes seconds per hundred million keys, and ingestions must not wait.
        let (filter_wake, filter_rx) = std::sync::mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let builder = {
            let (shared, stop) = (self.shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("tallyd-dedup-filter".into())
                .spawn(move || {
                    crate::state::background_priority();
                    build_filters(&shared, &filter_rx, &stop)
                })
        };
        if let Err(error) = &builder {
            tracing::error!(%error, "dedup filter thread not started; lookups read the store");
        }
        loop {
            let last = match self.wake.recv_timeout(POLL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            // At the stop everything goes (not needed for correctness, the next start ingests
            // what is left, only for a quick start).
            if last || self.shared.store.dedup_ingest_due() {
                self.ingest();
                // Full, the filter answers "maybe" more often: a new build is looked at.
                let _ = filter_wake.try_send(());
            }
            if last {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        drop(filter_wake);
        if let Ok(builder) = builder {
            let _ = builder.join();
        }
        tracing::debug!("dedup stage stopped");
    }

    fn ingest(&self) {
        let started = Instant::now();
        match self.shared.store.ingest_staged_dedup() {
            Ok(keys) if keys.is_empty() => {}
            Ok(keys) => {
                let forget_started = Instant::now();
                self.shared.dedup.forget(&keys);
                tracing::debug!(
                    keys = keys.len(),
                    elapsed_ms = forget_started.elapsed().as_millis() as u64,
                    "dedup keys forgotten in memory"
                );
                metrics::counter!(telemetry::DEDUP_INGESTIONS, "outcome" => "ok").increment(1);
                metrics::histogram!(telemetry::DEDUP_INGEST_DURATION).record(started.elapsed().as_secs_f64());
                metrics::gauge!(telemetry::DEDUP_PENDING).set(self.shared.dedup.len() as f64);
            }
            // The keys stay staged and in memory; the next checkpoint's wake retries.
            Err(error) => {
                metrics::counter!(telemetry::DEDUP_INGESTIONS, "outcome" => "error").increment(1);
                tracing::error!(%error, "staged dedup keys not ingested yet");
            }
        }
    }
}

/// The filter thread: the first build at start, then a rebuild whenever one is due
/// (`store::dedup_filter`), until the stage stops.
fn build_filters(shared: &Shared, wake: &Receiver<()>, stop: &AtomicBool) {
    loop {
        if shared.store.dedup_filter_build_due() {
            let started = Instant::now();
            match shared.store.build_dedup_filter(stop) {
                Ok(Some(built)) => {
                    tracing::info!(
                        keys = built.keys,
                        bytes = built.bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "dedup filter built"
                    );
                    metrics::counter!(telemetry::DEDUP_FILTER_BUILDS, "outcome" => "ok").increment(1);
                    metrics::gauge!(telemetry::DEDUP_FILTER_BYTES).set(built.bytes as f64);
                }
                Ok(None) => {}
                Err(error) => {
                    metrics::counter!(telemetry::DEDUP_FILTER_BUILDS, "outcome" => "error").increment(1);
                    tracing::error!(%error, "dedup filter not built; lookups read the store meanwhile");
                    if let Err(RecvTimeoutError::Disconnected) = wake.recv_timeout(FILTER_RETRY) {
                        return;
                    }
                    continue;
                }
            }
        }
        if let Some(keys) = shared.store.dedup_filter_keys() {
            metrics::gauge!(telemetry::DEDUP_FILTER_KEYS).set(keys as f64);
        }
        if let Err(RecvTimeoutError::Disconnected) = wake.recv_timeout(FILTER_POLL) {
            return;
        }
    }
}
