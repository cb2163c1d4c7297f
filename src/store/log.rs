//! The ingest log: the push sources (HTTP CloudEvents, OTLP) append each accepted batch here and
//! acknowledge only after the append is durable. Recovery replays every record at or after the
//! checkpointed position, so a crash between acknowledgement and checkpoint loses nothing.
//!
//! Layout: `<data_dir>/ingest-log/<first seq, 20 digits>.log`, each record framed as
//! `len u32 LE | crc32 u32 LE (over seq + payload) | seq u64 LE | payload`. A torn record at the
//! tail of the last segment (a crash mid-write, never acknowledged) is cut off on open; a bad
//! record anywhere else is corruption and refuses startup rather than silently losing usage.
//!
//! Payloads are `LogBatch`es (`store::format` kind `log_batch`, v2; v1 records still replay):
//! series deltas already deduplicated and pre-aggregated, with strings instead of process-local
//! ids, plus the dedup keys they consumed and OTLP's raw cumulative points. Replaying them is
//! deterministic: dedup decisions are part of the log, not re-made.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::aggregate::streams::{CumulativePoint, StreamKind};
use crate::aggregate::{AggState, Aggregation, PreAggregated};
use crate::config::LogSync;
use crate::model::{Dims, Names, SeriesKey};

const HEADER_BYTES: usize = 16;
/// What `recover` writes (and removes) to see that the disk takes writes again.
const PROBE_BYTES: usize = 256 << 10;
/// Upper bound on one record; larger frames are treated as corruption.
const MAX_RECORD_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("ingest log io at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "ingest log corrupt in {path} at byte {offset}: {detail}; acknowledged records follow the \
         damage, so it is not an unfinished write and nothing was truncated. To replay every \
         record that is still intact and skip the damaged ones (their usage is lost, and logged), \
         start once with `tallyd run --salvage-ingest-log`; the damaged segment is kept beside \
         the log as `.corrupt`"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
}

/// What `IngestLog::open` does with a damaged record that intact records follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Recovery {
    /// Refuse to open: an operator decides (the default).
    #[default]
    Strict,
    /// Skip the damaged records, replay the rest, keep the damaged segment as `.corrupt` and
    /// rewrite it without them (`tallyd run --salvage-ingest-log`).
    Salvage,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One acknowledged ingest batch as it is logged.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LogBatch {
    pub meters: Vec<String>,
    pub tenants: Vec<String>,
    pub dims: Vec<Dims>,
    pub series: Vec<LogSeries>,
    pub dedup_keys: Vec<u128>,
    /// Raw cumulative points (OTLP): converted to deltas by the commit stage in log order, on
    /// commit and again on replay (`aggregate::streams`). Last, so older records still decode.
    pub cumulative: Vec<LogCumulative>,
}

