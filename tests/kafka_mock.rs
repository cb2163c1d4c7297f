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

/// Rate limits on the Kafka source: a log cannot refuse what it holds, so 120 tokens against
/// 50 an hour (burst 50) are all counted, charged at their messages' times, and the tenant
/// going over is signalled on the signal topic (`acme/tokens/rate`, `exceeded`, with
/// `retry_at` when the 70 tokens of excess have drained: 70 × 72 s later). Nothing is
/// dead-lettered for a rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_usage_past_a_rate_is_counted_and_signalled() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    cluster.create_topic(DLQ, 1, 1).unwrap();
    cluster.create_topic("tallyd-rate.changelog", 1, 1).unwrap();
    cluster.create_topic("tallyd.signals", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let plans = r#"
[[plans]]
id = "paced"
currency = "USD"
[[plans.limits]]
meter = "tokens"
kind = "rate"
limit = "50"
per = "hour"
[[tenants]]
id = "acme"
plan = "paced"
"#;
    let dir = tempfile::tempdir().unwrap();
    let kafka = kafka_section(&brokers, TOPIC, "tallyd-rate").replace(
        "group_id = \"tallyd-rate\"\n",
        &format!("group_id = \"tallyd-rate\"\ndlq_topic = \"{DLQ}\"\n"),
    );
    let daemon = Daemon::start(&write_config(dir.path(), &format!("{kafka}\n{plans}")));
    let records: Vec<Record> = (0..12)
        .map(|n| {
            Record::json(
                "acme",
                &event(
                    &format!("r{n}"),
                    "llm.prompt",
                    "acme",
                    &ago(0),
                    json!({"tokens": 10, "model": "m"}),
                ),
            )
        })
        .collect();
    let produced_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    produce_all(&producer(&brokers), TOPIC, &records);
    wait_for_totals(&client(), &daemon, &BTreeMap::from([("acme".to_string(), 120)])).await;
    // However the consumer batched the 12 messages, the latest state published says when
    // the whole excess drains (a wait that grew by more than an eighth is published again).
    let excess_ms = 70 * 72_000;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (state, retry_at) = loop {
        let brokers = brokers.clone();
        let signals = tokio::task::spawn_blocking(move || {
            read_topic(&brokers, "tallyd.signals", 1, 12, Duration::from_secs(2))
        })
        .await
        .unwrap();
        let latest = signals
            .iter()
            .rev()
            .find(|message| message.key.as_deref() == Some("acme/tokens/rate"))
            .map(|message| serde_json::from_str::<serde_json::Value>(&message.payload).unwrap());
        if let Some(state) = latest {
            let retry_at = chrono::DateTime::parse_from_rfc3339(state["retry_at"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            if retry_at >= produced_at + excess_ms * 8 / 9 - 5_000 {
                break (state, retry_at);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rate state past {excess_ms} ms: {signals:?}"
        );
    };
    assert_eq!(
        (&state["kind"], &state["state"]),
        (&json!("rate"), &json!("exceeded")),
        "{state}"
    );
    assert!(
        retry_at <= produced_at + excess_ms + 60_000,
        "retry_at {retry_at}, produced at {produced_at}"
    );
    let metrics = client()
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tallyd_limit_decisions_total{kind=\"rate\",outcome=\"warned\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("tallyd_limit_decisions_total{kind=\"rate\",outcome=\"refused\"}"));
    daemon.stop();
}

/// Limits on the Kafka source: a hard quota of 100 tokens; 12 events of 10 are consumed in
/// offset order, the first 10 count and the last 2 go to the dead-letter topic with reason
/// `quota_exceeded` (a log cannot refuse what it holds, but it never counts it). Every state
/// change goes to the compacted signal topic keyed `tenant/meter/kind`: the period's first
/// state, warning at 80 %, exceeded at 100 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_quota_dead_letters_kafka_events_and_signals_its_states() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    cluster.create_topic(DLQ, 1, 1).unwrap();
    cluster.create_topic("tallyd-quota.changelog", 1, 1).unwrap();
    cluster.create_topic("tallyd.signals", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let plans = r#"
[[plans]]
id = "capped"
currency = "USD"
[[plans.limits]]
meter = "tokens"
kind = "quota"
limit = "100"
thresholds = [80, 100]
[[tenants]]
id = "acme"
plan = "capped"
"#;
    let dir = tempfile::tempdir().unwrap();
    let kafka = kafka_section(&brokers, TOPIC, "tallyd-quota").replace(
        "group_id = \"tallyd-quota\"\n",
        &format!("group_id = \"tallyd-quota\"\ndlq_topic = \"{DLQ}\"\n"),
    );
    let config = write_config(dir.path(), &format!("{kafka}\n{plans}"));
    let daemon = Daemon::start(&config);
    let producer = producer(&brokers);
    let records: Vec<Record> = (0..12)
        .map(|n| {
            Record::json(
                "acme",
                &event(
                    &format!("q{n}"),
                    "llm.prompt",
                    "acme",
                    &ago(0),
                    json!({"tokens": 10, "model": "m"}),
                ),
            )
        })
        .collect();
    // In two steps, so that the warning (80 %) and the exhaustion are two applied batches
    // whatever the consumer's fetch sizes: 90 tokens, then 30 more (10 fit, 20 are refused).
    produce_all(&producer, TOPIC, &records[..9]);
    wait_for_totals(&client(), &daemon, &BTreeMap::from([("acme".to_string(), 90)])).await;
    produce_all(&producer, TOPIC, &records[9..]);
    wait_for_totals(&client(), &daemon, &BTreeMap::from([("acme".to_string(), 100)])).await;
    let (brokers_dlq, brokers_signals) = (brokers.clone(), brokers.clone());
    let dead =
        tokio::task::spawn_blocking(move || read_topic(&brokers_dlq, DLQ, 1, 2, Duration::from_secs(20)))
            .await
            .unwrap();
    assert_eq!(dead.len(), 2);
    for letter in &dead {
        for header in ["reason", "tallyd.reason"] {
            assert_eq!(
                letter.header(header),
                Some("quota_exceeded"),
                "{:?}",
                letter.headers
            );
        }
    }
    let signals = tokio::task::spawn_blocking(move || {
        read_topic(&brokers_signals, "tallyd.signals", 1, 3, Duration::from_secs(20))
    })
    .await
    .unwrap();
    let states: Vec<(Option<String>, serde_json::Value)> = signals
        .iter()
        .map(|message| {
            (
                message.key.clone(),
                serde_json::from_str(&message.payload).unwrap(),
            )
        })
        .collect();
    assert!(states.len() >= 3, "{states:?}");
    for (key, value) in &states {
        assert_eq!(key.as_deref(), Some("acme/tokens/quota"));
        for field in [
            "tenant",
            "meter",
            "kind",
            "state",
            "used",
            "limit",
            "remaining",
            "period_start",
            "period_end",
            "resets_at",
            "at",
        ] {
            assert!(value.get(field).is_some(), "{field} in {value}");
        }
    }
    let seen: Vec<(&str, &str)> = states
        .iter()
        .map(|(_, value)| (value["state"].as_str().unwrap(), value["used"].as_str().unwrap()))
        .collect();
    let warned = seen
        .iter()
        .position(|(state, _)| *state == "warning")
        .expect("a warning");
    let exceeded = seen
        .iter()
        .position(|(state, _)| *state == "exceeded")
        .expect("exceeded");
    assert!(warned < exceeded, "{seen:?}");
    assert_eq!(states[warned].1["crossed"], json!([80]));
    assert_eq!(seen[exceeded], ("exceeded", "100"));
    assert_eq!(states[exceeded].1["remaining"], "0");
    daemon.stop();
}
