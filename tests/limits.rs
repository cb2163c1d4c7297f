//! Limits end to end (black box, a real HTTP client): rate limits answer 429 with the draft-10
//! headers and count nothing; hard quotas refuse exactly what would go over, whatever the
//! concurrency, and a kill -9 does not reset them; soft quotas keep accepting and bill the
//! overage; a DAY quota resets at the period boundary (shifted clock).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PLANS: &str = r#"
[[plans]]
id = "free"
currency = "USD"
billing_period = "MONTH"
[[plans.charges]]
meter = "tokens"
model = "per_unit"
unit_price = "0.01"
[[plans.charges]]
meter = "api_calls"
model = "per_unit"
unit_price = "0.001"
[[plans.limits]]
meter = "api_calls"
kind = "rate"
limit = 1
per = "second"
burst = 5
[[plans.limits]]
meter = "tokens"
kind = "quota"
limit = "100"
mode = "hard"
thresholds = [80, 100]

[[plans]]
id = "growth"
currency = "USD"
billing_period = "MONTH"
[[plans.charges]]
meter = "api_calls"
model = "per_unit"
unit_price = "0.001"
[[plans.limits]]
meter = "api_calls"
kind = "quota"
limit = 3
mode = "soft"

[[tenants]]
id = "acme"
plan = "free"
[[tenants]]
id = "globex"
plan = "growth"
"#;

fn call(id: &str, tenant: &str) -> Value {
    event(id, "api.request", tenant, &ago(0), json!({"route": "/v1/x"}))
}

fn tokens(id: &str, tenant: &str, n: i64) -> Value {
    event(
        id,
        "llm.prompt",
        tenant,
        &ago(0),
        json!({"tokens": n, "model": "m"}),
    )
}

