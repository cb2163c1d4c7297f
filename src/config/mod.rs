//! Configuration: TOML file + `TALLYD__SECTION__KEY` environment overrides → validated `Config`.
//!
//! `raw` is the file's shape (serde: unknown keys and wrong types are errors there); `env`
//! layers the environment over it; then each section validates itself (`server`, `storage`,
//! `meters`, `kafka`, `emit`; plans in `rate::plan`) into the one `Config`, and every problem
//! is reported at once so that `tallyd validate` lists them all.

mod auth;
mod emit;
mod env;
mod kafka;
pub mod limits;
mod meters;
pub mod raw;
mod server;
mod storage;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::meter::Meter;
pub use auth::AuthConfig;
pub use emit::{EmitKafkaConfig, EmitWebhookConfig};
pub use kafka::{ClusterConfig, KafkaConfig};
pub use raw::{RawConfig, RawTls};
pub use server::{ConnectionLimits, OtlpConfig};
pub use storage::LogSync;

/// The embedded default config (also `config/tallyd.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/tallyd.toml");

#[derive(Clone, Debug)]
pub struct Config {
    pub http_addr: SocketAddr,
    /// None: that OTLP transport is off.
    pub otlp_grpc_addr: Option<SocketAddr>,
    pub otlp_http_addr: Option<SocketAddr>,
    /// `server.admin_addr`: health and metrics alone (None: off).
    pub admin_addr: Option<SocketAddr>,
    pub otlp: OtlpConfig,
    pub auth: AuthConfig,
    /// The limits listener (`[limits]`).
    pub limits: limits::LimitsConfig,
    /// `[server.tls]`: TLS on the HTTP API.
    pub http_tls: Option<RawTls>,
    pub max_body_bytes: usize,
    pub ingest_budget_bytes: usize,
    pub body_timeout: std::time::Duration,
    /// `server.max_connections` and `server.header_read_timeout_secs`, per listener.
    pub connections: ConnectionLimits,
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
    /// `aggregate.max_series_per_tenant` and `max_series` (`model::cardinality`).
    pub max_series_per_tenant: usize,
    pub max_series: usize,
    pub emit_file_path: PathBuf,
    pub emit_kafka: Option<EmitKafkaConfig>,
    pub emit_webhook: Option<EmitWebhookConfig>,
    pub dead_letter_path: PathBuf,
    /// `dead_letter.max_file_bytes` (None: 0, never rotated).
    pub dead_letter_max_bytes: Option<u64>,
    pub meters: Vec<Meter>,
    pub kafka: Option<KafkaConfig>,
    /// Some only in `[cluster] mode = "kafka"`.
    pub cluster: Option<ClusterConfig>,
    pub plans: crate::rate::plan::Plans,
    /// The file this config was read from (None: the embedded default); plans reload from it.
    pub source_path: Option<PathBuf>,
    /// `tallyd run --salvage-ingest-log`: skip damaged ingest-log records that intact ones
    /// follow (their usage is lost and logged) instead of refusing to start. A flag, not a
    /// config key: it is a decision for one start.
    pub salvage_ingest_log: bool,
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
    pub fn acceptance(&self) -> crate::model::Acceptance {
        crate::model::Acceptance {
            allowed_lateness_secs: self.allowed_lateness_secs,
            max_lateness_secs: self.max_lateness_secs,
            max_future_secs: self.max_future_secs,
            not_before_ms: i64::MIN,
        }
    }

