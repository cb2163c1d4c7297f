//! The members topic: who owns which ingest partition, as each replica last said (key = the
//! replica's URL), and on which partitions each tenant's usage has been counted (key =
//! `tenant/<partition>/<tenant>`, one record per pair, so compaction keeps every pair).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;
use crate::kafka::{client_config, create_topics};

/// One replica's claim: the record value (key = `url`); an empty payload is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub url: String,
    pub topic: String,
    pub partitions: Vec<i32>,
    /// When the claim was made (wall clock): the newest claim of a partition wins.
    pub at_ms: i64,
}

/// A (tenant, partition) pair some replica counted usage for: the record value of key
/// `tenant/<partition>/<tenant>` (`tenant_key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantClaim {
    pub tenant: String,
    pub topic: String,
    pub partition: i32,
    pub at_ms: i64,
}

/// Where each tenant's usage is: the partitions some replica counted it on.
pub type TenantDirectory = HashMap<String, std::collections::BTreeSet<i32>>;

/// The members-topic key of a tenant's pair (URLs never start with `tenant/`).
pub fn tenant_key(tenant: &str, partition: i32) -> String {
    format!("{TENANT_KEY_PREFIX}{partition}/{tenant}")
}

const TENANT_KEY_PREFIX: &str = "tenant/";

/// The signed bytes of a members-topic record: its key and payload, so a signed payload
/// cannot be replayed under another key (another URL, another tenant).
fn signed_bytes(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(key.len() + 1 + payload.len());
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(payload);
    bytes
}

/// The `tallyd-signature` header value of a members-topic record (HMAC-SHA256 with
/// `cluster.secret`): only replicas of this cluster can claim partitions or tenants, so a
/// writer to the topic cannot redirect queries to an address of its choosing.
pub fn sign(secret: &[u8], key: &str, payload: &[u8]) -> String {
    super::forward::sign(secret, &signed_bytes(key, payload))
}

/// Whether `signature` is the record's (`sign`), compared in constant time.
pub fn verify(secret: &[u8], key: &str, payload: &[u8], signature: Option<&[u8]>) -> bool {
    signature.is_some_and(|signature| super::forward::verify(secret, &signed_bytes(key, payload), signature))
}

/// How much older than the newest claim a claim may be and still count. Live members claim
/// again every 10 s (`Cluster`'s refresher), so a claim older than the newest by more than
/// this is a member that is gone (killed without a goodbye): its partitions are unclaimed until
/// their new owner's claim arrives (503, retry) rather than redirected to a dead address.
pub const STALE_AFTER_MS: i64 = 30_000;

/// The newest claim naming `partition` of `topic`, unless it predates the last rebalance.
pub fn newest_claim<'a>(
    directory: &'a HashMap<String, Member>,
    topic: &str,
    partition: i32,
) -> Option<&'a Member> {
    let newest = directory
        .values()
        .filter(|member| member.topic == topic)
        .map(|member| member.at_ms)
        .max()?;
    directory
        .values()
        .filter(|member| member.topic == topic && member.partitions.contains(&partition))
        .filter(|member| member.at_ms >= newest - STALE_AFTER_MS)
        .max_by(|a, b| a.at_ms.cmp(&b.at_ms).then_with(|| a.url.cmp(&b.url)))
}

/// One partition, compacted: only each replica's latest claim matters.
pub async fn provision(kafka: &KafkaConfig, topic: &str) -> Result<(), crate::kafka::KafkaSetupError> {
    let wanted = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    create_topics(kafka, &[wanted]).await
}