async fn post_raw(daemon: &Daemon, events: &[Value]) -> reqwest::Response {
    client()
        .post(daemon.url("/api/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(events).unwrap())
        .send()
        .await
        .unwrap()
}

async fn limits_of(daemon: &Daemon, tenant: &str) -> Value {
    let response = client()
        .get(daemon.url(&format!("/api/v1/tenants/{tenant}/limits")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn limit<'a>(limits: &'a Value, meter: &str, kind: &str) -> &'a Value {
    limits["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|limit| limit["meter"] == meter && limit["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} limit on {meter} in {limits}"))
}

fn metric(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// 1 call a second with a burst of 5: five at once are 202, the sixth is 429 with
/// `Retry-After` and the draft-10 headers and counts nothing; after `Retry-After` it is 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_answers_429_with_its_headers_then_202_after_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), PLANS));
    for n in 0..5 {
        let response = post_raw(&daemon, &[call(&format!("c{n}"), "acme")]).await;
        assert_eq!(response.status(), 202, "call {n}");
    }
    let refused = post_raw(&daemon, &[call("c5", "acme")]).await;
    assert_eq!(refused.status(), 429);
    let header = |name: &str| {
        refused
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(header("retry-after"), "1");
    assert_eq!(header("ratelimit-policy"), "\"api_calls\";q=1;w=1");
    assert!(
        header("ratelimit").starts_with("\"api_calls\";r=0;t="),
        "{}",
        header("ratelimit")
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("tenant `acme`"),
        "{body}"
    );
    // Nothing of the refused request counted; another tenant is not limited by acme's rate.
    let counted = query(&client(), &daemon, "api_calls", "subject=acme").await;
    assert_eq!(sum_rows(&counted), 5);
    assert_eq!(post_raw(&daemon, &[call("g0", "globex")]).await.status(), 202);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(post_raw(&daemon, &[call("c5", "acme")]).await.status(), 202);
    assert_eq!(
        sum_rows(&query(&client(), &daemon, "api_calls", "subject=acme").await),
        6
    );
    // A request larger than the burst can never pass: 429 naming the burst.
    let batch: Vec<Value> = (0..6).map(|n| call(&format!("big{n}"), "acme")).collect();
    let too_big = post_raw(&daemon, &batch).await;
    assert_eq!(too_big.status(), 429);
    let body: Value = too_big.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("larger than the burst of 5"),
        "{body}"
    );
    let metrics = metrics_text(&client(), &daemon).await;
    assert_eq!(
        metric(
            &metrics,
            "tallyd_limit_decisions_total{kind=\"rate\",outcome=\"refused\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &metrics,
            "tallyd_limit_decisions_total{kind=\"rate\",outcome=\"allowed\"}"
        ),
        6
    );
    daemon.stop();
}

/// A hard quota of 100 tokens, 30 concurrent requests of 10: exactly 10 are counted, 20 are
/// refused `quota_exceeded` (listed in the 202, dead-lettered), `used` is the billed quantity,
/// a retry of a counted event is a duplicate (not a refusal), and kill -9 then restart keeps
/// `used` at 100: the next event is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_quota_accepts_exactly_up_to_its_limit_under_concurrency_and_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), PLANS);
    let daemon = Daemon::start(&config);
    let tasks: Vec<_> = (0..30)
        .map(|n| {
            let url = daemon.url("/api/v1/events");
            tokio::spawn(async move {
                let response = client()
                    .post(url)
                    .header("content-type", "application/cloudevents+json")
                    .body(serde_json::to_vec(&tokens(&format!("t{n}"), "acme", 10)).unwrap())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                response.json::<Value>().await.unwrap()
            })
        })
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for task in tasks {
        let body = task.await.unwrap();
        accepted += body["accepted"].as_u64().unwrap();
        for refusal in body["refused"].as_array().unwrap() {
            assert_eq!(refusal["reason"], "quota_exceeded", "{body}");
            assert!(
                refusal["message"].as_str().unwrap().contains("resets at"),
                "{body}"
            );
            refused += 1;
        }
    }
    assert_eq!((accepted, refused), (10, 20));
    let billed = tenant_tokens(&client(), &daemon, "acme").await;
    assert_eq!(billed, 100);
    let usage: Value = client()
        .get(daemon.url("/api/v1/tenants/acme/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let quota = limit(&limits_of(&daemon, "acme").await, "tokens", "quota").clone();
    let tokens_line = usage["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|meter| meter["meter"] == "tokens")
        .unwrap()
        .clone();
    assert_eq!(
        quota["used"], tokens_line["quantity"],
        "used is what rating bills"
    );
    assert_eq!(
        (
            quota["used"].as_str(),
            quota["remaining"].as_str(),
            quota["state"].as_str(),
            quota["mode"].as_str()
        ),
        (Some("100"), Some("0"), Some("exceeded"), Some("hard"))
    );
    assert_eq!(quota["resets_at"], quota["period_end"]);
    // A resend of a counted event is a duplicate; a refused one is refused again.
    let (status, body) = post_batch(&client(), &daemon, &[tokens("t0", "acme", 10)]).await;
    let duplicate_or_refused = (
        body["duplicates"].as_u64(),
        body["refused"].as_array().map(Vec::len),
    );
    assert_eq!(status, 202);
    assert!(
        duplicate_or_refused == (Some(1), Some(0)) || duplicate_or_refused == (Some(0), Some(1)),
        "{body}"
    );
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    let over: Vec<&Value> = dead
        .iter()
        .filter(|line| line["reason"] == "quota_exceeded")
        .collect();
    assert!(over.len() >= 20, "{dead:?}");
    assert_eq!(over[0]["event"]["data"]["tokens"], 10);
    let metrics = metrics_text(&client(), &daemon).await;
    assert_eq!(
        metric(
            &metrics,
            "tallyd_limit_decisions_total{kind=\"quota\",outcome=\"allowed\"}"
        ),
        10
    );
    assert!(
        metric(
            &metrics,
            "tallyd_limit_decisions_total{kind=\"quota\",outcome=\"refused\"}"
        ) >= 20
    );
    assert!(
        metric(
            &metrics,
            "tallyd_ingest_refused_total{source=\"http\",reason=\"quota_exceeded\"}"
        ) >= 20
    );
    // kill -9: the next daemon reads `used` back from what was counted.
    daemon.kill();
    let daemon = Daemon::start(&config);
    let quota = limit(&limits_of(&daemon, "acme").await, "tokens", "quota").clone();
    assert_eq!(quota["used"], "100");
    let (_, body) = post_batch(&client(), &daemon, &[tokens("after-crash", "acme", 1)]).await;
    assert_eq!(body["refused"][0]["reason"], "quota_exceeded", "{body}");
    assert_eq!(tenant_tokens(&client(), &daemon, "acme").await, 100);
    daemon.stop();
}

/// A soft quota of 3 calls keeps accepting past it: everything counts and is billed (the
/// overage), the state says exceeded, and the decisions past the limit are `warned`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_quota_keeps_accepting_and_bills_the_overage() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), PLANS));
    for n in 0..5 {
        let (status, body) = post_batch(&client(), &daemon, &[call(&format!("s{n}"), "globex")]).await;
        assert_eq!((status, body["accepted"].as_u64()), (202, Some(1)), "{body}");
    }
    let quota = limit(&limits_of(&daemon, "globex").await, "api_calls", "quota").clone();
    assert_eq!(
        (
            quota["used"].as_str(),
            quota["remaining"].as_str(),
            quota["state"].as_str(),
            quota["mode"].as_str()
        ),
        (Some("5"), Some("0"), Some("exceeded"), Some("soft"))
    );
    let usage: Value = client()
        .get(daemon.url("/api/v1/tenants/globex/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        usage["meters"][0]["quantity"], "5",
        "the overage is billed: {usage}"
    );
    let metrics = metrics_text(&client(), &daemon).await;
    assert_eq!(
        metric(
            &metrics,
            "tallyd_limit_decisions_total{kind=\"quota\",outcome=\"warned\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &metrics,
            "tallyd_limit_decisions_total{kind=\"quota\",outcome=\"allowed\"}"
        ),
        3
    );
    daemon.stop();
}

/// A DAY quota resets at the tenant's period boundary, not at the first hit: the daemon's
/// clock is shifted to 3 s before UTC midnight; the quota fills, refuses, and after midnight
/// the same tenant is accepted again in the new period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_quota_resets_at_the_period_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let plans = r#"
[[plans]]
id = "daily"
currency = "USD"
billing_period = "DAY"
[[plans.limits]]
meter = "tokens"
kind = "quota"
limit = "10"
[rating]
default_plan = "daily"
"#;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let next_midnight = (now_ms.div_euclid(86_400_000) + 1) * 86_400_000;
    // Started (≈1 s) and filled before midnight on the daemon's clock.
    let offset = next_midnight - 4_000 - now_ms;
    let daemon = Daemon::start_env(
        &write_config(dir.path(), plans),
        &[],
        &[("TALLYD_CLOCK_OFFSET_MS", &offset.to_string())],
    );
    // Events carry no time: they count at the daemon's (shifted) receive time.
    let untimed = |id: &str, n: i64| {
        json!({"specversion": "1.0", "id": id, "source": "t", "type": "llm.prompt",
               "subject": "initech", "data": {"tokens": n, "model": "m"}})
    };
    let (_, body) = post_batch(&client(), &daemon, &[untimed("d1", 10)]).await;
    assert_eq!(body["accepted"], 1, "{body}");
    let (_, body) = post_batch(&client(), &daemon, &[untimed("d2", 1)]).await;
    assert_eq!(body["refused"][0]["reason"], "quota_exceeded", "{body}");
    let before = limit(&limits_of(&daemon, "initech").await, "tokens", "quota").clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, body) = post_batch(&client(), &daemon, &[untimed(&format!("d3-{}", body_id()), 1)]).await;
        if body["accepted"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never reset: {body}");
    }
    let after = limit(&limits_of(&daemon, "initech").await, "tokens", "quota").clone();
    assert_eq!(before["period_end"], after["period_start"], "{before} {after}");
    assert_eq!(after["used"], "1");
    assert_eq!(after["state"], "ok");
    daemon.stop();
}

fn body_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The `.proto` tree the `envoy-types` crate ships (the version Cargo.lock pins), for a client
/// generated independently of tallyd's build.
fn envoy_proto_root() -> std::path::PathBuf {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|package| package.contains("name = \"envoy-types\""))
        .and_then(|package| package.lines().find(|line| line.starts_with("version = ")))
        .map(|line| {
            line.trim_start_matches("version = ")
                .trim_matches('"')
                .to_string()
        })
        .expect("envoy-types in Cargo.lock");
    let cargo_home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    std::fs::read_dir(cargo_home.join("registry/src"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|index| index.path().join(format!("envoy-types-{version}/proto")))
        .find(|path| path.is_dir())
        .expect("the envoy-types sources (cargo fetched them to build tallyd)")
}

/// Stubs for the Python clients, generated by grpcio-tools from Envoy's and tallyd's protos.
fn generate_stubs(dir: &std::path::Path) -> std::path::PathBuf {
    let stubs = dir.join("stubs");
    let generated = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/limits/gen_stubs.py"))
        .arg(&stubs)
        .arg(envoy_proto_root())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/proto"))
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    stubs
}

/// Runs `tests/limits/{script}` with `args`; what it printed (JSON).
fn run_client(daemon: &Daemon, script: &str, args: &[&std::ffi::OsStr]) -> Value {
    let output = std::process::Command::new("python3")
        .arg(format!("{}/tests/limits/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.logs()
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `[limits.tls]`: the limits listener speaks TLS, and a client certificate listed in
/// `[[auth.certificates]]` authenticates an Envoy as its tenant (no key in the metadata): its
/// own tenant is decided, another's refused; no certificate and no key is UNAUTHENTICATED, and
/// plain text gets no answer at all.
#[test]
fn the_limits_listener_serves_tls_and_client_certificates_name_the_tenant() {
    use common::pki::{server_pair, write, Authority};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server_pair();
    let (cert_path, key_path) = (
        write(dir.path(), "server.crt", &cert),
        write(dir.path(), "server.key", &key),
    );
    let authority = Authority::new("gateways");
    let ca_path = write(dir.path(), "clients-ca.pem", &authority.pem());
    authority.issue_client(dir.path(), "acme-gateway", "acme-gateway");
    let extra = format!(
        "[limits.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\nclient_ca_path = \"{}\"\n\
         [[auth.certificates]]\ncommon_name = \"acme-gateway\"\ntenant = \"acme\"\nscopes = [\"ingest\"]\n\
         [[auth.keys]]\nsha256 = \"{}\"\ntenant = \"*\"\nscopes = [\"read\"]\n{PLANS}",
        cert_path.display(),
        key_path.display(),
        ca_path.display(),
        "0".repeat(64)
    );
    let daemon = Daemon::start(&write_config(dir.path(), &extra));
    let stubs = generate_stubs(dir.path());
    let seen = run_client(
        &daemon,
        "tls_client.py",
        &[
            stubs.as_os_str(),
            limits_addr(&daemon),
            cert_path.as_os_str(),
            dir.path().join("acme-gateway.crt").as_os_str(),
            dir.path().join("acme-gateway.key").as_os_str(),
        ],
    );
    assert_eq!(seen["certificate_own_tenant"], "OK", "{seen}");
    assert_eq!(seen["certificate_other_tenant"], "PERMISSION_DENIED", "{seen}");
    assert_eq!(seen["no_certificate"], "UNAUTHENTICATED", "{seen}");
    assert_eq!(seen["plain_text"], "UNAVAILABLE", "{seen}");
}

/// Envoy RLS v3 and tallyd.quota.v1 through clients generated by grpcio-tools from Envoy's and
/// tallyd's `.proto` files: OK then OVER_LIMIT with the right remaining counts, the draft-10
/// headers, keys and tenants enforced, a wrong domain refused; a Watch stream sees the quota
/// pass 80 % (warning) then 100 % (exceeded) as usage is posted, and RLS and Check refuse after.
#[test]
fn envoy_rls_and_quota_watch_decide_from_the_billed_totals() {
    const OPS: &str = "ops-limits-key-7f3a9c";
    const GLOBEX: &str = "globex-limits-key-2b8e41";
    let digest = |key: &str| -> String {
        use sha2::Digest;
        sha2::Sha256::digest(key.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    };
    let keys = format!(
        "[[auth.keys]]\nsha256 = \"{}\"\ntenant = \"*\"\nscopes = [\"ingest\", \"read\"]\n\
         [[auth.keys]]\nsha256 = \"{}\"\ntenant = \"globex\"\nscopes = [\"ingest\", \"read\"]\n",
        digest(OPS),
        digest(GLOBEX)
    );
    // globex's gateway: an envoy meter, 5 hits a minute.
    let gateway =
        "[[tenants.limits]]\nmeter = \"gateway_requests\"\nkind = \"rate\"\nlimit = 5\nper = \"minute\"\n\
                   [[meters]]\nslug = \"gateway_requests\"\nsource = \"envoy\"\naggregation = \"COUNT\"\n";
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), &format!("{keys}{PLANS}{gateway}")));
    let stubs = generate_stubs(dir.path());
    let seen = run_client(
        &daemon,
        "envoy_client.py",
        &[
            stubs.as_os_str(),
            limits_addr(&daemon),
            daemon.addr.as_ref(),
            OPS.as_ref(),
            GLOBEX.as_ref(),
        ],
    );
    eprintln!("{seen:#}");
    let calls = seen["rls_calls"].as_array().unwrap();
    for (n, call) in calls.iter().take(5).enumerate() {
        assert_eq!(call["code"], "OK", "{call}");
        assert_eq!(call["remaining"], 4 - n as u64, "{call}");
        assert_eq!(
            (call["limit"].as_u64(), call["unit"].as_str()),
            (Some(1), Some("SECOND")),
            "{call}"
        );
    }
    assert_eq!(
        (calls[5]["overall"].as_str(), calls[5]["code"].as_str()),
        (Some("OVER_LIMIT"), Some("OVER_LIMIT"))
    );
    assert_eq!(calls[5]["remaining"], 0);
    assert_eq!(calls[5]["headers"]["retry-after"], "1");
    assert_eq!(
        calls[5]["headers"]["ratelimit-policy"],
        "\"api_calls-rate\";q=1;w=1"
    );
    assert!(calls[5]["headers"]["ratelimit"]
        .as_str()
        .unwrap()
        .starts_with("\"api_calls-rate\";r=0;t="));
    assert_eq!(seen["rls_wrong_domain"]["error"], "INVALID_ARGUMENT");
    assert_eq!(seen["rls_other_tenant"]["error"], "PERMISSION_DENIED");
    assert_eq!(seen["rls_no_key"]["error"], "UNAUTHENTICATED");
    assert_eq!(seen["rls_unknown_meter"]["code"], "OK");
    assert_eq!(seen["gateway"], json!(["OK", "OK", "OVER_LIMIT"]));
    assert!(seen["rls_unknown_meter"]["limit"].is_null());
    // RLQS: the first answer, then DENY_ALL pushed when the quota ran out.
    assert_eq!(
        seen["rlqs_first"],
        json!({
            "acme/api_calls": {"action": "token_bucket", "max_tokens": 5, "tokens_per_fill": 1, "fill_interval_ms": 1000},
            "acme/tokens": {"action": "ALLOW_ALL", "ttl_secs": 300},
            "nobody/tokens": {"action": "abandon"},
            "acme/no_such_meter": {"action": "abandon"},
        })
    );
    assert_eq!(seen["rlqs_pushed_deny"]["action"], "DENY_ALL", "{seen}");
    assert!(seen["rlqs_pushed_deny"]["ttl_secs"].as_i64().unwrap() > 0);
    // The quota, watched.
    assert_eq!(seen["watch_initial"], "ok");
    assert_eq!(seen["check_90"], json!({"allowed": true, "used": ["0"]}));
    assert_eq!(seen["watch_warning"], json!({"used": "85", "remaining": "15"}));
    assert_eq!(seen["watch_exceeded"]["used"], "100");
    assert_eq!(seen["watch_exceeded"]["remaining"], "0");
    assert_eq!(
        seen["watch_exceeded"]["resets_at"],
        seen["watch_exceeded"]["period_end"]
    );
    assert_eq!(seen["rls_tokens"]["code"], "OVER_LIMIT");
    assert_eq!(seen["rls_tokens"]["unit"], "MONTH");
    assert_eq!(seen["check_1"], json!({"allowed": false, "used": ["100"]}));
    // GET /limits: a tenant's key reads its own tenant's only.
    let status = |key: &str, tenant: &str| {
        let output = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("authorization: Bearer {key}"))
            .arg(daemon.url(&format!("/api/v1/tenants/{tenant}/limits")))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    assert_eq!(status(GLOBEX, "acme"), "403");
    assert_eq!(status(GLOBEX, "globex"), "200");
    assert_eq!(status(OPS, "acme"), "200");
    // The envoy meter counted the allowed hits (2 + 2), not the denied ones; RLS hits of a
    // CloudEvents meter (api_calls) are not usage.
    let total = |meter: &str, tenant: &str| -> Value {
        let output = std::process::Command::new("curl")
            .args(["-s", "-H"])
            .arg(format!("authorization: Bearer {OPS}"))
            .arg(daemon.url(&format!("/api/v1/meters/{meter}/query?subject={tenant}")))
            .output()
            .unwrap();
        let body: Value = serde_json::from_slice(&output.stdout).unwrap();
        body["data"]
            .as_array()
            .and_then(|rows| rows.first())
            .map_or(json!(0), |row| row["value"].clone())
    };
    assert_eq!(total("gateway_requests", "globex"), json!(4));
    assert_eq!(total("api_calls", "acme"), json!(0));
    let metrics = client_blocking_metrics(&daemon, OPS);
    assert!(
        metrics.contains("tallyd_limits_requests_total{service=\"rls\",code=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tallyd_limit_signals_total{channel=\"watch\"}"),
        "{metrics}"
    );
    daemon.stop();
}

fn client_blocking_metrics(daemon: &Daemon, key: &str) -> String {
    let output = std::process::Command::new("curl")
        .args(["-s", "-H", &format!("authorization: Bearer {key}")])
        .arg(daemon.url("/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// A client naming ever new buckets on one RLQS stream cannot grow the server without bound:
/// a report that takes the stream past `MAX_BUCKETS_PER_STREAM` ends it with
/// RESOURCE_EXHAUSTED naming the limit (nothing of it recorded); a stream within it is answered,
/// one action per bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rlqs_stream_holds_a_bounded_number_of_buckets() {
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaUsageReports};
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), PLANS));
    let url = format!("http://{}", daemon.limits_grpc.as_ref().unwrap());
    let mut client = RateLimitQuotaServiceClient::connect(url).await.unwrap();
    let report = |buckets: std::ops::Range<usize>| RateLimitQuotaUsageReports {
        domain: "tallyd".into(),
        bucket_quota_usages: buckets
            .map(|n| BucketQuotaUsage {
                bucket_id: Some(BucketId {
                    bucket: [
                        ("tenant".to_string(), format!("t{n}")),
                        ("meter".to_string(), "tokens".to_string()),
                    ]
                    .into(),
                }),
                ..Default::default()
            })
            .collect(),
    };
    let max = tallyd::ingest::limits::rlqs::MAX_BUCKETS_PER_STREAM;
    let mut stream = client
        .stream_rate_limit_quotas(tokio_stream::iter(vec![report(0..max + 1)]))
        .await
        .unwrap()
        .into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&max.to_string()), "{status:?}");
    let mut stream = client
        .stream_rate_limit_quotas(tokio_stream::iter(vec![report(0..3)]))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("an answer");
    assert_eq!(first.bucket_action.len(), 3);
    daemon.stop();
}