/// The layout before cumulative points existed; records written by it still replay.
#[derive(Deserialize)]
struct LogBatchV1 {
    meters: Vec<String>,
    tenants: Vec<String>,
    dims: Vec<Dims>,
    series: Vec<LogSeries>,
    dedup_keys: Vec<u128>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LogSeries {
    pub meter: u32,
    pub tenant: u32,
    pub dims: u32,
    pub window_start: i64,
    pub state: AggState,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LogCumulative {
    pub stream: u128,
    pub start_ns: u64,
    pub time_ns: u64,
    pub value: i128,
    pub kind: StreamKind,
    pub meter: u32,
    pub tenant: u32,
    pub dims: u32,
    pub window_start: i64,
    pub aggregation: Aggregation,
}

/// What a record replays into.
#[derive(Debug, Default)]
pub struct LogParts {
    pub batch: PreAggregated,
    pub dedup_keys: Vec<u128>,
    pub cumulative: Vec<CumulativePoint>,
}

/// Per-batch string tables: process-local ids → positions in the record's own tables.
#[derive(Default)]
struct Tables {
    meters: rustc_hash::FxHashMap<u32, u32>,
    tenants: rustc_hash::FxHashMap<u32, u32>,
    dims: rustc_hash::FxHashMap<u32, u32>,
}

impl Tables {
    /// `(meter, tenant, dims)` of `key` in `out`'s tables, adding names as needed.
    fn local(&mut self, out: &mut LogBatch, key: &SeriesKey, names: &Names) -> (u32, u32, u32) {
        let meter = *self.meters.entry(key.meter).or_insert_with(|| {
            out.meters.push(names.meters.resolve(key.meter).to_string());
            out.meters.len() as u32 - 1
        });
        let tenant = *self.tenants.entry(key.tenant).or_insert_with(|| {
            out.tenants.push(names.tenants.resolve(key.tenant).to_string());
            out.tenants.len() as u32 - 1
        });
        let dims = *self.dims.entry(key.dims).or_insert_with(|| {
            out.dims.push(names.dims.resolve(key.dims).to_vec());
            out.dims.len() as u32 - 1
        });
        (meter, tenant, dims)
    }
}

impl LogBatch {
    /// Replaces process-local ids by per-batch string tables.
    pub fn from_batch(batch: &PreAggregated, dedup_keys: &[u128], names: &Names) -> LogBatch {
        LogBatch::from_parts(batch, dedup_keys, &[], names)
    }

    /// `from_batch` with cumulative points.
    pub fn from_parts(
        batch: &PreAggregated,
        dedup_keys: &[u128],
        cumulative: &[CumulativePoint],
        names: &Names,
    ) -> LogBatch {
        let mut out = LogBatch {
            dedup_keys: dedup_keys.to_vec(),
            ..LogBatch::default()
        };
        let mut tables = Tables::default();
        for (key, state) in &batch.series {
            let (meter, tenant, dims) = tables.local(&mut out, key, names);
            out.series.push(LogSeries {
                meter,
                tenant,
                dims,
                window_start: key.window_start,
                state: state.clone(),
            });
        }
        for point in cumulative {
            let (meter, tenant, dims) = tables.local(&mut out, &point.key, names);
            out.cumulative.push(LogCumulative {
                stream: point.stream,
                start_ns: point.start_ns,
                time_ns: point.time_ns,
                value: point.value,
                kind: point.kind,
                meter,
                tenant,
                dims,
                window_start: point.key.window_start,
                aggregation: point.aggregation,
            });
        }
        out
    }

    /// Back to a pre-aggregated batch with this process's ids.
    pub fn into_batch(self, names: &Names) -> Result<(PreAggregated, Vec<u128>), String> {
        let parts = self.into_parts(names)?;
        Ok((parts.batch, parts.dedup_keys))
    }

    /// Back to this process's ids, cumulative points included.
    pub fn into_parts(self, names: &Names) -> Result<LogParts, String> {
        let meters: Vec<u32> = self.meters.iter().map(|m| names.meters.intern(m)).collect();
        let tenants: Vec<u32> = self.tenants.iter().map(|t| names.tenants.intern(t)).collect();
        let dims: Vec<u32> = self.dims.iter().map(|d| names.dims.intern(d)).collect();
        let key = |meter: u32, tenant: u32, dim: u32, window_start: i64| -> Result<SeriesKey, String> {
            let lookup = |table: &[u32], index: u32| table.get(index as usize).copied();
            let (Some(meter), Some(tenant), Some(dims)) = (
                lookup(&meters, meter),
                lookup(&tenants, tenant),
                lookup(&dims, dim),
            ) else {
                return Err("series refers past its batch's string tables".into());
            };
            Ok(SeriesKey {
                meter,
                tenant,
                dims,
                window_start,
            })
        };
        let mut parts = LogParts::default();
        for series in self.series {
            let key = key(series.meter, series.tenant, series.dims, series.window_start)?;
            parts
                .batch
                .merge_state(key, &series.state)
                .map_err(|e| e.to_string())?;
        }
        for point in self.cumulative {
            parts.cumulative.push(CumulativePoint {
                stream: point.stream,
                start_ns: point.start_ns,
                time_ns: point.time_ns,
                value: point.value,
                kind: point.kind,
                key: key(point.meter, point.tenant, point.dims, point.window_start)?,
                aggregation: point.aggregation,
            });
        }
        parts.dedup_keys = self.dedup_keys;
        Ok(parts)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: log batches serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<LogBatch, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|error| match postcard::from_bytes::<LogBatchV1>(bytes) {
            Ok(old) => Ok(LogBatch {
                meters: old.meters,
                tenants: old.tenants,
                dims: old.dims,
                series: old.series,
                dedup_keys: old.dedup_keys,
                cumulative: Vec::new(),
            }),
            Err(_) => Err(error),
        })
    }
}

pub struct IngestLog {
    dir: PathBuf,
    sync: LogSync,
    segment_bytes: u64,
    /// Closed segments `(first seq, path)`, oldest first; deleted once checkpointed.
    closed: Vec<(u64, PathBuf)>,
    current: BufWriter<File>,
    current_path: PathBuf,
    current_first_seq: u64,
    current_len: u64,
    next_seq: u64,
    /// The current segment's length and the next sequence as of the last successful `commit`:
    /// what `recover` rolls back to after a failed write (ENOSPC, EIO).
    committed_len: u64,
    committed_next_seq: u64,
}

/// A record to replay.
pub struct Replayed {
    pub seq: u64,
    pub payload: Vec<u8>,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

impl IngestLog {
    /// Opens (or creates) the log and returns the records with `seq >= from_seq` to replay.
    ///
    /// A damaged frame is a torn tail only when it is the end of the last segment: no intact
    /// record follows it (an unfinished write, never acknowledged: cut off). A damaged frame
    /// that intact records follow is corruption of written data: refused (`Recovery::Strict`),
    /// or skipped with every lost sequence number logged (`Recovery::Salvage`).
    pub fn open(
        dir: &Path,
        sync: LogSync,
        segment_bytes: u64,
        from_seq: u64,
    ) -> Result<(IngestLog, Vec<Replayed>), LogError> {
        IngestLog::open_with(dir, sync, segment_bytes, from_seq, Recovery::Strict)
    }

