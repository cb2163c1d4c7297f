//! The dead-letter topic: every invalid or refused event, with the reason and its origin in
//! headers, delivered (acknowledged by the broker) before the offset that passes it is applied.
//! The partition waits rather than skipping a refused event silently.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::KafkaConfig;
use crate::kafka::{producer_config, DeliveryContext, KafkaSetupError};
use crate::telemetry;

/// A dead-letter record: the refused event (or the whole message when it is not JSON).
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub reason: &'static str,
    pub error: String,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub index: Option<usize>,
}

/// The dead-letter topic's producer (idempotent, acks=all).
pub(super) struct DeadLetterProducer {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
}

impl DeadLetterProducer {
    pub(super) fn new(config: &KafkaConfig) -> Result<DeadLetterProducer, KafkaSetupError> {
        Ok(DeadLetterProducer {
            producer: producer_config(config).create_with_context(DeliveryContext::new("dead-letter"))?,
            topic: config.dlq_topic.clone(),
        })
    }

    pub(super) fn deliver(&self, dead_letters: &[DeadLetter]) {
        if dead_letters.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let failures_before = self.producer.context().failures.load(Ordering::Relaxed);
            let mut sent_all = true;
            for letter in dead_letters {
                if let Err(error) = self.send(letter) {
                    tracing::error!(%error, topic = %self.topic, "cannot queue a dead letter");
                    sent_all = false;
                    break;
                }
            }
            let flushed = self.producer.flush(Duration::from_secs(30));
            let delivered = sent_all
                && flushed.is_ok()
                && self.producer.context().failures.load(Ordering::Relaxed) == failures_before;
            if delivered {
                metrics::counter!(telemetry::KAFKA_DEAD_LETTERS).increment(dead_letters.len() as u64);
                return;
            }
            // The partition waits rather than skipping a refused event silently; a retry may
            // write some dead letters twice (consumers key them by topic/partition/offset/index).
            tracing::error!(
                retry_in_ms = backoff.as_millis() as u64,
                "dead letters not delivered"
            );
            metrics::counter!(telemetry::EMIT_FAILURES, "output" => "kafka_dlq").increment(1);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn send(&self, letter: &DeadLetter) -> KafkaResult<()> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let index = letter.index.map(|i| i.to_string());
        // `reason` as issue 25's contract names it, `tallyd.reason` as consumers read it
        // before: the same value under both.
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "tallyd.reason",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "tallyd.error",
                value: Some(letter.error.as_str()),
            })
            .insert(Header {
                key: "tallyd.source.topic",
                value: Some(&*letter.topic),
            })
            .insert(Header {
                key: "tallyd.source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "tallyd.source.offset",
                value: Some(offset.as_str()),
            });
        if let Some(index) = &index {
            headers = headers.insert(Header {
                key: "tallyd.event.index",
                value: Some(index.as_str()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic)
            .payload(letter.value.as_slice())
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((error, _)) => return Err(error),
            }
        }
    }
}