/// globex's gateway: an envoy meter with a hard quota of `QUOTA` hits and a rate of 1000 a day
/// (less than a unit earned back while a test runs).
const QUOTA: usize = 12;
const GATEWAY_QUOTA: &str =
    "[[tenants.limits]]\nmeter = \"gateway_requests\"\nkind = \"quota\"\nlimit = 12\nmode = \"hard\"\n\
     [[tenants.limits]]\nmeter = \"gateway_requests\"\nkind = \"rate\"\nlimit = 1000\nper = \"day\"\n\
     [[meters]]\nslug = \"gateway_requests\"\nsource = \"envoy\"\naggregation = \"COUNT\"\n";

type RlsClient =
    envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<
        tonic::transport::Channel,
    >;

async fn rls_client(daemon: &Daemon) -> RlsClient {
    RlsClient::connect(format!("http://{}", daemon.limits_grpc.as_ref().unwrap()))
        .await
        .unwrap()
}

/// One hit of globex's gateway.
fn gateway_hit() -> envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };
    let entry = |key: &str, value: &str| Entry {
        key: key.into(),
        value: value.into(),
    };
    envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: "tallyd".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![entry("tenant", "globex"), entry("meter", "gateway_requests")],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

/// Envoy RLS on a `source = "envoy"` meter with a hard quota, many gateways asking at once for
/// its last units: exactly the quota's worth of hits is answered OK, and exactly those are
/// billed. An OK whose hit the record then refused (another call took the last unit between
/// the look and the record) would let a request through that nobody pays for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_hits_racing_for_a_hard_quota_are_allowed_exactly_when_billed() {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    const CALLS: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), &format!("{PLANS}{GATEWAY_QUOTA}")));
    let rls = rls_client(&daemon).await;
    let calls = (0..CALLS).map(|_| {
        let mut rls = rls.clone();
        tokio::spawn(async move { rls.should_rate_limit(gateway_hit()).await.unwrap().into_inner() })
    });
    let mut allowed = 0;
    for call in calls.collect::<Vec<_>>() {
        let response = call.await.unwrap();
        if response.overall_code == Code::Ok as i32 {
            allowed += 1;
        } else {
            assert_eq!(response.overall_code, Code::OverLimit as i32, "{response:?}");
            assert_eq!(response.statuses[0].code, Code::OverLimit as i32, "{response:?}");
            assert_eq!(response.statuses[0].limit_remaining, 0, "{response:?}");
        }
    }
    let billed = sum_rows(&query(&client(), &daemon, "gateway_requests", "subject=globex").await);
    assert_eq!(billed, allowed as i64);
    assert_eq!(allowed, QUOTA, "OK answers against a quota of {QUOTA}");
    // The refused calls took nothing from the rate limit either (1000 a day: less than a
    // unit earned back meanwhile).
    let limits = limits_of(&daemon, "globex").await;
    let rate = limit(&limits, "gateway_requests", "rate");
    assert_eq!(rate["remaining"], json!((1000 - QUOTA).to_string()), "{limits}");
    assert_eq!(
        limit(&limits, "gateway_requests", "quota")["used"],
        json!(QUOTA.to_string())
    );
    daemon.stop();
}

