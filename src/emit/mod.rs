//! Outputs downstream of aggregation. Today: JSONL files (closed-window records, dead letters).
//! Kafka and webhook emitters join here; each consumes the store's outbox, so emission never
//! blocks ingest and survives restarts.

pub mod file;
