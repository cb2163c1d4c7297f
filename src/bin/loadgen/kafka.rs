//! Kafka load: producing events one per message, and the bare consumer baseline.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde_json::json;

use crate::*;

/// Produces `args.events` events, one per message, keyed by tenant (one record per batch:
/// tansu 0.6 cannot fetch from inside a batch, see ARCHITECTURE.md).
pub(crate) fn kafka_produce(args: &Args, brokers: &str) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut generator = Generator {
        args: args.clone(),
        tenants: Zipf::new(args.tenants, args.zipf_s),
        dims: Zipf::new(args.dim_cardinality, args.zipf_s),
        rng: SmallRng::seed_from_u64(args.seed),
        next_id: 0,
        worker: 0,
        started_ns: 0,
        otlp: OtlpGenerator::new(0),
    };
    let started = Instant::now();
    let mut produced = 0u64;
    let mut bytes = 0u64;
    let mut payload = Vec::with_capacity(256);
    // With `--rate`, `--duration-secs` also ends the run: a soak's producer must stop with the
    // other sources even when a busy machine could not keep its pace.
    let deadline = (args.rate > 0).then(|| started + Duration::from_secs(args.duration_secs));
    while produced < args.events && deadline.is_none_or(|deadline| Instant::now() < deadline) {
        // `--rate`: paced to that many events/s (for a soak), else as fast as the broker takes.
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(produced as f64 / args.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                producer.poll(Duration::ZERO);
                std::thread::sleep(wait);
            }
        }
        let now = chrono::Utc::now();
        let now_text = event_time(now);
        for _ in 0..args.batch_size {
            if produced == args.events {
                break;
            }
            payload.clear();
            let key = format!("tenant-{}", generator.write_event(now, &now_text, &mut payload));
            bytes += payload.len() as u64;
            let mut record = BaseRecord::<str, [u8]>::to(&args.kafka_topic)
                .key(&key)
                .payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(5));
                    }
                }
            }
            produced += 1;
        }
    }
    producer.flush(Duration::from_secs(300))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"produced": produced, "avg_bytes": bytes / produced.max(1), "seconds": secs, "per_sec": produced as f64 / secs})
    );
    Ok(())
}

/// The bare consumer baseline: counts messages, nothing else.
pub(crate) fn kafka_count(args: &Args, brokers: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tallyd-loadgen-count")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "100000")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&args.kafka_topic), Duration::from_secs(10))?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            assignment.add_partition_offset(&args.kafka_topic, partition.id(), rdkafka::Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let mut counted = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counted < args.events && Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            counted += 1;
        }
    }
    let secs = first.map_or(0.0, |first| first.elapsed().as_secs_f64());
    println!(
        "{}",
        json!({"counted": counted, "seconds_from_first_message": secs, "per_sec": counted as f64 / secs.max(1e-9)})
    );
    anyhow::ensure!(
        counted == args.events,
        "only {counted} of {} messages",
        args.events
    );
    Ok(())
}
