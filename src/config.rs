//! Configuration: TOML file + `TALLYD__SECTION__KEY` environment overrides → validated `Config`.
//!
//! Shape errors (unknown keys, wrong types) come from serde; everything else is validated as a
//! whole so that `tallyd validate` lists every problem at once. The environment is passed in as a
//! map, never read here, so tests need no process-global state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::aggregate::Aggregation;
use crate::meter::{JsonPath, Meter, MeterSource};
use crate::model::{WindowSize, MAX_SCALE};

/// The embedded default config (also `config/tallyd.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../config/tallyd.toml");

const ENV_PREFIX: &str = "TALLYD__";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub aggregate: RawAggregate,
    #[serde(default)]
    pub emit: RawEmit,
    #[serde(default)]
    pub dead_letter: RawDeadLetter,
    #[serde(default)]
    pub otlp: RawOtlp,
    #[serde(default)]
    pub meters: Vec<RawMeter>,
    /// Absent: no Kafka source (the embedded default).
    #[serde(default)]
    pub kafka: Option<RawKafka>,
    /// Absent or `mode = "single"`: one replica serves everything.
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    /// Pricing (`rate::plan`): plan versions, tenants' plans, the default plan.
    #[serde(default)]
    pub plans: Vec<crate::rate::plan::RawPlan>,
    #[serde(default)]
    pub tenants: Vec<crate::rate::plan::RawTenant>,
    #[serde(default)]
    pub rating: crate::rate::plan::RawRating,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `single` (default) or `kafka`: edges produce to the ingest topic, replicas share its
    /// partitions, queries are answered by the owner.
    #[serde(default = "default_cluster_mode")]
    pub mode: String,
    /// The base URL other replicas and clients reach this replica's HTTP API at.
    /// Default: `http://<bound http address>`.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// Compacted topic where replicas publish which ingest partitions they own.
    /// Default: `<group_id>.members`.
    #[serde(default)]
    pub members_topic: Option<String>,
}

fn default_cluster_mode() -> String {
    "single".into()
}

/// `[cluster] mode = "kafka"`, validated against the `[kafka]` section.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub advertise_url: Option<String>,
    pub members_topic: String,
    /// The topic edges produce to and queries route by: `kafka.topics[0]`.
    pub ingest_topic: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub brokers: String,
    pub topics: Vec<String>,
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Default: `<first topic>.dlq`.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// Header carrying the event id when the JSON has none (CloudEvents Kafka binding: `ce_id`).
    #[serde(default = "default_id_header")]
    pub id_header: String,
    /// Messages folded into one pre-aggregated batch at most.
    #[serde(default = "default_max_batch_messages")]
    pub max_batch_messages: usize,
    /// Unflushed series in the engine above which consumption pauses until a checkpoint lands.
    #[serde(default = "default_max_pending_series")]
    pub max_pending_series: usize,
    /// Threads that decode and fold each batch (1-8; default 2).
    #[serde(default = "default_fold_threads")]
    pub fold_threads: usize,
    /// Publish each partition's state to a changelog topic so that another replica can take
    /// the partition over (see ARCHITECTURE.md). Off: partitions must stay with one replica.
    #[serde(default = "default_true")]
    pub changelog: bool,
    /// Default: `<group_id>.changelog`.
    #[serde(default)]
    pub changelog_topic: Option<String>,
    /// Fold a partition's changelog into a new base after this many bytes of flushes
    /// (0: only by time). Restores read from the newest base.
    #[serde(default = "default_changelog_compact_bytes")]
    pub changelog_compact_bytes: u64,
    /// ... or after this long. The changelog topic's `retention.ms` must exceed it.
    #[serde(default = "default_changelog_compact_interval_secs")]
    pub changelog_compact_interval_secs: u64,
    /// Passed to librdkafka as is (SASL, SSL, fetch sizes, ...), for consumer and producers.
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
}

fn default_true() -> bool {
    true
}

fn default_group_id() -> String {
    "tallyd".into()
}
fn default_id_header() -> String {
    "ce_id".into()
}
fn default_max_batch_messages() -> usize {
    10_000
}
fn default_fold_threads() -> usize {
    // Measured on 2 cores: while every dedup key was a RocksDB lookup a second folding thread
    // only competed with it (BENCHMARKS.md §5); with the dedup filter the consumer thread is
    // the bottleneck again and two fold 33 % more (§14: 417 k → 555 k events/s).
    2
}
fn default_changelog_compact_bytes() -> u64 {
    64 << 20
}
fn default_changelog_compact_interval_secs() -> u64 {
    3600
}
fn default_max_pending_series() -> usize {
    2_000_000
}

/// librdkafka properties tallyd sets itself: exactly-once depends on them.
const KAFKA_RESERVED: [&str; 5] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
];

#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub dlq_topic: String,
    pub id_header: String,
    pub max_batch_messages: usize,
    pub max_pending_series: usize,
    pub fold_threads: usize,
    /// None: changelog off.
    pub changelog_topic: Option<String>,
    pub changelog_compact_bytes: u64,
    pub changelog_compact_interval_secs: u64,
    pub properties: Vec<(String, String)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub http_addr: String,
    /// OTLP/gRPC (`MetricsService`, `LogsService`); `""` turns it off.
    pub otlp_grpc_addr: String,
    /// OTLP/HTTP (`POST /v1/metrics`, `/v1/logs`); `""` turns it off.
    pub otlp_http_addr: String,
    pub max_body_bytes: u64,
    pub ingest_budget_bytes: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            http_addr: "127.0.0.1:8080".into(),
            otlp_grpc_addr: "0.0.0.0:4317".into(),
            otlp_http_addr: "0.0.0.0:4318".into(),
            max_body_bytes: 8 << 20,
            ingest_budget_bytes: 256 << 20,
        }
    }
}

/// How OTLP data maps to tenants (`[otlp]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOtlp {
    /// Resource attribute naming the tenant.
    pub tenant_attribute: String,
    /// API key → tenant. Non-empty: every OTLP request must carry a known key
    /// (`authorization: Bearer <key>` or `x-api-key: <key>`), and its points belong to that
    /// key's tenant only.
    pub api_keys: BTreeMap<String, String>,
    /// TLS for both OTLP listeners (absent: plain TCP).
    pub tls: Option<RawTls>,
}

