//! Rating, end to end: events in over HTTP, `GET /api/v1/tenants/{tenant}/usage` prices what was
//! counted with the tenant's plan (the issue's example plan plus the seed per-unit prices).

mod common;

use common::rated::*;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bill_preview_prices_counted_usage_with_the_tenants_plan() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), PLANS));
    let client = client();

    // 12 100 tokens in 121 events (and one retried duplicate), 2 500 API calls, 3 distinct users
    // over 6 events, 3.5 GB; plus usage of a tenant without a plan.
    let mut events = Vec::new();
    for i in 0..121 {
        events.push(event(
            &format!("t{i}"),
            "llm.prompt",
            "acme",
            &ago(i % 60),
            json!({"tokens": 100, "model": format!("m{}", i % 2)}),
        ));
    }
    events.push(events[0].clone());
    for i in 0..2500 {
        events.push(event(
            &format!("c{i}"),
            "api.request",
            "acme",
            &ago(i % 60),
            json!({"route": "/v1/chat"}),
        ));
    }
    for (i, user) in ["ann", "bob", "cy", "ann", "bob", "ann"].iter().enumerate() {
        events.push(event(
            &format!("u{i}"),
            "user.active",
            "acme",
            &ago(5),
            json!({"user_id": user}),
        ));
    }
    for (i, gb) in ["1.25", "2.25"].iter().enumerate() {
        events.push(event(
            &format!("g{i}"),
            "data.ingested",
            "acme",
            &ago(5),
            json!({"gb": gb}),
        ));
    }
    events.push(event(
        "x1",
        "llm.prompt",
        "initech",
        &ago(5),
        json!({"tokens": 5}),
    ));
    for batch in events.chunks(500) {
        let (status, body) = post_batch(&client, &daemon, batch).await;
        assert_eq!(status, 202, "{body}");
    }

    // An explicit range around now keeps the test away from month boundaries.
    let range = format!("from={}&to={}", urlencode(&ago(3600)), urlencode(&ago(-3600)));
    let response = client
        .get(daemon.url(&format!("/api/v1/tenants/acme/usage?{range}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bill: Value = response.json().await.unwrap();
    assert_eq!(bill["plan_id"], "pro");
    assert_eq!(bill["currency"], "USD");
    assert_eq!(bill["discount_percent"], "10");
    let line = |meter: &str| -> Value {
        bill["meters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["meter"] == meter)
            .cloned()
            .unwrap_or_else(|| panic!("no {meter} in {bill}"))
    };
    // 12 000 billable tokens: 2 + 14.50 + 2 = 18.50, less 10 % = 16.65.
    assert_eq!(line("tokens")["quantity"], "12100");
    assert_eq!(line("tokens")["amount"], "16.65");
    assert_eq!(line("tokens")["tiers"].as_array().unwrap().len(), 3);
    // 3 packages of 1 000 calls at 0.50, less 10 %.
    assert_eq!(line("api_calls")["quantity"], "2500");
    assert_eq!(line("api_calls")["amount"], "1.35");
    // Distinct users over the range (a union, not a sum of windows): 3 x $5, less 10 %.
    assert_eq!(line("mau")["quantity"], "3");
    assert_eq!(line("mau")["amount"], "13.50");
    // 2.5 billable GB at $0.10 = 0.25, less 10 % = 0.225 → 0.23 (half away from zero).
    assert_eq!(line("data_gb")["quantity"], "3.5");
    assert_eq!(line("data_gb")["amount"], "0.23");
    assert_eq!(bill["total"], "31.73"); // 16.65 + 1.35 + 13.50 + 0.23
                                        // No minimum spend or prepaid commitment in this plan: all of it is billed as usage.
    assert_eq!(
        (
            &bill["subtotal"],
            &bill["minimum_true_up"],
            &bill["prepaid_used"],
            &bill["overage"]
        ),
        (&json!("31.73"), &json!("0.00"), &json!("0.00"), &json!("31.73"))
    );

    // Without a range: the billing period containing now.
    let current: Value = client
        .get(daemon.url("/api/v1/tenants/acme/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        current["period_start"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00Z"),
        "{current}"
    );

    // No plan: 404 naming the fix; a bad range: 400 naming the parameter.
    let response = client
        .get(daemon.url("/api/v1/tenants/initech/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("[[tenants]]"),
        "{body}"
    );
    let response = client
        .get(daemon.url("/api/v1/tenants/acme/usage?from=yesterday"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    daemon.stop();
}

fn urlencode(text: &str) -> String {
    text.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rated_records_sum_to_the_period_price_through_late_events_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), PLANS);
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&config);
    let client = client();
    for batch in closed_window_usage().chunks(500) {
        let (status, body) = post_batch(&client, &daemon, batch).await;
        assert_eq!(status, 202, "{body}");
    }

    // One rated record per window record of a charged meter (tokens, api_calls, mau, data_gb:
    // 6 + 3 + 3 + 3), all with the period of the windows.
    let latest = eventually("15 rated records", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        (latest.len() == 15).then_some(latest)
    })
    .await;
    let windows = read_jsonl(&usage)
        .into_iter()
        .filter(|line| line["kind"] == "window" && line["tenant"] == "acme")
        .count();
    assert_eq!(windows, 15, "every window of acme is rated once");
    let any = latest.values().next().unwrap();
    let (from, to) = (
        any["period_start"].as_str().unwrap().to_string(),
        any["period_end"].as_str().unwrap().to_string(),
    );
    for record in latest.values() {
        assert_eq!(
            (record["currency"].as_str(), record["plan_id"].as_str()),
            (Some("USD"), Some("pro"))
        );
        assert_eq!(record["revision"], 1);
        assert_eq!(record["discount_percent"], "10");
    }
    // The latest amounts of each meter sum to the bill preview's price of the period total.
    let preview = bill(&client, &daemon, "acme", &from, &to).await;
    assert_eq!(amounts_by_meter(&latest), bill_by_meter(&preview), "{preview}");
    // mau is priced on the period's distinct users (ann, bob, cy, dee, eve, fay, gus = 7 → $35
    // less 10 %), not the sum of windows' counts (9).
    assert_eq!(amounts_by_meter(&latest)["mau"], 3150);

    // A late event in the first window's m0 series: a revision 2 of that record only, carrying
    // the window's whole amount; sums still equal the period price.
    let first = latest
        .values()
        .find(|r| r["meter"] == "tokens" && r["dims"]["model"] == "m0" && r["quantity"] == "1500")
        .unwrap()
        .clone();
    let late = event(
        "tok-late",
        "llm.prompt",
        "acme",
        first["window_start"].as_str().unwrap(),
        json!({"tokens": 4000, "model": "m0"}),
    );
    let (status, body) = post_batch(&client, &daemon, &[late]).await;
    assert_eq!(status, 202, "{body}");
    let revised = eventually("revision 2", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        let record = latest[first["record_id"].as_str().unwrap()].clone();
        (record["revision"] == 2).then_some(latest)
    })
    .await;
    let record = &revised[first["record_id"].as_str().unwrap()];
    assert_eq!(record["quantity"], "5500");
    assert_eq!(
        cents(&record["amount"]),
        cents(&first["amount"]) + cents(&record["increment"]),
        "{record}"
    );
    assert!(cents(&record["increment"]) > 0);
    assert_eq!(revised.len(), 15);
    let changed: Vec<_> = revised
        .iter()
        .filter(|(id, r)| latest[*id]["revision"] != r["revision"])
        .collect();
    assert_eq!(changed.len(), 1, "only the amended window is revised");
    let preview = bill(&client, &daemon, "acme", &from, &to).await;
    assert_eq!(amounts_by_meter(&revised), bill_by_meter(&preview), "{preview}");

    // The API lists the same latest records.
    let listed: Value = client
        .get(daemon.url("/api/v1/rated?tenant=acme&limit=100"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api: std::collections::BTreeMap<String, Value> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["record_id"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    assert_eq!(api, revised);
    assert_eq!(listed["truncated"], false);
    let total: i64 = amounts_by_meter(&revised).values().sum();
    assert_eq!(cents(&listed["totals"]["USD"]), total);
    let response = client
        .get(daemon.url("/api/v1/rated?limit=0&meter=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("limit") && message.contains("meter"), "{body}");

    // A restart replays nothing into new records; a kill -9 neither.
    let lines_before = read_jsonl(&usage).len();
    daemon.stop();
    let daemon = Daemon::start(&config);
    let (status, _) = post_batch(&client, &daemon, &closed_window_usage()[..10]).await;
    assert_eq!(status, 202, "retried events are duplicates");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    daemon.kill();
    let daemon = Daemon::start(&config);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let lines = read_jsonl(&usage);
    assert_eq!(lines.len(), lines_before, "no record emitted twice or anew");
    assert_eq!(latest_rated(&lines), revised);
    daemon.stop();
}

/// A webhook receiver: refuses while `down`, checks the HMAC signature of every request and
/// keeps the records of those it accepts.
#[derive(Clone, Default)]
struct Receiver {
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    bad_signatures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    batches: std::sync::Arc<std::sync::Mutex<Vec<Vec<Value>>>>,
}

const SECRET: &str = "webhook-secret-0123456789";

async fn receive(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    use hmac::{Hmac, Mac};
    use std::sync::atomic::Ordering;
    if receiver.down.load(Ordering::Acquire) {
        receiver.refused.fetch_add(1, Ordering::AcqRel);
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.", header("x-tallyd-timestamp")).as_bytes());
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stamped: i64 = header("x-tallyd-timestamp").parse().unwrap_or(0);
    let fresh = (chrono_now() - stamped).abs() < 300;
    if header("x-tallyd-signature") != format!("sha256={expected}") || !fresh {
        receiver.bad_signatures.fetch_add(1, Ordering::AcqRel);
        return axum::http::StatusCode::UNAUTHORIZED;
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap();
    receiver
        .batches
        .lock()
        .unwrap()
        .push(parsed["records"].as_array().unwrap().clone());
    axum::http::StatusCode::NO_CONTENT
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_signed_batches_with_retries_and_resumes_after_a_restart() {
    use std::sync::atomic::Ordering;
    let receiver = Receiver::default();
    receiver.down.store(true, Ordering::Release);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "{PLANS}\n[emit.webhook]\nurl = \"http://{hook}/hook\"\nsecret = \"{SECRET}\"\nbatch_size = 4\n"
        ),
    );
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&config);
    let client = client();
    for batch in closed_window_usage().chunks(500) {
        let (status, body) = post_batch(&client, &daemon, batch).await;
        assert_eq!(status, 202, "{body}");
    }
    // The receiver is down: records wait in the outbox (ingest is not held up), retried.
    eventually("retries", async || {
        (receiver.refused.load(Ordering::Acquire) >= 3).then_some(())
    })
    .await;
    let (status, _) = post_batch(
        &client,
        &daemon,
        &[event(
            "more",
            "llm.prompt",
            "acme",
            &ago(7300),
            json!({"tokens": 7, "model": "m9"}),
        )],
    )
    .await;
    assert_eq!(status, 202, "ingest goes on while the webhook is down");
    let expected = eventually("16 rated records in the file", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        (latest.len() == 16).then_some(latest)
    })
    .await;
    // Stopped while the receiver is still down: the records stay in the outbox...
    daemon.stop();
    receiver.down.store(false, Ordering::Release);
    // ...and go out after the restart, in batches of at most 4, every signature valid.
    let daemon = Daemon::start(&config);
    let delivered = eventually("webhook delivery", async || {
        let batches = receiver.batches.lock().unwrap().clone();
        let records: Vec<Value> = batches.iter().flatten().cloned().collect();
        let latest = latest_rated(&records);
        (latest.len() == 16).then_some((batches, latest))
    })
    .await;
    let (batches, latest) = delivered;
    assert_eq!(latest, expected, "the webhook holds what the file holds");
    assert!(batches.iter().all(|batch| batch.len() <= 4 && !batch.is_empty()));
    assert!(
        batches.iter().flatten().all(|record| record["kind"] == "rated"),
        "window records are not sent by default"
    );
    assert_eq!(receiver.bad_signatures.load(Ordering::Acquire), 0);
    // The daemon counts a batch once its response is back, just after the receiver has it.
    eventually("the webhook's emitted-records counter", async || {
        let metrics = metrics_text(&client, &daemon).await;
        metrics
            .contains("tallyd_emit_records_total{output=\"webhook\",kind=\"rated\"}")
            .then_some(())
    })
    .await;
    daemon.stop();
}

/// An `https` webhook: the receiver's certificate is verified. Signed by a private CA the
/// system does not trust, delivery fails (counted; the records wait in the outbox, nothing is
/// lost); with that CA in `emit.webhook.ca_path`, the same records go out after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_verifies_the_receivers_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("hook.crt"), dir.path().join("hook.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let identity = tallyd::ingest::tls::TlsIdentity::load(
        &tallyd::config::RawTls {
            cert_path: cert.clone(),
            key_path: key.clone(),
            client_ca_path: None,
        },
        "test",
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(identity.rustls_config().unwrap()));
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    let limits = tallyd::config::ConnectionLimits {
        max_connections: 16,
        header_read_timeout: std::time::Duration::from_secs(5),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(tallyd::ingest::listen::serve_http(
        listener,
        "hook",
        limits,
        app,
        Some(acceptor),
        None,
        stop.clone(),
    ));

    let webhook = format!(
        "{PLANS}\n[emit.webhook]\nurl = \"https://localhost:{port}/hook\"\nsecret = \"{SECRET}\"\nbatch_size = 4\n"
    );
    let config = write_config(dir.path(), &webhook);
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&config);
    let client = client();
    let expected = rate_closed_windows(&client, &daemon, &usage).await;
    eventually("a failed delivery (untrusted certificate)", async || {
        let metrics = metrics_text(&client, &daemon).await;
        metrics
            .lines()
            .any(|line| line.starts_with("tallyd_emit_failures_total{output=\"webhook\"}"))
            .then_some(())
    })
    .await;
    assert!(
        receiver.batches.lock().unwrap().is_empty(),
        "nothing reached an untrusted receiver"
    );
    daemon.stop();

    // Trust the receiver's CA: the records kept in the outbox go out.
    edit_config(
        &config,
        "batch_size = 4\n",
        &format!("batch_size = 4\nca_path = \"{}\"\n", cert.display()),
    );
    let daemon = Daemon::start(&config);
    let latest = eventually("webhook delivery over https", async || {
        let records: Vec<Value> = receiver
            .batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .cloned()
            .collect();
        let latest = latest_rated(&records);
        (latest.len() == 15).then_some(latest)
    })
    .await;
    assert_eq!(latest, expected);
    assert_eq!(
        receiver.bad_signatures.load(std::sync::atomic::Ordering::Acquire),
        0
    );
    daemon.stop();
    stop.cancel();
}

/// Posts `closed_window_usage` and waits for its 15 rated records in the usage file.
async fn rate_closed_windows(
    client: &reqwest::Client,
    daemon: &Daemon,
    usage: &std::path::Path,
) -> std::collections::BTreeMap<String, Value> {
    for batch in closed_window_usage().chunks(500) {
        let (status, body) = post_batch(client, daemon, batch).await;
        assert_eq!(status, 202, "{body}");
    }
    eventually("15 rated records in the file", async || {
        let latest = latest_rated(&read_jsonl(usage));
        (latest.len() == 15).then_some(latest)
    })
    .await
}

fn daily_plan(version: u32, unit_price: &str) -> String {
    format!(
        r#"
[[plans]]
id = "daily"
version = {version}
currency = "USD"
billing_period = "DAY"
[[plans.charges]]
meter = "api_calls"
model = "per_unit"
unit_price = "{unit_price}"
[[tenants]]
id = "acme"
plan = "daily"
timezone = "Asia/Tokyo"
"#
    )
}

fn calls(prefix: &str, n: usize, at: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                "api.request",
                "acme",
                at,
                json!({"route": "/x"}),
            )
        })
        .collect()
}

