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
    // Changelog topic messages (postcard `ChangelogChunk`).
    ("changelog_chunk", 1),
    // Forwarded usage on the ingest topic (postcard `ForwardedUsage`).
    ("forwarded_usage", 1),
    // `O` and `Q` values: JSON window and rated records (their fields are a public contract).
    ("record_json", 1),
    // `M meter/<slug>` values: `aggregation/scale/window_secs`.
    ("meter_shape", 1),
];

/// The oldest version of each kind this build still reads.
const OLDEST_READABLE: &[(&str, u8)] = &[("log_batch", 1)];

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
}
