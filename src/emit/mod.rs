//! Outputs downstream of the checkpoint. Every checkpoint appends its window and rated records
//! to the store's outbox in the same WriteBatch as the aggregates; each emitter delivers the
//! outbox from its own persisted cursor, and a line is trimmed once every emitter delivered it.
//! So emission never blocks ingest (a slow or dead output only grows the outbox on disk), nothing
//! is lost across restarts, and the contract downstream is at-least-once with deterministic
//! `record_id`s and increasing `revision`s: consumers upsert and keep the highest revision.
//!
//! - `file`: JSONL, fsynced, on the checkpoint thread (the embedded default; both kinds).
//! - `kafka`: an idempotent producer (acks=all) to a topic keyed by `record_id`.
//! - `webhook`: batched HTTP POSTs signed with HMAC-SHA256, retried with backoff.
//!
//! Beside the outbox, `signals` publishes limit state changes to the signal topic.

pub mod file;
pub mod kafka;
pub mod proto;
pub mod signals;
pub mod webhook;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::state::Shared;
use crate::telemetry;

/// Names of the emitters `config` enables besides the file (their cursors hold the outbox).
pub fn configured(config: &crate::config::Config) -> Vec<&'static str> {
    let mut names = Vec::new();
    if config.emit_kafka.is_some() {
        names.push(kafka::KAFKA_EMITTER);
    }
    if config.emit_webhook.is_some() {
        names.push(webhook::WEBHOOK_EMITTER);
    }
    names
}

/// Running remote emitters; `stop` lets them finish what is pending (bounded by the caller).
pub struct Emitters {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Emitters {
    pub fn start(shared: &Arc<Shared>) -> Result<Emitters, EmitError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let config = &shared.config;
        if let Some(kafka) = &config.emit_kafka {
            let sink = kafka::KafkaSink::new(kafka)?;
            tracing::info!(topic = %kafka.topic, brokers = %kafka.brokers, "emitting to kafka");
            threads.push(
                EmitLoop {
                    shared: shared.clone(),
                    sink: Box::new(sink),
                    kinds: kafka.kinds.clone(),
                    batch: 1000,
                    stop: stop.clone(),
                }
                .spawn()?,
            );
        }
        if let Some(webhook) = &config.emit_webhook {
            let sink = webhook::WebhookSink::new(webhook)?;
            tracing::info!(url = %webhook.url, signed = webhook.secret.is_some(), "emitting to webhook");
            threads.push(
                EmitLoop {
                    shared: shared.clone(),
                    sink: Box::new(sink),
                    kinds: webhook.kinds.clone(),
                    batch: webhook.batch_size,
                    stop: stop.clone(),
                }
                .spawn()?,
            );
        }
        Ok(Emitters { stop, threads })
    }

    /// Asks every emitter to deliver what is pending and stop (blocking until they do).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("an emitter panicked; its records stay in the outbox");
            }
        }
    }
}

/// Replaces a parked file's lines (durably: a temporary file renamed over it).
fn rewrite(path: &std::path::Path, lines: &[&[u8]]) -> std::io::Result<()> {
    let temporary = path.with_extension("jsonl.tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = file::JsonlFile::open(&temporary)?;
    file.append_durably(lines.iter().copied())?;
    std::fs::rename(&temporary, path)
}

/// The `kind` of an outbox line (`"window"` or `"rated"`): serde writes it first.
pub fn line_kind(line: &[u8]) -> &'static str {
    if line.starts_with(br#"{"kind":"rated""#) {
        "rated"
    } else {
        "window"
    }
}

/// Why an emitter could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("kafka emitter: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("webhook emitter: {0}")]
    Http(#[from] reqwest::Error),
    #[error("emitter: {0}")]
    Io(#[from] std::io::Error),
}

/// A remote output: delivers a batch of lines (newline-free JSON) or says why not.
pub trait Sink: Send + 'static {
    /// The emitter's name: its cursor key and its `output` metric label.
    fn name(&self) -> &'static str;
    fn deliver(&mut self, lines: &[&[u8]]) -> Result<(), DeliveryError>;
}

/// Why a batch was not delivered (the emitter retries it with backoff).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The output could not be reached or did not acknowledge in time.
    #[error("{output}: {detail}")]
    Unreachable { output: String, detail: String },
    /// The output answered and refused the batch, in a way a retry may change (5xx, 408, 429).
    #[error("{output}: refused: {detail}")]
    Refused { output: String, detail: String },
    /// The output answered that this batch is wrong (4xx): retrying the same bytes cannot help.
    #[error("{output}: rejected ({status}): {detail}")]
    Rejected {
        output: String,
        status: u16,
        detail: String,
    },
    /// A line this output cannot carry (e.g. not a rated record for the protobuf format).
    #[error("{output}: cannot encode: {detail}")]
    Encoding { output: String, detail: String },
}

impl DeliveryError {
    /// The same batch will never be taken (so it is parked after a few attempts).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DeliveryError::Rejected { .. } | DeliveryError::Encoding { .. }
        )
    }
}

/// Attempts of one batch an output answers with a permanent refusal before it is parked.
const PARK_AFTER: u32 = 5;

/// Where an output's parked records wait for a replay.
pub fn parked_path(shared: &Shared, output: &str) -> std::path::PathBuf {
    shared
        .config
        .data_dir
        .join("parked")
        .join(format!("{output}.jsonl"))
}

