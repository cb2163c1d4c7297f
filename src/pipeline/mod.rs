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
use std::time::Duration;

use anyhow::Context;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregator;
use crate::api::AppState;
use crate::config::Config;
use crate::emit::file::{FileEmitter, JsonlFile};
use crate::ingest::admission::Admission;
use crate::meter::Meters;
use crate::model::Names;
use crate::state::{background_priority, spawn_stage, CommitRequest, DedupIndex, Generations, Shared};
use crate::store::checkpoint::Snapshot;
use crate::store::log::{IngestLog, LogBatch};
use crate::store::{RocksStore, INGEST_LOG_SOURCE};

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
    names
        .series
        .set_limits(config.max_series_per_tenant, config.max_series);
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
    let (log, replay) = IngestLog::open_with(
        &config.data_dir.join("ingest-log"),
        config.ingest_log_sync,
        config.ingest_log_segment_bytes,
        position,
        if config.salvage_ingest_log {
            crate::store::log::Recovery::Salvage
        } else {
            crate::store::log::Recovery::Strict
        },
    )?;
    lap(&mut timings.log_open);
    let plans = RwLock::new(Arc::new(config.plans.clone()));
    // Generations continue from the last committed one: queries compare them with the store's.
    let generation = store.checkpoint_generation(&store.snapshot())?;
    if config.auth.deprecated_otlp_keys {
        tracing::warn!("otlp.api_keys is deprecated: list the keys' SHA-256 in [[auth.keys]] instead");
    }
    let keys = crate::auth::KeyRing::new(config.auth.keys.clone());
    let shared = Arc::new(Shared {
        plans,
        keys,
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
        fatal: CancellationToken::new(),
        failure: Mutex::new(None),
        faults: Mutex::new(Default::default()),
        faulted: AtomicBool::new(false),
        engine_failed: AtomicBool::new(false),
        replays: Mutex::new(Default::default()),
        limits: crate::state::limits::Limits::new(),
    });
    shared.limits.set_plans(&shared.plans.read());
    if shared.config.cluster.is_some() {
        // Cluster mode: no partition's tenant is emitted here before the partition is assigned.
        shared.store.tenant_sources.set_owned(Some(Default::default()));
    }
    let writer = shared.engine.writer();
    let mut streams = crate::aggregate::streams::Streams::new(
        shared.store.stream_states()?,
        shared.config.dedup_horizon_secs,
    );
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
            // Nothing tracks a quota yet: each reads its total once replay is done.
            None,
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
    pub requests: std::sync::mpsc::Sender<CommitRequest>,
    pub commit_thread: std::thread::JoinHandle<()>,
    pub checkpoint_thread: std::thread::JoinHandle<()>,
}

impl Stages {
    /// For tests: the stages on the embedded config with everything under `dir`.
    #[cfg(test)]
    pub fn for_tests(dir: &std::path::Path, flush_interval_ms: u64) -> Stages {
        Stages::for_tests_with(dir, flush_interval_ms, |_| {})
    }

    /// `for_tests`, with `edit` applied to the config first.
    #[cfg(test)]
    pub fn for_tests_with(
        dir: &std::path::Path,
        flush_interval_ms: u64,
        edit: impl FnOnce(&mut Config),
    ) -> Stages {
        let env = [("TALLYD__STORAGE__DATA_DIR".to_string(), dir.display().to_string())]
            .into_iter()
            .collect();
        let mut config = crate::Config::load(crate::config::DEFAULT_CONFIG, &env).unwrap();
        config.emit_file_path = dir.join("usage.jsonl");
        config.dead_letter_path = dir.join("dead-letter.jsonl");
        config.flush_interval_ms = flush_interval_ms;
        edit(&mut config);
        Stages::start(config).unwrap()
    }

