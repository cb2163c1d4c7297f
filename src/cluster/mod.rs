//! Cluster mode (`[cluster] mode = "kafka"`): several replicas share the ingest topic's
//! partitions through one consumer group, and the topic is keyed by tenant, so each tenant's
//! usage is counted by exactly one replica (the partition's owner).
//!
//! - **Edges forward.** HTTP ingest on any replica validates the request as usual (a 400 names
//!   every problem), then produces every event to the ingest topic (idempotent producer,
//!   `acks=all`, key = subject, Kafka's murmur2 partitioner) and answers 202 only once Kafka has
//!   acknowledged all of them. Counting, dedup and dead-lettering happen at the owner, exactly as
//!   for events produced by anyone else: a client retrying after a 503 is deduplicated there.
//! - **Queries go to where the tenant's usage is.** Each replica learns from the data on which
//!   partitions it counted each tenant (`store::tenants`, kept with checkpoints and the
//!   changelog) and publishes every (tenant, partition) pair to a small compacted topic
//!   (`<group_id>.members`) that every replica follows; the same topic carries each replica's URL
//!   and owned partitions, published on every rebalance (the consumer group protocol's own
//!   member metadata is not readable on every broker: tansu answers DescribeGroups without
//!   assignments). The newest claim naming a partition wins, so a replica that died without
//!   saying goodbye is superseded by the partition's next owner. So a query goes to the owner of
//!   the partitions the tenant's usage was counted on, whatever partitioner its producers used;
//!   only a tenant nobody has counted yet falls back to `murmur2(subject) mod partitions`, the
//!   rule tallyd's own edges forward with. A tenant counted on partitions that different
//!   replicas own (producers breaking the one-tenant-one-partition contract) is answered by
//!   none of them: 409 `tenant_split` names its partitions and owners (ARCHITECTURE.md).

pub mod forward;
pub mod limits;
pub mod members;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{ClusterConfig, KafkaConfig};
use crate::kafka::{producer_config, topic_partitions, KafkaSetupError};
use crate::telemetry;

pub use members::{Member, TenantClaim, TenantDirectory};

/// How often a replica claims its partitions again (a third of `members::STALE_AFTER_MS`).
const CLAIM_REFRESH: Duration = Duration::from_secs(10);

/// Longest a forwarded request waits for Kafka before the client gets a 503 (and retries).
const DELIVERY_TIMEOUT_MS: &str = "10000";

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, librdkafka's `murmur2_random`
/// partitioner): tenants are routed to the partition every Kafka producer would choose.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition a keyed record lands on with Kafka's default (murmur2) partitioner.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// Whether a tenant's `route` is one partition, owned here.
pub fn held_whole(route: &[(i32, Owner)]) -> bool {
    matches!(route, [(_, Owner::Local)])
}

/// Who answers for a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    /// Another replica's advertised base URL.
    Remote(String),
    /// Nobody has claimed the partition yet (a rebalance is in progress).
    Unknown,
}