impl Default for RawOtlp {
    fn default() -> Self {
        RawOtlp {
            tenant_attribute: "tenant.id".into(),
            api_keys: BTreeMap::new(),
            tls: None,
        }
    }
}

/// `[otlp.tls]`: PEM files, read at startup.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The certificate chain, leaf first.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Validated `[otlp]`.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub tenant_attribute: String,
    pub api_keys: HashMap<String, String>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    pub data_dir: PathBuf,
    pub ingest_log_sync: String,
    pub ingest_log_segment_bytes: u64,
    pub retention_days: u64,
    /// Memory cap of the in-memory filter over stored dedup keys (0: off).
    pub dedup_filter_max_mib: u64,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            data_dir: PathBuf::from("./data"),
            ingest_log_sync: "fsync".into(),
            ingest_log_segment_bytes: 64 << 20,
            retention_days: 400,
            dedup_filter_max_mib: 512,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAggregate {
    pub flush_interval_ms: u64,
    pub allowed_lateness_secs: u64,
    pub max_lateness_secs: u64,
    pub max_future_secs: u64,
    pub dedup_horizon_secs: u64,
    /// Unflushed series above which the push edges refuse requests (retryable) until a
    /// checkpoint catches up.
    pub max_pending_series: u64,
}

impl Default for RawAggregate {
    fn default() -> Self {
        RawAggregate {
            flush_interval_ms: 1000,
            allowed_lateness_secs: 300,
            max_lateness_secs: 86_400,
            max_future_secs: 300,
            dedup_horizon_secs: 3_024_000,
            max_pending_series: 2_000_000,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEmit {
    #[serde(default)]
    pub file: RawEmitFile,
    /// Rated records to a Kafka topic (absent: off).
    #[serde(default)]
    pub kafka: Option<RawEmitKafka>,
    /// Rated records POSTed in batches to an HTTP endpoint (absent: off).
    #[serde(default)]
    pub webhook: Option<RawEmitWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmitKafka {
    /// Default: `[kafka] brokers`.
    #[serde(default)]
    pub brokers: Option<String>,
    #[serde(default = "default_rated_topic")]
    pub topic: String,
    /// Which outbox records go out: "rated" (default) and/or "window".
    #[serde(default = "default_emit_kinds")]
    pub kinds: Vec<String>,
    /// `json` (default; the JSONL file's lines) or `protobuf` (proto/tallyd/rated/v1).
    #[serde(default = "default_emit_format")]
    pub format: String,
    /// Passed through to librdkafka (SASL, SSL, linger...).
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
}

fn default_emit_format() -> String {
    "json".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmitWebhook {
    pub url: String,
    /// HMAC-SHA256 key for the `x-tallyd-signature` header (absent: unsigned).
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default = "default_webhook_batch")]
    pub batch_size: usize,
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_emit_kinds")]
    pub kinds: Vec<String>,
}

fn default_rated_topic() -> String {
    "tallyd.rated".into()
}

fn default_emit_kinds() -> Vec<String> {
    vec!["rated".into()]
}

fn default_webhook_batch() -> usize {
    500
}

fn default_webhook_timeout_ms() -> u64 {
    10_000
}

/// `[emit.kafka]`, validated.
#[derive(Clone, Debug)]
pub struct EmitKafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub kinds: Vec<String>,
    /// Values as protobuf `tallyd.rated.v1.RatedRecord` instead of JSON.
    pub protobuf: bool,
    /// Without `brokers`: `[kafka]`'s properties (SASL, SSL) first, then these.
    pub properties: Vec<(String, String)>,
}

/// `[emit.webhook]`, validated.
#[derive(Clone, Debug)]
pub struct EmitWebhookConfig {
    pub url: String,
    pub secret: Option<String>,
    pub batch_size: usize,
    pub timeout_ms: u64,
    pub kinds: Vec<String>,
}

/// librdkafka properties from TOML scalars; `reserved` ones are tallyd's own.
fn kafka_properties(
    raw: BTreeMap<String, toml::Value>,
    at: &str,
    reserved: &[&str],
    errors: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut properties = Vec::new();
    for (key, value) in raw {
        if reserved.contains(&key.as_str()) {
            errors.push(format!(
                "{at}.{key}: set by tallyd itself (exactly-once depends on it); use the section's keys"
            ));
            continue;
        }
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                errors.push(format!(
                    "{at}.{key}: must be a string, number or boolean, got {}",
                    other.type_str()
                ));
                continue;
            }
        };
        properties.push((key, value));
    }
    properties
}

/// Properties the rated-record producer sets itself (idempotence is its delivery contract).
const EMIT_KAFKA_RESERVED: &[&str] = &["enable.idempotence", "acks", "bootstrap.servers"];