    /// `open`, deciding what a damaged record that intact records follow means.
    pub fn open_with(
        dir: &Path,
        sync: LogSync,
        segment_bytes: u64,
        from_seq: u64,
        recovery: Recovery,
    ) -> Result<(IngestLog, Vec<Replayed>), LogError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut segments: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().and_then(|e| e.to_str()) != Some("log") {
                continue;
            }
            if let Ok(first_seq) = stem.parse::<u64>() {
                segments.push((first_seq, path));
            }
        }
        segments.sort();

        let mut replay = Vec::new();
        let mut last_seq = None;
        let segment_count = segments.len();
        for (index, (_, path)) in segments.iter().enumerate() {
            let is_last = index + 1 == segment_count;
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut file| file.read_to_end(&mut bytes))
                .map_err(io_error(path))?;
            let mut offset = 0usize;
            // Intact frames of this segment, as (offset, length), for a salvage's rewrite.
            let mut intact: Vec<(usize, usize)> = Vec::new();
            let mut salvaged = false;
            while offset < bytes.len() {
                match parse_frame(&bytes[offset..]) {
                    Ok((seq, payload, frame_len)) => {
                        if seq >= from_seq {
                            replay.push(Replayed {
                                seq,
                                payload: payload.to_vec(),
                            });
                        }
                        last_seq = Some(seq);
                        intact.push((offset, frame_len));
                        offset += frame_len;
                    }
                    Err(detail) => {
                        let next = next_intact_frame(&bytes, offset + 1, last_seq);
                        match (next, is_last, recovery) {
                            // A torn tail: this write never completed, so it was never acknowledged.
                            (None, true, _) => {
                                tracing::warn!(path = %path.display(), offset, %detail, "truncating torn ingest log tail");
                                let file = OpenOptions::new()
                                    .write(true)
                                    .open(path)
                                    .map_err(io_error(path))?;
                                file.set_len(offset as u64).map_err(io_error(path))?;
                                file.sync_all().map_err(io_error(path))?;
                                break;
                            }
                            (next, _, Recovery::Salvage) => {
                                let resume = next.map_or(bytes.len(), |(at, _)| at);
                                let lost = match (last_seq, next) {
                                    (Some(before), Some((_, after))) => format!("{}..{}", before + 1, after),
                                    (None, Some((_, after))) => format!("..{after}"),
                                    (Some(before), None) => format!("{}..", before + 1),
                                    (None, None) => "all".into(),
                                };
                                tracing::error!(
                                    path = %path.display(), offset, skipped_bytes = resume - offset, lost_seqs = %lost,
                                    %detail, "salvaging the ingest log: damaged records skipped, their usage is lost"
                                );
                                salvaged = true;
                                offset = resume;
                            }
                            (_, _, Recovery::Strict) => {
                                return Err(LogError::Corrupt {
                                    path: path.clone(),
                                    offset: offset as u64,
                                    detail,
                                })
                            }
                        }
                    }
                }
            }
            if salvaged {
                rewrite_salvaged(path, &bytes, &intact)?;
            }
        }

