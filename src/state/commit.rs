//! The commit stage's input: one request's accepted usage, decoded and deduplicated by an
//! edge, and the channel its acknowledgement comes back on.

use tokio::sync::oneshot;

use crate::aggregate::streams::CumulativePoint;
use crate::aggregate::PreAggregated;

/// One request's worth of accepted usage, decoded and deduplicated by the edge.
pub struct CommitRequest {
    /// Encoded `LogBatch`; empty when nothing in the request is counted.
    pub payload: Vec<u8>,
    pub batch: PreAggregated,
    pub dedup_keys: Vec<u128>,
    /// Cumulative points (OTLP) to turn into deltas in log order (`aggregate::streams`).
    pub cumulative: Vec<CumulativePoint>,
    /// Dead-letter lines, durable before the acknowledgement.
    pub dead_letters: Vec<Vec<u8>>,
    pub reply: oneshot::Sender<Result<(), CommitError>>,
    /// The claim on `dedup_keys`: dropped with the request, after the reply (or the release).
    pub ticket: super::dedup::Ticket,
    /// What its units hold of quotas until applied (`limits`) and took from rate keys; given
    /// back if it fails.
    pub holds: super::limits::Holds,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("ingest log unavailable: {0}")]
    Storage(String),
}
