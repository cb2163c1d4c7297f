//! Cluster mode against a real Kafka-protocol broker (tansu, started by `scripts/test.sh`): two
//! replicas share a 4-partition ingest topic; clients post to either replica's HTTP edge (which
//! produces to the topic and answers after Kafka's ack); each tenant is counted once by its
//! partition's owner; queries elsewhere are redirected to the owner; when one replica leaves, the
//! other takes its partitions (changelog restore) and answers for every tenant exactly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::kafka::*;
use common::*;
use serde_json::{json, Value};

const PARTITIONS: i32 = 4;

fn cluster_config(brokers: &str, topic: &str) -> String {
    kafka_section(brokers, topic, topic).replace(
        "[kafka.properties]",
        &format!(
            "dlq_topic = \"{topic}.dlq\"\n[cluster]\nmode = \"kafka\"\nsecret = \"test-cluster-secret-0123456789abcdef\"\n[kafka.properties]\n\
             # tansu 0.6 cannot fetch from inside a record batch: one record per batch.\n\
             \"batch.num.messages\" = \"1\""
        ),
    )
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn owned_partitions(client: &reqwest::Client, daemon: &Daemon) -> Vec<i64> {
    let response = client
        .get(daemon.url("/api/v1/meters/tokens/query"))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["cluster"]["ownedPartitions"]
        .as_array()
        .map(|owned| owned.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

/// Waits until the replicas' owned partitions are disjoint, non-empty and cover the topic.
async fn wait_for_split(client: &reqwest::Client, replicas: &[&Daemon]) -> Vec<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = Vec::new();
        for daemon in replicas {
            owned.push(owned_partitions(client, daemon).await);
        }
        let all: BTreeSet<i64> = owned.iter().flatten().copied().collect();
        let total: usize = owned.iter().map(Vec::len).sum();
        if all.len() == PARTITIONS as usize && total == all.len() && owned.iter().all(|o| !o.is_empty()) {
            return owned;
        }
        assert!(Instant::now() < deadline, "partitions never split: {owned:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (60 s) until `daemon` owns every partition.
async fn wait_to_own_all(client: &reqwest::Client, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while owned_partitions(client, daemon).await.len() != PARTITIONS as usize {
        assert!(
            Instant::now() < deadline,
            "never took all partitions\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh `PARTITIONS`-partition topic and two replicas on it, once they split the
/// partitions: (topic, their data directories, a, b, each one's partitions).
async fn two_replicas(
    brokers: &str,
    prefix: &str,
) -> (String, [tempfile::TempDir; 2], Daemon, Daemon, Vec<Vec<i64>>) {
    let topic = unique_topic(prefix);
    create_topic(brokers, &topic, PARTITIONS).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = Daemon::start(&write_config(dirs[0].path(), &cluster_config(brokers, &topic)));
    let b = Daemon::start(&write_config(dirs[1].path(), &cluster_config(brokers, &topic)));
    let split = wait_for_split(&client(), &[&a, &b]).await;
    eprintln!("owned partitions: a={:?} b={:?}", split[0], split[1]);
    (topic, dirs, a, b, split)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_forward_count_once_and_route_queries_to_the_owner() {
    let Some(brokers) = real_broker() else { return };
    let (_topic, _dirs, a, b, split) = two_replicas(&brokers, "usage-cluster").await;
    let client = client();

    // Tenants on every partition (the same murmur2 rule a Kafka producer uses).
    let tenants: Vec<String> = (0..24).map(|i| format!("acme-{i}")).collect();
    let covered: BTreeSet<i32> = tenants
        .iter()
        .map(|t| tallyd::cluster::partition_for(t, PARTITIONS))
        .collect();
    assert_eq!(covered.len(), PARTITIONS as usize);

    // Post through both edges; every batch is sent twice (a client retry) and some events
    // appear in two batches: the owner's dedup counts each once.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut events = Vec::new();
    for i in 0..600 {
        let tenant = &tenants[i % tenants.len()];
        let tokens = (i as i64 * 7919) % 1000 + 1;
        *expected.entry(tenant.clone()).or_default() += tokens;
        events.push(event(
            &format!("c{i}"),
            "llm.prompt",
            tenant,
            &ago((i % 90) as i64),
            json!({"tokens": tokens, "model": "m1"}),
        ));
    }
    for (n, batch) in events.chunks(50).enumerate() {
        let edge = if n % 2 == 0 { &a } else { &b };
        for _attempt in 0..2 {
            let (status, body) = post_batch(&client, edge, batch).await;
            assert_eq!(status, 202, "{body}");
            assert_eq!(body["forwarded"], 50, "{body}");
            assert_eq!(body["accepted"], 50, "{body}");
        }
        // Overlapping batch: the first ten events again, through the other edge.
        let other = if n % 2 == 0 { &b } else { &a };
        let (status, _) = post_batch(&client, other, &batch[..10]).await;
        assert_eq!(status, 202);
    }
    // An invalid batch is refused at the edge with the field named, and nothing is produced.
    let bad = vec![event("bad-1", "llm.prompt", "", &ago(1), json!({"tokens": 5}))];
    let (status, body) = post_batch(&client, &a, &bad).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("subject"),
        "{body}"
    );

    // Redirect-following clients get exact totals from either replica.
    wait_for_totals(&client, &a, &expected).await;
    wait_for_totals(&client, &b, &expected).await;

    // Without following: the owner answers, the other replica names it.
    let raw = no_redirects();
    let (mut local, mut redirected) = (0, 0);
    for tenant in &tenants {
        let response = raw
            .get(a.url(&format!("/api/v1/meters/tokens/query?subject={tenant}")))
            .send()
            .await
            .unwrap();
        let partition = i64::from(tallyd::cluster::partition_for(tenant, PARTITIONS));
        match response.status().as_u16() {
            200 => {
                assert!(split[0].contains(&partition), "{tenant} answered by a non-owner");
                let body: Value = response.json().await.unwrap();
                assert_eq!(sum_rows(&body), expected[tenant]);
                local += 1;
            }
            307 => {
                assert!(
                    split[1].contains(&partition),
                    "{tenant} redirected away from its owner"
                );
                let location = response.headers()["location"].to_str().unwrap().to_string();
                assert!(
                    location.starts_with(&b.url("/api/v1/meters/tokens/query")),
                    "{location}"
                );
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["owners"][0]["partition"], partition, "{body}");
                redirected += 1;
            }
            other => panic!("{tenant}: unexpected status {other}"),
        }
    }
    assert!(
        local > 0 && redirected > 0,
        "local {local}, redirected {redirected}"
    );

    // Subject-less queries: each replica lists only its tenants; together, everything once.
    let mut seen = BTreeMap::new();
    for daemon in [&a, &b] {
        let body = query(&client, daemon, "tokens", "").await;
        for row in body["data"].as_array().unwrap() {
            let subject = row["subject"].as_str().unwrap().to_string();
            let value = row["value"].to_string().parse::<i64>().unwrap();
            assert!(
                seen.insert(subject, value).is_none(),
                "a tenant listed by both replicas"
            );
        }
    }
    assert_eq!(seen, expected);

    // b leaves: a takes every partition over (changelog restore) and answers for all tenants.
    b.stop();
    wait_to_own_all(&client, &a).await;
    let all = query(&no_redirects(), &a, "tokens", "").await;
    assert_eq!(sum_rows(&all), expected.values().sum::<i64>());
    for tenant in &tenants {
        let body = query(&raw, &a, "tokens", &format!("subject={tenant}")).await;
        assert_eq!(sum_rows(&body), expected[tenant], "{tenant}");
    }
    let metrics = metrics_text(&client, &a).await;
    assert!(
        metrics.contains("tallyd_cluster_forwarded_events_total"),
        "{metrics}"
    );
    a.stop();
}

const OTLP_METER: &str = r#"
[[meters]]
slug = "requests"
source = "otlp_metric"
metric_name = "http.server.requests"
aggregation = "SUM"
group_by = { route = "http.route" }
"#;

/// One OTLP/HTTP protobuf export of one `http.server.requests` sum point for `tenant`.
fn otlp_sum(tenant: &str, value: i64, start_ns: u64, time_ns: u64, cumulative: bool) -> Vec<u8> {
    use common::otlp::{int, point, sum_resource};
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
    let temporality = if cumulative {
        AggregationTemporality::Cumulative
    } else {
        AggregationTemporality::Delta
    };
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some(tenant),
            temporality,
            vec![point("/checkout", start_ns, time_ns, int(value))],
        )],
    };
    prost::Message::encode_to_vec(&request)
}

/// Posts an encoded export to `edge`'s OTLP/HTTP as JSON; the 200's body.
async fn export_json(client: &reqwest::Client, edge: &Daemon, body: &[u8]) -> Value {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    let request = <ExportMetricsServiceRequest as prost::Message>::decode(body).unwrap();
    let response = client
        .post(format!("http://{}/v1/metrics", edge.otlp_http.as_ref().unwrap()))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&request).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// OTLP in cluster mode: an edge maps the export and produces its points to the ingest topic;
/// each tenant's owner counts them, a retried export counts once, and cumulative points (whose
/// stream state is not replicated) are refused in partial success with the fix named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exports_are_forwarded_to_each_tenants_owner() {
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("otlp-cluster");
    create_topic(&brokers, &topic, PARTITIONS).await;
    let extra = format!("{}\n{OTLP_METER}", cluster_config(&brokers, &topic));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = Daemon::start(&write_config(dirs[0].path(), &extra));
    let b = Daemon::start(&write_config(dirs[1].path(), &extra));
    let client = client();
    wait_for_split(&client, &[&a, &b]).await;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let tenants: Vec<String> = (0..12).map(|i| format!("otel-{i}")).collect();
    let mut expected = BTreeMap::new();
    for (i, tenant) in tenants.iter().enumerate() {
        let value = i as i64 * 10 + 1;
        expected.insert(tenant.clone(), value);
        let body = otlp_sum(tenant, value, now_ns - 60_000_000_000, now_ns - i as u64, false);
        // Through either edge, and every export twice (an exporter retry).
        for edge in [&a, &b] {
            let url = format!("http://{}/v1/metrics", edge.otlp_http.as_ref().unwrap());
            let response = client
                .post(url)
                .header("content-type", "application/x-protobuf")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
    }
    let cumulative = otlp_sum("otel-0", 5, now_ns - 60_000_000_000, now_ns, true);
    let reply = export_json(&client, &a, &cumulative).await;
    assert_eq!(reply["partialSuccess"]["rejectedDataPoints"], 1, "{reply}");
    assert!(
        reply["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("cumulativetodelta"),
        "{reply}"
    );

    // Each tenant counted once, by its owner, whichever edge the client asks.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = BTreeMap::new();
        for tenant in &tenants {
            let body = query(&client, &b, "requests", &format!("subject={tenant}")).await;
            got.insert(tenant.clone(), sum_rows(&body));
        }
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "totals {got:?} never reached {expected:?}\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.stop();
    b.stop();
}

/// A producer that breaks the partitioning contract (here: explicit partitions; in the field,
/// librdkafka's CRC32 default or null keys) puts one tenant on two partitions. The replica
/// learns where each tenant's usage is from the data and names the conflict: a metric and a
/// warning with the tenant and both partitions. A tenant on one partition is no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_on_two_partitions_is_detected_and_named() {
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("usage-split");
    create_topic(&brokers, &topic, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), &cluster_config(&brokers, &topic)));
    let client = client();
    // Until the group assigned the partitions, their tenants' queries answer 503 (retry).
    wait_to_own_all(&client, &daemon).await;
    let home = tallyd::cluster::partition_for("split-co", PARTITIONS);
    let stray = (home + 1) % PARTITIONS;
    let record = |id: &str, tenant: &str, partition: i32| Record {
        partition: Some(partition),
        ..Record::json(
            tenant,
            &event(
                id,
                "llm.prompt",
                tenant,
                &ago(5),
                json!({"tokens": 3, "model": "m"}),
            ),
        )
    };
    let producer = producer(&brokers);
    let steady = tallyd::cluster::partition_for("steady-co", PARTITIONS);
    produce_all(
        &producer,
        &topic,
        &[
            record("s1", "split-co", home),
            record("t1", "steady-co", steady),
            record("t2", "steady-co", steady),
        ],
    );
    let conflicts = |text: &str| -> Option<f64> {
        text.lines()
            .find(|line| line.starts_with("tallyd_cluster_tenant_partition_conflicts_total"))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    };
    eventually("the first events counted", async || {
        (tenant_tokens(&client, &daemon, "steady-co").await == 6).then_some(())
    })
    .await;
    assert_eq!(
        conflicts(&metrics_text(&client, &daemon).await).unwrap_or(0.0),
        0.0
    );
    produce_all(&producer, &topic, &[record("s2", "split-co", stray)]);
    eventually("the conflict counted", async || {
        (conflicts(&metrics_text(&client, &daemon).await) == Some(1.0)).then_some(())
    })
    .await;
    let logs = daemon.logs();
    let warning = logs
        .lines()
        .find(|line| line.contains("more than one partition"))
        .unwrap_or_else(|| panic!("no warning in:\n{logs}"));
    assert!(warning.contains("split-co"), "{warning}");
    assert!(
        warning.contains(&format!("kafka/{topic}/{home}"))
            && warning.contains(&format!("kafka/{topic}/{stray}")),
        "{warning}"
    );
    daemon.stop();
}

/// librdkafka's default partitioner (`consistent_random`): CRC-32 (IEEE) of the key, mod the
/// partition count; a null key goes to a random partition.
fn crc32_partition(key: &str, partitions: i32) -> i32 {
    let mut crc = !0u32;
    for byte in key.bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    ((!crc) % partitions as u32) as i32
}

/// The status and body of a query that follows no redirect.
async fn raw_query(client: &reqwest::Client, daemon: &Daemon, tenant: &str) -> (u16, Value) {
    let response = client
        .get(daemon.url(&format!("/api/v1/meters/tokens/query?subject={tenant}")))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Issue 26: producers on librdkafka's default partitioner (CRC-32, what confluent-kafka for
/// Python, Go and .NET use) put tenants on other partitions than murmur2 would. Queries go
/// where each tenant's usage was counted, learned from the data, so both replicas answer
/// every total exactly, also after one is SIGKILLed (the other takes over) and rejoins. A
/// tenant produced with null keys lands on every partition: no replica answers it, also once
/// one owns every partition (409 `tenant_split`, naming partitions and owners; left out of
/// subject-less listings, named in `splitSubjects`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_follow_the_data_whatever_partitioner_producers_use() {
    follow_the_data("consistent_random").await;
}

/// The same with producers on `murmur2_random` (the Java client's rule, which tallyd's own
/// edges use too): the same takeover and rejoin, every total exact through either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_follow_the_data_of_murmur2_producers_through_a_takeover_and_a_rejoin() {
    follow_the_data("murmur2_random").await;
}

