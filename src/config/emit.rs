//! `[emit.kafka]` and `[emit.webhook]`: where rated (and window) records go besides the file.

use super::kafka::{kafka_properties, KafkaConfig};
use super::raw::{RawEmitKafka, RawEmitWebhook};

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
    /// Extra trusted CA certificates (PEM) for an `https` URL.
    pub ca_path: Option<std::path::PathBuf>,
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

pub(super) fn validate_kafka(
    raw: RawEmitKafka,
    kafka: Option<&KafkaConfig>,
    errors: &mut Vec<String>,
) -> EmitKafkaConfig {
    validate_kinds(&raw.kinds, "emit.kafka.kinds", errors);
    if raw.topic.trim().is_empty() {
        errors.push("emit.kafka.topic: must not be empty".into());
    }
    let own = kafka_properties(
        raw.properties,
        "emit.kafka.properties",
        EMIT_KAFKA_RESERVED,
        errors,
    );
    let (brokers, mut properties) = match (raw.brokers, kafka) {
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
}

pub(super) fn validate_webhook(raw: RawEmitWebhook, errors: &mut Vec<String>) -> EmitWebhookConfig {
    validate_kinds(&raw.kinds, "emit.webhook.kinds", errors);
    if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
        errors.push(format!("emit.webhook.url: `{}` is not an http(s) URL", raw.url));
    }
    if let Some(path) = &raw.ca_path {
        if !raw.url.starts_with("https://") {
            errors.push("emit.webhook.ca_path: only for an https URL".into());
        }
        if let Err(error) = std::fs::metadata(path) {
            errors.push(format!("emit.webhook.ca_path: {}: {error}", path.display()));
        }
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
        ca_path: raw.ca_path,
    }
}
