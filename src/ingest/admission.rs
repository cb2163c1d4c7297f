//! The one admission-and-commit path every ingest edge calls; each edge keeps only its protocol
//! (reading bodies, decoding, mapping, rendering answers).
//!
//! ```text
//! edge: read body ─► Admission::commit(source, bytes, prepare)
//!                      admit: byte budget (503 when spent), readiness, checkpoint backpressure
//!                      spawned task (finishes whatever the client does):
//!                        blocking pool: prepare (edge: decode + map → units, refusals)
//!                                       claim_and_fold (dedup claim, pre-aggregate)
//!                                       log record
//!                        commit stage: log append + fsync, dead letters, apply ─► ack
//!                      Tally::record (the metrics, by source)
//! ```
//! In cluster mode `Admission::forward` replaces the local commit: the edge's messages go to the
//! ingest topic and the partition owner counts them (on a spawned task too: the dead letters of
//! what the edge refused itself are written whatever the client does). The Kafka source folds its batches with the
//! same `claim_and_fold` and `Tally` (its log is Kafka, its commit the partition writer).
//!
//! Why the task is spawned: an edge's dedup keys are claimed before the request is durable. If
//! the handler were dropped in between (a client timeout, a closed connection), the claims
//! would stay while nothing was counted, and the retry would be told "duplicate". Once a
//! request has passed admission, it is committed (or its claims released) to the end.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::error::IngestError;
pub use super::error::RefusalReason;
use crate::aggregate::streams::CumulativePoint;
use crate::aggregate::{MergeError, PreAggregated};
use crate::cluster::forward::ForwardedUnit;
use crate::cluster::Cluster;
use crate::model::SeriesKey;
use crate::model::{now_ms, rfc3339_ms};
use crate::state::dedup::{ClaimError, Ticket};
use crate::state::limits::{state_contributions, Contributes, Holds, LimitError, RateExplained, Rates};
use crate::state::{CommitRequest, Shared};
use crate::store::log::LogBatch;
use crate::telemetry;

/// Where usage comes from: the `source` label of the ingest metrics and dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Http,
    Otlp,
    Kafka,
    /// Hits of `source = "envoy"` meters, recorded by the limits listener.
    Envoy,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Otlp => "otlp",
            Source::Kafka => "kafka",
            Source::Envoy => "envoy",
        }
    }
}

/// A unit of usage after decoding: counted once by its dedup key (when it has one), decided
/// against the tenant's limits (its additive contributions), then folded.
pub trait Countable: Contributes {
    /// None: its updates are idempotent (MAX, MIN, LATEST) and need no claim.
    fn dedup_key(&self) -> Option<u128>;
    /// It amends a window that had already closed.
    fn is_late(&self) -> bool;
    fn fold_into(&self, batch: &mut PreAggregated) -> Result<(), MergeError>;
}

impl Contributes for ForwardedUnit {
    fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128)) {
        state_contributions(&self.updates, each);
    }
}

impl Countable for ForwardedUnit {
    fn dedup_key(&self) -> Option<u128> {
        self.dedup_key
    }

    fn is_late(&self) -> bool {
        false
    }

    fn fold_into(&self, batch: &mut PreAggregated) -> Result<(), MergeError> {
        self.updates
            .iter()
            .try_for_each(|(key, state)| batch.merge_state(*key, state))
    }
}

/// What one request (or Kafka batch) adds to the ingest metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Units counted now (the edge sets the candidates; duplicates are taken off).
    pub accepted: usize,
    /// Units already counted earlier (same dedup key within the horizon).
    pub duplicates: usize,
    /// Valid units no meter reads (accepted, counted in a metric only).
    pub unmetered: usize,
    /// Accepted units that amended a closed window.
    pub late: usize,
    /// Invalid units (a whole CloudEvents request, or dead-lettered Kafka messages).
    pub invalid: usize,
    /// Refused units by reason (dead-lettered).
    pub refused: Vec<(RefusalReason, usize)>,
}