    /// Opens the store, recovers (replays the ingest log) and starts the threads (blocking).
    pub fn start(config: Config) -> anyhow::Result<Stages> {
        let (dead_letter_path, dead_letter_max) =
            (config.dead_letter_path.clone(), config.dead_letter_max_bytes);
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
        let dedup_thread = spawn_stage("tallyd-dedup", shared.clone(), move || {
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
        let checkpoint_thread = spawn_stage("tallyd-checkpoint", shared.clone(), move || {
            background_priority();
            checkpoint_stage.run()
        })?;
        let (request_tx, request_rx) = std::sync::mpsc::channel();
        let commit_stage = commit::CommitLoop {
            shared: shared.clone(),
            log,
            dead_letter: match dead_letter_max {
                Some(max) => JsonlFile::open_rotating(&dead_letter_path, max),
                None => JsonlFile::open(&dead_letter_path),
            }
            .with_context(|| format!("cannot open {}", dead_letter_path.display()))?,
            requests: request_rx,
            checkpoints: snapshot_tx.clone(),
            writer,
            streams,
        };
        let commit_thread = spawn_stage("tallyd-commit", shared.clone(), move || commit_stage.run())?;
        Ok(Stages {
            shared,
            checkpoints: snapshot_tx,
            requests: request_tx,
            commit_thread,
            checkpoint_thread,
        })
    }

    /// Closes the inputs and waits for the final checkpoint (blocking). False if a stage died.
    pub fn drain(self) -> bool {
        drop(self.requests);
        drop(self.checkpoints);
        let commit = self.commit_thread.join().is_ok();
        let checkpoint = self.checkpoint_thread.join().is_ok();
        commit && checkpoint && self.shared.failure.lock().is_none()
    }
}

/// Binds and starts the OTLP edges that are configured (in cluster mode they forward to the
/// ingest topic, `ingest::otlp::forward`).
async fn start_otlp(
    admission: &Admission,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Result<(), String>>>> {
    let config = &admission.shared.config;
    let mut servers = Vec::new();
    let ingest = crate::ingest::otlp::OtlpIngest {
        admission: admission.clone(),
    };
    let tls = match &config.otlp.tls {
        Some(tls) => {
            Some(crate::ingest::tls::TlsIdentity::load(tls, "otlp.tls").context("cannot read otlp.tls")?)
        }
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
        let (ingest, token, grpc_tls) = (ingest.clone(), shutdown.clone(), http_tls.clone());
        servers.push(tokio::spawn(async move {
            crate::ingest::otlp::grpc::serve(ingest, listener, token, grpc_tls)
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

    // A stage that dies stops the daemon (below, the exit is an error for its supervisor).
    {
        let (fatal, shutdown) = (shared.fatal.clone(), shutdown.clone());
        tokio::spawn(async move {
            fatal.cancelled().await;
            shutdown.cancel();
        });
    }
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
    if let Some(cluster) = &cluster {
        // Every (tenant, partition) pair a checkpoint or a restore learns is routed by.
        let weak = Arc::downgrade(cluster);
        shared
            .store
            .tenant_sources
            .set_split_check(Arc::new(move |tenant: &str| {
                weak.upgrade().is_some_and(|cluster| cluster.is_split(tenant))
            }));
        let cluster = cluster.clone();
        shared
            .store
            .tenant_sources
            .set_listener(Arc::new(move |tenant: &str, source: &str| {
                cluster.learned(tenant, source)
            }));
    }
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
    let admission = Admission::new(shared.clone(), requests, cluster.clone());
    let mut otlp_servers = start_otlp(&admission, &shutdown).await?;
    let signals = tokio::spawn(crate::emit::signals::run(shared.clone(), shutdown.clone()));
    crate::emit::signals::spawn_webhook(&shared).context("cannot start the threshold webhook")?;
    // Cluster mode: edges admit from the owners' published limit states.
    let signals_in = match (&cluster, &shared.config.kafka) {
        (Some(_), Some(kafka)) => Some({
            shared.limits.charge_rates_from_log();
            crate::cluster::limits::spawn(kafka, shared.clone(), shutdown.clone())
                .context("cannot follow the signal topic")?
        }),
        _ => None,
    };
    if let Some(addr) = shared.config.limits.grpc_addr {
        // Envoy RLS and tallyd.quota.v1 (the edge is `ingest::limits`).
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind limits.grpc_addr {addr}"))?;
        let tls = match &shared.config.limits.tls {
            Some(tls) => Some(
                crate::ingest::tls::TlsIdentity::load(tls, "limits.tls")
                    .context("cannot read limits.tls")?
                    .rustls_config()
                    .map_err(|error| anyhow::anyhow!(error))?,
            ),
            None => None,
        };
        let transport = if tls.is_some() { "tls" } else { "plain" };
        tracing::info!(addr = %listener.local_addr()?, transport, "limits grpc listening");
        let (admission, token) = (admission.clone(), shutdown.clone());
        otlp_servers.push(tokio::spawn(async move {
            crate::ingest::limits::serve(admission, listener, token, tls)
                .await
                .map_err(|error| error.to_string())
        }));
    }
    let app = crate::api::router(AppState::new(shared.clone(), cluster.clone()), admission);
    shared.ready.store(true, Ordering::Release);
    let serve_shutdown = shutdown.clone();
    let limits = shared.config.connections;
    let http_tls = match &shared.config.http_tls {
        Some(tls) => {
            let identity =
                crate::ingest::tls::TlsIdentity::load(tls, "server.tls").context("cannot read server.tls")?;
            let config = identity.rustls_config().map_err(|error| anyhow::anyhow!(error))?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        None => None,
    };
    let mut admin_server = None;
    if let Some(addr) = shared.config.admin_addr {
        let admin = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind admin_addr {addr}"))?;
        tracing::info!(addr = %admin.local_addr()?, "admin listening");
        let router = crate::api::admin_router(AppState::new(shared.clone(), cluster.clone()));
        let token = shutdown.clone();
        admin_server = Some(tokio::spawn(crate::ingest::listen::serve_http(
            admin, "admin", limits, router, None, None, token,
        )));
    }
    let transport = if http_tls.is_some() { "tls" } else { "plain" };
    tracing::info!(addr = %local, transport, "http listening");
    crate::ingest::listen::serve_http(listener, "http", limits, app, http_tls, None, serve_shutdown).await;
    // Whatever stopped the HTTP server stops the OTLP edges too; they hold commit senders, so
    // the commit stage drains only after they finished their in-flight requests.
    shutdown.cancel();
    if let Some(admin) = admin_server {
        let _ = admin.await;
    }
    for server in otlp_servers {
        if let Ok(Err(error)) = server.await {
            tracing::error!(%error, "otlp or limits server failed");
        }
    }
    let _ = signals.await;
    if let Some(reader) = signals_in {
        // It sees the token within one poll (200 ms).
        let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    }
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
    let drained = tokio::time::timeout(grace, drain).await;
    if let Some(failure) = shared.failure.lock().clone() {
        anyhow::bail!(
            "stage failed ({failure}); stopped so that a supervisor restarts tallyd: the ingest log \
             and the sources replay what was not checkpointed"
        );
    }
    match drained {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that panics (a broken invariant) does not leave a zombie: readiness drops, the
    /// failure is recorded for /healthz, and the fatal token stops the daemon.
    #[test]
    fn a_dying_stage_stops_the_daemon_instead_of_lingering() {
        let dir = tempfile::tempdir().unwrap();
        let stages = Stages::for_tests(dir.path(), 3_600_000);
        let shared = stages.shared.clone();
        shared.ready.store(true, Ordering::Release);
        let thread = spawn_stage("tallyd-test-stage", shared.clone(), || {
            panic!("invariant: broken on purpose");
        })
        .unwrap();
        assert!(thread.join().is_ok(), "the panic is caught");
        assert!(!shared.is_ready());
        assert!(shared.fatal.is_cancelled());
        assert_eq!(
            shared.failure.lock().as_deref(),
            Some("tallyd-test-stage: invariant: broken on purpose")
        );
        assert!(!stages.drain(), "a drain after a dead stage reports the failure");
    }
}

#[cfg(test)]
mod engine_failure_tests {
    use super::*;
    use crate::aggregate::{AggState, PreAggregated};
    use crate::model::SeriesKey;
    use crate::state::SnapshotCut;

    /// A take that cannot merge the writers' deltas has drained their positions with them: no
    /// later snapshot may be cut (a checkpoint would store a position past the lost usage), and
    /// the daemon stops so that a restart replays from the last checkpoint.
    #[test]
    fn a_failed_take_stops_every_later_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let stages = Stages::for_tests(dir.path(), 3_600_000);
        let shared = stages.shared.clone();
        let key = SeriesKey {
            meter: 0,
            tenant: 0,
            dims: 0,
            window_start: 60,
        };
        let half = AggState::Sum((i128::MAX / 2 + 1).into());
        for (writer, position) in [(shared.engine.writer(), 5), (shared.engine.writer(), 9)] {
            let mut batch = PreAggregated::default();
            batch.merge_state(key, &half).unwrap();
            writer
                .commit(&mut batch, &mut vec![], [("kafka/usage/0".to_string(), position)])
                .unwrap();
        }
        assert_eq!(shared.try_snapshot(&stages.checkpoints), SnapshotCut::Failed);
        assert!(shared.fatal.is_cancelled() && !shared.is_ready());
        // Later usage and positions are never checkpointed past the lost cut.
        let writer = shared.engine.writer();
        writer
            .commit(
                &mut PreAggregated::default(),
                &mut vec![],
                [("kafka/usage/0".to_string(), 12)],
            )
            .unwrap();
        assert_eq!(shared.try_snapshot(&stages.checkpoints), SnapshotCut::Failed);
        assert!(!shared.checkpoint_now(&stages.checkpoints, Duration::from_millis(200)));
        assert_eq!(shared.store.position("kafka/usage/0").unwrap(), None);
        assert!(!stages.drain());
    }
}
