//! The checkpoint stage, one dedicated thread: writes each snapshot in one WriteBatch, then
//! releases what that batch made durable (ingest-log segments), wakes the dedup stage when
//! enough dedup keys are staged (`pipeline::dedup`), and delivers the window and rated records
//! it queued to the file emitter (the other emitters follow the outbox on their own threads).
//!
//! A failed checkpoint is retried with the same snapshot until it succeeds; meanwhile the commit
//! stage keeps accumulating (no new snapshot is cut while one is in flight), so nothing is lost.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;
use crate::emit::file::FileEmitter;
use crate::model::now_ms;
use crate::store::checkpoint::Snapshot;
use crate::store::{StoreError, INGEST_LOG_SOURCE};
use crate::telemetry;

pub struct CheckpointLoop {
    pub shared: Arc<Shared>,
    pub snapshots: Receiver<Arc<Snapshot>>,
    pub usage_file: FileEmitter,
    /// Tells the dedup stage that staged keys are due; dropped at the stop, which makes it
    /// ingest what is left after the final checkpoint.
    pub dedup_wake: Option<SyncSender<()>>,
    /// Joined at the stop: the store must not close under its ingestion.
    pub dedup_thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckpointLoop {
    pub fn run(mut self) {
        while let Ok(snapshot) = self.snapshots.recv() {
            let mut backoff = Duration::from_millis(100);
            let mut failed = false;
            loop {
                match self.checkpoint(&snapshot) {
                    Ok(()) => {
                        if failed {
                            self.shared.clear_fault("checkpoint");
                        }
                        break;
                    }
                    Err(error) => {
                        // Ingest goes on into the log (durable) until the unflushed-series cap
                        // pushes back; readiness says so, to move traffic to a healthy replica.
                        failed = true;
                        self.shared.fault("checkpoint", error.to_string());
                        metrics::counter!(telemetry::CHECKPOINT_FAILURES).increment(1);
                        tracing::error!(%error, retry_in_ms = backoff.as_millis() as u64, "checkpoint failed");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            self.shared.checkpoint_busy.store(false, Ordering::Release);
            let mut generations = self.shared.generations.lock();
            generations.durable = generations.durable.max(snapshot.generation);
            self.shared.generation_durable.notify_all();
        }
        drop(self.dedup_wake.take());
        if let Some(thread) = self.dedup_thread.take() {
            if thread.join().is_err() {
                tracing::error!("dedup stage panicked; the next start ingests its keys");
            }
        }
        tracing::debug!("checkpoint stage stopped");
    }

    fn checkpoint(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), StoreError> {
        let started = Instant::now();
        let shared = &self.shared;
        let now_secs = now_ms().div_euclid(1000);
        let prepared = loop {
            let mut prepared = shared.store.prepare_checkpoint(
                snapshot,
                &shared.names,
                &shared.catalog,
                now_secs,
                shared.config.allowed_lateness_secs,
                &shared.plans.read().clone(),
            )?;
            if prepared.changelog.is_empty() {
                break prepared;
            }
            // The changelog must never be behind a store: publish first, commit after.
            let Some(sink) = shared.changelog.get() else {
                return Err(StoreError::Corrupt {
                    what: "changelog",
                    detail: "replicated sources but no changelog sink".into(),
                });
            };
            let deposed = sink
                .publish(&mut prepared.changelog)
                .map_err(|error| StoreError::Unavailable {
                    what: "changelog",
                    detail: error.to_string(),
                })?;
            metrics::counter!(telemetry::CHANGELOG_CHUNKS).increment(prepared.changelog.len() as u64);
            crate::state::crash_point::pass(crate::state::crash_point::AFTER_CHANGELOG_PUBLISH);
            tracing::debug!(
                flushes = %prepared
                    .changelog
                    .iter()
                    .filter(|chunk| chunk.is_last())
                    .map(|chunk| format!("{}@{}", chunk.source, chunk.position))
                    .collect::<Vec<_>>()
                    .join(","),
                chunks = prepared.changelog.len(),
                "changelog published"
            );
            if deposed.is_empty() {
                break prepared;
            }
            // Prepared while this replica still emitted for those partitions' tenants: prepare
            // again without them (each round deposes at least one source, so this ends).
            for source in &deposed {
                shared.store.tenant_sources.depose(source);
            }
        };
        // Written without holding `flushing`: a query that sees this batch in its store snapshot
        // also sees its generation there and skips the snapshot while it is still listed, so it
        // never counts it twice nor misses it, and queries do not stall behind the fsync.
        let stats = shared.store.commit_checkpoint(prepared)?;
        shared
            .flushing
            .write()
            .retain(|pending| !Arc::ptr_eq(pending, snapshot));
        // Committed dedup keys stay reserved in memory until the dedup stage moved them.
        if shared.store.dedup_ingest_due() {
            if let Some(Err(TrySendError::Disconnected(()))) =
                self.dedup_wake.as_ref().map(|wake| wake.try_send(()))
            {
                tracing::error!("dedup stage gone; staged keys wait for the next start");
            }
        }
        if let Some(next) = snapshot.position(INGEST_LOG_SOURCE) {
            shared.durable_log_seq.store(next, Ordering::Release);
        }
        let committed_ms = now_ms();
        // A deposed source's offsets are the new owner's to commit.
        let acknowledge: Vec<_> = snapshot
            .positions
            .iter()
            .filter(|(source, _)| {
                source.starts_with(crate::kafka::POSITION_PREFIX)
                    && !shared.store.tenant_sources.is_deposed(source)
            })
            .map(|(source, next)| (source.clone(), *next, committed_ms))
            .collect();
        if !acknowledge.is_empty() {
            shared.durable_positions.lock().extend(acknowledge);
        }

        metrics::histogram!(telemetry::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(telemetry::CHECKPOINT_BYTES).increment(stats.bytes as u64);
        metrics::counter!(telemetry::CHECKPOINT_SERIES).increment(stats.series as u64);
        metrics::counter!(telemetry::RATED_RECORDS).increment(stats.rated as u64);
        metrics::counter!(telemetry::CHANGELOG_REEMITTED).increment(stats.reemitted as u64);
        if stats.held > 0 {
            metrics::counter!(telemetry::CLUSTER_SPLIT_WINDOWS_HELD).increment(stats.held as u64);
            tracing::warn!(
                windows = stats.held,
                "windows of tenants split over partitions closed without records (fix their producers' keys)"
            );
        }
        metrics::gauge!(telemetry::CHECKPOINT_LAST_SUCCESS).set(now_secs as f64);
        // Right after a commit: the engine's last cut no longer holds any id.
        if let Some((tenants, dims)) = shared.names.rotate_if_due(now_ms()) {
            metrics::counter!(telemetry::INTERNED_DROPPED, "table" => "tenants").increment(tenants as u64);
            metrics::counter!(telemetry::INTERNED_DROPPED, "table" => "dims").increment(dims as u64);
            tracing::info!(tenants, dims, "dropped id-table values unused for two days");
        }
        shared.last_checkpoint_ms.store(now_ms(), Ordering::Release);
        metrics::gauge!(telemetry::DEDUP_PENDING).set(shared.dedup.len() as f64);
        if stats.series > 0 || stats.records > 0 || stats.reemitted > 0 {
            tracing::debug!(
                series = stats.series,
                dedup_keys = stats.dedup_keys,
                records = stats.records,
                rated = stats.rated,
                amended = stats.amended,
                reemitted = stats.reemitted,
                bytes = stats.bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "checkpoint written"
            );
        }
        // Delivery failures are retried on the next checkpoint: the outbox keeps the lines.
        if let Err(error) = self.usage_file.deliver(&shared.store) {
            metrics::counter!(telemetry::EMIT_FAILURES, "output" => "file").increment(1);
            tracing::warn!(%error, "window records not yet delivered to the usage file");
        }
        Ok(())
    }
}
