//! Black-box tests of the daemon: CloudEvents over HTTP in, exact usage out.

mod common;

use common::*;
use serde_json::{json, Value};

fn config(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), extra);
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_then_query_exact_totals_for_each_aggregation() {
    let (_dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(120);
    let events = vec![
        event(
            "t1",
            "llm.prompt",
            "acme",
            &t,
            json!({"tokens": 1200, "model": "gpt-4"}),
        ),
        event(
            "t2",
            "llm.prompt",
            "acme",
            &t,
            json!({"tokens": "800", "model": "gpt-4"}),
        ),
        event(
            "t3",
            "llm.prompt",
            "acme",
            &t,
            json!({"tokens": 5, "model": "mini"}),
        ),
        event(
            "t4",
            "llm.prompt",
            "globex",
            &t,
            json!({"tokens": 7, "model": "mini"}),
        ),
        event("c1", "api.request", "acme", &t, json!({"route": "/v1/a"})),
        event("c2", "api.request", "acme", &t, json!({"route": "/v1/b"})),
        event("c3", "api.request", "acme", &t, json!({})),
        // 0.1 + 0.2 is exactly 0.3 here, unlike with floats.
        event("d1", "data.ingested", "acme", &t, json!({"gb": 0.1})),
        event("d2", "data.ingested", "acme", &t, json!({"gb": 0.2})),
        event("d3", "data.ingested", "acme", &t, json!({"gb": "0.000000001"})),
        event("u1", "user.active", "acme", &t, json!({"user_id": "alice"})),
        event("u2", "user.active", "acme", &t, json!({"user_id": "bob"})),
        event("u3", "user.active", "acme", &t, json!({"user_id": "alice"})),
        event(
            "n1",
            "node.heartbeat",
            "acme",
            &t,
            json!({"nodes": 3, "free_gb": 10.5}),
        ),
        event(
            "n2",
            "node.heartbeat",
            "acme",
            &t,
            json!({"nodes": 9, "free_gb": 2.25}),
        ),
        event(
            "n3",
            "node.heartbeat",
            "acme",
            &t,
            json!({"nodes": 4, "free_gb": 7}),
        ),
        event("s1", "storage.report", "acme", &ago(300), json!({"gb": 40})),
        event("s2", "storage.report", "acme", &ago(100), json!({"gb": 42.5})),
        event("s3", "storage.report", "acme", &ago(200), json!({"gb": 41})),
    ];
    let (status, body) = post_batch(&client, &daemon, &events).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 19);
    assert_eq!(body["duplicates"], 0);

    let q = |slug: &'static str, params: &'static str| {
        let client = client.clone();
        let daemon = &daemon;
        async move { query(&client, daemon, slug, params).await }
    };
    assert_eq!(
        single_value(&q("tokens", "subject=acme&groupBy=model&filterGroupBy[model]=gpt-4").await),
        "2000"
    );
    assert_eq!(single_value(&q("tokens", "subject=acme").await), "2005");
    assert_eq!(single_value(&q("tokens", "subject=globex").await), "7");
    let by_subject = q("tokens", "").await;
    assert_eq!(
        by_subject["data"].as_array().unwrap().len(),
        2,
        "one row per subject: {by_subject}"
    );
    assert_eq!(single_value(&q("api_calls", "subject=acme").await), "3");
    let by_route = q("api_calls", "subject=acme&groupBy=route").await;
    let routes: Vec<(Value, String)> = by_route["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["groupBy"]["route"].clone(), row["value"].to_string()))
        .collect();
    assert_eq!(
        routes,
        vec![
            (Value::Null, "1".to_string()),
            (json!("/v1/a"), "1".to_string()),
            (json!("/v1/b"), "1".to_string())
        ]
    );
    assert_eq!(single_value(&q("data_gb", "subject=acme").await), "0.300000001");
    assert_eq!(single_value(&q("mau", "subject=acme").await), "2");
    assert_eq!(single_value(&q("nodes", "subject=acme").await), "9");
    assert_eq!(single_value(&q("min_free", "subject=acme").await), "2.25");
    // LATEST is by event time, not arrival order.
    assert_eq!(single_value(&q("storage_gb", "subject=acme").await), "42.5");

    // The same totals after the checkpoint (read from RocksDB instead of memory).
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(single_value(&q("tokens", "subject=acme").await), "2005");
    assert_eq!(single_value(&q("data_gb", "subject=acme").await), "0.300000001");
    assert_eq!(single_value(&q("mau", "subject=acme").await), "2");
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_not_counted_even_across_restarts() {
    let (_dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(30);
    let batch: Vec<Value> = (0..50)
        .map(|i| {
            event(
                &format!("e{i}"),
                "llm.prompt",
                "acme",
                &t,
                json!({"tokens": i, "model": "m"}),
            )
        })
        .collect();
    let (status, body) = post_batch(&client, &daemon, &batch).await;
    assert_eq!((status, body["accepted"].clone()), (202, json!(50)));
    let (_, body) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(
        (body["accepted"].clone(), body["duplicates"].clone()),
        (json!(0), json!(50))
    );
    // Same id from another tenant is another event: one tenant cannot suppress another's usage.
    let other = vec![event(
        "e1",
        "llm.prompt",
        "globex",
        &t,
        json!({"tokens": 1000, "model": "m"}),
    )];
    let (_, body) = post_batch(&client, &daemon, &other).await;
    assert_eq!(body["accepted"], 1);
    // Duplicates within one request count once.
    let twice = vec![
        event("x", "llm.prompt", "acme", &t, json!({"tokens": 5, "model": "m"})),
        event("x", "llm.prompt", "acme", &t, json!({"tokens": 5, "model": "m"})),
    ];
    let (_, body) = post_batch(&client, &daemon, &twice).await;
    assert_eq!(
        (body["accepted"].clone(), body["duplicates"].clone()),
        (json!(1), json!(1))
    );
    let expected = (0..50).sum::<i64>() + 5;
    assert_eq!(
        single_value(&query(&client, &daemon, "tokens", "subject=acme").await),
        expected.to_string()
    );
    daemon.stop();

    let daemon = Daemon::start(&path);
    let (_, body) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(body["duplicates"], 50, "dedup keys survive a restart");
    assert_eq!(
        single_value(&query(&client, &daemon, "tokens", "subject=acme").await),
        expected.to_string()
    );
    assert_eq!(
        single_value(&query(&client, &daemon, "tokens", "subject=globex").await),
        "1000"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_event_amends_closed_window_and_too_late_is_dead_lettered() {
    let (dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    // allowed_lateness is 60 s in the test config: a window 5 minutes old is closed.
    let old = ago(300);
    let (status, body) = post_batch(
        &client,
        &daemon,
        &[event(
            "a",
            "llm.prompt",
            "acme",
            &old,
            json!({"tokens": 10, "model": "m"}),
        )],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let usage = dir.path().join("data/usage.jsonl");
    let first = eventually("first window record", async || {
        read_jsonl(&usage).into_iter().find(|r| r["meter"] == "tokens")
    })
    .await;
    assert_eq!(first["revision"], 1);
    assert_eq!(first["quantity"], "10");
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["dims"], json!({"model": "m"}));

    // A late event for the same window: counted once, emitted as revision 2 with the new total.
    let (_, body) = post_batch(
        &client,
        &daemon,
        &[event(
            "b",
            "llm.prompt",
            "acme",
            &old,
            json!({"tokens": 5, "model": "m"}),
        )],
    )
    .await;
    assert_eq!(body["accepted"], 1);
    let second = eventually("amended window record", async || {
        read_jsonl(&usage)
            .into_iter()
            .find(|r| r["meter"] == "tokens" && r["revision"] == 2)
    })
    .await;
    assert_eq!(
        second["record_id"], first["record_id"],
        "an amendment upserts the same record"
    );
    assert_eq!(second["quantity"], "15");
    assert_eq!(
        single_value(&query(&client, &daemon, "tokens", "subject=acme").await),
        "15"
    );

    // Past max_lateness (10 days here) and too far in the future: refused, dead-lettered, not counted.
    let (status, body) = post_batch(
        &client,
        &daemon,
        &[
            event(
                "c",
                "llm.prompt",
                "acme",
                &ago(11 * 86_400),
                json!({"tokens": 1, "model": "m"}),
            ),
            event(
                "d",
                "llm.prompt",
                "acme",
                &ago(-3600),
                json!({"tokens": 1, "model": "m"}),
            ),
            event(
                "e",
                "llm.prompt",
                "acme",
                &ago(10),
                json!({"tokens": 2, "model": "m"}),
            ),
        ],
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(body["accepted"], 1);
    let refused: Vec<(Value, Value)> = body["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].clone(), r["reason"].clone()))
        .collect();
    assert_eq!(
        refused,
        vec![
            (json!(0), json!("too_late")),
            (json!(1), json!("too_far_in_future"))
        ]
    );
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["reason"], "too_late");
    assert_eq!(dead[0]["event"]["id"], "c");
    assert_eq!(dead[1]["reason"], "too_far_in_future");
    assert_eq!(
        single_value(&query(&client, &daemon, "tokens", "subject=acme").await),
        "17"
    );

    let metrics = metrics_text(&client, &daemon).await;
    for needle in [
        r#"tallyd_ingest_events_total{source="http",outcome="accepted"} 3"#,
        r#"tallyd_ingest_events_total{source="http",outcome="refused"} 2"#,
        r#"tallyd_ingest_refused_total{source="http",reason="too_late"} 1"#,
        r#"tallyd_ingest_late_events_total{source="http"} 2"#,
        "tallyd_flush_duration_seconds_bucket",
        "tallyd_checkpoint_lag_seconds ",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_400_naming_index_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[server]\n", "[server]\nmax_body_bytes = 4096\n");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(10);

    let (status, body) = post_batch(
        &client,
        &daemon,
        &[
            event("1", "llm.prompt", "acme", &t, json!({"tokens": 5, "model": "m"})),
            json!({"id": "2", "source": "s", "type": "llm.prompt", "data": {"tokens": 1}}),
            event("3", "llm.prompt", "acme", "not a time", json!({"tokens": 1})),
            event("4", "llm.prompt", "acme", &t, json!({"tokens": "lots"})),
            event("5", "llm.prompt", "acme", &t, json!({"tokens": 1.5})),
        ],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let errors: Vec<(Value, Value)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].clone(), e["field"].clone()))
        .collect();
    assert_eq!(
        errors,
        vec![
            (json!(1), json!("subject")),
            (json!(2), json!("time")),
            (json!(3), json!("data.tokens")),
            (json!(4), json!("data.tokens")),
        ]
    );
    assert!(body["errors"][3]["reason"]
        .as_str()
        .unwrap()
        .contains("decimal places"));
    // Nothing of an invalid request is counted, not even its valid events.
    let result = query(&client, &daemon, "tokens", "subject=acme").await;
    assert_eq!(result["data"], json!([]));

    let send_raw = |content_type: &'static str, body: Vec<u8>| {
        let client = client.clone();
        let url = daemon.url("/api/v1/events");
        async move {
            let response = client
                .post(url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = send_raw("text/plain", b"{}".to_vec()).await;
    assert_eq!(
        (status, body["errors"][0]["field"].clone()),
        (400, json!("content-type"))
    );
    let (status, body) = send_raw("application/json", b"{\"id\": ".to_vec()).await;
    assert_eq!((status, body["errors"][0]["field"].clone()), (400, json!("body")));
    let (status, body) = send_raw("application/json", vec![b' '; 5000]).await;
    assert_eq!(status, 400);
    assert!(
        body["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes"),
        "{body}"
    );
    let (status, _) = send_raw("application/cloudevents+json", vec![0xff, 0xfe, 0x00]).await;
    assert_eq!(status, 400);

    // Unknown types are accepted and counted as unmetered, not rejected.
    let (status, body) = post_batch(
        &client,
        &daemon,
        &[event("u", "no.such.type", "acme", &t, json!({}))],
    )
    .await;
    assert_eq!((status, body["unmetered"].clone()), (202, json!(1)));

    let health = client.get(daemon.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let bad_query = client
        .get(daemon.url("/api/v1/meters/tokens/query?windowSize=WEEK&groupBy=region&from=yesterday"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_query.status(), 400);
    let bad_query: Value = bad_query.json().await.unwrap();
    assert_eq!(bad_query["errors"].as_array().unwrap().len(), 3, "{bad_query}");
    let missing = client
        .get(daemon.url("/api/v1/meters/nope/query"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_active_users_are_distinct_over_the_range_not_a_sum_of_days() {
    let (_dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    // Day 1: alice, bob. Day 2: alice, carol. Day 3: alice.
    let days = [
        (3, vec!["alice", "bob"]),
        (2, vec!["alice", "carol"]),
        (1, vec!["alice"]),
    ];
    let mut events = Vec::new();
    for (days_ago, users) in &days {
        for user in users {
            events.push(event(
                &format!("{days_ago}-{user}"),
                "user.active",
                "acme",
                &ago(days_ago * 86_400),
                json!({"user_id": user}),
            ));
        }
    }
    let (status, _) = post_batch(&client, &daemon, &events).await;
    assert_eq!(status, 202);
    let daily = query(&client, &daemon, "mau", "subject=acme&windowSize=DAY").await;
    let values: Vec<String> = daily["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].to_string())
        .collect();
    let sum: u64 = values.iter().map(|v| v.parse::<u64>().unwrap()).sum();
    assert_eq!(sum, 5);
    assert_eq!(
        single_value(&query(&client, &daemon, "mau", "subject=acme").await),
        "3"
    );
    daemon.stop();
}

#[test]
fn validate_lists_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[aggregate]\nallowed_lateness_secs = 10\nmax_lateness_secs = 1\n[[meters]]\nslug = \"x\"\nevent_type = \"t\"\naggregation = \"AVG\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("allowed_lateness_secs") && stderr.contains("AVG"),
        "{stderr}"
    );

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "validate",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/tallyd.toml"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coarser_windows_and_ranges_are_merges_of_base_windows() {
    let (_dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    let now = chrono::Utc::now().timestamp();
    let minutes_ago = [95i64, 62, 31, 4];
    let stamps: Vec<i64> = minutes_ago.iter().map(|m| now - m * 60).collect();
    let events: Vec<Value> = stamps
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            let time = chrono::DateTime::from_timestamp(*ts, 0).unwrap().to_rfc3339();
            event(
                &format!("w{i}"),
                "llm.prompt",
                "acme",
                &time,
                json!({"tokens": i + 1, "model": "m"}),
            )
        })
        .collect();
    let (status, body) = post_batch(&client, &daemon, &events).await;
    assert_eq!(status, 202, "{body}");

    // HOUR rows: per UTC hour, the sum of the minute windows that start in it.
    let hourly = query(&client, &daemon, "tokens", "subject=acme&windowSize=HOUR").await;
    let mut expected: std::collections::BTreeMap<i64, u64> = Default::default();
    for (i, ts) in stamps.iter().enumerate() {
        *expected.entry(ts - ts.rem_euclid(3600)).or_default() += i as u64 + 1;
    }
    let rows: Vec<(i64, u64)> = hourly["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let start = chrono::DateTime::parse_from_rfc3339(row["windowStart"].as_str().unwrap()).unwrap();
            let end = chrono::DateTime::parse_from_rfc3339(row["windowEnd"].as_str().unwrap()).unwrap();
            assert_eq!(end.timestamp() - start.timestamp(), 3600);
            (start.timestamp(), row["value"].to_string().parse().unwrap())
        })
        .collect();
    assert_eq!(rows, expected.into_iter().collect::<Vec<_>>());

    // [from, to) selects base windows by start: the second and third events only.
    let minute = |ts: i64| {
        chrono::DateTime::from_timestamp(ts - ts.rem_euclid(60), 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let params = format!("subject=acme&from={}&to={}", minute(stamps[1]), minute(stamps[3]));
    let ranged = query(&client, &daemon, "tokens", &params).await;
    assert_eq!(single_value(&ranged), "5");
    assert_eq!(ranged["data"][0]["windowStart"], minute(stamps[1]));
    daemon.stop();
}

/// When checkpoints fall behind (more unflushed series than `aggregate.max_pending_series`),
/// ingest answers 503 + Retry-After and counts nothing from the refused request; once a
/// checkpoint catches up the retry is accepted, and the totals count it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_behind_means_retryable_503_and_nothing_counted_twice() {
    let (_dir, path) = config("");
    edit_config(
        &path,
        "flush_interval_ms = 100",
        "flush_interval_ms = 1500\nmax_pending_series = 5",
    );
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(30);
    let batch = |first: i64| -> Vec<Value> {
        (first..first + 8)
            .map(|i| {
                event(
                    &format!("e{i}"),
                    "llm.prompt",
                    &format!("tenant-{i}"),
                    &t,
                    json!({"tokens": 10, "model": "m"}),
                )
            })
            .collect()
    };
    // Right after a checkpoint the engine is empty and the next one is 1.5 s away: the first 8
    // series are taken, the next request finds them unflushed.
    let checkpoints = async || {
        let text = metrics_text(&client, &daemon).await;
        text.lines()
            .find_map(|line| line.strip_prefix("tallyd_flush_duration_seconds_count "))
            .map_or(0, |count| count.trim().parse::<u64>().unwrap())
    };
    let before = checkpoints().await;
    eventually("a checkpoint", async || {
        (checkpoints().await > before).then_some(())
    })
    .await;
    let (status, body) = post_batch(&client, &daemon, &batch(0)).await;
    assert_eq!((status, body["accepted"].clone()), (202, json!(8)));
    let response = client
        .post(daemon.url("/api/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(&batch(8)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("max_pending_series"),
        "{body}"
    );
    assert!(metrics_text(&client, &daemon)
        .await
        .contains("tallyd_ingest_backpressure_total{source=\"http\"} 1"));
    // The producer retries after the delay until a checkpoint drained the engine.
    let accepted = eventually("the retry to be accepted", async || {
        let (status, body) = post_batch(&client, &daemon, &batch(8)).await;
        (status == 202).then_some(body)
    })
    .await;
    assert_eq!(
        (accepted["accepted"].clone(), accepted["duplicates"].clone()),
        (json!(8), json!(0))
    );
    assert_eq!(sum_rows(&query(&client, &daemon, "tokens", "").await), 160);
    daemon.stop();
}

/// A client that gives up after sending its batch (a closed connection mid-request) does not
/// change what is counted: once the events are claimed the daemon commits them anyway, and the
/// retry learns they were counted. Before the edges ran the commit to its end, the claims
/// stayed while the handler was dropped: the retry was told "duplicates" and nothing counted;
/// before claims named their request, a retry could be told "duplicates" while the first
/// attempt was still committing (`state::dedup`, tickets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_request_loses_nothing_and_its_retry_is_told_the_truth() {
    let (_dir, path) = config("");
    edit_config(&path, "[server]\n", "[server]\nmax_body_bytes = 67108864\n");
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(30);
    let batch: Vec<Value> = (0..50_000)
        .map(|i| {
            event(
                &format!("hangup-{i}"),
                "llm.prompt",
                "hangup",
                &t,
                json!({"tokens": 1, "model": "m"}),
            )
        })
        .collect();
    hang_up_after_posting(&daemon, &serde_json::to_vec(&batch).unwrap());
    // The retry: whatever it is told, the batch counts once.
    let (status, answer) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(status, 202, "{answer}");
    let told = answer["accepted"].as_i64().unwrap() + answer["duplicates"].as_i64().unwrap();
    assert_eq!(told, 50_000, "{answer}");
    // A retry is told "duplicates" only for events already committed: if the hung-up request
    // was still committing, the retry waited for it. So the total is exact at once.
    assert_eq!(
        tenant_tokens(&client, &daemon, "hangup").await,
        50_000,
        "{answer}"
    );
    // And once more: now certainly all duplicates, still 50,000.
    let (_, answer) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(answer["duplicates"], json!(50_000), "{answer}");
    assert_eq!(tenant_tokens(&client, &daemon, "hangup").await, 50_000);
    daemon.stop();
}

/// A CloudEvent whose value is beyond the representable range (here a 32-digit token count at
/// scale 0) is refused alone, reason `overflow`, listed in the 202 and dead-lettered; the rest of
/// the batch counts and the series stays queryable. Before the range, two such events were both
/// accepted and the series' merge in RocksDB then failed ("Corruption: Merge operator failed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_beyond_the_range_are_refused_as_overflow_not_acknowledged() {
    let (dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(30);
    let huge = "99999999999999999999999999999999";
    let batch = vec![
        event(
            "of-1",
            "llm.prompt",
            "overflow-co",
            &t,
            json!({"tokens": huge, "model": "m"}),
        ),
        event(
            "of-2",
            "llm.prompt",
            "overflow-co",
            &t,
            json!({"tokens": huge.parse::<f64>().unwrap(), "model": "m"}),
        ),
        event(
            "of-3",
            "llm.prompt",
            "overflow-co",
            &t,
            json!({"tokens": 5, "model": "m"}),
        ),
    ];
    let (status, body) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], json!(1), "{body}");
    let refused = body["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{body}");
    assert!(refused.iter().all(|r| r["reason"] == "overflow"), "{body}");
    assert_eq!(refused[0]["index"], json!(0));
    // The largest value in range counts exactly.
    let (_, body) = post_batch(
        &client,
        &daemon,
        &[event(
            "of-4",
            "llm.prompt",
            "overflow-co",
            &t,
            json!({"tokens": "999999999999999999999999", "model": "m"}),
        )],
    )
    .await;
    assert_eq!(body["accepted"], json!(1), "{body}");
    let result = query(&client, &daemon, "tokens", "subject=overflow-co").await;
    assert_eq!(single_value(&result), "1000000000000000000000004");
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|line| line["reason"] == "overflow"));
    daemon.stop();
}

/// The hostile-input catalogue for CloudEvents over HTTP: each input gets a clear answer naming
/// what is wrong (never a panic, never a hang), nothing of it counts, and the daemon keeps
/// serving the next well-formed request exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_clear_answers_and_the_daemon_keeps_serving() {
    let (dir, path) = config("");
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(30);
    let send = |content_type: &'static str, body: Vec<u8>| {
        let (client, url) = (client.clone(), daemon.url("/api/v1/events"));
        async move {
            let response = client
                .post(url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let one = |data: Value, time: &str, subject: &str| {
        serde_json::to_vec(&event("h-1", "llm.prompt", subject, time, data)).unwrap()
    };
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let megabyte = "x".repeat(1 << 20);
    let cases: Vec<(&str, &'static str, Vec<u8>, u16, &str)> = vec![
        ("deep nesting", "application/json", deep, 400, "recursion limit"),
        ("deep data", "application/cloudevents+json",
            format!(r#"{{"specversion":"1.0","id":"d","source":"s","type":"llm.prompt","subject":"a","data":{{"tokens":1,"model":{}1{}}}}}"#,
                "[".repeat(10_000), "]".repeat(10_000)).into_bytes(), 400, ""),
        ("1 MB subject", "application/cloudevents+json", one(json!({"tokens": 1, "model": "m"}), &t, &megabyte), 400, "subject"),
        ("1 MB dimension value", "application/cloudevents+json", one(json!({"tokens": 1, "model": megabyte}), &t, "acme"), 400, "model"),
        ("NaN as a string", "application/cloudevents+json", one(json!({"tokens": "NaN", "model": "m"}), &t, "acme"), 400, "tokens"),
        ("negative count", "application/cloudevents+json", one(json!({"tokens": -5, "model": "m"}), &t, "acme"), 400, "tokens"),
        ("year 1970", "application/cloudevents+json", one(json!({"tokens": 1, "model": "m"}), "1970-01-01T00:00:00Z", "acme"), 202, "too_late"),
        ("year 2300", "application/cloudevents+json", one(json!({"tokens": 1, "model": "m"}), "2300-01-01T00:00:00Z", "acme"), 202, "too_far_in_future"),
        ("not a time", "application/cloudevents+json", one(json!({"tokens": 1, "model": "m"}), "yesterday", "acme"), 400, "time"),
        ("invalid UTF-8", "application/cloudevents+json", vec![b'{', 0xff, 0xfe, b'}'], 400, "body"),
        ("wrong content type", "text/plain", b"{}".to_vec(), 400, "content-type"),
        ("empty body", "application/json", Vec::new(), 400, "body"),
        ("empty batch", "application/cloudevents-batch+json", b"[]".to_vec(), 400, "body"),
        ("1e999", "application/cloudevents+json",
            br#"{"specversion":"1.0","id":"inf","source":"s","type":"llm.prompt","subject":"acme","data":{"tokens":1e999,"model":"m"}}"#.to_vec(),
            202, "overflow"),
    ];
    for (what, content_type, body, status, named) in cases {
        let (got, answer) = send(content_type, body).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert!(
            answer.to_string().contains(named),
            "{what}: the answer names `{named}`: {answer}"
        );
        if status == 202 {
            assert_eq!(answer["accepted"], json!(0), "{what}: {answer}");
        }
    }
    // Still serving, and nothing of the above counted.
    let (status, body) = post_batch(
        &client,
        &daemon,
        &[event(
            "fine",
            "llm.prompt",
            "acme",
            &t,
            json!({"tokens": 7, "model": "m"}),
        )],
    )
    .await;
    assert_eq!((status, body["accepted"].clone()), (202, json!(1)), "{body}");
    assert_eq!(tenant_tokens(&client, &daemon, "acme").await, 7);
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    let reasons: Vec<&str> = dead.iter().map(|line| line["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["too_late", "too_far_in_future", "overflow"]);
    daemon.stop();
}

/// A trickling upload takes its share of the ingest budget before its body is read (its
/// declared size, or all of `max_body_bytes` when chunked), so bodies in flight cannot exceed
/// `ingest_budget_bytes`; and it cannot keep that share: after `body_timeout_secs` it gets 408
/// and the budget serves the next client. Before, bodies were read first and counted after:
/// any number of slow clients each held up to `max_body_bytes` unaccounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_holds_the_budget_only_until_its_timeout() {
    use std::io::{Read, Write};
    let (_dir, path) = config("");
    edit_config(
        &path,
        "[server]\n",
        "[server]\nmax_body_bytes = 65536\ningest_budget_bytes = 65536\nbody_timeout_secs = 2\n",
    );
    let daemon = Daemon::start(&path);
    let client = client();
    let batch = [event(
        "slow-1",
        "llm.prompt",
        "slow",
        &ago(30),
        json!({"tokens": 3, "model": "m"}),
    )];

    // Chunked, and only the first bytes: the whole budget is held while it trickles. The clock
    // starts before the connection: the daemon's timer starts when the head arrives, which is
    // before any instant taken after the write returns (that was a flaky CI failure).
    let started = std::time::Instant::now();
    let mut slow = std::net::TcpStream::connect(daemon.addr.as_str()).unwrap();
    write!(
        slow,
        "POST /api/v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents-batch+json\r\ntransfer-encoding: chunked\r\n\r\n1\r\n[\r\n"
    )
    .unwrap();
    // The budget is taken once the daemon has read the head: probed (another tenant, a new
    // event each time) until refused, rather than a guessed sleep a loaded machine can outlast.
    for probe in 0.. {
        let probe = event(
            &format!("probe-{probe}"),
            "llm.prompt",
            "probe",
            &ago(30),
            json!({"tokens": 1, "model": "m"}),
        );
        if post_batch(&client, &daemon, &[probe]).await.0 == 503 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1500),
            "the trickling body never held the budget"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, answer) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(status, 503, "the budget is held by the trickling body: {answer}");

    // Its timeout frees it: 408 naming the setting, then the next client is served.
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let read = slow.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout_secs"), "{answer}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "not before the timeout"
    );
    let (status, answer) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(tenant_tokens(&client, &daemon, "slow").await, 3);

    // A declared size over the limit is refused before a byte of it is read.
    let mut big = std::net::TcpStream::connect(daemon.addr.as_str()).unwrap();
    write!(
        big,
        "POST /api/v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents-batch+json\r\ncontent-length: 100000000\r\n\r\n"
    )
    .unwrap();
    big.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let read = big.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).to_string();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("max_body_bytes"), "{answer}");
    daemon.stop();
}

/// A tenant that floods distinct dimension values (here routes) starts new series only up to
/// `max_series_per_tenant` a day: the rest are refused one by one with reason
/// `cardinality_limit` (listed in the 202, dead-lettered, counted in the metric), its existing
/// series keep counting, other tenants keep their own allowance up to `max_series`, and the
/// refused values are never interned (the id table does not grow with the flood).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_series_is_refused_past_the_cap_and_existing_series_keep_counting() {
    let (dir, path) = config("");
    edit_config(
        &path,
        "[aggregate]\n",
        "[aggregate]\nmax_series_per_tenant = 3\nmax_series = 5\n",
    );
    let daemon = Daemon::start(&path);
    let client = client();
    let t = ago(30);
    let call = |id: String, tenant: &str, route: String| {
        event(&id, "api.request", tenant, &t, json!({"route": route}))
    };

    let flood: Vec<Value> = (0..10_000)
        .map(|i| call(format!("flood-{i}"), "flooder", format!("/r{i}")))
        .collect();
    let (status, answer) = post_batch(&client, &daemon, &flood).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], json!(3), "{answer}");
    let refused = answer["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 9_997);
    assert!(
        refused.iter().all(|r| r["reason"] == "cardinality_limit"),
        "{}",
        refused[0]
    );
    assert!(
        refused[0]["message"]
            .as_str()
            .unwrap()
            .contains("max_series_per_tenant"),
        "{}",
        refused[0]
    );

    // Its existing series keep counting; a new one is still refused.
    let more = [
        call("more-1".into(), "flooder", "/r0".into()),
        call("more-2".into(), "flooder", "/r1".into()),
        call("more-3".into(), "flooder", "/new".into()),
    ];
    let (_, answer) = post_batch(&client, &daemon, &more).await;
    assert_eq!(answer["accepted"], json!(2), "{answer}");
    assert_eq!(answer["refused"][0]["index"], json!(2), "{answer}");

    // Another tenant has its own allowance, up to the total (5 = 3 + 2).
    let other: Vec<Value> = (0..3)
        .map(|i| call(format!("other-{i}"), "other", format!("/o{i}")))
        .collect();
    let (_, answer) = post_batch(&client, &daemon, &other).await;
    assert_eq!(answer["accepted"], json!(2), "{answer}");
    assert!(
        answer["refused"][0]["message"]
            .as_str()
            .unwrap()
            .contains("aggregate.max_series"),
        "{answer}"
    );

    let total = |tenant: &'static str| {
        let client = client.clone();
        let url = daemon.url(&format!("/api/v1/meters/api_calls/query?subject={tenant}"));
        async move {
            let answer: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            sum_rows(&answer)
        }
    };
    assert_eq!(total("flooder").await, 5);
    assert_eq!(total("other").await, 2);
    let metrics = metrics_text(&client, &daemon).await;
    assert!(
        metrics.contains(r#"tallyd_ingest_refused_total{source="http",reason="cardinality_limit"} 9999"#),
        "{metrics}"
    );
    assert!(metrics.contains("tallyd_series_active_today 5"), "{metrics}");
    // The empty set plus the five admitted routes: none of the 9,999 refused ones.
    assert!(
        metrics.contains(r#"tallyd_interned_values{table="dims"} 6"#),
        "{metrics}"
    );
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    assert_eq!(
        dead.iter()
            .filter(|line| line["reason"] == "cardinality_limit")
            .count(),
        9_999
    );
    daemon.stop();
}

/// Reads from `stream` until the server closes it (EOF or reset), returning how long that took
/// and what it sent; panics if it stays open past `limit`.
fn wait_closed(
    stream: &mut std::net::TcpStream,
    limit: std::time::Duration,
) -> (std::time::Duration, String) {
    use std::io::Read;
    let started = std::time::Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("still open after {:?}: {error}", started.elapsed()),
        }
    }
    (started.elapsed(), String::from_utf8_lossy(&received).into_owned())
}

/// Connections are a resource an attacker can take without sending a request: each listener
/// keeps at most `max_connections` (one more is closed at once), and a connection that stays
/// silent, sends half its headers, or idles after its answer is closed after
/// `header_read_timeout_secs`. Before, a connection that sent nothing was held forever on
/// every listener, so enough of them exhausted the file descriptors and nobody was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_surplus_connections_are_closed_and_every_listener_keeps_serving() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::Duration;
    let (_dir, path) = config("");
    edit_config(
        &path,
        "[server]\n",
        "[server]\nmax_connections = 3\nheader_read_timeout_secs = 1\n",
    );
    let daemon = Daemon::start(&path);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // Three silent connections take every slot of the HTTP listener; a fourth is closed at once.
    let opened = std::time::Instant::now();
    let mut silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(daemon.addr.as_str()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut surplus = TcpStream::connect(daemon.addr.as_str()).unwrap();
    let (took, _) = wait_closed(&mut surplus, Duration::from_secs(5));
    assert!(
        took < Duration::from_millis(500),
        "the surplus connection waited {took:?}"
    );

    // The silent ones are closed after the timeout, not before; then the listener serves again.
    for stream in &mut silent {
        let (_, answer) = wait_closed(stream, Duration::from_secs(5));
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
        assert_eq!(answer, "", "nothing is sent to a silent connection");
    }
    let health = client.get(daemon.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // Half a request's headers, then silence: closed by the header timer.
    let mut partial = TcpStream::connect(daemon.addr.as_str()).unwrap();
    write!(partial, "GET /healthz HTTP/1.1\r\nhost: x\r\n").unwrap();
    let (took, _) = wait_closed(&mut partial, Duration::from_secs(5));
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // A keep-alive connection answered once and then idle is closed after the timeout too.
    let mut idle = TcpStream::connect(daemon.addr.as_str()).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let (took, answer) = wait_closed(&mut idle, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // The OTLP listeners hold silent connections no longer either.
    for addr in [
        daemon.otlp_grpc.clone().unwrap(),
        daemon.otlp_http.clone().unwrap(),
    ] {
        let mut stream = TcpStream::connect(addr.as_str()).unwrap();
        let (took, _) = wait_closed(&mut stream, Duration::from_secs(5));
        assert!(took >= Duration::from_millis(500), "{addr}: {took:?}");
    }

    // Still serving: an event is counted; the refusals are counted by listener and reason.
    let batch = [event(
        "conn-1",
        "llm.prompt",
        "conn",
        &ago(30),
        json!({"tokens": 4, "model": "m"}),
    )];
    let (status, answer) = post_batch(&client, &daemon, &batch).await;
    assert_eq!(status, 202, "{answer}");
    let metrics = metrics_text(&client, &daemon).await;
    let count = |labels: &str| -> f64 {
        metrics
            .lines()
            .find(|line| line.starts_with(&format!("tallyd_connections_refused_total{{{labels}}}")))
            .and_then(|line| line.rsplit(' ').next())
            .map_or(0.0, |value| value.parse().unwrap())
    };
    assert_eq!(
        count(r#"listener="http",reason="max_connections""#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(r#"listener="http",reason="header_timeout""#),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        count(r#"listener="otlp_grpc",reason="header_timeout""#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(r#"listener="otlp_http",reason="header_timeout""#),
        1.0,
        "{metrics}"
    );
    assert_eq!(tenant_tokens(&client, &daemon, "conn").await, 4);
    daemon.stop();
}
