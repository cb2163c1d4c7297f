//! The commit stage, one dedicated thread: group-commits ingest batches to the log, applies them
//! to the engine in log order, acknowledges them, and cuts checkpoint snapshots between groups.
//!
//! Each batch is applied together with the log position after its record (`Writer::commit`),
//! so a snapshot's `ingest-log` position is exactly the set of records whose deltas it holds;
//! that is what makes the checkpoint's position honest.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::streams::{CumulativePoint, StreamChanges, Streams};
use crate::aggregate::{MergeError, PreAggregated, Writer};
use crate::emit::file::JsonlFile;
use crate::state::{CommitError, CommitRequest, Shared, SnapshotCut};
use crate::store::checkpoint::Snapshot;
use crate::store::log::IngestLog;
use crate::store::INGEST_LOG_SOURCE;
use crate::telemetry;

/// Requests folded into one fsync at most.
const MAX_GROUP: usize = 512;
/// How often silent streams are looked for (`Streams::expire`).
const STREAM_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

pub struct CommitLoop {
    pub shared: Arc<Shared>,
    pub log: IngestLog,
    pub dead_letter: JsonlFile,
    pub requests: Receiver<CommitRequest>,
    pub checkpoints: SyncSender<Arc<Snapshot>>,
    /// This stage's share-nothing map in the engine.
    pub writer: Writer,
    /// Every cumulative stream's last point; only this thread (and recovery before it) moves them.
    pub streams: Streams,
}

/// Applies one logged record to the engine: its deltas, its dedup keys, the deltas its
/// cumulative points derive (moving their streams), and the log position after it. Commit and
/// replay both go through here, so replay derives the same deltas.
pub fn apply_logged(
    writer: &Writer,
    streams: &mut Streams,
    batch: &mut PreAggregated,
    dedup_keys: &mut Vec<u128>,
    cumulative: &[CumulativePoint],
    position: Option<(String, u64)>,
    limits: Option<(&crate::state::limits::Limits, &[crate::state::limits::Hold])>,
) -> Result<(), MergeError> {
    let mut changed = StreamChanges::default();
    streams.fold(cumulative, batch, &mut changed)?;
    // The deltas the quotas move by, before the writer takes the batch (cumulative points'
    // deltas included: they are in the batch now). The caller holds `Limits::applying`.
    if let Some((limits, holds)) = limits {
        // Without cumulative points every delta was decided, so the holds say it all.
        limits.lock().applied(batch, holds, cumulative.is_empty());
    }
    writer.commit_with_streams(batch, dedup_keys, &mut changed, position)
}

