//! Black-box test harness: starts the real `tallyd` binary on 127.0.0.1:0 with a temp data dir
//! and returns its address (mini-redis `start_server`, but a process, so tests can SIGKILL it).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod kafka;
pub mod otlp;
pub mod pki;
pub mod rated;

/// Meters used by the black-box tests: one per aggregation, from the seed pricing.
pub const METERS: &str = r#"
[[meters]]
slug = "tokens"
event_type = "llm.prompt"
aggregation = "SUM"
value_property = "$.tokens"
group_by = { model = "$.model" }
scale = 0

[[meters]]
slug = "api_calls"
event_type = "api.request"
aggregation = "COUNT"
group_by = { route = "$.route" }

[[meters]]
slug = "data_gb"
event_type = "data.ingested"
aggregation = "SUM"
value_property = "$.gb"
scale = 9

[[meters]]
slug = "mau"
event_type = "user.active"
aggregation = "UNIQUE_COUNT"
value_property = "$.user_id"

[[meters]]
slug = "nodes"
event_type = "node.heartbeat"
aggregation = "MAX"
value_property = "$.nodes"
scale = 0

[[meters]]
slug = "min_free"
event_type = "node.heartbeat"
aggregation = "MIN"
value_property = "$.free_gb"

[[meters]]
slug = "storage_gb"
event_type = "storage.report"
aggregation = "LATEST"
value_property = "$.gb"
window_size = "HOUR"
"#;

pub struct Daemon {
    pub child: Child,
    pub addr: String,
    /// OTLP/gRPC and OTLP/HTTP addresses, when those edges run.
    pub otlp_grpc: Option<String>,
    pub otlp_http: Option<String>,
    /// The limits listener (Envoy RLS, tallyd.quota.v1), when it runs.
    pub limits_grpc: Option<String>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub config_path: PathBuf,
}

/// Replaces one line of a written config (e.g. a default of `write_config`) in place.
pub fn edit_config(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "config has no `{from}`");
    std::fs::write(path, text.replace(from, to)).unwrap();
}

pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let data_dir = dir.join("data");
    let text = format!(
        r#"
[server]
http_addr = "127.0.0.1:0"
otlp_grpc_addr = "127.0.0.1:0"
otlp_http_addr = "127.0.0.1:0"
[storage]
data_dir = "{data}"
[aggregate]
flush_interval_ms = 100
allowed_lateness_secs = 60
max_lateness_secs = 864000
max_future_secs = 300
dedup_horizon_secs = 3024000
[emit.file]
path = "{data}/usage.jsonl"
[dead_letter]
path = "{data}/dead-letter.jsonl"
{limits}
{extra}
{METERS}
"#,
        data = data_dir.display(),
        // The limits listener on a free port, unless the test configures it.
        limits = if extra.contains("[limits]") {
            ""
        } else {
            "[limits]\ngrpc_addr = \"127.0.0.1:0\""
        },
    );
    let path = dir.join("tallyd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Daemon {
    /// Starts tallyd with `config_path` and waits until it listens.
    pub fn start(config_path: &Path) -> Daemon {
        Daemon::start_with(config_path, &[])
    }

    /// `start` with extra command-line flags.
    pub fn start_with(config_path: &Path, flags: &[&str]) -> Daemon {
        Daemon::start_env(config_path, flags, &[])
    }

    /// `start_with` and environment variables (e.g. `TALLYD_CRASH_AT`).
    pub fn start_env(config_path: &Path, flags: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["run", "--config"])
            .arg(config_path)
            .args(["--log-level", "info,tallyd=debug"])
            .args(flags)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tallyd starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line
                    .split("addr=")
                    .nth(1)
                    .map(|addr| addr.split_whitespace().next().unwrap_or("").to_string());
                // The OTLP edges log before the main HTTP server, which comes last.
                let kind = if line.contains("limits grpc listening") {
                    Some("limits")
                } else if line.contains("otlp grpc listening") {
                    Some("grpc")
                } else if line.contains("otlp http listening") {
                    Some("otlp_http")
                } else if line.contains("http listening") {
                    Some("http")
                } else {
                    None
                };
                if let (Some(kind), Some(addr)) = (kind, addr) {
                    let _ = addr_tx.send((kind, addr));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (mut otlp_grpc, mut otlp_http, mut limits_grpc) = (None, None, None);
        let addr = loop {
            match addr_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(("http", addr)) => break addr,
                Ok(("grpc", addr)) => otlp_grpc = Some(addr),
                Ok(("limits", addr)) => limits_grpc = Some(addr),
                Ok((_, addr)) => otlp_http = Some(addr),
                Err(_) => {
                    let _ = child.kill();
                    panic!("tallyd did not start:\n{}", logs.lock().unwrap().join("\n"));
                }
            }
        };
        Daemon {
            child,
            addr,
            otlp_grpc,
            otlp_http,
            limits_grpc,
            logs,
            config_path: config_path.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGTERM and wait for a clean exit (final checkpoint).
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "tallyd exited with {status}:\n{}", self.logs());
                return;
            }
            assert!(Instant::now() < deadline, "tallyd did not stop:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (30 s) for the daemon to exit by itself (a crash point, a fatal fault).
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "tallyd did not exit:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn event(id: &str, event_type: &str, subject: &str, time: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "tests",
        "type": event_type,
        "subject": subject,
        "time": time,
        "data": data,
    })
}