/// An RLS call whose hits cannot be recorded (the push edges' backpressure: too many series
/// waiting for a flush) fails UNAVAILABLE and takes nothing from the rate limit: its hits were
/// not counted, so they use no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rls_call_whose_hits_cannot_be_recorded_takes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &format!("{PLANS}{GATEWAY_QUOTA}"));
    // No flush while the test runs, and backpressure past one pending series.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "flush_interval_ms = 100",
        "flush_interval_ms = 600000\nmax_pending_series = 1",
    );
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::start(&path);
    let mut rls = rls_client(&daemon).await;
    let allowed = rls.should_rate_limit(gateway_hit()).await.unwrap().into_inner();
    assert_eq!(allowed.overall_code, 1, "{allowed:?}");
    let posted = post_raw(&daemon, &[tokens("t1", "acme", 1), call("c1", "globex")]).await;
    assert_eq!(posted.status(), 202);
    let status = rls.should_rate_limit(gateway_hit()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let limits = limits_of(&daemon, "globex").await;
    assert_eq!(
        limit(&limits, "gateway_requests", "rate")["remaining"],
        json!("999"),
        "{limits}"
    );
    daemon.stop();
}

/// Disarms the failpoints and waits for the ingest log to heal: it does by itself, and another
/// tenant's usage shows when.
async fn heal_ingest_log(daemon: &Daemon, failpoints: &std::path::Path) {
    std::fs::remove_file(failpoints).unwrap();
    eventually("ingest to resume", async || {
        (post_raw(daemon, &[tokens(&format!("t-{}", body_id()), "acme", 1)])
            .await
            .status()
            == 202)
            .then_some(())
    })
    .await;
}

