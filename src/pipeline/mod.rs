//! THE wiring: opens the store, recovers, starts the stages in data-path order and stops them in
//! the same order.
//!
//! ```text
//! HTTP edge (tokio) ──CommitRequest──► commit thread ──Arc<Snapshot>──► checkpoint thread
//!   decode, dedup reserve,     (mpsc, bounded     group commit to log,    (sync_channel(1):   one WriteBatch,
//!   pre-aggregate              by the byte        apply, ack, snapshot     one in flight)     outbox → usage file
//!                              budget)
//! ```
//! The Kafka source (optional) is a second writer: its thread folds batches into its own engine
//! map together with partition offsets, and any snapshot cut takes every writer at once.
//!
//! Shutdown: the token stops the HTTP edge (in-flight requests finish); the Kafka source
//! checkpoints, commits offsets and leaves its group; the commit thread sees its input close and
//! cuts a final snapshot; the checkpoint thread writes it and exits.

pub mod checkpoint;
pub mod commit;
pub mod dedup;
pub mod reload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregator;
use crate::config::Config;
use crate::emit::file::{FileEmitter, JsonlFile};
use crate::ingest::dedup::DedupIndex;
use crate::meter::Meters;
use crate::model::Names;
use crate::store::checkpoint::Snapshot;
use crate::store::log::{IngestLog, LogBatch};
use crate::store::{MeterCatalog, RocksStore, INGEST_LOG_SOURCE};

/// The nice value of the stages no request waits on directly: checkpoints, dedup-key
/// ingestion, dedup filter builds, changelog compaction. They run in bursts (a checkpoint
/// every flush interval, a 35 MB dedup file every million keys) and, at equal priority, took
/// the CPU from the request path for tens of milliseconds at a time: the tail of request
/// latency. At 5 each still weighs about a third of a normal thread with the scheduler, so
/// they keep up at peak load; and when they do fall behind, ingest answers UNAVAILABLE
/// (`aggregate.max_pending_series`), which gives them the CPU back (BENCHMARKS.md §18).
pub const BACKGROUND_NICE: i32 = 5;

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
    pub last_checkpoint_ms: std::sync::atomic::AtomicI64,
    /// Snapshot generations: the last one cut and the last one durable, for stages that must
    /// wait until what they applied is checkpointed (a Kafka consumer giving up partitions).
    pub generations: Mutex<Generations>,
    pub generation_durable: Condvar,
    /// Positions made durable by checkpoints and not yet acknowledged to their source (Kafka
    /// offsets to commit), with the unix ms of the checkpoint that made them durable.
    pub durable_positions: Mutex<Vec<(String, u64, i64)>>,
    /// Where checkpoints publish replicated sources' state before committing (the Kafka
    /// changelog); set by the Kafka source when it starts.
    pub changelog: std::sync::OnceLock<Arc<dyn ChangelogSink>>,
    /// Plans in force: `config.plans` at start, swapped by a reload (SIGHUP or file change).
    pub plans: RwLock<Arc<crate::rate::plan::Plans>>,
}