/// Runs a sink on its own thread: reads the outbox from the sink's cursor in bounded chunks,
/// delivers the kinds it wants, retries with capped exponential backoff, advances the cursor.
/// A batch the output keeps rejecting (4xx) is parked after `PARK_AFTER` attempts, so that one
/// bad batch cannot hold back every record behind it.
pub struct EmitLoop {
    pub shared: Arc<Shared>,
    pub sink: Box<dyn Sink>,
    pub kinds: Vec<String>,
    pub batch: usize,
    pub stop: Arc<AtomicBool>,
}

impl EmitLoop {
    /// Sets `lines` aside in the output's parked file (durably) and counts them; true once they
    /// are (the cursor may then move past them). A parked file that cannot be written keeps the
    /// batch in the outbox: nothing is dropped.
    fn park(&self, lines: &[&[u8]], error: &DeliveryError) -> bool {
        let name = self.sink.name();
        let path = parked_path(&self.shared, name);
        let parked =
            file::JsonlFile::open(&path).and_then(|mut file| file.append_durably(lines.iter().copied()));
        match parked {
            Ok(count) => {
                metrics::counter!(telemetry::EMIT_PARKED, "output" => name).increment(count as u64);
                tracing::error!(%error, output = name, records = count, path = %path.display(),
                    "output keeps rejecting these records; parked them (replay: POST /api/v1/outputs/{name}/replay)");
                true
            }
            Err(park_error) => {
                tracing::error!(%error, %park_error, output = name, "cannot park rejected records; retrying them");
                false
            }
        }
    }

    /// Sends the parked records again when an operator asked (`POST /api/v1/outputs/{output}/replay`):
    /// in outbox-sized batches; the file is emptied once all of them were taken. A batch still
    /// rejected stays parked (with the rest), and the replay ends.
    fn replay_parked_if_asked(&mut self) {
        let name = self.sink.name();
        if !self.shared.replays.lock().remove(name) {
            return;
        }
        let path = parked_path(&self.shared, name);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => {
                tracing::error!(%error, output = name, "cannot read parked records");
                return;
            }
        };
        let lines: Vec<&[u8]> = text
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .collect();
        for (index, chunk) in lines.chunks(self.batch.max(1)).enumerate() {
            if let Err(error) = self.sink.deliver(chunk) {
                tracing::warn!(%error, output = name, "replaying parked records failed; they stay parked");
                let rest: Vec<&[u8]> = lines[index * self.batch.max(1)..].to_vec();
                let _ = rewrite(&path, &rest);
                return;
            }
        }
        if let Err(error) = rewrite(&path, &[]) {
            tracing::error!(%error, output = name, "parked records replayed but not cleared; they may be sent again");
        }
        tracing::info!(output = name, records = lines.len(), "parked records replayed");
    }

    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let shared = self.shared.clone();
        crate::state::spawn_stage(&format!("tallyd-emit-{}", self.sink.name()), shared, move || {
            self.run()
        })
    }

    /// Backoff that a shutdown interrupts (the daemon must not wait 30 s for a dead output).
    fn sleep_unless_stopped(&self, total: Duration) {
        let deadline = std::time::Instant::now() + total;
        while !self.stop.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(mut self) {
        let name = self.sink.name();
        let mut cursor = match self.shared.store.register_emitter(name) {
            Ok(cursor) => cursor,
            Err(error) => {
                tracing::error!(%error, output = name, "emitter cannot read its cursor; not started");
                return;
            }
        };
        let mut backoff = Duration::from_millis(100);
        // Consecutive permanent refusals of the batch at the cursor.
        let mut rejections = 0u32;
        loop {
            self.replay_parked_if_asked();
            let pending = match self.shared.store.outbox_from(cursor, self.batch) {
                Ok(pending) => pending,
                Err(error) => {
                    tracing::error!(%error, output = name, "cannot read the outbox");
                    Vec::new()
                }
            };
            metrics::gauge!(telemetry::EMIT_BACKLOG, "output" => name)
                .set(self.shared.store.emitter_backlog(name) as f64);
            let Some((last, _)) = pending.last() else {
                // Caught up: stop now if asked (the final checkpoint is written before).
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let last = *last;
            let wanted: Vec<&[u8]> = pending
                .iter()
                .map(|(_, line)| line.strip_suffix(b"\n").unwrap_or(line))
                .filter(|line| self.kinds.iter().any(|kind| kind == line_kind(line)))
                .collect();
            let delivered = wanted.is_empty() || {
                match self.sink.deliver(&wanted) {
                    Ok(()) => {
                        rejections = 0;
                        true
                    }
                    Err(error) if error.is_permanent() && rejections + 1 >= PARK_AFTER => {
                        rejections = 0;
                        self.park(&wanted, &error)
                    }
                    Err(error) => {
                        rejections = if error.is_permanent() { rejections + 1 } else { 0 };
                        metrics::counter!(telemetry::EMIT_FAILURES, "output" => name).increment(1);
                        tracing::warn!(%error, output = name, records = wanted.len(),
                            retry_in_ms = backoff.as_millis() as u64, "delivery failed; retrying");
                        false
                    }
                }
            };
            if !delivered {
                if self.stop.load(Ordering::Acquire) {
                    // Undelivered lines stay in the outbox for the next start.
                    return;
                }
                self.sleep_unless_stopped(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(100);
            for line in &wanted {
                metrics::counter!(telemetry::EMIT_RECORDS, "output" => name, "kind" => line_kind(line))
                    .increment(1);
            }
            cursor = last + 1;
            if let Err(error) = self.shared.store.advance_emitter(name, cursor) {
                // Redelivered after a restart; consumers upsert.
                tracing::warn!(%error, output = name, "cannot store the emit cursor");
            }
        }
    }
}