/// One replica's view of the cluster; shared by the HTTP edge, the query API and the consumer.
pub struct Cluster {
    pub config: ClusterConfig,
    /// This replica's advertised base URL.
    pub url: String,
    /// Ingest topic partitions, read at startup. Adding partitions to a keyed topic moves
    /// tenants between partitions: not supported while running (restart every replica).
    partitions: i32,
    owned: RwLock<BTreeSet<i32>>,
    directory: Arc<RwLock<HashMap<String, Member>>>,
    /// Tenant → the partitions its usage was counted on, as read back from the members topic
    /// (every replica's pairs, this one's included once published).
    tenants: Arc<RwLock<TenantDirectory>>,
    /// Pairs this replica's store knows, at once (the topic echoes them a moment later).
    local_tenants: RwLock<TenantDirectory>,
    producer: FutureProducer,
    reader_stop: Arc<AtomicBool>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
    refresher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Why forwarded events may not all be in the ingest topic (the client retries; the owner's
/// dedup drops what was written twice).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot produce to `{topic}`: {error}")]
    Produce {
        topic: String,
        error: rdkafka::error::KafkaError,
    },
    #[error("kafka did not acknowledge an event: {0}")]
    NotAcknowledged(rdkafka::error::KafkaError),
    #[error("kafka producer shut down")]
    ProducerGone,
}

impl Cluster {
    /// Reads the ingest topic's partition count, provisions the members topic and starts
    /// following it.
    pub async fn start(
        kafka: &KafkaConfig,
        config: &ClusterConfig,
        url: String,
    ) -> Result<Arc<Cluster>, KafkaSetupError> {
        let probe_config = kafka.clone();
        let topic = config.ingest_topic.clone();
        let partitions = tokio::task::spawn_blocking(move || -> Result<i32, KafkaSetupError> {
            topic_partitions(&probe_config, Duration::from_secs(30))?
                .into_iter()
                .find(|(name, partitions)| *name == topic && *partitions > 0)
                .map(|(_, partitions)| partitions)
                .ok_or(KafkaSetupError::TopicMissing(topic))
        })
        .await
        .map_err(|error| KafkaSetupError::Task(error.to_string()))??;
        members::provision(kafka, &config.members_topic).await?;
        let producer: FutureProducer = producer_config(kafka)
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", DELIVERY_TIMEOUT_MS)
            .create()?;
        let directory = Arc::new(RwLock::new(HashMap::new()));
        let tenants = Arc::new(RwLock::new(TenantDirectory::new()));
        let reader_stop = Arc::new(AtomicBool::new(false));
        let reader = members::follow(
            kafka,
            &config.members_topic,
            config.secret.as_bytes().to_vec(),
            directory.clone(),
            (config.ingest_topic.clone(), tenants.clone()),
            reader_stop.clone(),
        )?;
        tracing::info!(%url, partitions, members_topic = %config.members_topic, "cluster mode");
        let cluster = Arc::new(Cluster {
            config: config.clone(),
            url,
            partitions,
            owned: RwLock::new(BTreeSet::new()),
            directory,
            tenants,
            local_tenants: RwLock::new(TenantDirectory::new()),
            producer,
            reader_stop,
            reader: Mutex::new(Some(reader)),
            refresher: Mutex::new(None),
        });
        *cluster.refresher.lock() = Some(Cluster::refresh_claims(&cluster)?);
        Ok(cluster)
    }