impl Tally {
    pub fn refuse(&mut self, reason: RefusalReason) {
        self.refuse_many(reason, 1);
    }

    pub fn refuse_many(&mut self, reason: RefusalReason, n: usize) {
        if n == 0 {
            return;
        }
        match self.refused.iter_mut().find(|(known, _)| *known == reason) {
            Some((_, count)) => *count += n,
            None => self.refused.push((reason, n)),
        }
    }

    pub fn refused_total(&self) -> usize {
        self.refused.iter().map(|(_, n)| n).sum()
    }

    /// Adds another share of the same batch.
    pub fn absorb(&mut self, other: Tally) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.unmetered += other.unmetered;
        self.late += other.late;
        self.invalid += other.invalid;
        for (reason, n) in other.refused {
            self.refuse_many(reason, n);
        }
    }

    /// The metrics of `tallyd_ingest_*` for this tally. Invalid units a source dead-letters
    /// (Kafka cannot answer 400 to a message) are also refusals with reason `invalid`.
    pub fn record(&self, source: Source) {
        let label = source.as_str();
        let count = |outcome: &'static str, n: usize| {
            if n > 0 {
                metrics::counter!(telemetry::INGEST_EVENTS, "source" => label, "outcome" => outcome)
                    .increment(n as u64);
            }
        };
        count("accepted", self.accepted + self.unmetered);
        count("duplicate", self.duplicates);
        count("invalid", self.invalid);
        count("refused", self.refused_total());
        for &(reason, n) in &self.refused {
            metrics::counter!(telemetry::INGEST_REFUSED, "source" => label, "reason" => reason.as_str())
                .increment(n as u64);
        }
        if source == Source::Kafka && self.invalid > 0 {
            metrics::counter!(telemetry::INGEST_REFUSED, "source" => label, "reason" => "invalid")
                .increment(self.invalid as u64);
        }
        if self.unmetered > 0 {
            metrics::counter!(telemetry::INGEST_UNMETERED, "source" => label)
                .increment(self.unmetered as u64);
        }
        if self.late > 0 {
            metrics::counter!(telemetry::INGEST_LATE, "source" => label).increment(self.late as u64);
        }
    }
}

/// One dead-letter line (JSONL): when, from where, why, then the edge's own fields.
pub fn dead_letter_line(
    received_at: &str,
    source: Source,
    reason: RefusalReason,
    message: &str,
    fields: serde_json::Value,
) -> Vec<u8> {
    let mut line = serde_json::json!({
        "received_at": received_at,
        "source": source.as_str(),
        "reason": reason.as_str(),
        "message": message,
    });
    if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
        line.extend(fields);
    }
    let mut bytes = serde_json::to_vec(&line).expect("invariant: dead letters serialize");
    bytes.push(b'\n');
    bytes
}

/// `received_at` of a dead letter written at `now_ms`.
pub fn received_at(now_ms: i64) -> String {
    rfc3339_ms(now_ms)
}

/// What an edge's `prepare` hands to the commit path.
pub struct Prepared<U, T> {
    /// Units that count unless they are duplicates.
    pub units: Vec<U>,
    /// Cumulative points (OTLP): the commit stage turns them into deltas in log order.
    pub cumulative: Vec<CumulativePoint>,
    /// One line per refused unit, durable before the answer.
    pub dead_letters: Vec<Vec<u8>>,
    /// `accepted` = units (and cumulative points) that count unless duplicates; the rest as
    /// the edge decoded it.
    pub tally: Tally,
    /// What the edge needs to answer besides the tally (its refusal list, a partial success).
    pub answer: T,
    /// Records a unit refused after the claim (over a hard quota) in the answer and returns
    /// its dead-letter line. None: the edge's units feed no quota (nothing is refused then).
    pub refuse: Option<LateRefusal<U, T>>,
    /// The limits its units are decided against.
    pub limited: Limited,
}

