//! `proto/tallyd/rated/v1/rated.proto` and tallyd's protobuf encoding agree: rated records from a
//! real daemon, encoded by tallyd, decode with the code `protoc` (grpcio-tools, installed by
//! `scripts/test.sh`) generates from the .proto into the same fields as the JSON records.

mod common;

use common::rated::*;
use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protoc_decodes_tallyds_protobuf_records_into_the_json_fields() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), PLANS));
    let client = client();
    for batch in closed_window_usage().chunks(500) {
        let (status, body) = post_batch(&client, &daemon, batch).await;
        assert_eq!(status, 202, "{body}");
    }
    let usage = dir.path().join("data/usage.jsonl");
    eventually("15 rated records", async || {
        (latest_rated(&read_jsonl(&usage)).len() == 15).then_some(())
    })
    .await;
    daemon.stop();
    let text = std::fs::read_to_string(&usage).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(r#"{"kind":"rated""#))
        .collect();
    let encoded: Vec<String> = lines
        .iter()
        .map(|line| {
            let bytes = tallyd::emit::proto::encode_line(line.as_bytes()).unwrap();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect();
    let input = dir.path().join("records.hex");
    std::fs::write(&input, encoded.join("\n")).unwrap();

    let proto_root = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let out = dir.path().join("gen");
    std::fs::create_dir_all(&out).unwrap();
    let protoc = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", &format!("-I{proto_root}")])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("{proto_root}/tallyd/rated/v1/rated.proto"))
        .output()
        .expect("python3 runs");
    assert!(
        protoc.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let script = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
from tallyd.rated.v1 import rated_pb2
from google.protobuf.json_format import MessageToDict
for line in open(sys.argv[2]):
    record = rated_pb2.RatedRecord()
    record.ParseFromString(bytes.fromhex(line.strip()))
    print(json.dumps(MessageToDict(record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)))
"#;
    let decoded = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&out)
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        decoded.status.success(),
        "decode: {}",
        String::from_utf8_lossy(&decoded.stderr)
    );
    let decoded: Vec<Value> = String::from_utf8(decoded.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(decoded.len(), lines.len());
    for (json_line, proto) in lines.iter().zip(&decoded) {
        let json: Value = serde_json::from_str(json_line).unwrap();
        // protobuf JSON renders uint32 as numbers and maps as objects: the same shapes.
        assert_eq!(&json, proto, "protobuf and JSON disagree");
    }
}
