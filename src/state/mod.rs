//! What the stages and the edges share and exchange, below both: the daemon's shared state
//! (`Shared`: config, names, meters, the engine, the store, the dedup index, readiness,
//! checkpoint generations), the commit stage's input (`CommitRequest`), snapshot cuts, the
//! changelog sink the checkpoint publishes through, and the priority of background stages.
//!
//! The pipeline builds these and runs the stages; edges (`ingest`, `api`, `emit`) only use them.
//! Nothing here speaks a protocol.

pub mod commit;
pub mod crash_point;
pub mod dedup;
pub mod limits;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregator;
use crate::config::Config;
use crate::meter::Meters;
use crate::model::Names;
use crate::rate::plan::Plans;
use crate::store::changelog::ChangelogChunk;
use crate::store::checkpoint::Snapshot;
use crate::store::{MeterCatalog, RocksStore};
pub use commit::{CommitError, CommitRequest};
pub use dedup::DedupIndex;

/// The nice value of the stages no request waits on directly: checkpoints, dedup-key
/// ingestion, dedup filter builds, changelog compaction. They run in bursts (a checkpoint
/// every flush interval, a 35 MB dedup file every million keys) and, at equal priority, took
/// the CPU from the request path for tens of milliseconds at a time: the tail of request
/// latency. At 5 each still weighs about a third of a normal thread with the scheduler, so
/// they keep up at peak load; and when they do fall behind, ingest answers UNAVAILABLE
/// (`aggregate.max_pending_series`), which gives them the CPU back (BENCHMARKS.md, "Request latency and background priority").
pub const BACKGROUND_NICE: i32 = 5;

/// Starts a stage on its own thread. A panic in it (a broken invariant: input errors are
/// handled, not panicked on) is caught and makes the daemon stop with an error
/// (`Shared::stage_died`) rather than leave it running without the stage.
pub fn spawn_stage(
    name: &str,
    shared: Arc<Shared>,
    stage: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let stage_name = name.to_string();
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(stage)) {
            let why = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".to_string());
            shared.stage_died(&stage_name, &why);
        }
    })
}

/// Lowers the calling thread's CPU priority to `BACKGROUND_NICE` (Linux: nice is per thread).
/// Best effort: a refusal leaves the thread at normal priority.
pub fn background_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE)
    {
        tracing::debug!(%error, "background thread keeps its priority");
    }
}

/// State shared by the stages and the API.
pub struct Shared {
    pub config: Config,
    pub names: Names,
    pub meters: Meters,
    /// Shapes of every meter the store has data for (configured or not).
    pub catalog: MeterCatalog,
    pub engine: Aggregator,
    pub store: RocksStore,
    pub dedup: DedupIndex,
    /// Snapshots handed to the checkpoint but not yet committed. Its lock also orders queries
    /// against snapshot cuts and checkpoint commits.
    pub flushing: RwLock<Vec<Arc<Snapshot>>>,
    /// Set while a snapshot is in flight (at most one at a time).
    pub checkpoint_busy: AtomicBool,
    /// Ingest-log position covered by the last committed checkpoint.
    pub durable_log_seq: AtomicU64,
    /// Recovery done, ingest healthy.
    pub ready: AtomicBool,
    /// Unix milliseconds of the last committed checkpoint (recovery counts as one).
    pub last_checkpoint_ms: AtomicI64,
    /// Snapshot generations: the last one cut and the last one durable, for stages that must
    /// wait until what they applied is checkpointed (a Kafka consumer giving up partitions).
    pub generations: Mutex<Generations>,
    pub generation_durable: Condvar,
    /// Positions made durable by checkpoints and not yet acknowledged to their source (Kafka
    /// offsets to commit), with the unix ms of the checkpoint that made them durable.
    pub durable_positions: Mutex<Vec<(String, u64, i64)>>,
    /// Where checkpoints publish replicated sources' state before committing (the Kafka
    /// changelog); set by the Kafka source when it starts.
    pub changelog: OnceLock<Arc<dyn ChangelogSink>>,
    /// Plans in force: `config.plans` at start, swapped by a reload (SIGHUP or file change).
    pub plans: RwLock<Arc<Plans>>,
    /// API keys in force (`[auth]`), swapped by a reload like the plans.
    pub keys: crate::auth::KeyRing,
    /// Rate limits and quotas of the plans in force, decided at admission.
    pub limits: limits::Limits,
    /// Cancelled when a stage died (`spawn_stage`): the daemon stops and exits non-zero for its
    /// supervisor instead of lingering as a zombie that answers 200.
    pub fatal: CancellationToken,
    /// Which stage died, and why.
    pub failure: Mutex<Option<String>>,
    /// Conditions that make the daemon unready while they last (a full disk under the ingest
    /// log, a partition whose restore failed...), by component; each clears its own.
    pub faults: Mutex<std::collections::BTreeMap<&'static str, String>>,
    /// `!faults.is_empty()`, readable on every request without the lock.
    pub faulted: AtomicBool,
    /// The engine lost deltas it had taken or applied only in part (a broken invariant: no
    /// sum can overflow within the quantity range). From then on no snapshot is cut, so no
    /// checkpoint stores a position past the lost usage: the sources replay it after a restart.
    pub engine_failed: AtomicBool,
    /// Outputs an operator asked to send their parked records again (`emit`).
    pub replays: Mutex<std::collections::BTreeSet<String>>,
}