/// An edge's way to refuse one of its units after `prepare` (`Prepared::refuse`).
pub type LateRefusal<U, T> = Box<dyn FnMut(&U, &mut T, RefusalReason, &str) -> Vec<u8> + Send>;

/// What an edge's `prepare` hands to the forwarding path (cluster mode).
pub struct Forward<T> {
    /// `(tenant, payload)`: produced keyed by tenant, so the tenant's owner counts it.
    pub messages: Vec<(String, Vec<u8>)>,
    /// `content-type` header of every message (None: CloudEvents JSON).
    pub content_type: Option<&'static str>,
    /// Refusals made at the edge, written to this replica's dead-letter file.
    pub dead_letters: Vec<Vec<u8>>,
    pub tally: Tally,
    pub answer: T,
}

/// A request's accepted outcome.
#[derive(Debug)]
pub struct Admitted<T> {
    pub tally: Tally,
    pub answer: T,
}

/// A batch of units, claimed and pre-aggregated per group (one group for a request; one per
/// partition for a Kafka batch).
pub struct Claimed {
    /// Per group: its pre-aggregated usage and the dedup keys it now owns.
    pub groups: Vec<(PreAggregated, Vec<u128>)>,
    pub accepted: usize,
    pub duplicates: usize,
    pub late: usize,
    /// Units whose updates overflow what a series can hold (their keys are released).
    pub overflowed: Vec<usize>,
    /// Units over a hard quota, with the reason (their keys are released).
    pub over_quota: Vec<(usize, String)>,
    /// What the admitted units hold of quotas until the batch is applied.
    pub holds: Holds,
}

impl Claimed {
    /// Every dedup key the batch owns.
    pub fn keys(&self) -> impl Iterator<Item = &u128> {
        self.groups.iter().flat_map(|(_, keys)| keys)
    }
}

/// Why a batch was not claimed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// A rate limit refuses the request as a whole (push edges only).
    #[error("over the rate limit of `{}` for tenant `{}`", .0.limit.meter, .0.tenant)]
    Rate(Box<RateExplained>),
    /// A quota's period total could not be read from the store.
    #[error("quota usage unreadable: {0}")]
    Load(String),
}

/// Which limits a source's batches are decided against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// Rate limits and quotas (push edges: a refusal reaches the producer at once).
    All,
    /// Quotas; rate limits charged and signalled, never refusing: a log (Kafka) cannot refuse
    /// what it already holds for being too fast.
    Log,
    /// Quotas only (Envoy's hits: their rate was decided when they were asked for).
    Quotas,
}

