//! tallyd: a streaming usage aggregator. Usage events come in (OTLP metrics and logs over gRPC
//! and HTTP, CloudEvents over HTTP and from Kafka topics), are counted exactly once per tenant and meter in UTC windows, are
//! checkpointed to RocksDB atomically with their source positions and dedup keys, and come out
//! as queryable usage, closed-window records (JSONL) and priced bill previews.
//!
//! # Layout
//! Data path order:
//! - [`config`]: TOML + env → validated `Config` (every error at once).
//! - [`model`]: shared nouns: ids, exact fixed-point quantities, windows, series keys, interning.
//! - [`meter`]: meter definitions; which meters an event feeds and with what value and dims.
//! - [`ingest`]: edges: `decode` (pure CloudEvents decoding/validation), `http` (axum), `dedup`,
//!   `kafka` (consumer group), `otlp` (gRPC + HTTP; `otlp::map` is the pure point mapping).
//! - [`aggregate`]: mergeable states, the engine (share-nothing writer maps of deltas) and
//!   cumulative streams → deltas (`aggregate::streams`). No I/O.
//! - [`rate`]: pure pricing: charge models, rounding, incremental rating, plans from config
//!   (the bill preview uses them; rated-record emission is not wired in yet).
//! - [`store`]: RocksDB layout, merge operator, retention, checkpoints; the ingest log.
//! - [`pipeline`]: the wiring: recovery, commit stage, checkpoint stage, shutdown order.
//! - [`emit`]: outputs: JSONL files (window records, dead letters).
//! - [`api`]: routes, usage queries, health, readiness, metrics.
//! - [`cluster`]: cluster mode: edges forward to the ingest topic, queries go to the owner.
//! - [`telemetry`], [`shutdown`]: logs, metric catalogue, signals.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod api;
pub mod cluster;
pub mod config;
pub mod emit;
pub mod ingest;
pub mod kafka;
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