/// SIGHUP reloads plans: a period already rated keeps its plan version, the next period gets the
/// new one; an invalid file changes nothing. Periods follow the tenant's time zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_reload_applies_from_the_next_period_and_old_periods_keep_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &daily_plan(1, "0.001"));
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&config);
    let client = client();
    let (older, newer) = (ago(2 * 86_400 + 600), ago(86_400 + 600));
    let (status, _) = post_batch(&client, &daemon, &calls("a", 1000, &older)).await;
    assert_eq!(status, 202);
    let first = eventually("the first rated record", async || {
        latest_rated(&read_jsonl(&usage)).into_values().next()
    })
    .await;
    assert_eq!(
        (first["amount"].as_str(), first["plan_version"].as_u64()),
        (Some("1.00"), Some(1))
    );
    // Tokyo days start at 15:00 UTC.
    assert!(
        first["period_start"].as_str().unwrap().ends_with("T15:00:00Z"),
        "{first}"
    );

    // An invalid file is refused whole; the running plans stay.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("unit_price = \"0.001\"", "unit_price = 0.002"),
    )
    .unwrap();
    let pid = daemon.pid().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    eventually("the refusal", async || {
        daemon.logs().contains("config not reloaded").then_some(())
    })
    .await;
    // Version 2 only (version 1 dropped from the file: it is kept for the rated period).
    std::fs::write(
        &config,
        text.replace(&daily_plan(1, "0.001"), &daily_plan(2, "0.002")),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    eventually("the reload", async || {
        daemon.logs().contains("plans reloaded").then_some(())
    })
    .await;

    // Late usage in the already-rated period: still version 1. A new period: version 2.
    let (status, _) = post_batch(&client, &daemon, &calls("b", 500, &older)).await;
    assert_eq!(status, 202);
    let (status, _) = post_batch(&client, &daemon, &calls("c", 500, &newer)).await;
    assert_eq!(status, 202);
    let latest = eventually("two periods rated", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        let revised = latest.values().any(|r| r["revision"] == 2);
        (latest.len() == 2 && revised).then_some(latest)
    })
    .await;
    let by_version: std::collections::BTreeMap<u64, &Value> = latest
        .values()
        .map(|r| (r["plan_version"].as_u64().unwrap(), r))
        .collect();
    assert_eq!(by_version[&1]["amount"], "1.50", "{latest:?}");
    assert_eq!(by_version[&1]["increment"], "0.50");
    assert_eq!(by_version[&2]["amount"], "1.00", "{latest:?}");
    // The preview of the old period prices it with the version it was rated with.
    let old_period = (
        by_version[&1]["period_start"].as_str().unwrap().to_string(),
        by_version[&1]["period_end"].as_str().unwrap().to_string(),
    );
    let preview = bill(&client, &daemon, "acme", &old_period.0, &old_period.1).await;
    assert_eq!(
        (preview["plan_version"].as_u64(), preview["total"].as_str()),
        (Some(1), Some("1.50")),
        "{preview}"
    );
    daemon.stop();
}

