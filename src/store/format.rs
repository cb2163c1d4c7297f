//! Versions of what tallyd stores, so that an upgrade (or a downgrade) never misreads a data
//! directory or a replicated record.
//!
//! Every kind of encoded value has a version of its encoding (`KINDS`). The store keeps one
//! format record (`M format`): the store format and, per kind, the version its values are
//! written in: a version byte per stored kind. `check` runs at every open, before anything
//! else is read:
//! - no record, no data: a new store; the record is written;
//! - no record, data: a store written before versions were recorded (their encodings are the
//!   versions below, pinned by the golden-bytes tests), so the record is written as they are;
//! - a record naming a newer store format, an unknown kind, or a kind version this build cannot
//!   read: refused with a message naming what and which build, never read.
//!
//! Values themselves carry no version byte: postcard encodings can begin with any byte, so one
//! could not be added to existing stores without an ambiguity or a rewrite of every value. The
//! rule for changing an encoding instead: bump the kind's version here, keep a reader for the
//! old one (as `log_batch` v1), and migrate the store's values of that kind in `check` before
//! recording the new version. The golden-bytes tests fail on any change to today's encodings.
//! Records that travel outside the store carry their version with them: changelog messages in
//! a `tallyd-format` header, forwarded usage in its `content-type` (`v=1`).

use rocksdb::{IteratorMode, DB};
use serde::{Deserialize, Serialize};

use super::{keys, StoreError};

/// The store's own format (key layout, column families, the meaning of each key kind).
pub const STORE_FORMAT: u32 = 1;

/// Each encoded kind and the version of its encoding this build writes.
pub const KINDS: &[(&str, u8)] = &[
    // `A` values, merge operands, ledger and changelog states (postcard `AggState`).
    ("agg_state", 1),
    // `S` values (postcard `StreamState`).
    ("stream_state", 1),
    // Ingest-log records (postcard `LogBatch`; v1 had no cumulative points and is still read).
    ("log_batch", 2),
    // `L` values (postcard `PeriodEntry`).
    ("period_entry", 1),
    // `C` values (postcard `TenantPeriod`).
    ("tenant_period", 1),
    // `d` values (u64 BE first-seen secs, then u128 BE keys) and `D` values (u64 BE).
    ("dedup_run", 1),
    // Changelog topic messages (postcard `ChangelogChunk`; v1 had no `state` and is still read;
    // v3's `state` may carry `E` lines to re-emit, which v2 readers refuse as unknown keys;
    // v4 adds fences and `epoch`, which v3 readers would ignore: they refuse it instead).
    ("changelog_chunk", 4),
    // Forwarded usage on the ingest topic (postcard `ForwardedUsage`).
    ("forwarded_usage", 1),
    // `O` and `Q` values: JSON window and rated records (their fields are a public contract).
    ("record_json", 1),
    // `M meter/<slug>` values: `aggregation/scale/window_secs`.
    ("meter_shape", 1),
    // `N` values: u64 BE first-seen unix secs.
    ("tenant_source", 1),
];

/// The oldest version of each kind this build still reads.
const OLDEST_READABLE: &[(&str, u8)] = &[("log_batch", 1), ("changelog_chunk", 1)];

/// The changelog message header carrying `changelog_chunk`'s version.
pub const FORMAT_HEADER: &str = "tallyd-format";

/// `M format`.
const META_FORMAT: &str = "format";

/// The format record, as stored (JSON: readable with `ldb` when an operator needs to know).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatRecord {
    pub store_format: u32,
    pub kinds: std::collections::BTreeMap<String, u8>,
    /// The build that wrote the record last (informational).
    pub written_by: String,
}