/// An RLS caller that hangs up while its hits are being recorded (failpoint
/// `ingest-log-write:stall` holds the record) leaves the rate limit as the record's outcome
/// says, not as the hang-up cut it: a record that then fails gives the call's rate unit back
/// (nothing counted, nothing taken), one that then succeeds keeps it (counted and taken).
/// Before, the hang-up dropped the decision mid-way and nothing gave back what `ask` took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rls_caller_hanging_up_mid_record_leaves_the_rate_as_the_record_says() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &format!("{PLANS}{GATEWAY_QUOTA}"));
    let failpoints = dir.path().join("failpoints");
    let daemon = Daemon::start_env(
        &path,
        &[],
        &[("TALLYD_FAILPOINTS_FILE", failpoints.to_str().unwrap())],
    );
    let mut rls = rls_client(&daemon).await;
    let hang_up = async |rls: &mut RlsClient| {
        let call = tokio::time::timeout(Duration::from_millis(500), rls.should_rate_limit(gateway_hit()));
        assert!(call.await.is_err(), "answered while the record is held");
    };
    let remaining = async || {
        let limits = limits_of(&daemon, "globex").await;
        limit(&limits, "gateway_requests", "rate")["remaining"].clone()
    };
    let billed = async || sum_rows(&query(&client(), &daemon, "gateway_requests", "subject=globex").await);

    // Held, hung up, then failed: nothing counted and the whole rate left.
    std::fs::write(&failpoints, "ingest-log-write:stall").unwrap();
    hang_up(&mut rls).await;
    std::fs::write(&failpoints, "ingest-log-write").unwrap();
    eventually("the failed record's unit given back", async || {
        (remaining().await == json!("1000")).then_some(())
    })
    .await;
    heal_ingest_log(&daemon, &failpoints).await;
    assert_eq!(billed().await, 0);
    assert_eq!(remaining().await, json!("1000"));

    // Held, hung up, then written: counted, and its unit stays taken.
    std::fs::write(&failpoints, "ingest-log-write:stall").unwrap();
    hang_up(&mut rls).await;
    std::fs::remove_file(&failpoints).unwrap();
    eventually("the hung-up call's hit to be billed", async || {
        (billed().await == 1).then_some(())
    })
    .await;
    assert_eq!(remaining().await, json!("999"));
    daemon.stop();
}

