//! tallyd: a streaming usage aggregator. Usage events come in (OTLP metrics and logs over gRPC
//! and HTTP, CloudEvents over HTTP and from Kafka topics), are counted exactly once per tenant
//! and meter in UTC windows, checkpointed to RocksDB atomically with their source positions and
//! dedup keys, priced with each tenant's plan, and come out as queryable usage, bill previews
//! and rated usage records (JSONL file, Kafka topic, webhook).
//!
//! # Layout
//! Layers, top to bottom (a module imports only from the layers below it; ARCHITECTURE.md,
//! "Module layers", and `tests/architecture.rs`):
//! - [`pipeline`]: the wiring: recovery, the commit, checkpoint and dedup stages, plan reload,
//!   shutdown order.
//! - [`api`]: HTTP routes: usage queries, the bill preview, rated records, health, `/metrics`.
//! - [`ingest`]: the edges, over one admission-and-commit path (`ingest::admission`): CloudEvents
//!   over HTTP (`http`, decoded by the pure `decode`), OTLP (`otlp`, mapped by the pure
//!   `otlp::map`), the Kafka consumer-group source (`kafka`).
//! - [`emit`]: the outbox's consumers: JSONL file, Kafka topic, signed webhook.
//! - [`query`]: the usage query engine (store + pending snapshots + live deltas).
//! - [`cluster`]: cluster mode: edges forward to the ingest topic, queries go to the owner.
//! - [`kafka`]: librdkafka client setup shared by every Kafka user.
//! - [`state`]: what stages and edges share: `Shared`, commit requests, the dedup index.
//! - [`store`]: RocksDB layout, merge operator, retention, checkpoints, the ingest log, dedup
//!   keys, rating ledgers, versioned stored formats.
//! - [`config`]: TOML + env → validated `Config` (every error at once).
//! - [`meter`], [`rate`]: pure domain: which meters an event feeds (JSONPath); pricing.
//! - [`limit`]: pure domain: rate limits (GCRA) and quotas as plans state them.
//! - [`aggregate`]: mergeable states, share-nothing writer maps, cumulative streams. No I/O.
//! - [`model`], [`telemetry`], [`shutdown`]: shared nouns; the metric catalogue; signals.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod emit;
pub mod fuzzing;
pub mod ingest;
pub mod kafka;
pub mod limit;
pub mod meter;
pub mod model;
pub mod pipeline;
pub mod query;
pub mod rate;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use pipeline::run;