    /// Claims again every `CLAIM_REFRESH` what this replica owns, so that a live member's claim
    /// is never stale (`members::newest_claim`) whatever the rebalance protocol (a cooperative
    /// rebalance does not call back members whose assignment did not change).
    fn refresh_claims(cluster: &Arc<Cluster>) -> Result<std::thread::JoinHandle<()>, KafkaSetupError> {
        let weak = Arc::downgrade(cluster);
        let stop = cluster.reader_stop.clone();
        std::thread::Builder::new()
            .name("tallyd-claims".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    if last.elapsed() < CLAIM_REFRESH {
                        continue;
                    }
                    last = std::time::Instant::now();
                    let Some(cluster) = weak.upgrade() else { break };
                    cluster.publish(&cluster.claim());
                }
            })
            .map_err(|error| KafkaSetupError::Task(error.to_string()))
    }

    /// This replica's claim as of now.
    fn claim(&self) -> Member {
        Member {
            url: self.url.clone(),
            topic: self.config.ingest_topic.clone(),
            partitions: self.owned.read().iter().copied().collect(),
            at_ms: crate::model::now_ms(),
        }
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    pub fn partition_of(&self, tenant: &str) -> i32 {
        partition_for(tenant, self.partitions)
    }

    pub fn owned(&self) -> Vec<i32> {
        self.owned.read().iter().copied().collect()
    }

    /// The partitions `tenant`'s usage was counted on (learned; before any: the murmur2
    /// partition), each with who answers for it.
    pub fn route(&self, tenant: &str) -> Vec<(i32, Owner)> {
        let mut learned: BTreeSet<i32> = BTreeSet::new();
        for directory in [&self.tenants, &self.local_tenants] {
            learned.extend(directory.read().get(tenant).into_iter().flatten().copied());
        }
        let learned: Vec<i32> = learned.into_iter().collect();
        let partitions = if learned.is_empty() {
            vec![self.partition_of(tenant)]
        } else {
            learned
        };
        partitions
            .into_iter()
            .map(|partition| (partition, self.owner_of_partition(partition)))
            .collect()
    }

    /// Whether `tenant`'s usage was counted on more than one partition (by any replica).
    pub fn is_split(&self, tenant: &str) -> bool {
        let mut learned: BTreeSet<i32> = BTreeSet::new();
        for directory in [&self.tenants, &self.local_tenants] {
            learned.extend(directory.read().get(tenant).into_iter().flatten().copied());
        }
        learned.len() > 1
    }

    /// Whether this replica holds all of `tenant`'s usage: the tenant is on one partition, and
    /// this replica owns it (a tenant on several is never whole: `api::query`, `tenant_split`).
    pub fn answers_whole(&self, tenant: &str) -> bool {
        held_whole(&self.route(tenant))
    }

    fn owner_of_partition(&self, partition: i32) -> Owner {
        if self.owned.read().contains(&partition) {
            return Owner::Local;
        }
        let directory = self.directory.read();
        members::newest_claim(&directory, &self.config.ingest_topic, partition)
            .filter(|member| member.url != self.url)
            .map_or(Owner::Unknown, |member| Owner::Remote(member.url.clone()))
    }

    /// A store learned that `tenant`'s usage was counted on `source` (or holds the pair when its
    /// partition is assigned here): known here at once, and published for the other replicas
    /// unless the members topic already has it (so the pairs of a partition's tenants, offered
    /// again on every assignment, are only sent when one was lost). Sources other than the
    /// ingest topic's partitions are not routed by.
    pub fn learned(&self, tenant: &str, source: &str) {
        let Some((topic, partition)) = crate::kafka::parse_position_name(source) else {
            return;
        };
        if topic != self.config.ingest_topic {
            return;
        }
        self.local_tenants
            .write()
            .entry(tenant.to_string())
            .or_default()
            .insert(partition);
        let published = self
            .tenants
            .read()
            .get(tenant)
            .is_some_and(|partitions| partitions.contains(&partition));
        if published {
            return;
        }
        let claim = TenantClaim {
            tenant: tenant.to_string(),
            topic: topic.to_string(),
            partition,
            at_ms: crate::model::now_ms(),
        };
        let payload = serde_json::to_vec(&claim).expect("invariant: tenant claims serialize");
        let key = members::tenant_key(tenant, partition);
        let signature = members::sign(self.config.secret.as_bytes(), &key, &payload);
        let record = FutureRecord::to(&self.config.members_topic)
            .key(key.as_str())
            .payload(&payload)
            .headers(signature_header(&signature));
        // Advisory like the partition claims: a lost pair is published again with the next
        // assignment of its partition.
        if let Err((error, _)) = self.producer.send_result(record) {
            tracing::warn!(%error, tenant, partition, "cannot publish a tenant's partition");
        }
    }

    /// Called by the consumer after each assignment change (partitions of every topic).
    pub fn set_owned<'a>(&self, assigned: impl Iterator<Item = (&'a str, i32)>) {
        let partitions: BTreeSet<i32> = assigned
            .filter(|(topic, _)| *topic == self.config.ingest_topic)
            .map(|(_, partition)| partition)
            .collect();
        metrics::gauge!(telemetry::CLUSTER_OWNED_PARTITIONS).set(partitions.len() as f64);
        *self.owned.write() = partitions;
        self.publish(&self.claim());
    }

    fn publish(&self, member: &Member) {
        let payload = serde_json::to_vec(member).expect("invariant: members serialize");
        let signature = members::sign(self.config.secret.as_bytes(), &member.url, &payload);
        let record = FutureRecord::to(&self.config.members_topic)
            .key(member.url.as_str())
            .payload(&payload)
            .headers(signature_header(&signature));
        // Advisory: a lost entry only delays query routing until the next rebalance, so the
        // delivery is not awaited (this runs inside the rebalance callback).
        if let Err((error, _)) = self.producer.send_result(record) {
            tracing::warn!(%error, "cannot publish cluster membership");
        }
    }

    /// Produces each `(tenant, event JSON)` to the ingest topic and waits until Kafka has
    /// acknowledged every one. An error means some may not be written: the client retries
    /// the whole request and the owner's dedup drops what was written twice.
    pub async fn forward<'a>(
        &self,
        events: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<usize, ForwardError> {
        self.forward_as(events, None).await
    }

    /// `forward` with a `content-type` header on every record (forwarded OTLP usage).
    pub async fn forward_as<'a>(
        &self,
        events: impl Iterator<Item = (&'a str, &'a [u8])>,
        content_type: Option<&str>,
    ) -> Result<usize, ForwardError> {
        let mut deliveries = Vec::new();
        for (tenant, payload) in events {
            let mut record = FutureRecord::to(&self.config.ingest_topic)
                .key(tenant)
                .payload(payload);
            if let Some(content_type) = content_type {
                let mut headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: "content-type",
                    value: Some(content_type),
                });
                // Forwarded usage is signed: the owner takes it only from a replica.
                if content_type == forward::CONTENT_TYPE {
                    let signature = forward::sign(self.config.secret.as_bytes(), payload);
                    headers = headers.insert(rdkafka::message::Header {
                        key: forward::SIGNATURE_HEADER,
                        value: Some(signature.as_str()),
                    });
                }
                record = record.headers(headers);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => {
                    metrics::counter!(telemetry::CLUSTER_FORWARD_FAILURES).increment(1);
                    return Err(ForwardError::Produce {
                        topic: self.config.ingest_topic.clone(),
                        error,
                    });
                }
            }
        }
        let count = deliveries.len();
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => {
                    metrics::counter!(telemetry::CLUSTER_FORWARD_FAILURES).increment(1);
                    return Err(ForwardError::NotAcknowledged(error));
                }
                Err(_) => {
                    metrics::counter!(telemetry::CLUSTER_FORWARD_FAILURES).increment(1);
                    return Err(ForwardError::ProducerGone);
                }
            }
        }
        metrics::counter!(telemetry::CLUSTER_FORWARDED).increment(count as u64);
        Ok(count)
    }

    /// Says goodbye (an empty claim, so queries stop being sent here) and stops following.
    pub fn stop(&self) {
        self.set_owned(std::iter::empty());
        if let Err(error) = rdkafka::producer::Producer::flush(&self.producer, Duration::from_secs(5)) {
            tracing::warn!(%error, "membership goodbye not flushed");
        }
        self.reader_stop.store(true, Ordering::Release);
        if let Some(reader) = self.reader.lock().take() {
            let _ = reader.join();
        }
        if let Some(refresher) = self.refresher.lock().take() {
            let _ = refresher.join();
        }
    }
}

/// The `tallyd-signature` header of a members-topic record.
fn signature_header(signature: &str) -> rdkafka::message::OwnedHeaders {
    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: forward::SIGNATURE_HEADER,
        value: Some(signature.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka_test_vectors() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for n in 1..=16 {
            for tenant in ["", "a", "acme", "tenant-00042", "ünïcode"] {
                let p = partition_for(tenant, n);
                assert!((0..n).contains(&p));
                assert_eq!(p, partition_for(tenant, n));
            }
        }
    }
}
