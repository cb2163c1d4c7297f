//! End to end against a real Kafka-protocol broker (tansu, started on loopback by
//! `scripts/test.sh`): `kill -9` mid-consumption then restart gives exact totals; two replicas in
//! one consumer group with one stopped mid-stream (a rebalance) count every event exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::kafka::*;
use common::*;
use serde_json::json;

fn section(brokers: &str, topic: &str, group: &str) -> String {
    kafka_section(brokers, topic, group).replace(
        "[kafka.properties]",
        &format!("dlq_topic = \"{topic}.dlq\"\n[kafka.properties]"),
    )
}

async fn total(client: &reqwest::Client, daemon: &Daemon, tenants: &BTreeMap<String, i64>) -> i64 {
    let mut sum = 0;
    for tenant in tenants.keys() {
        sum += tenant_tokens(client, daemon, tenant).await;
    }
    sum
}

async fn totals(
    client: &reqwest::Client,
    daemon: &Daemon,
    tenants: &BTreeMap<String, i64>,
) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for tenant in tenants.keys() {
        out.insert(tenant.clone(), tenant_tokens(client, daemon, tenant).await);
    }
    out
}

/// Every partition was read without skipped offsets (the producer writes one record per batch).
async fn assert_no_offset_gaps(client: &reqwest::Client, daemon: &Daemon) {
    let metrics = metrics_text(client, daemon).await;
    assert!(!metrics.contains("tallyd_kafka_offset_gaps_total "), "{metrics}");
}

