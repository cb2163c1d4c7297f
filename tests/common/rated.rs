//! Helpers for tests of rated records: usage in closed windows, the latest revision of every
//! record (what a billing system that upserts holds), amounts in cents.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::*;

/// The example plan plus the seed pricing's per-unit prices (tenant acme: 10 % off).
pub const PLANS: &str = include_str!("../../config/plans.example.toml");

/// The latest revision of every rated record (what a billing system upserting by `record_id`
/// holds), from the usage file's lines.
pub fn latest_rated(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut latest = BTreeMap::<String, Value>::new();
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

pub fn cents(text: &Value) -> i64 {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {text}"));
    let (units, fraction) = text.split_once('.').unwrap_or((text, "00"));
    assert_eq!(fraction.len(), 2, "USD amounts have 2 decimals: {text}");
    units.parse::<i64>().unwrap() * 100
        + units.chars().next().map_or(1, |c| if c == '-' { -1 } else { 1 }) * fraction.parse::<i64>().unwrap()
}

/// Sum of latest amounts per meter, in cents.
pub fn amounts_by_meter(latest: &BTreeMap<String, Value>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for record in latest.values() {
        *out.entry(record["meter"].as_str().unwrap().to_string())
            .or_insert(0) += cents(&record["amount"]);
    }
    out
}

pub async fn bill(client: &reqwest::Client, daemon: &Daemon, tenant: &str, from: &str, to: &str) -> Value {
    let url = daemon.url(&format!(
        "/api/v1/tenants/{tenant}/usage?from={}&to={}",
        from.replace(':', "%3A"),
        to.replace(':', "%3A")
    ));
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

pub fn bill_by_meter(bill: &Value) -> BTreeMap<String, i64> {
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
pub fn closed_window_usage() -> Vec<Value> {
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

/// Starts tallyd with `extra` config (plans, emitters), posts `closed_window_usage` and waits for
/// its 15 rated records in the usage file; returns the daemon and what the file holds.
pub async fn rate_closed_windows(
    dir: &std::path::Path,
    extra: &str,
) -> (Daemon, std::path::PathBuf, BTreeMap<String, Value>) {
    let config = write_config(dir, extra);
    let daemon = Daemon::start(&config);
    let client = client();
    for batch in closed_window_usage().chunks(500) {
        let (status, body) = post_batch(&client, &daemon, batch).await;
        assert_eq!(status, 202, "{body}");
    }
    let usage = dir.join("data/usage.jsonl");
    let expected = eventually("15 rated records", async || {
        let latest = latest_rated(&read_jsonl(&usage));
        (latest.len() == 15).then_some(latest)
    })
    .await;
    (daemon, config, expected)
}
