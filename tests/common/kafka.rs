//! Kafka helpers for black-box tests: a producer, a dead-letter reader and the `[kafka]` config
//! section, against either librdkafka's in-process mock cluster or a real broker (tansu).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

pub fn kafka_section(brokers: &str, topic: &str, group: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "1000"
"#
    )
}

pub fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// One message: key (the tenant), JSON payload, optional `ce_id` header.
pub struct Record {
    pub key: String,
    pub payload: Vec<u8>,
    pub partition: Option<i32>,
    pub ce_id: Option<String>,
}

impl Record {
    pub fn json(key: &str, event: &Value) -> Record {
        Record {
            key: key.to_string(),
            payload: serde_json::to_vec(event).unwrap(),
            partition: None,
            ce_id: None,
        }
    }
}

/// Produces every record and waits until all are acknowledged.
pub fn produce_all(producer: &BaseProducer, topic: &str, records: &[Record]) {
    for record in records {
        let mut base: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
            .key(record.key.as_str())
            .payload(record.payload.as_slice());
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(id) = &record.ce_id {
            base = base.headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            }));
        }
        let mut base = base;
        loop {
            match producer.send(base) {
                Ok(()) => break,
                Err((_, back)) => {
                    base = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("all records acknowledged");
}

/// A dead letter as the daemon wrote it: payload and `tallyd.*` headers.
#[derive(Debug)]
pub struct DeadLetter {
    pub payload: String,
    pub headers: Vec<(String, String)>,
}

impl DeadLetter {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads `expected` records of partition 0 of `topic` from the beginning (or fails after 30 s).
pub fn read_topic(brokers: &str, topic: &str, partitions: i32, expected: usize) -> Vec<DeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tallyd-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(DeadLetter {
                payload: String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                headers,
            });
        }
    }
    out
}
