//! Entry points for fuzzing every decoder of untrusted bytes. The cargo-fuzz targets in `fuzz/`
//! call these with the fuzzer's input, and `tests/fuzz_corpus.rs` replays the committed corpus
//! through the same functions on stable, so a finding stays fixed.
//!
//! Each function must return normally for any input: an error is an answer, a panic a finding.

use std::sync::{Arc, OnceLock};

use crate::config::{Config, DEFAULT_CONFIG};
use crate::ingest::decode::{self, BodyKind};
use crate::meter::{JsonPath, Meters};
use crate::model::{now_ms, Names};

/// The embedded default config's meters, interned once.
struct Fixture {
    config: Config,
    names: Names,
    meters: Meters,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = Config::load(DEFAULT_CONFIG, &Default::default())
            .expect("invariant: the default config is valid");
        let names = Names::default();
        let meters = Meters::new(config.meters.clone(), &names);
        Fixture {
            config,
            names,
            meters,
        }
    })
}

/// CloudEvents JSON as the HTTP edge and the Kafka source read it.
pub fn cloudevents(data: &[u8]) {
    let fixture = fixture();
    for kind in [BodyKind::Single, BodyKind::Batch, BodyKind::Either] {
        if let Ok(raw) = decode::split_body(data, kind) {
            let _ = decode::decode_events(
                &raw,
                &fixture.meters,
                &fixture.names,
                now_ms(),
                fixture.config.acceptance(),
                None,
            );
        }
    }
}

fn map_context(fixture: &Fixture) -> crate::ingest::otlp::map::MapContext<'_> {
    crate::ingest::otlp::map::MapContext {
        meters: &fixture.meters,
        names: &fixture.names,
        tenant_attribute: &fixture.config.otlp.tenant_attribute,
        key_tenant: None,
        now_ms: now_ms(),
        acceptance: fixture.config.acceptance(),
    }
}

/// An OTLP export as protobuf: metrics and logs, decoded and mapped.
pub fn otlp_protobuf(data: &[u8]) {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use prost::Message;
    let fixture = fixture();
    if let Ok(request) = ExportMetricsServiceRequest::decode(data) {
        let _ = crate::ingest::otlp::map::map_metrics(&request, &map_context(fixture));
    }
    if let Ok(request) = ExportLogsServiceRequest::decode(data) {
        let _ = crate::ingest::otlp::map::map_logs(&request, &map_context(fixture));
    }
}

/// An OTLP export as OTLP/JSON.
pub fn otlp_json(data: &[u8]) {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    let fixture = fixture();
    if let Ok(request) = serde_json::from_slice::<ExportMetricsServiceRequest>(data) {
        let _ = crate::ingest::otlp::map::map_metrics(&request, &map_context(fixture));
    }
    if let Ok(request) = serde_json::from_slice::<ExportLogsServiceRequest>(data) {
        let _ = crate::ingest::otlp::map::map_logs(&request, &map_context(fixture));
    }
}

/// A config file (with no environment).
pub fn config_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::load(text, &Default::default());
    }
}

/// A JSONPath (the first line) applied to a JSON document (the rest).
pub fn jsonpath(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, document) = text.split_once('\n').unwrap_or((text, "{}"));
    if let (Ok(path), Ok(document)) = (
        JsonPath::parse(path),
        serde_json::from_str::<serde_json::Value>(document),
    ) {
        let _ = path.select(&document);
        let _ = path.field_name();
    }
}

/// Every stored kind's decoder (`store::format::KINDS`), and what is done with what decodes.
pub fn stored_formats(data: &[u8]) {
    use crate::aggregate::streams::StreamState;
    use crate::aggregate::AggState;
    use crate::rate::record::{PeriodEntry, TenantPeriod};
    use crate::store::changelog::ChangelogChunk;
    use crate::store::log::LogBatch;
    let fixture = fixture();
    if let Ok(state) = AggState::decode(data) {
        let mut merged = state.clone();
        let _ = merged.merge(&state);
        let _ = state.encode();
        let _ = state.value_string(6);
    }
    let _ = StreamState::decode(data);
    if let Ok(batch) = LogBatch::decode(data) {
        let _ = batch.into_parts(&fixture.names);
    }
    for version in [1, 2] {
        if let Ok(chunk) = ChangelogChunk::decode_version(data, version) {
            for entry in &chunk.series {
                let _ = crate::store::keys::decode_series_suffix(&entry.suffix);
                let _ = AggState::decode(&entry.state);
            }
        }
    }
    if let Ok(usage) = crate::cluster::forward::ForwardedUsage::decode(data) {
        let _ = usage.intern(&fixture.names, &fixture.meters);
    }
    let _ = PeriodEntry::decode(data);
    if let Ok(period) = TenantPeriod::decode(data) {
        let _ = period.total();
    }
    let _ = crate::store::keys::decode_series_suffix(data);
}

/// A Kafka message's payload and headers through the source's fold (decode, dead letters,
/// dedup claims, pre-aggregation) on a scratch store. Input: a flags byte (bit 0: the
/// forwarded-usage content type; bit 1: a signature header follows, 64 bytes), then the
/// optional signature, then the payload.
pub fn kafka_message(data: &[u8]) {
    static STAGES: OnceLock<crate::pipeline::Stages> = OnceLock::new();
    let stages = STAGES.get_or_init(|| {
        // A scratch data directory of this process (left behind: fuzzing runs are throwaway).
        let dir = std::env::temp_dir().join(format!("tallyd-fuzz-{}", std::process::id()));
        let env = [("TALLYD__STORAGE__DATA_DIR".to_string(), dir.display().to_string())]
            .into_iter()
            .collect();
        let mut config = Config::load(DEFAULT_CONFIG, &env).expect("invariant: the default config is valid");
        config.emit_file_path = dir.join("usage.jsonl");
        config.dead_letter_path = dir.join("dead-letter.jsonl");
        config.flush_interval_ms = 3_600_000;
        crate::pipeline::Stages::start(config).expect("the stages start")
    });
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (signature, payload) = if flags & 2 != 0 && rest.len() >= 64 {
        (Some(rest[..64].to_vec()), &rest[64..])
    } else {
        (None, rest)
    };
    let message = crate::ingest::kafka::KafkaMessage {
        topic: Arc::from("usage"),
        partition: 0,
        offset: 0,
        timestamp_ms: now_ms(),
        key: None,
        payload: Some(payload.to_vec()),
        header_id: None,
        forwarded: flags & 1 != 0,
        signature,
    };
    let folder = crate::ingest::kafka::Folder::new(stages.shared.clone(), false);
    let folded = folder.fold(std::slice::from_ref(&message));
    // Claims are released as a failed commit would: the index does not grow run after run.
    let keys: Vec<u128> = folded.dedup_keys().collect();
    stages.shared.dedup.remove_all(&keys);
}
