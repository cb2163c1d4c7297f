//! Ingest edges: transports in, counted usage out. `admission` is the one admission-and-commit
//! path every edge calls (budget, readiness, dedup claim, dead letters, commit, metrics by
//! source); `error` the one map from refusals to HTTP statuses and gRPC codes. The edges keep
//! only their protocol: `http` (CloudEvents over HTTP, decoded by the pure `decode`), `otlp`
//! (gRPC + HTTP; `otlp::map` is the pure point mapping) and `kafka` (the consumer-group source,
//! whose log is Kafka: batches go straight to its own engine writers with their offsets).

pub mod admission;
pub mod decode;
pub mod error;
pub mod http;
pub mod kafka;
pub mod limits;
pub mod listen;
pub mod otlp;
pub mod tls;