/// Publishes changelog chunks durably (blocking until the broker acknowledges all of them).
pub trait ChangelogSink: Send + Sync {
    /// Sets each chunk's `restore_from` and publishes them.
    fn publish(&self, chunks: &mut [crate::store::changelog::ChangelogChunk]) -> Result<(), String>;
}

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
        if self.checkpoint_busy.swap(true, Ordering::AcqRel) {
            return SnapshotCut::Busy;
        }
        let snapshot = {
            let mut flushing = self.flushing.write();
            let cut = match self.engine.take() {
                Ok(cut) => cut,
                Err(error) => {
                    // An i128 overflow merging two writers' deltas: no position moves, so the
                    // sources (ingest log, Kafka offsets) replay this usage after a restart.
                    tracing::error!(%error, "cannot merge engine deltas; restart to replay");
                    self.ready.store(false, Ordering::Release);
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
            self.ready.store(false, Ordering::Release);
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

/// What recovery hands to the commit stage.
struct Recovered {
    shared: Arc<Shared>,
    log: IngestLog,
    /// The commit stage's engine writer (recovery replays through it).
    writer: crate::aggregate::Writer,
    /// Cumulative streams as of the end of the replayed log.
    streams: crate::aggregate::streams::Streams,
    replayed: usize,
    usage_file: FileEmitter,
    /// Where recovery spent its time (logged: restart time is an operator's question).
    timings: RecoveryTimings,
}

#[derive(Debug, Default)]
struct RecoveryTimings {
    store_open: Duration,
    outbox: Duration,
    log_open: Duration,
    replay: Duration,
}

fn recover(config: Config) -> anyhow::Result<Recovered> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let mut timings = RecoveryTimings::default();
    let mut step = std::time::Instant::now();
    let mut lap = |into: &mut Duration| {
        *into = step.elapsed();
        step = std::time::Instant::now();
    };
    let store = RocksStore::open(
        &config.data_dir.join("rocksdb"),
        config.retention_secs,
        config.dedup_horizon_secs,
    )
    .context("cannot open the store")?;
    store.set_dedup_filter_max_bytes(config.dedup_filter_max_bytes);
    lap(&mut timings.store_open);
    let names = Names::default();
    let meters = Meters::new(config.meters.clone(), &names);
    let catalog = store.guard_meters(meters.all())?;
    // Every configured emitter registers before the file emitter trims what it delivered, so
    // a line stays until each of them has it.
    for name in crate::emit::configured(&config) {
        store.register_emitter(name)?;
    }
    let mut usage_file = FileEmitter::open(&config.emit_file_path, &store)
        .with_context(|| format!("cannot open {}", config.emit_file_path.display()))?;
    let redelivered = usage_file.deliver(&store)?;
    if redelivered > 0 {
        tracing::info!(
            records = redelivered,
            "delivered window records left in the outbox"
        );
    }
    lap(&mut timings.outbox);
    let position = store.ingest_log_position()?;
    let (log, replay) = IngestLog::open(
        &config.data_dir.join("ingest-log"),
        config.ingest_log_sync,
        config.ingest_log_segment_bytes,
        position,
    )?;
    lap(&mut timings.log_open);
    let plans = RwLock::new(Arc::new(config.plans.clone()));
    // Generations continue from the last committed one: queries compare them with the store's.
    let generation = store.checkpoint_generation(&store.snapshot())?;
    let shared = Arc::new(Shared {
        plans,
        engine: Aggregator::new(),
        config,
        names,
        meters,
        catalog,
        store,
        dedup: DedupIndex::default(),
        flushing: RwLock::new(Vec::new()),
        checkpoint_busy: AtomicBool::new(false),
        durable_log_seq: AtomicU64::new(position),
        ready: AtomicBool::new(false),
        last_checkpoint_ms: std::sync::atomic::AtomicI64::new(crate::model::now_ms()),
        generations: Mutex::new(Generations {
            cut: generation,
            durable: generation,
        }),
        generation_durable: Condvar::new(),
        durable_positions: Mutex::new(Vec::new()),
        changelog: std::sync::OnceLock::new(),
    });
    let writer = shared.engine.writer();
    let mut streams = crate::aggregate::streams::Streams::new(shared.store.stream_states()?);
    let replayed = replay.len();
    for record in replay {
        let batch = LogBatch::decode(&record.payload)
            .map_err(|error| anyhow::anyhow!("ingest log record {} does not decode: {error}", record.seq))?;
        let mut parts = batch
            .into_parts(&shared.names)
            .map_err(|error| anyhow::anyhow!("ingest log record {}: {error}", record.seq))?;
        for key in &parts.dedup_keys {
            shared.dedup.reserve(*key);
        }
        commit::apply_logged(
            &writer,
            &mut streams,
            &mut parts.batch,
            &mut parts.dedup_keys,
            &parts.cumulative,
            Some((INGEST_LOG_SOURCE.to_string(), record.seq + 1)),
        )?;
    }
    lap(&mut timings.replay);
    Ok(Recovered {
        shared,
        log,
        writer,
        streams,
        replayed,
        usage_file,
        timings,
    })
}

/// The stages behind the ingest edges, started: recovery done, commit and checkpoint threads
/// running. `run` puts the HTTP edge and the Kafka source in front; benchmarks drive it directly.
pub struct Stages {
    pub shared: Arc<Shared>,
    /// For sources that cut snapshots themselves (the Kafka source).
    pub checkpoints: SyncSender<Arc<Snapshot>>,
    /// The commit stage's input (HTTP batches); dropping every sender drains the stages.
    pub requests: std::sync::mpsc::Sender<commit::CommitRequest>,
    pub commit_thread: std::thread::JoinHandle<()>,
    pub checkpoint_thread: std::thread::JoinHandle<()>,
}

impl Stages {
    /// For tests: the stages on the embedded config with everything under `dir`.
    #[cfg(test)]
    pub fn for_tests(dir: &std::path::Path, flush_interval_ms: u64) -> Stages {
        let env = [("TALLYD__STORAGE__DATA_DIR".to_string(), dir.display().to_string())]
            .into_iter()
            .collect();
        let mut config = crate::Config::load(crate::config::DEFAULT_CONFIG, &env).unwrap();
        config.emit_file_path = dir.join("usage.jsonl");
        config.dead_letter_path = dir.join("dead-letter.jsonl");
        config.flush_interval_ms = flush_interval_ms;
        Stages::start(config).unwrap()
    }

    /// Opens the store, recovers (replays the ingest log) and starts the threads (blocking).
    pub fn start(config: Config) -> anyhow::Result<Stages> {
        let dead_letter_path = config.dead_letter_path.clone();
        let Recovered {
            shared,
            log,
            writer,
            streams,
            replayed,
            usage_file,
            timings,
        } = recover(config)?;
        tracing::info!(
            replayed_log_records = replayed,
            position = shared.durable_log_seq.load(Ordering::Relaxed),
            store_open_ms = timings.store_open.as_millis() as u64,
            outbox_ms = timings.outbox.as_millis() as u64,
            log_open_ms = timings.log_open.as_millis() as u64,
            replay_ms = timings.replay.as_millis() as u64,
            "recovered"
        );
        let (wake_tx, wake_rx) = std::sync::mpsc::sync_channel(1);
        let dedup_stage = dedup::DedupLoop {
            shared: shared.clone(),
            wake: wake_rx,
        };
        let dedup_thread = std::thread::Builder::new()
            .name("tallyd-dedup".into())
            .spawn(move || {
                background_priority();
                dedup_stage.run()
            })?;
        let (snapshot_tx, snapshot_rx) = std::sync::mpsc::sync_channel(1);
        let checkpoint_stage = checkpoint::CheckpointLoop {
            shared: shared.clone(),
            snapshots: snapshot_rx,
            usage_file,
            dedup_wake: Some(wake_tx),
            dedup_thread: Some(dedup_thread),
        };
        let checkpoint_thread = std::thread::Builder::new()
            .name("tallyd-checkpoint".into())
            .spawn(move || {
                background_priority();
                checkpoint_stage.run()
            })?;
        let (request_tx, request_rx) = std::sync::mpsc::channel();
        let commit_stage = commit::CommitLoop {
            shared: shared.clone(),
            log,
            dead_letter: JsonlFile::open(&dead_letter_path)
                .with_context(|| format!("cannot open {}", dead_letter_path.display()))?,
            requests: request_rx,
            checkpoints: snapshot_tx.clone(),
            writer,
            streams,
        };
        let commit_thread = std::thread::Builder::new()
            .name("tallyd-commit".into())
            .spawn(move || commit_stage.run())?;
        Ok(Stages {
            shared,
            checkpoints: snapshot_tx,
            requests: request_tx,
            commit_thread,
            checkpoint_thread,
        })
    }

    /// Closes the inputs and waits for the final checkpoint (blocking). False if a stage panicked.
    pub fn drain(self) -> bool {
        drop(self.requests);
        drop(self.checkpoints);
        let commit = self.commit_thread.join().is_ok();
        let checkpoint = self.checkpoint_thread.join().is_ok();
        commit && checkpoint
    }
}

/// Binds and starts the OTLP edges that are configured (in cluster mode they forward to the
/// ingest topic, `ingest::otlp::forward`).
async fn start_otlp(
    shared: &Arc<Shared>,
    state: &crate::api::AppState,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Result<(), String>>>> {
    let config = &shared.config;
    let mut servers = Vec::new();
    let ingest = crate::ingest::otlp::OtlpIngest { app: state.clone() };
    let tls = match &config.otlp.tls {
        Some(tls) => Some(crate::ingest::otlp::TlsIdentity::load(tls).context("cannot read otlp.tls")?),
        None => None,
    };
    let http_tls = match &tls {
        Some(identity) => Some(identity.rustls_config().map_err(|error| anyhow::anyhow!(error))?),
        None => None,
    };
    let scheme = if tls.is_some() { "tls" } else { "plain" };
    if let Some(addr) = config.otlp_grpc_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind otlp_grpc_addr {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, transport = scheme, "otlp grpc listening");
        let (ingest, token) = (ingest.clone(), shutdown.clone());
        servers.push(tokio::spawn(async move {
            crate::ingest::otlp::grpc::serve(ingest, listener, token, tls.as_ref())
                .await
                .map_err(|error| error.to_string())
        }));
    }
    if let Some(addr) = config.otlp_http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind otlp_http_addr {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, transport = scheme, "otlp http listening");
        let token = shutdown.clone();
        servers.push(tokio::spawn(async move {
            crate::ingest::otlp::serve_http(ingest, listener, token, http_tls)
                .await
                .map_err(|error| error.to_string())
        }));
    }
    Ok(servers)
}

/// Runs the daemon until `shutdown` is cancelled, then drains within `grace`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    // The recorder goes in before any stage starts: until then the metrics crate drops every
    // increment (an emitter delivering the outbox at start-up counted nothing, and the webhook
    // test saw no records counter about one run in three).
    crate::telemetry::prometheus();
    let Stages {
        shared,
        checkpoints,
        requests,
        commit_thread,
        checkpoint_thread,
    } = tokio::task::spawn_blocking(move || Stages::start(config)).await??;

    let local: SocketAddr = listener.local_addr()?;
    let cluster = match (&shared.config.cluster, &shared.config.kafka) {
        (Some(cluster), Some(kafka)) => {
            let url = cluster
                .advertise_url
                .clone()
                .unwrap_or_else(|| format!("http://{local}"));
            Some(
                crate::cluster::Cluster::start(kafka, cluster, url)
                    .await
                    .context("cannot start cluster mode")?,
            )
        }
        _ => None,
    };
    let kafka_source = match shared.config.kafka.clone() {
        Some(kafka) => Some(
            crate::ingest::kafka::KafkaSource::start(
                shared.clone(),
                kafka,
                checkpoints.clone(),
                cluster.clone(),
            )
            .await
            .context("cannot start the Kafka source")?,
        ),
        None => None,
    };

    let emitters = crate::emit::Emitters::start(&shared).context("cannot start the emitters")?;
    if let Some(path) = shared.config.source_path.clone() {
        reload::spawn(shared.clone(), path, shutdown.clone());
    }
    let mut state = crate::api::AppState::new(shared.clone(), requests);
    state.cluster = cluster.clone();
    let otlp_servers = start_otlp(&shared, &state, &shutdown).await?;
    let app = crate::api::router(state);
    shared.ready.store(true, Ordering::Release);
    tracing::info!(addr = %local, "http listening");
    let serve_shutdown = shutdown.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { serve_shutdown.cancelled().await })
        .await
        .context("http server failed");
    // Whatever stopped the HTTP server stops the OTLP edges too; they hold commit senders, so
    // the commit stage drains only after they finished their in-flight requests.
    shutdown.cancel();
    for server in otlp_servers {
        if let Ok(Err(error)) = server.await {
            tracing::error!(%error, "otlp server failed");
        }
    }
    served?;
    shared.ready.store(false, Ordering::Release);
    tracing::info!("ingest stopped; draining");
    if let Some(source) = kafka_source {
        // Checkpoints what it consumed, commits offsets and leaves the group first.
        if !tokio::task::spawn_blocking(move || source.stop())
            .await
            .unwrap_or(false)
        {
            tracing::error!("kafka source panicked; its partitions replay from the last checkpoint");
        }
    }
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || cluster.stop()).await?;
    }

    drop(checkpoints);
    // The router (and with it the last request sender) is dropped: the commit stage drains,
    // cuts the final snapshot and drops the checkpoint sender, which ends the checkpoint stage.
    let drain = tokio::task::spawn_blocking(move || {
        let commit = commit_thread.join().is_ok();
        let checkpoint = checkpoint_thread.join().is_ok();
        // After the final checkpoint: the emitters deliver what it queued, then stop.
        emitters.stop();
        commit && checkpoint
    });
    match tokio::time::timeout(grace, drain).await {
        Ok(Ok(true)) => {
            tracing::info!("final checkpoint written; bye");
            Ok(())
        }
        Ok(_) => anyhow::bail!("a stage panicked during shutdown; the ingest log is replayed on restart"),
        Err(_) => {
            let pending = shared.flushing.read().len();
            anyhow::bail!(
                "shutdown grace of {:?} elapsed with {pending} checkpoint(s) pending; \
                 nothing is lost: the ingest log is replayed on restart",
                grace
            )
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
