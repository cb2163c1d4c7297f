//! Rated records to a Kafka topic (`tallyd.rated` by default): key = `record_id`, value = the
//! JSON record (or protobuf, `format = "protobuf"`), headers `content-type`, `tallyd-kind` and
//! `tallyd-revision`.
//!
//! Delivery contract: at-least-once with deterministic ids, not transactions. The producer is
//! idempotent (acks=all), so librdkafka's own retries never duplicate or reorder a partition's
//! records; a crash between the broker's acknowledgement and the cursor update resends the last
//! batch, which a consumer absorbs by upserting on `record_id` and keeping the highest
//! `revision` (the topic can also be compacted on `record_id`). Why not a transactional
//! producer: the records' source of truth is the RocksDB checkpoint, not Kafka, so a
//! transaction could not cover both the store and the topic anyway (tansu, the broker in our
//! tests, has no transactions either); the outbox makes the store→topic step replayable instead.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::DeliveryError;
use crate::config::EmitKafkaConfig;
use crate::kafka::DeliveryContext;

pub const KAFKA_EMITTER: &str = "kafka";

pub struct KafkaSink {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
    timeout: Duration,
    protobuf: bool,
}

impl KafkaSink {
    pub fn new(config: &EmitKafkaConfig) -> Result<KafkaSink, super::EmitError> {
        let mut client = rdkafka::config::ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("linger.ms", "5")
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        // The delivery contract (idempotent, acks=all) is set after the pass-through.
        crate::kafka::pass_through_producer(&mut client, &config.properties);
        let producer = client.create_with_context(DeliveryContext::new("rated records"))?;
        Ok(KafkaSink {
            producer,
            topic: config.topic.clone(),
            timeout: Duration::from_secs(30),
            protobuf: config.protobuf,
        })
    }
}

/// `record_id` and `revision` of a JSON record line, for the key and headers.
fn id_and_revision(line: &[u8]) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Ids {
        record_id: String,
        revision: u32,
    }
    match serde_json::from_slice::<Ids>(line) {
        Ok(ids) => (ids.record_id, ids.revision.to_string()),
        Err(_) => (String::new(), String::new()),
    }
}

impl super::Sink for KafkaSink {
    fn name(&self) -> &'static str {
        KAFKA_EMITTER
    }

    fn deliver(&mut self, lines: &[&[u8]]) -> Result<(), DeliveryError> {
        let unreachable = |detail: String| DeliveryError::Unreachable {
            output: self.topic.clone(),
            detail,
        };
        let failures_before = self.producer.context().failures.load(Ordering::Acquire);
        for line in lines {
            let (record_id, revision) = id_and_revision(line);
            let encoded;
            let payload: &[u8] = if self.protobuf {
                encoded = super::proto::encode_line(line).ok_or_else(|| DeliveryError::Encoding {
                    output: self.topic.clone(),
                    detail: format!("not a rated record: {}", String::from_utf8_lossy(line)),
                })?;
                &encoded
            } else {
                line
            };
            let content_type = if self.protobuf {
                "application/x-protobuf; messageType=tallyd.rated.v1.RatedRecord"
            } else {
                "application/json"
            };
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "content-type",
                    value: Some(content_type),
                })
                .insert(Header {
                    key: "tallyd-kind",
                    value: Some(super::line_kind(line)),
                })
                .insert(Header {
                    key: "tallyd-revision",
                    value: Some(revision.as_str()),
                });
            let mut record = BaseRecord::<str, [u8]>::to(&self.topic)
                .key(record_id.as_str())
                .payload(payload)
                .headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(20));
                    }
                    Err((error, _)) => return Err(unreachable(error.to_string())),
                }
            }
        }
        self.producer
            .flush(self.timeout)
            .map_err(|error| unreachable(error.to_string()))?;
        if self.producer.context().failures.load(Ordering::Acquire) != failures_before {
            return Err(unreachable("some records were not acknowledged".into()));
        }
        Ok(())
    }
}
