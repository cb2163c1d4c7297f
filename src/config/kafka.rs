//! `[kafka]` (the source: brokers, topics, changelog, librdkafka pass-through) and
//! `[cluster]` (replicas sharing the ingest topic), validated together.

use std::collections::BTreeMap;

use super::raw::{RawCluster, RawKafka};

/// `[cluster] mode = "kafka"`, validated against the `[kafka]` section.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub advertise_url: Option<String>,
    pub members_topic: String,
    /// The topic edges produce to and queries route by: `kafka.topics[0]`.
    pub ingest_topic: String,
    /// Signs forwarded usage (HMAC-SHA256); a secret, never logged.
    pub secret: String,
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
    /// `kafka.create_time_tolerance_secs`, in milliseconds.
    pub create_time_tolerance_ms: i64,
    pub max_batch_messages: usize,
    pub max_pending_series: usize,
    pub fold_threads: usize,
    /// None: changelog off.
    pub changelog_topic: Option<String>,
    pub changelog_compact_bytes: u64,
    pub changelog_compact_interval_secs: u64,
    pub properties: Vec<(String, String)>,
}

/// librdkafka properties from TOML scalars; `reserved` ones are tallyd's own.
pub(super) fn kafka_properties(
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

pub(super) fn validate_cluster(
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
    let secret = raw.secret.unwrap_or_default();
    if secret.len() < 32 {
        errors.push(
            "cluster.secret: required in cluster mode, at least 32 bytes, the same on every replica \
             (it signs the usage replicas forward to each other; e.g. `openssl rand -hex 32`)"
                .into(),
        );
    }
    Some(ClusterConfig {
        advertise_url: raw.advertise_url.map(|url| url.trim_end_matches('/').to_string()),
        members_topic,
        ingest_topic: kafka.topics[0].clone(),
        secret,
    })
}

pub(super) fn validate_kafka(raw: RawKafka, errors: &mut Vec<String>) -> KafkaConfig {
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
        create_time_tolerance_ms: raw
            .create_time_tolerance_secs
            .saturating_mul(1000)
            .min(i64::MAX as u64) as i64,
        max_batch_messages: raw.max_batch_messages,
        max_pending_series: raw.max_pending_series,
        fold_threads: raw.fold_threads,
        changelog_topic,
        changelog_compact_bytes: raw.changelog_compact_bytes,
        changelog_compact_interval_secs: raw.changelog_compact_interval_secs,
        properties,
    }
}
