//! A data directory written by tallyd before stored formats carried versions (commit 69d2fd4;
//! `tests/fixtures/upgrade/make.sh` made it) opens with this build and answers exactly what the
//! old build answered over it: the checkpointed store (batch A), the ingest log that was never
//! checkpointed (batch B, replayed), dedup keys, cumulative stream states and rating ledgers.

mod common;

use std::path::Path;

use common::{client, edit_config, Daemon};
use serde_json::{json, Value};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// The embedded default config (the fixture's meters and plans) on a copy of the fixture, with
/// windows far in the past still acceptable (they would be refused as too late otherwise).
fn config(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    copy_dir(&fixture().join("data"), &data);
    let path = dir.join("tallyd.toml");
    std::fs::write(&path, tallyd::config::DEFAULT_CONFIG).unwrap();
    let data = data.display();
    for (from, to) in [
        (
            r#"http_addr = "127.0.0.1:8080""#.to_string(),
            r#"http_addr = "127.0.0.1:0""#.to_string(),
        ),
        (
            r#"otlp_grpc_addr = "127.0.0.1:4317""#.into(),
            r#"otlp_grpc_addr = "127.0.0.1:0""#.into(),
        ),
        (
            r#"otlp_http_addr = "127.0.0.1:4318""#.into(),
            r#"otlp_http_addr = "127.0.0.1:0""#.into(),
        ),
        (
            r#"grpc_addr = "127.0.0.1:8081""#.into(),
            r#"grpc_addr = "127.0.0.1:0""#.into(),
        ),
        (r#"data_dir = "./data""#.into(), format!(r#"data_dir = "{data}""#)),
        (
            r#"path = "./data/usage.jsonl""#.into(),
            format!(r#"path = "{data}/usage.jsonl""#),
        ),
        (
            r#"path = "./data/dead-letter.jsonl""#.into(),
            format!(r#"path = "{data}/dead-letter.jsonl""#),
        ),
        ("retention_days = 400".into(), "retention_days = 36500".into()),
        (
            "max_lateness_secs = 86400".into(),
            "max_lateness_secs = 315360000".into(),
        ),
        (
            "dedup_horizon_secs = 3024000".into(),
            "dedup_horizon_secs = 315360600".into(),
        ),
    ] {
        edit_config(&path, &from, &to);
    }
    path
}

async fn get(client: &reqwest::Client, daemon: &Daemon, path: &str) -> Value {
    let response = client.get(daemon.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_from_before_versioned_formats_answers_as_before() {
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("answers.json")).unwrap()).unwrap();
    let events: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("events.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let daemon = Daemon::start(&config);
    let client = client();
    let answers = recorded["answers"].as_array().unwrap();
    assert!(answers.len() > 10, "the fixture records its answers");
    for answer in answers {
        let path = answer["path"].as_str().unwrap();
        assert_eq!(&get(&client, &daemon, path).await, &answer["body"], "{path}");
    }
    // Every event of both batches was counted: re-sending them is all duplicates, whether its
    // key was checkpointed (batch A) or only replayed from the ingest log (batch B).
    for batch in ["a", "b"] {
        let sent = events["cloudevents"][batch].as_array().unwrap();
        let response = client
            .post(daemon.url("/api/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .json(sent)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["accepted"], json!(0), "batch {batch}: {body}");
        assert_eq!(body["duplicates"], json!(sent.len()), "batch {batch}: {body}");
    }
    // The cumulative stream's state came through too: its last point again adds nothing.
    let (signal, last) = events["otlp"]["b"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| (pair[0].as_str().unwrap(), &pair[1]))
        .find(|(signal, _)| *signal == "metrics")
        .unwrap();
    let otlp = daemon.otlp_http.clone().unwrap();
    let response = client
        .post(format!("http://{otlp}/v1/{signal}"))
        .json(last)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for answer in answers {
        let path = answer["path"].as_str().unwrap();
        assert_eq!(
            &get(&client, &daemon, path).await,
            &answer["body"],
            "{path} after the repeats"
        );
    }
    // And it was recorded in the store's format record, so a later build knows what it holds.
    daemon.stop();
    let db = rocksdb_format(&dir.path().join("data/rocksdb"));
    assert_eq!(db["store_format"], json!(1), "{db}");
    assert_eq!(db["kinds"]["agg_state"], json!(1), "{db}");
}

/// The `M format` record, read with a plain RocksDB handle (read-only).
fn rocksdb_format(path: &Path) -> Value {
    let options = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&options, path).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&options, path, cfs, false).unwrap();
    let bytes = db.get(b"Mformat").unwrap().expect("a format record");
    serde_json::from_slice(&bytes).unwrap()
}