impl CommitLoop {
    pub fn run(mut self) {
        let interval = Duration::from_millis(self.shared.config.flush_interval_ms);
        let mut next_tick = Instant::now() + interval;
        let mut failed: Option<String> = None;
        let mut next_recovery = Instant::now();
        let mut next_stream_expiry = Instant::now();
        loop {
            if failed.is_some() && Instant::now() >= next_recovery {
                // A full disk or an I/O error is an ordinary event: once the log can be rolled
                // back to its last acknowledged record, ingest resumes by itself.
                match self.log.recover() {
                    Ok(()) => {
                        tracing::info!("ingest log writable again; accepting ingest");
                        self.shared.clear_fault("ingest-log");
                        failed = None;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "ingest log still not writable");
                        next_recovery = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let timeout = if failed.is_some() {
                timeout.min(Duration::from_millis(200))
            } else {
                timeout
            };
            match self.requests.recv_timeout(timeout) {
                Ok(first) => {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match self.requests.try_recv() {
                            Ok(request) => group.push(request),
                            Err(_) => break,
                        }
                    }
                    if let Some(reason) = &failed {
                        // Until the log is rolled back to its last acknowledged record: refuse.
                        for request in group {
                            self.shared.dedup.remove_all(&request.dedup_keys);
                            self.shared.limits.release(&request.holds);
                            let _ = request.reply.send(Err(CommitError::Storage(reason.clone())));
                        }
                    } else if let Err(reason) = self.commit_group(group) {
                        tracing::error!(%reason, "ingest log write failed; refusing ingest until it recovers");
                        self.shared.fault("ingest-log", reason.clone());
                        failed = Some(reason);
                        next_recovery = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                if self.shared.try_snapshot(&self.checkpoints) != SnapshotCut::Busy {
                    next_tick = Instant::now() + interval;
                } else {
                    // The previous checkpoint is still running: look again shortly.
                    next_tick = Instant::now() + Duration::from_millis(5);
                }
                let durable = self.shared.durable_log_seq.load(Ordering::Acquire);
                if let Err(error) = self.log.maintain(durable) {
                    tracing::warn!(%error, "ingest log maintenance failed");
                }
                if Instant::now() >= next_stream_expiry {
                    next_stream_expiry = Instant::now() + STREAM_EXPIRY_INTERVAL;
                    self.expire_streams();
                }
            }
        }
        // Input closed: every accepted batch is applied; hand over the final snapshot.
        if !self
            .shared
            .checkpoint_now(&self.checkpoints, Duration::from_secs(3600))
        {
            tracing::error!("final checkpoint not written; the sources replay on restart");
        }
        tracing::debug!("commit stage stopped");
    }

    /// Forgets streams silent for two horizons; the next checkpoint deletes their states. No
    /// count depends on it (`aggregate::streams`), so it needs no log record.
    fn expire_streams(&mut self) {
        let mut changed = StreamChanges::default();
        let now_secs = self.shared.store.expiry_clock().now_secs();
        let forgotten = self.streams.expire(now_secs, &mut changed);
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot silent cumulative streams");
            metrics::counter!(telemetry::STREAMS_FORGOTTEN).increment(forgotten as u64);
            if let Err(error) = self.writer.commit_with_streams(
                &mut PreAggregated::default(),
                &mut Vec::new(),
                &mut changed,
                [],
            ) {
                tracing::warn!(%error, "forgotten streams not recorded");
            }
        }
        metrics::gauge!(telemetry::STREAMS).set(self.streams.len() as f64);
    }

    fn commit_group(&mut self, group: Vec<CommitRequest>) -> Result<(), String> {
        let mut log_bytes = 0u64;
        let mut dead_letters: Vec<&[u8]> = Vec::new();
        let mut error = None;
        // Log position after each request's record (None: nothing logged for it).
        let mut positions: Vec<Option<u64>> = Vec::with_capacity(group.len());
        for request in &group {
            if request.payload.is_empty() {
                positions.push(None);
            } else {
                match self.log.append(&request.payload) {
                    Ok(seq) => positions.push(Some(seq + 1)),
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
                log_bytes += request.payload.len() as u64;
            }
            dead_letters.extend(request.dead_letters.iter().map(Vec::as_slice));
        }
        if error.is_none() {
            if let Err(e) = self.log.commit() {
                error = Some(e.to_string());
            }
        }
        if error.is_none() && !dead_letters.is_empty() {
            if let Err(e) = self.dead_letter.append_durably(dead_letters) {
                error = Some(format!(
                    "dead letter file {}: {e}",
                    self.dead_letter.path().display()
                ));
            }
        }
        if let Some(reason) = error {
            for request in group {
                self.shared.dedup.remove_all(&request.dedup_keys);
                self.shared.limits.release(&request.holds);
                let _ = request.reply.send(Err(CommitError::Storage(reason.clone())));
            }
            return Err(reason);
        }
        metrics::counter!(telemetry::INGEST_LOG_BYTES).increment(log_bytes);
        metrics::histogram!(telemetry::INGEST_COMMIT_GROUP).record(group.len() as f64);
        let limited = self.shared.limits.is_active();
        for (mut request, position) in group.into_iter().zip(positions) {
            let position = position.map(|next| (INGEST_LOG_SOURCE.to_string(), next));
            // With limits, the quotas' `used` moves with the engine: no period's total is
            // read while this batch is between the two.
            let applying = limited.then(|| self.shared.limits.applying());
            let applied = apply_logged(
                &self.writer,
                &mut self.streams,
                &mut request.batch,
                &mut request.dedup_keys,
                &request.cumulative,
                position,
                limited.then_some((&self.shared.limits, request.holds.quotas.as_slice())),
            );
            drop(applying);
            if let Err(error) = applied {
                self.shared.limits.release(&request.holds);
                // A broken invariant (no sum overflows within the quantity range): the request
                // is not acknowledged, no later checkpoint passes it, and the daemon stops so
                // that a restart replays the log.
                self.shared
                    .engine_failed(&format!("cannot apply a logged batch: {error}"));
                let _ = request
                    .reply
                    .send(Err(CommitError::Storage(format!("not applied: {error}"))));
                continue;
            }
            let _ = request.reply.send(Ok(()));
        }
        Ok(())
    }
}