        let next_seq = last_seq.map_or(from_seq, |seq| (seq + 1).max(from_seq));
        // Always start a fresh segment: appends never follow a truncated tail.
        let current_path = segment_path(dir, next_seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current_path)
            .map_err(io_error(&current_path))?;
        segments.retain(|(_, path)| *path != current_path);
        let current_len = file.metadata().map_err(io_error(&current_path))?.len();
        sync_dir(dir)?;
        let log = IngestLog {
            dir: dir.to_path_buf(),
            sync,
            segment_bytes,
            closed: segments,
            current: BufWriter::with_capacity(1 << 20, file),
            current_path,
            current_first_seq: next_seq,
            current_len,
            next_seq,
            committed_len: current_len,
            committed_next_seq: next_seq,
        };
        Ok((log, replay))
    }

    /// Buffers one record and returns its sequence number; durable only after `commit`.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        let seq = self.next_seq;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(payload);
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..8].copy_from_slice(&hasher.finalize().to_le_bytes());
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        let path = &self.current_path;
        super::failpoint::check(super::failpoint::INGEST_LOG_WRITE).map_err(io_error(path))?;
        self.current.write_all(&header).map_err(io_error(path))?;
        self.current.write_all(payload).map_err(io_error(path))?;
        self.current_len += (HEADER_BYTES + payload.len()) as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Makes every appended record durable per the sync policy (group commit: one call per batch
    /// of requests).
    pub fn commit(&mut self) -> Result<(), LogError> {
        let path = &self.current_path;
        super::failpoint::check(super::failpoint::INGEST_LOG_WRITE).map_err(io_error(path))?;
        self.current.flush().map_err(io_error(path))?;
        if self.sync == LogSync::Fsync {
            self.current.get_ref().sync_data().map_err(io_error(path))?;
        }
        self.committed_len = self.current_len;
        self.committed_next_seq = self.next_seq;
        Ok(())
    }

    /// After a failed `append` or `commit` (a full disk, an I/O error): drops what was not
    /// committed — the buffered bytes, the part of it that reached the file, the sequence numbers
    /// it took — so that the log ends exactly where the last acknowledged record does, and
    /// appends can go on once the disk can take them. Fails while the file cannot be truncated.
    pub fn recover(&mut self) -> Result<(), LogError> {
        let path = self.current_path.clone();
        let replacement = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        // `into_parts` hands back the unwritten bytes instead of flushing them on drop.
        let (_, _unwritten) =
            std::mem::replace(&mut self.current, BufWriter::with_capacity(1 << 20, replacement)).into_parts();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.set_len(self.committed_len).map_err(io_error(&path))?;
        file.sync_data().map_err(io_error(&path))?;
        self.current_len = self.committed_len;
        self.next_seq = self.committed_next_seq;
        // Truncating frees what the failed write took, so it succeeds on a still-full disk:
        // only a write that reaches the disk says that ingest can go on.
        let probe = self.dir.join(".probe");
        let written = super::failpoint::check(super::failpoint::INGEST_LOG_WRITE)
            .and_then(|()| File::create(&probe))
            .and_then(|mut file| {
                file.write_all(&[0u8; PROBE_BYTES])
                    .and_then(|()| file.sync_data())
            });
        let _ = fs::remove_file(&probe);
        written.map_err(io_error(&probe))
    }

    /// The sequence the next append gets; every record below it has been appended.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Rolls to a new segment when the current one is full, and deletes segments whose records
    /// are all below `checkpointed_seq` (already in the store).
    pub fn maintain(&mut self, checkpointed_seq: u64) -> Result<(), LogError> {
        if self.current_len >= self.segment_bytes {
            self.commit()?;
            let path = segment_path(&self.dir, self.next_seq);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_error(&path))?;
            let old_path = std::mem::replace(&mut self.current_path, path);
            let old_first = std::mem::replace(&mut self.current_first_seq, self.next_seq);
            self.current = BufWriter::with_capacity(1 << 20, file);
            self.current_len = 0;
            self.committed_len = 0;
            self.closed.push((old_first, old_path));
            sync_dir(&self.dir)?;
        }
        // Segment i holds [first_i, first_{i+1}); it can go once first_{i+1} <= checkpointed_seq.
        while !self.closed.is_empty() {
            let next_first = self
                .closed
                .get(1)
                .map_or(self.current_first_seq, |(first, _)| *first);
            if next_first > checkpointed_seq {
                break;
            }
            let (_, path) = self.closed.remove(0);
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
        Ok(())
    }

    pub fn segment_count(&self) -> usize {
        self.closed.len() + 1
    }
}