/// Follows the members topic from its start on a thread of its own, keeping `directory`
/// current until `stop`.
pub fn follow(
    kafka: &KafkaConfig,
    topic: &str,
    secret: Vec<u8>,
    directory: Arc<RwLock<HashMap<String, Member>>>,
    (ingest_topic, tenants): (String, Arc<RwLock<TenantDirectory>>),
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, crate::kafka::KafkaSetupError> {
    // Every replica reads the whole topic with `assign` (no group membership, nothing
    // committed); librdkafka still wants a group id to create the consumer.
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let thread = std::thread::Builder::new()
        .name("tallyd-members".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(message)) => {
                        let Some(Ok(url)) = message.key_view::<str>() else {
                            continue;
                        };
                        let signature = message.headers().and_then(|headers| {
                            use rdkafka::message::Headers;
                            headers
                                .iter()
                                .find(|header| header.key == super::forward::SIGNATURE_HEADER)
                                .and_then(|header| header.value)
                        });
                        if !verify(&secret, url, message.payload().unwrap_or_default(), signature) {
                            metrics::counter!(crate::telemetry::CLUSTER_UNSIGNED_RECORDS).increment(1);
                            tracing::warn!(
                                key = url,
                                offset = message.offset(),
                                "members-topic record without this cluster's signature ignored \
                                 (another cluster, an older tallyd, or a forgery)"
                            );
                            continue;
                        }
                        if url.starts_with(TENANT_KEY_PREFIX) {
                            let claim = message
                                .payload()
                                .and_then(|payload| serde_json::from_slice::<TenantClaim>(payload).ok());
                            match claim {
                                Some(claim) if claim.topic == ingest_topic => {
                                    tenants
                                        .write()
                                        .entry(claim.tenant)
                                        .or_default()
                                        .insert(claim.partition);
                                }
                                Some(_) => {}
                                None => tracing::warn!(key = url, "unreadable tenant partition record"),
                            }
                            continue;
                        }
                        match message.payload().filter(|payload| !payload.is_empty()) {
                            None => {
                                directory.write().remove(url);
                            }
                            Some(payload) => match serde_json::from_slice::<Member>(payload) {
                                Ok(member) => {
                                    directory.write().insert(url.to_string(), member);
                                }
                                Err(error) => tracing::warn!(%error, "unreadable cluster membership record"),
                            },
                        }
                    }
                    Some(Err(error)) => tracing::debug!(%error, "members topic"),
                    None => {}
                }
            }
        })?;
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(url: &str, partitions: &[i32], at_ms: i64) -> (String, Member) {
        (
            url.to_string(),
            Member {
                url: url.into(),
                topic: "usage".into(),
                partitions: partitions.to_vec(),
                at_ms,
            },
        )
    }

    /// A claim counts only with this cluster's signature over its key and payload: another
    /// secret, a missing header, or a signed payload replayed under another key are ignored.
    #[test]
    fn claims_need_the_clusters_signature_over_key_and_payload() {
        let secret = b"a-cluster-secret-of-32-bytes-or-more";
        let payload = br#"{"url":"http://a","topic":"usage","partitions":[0],"at_ms":1}"#;
        let signature = sign(secret, "http://a", payload);
        assert!(verify(secret, "http://a", payload, Some(signature.as_bytes())));
        assert!(!verify(
            secret,
            "http://evil",
            payload,
            Some(signature.as_bytes())
        ));
        assert!(!verify(
            b"another-secret-of-32-bytes-or-more!",
            "http://a",
            payload,
            Some(signature.as_bytes())
        ));
        assert!(!verify(secret, "http://a", payload, None));
        assert!(!verify(secret, "http://a", b"{}", Some(signature.as_bytes())));
        // Tombstones are signed too.
        assert!(verify(
            secret,
            "http://a",
            b"",
            Some(sign(secret, "http://a", b"").as_bytes())
        ));
    }

    #[test]
    fn the_newest_claim_wins_so_a_dead_replica_is_superseded() {
        // a owned 0 and 1, died without a goodbye; b took 1 later.
        let directory: HashMap<_, _> =
            [member("http://a", &[0, 1], 100), member("http://b", &[1, 2], 200)].into();
        assert_eq!(newest_claim(&directory, "usage", 0).unwrap().url, "http://a");
        assert_eq!(newest_claim(&directory, "usage", 1).unwrap().url, "http://b");
        assert_eq!(newest_claim(&directory, "usage", 2).unwrap().url, "http://b");
        assert!(newest_claim(&directory, "usage", 3).is_none());
        assert!(newest_claim(&directory, "other", 1).is_none());
    }

    #[test]
    fn a_claim_from_before_the_last_rebalance_is_not_trusted() {
        // c was killed; a rebalance later a and b claimed again, and b's claim of 3 (taken
        // from c) has not arrived yet: partition 3 is unclaimed, not c's.
        let directory: HashMap<_, _> = [
            member("http://c", &[3], 1_000),
            member("http://a", &[0, 1], 1_000 + STALE_AFTER_MS + 1),
            member("http://b", &[2], 1_000 + STALE_AFTER_MS + 5),
        ]
        .into();
        assert!(newest_claim(&directory, "usage", 3).is_none());
        assert_eq!(newest_claim(&directory, "usage", 0).unwrap().url, "http://a");
        // Within the window the claim stands (members claim moments apart).
        let directory: HashMap<_, _> =
            [member("http://c", &[3], 1_000), member("http://a", &[0], 1_500)].into();
        assert_eq!(newest_claim(&directory, "usage", 3).unwrap().url, "http://c");
    }
}