/// The dedup claim, the limits and the pre-aggregation of a batch: reserve each unit's key, look
/// the reserved ones up in the store (`DedupIndex::claim`: reserve first, then the store,
/// race-free), decide the fresh units against the tenants' limits (`state::limits`; a unit
/// over a hard quota is refused, its key released), fold the admitted ones into their group's
/// batch, under `ticket` (whoever holds the keys keeps it open until they are durable or
/// released). On an error nothing stays reserved or held.
pub fn claim_and_fold<U: Countable>(
    shared: &Shared,
    ticket: &Ticket,
    now_ms: i64,
    units: &[U],
    groups: usize,
    group_of: impl Fn(usize) -> usize,
    limited: Limited,
) -> Result<Claimed, FoldError> {
    let keys: Vec<u128> = units.iter().filter_map(Countable::dedup_key).collect();
    let claimed_keys = shared.dedup.claim(
        &shared.store,
        &keys,
        now_ms.div_euclid(1000),
        shared.config.dedup_horizon_secs,
        ticket,
    )?;
    let mut claimed_keys = claimed_keys.into_iter();
    let fresh: Vec<bool> = units
        .iter()
        .map(|unit| unit.dedup_key().is_none() || claimed_keys.next() == Some(true))
        .collect();
    let verdict = if shared.limits.is_active() {
        let decided = shared.limits.decide(
            &shared.names,
            &shared.meters,
            units,
            &fresh,
            match limited {
                Limited::All => Rates::Enforce,
                Limited::Log => Rates::Charge,
                Limited::Quotas => Rates::Skip,
            },
            &crate::query::quota_loader(shared),
        );
        match decided {
            Ok(verdict) => Some(verdict),
            Err(error) => {
                for (unit, _) in units.iter().zip(&fresh).filter(|(_, fresh)| **fresh) {
                    if let Some(key) = unit.dedup_key() {
                        shared.dedup.release(key);
                    }
                }
                return Err(match error {
                    LimitError::Rate(refusal) => FoldError::Rate(Box::new(refusal.explain(
                        &shared.limits,
                        &shared.names,
                        &shared.meters,
                    ))),
                    LimitError::Load(message) => FoldError::Load(message),
                });
            }
        }
    } else {
        None
    };
    let mut claimed = Claimed {
        groups: (0..groups)
            .map(|_| {
                (
                    PreAggregated::with_capacity(units.len() / groups.max(1)),
                    Vec::new(),
                )
            })
            .collect(),
        accepted: 0,
        duplicates: 0,
        late: 0,
        overflowed: Vec::new(),
        over_quota: Vec::new(),
        holds: Holds::default(),
    };
    let mut refused = verdict.as_ref().map(|verdict| verdict.refused.iter().peekable());
    for (index, unit) in units.iter().enumerate() {
        let key = unit.dedup_key();
        let over = refused
            .as_mut()
            .and_then(|refused| refused.next_if(|(at, _)| *at == index))
            .map(|(_, message)| message.clone());
        if !fresh[index] {
            claimed.duplicates += 1;
            continue;
        }
        if let Some(message) = over {
            if let Some(key) = key {
                shared.dedup.release(key);
            }
            claimed.over_quota.push((index, message));
            continue;
        }
        let (batch, group_keys) = &mut claimed.groups[group_of(index)];
        if let Err(error) = unit.fold_into(batch) {
            // Totals beyond 10^38 units: unreachable with real usage, refused all the same.
            tracing::error!(%error, index, "usage overflows a series");
            if let Some(key) = key {
                shared.dedup.release(key);
            }
            claimed.overflowed.push(index);
            continue;
        }
        group_keys.extend(key);
        claimed.accepted += 1;
        claimed.late += usize::from(unit.is_late());
    }
    if let Some(verdict) = verdict {
        claimed.holds = verdict.holds;
    }
    Ok(claimed)
}

/// The push edges' handle on the pipeline: the shared state, the commit stage's input, the
/// byte budget and, in cluster mode, the ingest topic.
#[derive(Clone)]
pub struct Admission {
    pub shared: Arc<Shared>,
    commits: std::sync::mpsc::Sender<CommitRequest>,
    /// Request bytes in flight; exhausted → 503 / UNAVAILABLE (the push-source backpressure).
    budget: Arc<Semaphore>,
    /// Cluster mode: edges forward to the ingest topic.
    pub cluster: Option<Arc<Cluster>>,
}

/// Why a request body was not read (`Admission::read_body`); each edge words it for its protocol.
#[derive(Debug)]
pub enum BodyError {
    /// Overloaded or not ready: refused before reading.
    Refused(IngestError),
    /// Declared or found larger than `max_body_bytes` (the limit).
    TooLarge(usize),
    /// Not received in full within `body_timeout_secs`.
    TimedOut(std::time::Duration),
    /// The connection failed or the body could not be inflated.
    Unreadable(String),
}

impl Admission {
    pub fn new(
        shared: Arc<Shared>,
        commits: std::sync::mpsc::Sender<CommitRequest>,
        cluster: Option<Arc<Cluster>>,
    ) -> Admission {
        let permits = shared.config.ingest_budget_bytes.min(Semaphore::MAX_PERMITS);
        Admission {
            shared,
            commits,
            budget: Arc::new(Semaphore::new(permits)),
            cluster,
        }
    }

