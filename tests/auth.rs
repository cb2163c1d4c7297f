//! API keys on every HTTP route (black box, a real HTTP client): who may ingest and read what,
//! 401 versus 403, tenant scoping of ingest and queries, operator keys, key rotation by reload,
//! and the daemon refusing to serve a public listener without keys.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ACME: &str = "acme-key-5d1f0c7a9e";
const GLOBEX: &str = "globex-key-77b2a0c4d1";
const ACME_INGEST_ONLY: &str = "acme-ingest-only-33aa01";
const OPS: &str = "ops-key-c0ffee-0042";

fn sha256(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn keys_section(keys: &[(&str, &str, &[&str])]) -> String {
    let mut text = String::from("[auth]\n");
    for (key, tenant, scopes) in keys {
        let scopes: Vec<String> = scopes.iter().map(|scope| format!("\"{scope}\"")).collect();
        text.push_str(&format!(
            "[[auth.keys]]\nsha256 = \"{}\"\ntenant = \"{tenant}\"\nscopes = [{}]\n",
            sha256(key),
            scopes.join(", ")
        ));
    }
    text
}

fn all_keys() -> String {
    keys_section(&[
        (ACME, "acme", &["ingest", "read"]),
        (GLOBEX, "globex", &["ingest", "read"]),
        (ACME_INGEST_ONLY, "acme", &["ingest"]),
        (OPS, "*", &["read", "admin"]),
    ])
}

async fn post_with(daemon: &Daemon, key: Option<&str>, events: &[Value]) -> (u16, Value) {
    let mut request = client()
        .post(daemon.url("/api/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(events).unwrap());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_with(daemon: &Daemon, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut request = client().get(daemon.url(path));
    if let Some(key) = key {
        // The other accepted form.
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn tokens(id: &str, tenant: &str, tokens: i64) -> Value {
    event(
        id,
        "llm.prompt",
        tenant,
        &ago(30),
        json!({"tokens": tokens, "model": "m"}),
    )
}

fn subjects(result: &Value) -> Vec<String> {
    let mut subjects: Vec<String> = result["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["subject"].as_str().unwrap().to_string())
        .collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_confine_every_route_to_their_tenant_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), &all_keys()));

    // No key, an unknown key: 401 with a Bearer challenge, nothing counted.
    let (status, body) = post_with(&daemon, None, &[tokens("a0", "acme", 5)]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    let response = client()
        .post(daemon.url("/api/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .bearer_auth("not-a-key-0000000000")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");

    // acme's key counts acme's events and refuses the one naming globex (dead-lettered).
    let (status, body) = post_with(
        &daemon,
        Some(ACME),
        &[
            tokens("a1", "acme", 100),
            tokens("a2", "globex", 1000),
            tokens("a3", "acme", 20),
        ],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["refused"][0]["reason"], "wrong_tenant", "{body}");
    assert_eq!(body["refused"][0]["index"], 1, "{body}");
    let dead = eventually("the refused event is dead-lettered", async || {
        let lines = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(dead[0]["reason"], "wrong_tenant", "{dead:?}");
    let (status, _) = post_with(&daemon, Some(GLOBEX), &[tokens("g1", "globex", 7)]).await;
    assert_eq!(status, 202);
    // An ingest-only key and an operator key without `ingest`.
    let (status, _) = post_with(&daemon, Some(ACME_INGEST_ONLY), &[tokens("a4", "acme", 1)]).await;
    assert_eq!(status, 202);
    let (status, body) = post_with(&daemon, Some(OPS), &[tokens("o1", "acme", 1)]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );

    // Reads: a tenant's key sees its own usage only, also without naming a subject.
    let query = "/api/v1/meters/tokens/query";
    let (status, own) = get_with(&daemon, Some(ACME), query).await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(subjects(&own), ["acme"]);
    assert_eq!(sum_rows(&own), 121);
    let (status, body) = get_with(&daemon, Some(ACME), &format!("{query}?subject=globex")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (status, _) = get_with(
        &daemon,
        Some(ACME),
        &format!("{query}?subject=acme&subject=globex"),
    )
    .await;
    assert_eq!(status, 403);
    for path in ["/api/v1/tenants/globex/usage", "/api/v1/rated?tenant=globex"] {
        let (status, body) = get_with(&daemon, Some(ACME), path).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, body) = get_with(&daemon, Some(ACME), "/api/v1/rated").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|record| record["tenant"] == "acme"),
        "{body}"
    );
    // The ingest-only key reads nothing; no key reads nothing.
    let (status, _) = get_with(&daemon, Some(ACME_INGEST_ONLY), query).await;
    assert_eq!(status, 403);
    let (status, _) = get_with(&daemon, None, "/api/v1/meters").await;
    assert_eq!(status, 401);
    // The operator reads every tenant, and may replay an output (404: none configured).
    let (status, all) = get_with(&daemon, Some(OPS), query).await;
    assert_eq!(status, 200);
    assert_eq!(subjects(&all), ["acme", "globex"]);
    let response = client()
        .post(daemon.url("/api/v1/outputs/kafka/replay"))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "admin needs an operator key");
    let response = client()
        .post(daemon.url("/api/v1/outputs/kafka/replay"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Health and metrics need no key; every refusal above is counted, by reason.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(client().get(daemon.url(path)).send().await.unwrap().status(), 200);
    }
    let metrics = metrics_text(&client(), &daemon).await;
    let count = |reason: &str| -> u64 {
        metrics
            .lines()
            .find(|line| {
                line.starts_with("tallyd_auth_failures_total")
                    && line.contains("listener=\"http\"")
                    && line.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("missing_key"), 2, "{metrics}");
    assert_eq!(count("unknown_key"), 1);
    assert_eq!(count("scope"), 3);
    assert_eq!(count("tenant"), 4);
    // Keys never reach the log; their ids (a digest prefix) do.
    let logs = daemon.logs();
    for key in [ACME, GLOBEX, ACME_INGEST_ONLY, OPS] {
        assert!(!logs.contains(key), "a key leaked into the log");
    }
    daemon.stop();
}

/// Rotation without a restart: the config file changes (here: polled; SIGHUP works too), the
/// old key stops working and the new one works, and the running totals are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_with_a_config_reload() {
    let dir = tempfile::tempdir().unwrap();
    let old = keys_section(&[(ACME, "acme", &["ingest", "read"])]);
    let path = write_config(dir.path(), &old);
    let daemon = Daemon::start(&path);
    let (status, _) = post_with(&daemon, Some(ACME), &[tokens("r1", "acme", 5)]).await;
    assert_eq!(status, 202);
    const ROTATED: &str = "acme-key-rotated-9911aa";
    edit_config(&path, &sha256(ACME), &sha256(ROTATED));
    eventually("the old key is refused", async || {
        let (status, _) = get_with(&daemon, Some(ACME), "/api/v1/meters").await;
        (status == 401).then_some(())
    })
    .await;
    let (status, _) = post_with(&daemon, Some(ACME), &[tokens("r2", "acme", 7)]).await;
    assert_eq!(status, 401);
    let (status, _) = post_with(&daemon, Some(ROTATED), &[tokens("r3", "acme", 9)]).await;
    assert_eq!(status, 202);
    let (status, body) = get_with(&daemon, Some(ROTATED), "/api/v1/meters/tokens/query").await;
    assert_eq!((status, sum_rows(&body)), (200, 14), "{body}");
    assert!(daemon.logs().contains("API keys reloaded"), "{}", daemon.logs());
    // A file that would leave a public listener open is refused as a whole: keys stay.
    std::thread::sleep(Duration::from_millis(1100));
    edit_config(&path, "http_addr = \"127.0.0.1:0\"", "http_addr = \"0.0.0.0:0\"");
    edit_config(&path, &sha256(ROTATED), "not-hex");
    std::thread::sleep(Duration::from_millis(2500));
    let (status, _) = post_with(&daemon, Some(ROTATED), &[tokens("r4", "acme", 1)]).await;
    assert_eq!(status, 202, "an invalid file changes nothing");
    daemon.stop();
}

/// Safe by default: a listener other machines can reach, and no keys, is a configuration error
/// (named), unless `auth.allow_unauthenticated` says so.
#[test]
fn a_public_listener_without_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    edit_config(
        &path,
        "otlp_grpc_addr = \"127.0.0.1:0\"",
        "otlp_grpc_addr = \"0.0.0.0:0\"",
    );
    let run = |path: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["run", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let refused = run(&path);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("server.otlp_grpc_addr") && stderr.contains("no API keys"),
        "{stderr}"
    );
    // With keys it starts (validate: the same checks, without serving).
    let keyed = write_config(dir.path(), &all_keys());
    edit_config(
        &keyed,
        "otlp_grpc_addr = \"127.0.0.1:0\"",
        "otlp_grpc_addr = \"0.0.0.0:0\"",
    );
    let validate = |path: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["validate", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    assert!(validate(&keyed).status.success());
    let open = write_config(dir.path(), "[auth]\nallow_unauthenticated = true\n");
    edit_config(&open, "http_addr = \"127.0.0.1:0\"", "http_addr = \"0.0.0.0:0\"");
    assert!(validate(&open).status.success());
    // Malformed keys are named, never echoed.
    let bad = write_config(
        dir.path(),
        "[[auth.keys]]\nsha256 = \"abc\"\ntenant = \"acme\"\nscopes = [\"ingest\", \"write\"]\n",
    );
    let output = validate(&bad);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("auth.keys[0].sha256"), "{stderr}");
    assert!(
        stderr.contains("`write` is not one of ingest, read, admin"),
        "{stderr}"
    );
}

/// `[server.tls]`: the HTTP API over TLS (a client verifying against the certificate gets its
/// answer, a plain-HTTP client none), and a renewed certificate written over the files is
/// served from the next handshake on, without a restart. The client is Python's own TLS stack.
#[test]
fn the_http_api_serves_tls_and_picks_up_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let issue = |name: &str| {
        let (cert, key) = common::pki::server_pair();
        std::fs::write(dir.path().join(format!("{name}.ca.pem")), &cert).unwrap();
        (cert, key)
    };
    let (first_cert, first_key) = issue("first");
    std::fs::write(&cert, &first_cert).unwrap();
    std::fs::write(&key, &first_key).unwrap();
    let tls = format!(
        "[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n{}",
        cert.display(),
        key.display(),
        all_keys()
    );
    let daemon = Daemon::start(&write_config(dir.path(), &tls));
    let port = daemon.addr.rsplit(':').next().unwrap().to_string();
    // Prints the status, or the error's class name.
    let fetch = |scheme: &str, ca: &str| -> String {
        let script = r#"
import ssl, sys, urllib.request
scheme, port, ca, key = sys.argv[1:5]
request = urllib.request.Request(f"{scheme}://localhost:{port}/api/v1/meters", headers={"x-api-key": key})
context = ssl.create_default_context(cafile=ca) if scheme == "https" else None
try:
    print(urllib.request.urlopen(request, context=context, timeout=5).status)
except urllib.error.HTTPError as error:
    print(error.code)
except Exception as error:
    print(type(error).__name__)
"#;
        let output = std::process::Command::new("python3")
            .args(["-c", script, scheme, &port])
            .arg(dir.path().join(format!("{ca}.ca.pem")))
            .arg(ACME)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    assert_eq!(fetch("https", "first"), "200");
    assert_ne!(
        fetch("http", "first"),
        "200",
        "plain HTTP is not served on a TLS listener"
    );
    // Renewal: new files in place; from the next handshake after the recheck on, the new pair.
    let (second_cert, second_key) = issue("second");
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&key, &second_key).unwrap();
    std::fs::write(&cert, &second_cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fetch("https", "second") != "200" {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was never served\n{}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_ne!(
        fetch("https", "first"),
        "200",
        "the old certificate is no longer served"
    );
    assert!(daemon.logs().contains("TLS certificate reloaded"));
    daemon.stop();
}

/// mTLS on the HTTP API: a client certificate signed by `server.tls.client_ca_path`'s CA
/// authenticates as its `[[auth.certificates]]` entry (by subject CN) — its tenant and scopes,
/// exactly like a key; a certificate whose CN is not listed is 401, one from another CA fails
/// the handshake, and a client without a certificate still authenticates by key. The client
/// is Python's TLS stack.
#[test]
fn client_certificates_map_to_tenants() {
    use common::pki::{server_pair, write, Authority};
    let dir = tempfile::tempdir().unwrap();
    let (ca, rogue) = (Authority::new("tallyd clients"), Authority::new("someone else"));
    ca.issue_client(dir.path(), "acme-billing", "acme");
    ca.issue_client(dir.path(), "nobody-listed", "unlisted");
    rogue.issue_client(dir.path(), "acme-billing", "rogue");
    let client_ca = write(dir.path(), "clients-ca.pem", &ca.pem());
    let (cert, key) = server_pair();
    let server_cert = write(dir.path(), "server.crt", &cert);
    let server_key = write(dir.path(), "server.key", &key);
    let config = format!(
        "[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\nclient_ca_path = \"{}\"\n{}\
         [[auth.certificates]]\ncommon_name = \"acme-billing\"\ntenant = \"acme\"\nscopes = [\"ingest\", \"read\"]\n",
        server_cert.display(),
        server_key.display(),
        client_ca.display(),
        all_keys()
    );
    let daemon = Daemon::start(&write_config(dir.path(), &config));
    let port = daemon.addr.rsplit(':').next().unwrap().to_string();
    // POSTs one event for `subject` then queries without a subject; prints both statuses
    // and the subjects seen, or the TLS error's class.
    let call = |certificate: Option<&str>, key: Option<&str>, subject: &str| -> String {
        let script = r#"
import json, ssl, sys, urllib.request
port, ca, cert, api_key, subject = sys.argv[1:6]
context = ssl.create_default_context(cafile=ca)
if cert != "-":
    context.load_cert_chain(cert + ".crt", cert + ".key")
headers = {"content-type": "application/cloudevents+json"}
if api_key != "-":
    headers["x-api-key"] = api_key
event = {"specversion": "1.0", "id": "e-" + cert[-6:] + subject, "source": "mtls", "type": "llm.prompt",
         "subject": subject, "data": {"tokens": 5, "model": "m"}}
out = []
try:
    for request in [
        urllib.request.Request(f"https://localhost:{port}/api/v1/events", data=json.dumps(event).encode(), headers=headers),
        urllib.request.Request(f"https://localhost:{port}/api/v1/meters/tokens/query", headers=headers),
    ]:
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                body = json.load(response)
                out.append(str(response.status))
                if "data" in body:
                    out.append(",".join(sorted({row["subject"] for row in body["data"]})))
                elif body.get("refused"):
                    out.append(body["refused"][0]["reason"])
        except urllib.error.HTTPError as error:
            out.append(str(error.code))
except Exception as error:
    out.append(type(error).__name__)
print(" ".join(out))
"#;
        let cert = certificate.map_or("-".to_string(), |file| {
            dir.path().join(file).display().to_string()
        });
        let output = std::process::Command::new("python3")
            .args(["-c", script, &port])
            .arg(&server_cert)
            .arg(cert)
            .arg(key.unwrap_or("-"))
            .arg(subject)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    // acme's certificate: ingests for acme (globex refused), reads acme only.
    assert_eq!(call(Some("acme"), None, "acme"), "202 200 acme");
    assert_eq!(call(Some("acme"), None, "globex"), "202 wrong_tenant 200 acme");
    // Listed nowhere: 401. Another CA: no handshake.
    assert_eq!(call(Some("unlisted"), None, "acme"), "401 401");
    let rogue = call(Some("rogue"), None, "acme");
    assert!(!rogue.starts_with('2') && !rogue.starts_with('4'), "{rogue}");
    // No certificate: keys as ever (the operator reads everyone).
    assert_eq!(call(None, None, "acme"), "401 401");
    assert_eq!(call(None, Some(GLOBEX), "globex"), "202 200 globex");
    assert_eq!(call(None, Some(OPS), "acme"), "403 200 acme,globex");
    daemon.stop();
}

/// `server.admin_addr`: health, readiness and metrics on a listener of their own, without keys
/// while every API route on it does not exist (a scraper gets no access to usage there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_health_and_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &all_keys());
    edit_config(
        &path,
        "otlp_http_addr = \"127.0.0.1:0\"",
        "otlp_http_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"",
    );
    let daemon = Daemon::start(&path);
    let logs = daemon.logs();
    let admin = logs
        .lines()
        .find(|line| line.contains("admin listening"))
        .and_then(|line| line.split("addr=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no admin listener in:\n{logs}"))
        .to_string();
    let get = |path: &str| {
        let url = format!("http://{admin}{path}");
        async move { client().get(url).send().await.unwrap() }
    };
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get(path).await.status(), 200, "{path}");
    }
    let metrics = get("/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("tallyd_"));
    for path in ["/api/v1/meters", "/api/v1/meters/tokens/query", "/api/v1/rated"] {
        assert_eq!(
            get(path).await.status(),
            404,
            "{path} is not served on the admin listener"
        );
    }
    daemon.stop();
}