fn validate_kinds(kinds: &[String], at: &str, errors: &mut Vec<String>) {
    if kinds.is_empty() {
        errors.push(format!("{at}: must list at least one of \"rated\", \"window\""));
    }
    for kind in kinds {
        if kind != "rated" && kind != "window" {
            errors.push(format!("{at}: `{kind}` is not one of \"rated\", \"window\""));
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEmitFile {
    /// Default: `<data_dir>/usage.jsonl`.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDeadLetter {
    /// Default: `<data_dir>/dead-letter.jsonl`.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeter {
    pub slug: String,
    #[serde(default)]
    pub description: Option<String>,
    /// `cloudevents` (default), `otlp_metric` or `otlp_log`.
    #[serde(default = "default_meter_source")]
    pub source: String,
    /// CloudEvents meters: the event `type` they count.
    #[serde(default)]
    pub event_type: String,
    /// `otlp_metric` meters: the metric name they count.
    #[serde(default)]
    pub metric_name: Option<String>,
    /// `otlp_log` meters: the `event.name` of the records they count.
    #[serde(default)]
    pub event_name: Option<String>,
    /// `otlp_log` meters: the record attribute holding the quantity (absent: 1 per record).
    #[serde(default)]
    pub value_attribute: Option<String>,
    /// `otlp_log` meters: the record attribute holding the event id used for dedup.
    #[serde(default)]
    pub id_attribute: Option<String>,
    pub aggregation: String,
    #[serde(default)]
    pub value_property: Option<String>,
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
    #[serde(default = "default_window_size")]
    pub window_size: String,
    #[serde(default = "default_scale")]
    pub scale: u32,
    #[serde(default = "default_unique_exact_limit")]
    pub unique_exact_limit: u32,
    #[serde(default)]
    pub allow_negative: bool,
    /// TIME_WEIGHTED: a stream silent for longer is not integrated over the gap (default 900).
    #[serde(default)]
    pub max_gap_secs: Option<u64>,
    /// SUM meters of monetary values: count `clamp(value × percent / 100, min, max)` per event.
    #[serde(default)]
    pub per_event_fee: Option<RawPerEventFee>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPerEventFee {
    pub percent: toml::Value,
    #[serde(default)]
    pub min: Option<toml::Value>,
    #[serde(default)]
    pub max: Option<toml::Value>,
}

/// A decimal string (or integer) from config at `scale`, named on error.
fn fixed_point(value: &toml::Value, scale: u32, at: &str, errors: &mut Vec<String>) -> Option<i128> {
    let text = match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => {
            errors.push(format!(
                "{at}: {f} is a TOML float (inexact); write it as a string, e.g. \"{f}\""
            ));
            return None;
        }
        other => {
            errors.push(format!(
                "{at}: must be a decimal string, got {}",
                other.type_str()
            ));
            return None;
        }
    };
    match crate::model::parse_decimal(&text, scale) {
        Ok(value) => Some(value),
        Err(error) => {
            errors.push(format!("{at}: `{text}` {error}"));
            None
        }
    }
}

/// TIME_WEIGHTED: SDKs export every 10–60 s; 15 silent minutes mean the stream stopped.
const DEFAULT_MAX_GAP_SECS: u64 = 900;

fn default_meter_source() -> String {
    "cloudevents".into()
}
fn default_window_size() -> String {
    "MINUTE".into()
}
fn default_scale() -> u32 {
    6
}
fn default_unique_exact_limit() -> u32 {
    100_000
}

/// Whether an HTTP batch is fsynced before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSync {
    /// fsync before acknowledging: survives power loss.
    Fsync,
    /// write to the OS before acknowledging: survives a process crash (kill -9), not power loss.
    None,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub http_addr: SocketAddr,
    /// None: that OTLP transport is off.
    pub otlp_grpc_addr: Option<SocketAddr>,
    pub otlp_http_addr: Option<SocketAddr>,
    pub otlp: OtlpConfig,
    pub max_body_bytes: usize,
    pub ingest_budget_bytes: usize,
    pub data_dir: PathBuf,
    pub ingest_log_sync: LogSync,
    pub ingest_log_segment_bytes: u64,
    /// `storage.dedup_filter_max_mib` in bytes (0: every stored-key lookup reads RocksDB).
    pub dedup_filter_max_bytes: u64,
    pub retention_secs: i64,
    pub flush_interval_ms: u64,
    pub allowed_lateness_secs: i64,
    pub max_lateness_secs: i64,
    pub max_future_secs: i64,
    pub dedup_horizon_secs: i64,
    /// `aggregate.max_pending_series`: the push edges' bound on unflushed series.
    pub max_pending_series: usize,
    pub emit_file_path: PathBuf,
    pub emit_kafka: Option<EmitKafkaConfig>,
    pub emit_webhook: Option<EmitWebhookConfig>,
    pub dead_letter_path: PathBuf,
    pub meters: Vec<Meter>,
    pub kafka: Option<KafkaConfig>,
    /// Some only in `[cluster] mode = "kafka"`.
    pub cluster: Option<ClusterConfig>,
    pub plans: crate::rate::plan::Plans,
    /// The file this config was read from (None: the embedded default); plans reload from it.
    pub source_path: Option<PathBuf>,
}

/// Every problem found, one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// The acceptance window every ingest edge judges event times by.
    pub fn acceptance(&self) -> crate::ingest::decode::Acceptance {
        crate::ingest::decode::Acceptance {
            allowed_lateness_secs: self.allowed_lateness_secs,
            max_lateness_secs: self.max_lateness_secs,
            max_future_secs: self.max_future_secs,
        }
    }

    /// Parses `text`, applies `TALLYD__SECTION__KEY` overrides from `env`, validates everything.
    pub fn load(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigErrors> {
        let mut document: toml::Table =
            toml::from_str(text).map_err(|error| ConfigErrors(vec![format!("toml: {error}")]))?;
        apply_env_overrides(&mut document, env)?;
        let raw = RawConfig::deserialize(toml::Value::Table(document))
            .map_err(|error| ConfigErrors(vec![format!("config: {error}")]))?;
        raw.validate()
    }

    /// The effective config for the startup log (no secrets exist yet; redact them here when they do).
    pub fn summary(&self) -> String {
        format!(
            "http_addr={} otlp_grpc_addr={} otlp_http_addr={} otlp={{tenant_attribute={} api_keys={} tls={}}} \
             data_dir={} ingest_log_sync={:?} flush_interval_ms={} allowed_lateness_secs={} \
             max_lateness_secs={} max_future_secs={} dedup_horizon_secs={} meters=[{}] kafka={} cluster={}",
            self.http_addr,
            self.otlp_grpc_addr
                .map_or("off".to_string(), |addr| addr.to_string()),
            self.otlp_http_addr
                .map_or("off".to_string(), |addr| addr.to_string()),
            self.otlp.tenant_attribute,
            // Keys are secrets: only how many there are.
            self.otlp.api_keys.len(),
            if self.otlp.tls.is_some() { "on" } else { "off" },
            self.data_dir.display(),
            self.ingest_log_sync,
            self.flush_interval_ms,
            self.allowed_lateness_secs,
            self.max_lateness_secs,
            self.max_future_secs,
            self.dedup_horizon_secs,
            self.meters
                .iter()
                .map(|m| m.slug.as_str())
                .collect::<Vec<_>>()
                .join(","),
            // Property values may hold credentials: only their keys are shown.
            self.kafka.as_ref().map_or("off".to_string(), |kafka| format!(
                "{{brokers={} topics={} group_id={} dlq_topic={} changelog_topic={} properties=[{}]}}",
                kafka.brokers,
                kafka.topics.join(","),
                kafka.group_id,
                kafka.dlq_topic,
                kafka.changelog_topic.as_deref().unwrap_or("off"),
                kafka
                    .properties
                    .iter()
                    .map(|(key, _)| key.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            self.cluster
                .as_ref()
                .map_or("single".to_string(), |cluster| format!(
                    "{{mode=kafka ingest_topic={} members_topic={} advertise_url={}}}",
                    cluster.ingest_topic,
                    cluster.members_topic,
                    cluster.advertise_url.as_deref().unwrap_or("(bound address)")
                ))
        )
    }
}

fn apply_env_overrides(
    document: &mut toml::Table,
    env: &HashMap<String, String>,
) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut keys: Vec<&String> = env.keys().filter(|key| key.starts_with(ENV_PREFIX)).collect();
    keys.sort();
    for key in keys {
        let path: Vec<String> = key[ENV_PREFIX.len()..]
            .split("__")
            .map(|segment| segment.to_ascii_lowercase())
            .collect();
        if path.iter().any(|segment| segment.is_empty()) || path.len() < 2 {
            errors.push(format!("{key}: expected TALLYD__SECTION__KEY"));
            continue;
        }
        let raw_value = &env[key];
        // A value that parses as a TOML literal (number, bool, array) is used as such; else a string.
        let value = toml::from_str::<toml::Table>(&format!("v = {raw_value}"))
            .ok()
            .and_then(|mut table| table.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw_value.clone()));
        let (sections, leaf) = path.split_at(path.len() - 1);
        match section_table(document, sections) {
            Ok(table) => {
                table.insert(leaf[0].clone(), value);
            }
            Err(segment) => errors.push(format!("{key}: `{segment}` is not a section")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Walks (creating as needed) nested tables; `Err` names a segment that is not a table.
fn section_table<'a>(table: &'a mut toml::Table, sections: &[String]) -> Result<&'a mut toml::Table, String> {
    let Some((first, rest)) = sections.split_first() else {
        return Ok(table);
    };
    match table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(inner) => section_table(inner, rest),
        _ => Err(first.clone()),
    }
}

fn validate_otlp(raw: RawOtlp, errors: &mut Vec<String>) -> OtlpConfig {
    if raw.tenant_attribute.is_empty() {
        errors.push("otlp.tenant_attribute: must not be empty".into());
    }
    for (key, tenant) in &raw.api_keys {
        // Keys are secrets: name the tenant, never the key.
        if key.len() < 16 {
            errors.push(format!(
                "otlp.api_keys: the key of tenant `{tenant}` is shorter than 16 characters"
            ));
        }
        if tenant.is_empty() || tenant.len() > crate::ingest::decode::MAX_ATTRIBUTE_BYTES {
            errors.push("otlp.api_keys: tenants must be 1-256 bytes".into());
        }
    }
    if let Some(tls) = &raw.tls {
        for (key, path) in [("cert_path", &tls.cert_path), ("key_path", &tls.key_path)] {
            if let Err(error) = std::fs::metadata(path) {
                errors.push(format!("otlp.tls.{key}: {}: {error}", path.display()));
            }
        }
    }
    OtlpConfig {
        tenant_attribute: raw.tenant_attribute,
        api_keys: raw.api_keys.into_iter().collect(),
        tls: raw.tls,
    }
}

/// The meter's source and its matching keys; every misplaced or missing key is named.
fn meter_source(raw: &RawMeter, at: &str, errors: &mut Vec<String>) -> Option<MeterSource> {
    let misplaced = |key: &str, set: bool, errors: &mut Vec<String>| {
        if set {
            errors.push(format!("{at}.{key}: not used by source `{}`", raw.source));
        }
    };
    let required = |key: &str, value: &Option<String>, errors: &mut Vec<String>| -> String {
        match value {
            Some(value) if !value.is_empty() => value.clone(),
            _ => {
                errors.push(format!("{at}.{key}: required for source `{}`", raw.source));
                String::new()
            }
        }
    };
    match raw.source.as_str() {
        "cloudevents" => {
            if raw.event_type.is_empty() {
                errors.push(format!("{at}.event_type: must not be empty"));
            }
            misplaced("metric_name", raw.metric_name.is_some(), errors);
            misplaced("event_name", raw.event_name.is_some(), errors);
            misplaced("value_attribute", raw.value_attribute.is_some(), errors);
            misplaced("id_attribute", raw.id_attribute.is_some(), errors);
            Some(MeterSource::CloudEvents)
        }
        "otlp_metric" => {
            misplaced("event_type", !raw.event_type.is_empty(), errors);
            misplaced("event_name", raw.event_name.is_some(), errors);
            misplaced("value_attribute", raw.value_attribute.is_some(), errors);
            misplaced("id_attribute", raw.id_attribute.is_some(), errors);
            Some(MeterSource::OtlpMetric {
                metric_name: required("metric_name", &raw.metric_name, errors),
            })
        }
        "otlp_log" => {
            misplaced("event_type", !raw.event_type.is_empty(), errors);
            misplaced("metric_name", raw.metric_name.is_some(), errors);
            let non_empty = |key: &str, value: &Option<String>, errors: &mut Vec<String>| {
                if value.as_deref() == Some("") {
                    errors.push(format!("{at}.{key}: must not be empty"));
                }
                value.clone()
            };
            Some(MeterSource::OtlpLog {
                event_name: required("event_name", &raw.event_name, errors),
                value_attribute: non_empty("value_attribute", &raw.value_attribute, errors),
                id_attribute: non_empty("id_attribute", &raw.id_attribute, errors),
            })
        }
        other => {
            errors.push(format!(
                "{at}.source: `{other}` is not one of cloudevents | otlp_metric | otlp_log"
            ));
            None
        }
    }
}

/// Aggregations a source cannot feed meaningfully are refused up front.
fn check_source_aggregation(
    source: &MeterSource,
    aggregation: Aggregation,
    at: &str,
    errors: &mut Vec<String>,
) {
    match (source, aggregation) {
        (MeterSource::OtlpMetric { .. }, Aggregation::UniqueCount) => errors.push(format!(
            "{at}.aggregation: UNIQUE_COUNT counts distinct values; metric points have none (use an otlp_log meter)"
        )),
        (MeterSource::CloudEvents | MeterSource::OtlpLog { .. }, Aggregation::TimeWeighted) => errors.push(format!(
            "{at}.aggregation: TIME_WEIGHTED integrates gauge streams; use source `otlp_metric`"
        )),
        (
            MeterSource::OtlpLog {
                value_attribute: None,
                ..
            },
            Aggregation::Max
            | Aggregation::Min
            | Aggregation::Latest
            | Aggregation::UniqueCount
            | Aggregation::Distribution,
        ) => errors.push(format!(
            "{at}.value_attribute: required for {} on source `otlp_log`",
            aggregation.as_str()
        )),
        _ => {}
    }
}

/// Kafka's own rule for topic names.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn validate_cluster(
    raw: RawCluster,
    kafka: Option<&KafkaConfig>,
    errors: &mut Vec<String>,
) -> Option<ClusterConfig> {
    match raw.mode.as_str() {
        "single" => return None,
        "kafka" => {}
        other => {
            errors.push(format!("cluster.mode: `{other}` is not one of single | kafka"));
            return None;
        }
    }
    let Some(kafka) = kafka else {
        errors.push("cluster.mode: `kafka` needs a [kafka] section (brokers, topics, group_id)".into());
        return None;
    };
    if kafka.changelog_topic.is_none() {
        errors.push(
            "cluster.mode: `kafka` needs kafka.changelog = true (partitions move between replicas)".into(),
        );
    }
    if let Some(url) = &raw.advertise_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            errors.push(format!(
                "cluster.advertise_url: `{url}` must be an absolute http:// or https:// URL"
            ));
        }
    }
    let members_topic = raw
        .members_topic
        .unwrap_or_else(|| format!("{}.members", kafka.group_id));
    if !valid_topic(&members_topic) {
        errors.push(format!(
            "cluster.members_topic: `{members_topic}` is not a Kafka topic name"
        ));
    }
    let taken = kafka.topics.contains(&members_topic)
        || members_topic == kafka.dlq_topic
        || kafka.changelog_topic.as_ref() == Some(&members_topic);
    if taken {
        errors.push(
            "cluster.members_topic: must differ from the ingest, dead-letter and changelog topics".into(),
        );
    }
    Some(ClusterConfig {
        advertise_url: raw.advertise_url.map(|url| url.trim_end_matches('/').to_string()),
        members_topic,
        ingest_topic: kafka.topics[0].clone(),
    })
}

fn validate_kafka(raw: RawKafka, errors: &mut Vec<String>) -> KafkaConfig {
    if raw.brokers.trim().is_empty() {
        errors.push("kafka.brokers: must list at least one host:port".into());
    }
    if raw.topics.is_empty() {
        errors.push("kafka.topics: must name at least one topic".into());
    }
    for topic in &raw.topics {
        if !valid_topic(topic) {
            errors.push(format!(
                "kafka.topics: `{topic}` is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"
            ));
        }
    }
    if raw.group_id.is_empty() {
        errors.push("kafka.group_id: must not be empty".into());
    }
    let dlq_topic = raw
        .dlq_topic
        .unwrap_or_else(|| format!("{}.dlq", raw.topics.first().map_or("usage", String::as_str)));
    if !valid_topic(&dlq_topic) {
        errors.push(format!(
            "kafka.dlq_topic: `{dlq_topic}` is not a Kafka topic name"
        ));
    }
    if raw.topics.contains(&dlq_topic) {
        errors.push("kafka.dlq_topic: must differ from the consumed topics".into());
    }
    let changelog_topic = raw.changelog.then(|| {
        raw.changelog_topic
            .clone()
            .unwrap_or_else(|| format!("{}.changelog", raw.group_id))
    });
    if let Some(topic) = &changelog_topic {
        if !valid_topic(topic) {
            errors.push(format!(
                "kafka.changelog_topic: `{topic}` is not a Kafka topic name"
            ));
        }
        if raw.topics.contains(topic) || *topic == dlq_topic {
            errors.push("kafka.changelog_topic: must differ from the consumed and dead-letter topics".into());
        }
    }
    if raw.max_batch_messages == 0 {
        errors.push("kafka.max_batch_messages: must be positive".into());
    }
    if !(1..=8).contains(&raw.fold_threads) {
        errors.push("kafka.fold_threads: must be 1 to 8".into());
    }
    if raw.changelog_compact_interval_secs == 0 {
        errors.push("kafka.changelog_compact_interval_secs: must be positive".into());
    }
    if raw.max_pending_series == 0 {
        errors.push("kafka.max_pending_series: must be positive".into());
    }
    let properties = kafka_properties(raw.properties, "kafka.properties", &KAFKA_RESERVED, errors);
    KafkaConfig {
        brokers: raw.brokers,
        topics: raw.topics,
        group_id: raw.group_id,
        dlq_topic,
        id_header: raw.id_header,
        max_batch_messages: raw.max_batch_messages,
        max_pending_series: raw.max_pending_series,
        fold_threads: raw.fold_threads,
        changelog_topic,
        changelog_compact_bytes: raw.changelog_compact_bytes,
        changelog_compact_interval_secs: raw.changelog_compact_interval_secs,
        properties,
    }
}

fn valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= 64
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let http_addr = match self.server.http_addr.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.push(format!(
                    "server.http_addr: `{}` is not an address like 127.0.0.1:8080",
                    self.server.http_addr
                ));
                None
            }
        };
        let mut optional_addr = |key: &str, text: &str| -> Option<SocketAddr> {
            if text.is_empty() {
                return None;
            }
            text.parse::<SocketAddr>().map_or_else(
                |_| {
                    errors.push(format!(
                        "server.{key}: `{text}` is not an address like 0.0.0.0:4317 (or \"\" for off)"
                    ));
                    None
                },
                Some,
            )
        };
        let otlp_grpc_addr = optional_addr("otlp_grpc_addr", &self.server.otlp_grpc_addr);
        let otlp_http_addr = optional_addr("otlp_http_addr", &self.server.otlp_http_addr);
        let otlp = validate_otlp(self.otlp, &mut errors);
        if self.server.max_body_bytes == 0 {
            errors.push("server.max_body_bytes: must be positive".into());
        }
        if self.server.ingest_budget_bytes < self.server.max_body_bytes {
            errors.push("server.ingest_budget_bytes: must be at least server.max_body_bytes".into());
        }
        let ingest_log_sync = match self.storage.ingest_log_sync.as_str() {
            "fsync" => LogSync::Fsync,
            "none" => LogSync::None,
            other => {
                errors.push(format!(
                    "storage.ingest_log_sync: `{other}` is not one of fsync | none"
                ));
                LogSync::Fsync
            }
        };
        if self.storage.ingest_log_segment_bytes < 1 << 20 {
            errors.push("storage.ingest_log_segment_bytes: must be at least 1048576".into());
        }
        if self.storage.retention_days == 0 {
            errors.push("storage.retention_days: must be positive".into());
        }
        if self.storage.dedup_filter_max_mib > 1 << 20 {
            errors.push("storage.dedup_filter_max_mib: must be at most 1048576 (1 TiB)".into());
        }
        let aggregate = &self.aggregate;
        if aggregate.flush_interval_ms == 0 {
            errors.push("aggregate.flush_interval_ms: must be positive".into());
        }
        if aggregate.max_pending_series == 0 {
            errors.push("aggregate.max_pending_series: must be positive".into());
        }
        if aggregate.allowed_lateness_secs > aggregate.max_lateness_secs {
            errors
                .push("aggregate.allowed_lateness_secs: must not exceed aggregate.max_lateness_secs".into());
        }
        // A duplicate must never outlive its dedup key while still being acceptable: keys live
        // `dedup_horizon_secs` from first sight, and an event is accepted from `max_future_secs`
        // ahead to `max_lateness_secs` behind.
        if aggregate.dedup_horizon_secs < aggregate.max_lateness_secs + aggregate.max_future_secs {
            errors.push(format!(
                "aggregate.dedup_horizon_secs: must be at least max_lateness_secs + max_future_secs ({}), \
                 or a late duplicate could be counted twice",
                aggregate.max_lateness_secs + aggregate.max_future_secs
            ));
        }
        if self.storage.retention_days * 86_400 < aggregate.max_lateness_secs {
            errors.push("storage.retention_days: must cover aggregate.max_lateness_secs".into());
        }

        let mut meters = Vec::new();
        let mut slugs = HashSet::new();
        for (index, raw) in self.meters.into_iter().enumerate() {
            let at = format!("meters[{index}] ({})", raw.slug);
            if !valid_slug(&raw.slug) {
                errors.push(format!(
                    "{at}.slug: must be 1-64 characters of a-z, 0-9, `_` or `-`"
                ));
            }
            if !slugs.insert(raw.slug.clone()) {
                errors.push(format!("{at}.slug: duplicate slug"));
            }
            let source = meter_source(&raw, &at, &mut errors);
            let aggregation = match raw.aggregation.as_str() {
                "SUM" => Some(Aggregation::Sum),
                "COUNT" => Some(Aggregation::Count),
                "MAX" => Some(Aggregation::Max),
                "MIN" => Some(Aggregation::Min),
                "LATEST" => Some(Aggregation::Latest),
                "UNIQUE_COUNT" => Some(Aggregation::UniqueCount),
                "TIME_WEIGHTED" => Some(Aggregation::TimeWeighted),
                "DISTRIBUTION" => Some(Aggregation::Distribution),
                other => {
                    errors.push(format!(
                        "{at}.aggregation: `{other}` is not one of SUM | COUNT | MAX | MIN | LATEST | UNIQUE_COUNT | TIME_WEIGHTED | DISTRIBUTION"
                    ));
                    None
                }
            };
            if raw.max_gap_secs.is_some() && aggregation != Some(Aggregation::TimeWeighted) {
                errors.push(format!("{at}.max_gap_secs: only for TIME_WEIGHTED meters"));
            }
            if raw.allow_negative && aggregation == Some(Aggregation::Distribution) {
                errors.push(format!(
                    "{at}.allow_negative: DISTRIBUTION meters take no negative values"
                ));
            }
            if raw.max_gap_secs == Some(0) {
                errors.push(format!("{at}.max_gap_secs: must be positive"));
            }
            if let (Some(source), Some(aggregation)) = (&source, aggregation) {
                check_source_aggregation(source, aggregation, &at, &mut errors);
            }
            let cloudevents = matches!(source, Some(MeterSource::CloudEvents));
            let value_property = match (&raw.value_property, aggregation) {
                (Some(_), _) if !cloudevents => {
                    errors.push(format!(
                        "{at}.value_property: only for cloudevents meters (OTLP metrics carry their value; logs use value_attribute)"
                    ));
                    None
                }
                (None, _) if !cloudevents => None,
                (None, Some(aggregation)) if aggregation.needs_value() => {
                    errors.push(format!(
                        "{at}.value_property: required for {}",
                        aggregation.as_str()
                    ));
                    None
                }
                (Some(_), Some(Aggregation::Count)) => {
                    errors.push(format!("{at}.value_property: COUNT meters take no value"));
                    None
                }
                (Some(path), _) => match JsonPath::parse(path) {
                    Ok(path) => Some(path),
                    Err(reason) => {
                        errors.push(format!("{at}.value_property: `{path}` {reason}"));
                        None
                    }
                },
                (None, _) => None,
            };
            let mut group_by = Vec::new();
            let mut group_by_attributes = Vec::new();
            for (name, path) in &raw.group_by {
                if name.is_empty() || name.len() > 64 {
                    errors.push(format!("{at}.group_by: name `{name}` must be 1-64 bytes"));
                }
                if !cloudevents {
                    // OTLP meters name attributes, not paths.
                    if path.is_empty() || path.len() > 256 {
                        errors.push(format!(
                            "{at}.group_by.{name}: attribute name must be 1-256 bytes"
                        ));
                    }
                    group_by_attributes.push((name.clone(), path.clone()));
                    continue;
                }
                match JsonPath::parse(path) {
                    Ok(parsed) => group_by.push((name.clone(), parsed)),
                    Err(reason) => errors.push(format!("{at}.group_by.{name}: `{path}` {reason}")),
                }
            }
            let window_size = WindowSize::parse(&raw.window_size).unwrap_or_else(|| {
                errors.push(format!(
                    "{at}.window_size: `{}` is not one of MINUTE | HOUR | DAY",
                    raw.window_size
                ));
                WindowSize::Minute
            });
            if raw.scale > MAX_SCALE {
                errors.push(format!("{at}.scale: must be at most {MAX_SCALE}"));
            }
            if raw.unique_exact_limit == 0 {
                errors.push(format!("{at}.unique_exact_limit: must be positive"));
            }
            let per_event_fee = raw.per_event_fee.as_ref().and_then(|fee| {
                let fee_at = format!("{at}.per_event_fee");
                if aggregation != Some(Aggregation::Sum)
                    || raw.value_property.is_none() && raw.value_attribute.is_none()
                {
                    errors.push(format!(
                        "{fee_at}: needs a SUM meter with a value (value_property or value_attribute)"
                    ));
                }
                // The percent at up to 6 decimals (2.9 → 2.900000).
                let percent = fixed_point(&fee.percent, 6, &format!("{fee_at}.percent"), &mut errors)?;
                let percent = rust_decimal::Decimal::from_i128_with_scale(percent, 6).normalize();
                if percent <= rust_decimal::Decimal::ZERO || percent > rust_decimal::Decimal::ONE_HUNDRED {
                    errors.push(format!("{fee_at}.percent: must be above 0 and at most 100"));
                }
                let min = fee
                    .min
                    .as_ref()
                    .and_then(|v| fixed_point(v, raw.scale, &format!("{fee_at}.min"), &mut errors));
                let max = fee
                    .max
                    .as_ref()
                    .and_then(|v| fixed_point(v, raw.scale, &format!("{fee_at}.max"), &mut errors));
                if let (Some(min), Some(max)) = (min, max) {
                    if min > max {
                        errors.push(format!("{fee_at}: min must not exceed max"));
                    }
                }
                Some(crate::meter::PerEventFee { percent, min, max })
            });
            if let (Some(aggregation), Some(source)) = (aggregation, source) {
                meters.push(Meter {
                    id: 0,
                    slug: raw.slug,
                    description: raw.description,
                    source,
                    event_type: raw.event_type,
                    aggregation,
                    value_property,
                    group_by,
                    group_by_attributes,
                    window_size,
                    scale: if aggregation == Aggregation::Count {
                        0
                    } else {
                        raw.scale
                    },
                    unique_exact_limit: raw.unique_exact_limit,
                    allow_negative: raw.allow_negative,
                    max_gap_secs: raw.max_gap_secs.unwrap_or(DEFAULT_MAX_GAP_SECS) as i64,
                    per_event_fee,
                });
            }
        }

        let kafka = self.kafka.map(|raw| validate_kafka(raw, &mut errors));
        let cluster = self
            .cluster
            .and_then(|raw| validate_cluster(raw, kafka.as_ref(), &mut errors));
        let slugs: Vec<&str> = meters.iter().map(|meter| meter.slug.as_str()).collect();
        let plans = crate::rate::plan::validate(self.plans, self.tenants, self.rating, &slugs, &mut errors);
        for (p, plan) in plans.plans.iter().enumerate() {
            for charge in &plan.charges {
                let distribution = meters.iter().any(|meter| {
                    meter.slug == charge.meter
                        && meter.aggregation == crate::aggregate::Aggregation::Distribution
                });
                if distribution {
                    errors.push(format!(
                        "plans[{p}] (`{}` v{}): meter `{}` is a DISTRIBUTION; percentiles cannot be priced",
                        plan.id, plan.version, charge.meter
                    ));
                }
            }
        }
        let emit_kafka = self.emit.kafka.map(|raw| {
            validate_kinds(&raw.kinds, "emit.kafka.kinds", &mut errors);
            if raw.topic.trim().is_empty() {
                errors.push("emit.kafka.topic: must not be empty".into());
            }
            let own = kafka_properties(
                raw.properties,
                "emit.kafka.properties",
                EMIT_KAFKA_RESERVED,
                &mut errors,
            );
            let (brokers, mut properties) = match (raw.brokers, kafka.as_ref()) {
                (Some(brokers), _) => (brokers, Vec::new()),
                (None, Some(kafka)) => (kafka.brokers.clone(), kafka.properties.clone()),
                (None, None) => {
                    errors.push("emit.kafka.brokers: required without a [kafka] section".into());
                    (String::new(), Vec::new())
                }
            };
            properties.extend(own);
            let protobuf = match raw.format.as_str() {
                "json" => false,
                "protobuf" => true,
                other => {
                    errors.push(format!(
                        "emit.kafka.format: `{other}` is not one of json | protobuf"
                    ));
                    false
                }
            };
            if protobuf && raw.kinds.iter().any(|kind| kind != "rated") {
                errors.push("emit.kafka.kinds: the protobuf format carries rated records only".into());
            }
            EmitKafkaConfig {
                brokers,
                topic: raw.topic,
                kinds: raw.kinds,
                protobuf,
                properties,
            }
        });
        let emit_webhook = self.emit.webhook.map(|raw| {
            validate_kinds(&raw.kinds, "emit.webhook.kinds", &mut errors);
            if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
                errors.push(format!("emit.webhook.url: `{}` is not an http(s) URL", raw.url));
            }
            if raw.url.starts_with("https://") {
                errors.push("emit.webhook.url: https is not built in; terminate TLS in a local proxy".into());
            }
            if !(1..=10_000).contains(&raw.batch_size) {
                errors.push("emit.webhook.batch_size: must be 1-10000".into());
            }
            if raw.secret.as_ref().is_some_and(|secret| secret.len() < 16) {
                errors.push("emit.webhook.secret: must be at least 16 bytes".into());
            }
            EmitWebhookConfig {
                url: raw.url,
                secret: raw.secret,
                batch_size: raw.batch_size,
                timeout_ms: raw.timeout_ms.max(1),
                kinds: raw.kinds,
            }
        });

        let (Some(http_addr), true) = (http_addr, errors.is_empty()) else {
            return Err(ConfigErrors(errors));
        };
        let data_dir = self.storage.data_dir;
        Ok(Config {
            http_addr,
            otlp_grpc_addr,
            otlp_http_addr,
            otlp,
            max_body_bytes: self.server.max_body_bytes as usize,
            ingest_budget_bytes: self.server.ingest_budget_bytes as usize,
            emit_file_path: self
                .emit
                .file
                .path
                .unwrap_or_else(|| data_dir.join("usage.jsonl")),
            emit_kafka,
            emit_webhook,
            dead_letter_path: self
                .dead_letter
                .path
                .unwrap_or_else(|| data_dir.join("dead-letter.jsonl")),
            data_dir,
            ingest_log_sync,
            ingest_log_segment_bytes: self.storage.ingest_log_segment_bytes,
            dedup_filter_max_bytes: self.storage.dedup_filter_max_mib << 20,
            retention_secs: (self.storage.retention_days * 86_400) as i64,
            flush_interval_ms: aggregate.flush_interval_ms,
            allowed_lateness_secs: aggregate.allowed_lateness_secs as i64,
            max_lateness_secs: aggregate.max_lateness_secs as i64,
            max_future_secs: aggregate.max_future_secs as i64,
            dedup_horizon_secs: aggregate.dedup_horizon_secs as i64,
            max_pending_series: usize::try_from(aggregate.max_pending_series).unwrap_or(usize::MAX),
            meters,
            kafka,
            cluster,
            plans,
            source_path: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> HashMap<String, String> {
        HashMap::new()
    }

    #[test]
    fn embedded_default_config_is_valid() {
        let config = Config::load(DEFAULT_CONFIG, &no_env()).unwrap();
        assert!(config.meters.iter().any(|m| m.slug == "tokens"));
        assert_eq!(config.flush_interval_ms, 1000);
        assert_eq!(config.dedup_horizon_secs, 3_024_000);
        // Unlisted tenants are priced with the seed pay-as-you-go plan.
        let (plan, discount) = config.plans.for_tenant("anyone").unwrap();
        assert_eq!(
            (plan.id.as_str(), plan.charges.len(), discount),
            ("payg", 5, Default::default())
        );
    }

    #[test]
    fn env_overrides_win_and_parse_types() {
        let env = HashMap::from([
            (
                "TALLYD__AGGREGATE__FLUSH_INTERVAL_MS".to_string(),
                "250".to_string(),
            ),
            ("TALLYD__STORAGE__DATA_DIR".to_string(), "/tmp/x y".to_string()),
            ("OTHER".to_string(), "ignored".to_string()),
        ]);
        let config = Config::load(DEFAULT_CONFIG, &env).unwrap();
        assert_eq!(config.flush_interval_ms, 250);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x y"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let error = Config::load("[server]\nhttp_adr = \"1.2.3.4:1\"\n", &no_env()).unwrap_err();
        assert!(error.to_string().contains("http_adr"), "{error}");
        let env = HashMap::from([("TALLYD__AGGREGATE__FLUSH".to_string(), "1".to_string())]);
        assert!(Config::load("", &env).unwrap_err().to_string().contains("flush"));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = r#"
[server]
http_addr = "nowhere"
[aggregate]
allowed_lateness_secs = 10
max_lateness_secs = 5
[[meters]]
slug = "Bad Slug"
event_type = ""
aggregation = "AVG"
[[meters]]
slug = "tokens"
event_type = "llm"
aggregation = "SUM"
window_size = "WEEK"
scale = 30
[[meters]]
slug = "tokens"
event_type = "llm"
aggregation = "COUNT"
value_property = "$.x"
group_by = { model = "model" }
"#;
        let errors = Config::load(text, &no_env()).unwrap_err().0;
        let all = errors.join("\n");
        for needle in [
            "server.http_addr",
            "allowed_lateness_secs",
            "meters[0] (Bad Slug).slug",
            "meters[0] (Bad Slug).event_type",
            "`AVG`",
            "meters[1] (tokens).value_property: required for SUM",
            "window_size: `WEEK`",
            "scale: must be at most 18",
            "meters[2] (tokens).slug: duplicate slug",
            "COUNT meters take no value",
            "group_by.model: `model` must start with `$`",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }

    #[test]
    fn otlp_meters_and_listeners_are_validated_together() {
        let text = r#"
[server]
otlp_grpc_addr = "somewhere"
otlp_http_addr = ""
[otlp]
tenant_attribute = ""
[otlp.api_keys]
"tiny-key" = "acme"
[[meters]]
slug = "no_metric"
source = "otlp_metric"
aggregation = "SUM"
value_property = "$.x"
[[meters]]
slug = "gb_hours"
event_type = "storage.report"
aggregation = "TIME_WEIGHTED"
max_gap_secs = 60
[[meters]]
slug = "runs"
source = "otlp_log"
event_name = "workflow.run"
metric_name = "x"
aggregation = "MAX"
max_gap_secs = 60
[[meters]]
slug = "wat"
source = "otlp_trace"
aggregation = "SUM"
[[meters]]
slug = "p99"
source = "otlp_metric"
metric_name = "latency"
aggregation = "DISTRIBUTION"
"#;
        let all = Config::load(text, &no_env()).unwrap_err().to_string();
        for needle in [
            "server.otlp_grpc_addr: `somewhere`",
            "otlp.tenant_attribute: must not be empty",
            "the key of tenant `acme` is shorter than 16 characters",
            "meters[0] (no_metric).metric_name: required for source `otlp_metric`",
            "meters[0] (no_metric).value_property: only for cloudevents meters",
            "meters[1] (gb_hours).aggregation: TIME_WEIGHTED integrates gauge streams",
            "meters[2] (runs).metric_name: not used by source `otlp_log`",
            "meters[2] (runs).value_attribute: required for MAX",
            "meters[2] (runs).max_gap_secs: only for TIME_WEIGHTED meters",
            "meters[3] (wat).source: `otlp_trace`",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        assert!(!all.contains("tiny-key"), "API keys are secrets: {all}");
        // "" turns an OTLP listener off.
        let config = Config::load("[server]\notlp_grpc_addr = \"\"\n", &no_env()).unwrap();
        assert_eq!(
            (config.otlp_grpc_addr, config.otlp_http_addr.map(|a| a.port())),
            (None, Some(4318))
        );
    }

    #[test]
    fn dedup_horizon_must_cover_acceptance_range() {
        let text = "[aggregate]\ndedup_horizon_secs = 100\nmax_lateness_secs = 100\nmax_future_secs = 10\nallowed_lateness_secs = 5\n";
        let all = Config::load(text, &no_env()).unwrap_err().to_string();
        assert!(all.contains("dedup_horizon_secs"), "{all}");
    }
}
