//! The fuzz targets' committed corpus (`fuzz/corpus/<target>/`), and every finding kept in
//! `fuzz/regressions/<target>/`, replayed through the same entry points (`tallyd::fuzzing`) on
//! stable: each input must be answered, never panic. `scripts/fuzz.sh` runs the fuzzers
//! themselves (nightly, cargo-fuzz) and adds what they find.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("cloudevents", tallyd::fuzzing::cloudevents),
    ("otlp_protobuf", tallyd::fuzzing::otlp_protobuf),
    ("otlp_json", tallyd::fuzzing::otlp_json),
    ("config_toml", tallyd::fuzzing::config_toml),
    ("jsonpath", tallyd::fuzzing::jsonpath),
    ("stored_formats", tallyd::fuzzing::stored_formats),
    ("kafka_message", tallyd::fuzzing::kafka_message),
];

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|entry| entry.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_corpus_input_and_past_finding_is_answered_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seeds");
        for path in corpus.iter().chain(&inputs(&root.join("regressions").join(name))) {
            let data = std::fs::read(path).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                panic!("{name}: {} panics: {panic:?}", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed >= TARGETS.len());
}