impl FormatRecord {
    /// What this build writes.
    pub fn current() -> FormatRecord {
        FormatRecord {
            store_format: STORE_FORMAT,
            kinds: KINDS
                .iter()
                .map(|(kind, version)| (kind.to_string(), *version))
                .collect(),
            written_by: concat!("tallyd ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// The version of `kind` this build writes.
pub fn version(kind: &str) -> u8 {
    KINDS
        .iter()
        .find_map(|(known, version)| (*known == kind).then_some(*version))
        .expect("invariant: every stored kind is listed in KINDS")
}

/// Whether this build reads `kind` at `version`.
pub fn readable(kind: &str, version: u8) -> bool {
    let Some((_, newest)) = KINDS.iter().find(|(known, _)| *known == kind) else {
        return false;
    };
    let oldest = OLDEST_READABLE
        .iter()
        .find_map(|(known, oldest)| (*known == kind).then_some(*oldest))
        .unwrap_or(*newest);
    (oldest..=*newest).contains(&version)
}

/// Why a format record cannot be read by this build (None: it can).
pub fn unreadable(record: &FormatRecord) -> Option<String> {
    if record.store_format > STORE_FORMAT {
        return Some(format!(
            "store format {} (written by {}); this build reads up to {STORE_FORMAT}",
            record.store_format, record.written_by
        ));
    }
    let problems: Vec<String> = record
        .kinds
        .iter()
        .filter(|(kind, version)| !readable(kind, **version))
        .map(|(kind, version)| format!("{kind} v{version}"))
        .collect();
    (!problems.is_empty()).then(|| {
        format!(
            "encodings this build cannot read: {} (written by {})",
            problems.join(", "),
            record.written_by
        )
    })
}

fn meta_key() -> Vec<u8> {
    let mut key = vec![keys::META];
    key.extend_from_slice(META_FORMAT.as_bytes());
    key
}

/// Checks (and records) the store's format at open; see the module doc.
pub fn check(db: &DB) -> Result<(), StoreError> {
    let refuse = |detail: String| {
        StoreError::Format(format!(
            "{detail}. The data directory is from another tallyd version: run the build that \
             wrote it, or restore a backup made for this one; nothing was read or changed"
        ))
    };
    match db.get(meta_key())? {
        Some(bytes) => {
            let record: FormatRecord = serde_json::from_slice(&bytes)
                .map_err(|error| refuse(format!("unreadable format record ({error})")))?;
            if let Some(detail) = unreadable(&record) {
                return Err(refuse(detail));
            }
            let current = FormatRecord::current();
            // Older readable versions stay as recorded until a migration rewrites their values.
            let kinds_missing = current.kinds.keys().any(|kind| !record.kinds.contains_key(kind));
            if kinds_missing {
                let mut merged = record.clone();
                for (kind, version) in current.kinds {
                    merged.kinds.entry(kind).or_insert(version);
                }
                write(db, &merged)?;
            }
            Ok(())
        }
        // New, or written before versions were recorded: today's encodings either way.
        None => {
            let legacy = db.iterator(IteratorMode::Start).next().transpose()?.is_some();
            if legacy {
                tracing::info!(
                    "recording the stored formats of a data directory written before they were versioned"
                );
            }
            write(db, &FormatRecord::current())
        }
    }
}

fn write(db: &DB, record: &FormatRecord) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(record).expect("invariant: format records serialize");
    let mut options = rocksdb::WriteOptions::default();
    options.set_sync(true);
    db.put_opt(meta_key(), bytes, &options)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_or_unknown_formats_are_named_and_refused() {
        let current = FormatRecord::current();
        assert_eq!(unreadable(&current), None);
        let mut newer = current.clone();
        newer.store_format = STORE_FORMAT + 1;
        assert!(unreadable(&newer).unwrap().contains("store format 2"));
        let mut kind = current.clone();
        kind.kinds.insert("agg_state".into(), 9);
        assert!(unreadable(&kind).unwrap().contains("agg_state v9"));
        let mut unknown = current.clone();
        unknown.kinds.insert("hologram".into(), 1);
        assert!(unreadable(&unknown).unwrap().contains("hologram v1"));
        let mut old_log = current;
        old_log.kinds.insert("log_batch".into(), 1);
        assert_eq!(unreadable(&old_log), None, "log_batch v1 is still read");
    }

    fn open(dir: &std::path::Path) -> DB {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        DB::open(&options, dir).unwrap()
    }

    #[test]
    fn a_store_records_its_format_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path());
            check(&db).unwrap();
            let stored: FormatRecord = serde_json::from_slice(&db.get(meta_key()).unwrap().unwrap()).unwrap();
            assert_eq!(stored, FormatRecord::current());
            let mut newer = stored;
            newer.store_format += 1;
            newer.written_by = "tallyd 9.0.0".into();
            write(&db, &newer).unwrap();
        }
        let db = open(dir.path());
        let error = check(&db).unwrap_err().to_string();
        assert!(
            error.contains("store format 2 (written by tallyd 9.0.0)"),
            "{error}"
        );
        assert!(error.contains("nothing was read or changed"), "{error}");
    }