    /// Takes the request's share of the byte budget, then reads its body (inflated by the
    /// decompression layer, if any) within `max_body_bytes` and `body_timeout`. The share is
    /// taken before the body is read: a slow or large upload holds it meanwhile, so memory in
    /// flight stays under `ingest_budget_bytes`. It is the declared `content-length` (more than
    /// the limit is refused unread) or, for a chunked or inflated body, the whole limit.
    pub async fn read_body(
        &self,
        headers: &axum::http::HeaderMap,
        body: axum::body::Body,
    ) -> Result<(OwnedSemaphorePermit, bytes::Bytes), BodyError> {
        let limit = self.shared.config.max_body_bytes;
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        let share = match declared {
            Some(bytes) if bytes > limit as u64 => return Err(BodyError::TooLarge(limit)),
            Some(bytes) => bytes as usize,
            None => limit,
        };
        let permit = self.admit(share).map_err(BodyError::Refused)?;
        let timeout = self.shared.config.body_timeout;
        match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(bytes)) => Ok((permit, bytes)),
            Ok(Err(error)) => {
                let too_large = std::error::Error::source(&error)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                    || error.to_string().contains("length limit");
                Err(if too_large {
                    BodyError::TooLarge(limit)
                } else {
                    BodyError::Unreadable(error.to_string())
                })
            }
            Err(_) => Err(BodyError::TimedOut(timeout)),
        }
    }

    /// The first checks, before any work on a request of `bytes`: a share of the byte budget
    /// (held until the answer) and readiness. Push sources fail fast when the pipeline is full:
    /// the client retries, nothing is lost.
    pub fn admit(&self, bytes: usize) -> Result<OwnedSemaphorePermit, IngestError> {
        let permits = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().try_acquire_many_owned(permits) else {
            return Err(IngestError::Unavailable(
                "ingest is overloaded; retry after the delay".into(),
            ));
        };
        if !self.shared.is_ready() {
            return Err(IngestError::Unavailable(
                "not ready (starting, shutting down or storage failure)".into(),
            ));
        }
        Ok(permit)
    }

    /// Counts a request locally: `prepare` decodes and maps it on the blocking pool (given the
    /// shared state and the arrival time); then the claim, the ingest log and the commit stage.
    /// Answers once the accepted units and the dead letters are durable.
    pub async fn commit<U, T, P>(
        &self,
        source: Source,
        permit: OwnedSemaphorePermit,
        prepare: P,
    ) -> Result<Admitted<T>, IngestError>
    where
        U: Countable + Send + 'static,
        T: Send + 'static,
        P: FnOnce(&Shared, i64) -> Result<Prepared<U, T>, IngestError> + Send + 'static,
    {
        if self.shared.checkpoints_behind() {
            metrics::counter!(telemetry::INGEST_BACKPRESSURE, "source" => source.as_str()).increment(1);
            return Err(IngestError::Unavailable(
                "checkpoints are behind (aggregate.max_pending_series); retry after the delay".into(),
            ));
        }
        let this = self.clone();
        to_the_end(source, permit, async move {
            this.commit_to_the_end(source, prepare).await
        })
        .await
    }

    async fn commit_to_the_end<U, T, P>(&self, source: Source, prepare: P) -> Result<Admitted<T>, IngestError>
    where
        U: Countable + Send + 'static,
        T: Send + 'static,
        P: FnOnce(&Shared, i64) -> Result<Prepared<U, T>, IngestError> + Send + 'static,
    {
        let started = Instant::now();
        let shared = self.shared.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let prepared = prepare(&shared, now)?;
            claim_for_commit(&shared, now, prepared)
        })
        .await
        .unwrap_or_else(|error| {
            tracing::error!(%error, source = source.as_str(), "ingest preparation panicked");
            Err(IngestError::Unavailable("internal error".into()))
        })?;
        let label = source.as_str();
        metrics::histogram!(telemetry::INGEST_STAGE_SECONDS, "source" => label, "stage" => "prepare")
            .record(started.elapsed().as_secs_f64());
        let (request, tally, answer) = prepared;
        if let Some(request) = request {
            let started = Instant::now();
            self.send_commit(request).await?;
            metrics::histogram!(telemetry::INGEST_STAGE_SECONDS, "source" => label, "stage" => "commit")
                .record(started.elapsed().as_secs_f64());
        }
        tally.record(source);
        Ok(Admitted { tally, answer })
    }

    /// Hands a request to the commit stage and waits for its acknowledgement.
    async fn send_commit(&self, (request, reply): (CommitRequest, ReplyReceiver)) -> Result<(), IngestError> {
        // A refused send hands the request back: its keys are released, not copied beforehand.
        if let Err(std::sync::mpsc::SendError(request)) = self.commits.send(request) {
            self.shared.dedup.remove_all(&request.dedup_keys);
            self.shared.limits.release(&request.holds);
            return Err(IngestError::Unavailable("shutting down".into()));
        }
        match reply.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::error!(%error, "ingest batch not committed");
                Err(IngestError::Unavailable(
                    "storage unavailable; nothing from this request was counted".into(),
                ))
            }
            Err(_) => Err(IngestError::Unavailable(
                "shutting down; nothing from this request was counted".into(),
            )),
        }
    }

    /// Cluster mode: `prepare` validates and maps the request exactly as a single replica would
    /// (off the executor), then its messages go to the ingest topic keyed by tenant; answers
    /// once Kafka acknowledged them all and the edge's dead letters are durable. On its own
    /// task, like `commit`: a client hanging up while its messages are being produced cannot
    /// leave the events the edge refused itself (a published quota) without their dead letters.
    pub async fn forward<T, P>(
        &self,
        source: Source,
        cluster: Arc<Cluster>,
        permit: OwnedSemaphorePermit,
        prepare: P,
    ) -> Result<Admitted<T>, IngestError>
    where
        T: Send + 'static,
        P: FnOnce(&Shared, i64) -> Result<Forward<T>, IngestError> + Send + 'static,
    {
        let this = self.clone();
        to_the_end(source, permit, async move {
            this.forward_to_the_end(source, &cluster, prepare).await
        })
        .await
    }

    async fn forward_to_the_end<T, P>(
        &self,
        source: Source,
        cluster: &Cluster,
        prepare: P,
    ) -> Result<Admitted<T>, IngestError>
    where
        T: Send + 'static,
        P: FnOnce(&Shared, i64) -> Result<Forward<T>, IngestError> + Send + 'static,
    {
        let shared = self.shared.clone();
        let forward = tokio::task::spawn_blocking(move || prepare(&shared, now_ms()))
            .await
            .unwrap_or_else(|error| {
                tracing::error!(%error, source = source.as_str(), "ingest validation panicked");
                Err(IngestError::Unavailable("internal error".into()))
            })?;
        let Forward {
            messages,
            content_type,
            dead_letters,
            tally,
            answer,
        } = forward;
        let messages = messages
            .iter()
            .map(|(tenant, payload)| (tenant.as_str(), payload.as_slice()));
        if let Err(error) = cluster.forward_as(messages, content_type).await {
            tracing::warn!(%error, "forwarding to the ingest topic failed");
            return Err(IngestError::Unavailable(format!(
                "the ingest topic did not acknowledge every event ({error}); retry (duplicates are dropped)"
            )));
        }
        if !dead_letters.is_empty() {
            // Refusals made here go to this replica's dead-letter file, as for a local request.
            let (reply_tx, reply_rx) = oneshot::channel();
            let request = CommitRequest {
                payload: Vec::new(),
                batch: PreAggregated::with_capacity(0),
                dedup_keys: Vec::new(),
                cumulative: Vec::new(),
                dead_letters,
                reply: reply_tx,
                ticket: self.shared.dedup.ticket(),
                holds: Holds::default(),
            };
            self.send_commit((request, reply_rx)).await?;
        }
        tally.record(source);
        Ok(Admitted { tally, answer })
    }
}

