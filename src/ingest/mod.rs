//! Ingest edges: transports in, `PreAggregated` batches out to the engine.
//! `decode` is pure (CloudEvents JSON → metered events); `http` is the axum edge (batches go
//! through the commit stage's ingest log); `kafka` is the consumer-group source (Kafka is its
//! log: batches go straight to its own engine writer with their offsets); `dedup` is the
//! in-memory half of event deduplication shared by both; `otlp` is the OpenTelemetry edge
//! (gRPC + HTTP; through the same ingest log as `http`).

pub mod decode;
pub mod dedup;
pub mod http;
pub mod kafka;
pub mod otlp;