/// A plan with a minimum spend and a prepaid commitment: usage records split their amounts into
/// the commitment's drawdown and overage, and when the period closes a settlement record trues it
/// up to the minimum (revised when late usage changes it); every sum equals the bill preview's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimum_spend_is_settled_and_the_prepaid_commitment_draws_down() {
    let plan = r#"
[[plans]]
id = "floor"
currency = "USD"
billing_period = "DAY"
minimum_spend = "5"
prepaid_commitment = "0.75"
[[plans.charges]]
meter = "api_calls"
model = "per_unit"
unit_price = "0.001"
[[tenants]]
id = "acme"
plan = "floor"
"#;
    let dir = tempfile::tempdir().unwrap();
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&write_config(dir.path(), plan));
    let client = client();
    let at = ago(2 * 86_400);
    let (status, _) = post_batch(&client, &daemon, &calls("a", 1000, &at)).await;
    assert_eq!(status, 202);
    let fields = |r: &Value| {
        [
            &r["revision"],
            &r["amount"],
            &r["increment"],
            &r["prepaid"],
            &r["overage"],
        ]
        .map(|v| v.to_string().trim_matches('"').to_string())
        .join(" ")
    };
    let find = |latest: &std::collections::BTreeMap<String, Value>, model: &str| {
        latest.values().find(|r| r["model"] == model).cloned()
    };
    let latest = eventually("usage and settlement records", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        (latest.len() == 2).then_some(latest)
    })
    .await;
    let calls_record = find(&latest, "per_unit").unwrap();
    let settlement = find(&latest, "minimum_spend").unwrap();
    assert_eq!(fields(&calls_record), "1 1.00 1.00 0.75 0.25");
    assert_eq!(fields(&settlement), "1 4.00 4.00 0.00 4.00");
    assert_eq!(settlement["period_amount"], "5.00");

    // Late usage after the period closed: the window's revision, and the true-up shrinks.
    let (status, _) = post_batch(&client, &daemon, &calls("b", 500, &at)).await;
    assert_eq!(status, 202);
    let latest = eventually("revisions", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        let settled = find(&latest, "minimum_spend")?;
        (settled["revision"] == 2).then_some(latest)
    })
    .await;
    assert_eq!(
        fields(&find(&latest, "per_unit").unwrap()),
        "2 1.50 0.50 0.75 0.75"
    );
    assert_eq!(
        fields(&find(&latest, "minimum_spend").unwrap()),
        "2 3.50 -0.50 0.00 3.50"
    );
    let period = find(&latest, "per_unit").unwrap();
    let preview = bill(
        &client,
        &daemon,
        "acme",
        period["period_start"].as_str().unwrap(),
        period["period_end"].as_str().unwrap(),
    )
    .await;
    let sum = |field: &str| latest.values().map(|r| cents(&r[field])).sum::<i64>();
    assert_eq!(sum("amount"), cents(&preview["total"]), "{preview}");
    assert_eq!(sum("prepaid"), cents(&preview["prepaid_used"]));
    assert_eq!(sum("overage"), cents(&preview["overage"]));
    daemon.stop();
}