/// A request the rate limit allowed but whose commit then failed (the ingest log cannot
/// write: failpoint `ingest-log-write`) is answered 503 and took nothing from the rate limit:
/// nothing of it was counted, so its retry finds the whole burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_at_its_commit_takes_nothing_from_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    // paced: 5 calls a day (less than a unit earned back while the test runs).
    let paced = "[[tenants]]\nid = \"paced\"\nplan = \"free\"\n\
                 [[tenants.limits]]\nmeter = \"api_calls\"\nkind = \"rate\"\nlimit = 5\nper = \"day\"\n";
    let path = write_config(dir.path(), &format!("{PLANS}{paced}"));
    let failpoints = dir.path().join("failpoints");
    let daemon = Daemon::start_env(
        &path,
        &[],
        &[("TALLYD_FAILPOINTS_FILE", failpoints.to_str().unwrap())],
    );
    let calls = |from: usize, n: usize| -> Vec<Value> {
        (from..from + n)
            .map(|i| call(&format!("paced-{i}"), "paced"))
            .collect()
    };
    std::fs::write(&failpoints, "ingest-log-write").unwrap();
    let failed = post_raw(&daemon, &calls(0, 3)).await;
    assert_eq!(failed.status(), 503, "{:?}", failed.text().await);
    let limits = limits_of(&daemon, "paced").await;
    assert_eq!(
        limit(&limits, "api_calls", "rate")["remaining"],
        json!("5"),
        "{limits}"
    );
    heal_ingest_log(&daemon, &failpoints).await;
    let posted = post_raw(&daemon, &calls(0, 5)).await;
    assert_eq!(posted.status(), 202);
    let body: Value = posted.json().await.unwrap();
    assert_eq!(body["accepted"], 5, "{body}");
    assert_eq!(post_raw(&daemon, &calls(5, 1)).await.status(), 429);
    daemon.stop();
}

/// The daemon's limits listener address, as a client script's argument.
fn limits_addr(daemon: &Daemon) -> &std::ffi::OsStr {
    daemon
        .limits_grpc
        .as_deref()
        .expect("the limits listener runs")
        .as_ref()
}
