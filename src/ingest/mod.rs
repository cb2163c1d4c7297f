//! Ingest edges: transports in, `PreAggregated` batches out to the commit stage.
//! `decode` is pure (CloudEvents JSON → metered events); `http` is the axum edge; `dedup` is the
//! in-memory half of event deduplication.

pub mod decode;
pub mod dedup;
pub mod http;
