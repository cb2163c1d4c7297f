//! The Kafka consumer's pipeline without the broker: batches of Kafka message payloads (~180-byte
//! CloudEvents, 4 partitions, 10 000 messages per batch, 1 000 tenants × 4 models, 5 % producer
//! duplicates) → decode → dedup → pre-aggregate per partition → engine writers → checkpoint
//! (RocksDB WriteBatch, synced), with the real commit and checkpoint threads running.
//!
//! Each iteration folds 200 000 fresh messages and ends with a checkpoint that makes them
//! durable, so the figure is events consumed *and checkpointed* per second. Baseline in the same
//! run: `serde_json` parsing the same payloads into `serde_json::Value` and dropping them (the
//! decode-only floor of any JSON consumer).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tallyd::config::{Config, DEFAULT_CONFIG};
use tallyd::ingest::kafka::{Folder, KafkaMessage};
use tallyd::pipeline::Stages;

const MESSAGES: usize = 1_000_000;
const BATCH: usize = 10_000;

fn messages(round: u64, topic: &Arc<str>) -> Vec<KafkaMessage> {
    let mut rng = SmallRng::seed_from_u64(round);
    let now_ms = tallyd::model::now_ms();
    let time = tallyd::model::rfc3339_ms(now_ms - 5_000);
    let mut offsets = [0i64; 4];
    (0..MESSAGES)
        .map(|i| {
            let tenant: i32 = rng.gen_range(0..1000);
            // 5 % repeat an earlier id of this round (a producer retry).
            let id = if i > 100 && rng.gen_ratio(1, 20) { rng.gen_range(0..i) } else { i };
            let payload = format!(
                r#"{{"specversion":"1.0","id":"r{round}-{id}","source":"bench","type":"llm.prompt","subject":"tenant-{tenant}","time":"{time}","data":{{"tokens":{},"model":"m{}"}}}}"#,
                rng.gen_range(1..2000),
                tenant % 4
            );
            let partition = tenant % 4;
            offsets[partition as usize] += 1;
            KafkaMessage {
                topic: topic.clone(),
                partition,
                offset: round as i64 * MESSAGES as i64 + offsets[partition as usize],
                timestamp_ms: now_ms,
                key: Some(format!("tenant-{tenant}").into_bytes()),
                payload: Some(payload.into_bytes()),
                header_id: None,
                forwarded: false,
                signature: None,
            }
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // The process's own `TALLYD__…` settings apply too (A/B runs of one binary).
    let env = std::env::vars()
        .filter(|(name, _)| name.starts_with("TALLYD__"))
        .chain([(
            "TALLYD__STORAGE__DATA_DIR".to_string(),
            dir.path().display().to_string(),
        )])
        .collect();
    let mut config = Config::load(DEFAULT_CONFIG, &env).unwrap();
    config.emit_file_path = dir.path().join("usage.jsonl");
    // Checkpoints overlap folding as in a running consumer; the synced checkpoint that ends each
    // iteration (a consumer never waits for one except on revocation) then holds at most a
    // quarter second of events instead of a second.
    config.flush_interval_ms = 250;
    config.dead_letter_path = dir.path().join("dead-letter.jsonl");
    let stages = Stages::start(config).unwrap();
    let shared = stages.shared.clone();
    let mut folder = Folder::new(shared.clone(), false);
    let topic: Arc<str> = "usage".into();
    let mut round = 0u64;

    let mut group = c.benchmark_group("kafka_pipeline");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("decode_only_baseline", |b| {
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                let batch = messages(round, &topic);
                let started = Instant::now();
                for message in &batch {
                    let value: serde_json::Value =
                        serde_json::from_slice(message.payload.as_deref().unwrap()).unwrap();
                    black_box(value);
                }
                elapsed += started.elapsed();
            }
            elapsed
        })
    });
    // tallyd's own decoder (envelope, validation, meters, dims), one thread, nothing else.
    group.bench_function("tallyd_decode_only", |b| {
        let acceptance = shared.config.acceptance();
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                let batch = messages(round, &topic);
                let started = Instant::now();
                for chunk in batch.chunks(BATCH) {
                    // As the consumer does: a one-object payload is decoded (and so validated) once.
                    let raws: Vec<&str> = chunk
                        .iter()
                        .map(|m| std::str::from_utf8(m.payload.as_deref().unwrap()).unwrap())
                        .collect();
                    let (decoded, errors) = tallyd::ingest::decode::decode_each(
                        &raws,
                        &shared.meters,
                        &shared.names,
                        acceptance,
                        |_| tallyd::ingest::decode::EventContext {
                            now_ms: chunk[0].timestamp_ms,
                            id: None,
                            tenant: None,
                        },
                    );
                    assert!(errors.is_empty());
                    black_box(decoded);
                }
                elapsed += started.elapsed();
            }
            elapsed
        })
    });
    for threads in [1usize, 2] {
        group.bench_function(
            format!("decode_aggregate_checkpoint/fold_threads={threads}"),
            |b| {
                b.iter_custom(|iterations| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iterations {
                        round += 1;
                        let batch = messages(round, &topic);
                        let started = Instant::now();
                        for chunk in batch.chunks(BATCH) {
                            let folded = folder.fold_parallel(chunk, threads);
                            assert!(folded.dead_letters.is_empty());
                            folder.apply(folded);
                        }
                        assert!(shared.checkpoint_now(&stages.checkpoints, Duration::from_secs(60)));
                        elapsed += started.elapsed();
                    }
                    elapsed
                })
            },
        );
    }
    group.finish();
    drop(folder);
    assert!(stages.drain());
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
