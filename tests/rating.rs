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