/// Runs an admitted request's `work` on its own task, holding `permit` until it ends: a client
/// that hangs up cannot cut it short (see the module's "Why the task is spawned").
async fn to_the_end<T: Send + 'static>(
    source: Source,
    permit: OwnedSemaphorePermit,
    work: impl std::future::Future<Output = Result<Admitted<T>, IngestError>> + Send + 'static,
) -> Result<Admitted<T>, IngestError> {
    tokio::spawn(async move {
        let result = work.await;
        drop(permit);
        result
    })
    .await
    .unwrap_or_else(|error| {
        tracing::error!(%error, source = source.as_str(), "ingest task panicked");
        Err(IngestError::Unavailable("internal error".into()))
    })
}

type ReplyReceiver = oneshot::Receiver<Result<(), crate::state::CommitError>>;

/// A prepared request, claimed: the commit request (None when nothing is to be logged or
/// dead-lettered), the tally and the edge's answer.
type ClaimedRequest<T> = (Option<(CommitRequest, ReplyReceiver)>, Tally, T);

/// Claim, limits, fold, log record (blocking: the claim reads the store).
fn claim_for_commit<U: Countable, T>(
    shared: &Shared,
    now: i64,
    prepared: Prepared<U, T>,
) -> Result<ClaimedRequest<T>, IngestError> {
    let Prepared {
        units,
        cumulative,
        mut dead_letters,
        mut tally,
        mut answer,
        refuse,
        limited,
    } = prepared;
    let ticket = shared.dedup.ticket();
    let claimed =
        claim_and_fold(shared, &ticket, now, &units, 1, |_| 0, limited).map_err(|error| match error {
            FoldError::Claim(ClaimError::Store(error)) => {
                tracing::error!(%error, "dedup lookup failed");
                IngestError::Unavailable("storage unavailable".into())
            }
            FoldError::Claim(ClaimError::InFlight) => IngestError::Unavailable(
                "another request with some of these events is still committing; retry after the delay".into(),
            ),
            FoldError::Load(message) => {
                tracing::error!(%message, "quota usage unreadable");
                IngestError::Unavailable("storage unavailable".into())
            }
            FoldError::Rate(refusal) => rate_limited(&refusal),
        })?;
    if let Some(&first) = claimed.overflowed.first() {
        let keys: Vec<u128> = claimed.keys().copied().collect();
        shared.dedup.remove_all(&keys);
        shared.limits.release(&claimed.holds);
        return Err(IngestError::invalid(format!(
            "unit {first} would overflow its series (totals are exact up to 38 digits); nothing was counted"
        )));
    }
    if !claimed.over_quota.is_empty() {
        let mut refuse = refuse.expect("invariant: an edge whose units feed quotas can refuse them");
        for (index, message) in &claimed.over_quota {
            dead_letters.push(refuse(
                &units[*index],
                &mut answer,
                RefusalReason::QuotaExceeded,
                message,
            ));
        }
        tally.refuse_many(RefusalReason::QuotaExceeded, claimed.over_quota.len());
    }
    tally.duplicates = claimed.duplicates;
    tally.accepted = tally
        .accepted
        .saturating_sub(claimed.duplicates + claimed.over_quota.len());
    tally.late += claimed.late;
    let holds = claimed.holds;
    let (batch, keys) = claimed
        .groups
        .into_iter()
        .next()
        .expect("invariant: one group per request");
    let counts_nothing = batch.is_empty() && keys.is_empty() && cumulative.is_empty();
    if counts_nothing && dead_letters.is_empty() {
        // Holds no key: the ticket closes here.
        shared.limits.release(&holds);
        return Ok((None, tally, answer));
    }
    let payload = if counts_nothing {
        Vec::new()
    } else {
        LogBatch::from_parts(&batch, &keys, &cumulative, &shared.names).encode()
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = CommitRequest {
        payload,
        batch,
        dedup_keys: keys,
        cumulative,
        dead_letters,
        reply: reply_tx,
        ticket,
        holds,
    };
    Ok((Some((request, reply_rx)), tally, answer))
}

/// Cluster mode, an edge: the 429 / RESOURCE_EXHAUSTED a request gets when the owner of one of
/// its tenants published that tenant as over its rate of a meter the request feeds
/// (`state::limits::Replicated`): refused whole, as a single replica refuses it, nothing
/// forwarded.
pub fn replicated_rate_limited(
    shared: &Shared,
    keys: impl IntoIterator<Item = (crate::model::TenantId, crate::model::MeterId)>,
    now_ms: i64,
) -> Option<IngestError> {
    if shared.limits.replicated.is_empty() {
        return None;
    }
    let mut seen = rustc_hash::FxHashSet::default();
    keys.into_iter()
        .filter(|key| seen.insert(*key))
        .find_map(|(tenant, meter)| {
            shared
                .limits
                .replicated_rate(tenant, meter, &shared.names, &shared.meters, now_ms)
        })
        .map(|refusal| rate_limited(&refusal))
}

/// A rate limit's refusal as the edges answer it: 429 / RESOURCE_EXHAUSTED, retry after the
/// exact wait (whole seconds, rounded up), with the IETF draft-10 `RateLimit-Policy` and
/// `RateLimit` values.
pub fn rate_limited(refusal: &RateExplained) -> IngestError {
    let spec = refusal
        .limit
        .rate
        .expect("invariant: a rate refusal has its rate");
    let window_secs = spec.per_ns / 1_000_000_000;
    let wait_ns = refusal.decision.retry_after_ns;
    let retry_secs = wait_ns
        .map_or(window_secs, |ns| (ns + 999_999_999) / 1_000_000_000)
        .max(1);
    let reset_secs = ((refusal.decision.reset_ns + 999_999_999) / 1_000_000_000).max(1);
    let limit = refusal.limit.format(spec.limit);
    let message = match wait_ns {
        Some(_) => format!(
            "tenant `{}` is over its rate limit of {limit} `{}` per {window_secs}s; retry after {retry_secs}s (nothing was counted)",
            refusal.tenant, refusal.limit.meter
        ),
        None => format!(
            "this request's `{}` usage is larger than the burst of {} the rate limit of tenant `{}` allows at once; \
             send it in smaller requests (nothing was counted)",
            refusal.limit.meter,
            refusal.limit.format(spec.burst),
            refusal.tenant
        ),
    };
    let name = &refusal.limit.meter;
    IngestError::RateLimited {
        message,
        retry_after: std::time::Duration::from_secs(retry_secs as u64),
        policy: format!("\"{name}\";q={limit};w={window_secs}"),
        state: format!(
            "\"{name}\";r={};t={reset_secs}",
            refusal.limit.format(refusal.decision.remaining.max(0))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_refusals_by_reason() {
        let mut a = Tally {
            accepted: 3,
            ..Tally::default()
        };
        a.refuse(RefusalReason::TooLate);
        let mut b = Tally {
            accepted: 2,
            duplicates: 1,
            ..Tally::default()
        };
        b.refuse_many(RefusalReason::TooLate, 2);
        b.refuse(RefusalReason::NoTenant);
        a.absorb(b);
        assert_eq!((a.accepted, a.duplicates, a.refused_total()), (5, 1, 4));
        assert_eq!(
            a.refused,
            vec![(RefusalReason::TooLate, 3), (RefusalReason::NoTenant, 1)]
        );
    }

    #[test]
    fn dead_letter_lines_carry_the_common_fields_then_the_edges() {
        let line = dead_letter_line(
            "2026-01-01T00:00:00.000Z",
            Source::Otlp,
            RefusalReason::WrongTenant,
            "tenant `b` is not the key's",
            serde_json::json!({"name": "requests"}),
        );
        assert_eq!(line.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["source"], "otlp");
        assert_eq!(value["reason"], "wrong_tenant");
        assert_eq!(value["name"], "requests");
        assert_eq!(value["received_at"], "2026-01-01T00:00:00.000Z");
    }
}
