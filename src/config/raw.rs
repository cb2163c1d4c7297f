//! The config file's shape, as serde reads it: one struct per section, defaults included.
//! Unknown keys are errors (`deny_unknown_fields`); values are checked in the section modules.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

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
    pub auth: RawAuth,
    /// The limits listener and Envoy's descriptor keys (`config::limits`).
    #[serde(default)]
    pub limits: RawLimits,
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
    /// Shared by the replicas (at least 32 bytes): signs the usage they forward to each other
    /// on the ingest topic, so that no producer can inject it.
    #[serde(default)]
    pub secret: Option<String>,
}

fn default_cluster_mode() -> String {
    "single".into()
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
    /// How far a message's producer-set CreateTime may lie behind the consumer's clock before
    /// lateness is judged against `now - create_time_tolerance_secs` instead (ARCHITECTURE.md,
    /// "Kafka lateness"). Topics with `message.timestamp.type=LogAppendTime` are judged by the
    /// broker's time.
    #[serde(default = "default_create_time_tolerance_secs")]
    pub create_time_tolerance_secs: u64,
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
fn default_create_time_tolerance_secs() -> u64 {
    3600
}
fn default_id_header() -> String {
    "ce_id".into()
}
fn default_max_batch_messages() -> usize {
    10_000
}
fn default_fold_threads() -> usize {
    // Measured on 2 cores: while every dedup key was a RocksDB lookup a second folding thread
    // only competed with it (BENCHMARKS.md, "Kafka pipeline"); with the dedup filter the consumer thread is
    // the bottleneck again and two fold 33 % more (BENCHMARKS.md, "Kafka pipeline": 417 k → 555 k events/s).
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub http_addr: String,
    /// OTLP/gRPC (`MetricsService`, `LogsService`); `""` turns it off.
    pub otlp_grpc_addr: String,
    /// OTLP/HTTP (`POST /v1/metrics`, `/v1/logs`); `""` turns it off.
    pub otlp_http_addr: String,
    /// `/metrics`, `/healthz`, `/readyz` on a listener of their own (plain HTTP, no keys), for
    /// scrapers and probes; `""` (the default): only on `http_addr`.
    pub admin_addr: String,
    pub max_body_bytes: u64,
    pub ingest_budget_bytes: u64,
    /// A request body not received in full within this many seconds is refused (408): its
    /// share of the budget is taken before it is read, so a trickling client cannot hold it.
    pub body_timeout_secs: u64,
    /// Open connections per listener (HTTP API, OTLP/gRPC, OTLP/HTTP); one more is closed at
    /// once and counted (`tallyd_connections_refused_total`).
    pub max_connections: u64,
    /// A connection must send a request's headers within this many seconds (its first byte
    /// too: a silent connection is closed); idle keep-alive HTTP/1 connections close after it.
    pub header_read_timeout_secs: u64,
    /// TLS for the HTTP API (absent: plain TCP).
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            // Loopback unless configured: a listener others can reach needs keys (`[auth]`).
            http_addr: "127.0.0.1:8080".into(),
            otlp_grpc_addr: "127.0.0.1:4317".into(),
            otlp_http_addr: "127.0.0.1:4318".into(),
            admin_addr: String::new(),
            max_body_bytes: 8 << 20,
            ingest_budget_bytes: 256 << 20,
            body_timeout_secs: 30,
            max_connections: 4096,
            header_read_timeout_secs: 10,
            tls: None,
        }
    }
}

/// How OTLP data maps to tenants (`[otlp]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOtlp {
    /// Resource attribute naming the tenant.
    pub tenant_attribute: String,
    /// Deprecated (use `[[auth.keys]]`): API key → tenant, an `ingest` key of that tenant.
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

/// `[auth]`: API keys for every listener (`crate::auth`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// Serve a non-loopback listener without keys (a local demo); otherwise tallyd refuses to
    /// start that way.
    pub allow_unauthenticated: bool,
    pub keys: Vec<RawKey>,
    /// Client certificates of a listener's `client_ca_path` CA, by subject common name.
    pub certificates: Vec<RawCertificate>,
}

/// `[[auth.certificates]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// The certificate subject's common name (CN).
    pub common_name: String,
    /// The tenant it stands for, or `"*"`.
    pub tenant: String,
    pub scopes: Vec<String>,
}

/// `[[auth.keys]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// Hex SHA-256 of the key (the key itself is never written in the config).
    pub sha256: String,
    /// The key's tenant, or `"*"` for an operator key.
    pub tenant: String,
    /// `ingest`, `read`, `admin`.
    pub scopes: Vec<String>,
}

/// `[server.tls]`, `[otlp.tls]`, `[limits.tls]`: PEM files (the listeners reload them when
/// they change).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The certificate chain, leaf first.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Ask clients for certificates signed by these CAs (PEM); a verified
    /// one authenticates as its `[[auth.certificates]]` entry (clients without one use keys).
    #[serde(default)]
    pub client_ca_path: Option<PathBuf>,
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
    /// Distinct series (meter, dimension set) a tenant may have active in a UTC day; a new
    /// one beyond is refused (`cardinality_limit`), existing ones keep counting.
    pub max_series_per_tenant: u64,
    /// ... and all tenants together.
    pub max_series: u64,
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
            max_series_per_tenant: 100_000,
            max_series: 5_000_000,
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
    /// PEM certificates (a private CA) trusted for an `https` URL besides the system's.
    #[serde(default)]
    pub ca_path: Option<PathBuf>,
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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEmitFile {
    /// Default: `<data_dir>/usage.jsonl`.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDeadLetter {
    /// Default: `<data_dir>/dead-letter.jsonl`.
    pub path: Option<PathBuf>,
    /// The file is rotated to `<path>.1` past this size (the one before is dropped), so
    /// refused events cannot fill the disk: at most about twice this. 0: never rotated.
    pub max_file_bytes: u64,
}

impl Default for RawDeadLetter {
    fn default() -> Self {
        RawDeadLetter {
            path: None,
            max_file_bytes: 1 << 30,
        }
    }
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

/// `[limits]` (validated in `config::limits`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// `""` turns the listener off.
    pub grpc_addr: String,
    /// RLS/RLQS requests for another domain get an error.
    pub envoy_domain: String,
    /// The descriptor entry / RLQS bucket_id key that names the tenant.
    pub tenant_key: String,
    /// ... and the meter.
    pub meter_key: String,
    /// Compacted Kafka topic of limit states (when `[kafka]` is configured).
    pub signal_topic: String,
    /// `[limits.tls]`: serve the limits listener over TLS (optionally asking for client
    /// certificates), like `[otlp.tls]`.
    pub tls: Option<RawTls>,
}

impl Default for RawLimits {
    fn default() -> RawLimits {
        RawLimits {
            grpc_addr: "127.0.0.1:8081".into(),
            envoy_domain: "tallyd".into(),
            tenant_key: "tenant".into(),
            meter_key: "meter".into(),
            signal_topic: "tallyd.signals".into(),
            tls: None,
        }
    }
}
