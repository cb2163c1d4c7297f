//! Kafka source against librdkafka's in-process mock cluster (a real Kafka-protocol broker on
//! loopback, inside this test process): exact totals with duplicates and out-of-order events,
//! poison messages to the dead-letter topic with their reasons, ids from headers, and a restart
//! that resumes from the checkpointed offsets without counting anything twice.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::kafka::*;
use common::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;
use serde_json::json;

const TOPIC: &str = "usage";
const DLQ: &str = "usage.dlq";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_counts_exactly_once_and_dead_letters_poison() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 2, 1).unwrap();
    cluster.create_topic(DLQ, 1, 1).unwrap();
    // The mock cluster does not answer CreateTopics: the changelog must exist beforehand.
    cluster.create_topic("tallyd-mock.changelog", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer = producer(&brokers);

    // 300 distinct events over two tenants, timestamps shuffled over the last two minutes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut records = Vec::new();
    let mut originals = Vec::new();
    for i in 0..300 {
        let tenant = if i % 3 == 0 { "globex" } else { "acme" };
        let tokens: i64 = rng.gen_range(1..1000);
        *expected.entry(tenant.into()).or_default() += tokens;
        let event = event(
            &format!("evt-{i}"),
            "llm.prompt",
            tenant,
            &ago(rng.gen_range(0..120)),
            json!({"tokens": tokens, "model": "gpt"}),
        );
        originals.push((tenant, event.clone()));
        records.push(Record::json(tenant, &event));
    }
    // Producer retries: 60 duplicates, some forced onto the other partition.
    for (n, (tenant, event)) in originals.choose_multiple(&mut rng, 60).enumerate() {
        let mut record = Record::json(tenant, event);
        record.partition = Some((n % 2) as i32);
        records.push(record);
    }
    records.shuffle(&mut rng);
    // An event whose id comes from the `ce_id` header, sent twice.
    let mut headed = event(
        "unused",
        "llm.prompt",
        "acme",
        &ago(5),
        json!({"tokens": 5, "model": "gpt"}),
    );
    headed.as_object_mut().unwrap().remove("id");
    for _ in 0..2 {
        let mut record = Record::json("acme", &headed);
        record.ce_id = Some("from-header-1".into());
        records.push(record);
    }
    *expected.get_mut("acme").unwrap() += 5;
    // Poison: not JSON, a missing subject, an event older than max_lateness (10 days).
    records.push(Record {
        key: "acme".into(),
        null_key: false,
        payload: b"{not json".to_vec(),
        partition: Some(0),
        ce_id: None,
    });
    let mut no_subject = event(
        "bad-1",
        "llm.prompt",
        "acme",
        &ago(1),
        json!({"tokens": 1, "model": "gpt"}),
    );
    no_subject.as_object_mut().unwrap().remove("subject");
    records.push(Record::json("acme", &no_subject));
    records.push(Record::json(
        "acme",
        &event(
            "old-1",
            "llm.prompt",
            "acme",
            &ago(20 * 86_400),
            json!({"tokens": 1, "model": "gpt"}),
        ),
    ));
    produce_all(&producer, TOPIC, &records);

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &kafka_section(&brokers, TOPIC, "tallyd-mock"));
    let daemon = Daemon::start(&path);
    let client = client();
    wait_for_totals(&client, &daemon, &expected).await;

    let letters = read_topic(&brokers, DLQ, 1, 3, Duration::from_secs(30));
    assert_eq!(letters.len(), 3, "dead letters: {letters:?}");
    let mut reasons: Vec<&str> = letters
        .iter()
        .map(|l| l.header("tallyd.reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid", "invalid", "too_late"]);
    let missing = letters
        .iter()
        .find(|l| l.header("tallyd.error").is_some_and(|e| e.contains("subject")))
        .expect("the missing-subject event names its field");
    assert!(missing.payload.contains("bad-1"), "{missing:?}");
    assert!(letters
        .iter()
        .all(|l| l.header("tallyd.source.topic") == Some(TOPIC)
            && l.header("tallyd.source.offset")
                .is_some_and(|o| o.parse::<i64>().is_ok())));

    let metrics = metrics_text(&client, &daemon).await;
    assert!(
        metrics.contains(&format!("tallyd_kafka_messages_total {}", records.len())),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tallyd_ingest_events_total{source="kafka",outcome="duplicate"} 61"#),
        "{metrics}"
    );

    // Restart: resumes from the checkpointed offsets, counts nothing again, then new events.
    daemon.stop();
    let daemon = Daemon::start(&path);
    let more = event(
        "evt-new",
        "llm.prompt",
        "globex",
        &ago(1),
        json!({"tokens": 11, "model": "gpt"}),
    );
    produce_all(
        &producer,
        TOPIC,
        &[Record::json("globex", &more), Record::json("globex", &more)],
    );
    *expected.get_mut("globex").unwrap() += 11;
    wait_for_totals(&client, &daemon, &expected).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    wait_for_totals(&client, &daemon, &expected).await;
    assert_eq!(
        read_topic(&brokers, DLQ, 1, 4, Duration::from_secs(3)).len(),
        3,
        "no dead letter written twice"
    );
    daemon.stop();
}

/// Rated records to a Kafka topic: keyed by record id, with kind and revision headers; what the
/// topic holds (latest revision per key) is what the usage file holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rated_records_are_produced_to_the_rated_topic() {
    use common::rated::*;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("tallyd.rated", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{PLANS}\n[emit.kafka]\nbrokers = \"{brokers}\"\n");
    let (daemon, _, expected) = rate_closed_windows(dir.path(), &extra).await;
    let brokers_for_read = brokers.clone();
    let messages = tokio::task::spawn_blocking(move || {
        read_topic(&brokers_for_read, "tallyd.rated", 1, 15, Duration::from_secs(20))
    })
    .await
    .unwrap();
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::from_str(&m.payload).unwrap())
        .collect();
    assert_eq!(latest_rated(&records), expected);
    for (message, record) in messages.iter().zip(&records) {
        assert_eq!(message.header("tallyd-kind"), Some("rated"));
        assert_eq!(
            message.header("tallyd-revision"),
            Some(record["revision"].to_string().as_str())
        );
    }
    daemon.stop();
}