/// Keyed usage from a librdkafka producer on `partitioner`, null-key usage of one tenant, a
/// SIGKILL takeover and a rejoin; totals through both replicas.
async fn follow_the_data(partitioner: &str) {
    let Some(brokers) = real_broker() else { return };
    let (topic, dirs, a, b, split) = two_replicas(&brokers, &format!("usage-{partitioner}")).await;
    let client = client();
    let raw = no_redirects();

    let tenants: Vec<String> = (0..16).map(|i| format!("crc-{i}")).collect();
    let placed = |tenant: &str| match partitioner {
        "murmur2_random" => tallyd::cluster::partition_for(tenant, PARTITIONS),
        _ => crc32_partition(tenant, PARTITIONS),
    };
    if partitioner == "consistent_random" {
        let moved = tenants
            .iter()
            .filter(|t| placed(t) != tallyd::cluster::partition_for(t, PARTITIONS))
            .count();
        assert!(
            moved >= 8,
            "only {moved} tenants land elsewhere than murmur2 would put them"
        );
    }
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut records = Vec::new();
    for i in 0..320 {
        let tenant = &tenants[i % tenants.len()];
        let tokens = (i as i64 * 31) % 97 + 1;
        *expected.entry(tenant.clone()).or_default() += tokens;
        let event = event(
            &format!("k{i}"),
            "llm.prompt",
            tenant,
            &ago((i % 60) as i64),
            json!({"tokens": tokens, "model": "m"}),
        );
        // Keyed by subject, partitioned by `partitioner`.
        records.push(Record::json(tenant, &event));
    }
    // Null keys go to a random partition per message (librdkafka's sticky partitioning would
    // otherwise keep each 10 ms of them on one partition).
    let null_key: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .set("sticky.partitioning.linger.ms", "0")
        .create()
        .unwrap();
    let mut null_records = Vec::new();
    for i in 0..40 {
        null_records.push(Record {
            null_key: true,
            ..Record::json(
                "",
                &event(
                    &format!("n{i}"),
                    "llm.prompt",
                    "nullkey-co",
                    &ago(3),
                    json!({"tokens": 2, "model": "m"}),
                ),
            )
        });
    }
    produce_all(
        &producer_with_partitioner(&brokers, partitioner),
        &topic,
        &records,
    );
    produce_all(&null_key, &topic, &null_records);

    wait_for_totals(&client, &a, &expected).await;
    wait_for_totals(&client, &b, &expected).await;
    // Without following redirects: the owner of the tenant's partition answers, the other
    // replica names it and that partition.
    for tenant in &tenants {
        let partition = i64::from(placed(tenant));
        let (status, body) = raw_query(&raw, &a, tenant).await;
        if split[0].contains(&partition) {
            assert_eq!(
                (status, sum_rows(&body)),
                (200, expected[tenant]),
                "{tenant}: {body}"
            );
        } else {
            assert_eq!(status, 307, "{tenant}: {body}");
            // a learns the partitions of b's tenants through the members topic (within a
            // flush interval); until then it names the murmur2 partition, which for a CRC-32
            // producer may be another of b's.
            eventually("a names the partition b counted the tenant on", async || {
                let (status, body) = raw_query(&raw, &a, tenant).await;
                assert_eq!(status, 307, "{tenant}: {body}");
                (body["owners"][0]["partitions"] == json!([partition])).then_some(())
            })
            .await;
        }
    }
    // The null-key tenant: on partitions of both replicas, answered by neither. a refuses it as
    // soon as it knows two of its partitions; the 409 names both replicas once a has learned
    // b's pairs through the members topic.
    let both = BTreeSet::from([a.url(""), b.url("")].map(|u| u.trim_end_matches('/').to_string()));
    let body = eventually("the null-key tenant is known split across both", async || {
        let (status, body) = raw_query(&raw, &a, "nullkey-co").await;
        let owners: BTreeSet<String> = body["subjects"][0]["partitions"]
            .as_array()?
            .iter()
            .filter_map(|part| Some(part["owner"].as_str()?.to_string()))
            .collect();
        (status == 409 && owners == both).then_some(body)
    })
    .await;
    assert_eq!(body["error"], "tenant_split", "{body}");
    // b learns a's pairs through the members topic (within a flush interval or so).
    eventually("b knows the null-key tenant is split", async || {
        (raw_query(&raw, &b, "nullkey-co").await.0 == 409).then_some(())
    })
    .await;
    for daemon in [&a, &b] {
        let listing = query(&raw, daemon, "tokens", "").await;
        assert!(
            listing["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|row| row["subject"] != "nullkey-co"),
            "{listing}"
        );
        assert_eq!(
            listing["cluster"]["splitSubjects"],
            json!(["nullkey-co"]),
            "{listing}"
        );
    }

    // b is SIGKILLed while usage keeps arriving: a takes every partition over (the broker
    // rebalances when b's session expires, or a's orphan watch rejoins the group because
    // messages wait on partitions nobody consumes) and answers every tenant whole.
    b.kill();
    let more: Vec<Record> = tenants
        .iter()
        .enumerate()
        .map(|(i, tenant)| {
            *expected.get_mut(tenant).unwrap() += 5;
            let event = event(
                &format!("after-kill-{i}"),
                "llm.prompt",
                tenant,
                &ago(2),
                json!({"tokens": 5, "model": "m"}),
            );
            Record::json(tenant, &event)
        })
        .collect();
    produce_all(&producer_with_partitioner(&brokers, partitioner), &topic, &more);
    wait_to_own_all(&client, &a).await;
    wait_for_totals(&raw, &a, &expected).await;
    // The null-key tenant stays unanswered although a owns every partition now: restoring b's
    // partitions overwrote the series a held for it with b's part (absolute states per series
    // assume one partition feeds a series), so a's total for it is not whole either.
    let (status, body) = raw_query(&raw, &a, "nullkey-co").await;
    assert_eq!((status, &body["error"]), (409, &json!("tenant_split")), "{body}");

    // b rejoins: the partitions split again, and every keyed tenant is exact through either.
    let b = Daemon::start(&write_config(dirs[1].path(), &cluster_config(&brokers, &topic)));
    wait_for_split(&client, &[&a, &b]).await;
    // a learns b's new claims through the members topic: until then it may still point at
    // b's old address (a dead replica's last claim), so wait for its redirects to move.
    eventually("a redirects to the rejoined b", async || {
        for tenant in &tenants {
            let response = raw
                .get(a.url(&format!("/api/v1/meters/tokens/query?subject={tenant}")))
                .send()
                .await
                .ok()?;
            let location = response.headers().get("location").and_then(|l| l.to_str().ok());
            if response.status() != 200 && !location.is_some_and(|l| l.starts_with(&b.url(""))) {
                return None;
            }
        }
        Some(())
    })
    .await;
    wait_for_totals(&client, &a, &expected).await;
    wait_for_totals(&client, &b, &expected).await;
    a.stop();
    b.stop();
}

/// Cluster mode with API keys: the edge refuses (and dead-letters) a tenant key's event for
/// another subject itself, since the owner, reading the topic, cannot tell who sent it; the
/// key's own events are forwarded and counted by the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_cannot_forward_another_tenants_usage() {
    use sha2::Digest;
    let Some(brokers) = real_broker() else { return };
    let topic = unique_topic("usage-keys");
    create_topic(&brokers, &topic, PARTITIONS).await;
    let digest = |key: &str| -> String {
        sha2::Sha256::digest(key.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    };
    const ACME: &str = "cluster-acme-key-771";
    const OPS: &str = "cluster-ops-key-772";
    let keys = format!(
        "[[auth.keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\nscopes = [\"ingest\", \"read\"]\n\
         [[auth.keys]]\nsha256 = \"{}\"\ntenant = \"*\"\nscopes = [\"read\"]\n",
        digest(ACME),
        digest(OPS)
    );
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(
        dir.path(),
        &format!("{}\n{keys}", cluster_config(&brokers, &topic)),
    ));
    let client = client();
    let get = |key: &'static str, path: String| {
        let request = client.get(daemon.url(&path)).header("x-api-key", key);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    eventually("the replica owns every partition", async || {
        let (_, body) = get(OPS, "/api/v1/meters/tokens/query".into()).await;
        (body["cluster"]["ownedPartitions"].as_array()?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    let events = [
        event(
            "k1",
            "llm.prompt",
            "acme",
            &ago(5),
            json!({"tokens": 10, "model": "m"}),
        ),
        event(
            "k2",
            "llm.prompt",
            "globex",
            &ago(5),
            json!({"tokens": 1000, "model": "m"}),
        ),
    ];
    let response = client
        .post(daemon.url("/api/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .bearer_auth(ACME)
        .body(serde_json::to_vec(&events).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["forwarded"], 1, "{body}");
    assert_eq!(body["refused"][0]["reason"], "wrong_tenant", "{body}");
    eventually("acme's event counted by the owner", async || {
        let (status, body) = get(ACME, "/api/v1/meters/tokens/query".into()).await;
        (status == 200 && sum_rows(&body) == 10).then_some(())
    })
    .await;
    let (status, body) = get(OPS, "/api/v1/meters/tokens/query?subject=globex".into()).await;
    assert_eq!((status, sum_rows(&body)), (200, 0), "{body}");
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    assert!(
        dead.iter().any(|line| line["reason"] == "wrong_tenant"),
        "{dead:?}"
    );
    daemon.stop();
}

/// Cluster mode, limits: a tenant's hard quota is decided by its partition's owner (its Kafka
/// folder refuses what would go over) and published on the signal topic, which every replica
/// follows; once the owner has found the quota exhausted, an edge refuses the tenant's next
/// events itself (`quota_exceeded` in the 202's `refused`, dead-lettered, not forwarded), and
/// the owner's total stays exactly at the limit. The same for OTLP points (partial success);
/// and Envoy RLS hits of an envoy meter, taken at either replica, are counted by the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_refuse_what_an_owner_published_as_over_quota() {
    let Some(brokers) = real_broker() else { return };
    let plans = "[[plans]]\nid = \"capped\"\ncurrency = \"USD\"\n\
         [[plans.limits]]\nmeter = \"tokens\"\nkind = \"quota\"\nlimit = \"100\"\n\
         [[plans.limits]]\nmeter = \"requests\"\nkind = \"quota\"\nlimit = \"100\"\n\
         [[tenants]]\nid = \"acme\"\nplan = \"capped\"\n";
    let (_dirs, a, b, _) = limited_replicas(&brokers, "usage-limits", plans).await;
    let client = client();
    let tokens = acme_tokens;
    // An Envoy RLQS stream at each replica reports acme's `tokens` bucket: allowed for now.
    let mut streams = Vec::new();
    for edge in [&a, &b] {
        streams.push(rlqs_stream(edge, "acme", "tokens").await);
    }
    for (_, answers) in &mut streams {
        let first = answers.message().await.unwrap().expect("an assignment");
        assert_eq!(blanket_rule(&first), Some(BlanketRule::AllowAll), "{first:?}");
    }
    // The quota filled through one edge.
    let fill: Vec<Value> = (0..10).map(|i| tokens(format!("fill-{i}"), 10)).collect();
    let (status, body) = post_batch(&client, &a, &fill).await;
    assert_eq!((status, &body["forwarded"]), (202, &json!(10)), "{body}");
    wait_for_total(&client, &a, "tokens", 100).await;
    // More through either edge: forwarded (and refused by the owner) until the owner's
    // `exceeded` reaches the edges, then refused at the edge.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused_at_edge = None;
    for attempt in 0.. {
        let edge = if attempt % 2 == 0 { &a } else { &b };
        let (status, body) = post_batch(&client, edge, &[tokens(format!("more-{attempt}"), 5)]).await;
        assert_eq!(status, 202, "{body}");
        if body["forwarded"] == 0 {
            refused_at_edge = Some((body, attempt % 2));
            break;
        }
        assert!(Instant::now() < deadline, "no edge ever refused: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (body, refusing) = refused_at_edge.unwrap();
    assert_eq!(body["refused"][0]["reason"], "quota_exceeded", "{body}");
    assert!(
        body["refused"][0]["message"]
            .as_str()
            .unwrap()
            .contains("used up its quota of `tokens`"),
        "{body}"
    );
    assert_eq!(body["accepted"], 0, "{body}");
    // Both RLQS streams were pushed DENY_ALL without another report: the owner's from its own
    // gate, the other replica's as the owner's `exceeded` reached it.
    for (_, answers) in &mut streams {
        let denied = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let pushed = answers.message().await.unwrap().expect("a pushed assignment");
                if blanket_rule(&pushed) == Some(BlanketRule::DenyAll) {
                    return pushed;
                }
            }
        })
        .await
        .expect("DENY_ALL pushed to every replica's stream");
        assert_eq!(denied.bucket_action.len(), 1, "{denied:?}");
    }
    drop(streams);
    // The owner's decisions stayed exact: nothing past the limit was counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(total_of(&client, &b, "tokens").await, 100);

    // A client that hangs up while its batch is being forwarded (300 tenants: 300 messages to
    // produce; the connection closed 5 ms after the body) still has the event the edge refused
    // itself dead-lettered there: the forward runs to its end without the client.
    let (edge, data) = [(&a, _dirs[0].path()), (&b, _dirs[1].path())][refusing];
    let mut batch: Vec<Value> = (0..300)
        .map(|i| {
            event(
                &format!("hung-{i}"),
                "llm.prompt",
                &format!("hung-{i}"),
                &ago(1),
                json!({"tokens": 1, "model": "m1"}),
            )
        })
        .collect();
    batch.push(tokens("hung-refused".into(), 5));
    hang_up_after_posting(edge, &serde_json::to_vec(&batch).unwrap());
    eventually(
        "the hung-up batch's refusal dead-lettered at the edge",
        async || {
            let dead = read_jsonl(&data.join("data/dead-letter.jsonl"));
            dead.iter()
                .any(|line| line["reason"] == "quota_exceeded" && line.to_string().contains("hung-refused"))
                .then_some(())
        },
    )
    .await;

    // OTLP the same way: the quota of `requests` filled, then an edge rejects the next
    // points in partial success (no RetryInfo), naming the quota.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let body = |value: i64, offset_ns: u64| {
        otlp_sum("acme", value, now_ns - 60_000_000_000, now_ns - offset_ns, false)
    };
    export_json(&client, &a, &body(100, 1_000_000)).await;
    wait_for_total(&client, &b, "requests", 100).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 0u64.. {
        let edge = if attempt % 2 == 0 { &b } else { &a };
        let reply = export_json(&client, edge, &body(5, 2_000_000 + attempt)).await;
        if reply["partialSuccess"]["rejectedDataPoints"] == 1 {
            let message = reply["partialSuccess"]["errorMessage"].as_str().unwrap();
            assert!(message.contains("used up its quota of `requests`"), "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "no edge ever rejected: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(total_of(&client, &b, "requests").await, 100);

    // Envoy meters: RLS hits through either replica's limits listener are forwarded to the
    // tenant's owner and counted there, once each (3 + 3 single hits, one call of 4).
    use tallyd_envoy::*;
    for (edge, calls) in [(&a, vec![0u32, 0, 0, 4]), (&b, vec![0, 0, 0])] {
        let url = format!("http://{}", edge.limits_grpc.as_ref().unwrap());
        let mut rls = RateLimitServiceClient::connect(url).await.unwrap();
        for hits in calls {
            let entry = |key: &str, value: &str| Entry {
                key: key.into(),
                value: value.into(),
            };
            let request = RateLimitRequest {
                domain: "tallyd".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![entry("tenant", "acme"), entry("meter", "gateway_requests")],
                    ..Default::default()
                }],
                hits_addend: hits,
            };
            let response = rls.should_rate_limit(request).await.unwrap().into_inner();
            assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
        }
    }
    wait_for_total(&client, &a, "gateway_requests", 10).await;
    a.stop();
    b.stop();
}

/// Cluster mode, rate limits: edges forward without deciding; the tenant's owner charges
/// every forwarded unit to the tenant's rate keys as its log received it (nothing in the log
/// can be refused) and publishes `exceeded` with when the excess drains (`retry_at`); every
/// edge then refuses the tenant whole until then — HTTP 429 with `Retry-After` and the
/// RateLimit headers, OTLP/gRPC RESOURCE_EXHAUSTED with RetryInfo, RLS OVER_LIMIT — as a
/// single replica would. Everything forwarded before is counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_refuse_a_tenant_its_owner_charged_past_its_rate() {
    let Some(brokers) = real_broker() else { return };
    let plans = "[[plans]]\nid = \"paced\"\ncurrency = \"USD\"\n\
         [[plans.limits]]\nmeter = \"tokens\"\nkind = \"rate\"\nlimit = \"100\"\nper = \"minute\"\n\
         [[plans.limits]]\nmeter = \"requests\"\nkind = \"rate\"\nlimit = \"100\"\nper = \"minute\"\n\
         [[plans.limits]]\nmeter = \"gateway_requests\"\nkind = \"rate\"\nlimit = \"5\"\nper = \"minute\"\n\
         [[tenants]]\nid = \"acme\"\nplan = \"paced\"\n\
         [[tenants]]\nid = \"initech\"\nplan = \"paced\"\n";
    let (_dirs, a, b, topic) = limited_replicas(&brokers, "usage-rates", plans).await;
    let client = client();
    let tokens = acme_tokens;
    // 300 tokens at once against 100 a minute (burst 100): forwarded and counted whole (the
    // edge does not decide; the owner cannot refuse its log), 2 minutes' worth over.
    let burst: Vec<Value> = (0..30).map(|i| tokens(format!("burst-{i}"), 10)).collect();
    let (status, body) = post_batch(&client, &a, &burst).await;
    assert_eq!((status, &body["forwarded"]), (202, &json!(30)), "{body}");
    let mut expected = 300;
    // Until the owner's `exceeded` reaches the edges, more is forwarded (and counted); then
    // both edges answer 429.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut limited = None;
    for attempt in 0.. {
        let edge = if attempt % 2 == 0 { &b } else { &a };
        let response = client
            .post(edge.url("/api/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&[tokens(format!("more-{attempt}"), 1)]).unwrap())
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), 202);
        expected += 1;
        assert!(Instant::now() < deadline, "no edge ever answered 429");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limited = limited.unwrap();
    let header = |name: &str| {
        limited
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    // Retry-After names what is left of the excess the owner had published by then (it may
    // not have charged the whole burst yet: below).
    let retry_after: u64 = header("retry-after").parse().unwrap();
    assert!((1..=121).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header("ratelimit-policy"), "\"tokens\";q=100;w=60");
    assert!(
        header("ratelimit").starts_with("\"tokens\";r=0;t="),
        "{}",
        header("ratelimit")
    );
    let body: Value = limited.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("over its rate limit"),
        "{body}"
    );
    // The other edge refuses too (both follow the signal topic).
    let mut probes = 0;
    eventually("both edges refuse", async || {
        let mut all = true;
        for edge in [&a, &b] {
            probes += 1;
            let (status, _) = post_batch(&client, edge, &[tokens(format!("probe-{probes}"), 1)]).await;
            if status == 202 {
                expected += 1;
            }
            all &= status == 429;
        }
        all.then_some(())
    })
    .await;
    // The owner publishes again as the excess grows (the rest of the burst): every edge ends
    // up holding the whole of it, ≈ 2 minutes after the burst less the burst's minute.
    eventually("both edges hold the whole excess", async || {
        for edge in [&a, &b] {
            probes += 1;
            let (status, wait) = {
                let response = client
                    .post(edge.url("/api/v1/events"))
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(serde_json::to_vec(&[tokens(format!("probe-{probes}"), 1)]).unwrap())
                    .send()
                    .await
                    .ok()?;
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
                (response.status(), wait)
            };
            if status == 202 {
                expected += 1;
            }
            if !wait.is_some_and(|wait| (60..=121).contains(&wait)) {
                return None;
            }
        }
        Some(())
    })
    .await;
    wait_for_total(&client, &a, "tokens", expected).await;
    // `Check` answers from the billed totals: the owner answers (over its rate), the other
    // replica names the owner instead of answering from its own partial count.
    use tallyd::ingest::limits::proto::{quota_client::QuotaClient, CheckRequest};
    let mut answered = Vec::new();
    for edge in [&a, &b] {
        let url = format!("http://{}", edge.limits_grpc.as_ref().unwrap());
        let check = CheckRequest {
            tenant: "acme".into(),
            meter: "tokens".into(),
            units: "1".into(),
        };
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        match QuotaClient::new(channel).check(check).await {
            Ok(response) => {
                let response = response.into_inner();
                assert!(!response.allowed, "{response:?}");
                assert!(response.retry_after_seconds > 0.0, "{response:?}");
                answered.push(edge.url(""));
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                assert!(status.message().contains("is counted by http://"), "{status:?}");
            }
        }
    }
    assert_eq!(answered.len(), 1, "exactly the owner answers");

    // OTLP/gRPC the same way: 300 requests in one point, then an edge refuses the tenant's
    // next export whole with RESOURCE_EXHAUSTED and the wait in RetryInfo.
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use tonic_types::StatusExt;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let export = |value: i64, offset_ns: u64| {
        <ExportMetricsServiceRequest as prost::Message>::decode(
            &otlp_sum("acme", value, now_ns - 60_000_000_000, now_ns - offset_ns, false)[..],
        )
        .unwrap()
    };
    let mut clients = Vec::new();
    for edge in [&a, &b] {
        let url = format!("http://{}", edge.otlp_grpc.as_ref().unwrap());
        clients.push(MetricsServiceClient::connect(url).await.unwrap());
    }
    clients[0].export(export(300, 1_000_000)).await.unwrap();
    let mut requests = 300;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let i = requests as usize % 2;
        match clients[i].export(export(1, 2_000_000 + requests as u64)).await {
            Ok(_) => requests += 1,
            Err(status) => break status,
        }
        assert!(Instant::now() < deadline, "no edge ever refused the export");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("over its rate limit"), "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    let delay = retry.retry_delay.unwrap();
    assert!(
        delay >= Duration::from_secs(60) && delay <= Duration::from_secs(121),
        "{delay:?}"
    );
    wait_for_total(&client, &b, "requests", requests).await;

    // Envoy: hits of an envoy meter asked at either replica are allowed by what the owner has
    // published, counted by the owner, and charged there; past 5 a minute the owner's
    // `exceeded` makes both limits listeners answer OVER_LIMIT.
    use tallyd_envoy::*;
    let mut rls = Vec::new();
    for edge in [&a, &b] {
        let url = format!("http://{}", edge.limits_grpc.as_ref().unwrap());
        rls.push(RateLimitServiceClient::connect(url).await.unwrap());
    }
    let ask = |hits: u32| RateLimitRequest {
        domain: "tallyd".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "tenant".into(),
                    value: "acme".into(),
                },
                Entry {
                    key: "meter".into(),
                    value: "gateway_requests".into(),
                },
            ],
            ..Default::default()
        }],
        hits_addend: hits,
    };
    let mut hits = 0;
    // 4 at one, 1 at the other: the burst (5), exactly; the next hit is over.
    for (i, addend) in [4u32, 1].into_iter().enumerate() {
        let response = rls[i].should_rate_limit(ask(addend)).await.unwrap().into_inner();
        assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
        hits += i64::from(addend);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut over = [false, false];
    for attempt in 0usize.. {
        let i = attempt % 2;
        let response = rls[i].should_rate_limit(ask(1)).await.unwrap().into_inner();
        if response.overall_code == Code::OverLimit as i32 {
            over[i] = true;
            if over == [true, true] {
                break;
            }
        } else {
            assert!(!over[i], "{response:?}");
            hits += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the limits listeners never refused: {over:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_total(&client, &a, "gateway_requests", hits).await;

    // A writer to the signal topic without the cluster's secret cannot refuse a tenant: an
    // unsigned `exceeded` for initech is ignored (and counted) by the edges.
    let forged = json!({
        "tenant": "initech", "meter": "tokens", "kind": "rate", "mode": "hard",
        "state": "exceeded", "used": "100", "limit": "100", "remaining": "0",
        "period_start": "2026-01-01T00:00:00Z", "period_end": "2099-01-01T00:00:00Z",
        "resets_at": "2099-01-01T00:00:00Z", "retry_at": "2099-01-01T00:00:00Z",
        "at": "2026-01-01T00:00:00Z", "crossed": [],
    });
    produce_all(
        &producer(&brokers),
        &format!("{topic}.signals"),
        &[Record::json("initech/tokens/rate", &forged)],
    );
    eventually("b reads the forgery and ignores it", async || {
        let metrics = client
            .get(b.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics
            .lines()
            .any(|line| line.starts_with("tallyd_cluster_unsigned_records_total") && !line.ends_with(" 0"))
            .then_some(())
    })
    .await;
    let initech = event(
        "i1",
        "llm.prompt",
        "initech",
        &ago(1),
        json!({"tokens": 5, "model": "m1"}),
    );
    let (status, body) = post_batch(&client, &b, &[initech]).await;
    assert_eq!(status, 202, "{body}");
    a.stop();
    b.stop();
}

/// Two replicas in cluster mode on a new ingest topic named after `name`, with the limits
/// listener, the signal topic beside the ingest topic, an envoy meter `gateway_requests`, the
/// OTLP meter and `plans`; once they split the partitions. (dirs, a, b, ingest topic)
async fn limited_replicas(
    brokers: &str,
    name: &str,
    plans: &str,
) -> ([tempfile::TempDir; 2], Daemon, Daemon, String) {
    let topic = unique_topic(name);
    create_topic(brokers, &topic, PARTITIONS).await;
    let config = format!(
        "{}\n[limits]\ngrpc_addr = \"127.0.0.1:0\"\nsignal_topic = \"{topic}.signals\"\n\
         [[meters]]\nslug = \"gateway_requests\"\nsource = \"envoy\"\naggregation = \"COUNT\"\n\
         {plans}{OTLP_METER}",
        cluster_config(brokers, &topic)
    );
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = Daemon::start(&write_config(dirs[0].path(), &config));
    let b = Daemon::start(&write_config(dirs[1].path(), &config));
    wait_for_split(&client(), &[&a, &b]).await;
    (dirs, a, b, topic)
}

use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::BlanketRule;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaResponse;

/// An RLQS stream to `edge`'s limits listener that has reported `tenant`'s `meter` bucket once
/// and stays open (the sender keeps the request stream alive).
async fn rlqs_stream(
    edge: &Daemon,
    tenant: &str,
    meter: &str,
) -> (
    tokio::sync::mpsc::Sender<
        envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports,
    >,
    tonic::Streaming<RateLimitQuotaResponse>,
) {
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaUsageReports};
    let url = format!("http://{}", edge.limits_grpc.as_ref().unwrap());
    let mut client = RateLimitQuotaServiceClient::connect(url).await.unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender
        .send(RateLimitQuotaUsageReports {
            domain: "tallyd".into(),
            bucket_quota_usages: vec![BucketQuotaUsage {
                bucket_id: Some(BucketId {
                    bucket: [
                        ("tenant".to_string(), tenant.to_string()),
                        ("meter".to_string(), meter.to_string()),
                    ]
                    .into(),
                }),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let answers = client
        .stream_rate_limit_quotas(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    (sender, answers)
}

/// The blanket rule of an RLQS answer's first assignment (None: a token bucket or abandon).
fn blanket_rule(answer: &RateLimitQuotaResponse) -> Option<BlanketRule> {
    use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::Strategy;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction;
    match answer.bucket_action.first()?.bucket_action.as_ref()? {
        BucketAction::QuotaAssignmentAction(assignment) => {
            match assignment.rate_limit_strategy.as_ref()?.strategy.as_ref()? {
                Strategy::BlanketRule(rule) => BlanketRule::try_from(*rule).ok(),
                _ => None,
            }
        }
        _ => None,
    }
}

/// acme's event `id` of `n` tokens, a second old.
fn acme_tokens(id: String, n: i64) -> Value {
    event(
        &id,
        "llm.prompt",
        "acme",
        &ago(1),
        json!({"tokens": n, "model": "m1"}),
    )
}

/// acme's total of `slug` through `daemon` (redirects followed), retried while the replicas
/// are still learning each other's partition claims (503) — an ordinary state after a start.
async fn total_of(client: &reqwest::Client, daemon: &Daemon, slug: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = client
            .get(daemon.url(&format!("/api/v1/meters/{slug}/query?subject=acme")))
            .send()
            .await
            .unwrap();
        let status = response.status();
        if status == 200 {
            return sum_rows(&response.json().await.unwrap());
        }
        assert!(
            status == 503 && Instant::now() < deadline,
            "query {slug}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (60 s) until acme's total of `slug` is `want`; never past it.
async fn wait_for_total(client: &reqwest::Client, daemon: &Daemon, slug: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let total = total_of(client, daemon, slug).await;
        if total == want {
            return;
        }
        assert!(total < want, "{slug}: {total} counted, more than {want}");
        assert!(Instant::now() < deadline, "{slug} never reached {want}: {total}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Envoy RLS v3 client types (the `envoy-types` crate tallyd serves them with).
mod tallyd_envoy {
    pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    pub use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
}