/// Publishes changelog chunks durably (blocking until the broker acknowledges all of them).
pub trait ChangelogSink: Send + Sync {
    /// Sets each chunk's `restore_from` and `epoch` and publishes them. Returns the sources
    /// another replica turns out to have fenced meanwhile (this one was deposed from them: the
    /// checkpoint must emit nothing for them).
    fn publish(&self, chunks: &mut [ChangelogChunk]) -> Result<Vec<String>, PublishError>;
}

/// The changelog did not take a checkpoint's chunks (the checkpoint is retried).
#[derive(Debug, thiserror::Error)]
#[error("changelog not published: {0}")]
pub struct PublishError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Outcome of `Shared::try_snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotCut {
    /// Handed to the checkpoint stage with this generation.
    Cut(u64),
    /// A checkpoint is in flight; try again shortly.
    Busy,
    /// The engine or the checkpoint stage failed (logged; readiness dropped).
    Failed,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Generations {
    pub cut: u64,
    pub durable: u64,
}

impl Shared {
    /// The acceptance window now: the config's, bounded by the store's expiry clock.
    pub fn acceptance(&self) -> crate::model::Acceptance {
        let mut acceptance = self.config.acceptance();
        acceptance.not_before_ms = self
            .store
            .expiry_clock()
            .not_before_ms(self.config.dedup_horizon_secs, self.config.max_future_secs);
        acceptance
    }

    /// Ready for ingest: started, not stopping, and no fault.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.faulted.load(Ordering::Acquire)
    }

    /// `component` cannot do its part until it says otherwise (`clear_fault`): the daemon is
    /// unready meanwhile, and says why on `/readyz`.
    pub fn fault(&self, component: &'static str, why: impl Into<String>) {
        let mut faults = self.faults.lock();
        faults.insert(component, why.into());
        self.faulted.store(true, Ordering::Release);
    }

    pub fn clear_fault(&self, component: &'static str) {
        let mut faults = self.faults.lock();
        if faults.remove(component).is_some() {
            tracing::info!(component, "recovered");
        }
        self.faulted.store(!faults.is_empty(), Ordering::Release);
    }

    /// The engine's deltas can no longer be trusted (`engine_failed`): stop cutting snapshots
    /// and stop the daemon, so that it restarts from the last checkpoint and replays.
    pub fn engine_failed(&self, why: &str) {
        self.engine_failed.store(true, Ordering::Release);
        self.stage_died("engine", why);
    }

    /// A stage cannot go on: readiness and liveness drop, and the daemon shuts down.
    pub fn stage_died(&self, stage: &str, why: &str) {
        tracing::error!(stage, why, "stage died; stopping the daemon");
        self.fault("stage", format!("{stage} died"));
        self.failure
            .lock()
            .get_or_insert_with(|| format!("{stage}: {why}"));
        self.fatal.cancel();
    }

    /// Whether the push edges should refuse new requests because checkpoints are behind: the
    /// engine holds more unflushed series than `aggregate.max_pending_series`. This bounds the
    /// daemon's memory and the ingest-log tail a restart replays when ingest outruns the
    /// checkpoint (e.g. every event a new series on 2 saturated cores); the producer retries.
    /// (The Kafka source pauses its partitions on its own bound, `kafka.max_pending_series`.)
    pub fn checkpoints_behind(&self) -> bool {
        self.engine.len() > self.config.max_pending_series
    }

    /// Cuts a snapshot of every engine writer (deltas, dedup keys and positions at one cut) and
    /// hands it to the checkpoint stage, unless a checkpoint is still in flight.
    pub fn try_snapshot(&self, checkpoints: &SyncSender<Arc<Snapshot>>) -> SnapshotCut {
        if self.engine_failed.load(Ordering::Acquire) {
            return SnapshotCut::Failed;
        }
        if self.checkpoint_busy.swap(true, Ordering::AcqRel) {
            return SnapshotCut::Busy;
        }
        let snapshot = {
            let mut flushing = self.flushing.write();
            let cut = match self.engine.take() {
                Ok(cut) => cut,
                Err(error) => {
                    // The taken deltas (and the positions and dedup keys drained with them)
                    // are gone from memory: no later cut may store a position past them.
                    self.engine_failed(&format!("cannot merge engine deltas: {error}; restart to replay"));
                    self.checkpoint_busy.store(false, Ordering::Release);
                    return SnapshotCut::Failed;
                }
            };
            let generation = {
                let mut generations = self.generations.lock();
                generations.cut += 1;
                generations.cut
            };
            let snapshot = Arc::new(Snapshot {
                generation,
                positions: cut.positions,
                streams: cut.streams,
                deltas: cut.deltas,
                dedup_keys: cut.dedup_keys,
                sources: cut.sources,
            });
            flushing.push(snapshot.clone());
            snapshot
        };
        let generation = snapshot.generation;
        metrics::gauge!(crate::telemetry::ACTIVE_SERIES).set(snapshot.deltas.len() as f64);
        if checkpoints.send(snapshot).is_err() {
            // Nothing is lost: sources replay from the last durable positions on restart.
            tracing::error!("checkpoint thread is gone; usage is replayed from the sources on restart");
            self.fault("checkpoint", "the checkpoint stage is gone");
            return SnapshotCut::Failed;
        }
        SnapshotCut::Cut(generation)
    }

    /// Blocks until everything applied to the engine before this call is durable in a
    /// checkpoint, or `timeout` passes (false).
    pub fn checkpoint_now(&self, checkpoints: &SyncSender<Arc<Snapshot>>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let target = match self.try_snapshot(checkpoints) {
                SnapshotCut::Cut(generation) => generation,
                // One in flight: it may predate our writes, so wait for it and cut another.
                SnapshotCut::Busy => self.generations.lock().cut + 1,
                SnapshotCut::Failed => return false,
            };
            let mut generations = self.generations.lock();
            while generations.durable < target.min(generations.cut) {
                if self
                    .generation_durable
                    .wait_until(&mut generations, deadline)
                    .timed_out()
                {
                    return false;
                }
            }
            if generations.durable >= target {
                return true;
            }
            drop(generations);
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    /// Only the calling thread is lowered: a process-wide nice would slow the request path too.
    #[test]
    fn background_priority_lowers_only_the_calling_thread() {
        let before = own_nice();
        let lowered = std::thread::spawn(|| {
            let start = own_nice();
            background_priority();
            (start, own_nice())
        })
        .join()
        .unwrap();
        assert_eq!(own_nice(), before, "the spawning thread keeps its priority");
        match lowered {
            // Already nicer than that (a niced test run): raising priority needs privileges.
            (start, _) if start > BACKGROUND_NICE => {}
            (_, after) => assert_eq!(after, BACKGROUND_NICE),
        }
    }
}