/// The first intact frame at or after `from` with a sequence number after `last_seq`, as
/// (offset, seq): proof that what precedes it was written in full, not torn.
fn next_intact_frame(bytes: &[u8], from: usize, last_seq: Option<u64>) -> Option<(usize, u64)> {
    (from..bytes.len().saturating_sub(HEADER_BYTES - 1)).find_map(|at| match parse_frame(&bytes[at..]) {
        Ok((seq, _, _)) if last_seq.is_none_or(|last| seq > last) => Some((at, seq)),
        _ => None,
    })
}

/// Keeps a salvaged segment as `<name>.corrupt` and writes its intact frames back under its
/// own name, so that a later start reads the log cleanly.
fn rewrite_salvaged(path: &Path, bytes: &[u8], intact: &[(usize, usize)]) -> Result<(), LogError> {
    let mut kept = path.as_os_str().to_owned();
    kept.push(".corrupt");
    let kept = PathBuf::from(kept);
    fs::rename(path, &kept).map_err(io_error(path))?;
    let mut clean = Vec::with_capacity(bytes.len());
    for (offset, len) in intact {
        clean.extend_from_slice(&bytes[*offset..offset + len]);
    }
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(&clean).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))?;
    Ok(())
}

fn parse_frame(bytes: &[u8]) -> Result<(u64, &[u8], usize), String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!("{} trailing bytes, shorter than a header", bytes.len()));
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if len > MAX_RECORD_BYTES {
        return Err(format!("record length {len} is implausible"));
    }
    let Some(payload) = bytes.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Err(format!("record of {len} bytes is cut short"));
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err("checksum mismatch".into());
    }
    Ok((seq, payload, HEADER_BYTES + len))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Aggregation, Observation};
    use proptest::prelude::*;

    proptest! {
        /// A logged batch replays into exactly the series states that were logged, even in a
        /// process whose ids were interned in another order.
        #[test]
        fn log_batches_round_trip_across_processes(
            entries in proptest::collection::vec((0u8..3, 0u8..5, 0u8..3, -5i64..5, -1000i64..1000), 0..60),
            keys in proptest::collection::vec(any::<u128>(), 0..10),
        ) {
            let (writer_names, reader_names) = (Names::default(), Names::default());
            reader_names.tenants.intern("someone-else-first");
            let mut batch = PreAggregated::default();
            let mut expected = std::collections::BTreeMap::new();
            for (meter, tenant, dim, window, value) in entries {
                let (meter, tenant) = (format!("m{meter}"), format!("t{tenant}"));
                let dims = vec![("k".to_string(), format!("v{dim}"))];
                let key = SeriesKey {
                    meter: writer_names.meters.intern(&meter),
                    tenant: writer_names.tenants.intern(&tenant),
                    dims: writer_names.dims.intern(&dims),
                    window_start: window * 60,
                };
                batch.observe(key, Aggregation::Sum, Observation::Value(value as i128), 0, 0).unwrap();
                *expected.entry((meter, tenant, dims, window * 60)).or_insert(0i128) += value as i128;
            }
            let bytes = LogBatch::from_batch(&batch, &keys, &writer_names).encode();
            let (replayed, replayed_keys) = LogBatch::decode(&bytes).unwrap().into_batch(&reader_names).unwrap();
            prop_assert_eq!(replayed_keys, keys);
            let mut actual = std::collections::BTreeMap::new();
            for (key, state) in replayed.series {
                let name = (
                    reader_names.meters.resolve(key.meter).to_string(),
                    reader_names.tenants.resolve(key.tenant).to_string(),
                    reader_names.dims.resolve(key.dims).to_vec(),
                    key.window_start,
                );
                let AggState::Sum(sum) = state else { panic!("SUM state expected") };
                actual.insert(name, sum.get());
            }
            prop_assert_eq!(actual, expected);
        }
    }

    #[test]
    fn cumulative_points_round_trip_and_old_records_still_decode() {
        let (writer_names, reader_names) = (Names::default(), Names::default());
        reader_names.meters.intern("other");
        let key = SeriesKey {
            meter: writer_names.meters.intern("requests"),
            tenant: writer_names.tenants.intern("acme"),
            dims: writer_names
                .dims
                .intern(&[("route".to_string(), "/a".to_string())]),
            window_start: 120,
        };
        let point = CumulativePoint {
            stream: 99,
            start_ns: 1,
            time_ns: 2,
            value: 42,
            kind: StreamKind::TimeWeighted {
                window_secs: 60,
                max_gap_ms: 900_000,
            },
            key,
            aggregation: Aggregation::Sum,
        };
        let bytes = LogBatch::from_parts(
            &PreAggregated::default(),
            &[5],
            std::slice::from_ref(&point),
            &writer_names,
        )
        .encode();
        let parts = LogBatch::decode(&bytes)
            .unwrap()
            .into_parts(&reader_names)
            .unwrap();
        assert_eq!(parts.dedup_keys, vec![5]);
        let replayed = &parts.cumulative[0];
        assert_eq!(
            (replayed.stream, replayed.value, replayed.key.window_start),
            (99, 42, 120)
        );
        assert_eq!(&*reader_names.meters.resolve(replayed.key.meter), "requests");

        // A record written before cumulative points existed (no trailing field).
        #[derive(Serialize)]
        struct V1 {
            meters: Vec<String>,
            tenants: Vec<String>,
            dims: Vec<Dims>,
            series: Vec<LogSeries>,
            dedup_keys: Vec<u128>,
        }
        let old = postcard::to_stdvec(&V1 {
            meters: vec!["m".into()],
            tenants: vec!["t".into()],
            dims: vec![Vec::new()],
            series: vec![LogSeries {
                meter: 0,
                tenant: 0,
                dims: 0,
                window_start: 60,
                state: AggState::Sum(7.into()),
            }],
            dedup_keys: vec![3],
        })
        .unwrap();
        let decoded = LogBatch::decode(&old).unwrap();
        assert_eq!(
            (decoded.series.len(), decoded.dedup_keys, decoded.cumulative.len()),
            (1, vec![3], 0)
        );
    }

    fn open(dir: &Path, from: u64) -> (IngestLog, Vec<Replayed>) {
        IngestLog::open(dir, LogSync::None, 1 << 20, from).unwrap()
    }

    #[test]
    fn replays_records_from_position_and_survives_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, replay) = open(dir.path(), 0);
        assert!(replay.is_empty());
        for i in 0..5u8 {
            assert_eq!(log.append(&[i; 10]).unwrap(), i as u64);
        }
        log.commit().unwrap();
        drop(log);
        // Simulate a crash mid-append: half a frame at the tail.
        let segment = segment_path(dir.path(), 0);
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[7, 0, 0, 0, 1, 2]).unwrap();
        drop(file);

        let (mut log, replay) = open(dir.path(), 2);
        let seqs: Vec<u64> = replay.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert_eq!(replay[0].payload, vec![2u8; 10]);
        assert_eq!(log.next_seq(), 5);
        assert_eq!(log.append(b"next").unwrap(), 5);
        log.commit().unwrap();
        drop(log);
        let (_, replay) = open(dir.path(), 0);
        assert_eq!(replay.len(), 6);
    }

    #[test]
    fn corruption_before_the_tail_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), 0);
        log.append(&[1; 100]).unwrap();
        log.commit().unwrap();
        drop(log);
        let (mut log, _) = open(dir.path(), 0);
        log.append(&[2; 100]).unwrap();
        log.commit().unwrap();
        drop(log);
        let first = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&first).unwrap();
        bytes[HEADER_BYTES + 5] ^= 0xff;
        fs::write(&first, bytes).unwrap();
        assert!(matches!(
            IngestLog::open(dir.path(), LogSync::None, 1 << 20, 0),
            Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn maintain_rolls_and_deletes_checkpointed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = IngestLog::open(dir.path(), LogSync::None, 1 << 20, 0).unwrap();
        let big = vec![0u8; 600 << 10];
        for _ in 0..4 {
            log.append(&big).unwrap();
            log.commit().unwrap();
            log.maintain(0).unwrap();
        }
        assert!(log.segment_count() >= 2);
        log.maintain(log.next_seq()).unwrap();
        assert_eq!(log.segment_count(), 1);
        drop(log);
        let (log, replay) = IngestLog::open(dir.path(), LogSync::None, 1 << 20, 4).unwrap();
        assert!(replay.is_empty());
        assert_eq!(log.next_seq(), 4);
    }

    /// 1,000 acknowledged records, one byte flipped at 40 % of the segment (SIGKILL keeps the
    /// page cache: every record was written in full). Not a torn tail: intact records follow the
    /// damage, so the log refuses to open rather than cut off 600 acknowledged records, and a
    /// salvage replays every intact record and keeps the damaged segment.
    #[test]
    fn corruption_with_intact_records_after_it_is_refused_then_salvaged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), 0);
        for i in 0..1_000u32 {
            log.append(&i.to_le_bytes().repeat(8)).unwrap();
        }
        log.commit().unwrap();
        drop(log);
        let segment = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let at = bytes.len() * 2 / 5;
        bytes[at] ^= 0x5a;
        std::fs::write(&segment, &bytes).unwrap();

        let refused = IngestLog::open(dir.path(), LogSync::None, 1 << 20, 0);
        let Err(error) = refused else {
            panic!("a corrupt log opened")
        };
        assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("--salvage-ingest-log"), "{error}");
        assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing was truncated");

        let (_, replay) =
            IngestLog::open_with(dir.path(), LogSync::None, 1 << 20, 0, Recovery::Salvage).unwrap();
        assert_eq!(replay.len(), 999, "only the damaged record is lost");
        let seqs: Vec<u64> = replay.iter().map(|record| record.seq).collect();
        let lost: Vec<u64> = (0..1_000).filter(|seq| !seqs.contains(seq)).collect();
        assert_eq!(lost.len(), 1);
        let kept = dir.path().join("00000000000000000000.log.corrupt");
        assert_eq!(
            std::fs::read(kept).unwrap(),
            bytes,
            "the damaged segment is kept as it was"
        );
        // The rewritten segment opens cleanly (no salvage needed again).
        let (_, replay) = open(dir.path(), 0);
        assert_eq!(replay.len(), 999);
    }

    /// A crash mid-write that leaves zeros (a file extended before its data reached the disk) is
    /// a torn tail: nothing intact follows it, so it is cut off and the rest replays.
    #[test]
    fn a_zero_filled_tail_is_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), 0);
        for i in 0..10u8 {
            log.append(&[i; 100]).unwrap();
        }
        log.commit().unwrap();
        drop(log);
        let segment = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let intact = bytes.len();
        bytes.extend(std::iter::repeat_n(0u8, 4096));
        std::fs::write(&segment, &bytes).unwrap();
        let (_, replay) = open(dir.path(), 0);
        assert_eq!(replay.len(), 10);
        assert_eq!(std::fs::metadata(&segment).unwrap().len() as usize, intact);
    }

    /// After a failed write (here: records appended but never committed, part of them already
    /// through the buffer into the file), `recover` rolls the log back to its last commit: the
    /// file ends at the last acknowledged record, sequence numbers are reused, and the next
    /// commit replays as if the failure never happened.
    #[test]
    fn recover_rolls_back_to_the_last_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), 0);
        for i in 0..3u8 {
            log.append(&[i; 10]).unwrap();
        }
        log.commit().unwrap();
        let committed = std::fs::metadata(segment_path(dir.path(), 0)).unwrap().len();
        // 3 MB of uncommitted records: more than the 1 MB buffer, so some reach the file.
        log.append(&vec![7u8; 1_500_000]).unwrap();
        log.append(&vec![8u8; 1_500_000]).unwrap();
        assert!(std::fs::metadata(segment_path(dir.path(), 0)).unwrap().len() > committed);
        log.recover().unwrap();
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 0)).unwrap().len(),
            committed
        );
        assert_eq!(
            log.append(&[9u8; 10]).unwrap(),
            3,
            "the failed records' numbers are reused"
        );
        log.commit().unwrap();
        drop(log);
        let (_, replay) = open(dir.path(), 0);
        let payloads: Vec<Vec<u8>> = replay.into_iter().map(|record| record.payload).collect();
        assert_eq!(
            payloads,
            vec![vec![0u8; 10], vec![1u8; 10], vec![2u8; 10], vec![9u8; 10]]
        );
    }
}