/// A transaction fee with a per-event minimum and maximum: the meter counts each payment's
/// clamped fee (the aggregate could not: it keeps no events), a per_unit charge at 1 bills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_event_fees_are_clamped_per_payment_and_rated() {
    let extra = r#"
[[meters]]
slug = "payment_fees"
event_type = "payment.captured"
aggregation = "SUM"
value_property = "$.amount"
scale = 2
per_event_fee = { percent = "2.9", min = "0.30", max = "5.00" }
[[plans]]
id = "fees"
currency = "USD"
billing_period = "DAY"
[[plans.charges]]
meter = "payment_fees"
model = "per_unit"
unit_price = "1"
[[tenants]]
id = "shop"
plan = "fees"
"#;
    let dir = tempfile::tempdir().unwrap();
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&write_config(dir.path(), extra));
    let client = client();
    let at = ago(7200);
    let payments: Vec<Value> = ["1.00", "100.00", "50.50", "1000.00"]
        .iter()
        .enumerate()
        .map(|(i, amount)| {
            event(
                &format!("p{i}"),
                "payment.captured",
                "shop",
                &at,
                json!({"amount": amount}),
            )
        })
        .collect();
    let (status, body) = post_batch(&client, &daemon, &payments).await;
    assert_eq!(status, 202, "{body}");
    // 0.30 (minimum) + 2.90 + 1.46 (1.4645) + 5.00 (maximum).
    let record = eventually("the fee record", async || {
        latest_rated(&read_jsonl(&usage)).into_values().next()
    })
    .await;
    assert_eq!(
        (record["quantity"].as_str(), record["amount"].as_str()),
        (Some("9.66"), Some("9.66")),
        "{record}"
    );
    daemon.stop();
}

