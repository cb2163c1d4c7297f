//! Rating, end to end: events in over HTTP, `GET /api/v1/tenants/{tenant}/usage` prices what was
//! counted with the tenant's plan (the example plan plus the seed per-unit prices).

mod common;

use common::*;
use serde_json::{json, Value};

const PLANS: &str = include_str!("../config/plans.example.toml");

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

/// The latest revision of every rated record (what a billing system upserting by `record_id`
/// holds), from the usage file's lines.
fn latest_rated(lines: &[Value]) -> std::collections::BTreeMap<String, Value> {
    let mut latest = std::collections::BTreeMap::<String, Value>::new();
    for line in lines.iter().filter(|line| line["kind"] == "rated") {
        let id = line["record_id"].as_str().unwrap().to_string();
        let newer = latest
            .get(&id)
            .is_none_or(|held| held["revision"].as_u64() < line["revision"].as_u64());
        if newer {
            latest.insert(id, line.clone());
        }
    }
    latest
}

fn cents(text: &Value) -> i64 {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {text}"));
    let (units, fraction) = text.split_once('.').unwrap_or((text, "00"));
    assert_eq!(fraction.len(), 2, "USD amounts have 2 decimals: {text}");
    units.parse::<i64>().unwrap() * 100
        + units.chars().next().map_or(1, |c| if c == '-' { -1 } else { 1 }) * fraction.parse::<i64>().unwrap()
}

/// Sum of latest amounts per meter, in cents.
fn amounts_by_meter(
    latest: &std::collections::BTreeMap<String, Value>,
) -> std::collections::BTreeMap<String, i64> {
    let mut out = std::collections::BTreeMap::new();
    for record in latest.values() {
        *out.entry(record["meter"].as_str().unwrap().to_string())
            .or_insert(0) += cents(&record["amount"]);
    }
    out
}

async fn bill(client: &reqwest::Client, daemon: &Daemon, tenant: &str, from: &str, to: &str) -> Value {
    let url = daemon.url(&format!(
        "/api/v1/tenants/{tenant}/usage?from={}&to={}",
        urlencode(from),
        urlencode(to)
    ));
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn bill_by_meter(bill: &Value) -> std::collections::BTreeMap<String, i64> {
    bill["meters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|line| cents(&line["amount"]) != 0 || line["quantity"] != "0")
        .map(|line| {
            (
                line["meter"].as_str().unwrap().to_string(),
                cents(&line["amount"]),
            )
        })
        .collect()
}

/// Usage in three closed windows (two hours ago), so every window closes at the first checkpoint.
fn closed_window_usage() -> Vec<Value> {
    let mut events = Vec::new();
    for window in 0..3 {
        let at = ago(7200 + 60 * window);
        for (i, model) in ["m0", "m1"].iter().enumerate() {
            events.push(event(
                &format!("tok-{window}-{i}"),
                "llm.prompt",
                "acme",
                &at,
                json!({"tokens": 1500 + 100 * window, "model": model}),
            ));
        }
        for i in 0..900 {
            events.push(event(
                &format!("call-{window}-{i}"),
                "api.request",
                "acme",
                &at,
                json!({"route": "/v1/chat"}),
            ));
        }
        let users: &[&str] = match window {
            0 => &["ann", "bob"],
            1 => &["bob", "cy"],
            _ => &["ann", "dee", "eve", "fay", "gus"],
        };
        for user in users {
            events.push(event(
                &format!("user-{window}-{user}"),
                "user.active",
                "acme",
                &at,
                json!({"user_id": user}),
            ));
        }
        events.push(event(
            &format!("gb-{window}"),
            "data.ingested",
            "acme",
            &at,
            json!({"gb": "1.15"}),
        ));
    }
    events
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