    #[test]
    fn a_store_from_before_versions_is_recorded_as_todays_encodings() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        db.put(b"Pingest-log", 7u64.to_be_bytes()).unwrap();
        check(&db).unwrap();
        let stored: FormatRecord = serde_json::from_slice(&db.get(meta_key()).unwrap().unwrap()).unwrap();
        assert_eq!(stored.kinds, FormatRecord::current().kinds);
    }

    /// Golden bytes: today's encoding of every stored kind, pinned. A failure here means an
    /// encoding changed: bump the kind's version in `KINDS`, keep a reader for the old bytes and
    /// migrate (see the module doc) — do not just update the expected bytes.
    mod golden {
        use crate::aggregate::streams::{StreamKind, StreamState};
        use crate::aggregate::{AggState, Aggregation, Observation};
        use crate::rate::record::{PeriodEntry, Settled, TenantPeriod};
        use crate::store::changelog::{ChangelogChunk, SeriesEntry, StateEntry};
        use crate::store::log::{LogBatch, LogCumulative, LogSeries};

        /// The bytes in hex; long ones (a HyperLogLog sketch) as their length and digest.
        fn hex(bytes: &[u8]) -> String {
            if bytes.len() > 256 {
                return format!(
                    "{} bytes, xxh3 {:032x}",
                    bytes.len(),
                    xxhash_rust::xxh3::xxh3_128(bytes)
                );
            }
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }

        fn unhex(text: &str) -> Vec<u8> {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
                .collect()
        }

        fn pinned(kind: &str, bytes: &[u8], expected: &str) {
            assert_eq!(
                hex(bytes),
                expected,
                "{kind}: its encoding changed (see the comment above)"
            );
        }

        fn unique(hashes: &[u64], limit: u32) -> AggState {
            let mut state = AggState::from_observation(
                Aggregation::UniqueCount,
                Observation::Unique(hashes[0]),
                0,
                limit,
            );
            for hash in &hashes[1..] {
                let more = AggState::from_observation(
                    Aggregation::UniqueCount,
                    Observation::Unique(*hash),
                    0,
                    limit,
                );
                state.merge(&more).unwrap();
            }
            state
        }

        fn states() -> Vec<(&'static str, AggState)> {
            let value = |aggregation, value: i128, ts| {
                AggState::from_observation(aggregation, Observation::Value(value), ts, 100)
            };
            let mut distribution = value(Aggregation::Distribution, 1_500, 0);
            distribution
                .merge(&value(Aggregation::Distribution, 250_000, 0))
                .unwrap();
            vec![
                ("sum", value(Aggregation::Sum, 1_234_567_890_123_456_789, 0)),
                ("negative sum", value(Aggregation::Sum, -42, 0)),
                ("count", AggState::Count(300)),
                ("max", value(Aggregation::Max, 7, 0)),
                ("min", value(Aggregation::Min, -3, 0)),
                ("latest", value(Aggregation::Latest, 125, 1_765_000_000_123)),
                ("unique exact", unique(&[3, 1, 2, 1], 100)),
                (
                    "unique sketch",
                    unique(
                        &(1..=5).map(|i| i * 0x9e37_79b9_7f4a_7c15).collect::<Vec<u64>>(),
                        2,
                    ),
                ),
                ("distribution", distribution),
            ]
        }

        #[test]
        fn agg_states_keep_their_encoding() {
            let expected = [
                ("sum", "00aa84ccde8fbd88a222"),
                ("negative sum", "0053"),
                ("count", "01ac02"),
                ("max", "020e"),
                ("min", "0305"),
                ("latest", "04f6c995a3de66fa01"),
                ("unique exact", "05006403010203"),
                (
                    "unique sketch",
                    "16389 bytes, xxh3 11aca7848fa9c3031fd9606264d90935",
                ),
                ("distribution", "0602df0b01ffa70f01"),
            ];
            for ((name, state), (expected_name, bytes)) in states().into_iter().zip(expected) {
                assert_eq!(name, expected_name);
                pinned(&format!("agg_state ({name})"), &state.encode(), bytes);
                assert_eq!(AggState::decode(&state.encode()).unwrap(), state);
            }
        }

        #[test]
        fn stream_states_keep_their_encoding() {
            let state = StreamState {
                start_ns: 1_765_000_000_000_000_000,
                time_ns: 1_765_000_060_000_000_000,
                value: 25_000_000,
            };
            pinned(
                "stream_state",
                &state.encode(),
                "8080c2e4e0c4a2bf1880b0dfa6c0c6a2bf1880e1eb17",
            );
        }

        fn log_batch() -> LogBatch {
            LogBatch {
                meters: vec!["tokens".into(), "requests".into()],
                tenants: vec!["acme".into()],
                dims: vec![vec![("model".into(), "gpt-4".into())], vec![]],
                series: vec![LogSeries {
                    meter: 0,
                    tenant: 0,
                    dims: 0,
                    window_start: 1_765_000_020,
                    state: AggState::Sum(1200.into()),
                }],
                dedup_keys: vec![0x0123_4567_89ab_cdef_0011_2233_4455_6677],
                cumulative: vec![LogCumulative {
                    stream: 99,
                    start_ns: 1_000,
                    time_ns: 2_000,
                    value: 40,
                    kind: StreamKind::Cumulative { monotonic: true },
                    meter: 1,
                    tenant: 0,
                    dims: 1,
                    window_start: 1_765_000_020,
                    aggregation: Aggregation::Sum,
                }],
            }
        }

        #[test]
        fn log_batches_keep_their_encoding() {
            let batch = log_batch();
            pinned("log_batch", &batch.encode(), "0206746f6b656e73087265717565737473010461636d650201056d6f64656c056770742d340001000000a88d9e930d00e01201f7ccd5a2b4c6c88880deb7de9af1d9a2a3020163e807d00f500001010001a88d9e930d00");
            assert_eq!(LogBatch::decode(&batch.encode()).unwrap(), batch);
        }

        #[test]
        fn ledgers_keep_their_encoding() {
            let entry = PeriodEntry {
                plan_id: "payg".into(),
                plan_version: 2,
                discount_percent: "10".into(),
                period_end: 1_767_225_600,
                state: Some(AggState::Sum(2_300.into())),
                rated_quantity: Some("2300".into()),
            };
            pinned(
                "period_entry",
                &entry.encode(),
                "04706179670202313080e4ad950d0100f823010432333030",
            );
            let period = TenantPeriod {
                plan_id: "growth".into(),
                plan_version: 1,
                period_end: 1_767_225_600,
                billed: "140.13".into(),
                settlement: Some(Settled {
                    revision: 1,
                    true_up: "9.87".into(),
                    prepaid: "100.00".into(),
                    overage: "50.00".into(),
                }),
            };
            pinned(
                "tenant_period",
                &period.encode(),
                "0667726f7774680180e4ad950d063134302e3133010104392e3837063130302e30300535302e3030",
            );
        }

        #[test]
        fn dedup_runs_keep_their_encoding() {
            let run = crate::store::dedup::encode_run(&[1, u128::MAX], 1_765_000_000);
            pinned(
                "dedup_run",
                &run,
                "000000006933c34000000000000000000000000000000001ffffffffffffffffffffffffffffffff",
            );
        }

        #[test]
        fn changelog_chunks_keep_their_encoding() {
            let chunk = ChangelogChunk {
                source: "kafka/usage/3".into(),
                flush_id: 77,
                chunk: 0,
                chunks: 1,
                position: 1_000,
                seen_secs: 1_765_000_000,
                series: vec![SeriesEntry {
                    suffix: vec![0, 6, b't', b'o', b'k', b'e', b'n', b's'],
                    state: AggState::Count(4).encode(),
                    revision: 2,
                }],
                dedup_keys: vec![5],
                base: false,
                folded_through: -1,
                dedup_seen: vec![(6, 1_765_000_001)],
                restore_from: 900,
                state: Vec::new(),
                epoch: -1,
            };
            // Version 1 (no `state`): what older builds published, still read.
            let v1 = unhex("0d6b61666b612f75736167652f334d0001e807808d9e930d01080006746f6b656e7302010402010500010106828d9e930d8407");
            assert_eq!(ChangelogChunk::decode_version(&v1, 1).unwrap(), chunk);
            let mut chunk = chunk;
            chunk.state = vec![
                StateEntry {
                    key: vec![b'R', 1],
                    value: Some(vec![0, 0, 0, 2]),
                },
                StateEntry {
                    key: vec![b'T', 2],
                    value: None,
                },
            ];
            // Versions 2 and 3 (no `epoch`), still read.
            let v3 = unhex("0d6b61666b612f75736167652f334d0001e807808d9e930d01080006746f6b656e7302010402010500010106828d9e930d84070202520101040000000202540200");
            assert_eq!(ChangelogChunk::decode_version(&v3, 2).unwrap(), chunk);
            assert_eq!(ChangelogChunk::decode_version(&v3, 3).unwrap(), chunk);
            chunk.epoch = 1_234;
            pinned("changelog_chunk", &chunk.encode(), "0d6b61666b612f75736167652f334d0001e807808d9e930d01080006746f6b656e7302010402010500010106828d9e930d84070202520101040000000202540200a413");
            assert_eq!(ChangelogChunk::decode(&chunk.encode()).unwrap(), chunk);
            assert_eq!(ChangelogChunk::decode_version(&chunk.encode(), 4).unwrap(), chunk);
        }

        #[test]
        fn meter_shapes_keep_their_encoding() {
            let shape = crate::store::MeterShape {
                aggregation: "UNIQUE_COUNT".into(),
                scale: 6,
                window_secs: 60,
            };
            assert_eq!(shape.encode(), "UNIQUE_COUNT/6/60");
        }
    }
}