/// Waits until the daemon has counted something but not everything (mid-consumption).
async fn wait_mid_way(client: &reqwest::Client, daemon: &Daemon, expected: &BTreeMap<String, i64>) -> i64 {
    let all: i64 = expected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counted = total(client, daemon, expected).await;
        if counted > 0 {
            assert!(
                counted < all,
                "consumed everything before the interruption; produce more"
            );
            return counted;
        }
        assert!(Instant::now() < deadline, "nothing consumed\n{}", daemon.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_consumption_then_restart_gives_exact_totals() {
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("usage-kill");
    create_topic(&brokers, &topic, 4).await;
    let (records, expected) = usage_records(200_000, 50, 11);
    produce_all(&producer(&brokers), &topic, &records);

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &section(&brokers, &topic, &topic));
    let daemon = Daemon::start(&path);
    let client = client();
    let counted = wait_mid_way(&client, &daemon, &expected).await;
    daemon.kill();
    eprintln!(
        "killed with {counted} of {} tokens checkpointed",
        expected.values().sum::<i64>()
    );

    let daemon = Daemon::start(&path);
    wait_for_totals(&client, &daemon, &expected).await;
    // Settled: nothing more arrives after the exact total.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(totals(&client, &daemon, &expected).await, expected);
    assert_no_offset_gaps(&client, &daemon).await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_a_rebalance_mid_stream_count_each_event_once() {
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("usage-group");
    create_topic(&brokers, &topic, 4).await;
    let (records, expected) = usage_records(200_000, 50, 12);
    produce_all(&producer(&brokers), &topic, &records);

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let path_a = write_config(dir_a.path(), &section(&brokers, &topic, &topic));
    let path_b = write_config(dir_b.path(), &section(&brokers, &topic, &topic));
    let a = Daemon::start(&path_a);
    let b = Daemon::start(&path_b);
    let client = client();
    // B stops mid-stream: it checkpoints, publishes its partitions' state to the changelog,
    // commits its offsets and leaves; A restores those partitions and resumes where B ended.
    wait_mid_way(&client, &b, &expected).await;
    b.stop();

    // A alone now answers for every tenant, each event counted once (also the producer
    // retries whose first copy B counted: B's dedup keys came with the changelog).
    wait_for_totals(&client, &a, &expected).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(totals(&client, &a, &expected).await, expected);
    let metrics = metrics_text(&client, &a).await;
    assert!(
        metrics.contains(r#"tallyd_changelog_restores_total{outcome="restored"}"#),
        "A restored B's partitions: {}",
        metrics
            .lines()
            .filter(|l| l.contains("changelog"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_no_offset_gaps(&client, &a).await;
    a.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_restores_from_compacted_changelog_bases() {
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("usage-compact");
    create_topic(&brokers, &topic, 4).await;
    let compacting = section(&brokers, &topic, &topic).replace(
        "[kafka.properties]",
        "changelog_compact_bytes = 4096\n[kafka.properties]",
    );
    let dir_a = tempfile::tempdir().unwrap();
    let a = Daemon::start(&write_config(dir_a.path(), &compacting));
    let client = client();

    // Three rounds, each fully counted before the next: every partition's changelog gets
    // several flushes, and A folds them into bases as it goes.
    let producer = producer(&brokers);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for round in 0..3 {
        let (records, round_expected) = usage_records(8_000, 40, 20 + round);
        produce_all(&producer, &topic, &records);
        for (tenant, tokens) in round_expected {
            *expected.entry(tenant).or_default() += tokens;
        }
        wait_for_totals(&client, &a, &expected).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let metrics = metrics_text(&client, &a).await;
    assert!(
        metrics.contains(r#"tallyd_changelog_compactions_total{outcome="ok"}"#),
        "{}",
        a.logs()
    );
    a.stop();

    // C replaces A with an empty disk: every partition comes back from its newest base plus
    // the flushes after it, read from the base's restore point, and every total is exact.
    let dir_c = tempfile::tempdir().unwrap();
    let c = Daemon::start(&write_config(dir_c.path(), &compacting));
    wait_for_totals(&client, &c, &expected).await;
    let logs = c.logs();
    let restores: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("restored partition state from the changelog"))
        .collect();
    assert_eq!(restores.len(), 4, "{logs}");
    for line in &restores {
        assert!(line.contains("from_base=true"), "{line}");
        assert!(!line.contains("read_from=0 "), "read the whole changelog: {line}");
    }
    // Nothing was consumed again: the restored offsets were the end of the topic.
    let metrics = metrics_text(&client, &c).await;
    assert!(!metrics.contains("tallyd_kafka_messages_total "), "{metrics}");
    assert_no_offset_gaps(&client, &c).await;
    c.stop();
}

/// Rated records through the real broker, with a `kill -9` right after they are rated: the
/// restarted daemon resends what was not acknowledged, and the topic's latest revision per record
/// id equals the usage file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rated_records_reach_the_real_broker_across_a_kill() {
    use common::rated::*;
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("rated");
    create_topic(&brokers, &topic, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{PLANS}\n[emit.kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n");
    let (daemon, config, expected) = rate_closed_windows(dir.path(), &extra).await;
    daemon.kill();
    let daemon = Daemon::start(&config);
    let records = all_rated_on_topic(&brokers, &topic).await;
    assert_eq!(latest_rated(&records), expected);
    daemon.stop();
}

/// The rated records on `topic` (2 partitions) once the latest revisions of all 15 are there.
async fn all_rated_on_topic(brokers: &str, topic: &str) -> Vec<serde_json::Value> {
    let reader = (brokers.to_string(), topic.to_string());
    eventually("the topic holds every rated record", async || {
        let reader = reader.clone();
        // Every message there, not the first 15: the restart resends what the killed daemon
        // had in flight, so the topic may hold more than 15, and stopping at 15 (read from the
        // beginning each time) could miss the same record id on every attempt.
        let messages = tokio::task::spawn_blocking(move || {
            read_topic(&reader.0, &reader.1, 2, usize::MAX, Duration::from_secs(3))
        })
        .await
        .unwrap();
        let records: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::from_str(&m.payload).unwrap())
            .collect();
        (common::rated::latest_rated(&records).len() == 15).then_some(records)
    })
    .await
}

/// Single mode feeds a tenant's series from Kafka and from HTTP. A crash lands between a
/// checkpoint's changelog flush (acknowledged by the broker) and its local commit, so the
/// changelog is ahead of the store. The restart must replay that input, not restore: restoring
/// would overwrite the series with the partition's older absolute states and lose the HTTP
/// usage checkpointed since (the crash campaign lost 65 % of some tenants' usage this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_changelog_flush_replays_and_keeps_local_usage() {
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("usage-own-flush");
    create_topic(&brokers, &topic, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &section(&brokers, &topic, &topic));
    let producer = producer(&brokers);
    let client = client();
    let at = ago(30);
    let tokens = |id: &str, tenant: &str, n: i64| {
        event(id, "llm.prompt", tenant, &at, json!({"tokens": n, "model": "m"}))
    };

    // The series (tokens, acme, window, m) from the partition, then from HTTP, checkpointed.
    let daemon = Daemon::start(&config);
    produce_all(
        &producer,
        &topic,
        &[Record::json("acme", &tokens("k-1", "acme", 5))],
    );
    wait_for_totals(&client, &daemon, &BTreeMap::from([("acme".to_string(), 5)])).await;
    let (status, _) = post_batch(&client, &daemon, &[tokens("h-1", "acme", 7)]).await;
    assert_eq!(status, 202);
    daemon.stop();

    // A partition event for another tenant: its flush reaches the broker, then the crash.
    let daemon = Daemon::start_env(&config, &[], &[("TALLYD_CRASH_AT", "after-changelog-publish")]);
    produce_all(
        &producer,
        &topic,
        &[Record::json("umbrella", &tokens("k-2", "umbrella", 11))],
    );
    let status = daemon.wait_exit();
    assert!(!status.success(), "crashed at the point: {status}");

    let daemon = Daemon::start(&config);
    let expected = BTreeMap::from([("acme".to_string(), 12), ("umbrella".to_string(), 11)]);
    wait_for_totals(&client, &daemon, &expected).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(totals(&client, &daemon, &expected).await, expected);
    let metrics = metrics_text(&client, &daemon).await;
    assert!(
        metrics.contains(r#"tallyd_changelog_restores_total{outcome="own_flush"} 1"#),
        "{}",
        daemon.logs()
    );
    daemon.stop();
}

/// The broker goes away mid-consumption for longer than the group's session timeout, then
/// returns with its log intact (a partition, or a broker restart): meanwhile tallyd keeps
/// serving HTTP ingest and queries; afterwards it rejoins the group and resumes, and every
/// event is counted exactly once, none skipped, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_consumption_loses_and_doubles_nothing() {
    let Some(broker) = SwitchableBroker::start() else {
        return;
    };
    let brokers = broker.addr.clone();
    let topic = unique_topic("usage-outage");
    create_topic(&brokers, &topic, 4).await;
    let (records, expected) = usage_records(100_000, 50, 21);
    produce_all(&producer(&brokers), &topic, &records);

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &section(&brokers, &topic, &topic));
    let daemon = Daemon::start(&path);
    let client = client();
    wait_mid_way(&client, &daemon, &expected).await;
    broker.cut();
    // Out of the group by now (session.timeout.ms = 6000); HTTP is served all along.
    for second in 0..8 {
        let event = event(
            &format!("outage-{second}"),
            "llm.prompt",
            "outage-http",
            &ago(30),
            json!({"tokens": 1, "model": "m"}),
        );
        let (status, answer) = post_batch(&client, &daemon, &[event]).await;
        assert_eq!(status, 202, "HTTP ingest during the outage: {answer}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let during = total(&client, &daemon, &expected).await;
    broker.restore();

    wait_for_totals(&client, &daemon, &expected).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(totals(&client, &daemon, &expected).await, expected);
    assert_eq!(tenant_tokens(&client, &daemon, "outage-http").await, 8);
    assert!(
        during < expected.values().sum::<i64>(),
        "the outage interrupted consumption"
    );
    assert_no_offset_gaps(&client, &daemon).await;
    daemon.stop();
}

/// The rated-record output's broker is down from the start: tallyd starts anyway, rates, keeps
/// the records in its outbox (the usage file has them), and delivers every one once the broker
/// is reachable; the topic's latest revision per record equals the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rated_records_wait_out_a_kafka_output_outage() {
    use common::rated::*;
    let Some(broker) = SwitchableBroker::start() else {
        return;
    };
    let brokers = broker.addr.clone();
    let topic = unique_topic("rated-outage");
    create_topic(&brokers, &topic, 2).await;
    broker.cut();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{PLANS}\n[emit.kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n");
    let (daemon, _config, expected) = rate_closed_windows(dir.path(), &extra).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restore();
    let records = all_rated_on_topic(&brokers, &topic).await;
    assert_eq!(latest_rated(&records), expected);
    daemon.stop();
}