/// RFC 3339 for `now - ago_secs`.
pub fn ago(ago_secs: i64) -> String {
    let ts = chrono::Utc::now() - chrono::Duration::seconds(ago_secs);
    ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub async fn post_batch(client: &reqwest::Client, daemon: &Daemon, events: &[Value]) -> (u16, Value) {
    let response = client
        .post(daemon.url("/api/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(events).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

pub async fn query(client: &reqwest::Client, daemon: &Daemon, slug: &str, params: &str) -> Value {
    let response = client
        .get(daemon.url(&format!("/api/v1/meters/{slug}/query?{params}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "query {slug}?{params}");
    response.json().await.unwrap()
}

/// The single row's value as exact decimal text (values are JSON numbers without float error).
pub fn single_value(result: &Value) -> String {
    let data = result["data"].as_array().expect("data array");
    assert_eq!(data.len(), 1, "expected one row: {result}");
    data[0]["value"].to_string()
}

/// Polls `check` until it returns Some or the deadline passes.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_str(line).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Sum of the integer values of every row of a query result.
pub fn sum_rows(result: &Value) -> i64 {
    result["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["value"].to_string().parse::<i64>().unwrap())
        .sum()
}

/// Sum of a tenant's `tokens` over all windows.
pub async fn tenant_tokens(client: &reqwest::Client, daemon: &Daemon, tenant: &str) -> i64 {
    sum_rows(&query(client, daemon, "tokens", &format!("subject={tenant}")).await)
}

/// Polls until every tenant's `tokens` total is exactly as expected (90 s).
pub async fn wait_for_totals(
    client: &reqwest::Client,
    daemon: &Daemon,
    expected: &std::collections::BTreeMap<String, i64>,
) {
    let mut last = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        last.clear();
        for tenant in expected.keys() {
            last.insert(tenant.clone(), tenant_tokens(client, daemon, tenant).await);
        }
        if &last == expected {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("totals {last:?} never reached {expected:?}\n{}", daemon.logs());
}

/// The Prometheus text of `/metrics`.
pub async fn metrics_text(client: &reqwest::Client, daemon: &Daemon) -> String {
    let response = client.get(daemon.url("/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

/// Posts `body` (a CloudEvents batch) to `daemon` over a raw connection and closes it 5 ms
/// after the last byte, without reading the answer.
pub fn hang_up_after_posting(daemon: &Daemon, body: &[u8]) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(daemon.addr.as_str()).unwrap();
    write!(
        stream,
        "POST /api/v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents-batch+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    std::thread::sleep(Duration::from_millis(5));
}