    /// Parses `text`, applies `TALLYD__SECTION__KEY` overrides from `env`, validates everything.
    pub fn load(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigErrors> {
        let mut document: toml::Table =
            toml::from_str(text).map_err(|error| ConfigErrors(vec![format!("toml: {error}")]))?;
        env::apply_env_overrides(&mut document, env)?;
        let raw = RawConfig::deserialize(toml::Value::Table(document))
            .map_err(|error| ConfigErrors(vec![format!("config: {error}")]))?;
        raw.validate()
    }

    /// The effective config for the startup log (no secrets exist yet; redact them here when they do).
    pub fn summary(&self) -> String {
        format!(
            "http_addr={} otlp_grpc_addr={} otlp_http_addr={} otlp={{tenant_attribute={} tls={}}} auth={{keys={} allow_unauthenticated={}}} \
             data_dir={} ingest_log_sync={:?} flush_interval_ms={} allowed_lateness_secs={} \
             max_lateness_secs={} max_future_secs={} dedup_horizon_secs={} meters=[{}] kafka={} cluster={}",
            self.http_addr,
            self.otlp_grpc_addr
                .map_or("off".to_string(), |addr| addr.to_string()),
            self.otlp_http_addr
                .map_or("off".to_string(), |addr| addr.to_string()),
            self.otlp.tenant_attribute,
            if self.otlp.tls.is_some() { "on" } else { "off" },
            // Keys are configured by digest; still, only how many there are.
            self.auth.keys.len(),
            self.auth.allow_unauthenticated,
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

impl RawConfig {
    /// Every section's checks; every problem reported at once.
    pub fn validate(self) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let listeners = server::validate_server(&self.server, &mut errors);
        let auth = auth::validate_auth(self.auth, &self.otlp.api_keys, &mut errors);
        let limits = limits::validate_limits(self.limits, &mut errors);
        auth::check_exposure(
            &auth,
            &[
                ("server.http_addr", listeners.http_addr),
                ("server.otlp_grpc_addr", listeners.otlp_grpc_addr),
                ("server.otlp_http_addr", listeners.otlp_http_addr),
                ("limits.grpc_addr", limits.grpc_addr),
            ],
            &mut errors,
        );
        let otlp = server::validate_otlp(self.otlp, &mut errors);
        let ingest_log_sync = storage::validate_storage(&self.storage, &self.aggregate, &mut errors);
        let aggregate = &self.aggregate;
        let meters = meters::validate_meters(self.meters, &mut errors);
        for meter in &meters {
            // A stream silent for longer than the horizon continues from a baseline
            // (`aggregate::streams`): a longer gap could never be integrated.
            if meter.max_gap_secs > aggregate.dedup_horizon_secs as i64 {
                errors.push(format!(
                    "meters ({}).max_gap_secs: must not exceed aggregate.dedup_horizon_secs ({})",
                    meter.slug, aggregate.dedup_horizon_secs
                ));
            }
        }
        let kafka = self.kafka.map(|raw| kafka::validate_kafka(raw, &mut errors));
        if let Some(kafka) = &kafka {
            // Judged time may lag the clock by the tolerance (`ingest::kafka::judged_time_ms`):
            // a resend must still find its key until it is refused as too late.
            let needed = aggregate.max_lateness_secs
                + aggregate.max_future_secs
                + (kafka.create_time_tolerance_ms / 1000) as u64;
            if aggregate.dedup_horizon_secs < needed {
                errors.push(format!(
                    "aggregate.dedup_horizon_secs: must be at least max_lateness_secs + max_future_secs + \
                     kafka.create_time_tolerance_secs ({needed}) with a Kafka source"
                ));
            }
        }
        let cluster = self
            .cluster
            .and_then(|raw| kafka::validate_cluster(raw, kafka.as_ref(), &mut errors));
        let shapes: Vec<(&str, crate::aggregate::Aggregation, u32)> = meters
            .iter()
            .map(|meter| (meter.slug.as_str(), meter.aggregation, meter.scale))
            .collect();
        let plans = crate::rate::plan::validate(self.plans, self.tenants, self.rating, &shapes, &mut errors);
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
        let emit_kafka = self
            .emit
            .kafka
            .map(|raw| emit::validate_kafka(raw, kafka.as_ref(), &mut errors));
        let emit_webhook = self
            .emit
            .webhook
            .map(|raw| emit::validate_webhook(raw, &mut errors));

        let (Some(http_addr), true) = (listeners.http_addr, errors.is_empty()) else {
            return Err(ConfigErrors(errors));
        };
        let data_dir = self.storage.data_dir;
        Ok(Config {
            http_addr,
            otlp_grpc_addr: listeners.otlp_grpc_addr,
            otlp_http_addr: listeners.otlp_http_addr,
            admin_addr: listeners.admin_addr,
            otlp,
            auth,
            limits,
            http_tls: self.server.tls.clone(),
            max_body_bytes: self.server.max_body_bytes as usize,
            ingest_budget_bytes: self.server.ingest_budget_bytes as usize,
            body_timeout: std::time::Duration::from_secs(self.server.body_timeout_secs),
            connections: ConnectionLimits {
                max_connections: self.server.max_connections as usize,
                header_read_timeout: std::time::Duration::from_secs(self.server.header_read_timeout_secs),
            },
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
            dead_letter_max_bytes: Some(self.dead_letter.max_file_bytes).filter(|max| *max > 0),
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
            max_series_per_tenant: usize::try_from(aggregate.max_series_per_tenant).unwrap_or(usize::MAX),
            max_series: usize::try_from(aggregate.max_series).unwrap_or(usize::MAX),
            meters,
            kafka,
            cluster,
            plans,
            source_path: None,
            salvage_ingest_log: false,
        })
    }
}