/// A receiver that redirects or keeps rejecting a batch cannot lose records nor hold back
/// every record behind them: a redirect is never followed (reqwest would turn the POST into a
/// GET, and its 2xx counted as delivered); a batch answered 4xx again and again is parked in
/// `<data_dir>/parked/webhook.jsonl` (counted), the records behind it flow, and
/// `POST /api/v1/outputs/webhook/replay` sends the parked ones once the receiver takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_redirects_or_rejects_parks_records_for_a_replay() {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};
    // 0: redirect every POST; 1: reject (400) batches holding an `api_calls` record; 2: take all.
    let mode = Arc::new(AtomicU8::new(0));
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let gets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let app = {
        let (mode, got, gets) = (mode.clone(), got.clone(), gets.clone());
        axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let (mode, got) = (mode.clone(), got.clone());
                    async move {
                        use axum::response::IntoResponse;
                        let parsed: Value = serde_json::from_slice(&body).unwrap();
                        let records = parsed["records"].as_array().unwrap().clone();
                        match mode.load(Ordering::Acquire) {
                            0 => {
                                (axum::http::StatusCode::FOUND, [("location", "/elsewhere")]).into_response()
                            }
                            1 if records.iter().any(|r| r["meter"] == "api_calls") => {
                                axum::http::StatusCode::BAD_REQUEST.into_response()
                            }
                            _ => {
                                got.lock().unwrap().extend(records);
                                axum::http::StatusCode::NO_CONTENT.into_response()
                            }
                        }
                    }
                }),
            )
            .route(
                "/elsewhere",
                axum::routing::get(move || {
                    let gets = gets.clone();
                    async move {
                        gets.fetch_add(1, Ordering::AcqRel);
                        axum::http::StatusCode::OK
                    }
                }),
            )
    };
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("{PLANS}\n[emit.webhook]\nurl = \"http://{hook}/hook\"\nbatch_size = 1\n"),
    );
    let usage = dir.path().join("data/usage.jsonl");
    let daemon = Daemon::start(&config);
    let client = client();
    let expected = rate_closed_windows(&client, &daemon, &usage).await;
    // Redirected: never followed, nothing counted as delivered.
    eventually("failed attempts", async || {
        metrics_text(&client, &daemon)
            .await
            .contains("tallyd_emit_failures_total{output=\"webhook\"}")
            .then_some(())
    })
    .await;
    assert_eq!(
        gets.load(Ordering::Acquire),
        0,
        "the redirect was followed as a GET"
    );
    assert!(got.lock().unwrap().is_empty());
    // Rejected: the api_calls records are parked after a few attempts; the others flow.
    mode.store(1, Ordering::Release);
    let rejected = expected.values().filter(|r| r["meter"] == "api_calls").count();
    assert!(rejected > 0 && rejected < expected.len());
    eventually("the other tenants' records delivered", async || {
        let latest = latest_rated(&got.lock().unwrap());
        (latest.len() == expected.len() - rejected).then_some(())
    })
    .await;
    let parked = eventually("every rejected record parked", async || {
        let parked = read_jsonl(&dir.path().join("data/parked/webhook.jsonl"));
        (latest_rated(&parked).len() == rejected).then_some(parked)
    })
    .await;
    assert!(metrics_text(&client, &daemon)
        .await
        .contains("tallyd_emit_parked_records_total{output=\"webhook\"}"));
    // Fixed receiver, replay: everything delivered, the parked file emptied.
    mode.store(2, Ordering::Release);
    let response = client
        .post(daemon.url("/api/v1/outputs/webhook/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["parked"].as_u64().unwrap() as usize, parked.len());
    let latest = eventually("every record delivered", async || {
        let latest = latest_rated(&got.lock().unwrap());
        (latest.len() == expected.len()).then_some(latest)
    })
    .await;
    assert_eq!(latest, expected);
    // Emptied once the receiver's answer is back: just after the receiver has the records.
    eventually("the parked file emptied", async || {
        read_jsonl(&dir.path().join("data/parked/webhook.jsonl"))
            .is_empty()
            .then_some(())
    })
    .await;
    let unknown = client
        .post(daemon.url("/api/v1/outputs/nope/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    daemon.stop();
}

/// A quota's threshold crossings go to the webhook too, signed like rated records:
/// `{"kind": "limit", ...}` once at 80 % and once at 100 %, with the exact amounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_thresholds_reach_the_webhook_signed() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let plans = r#"
[[plans]]
id = "capped"
currency = "USD"
[[plans.limits]]
meter = "tokens"
kind = "quota"
limit = "1000"
mode = "soft"
thresholds = [80, 100]
[rating]
default_plan = "capped"
"#;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("{plans}\n[emit.webhook]\nurl = \"http://{hook}/hook\"\nsecret = \"{SECRET}\"\n"),
    );
    let daemon = Daemon::start(&config);
    let tokens = |id: &str, n: i64| {
        event(
            id,
            "llm.prompt",
            "initech",
            &ago(0),
            json!({"tokens": n, "model": "m"}),
        )
    };
    for (id, n) in [("a", 500), ("b", 350), ("c", 100), ("d", 100)] {
        let (status, body) = post_batch(&client(), &daemon, &[tokens(id, n)]).await;
        assert_eq!((status, body["accepted"].as_u64()), (202, Some(1)), "{body}");
    }
    let limits = eventually("two threshold records", async || {
        let limits: Vec<Value> = receiver
            .batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .filter(|record| record["kind"] == "limit")
            .cloned()
            .collect();
        (limits.len() >= 2).then_some(limits)
    })
    .await;
    let seen: Vec<(Value, Value, Value)> = limits
        .iter()
        .map(|record| {
            (
                record["crossed"].clone(),
                record["used"].clone(),
                record["state"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (json!([80]), json!("850"), json!("warning")),
            (json!([100]), json!("1050"), json!("exceeded")),
        ]
    );
    assert_eq!(limits[0]["tenant"], "initech");
    assert_eq!(limits[0]["meter"], "tokens");
    assert_eq!(
        receiver.bad_signatures.load(std::sync::atomic::Ordering::Acquire),
        0
    );
    daemon.stop();
}
