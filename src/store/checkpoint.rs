//! One checkpoint = one RocksDB WriteBatch holding, atomically:
//! the changed series (merge operands), their new dedup keys (one value, see `dedup`), the
//! ingest-log position they reflect, the checkpoint generation,
//! the close index for still-open windows, and the window records of windows that closed (or were
//! amended by late events) with their revisions and their rated records (`rated`), queued in
//! the outbox for the emitters.
//!
//! A crash before the batch commits loses nothing (the ingest log is replayed from the previous
//! position); after it commits, the log up to the position may be deleted.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use xxhash_rust::xxh3::xxh3_128;

use super::changelog::{
    chunk_flush_with_state, flush_id, ChangelogChunk, SeriesEntry, StateEntry, STATE_KINDS,
};
use super::keys;
use super::{MeterCatalog, RocksStore, StoreError, META_CLOSED_BEFORE, META_GENERATION, META_OUTBOX_NEXT};
use crate::aggregate::{AggState, SourceCut};
use crate::model::{rfc3339, Names, SeriesKey};
use crate::rate::record::{ClosedWindow, WindowRecord};

/// What the engine hands to a checkpoint: every delta since the previous one.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Cut number (increasing), so a stage can wait until its own cut is durable.
    pub generation: u64,
    /// Where each source resumes after a restart (`ingest-log` → next log sequence,
    /// `kafka/<topic>/<partition>` → next offset): exactly what `deltas` reflect.
    pub positions: Vec<(String, u64)>,
    pub deltas: Vec<(SeriesKey, AggState)>,
    pub dedup_keys: Vec<u128>,
    /// Cumulative stream states the deltas were derived with (OTLP), durable with `positions`;
    /// `None`: the stream was forgotten (`Streams::expire`).
    pub streams: Vec<(u128, Option<crate::aggregate::streams::StreamState>)>,
    /// What each replicated source (Kafka partition with a changelog) contributed.
    pub sources: Vec<SourceCut>,
}

impl Snapshot {
    pub fn position(&self, source: &str) -> Option<u64> {
        self.positions
            .iter()
            .find_map(|(name, next)| (name == source).then_some(*next))
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CheckpointStats {
    pub series: usize,
    pub dedup_keys: usize,
    pub records: usize,
    /// Rated records among `records`' windows (tenants with a plan charging the meter).
    pub rated: usize,
    pub amended: usize,
    /// Lines a restore left to re-emit, moved to the outbox.
    pub reemitted: usize,
    /// Windows of split tenants closed without a record (`TenantSources::is_split`).
    pub held: usize,
    pub bytes: usize,
}

/// A close-index key this process wrote: its window end and a 128-bit digest of the key. Held
/// inline in the set: a set of byte strings cost two cache misses and a compare per changed
/// series (a tenth of a checkpoint's time); 128 bits make a collision, which would leave a window
/// unclosed, as unlikely as a dedup-key collision.
pub(super) type IndexedWindow = (i64, u128);

/// The outbox lines a checkpoint writes, from the next free sequence; `carried` (cluster mode)
/// keeps each with its tenant for the flushes.
struct OutboxLines {
    next: u64,
    carried: Option<Vec<(String, u64, Vec<u8>)>>,
}

impl OutboxLines {
    fn put(&mut self, batch: &mut WriteBatch, tenant: &str, line: Vec<u8>) {
        batch.put(keys::outbox_key(self.next), &line);
        if let Some(carried) = &mut self.carried {
            carried.push((tenant.to_string(), self.next, line));
        }
        self.next += 1;
    }
}

/// A checkpoint built but not yet written: its WriteBatch and what committing it changes.
pub struct CheckpointBatch {
    batch: WriteBatch,
    generation: u64,
    /// The snapshot's dedup keys, in arrival order.
    dedup_run: Vec<u128>,
    seen_secs: i64,
    /// Close-index keys this batch writes, remembered once it commits.
    new_index: FxHashSet<IndexedWindow>,
    closed_before: i64,
    outbox_next: u64,
    /// `reemit_restored` when this batch moved the `E` keys to the outbox.
    reemit_seen: Option<u64>,
    pub stats: CheckpointStats,
    /// To publish (and have acknowledged) before the batch commits.
    pub changelog: Vec<ChangelogChunk>,
    /// (tenant, source) pairs this batch records (`store::tenants`).
    tenant_sources: super::tenants::NewPairs,
}

impl RocksStore {
    /// Builds the checkpoint batch. Reads the store (for closing windows' totals and revisions)
    /// but writes nothing; only the checkpoint thread calls it, so reads see no concurrent writer.
    pub fn prepare_checkpoint(
        &self,
        snapshot: &Snapshot,
        names: &Names,
        catalog: &MeterCatalog,
        now_secs: i64,
        allowed_lateness_secs: i64,
        plans: &crate::rate::plan::Plans,
    ) -> Result<CheckpointBatch, StoreError> {
        let mut batch = WriteBatch::default();
        let mut rating = super::rated::RatingBatch::new(plans, now_secs);
        let closed_before_old = self.closed_before.load(Ordering::Acquire);
        let closed_before_new = closed_before_old.max(now_secs - allowed_lateness_secs);
        let mut stats = CheckpointStats::default();

        // Series whose record must be (re)emitted by this checkpoint, with their unflushed delta.
        let mut to_emit: Vec<(Vec<u8>, Option<&AggState>)> = Vec::new();
        let mut closing_with_delta: HashMap<Vec<u8>, &AggState> = HashMap::new();
        // Series of `to_emit` that are amendments (late deltas into windows past the watermark).
        let mut amended: FxHashSet<Vec<u8>> = FxHashSet::default();
        // Close-index keys written by earlier checkpoints of this process need not be rewritten:
        // that halves the keys per changed series in steady state.
        let indexed = self.indexed_windows.lock();
        let mut new_index: FxHashSet<IndexedWindow> = FxHashSet::default();
        // Id → name lookups take the interner's lock; a checkpoint resolves each id once.
        let mut meters: FxHashMap<u32, (Arc<str>, i64)> = FxHashMap::default();
        let mut tenants: FxHashMap<u32, Arc<str>> = FxHashMap::default();
        let mut dim_sets: FxHashMap<u32, Arc<[(String, String)]>> = FxHashMap::default();
        // Every changed series' `A` key and encoded delta go into one buffer, `merges` holding
        // (key start, value start, end) of each: three allocations per series and their frees
        // were a quarter of a checkpoint's time.
        let mut arena: Vec<u8> = Vec::with_capacity(snapshot.deltas.len() * 64);
        let mut merges: Vec<(usize, usize, usize)> = Vec::with_capacity(snapshot.deltas.len());
        let mut index_key: Vec<u8> = Vec::new();
        // Series of replicated sources: their suffix and delta, for the changelog.
        let replicated = !snapshot.sources.is_empty();
        let mut suffixes: FxHashMap<SeriesKey, (Vec<u8>, &AggState)> = FxHashMap::default();
        for (key, delta) in &snapshot.deltas {
            let (meter, window_secs) = match meters.entry(key.meter) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(vacant) => {
                    let meter = names.meters.resolve(key.meter);
                    let window_secs =
                        catalog
                            .get(&*meter)
                            .map(|shape| shape.window_secs)
                            .ok_or_else(|| StoreError::Corrupt {
                                what: "meter catalog",
                                detail: format!("no shape for meter `{meter}`"),
                            })?;
                    vacant.insert((meter, window_secs))
                }
            };
            let tenant = tenants
                .entry(key.tenant)
                .or_insert_with(|| names.tenants.resolve(key.tenant));
            let dims = dim_sets
                .entry(key.dims)
                .or_insert_with(|| names.dims.resolve(key.dims));
            let start = arena.len();
            arena.push(keys::AGGREGATE);
            keys::push_series_suffix(&mut arena, meter, tenant, key.window_start, dims);
            let suffix = &arena[start + 1..];
            if replicated {
                suffixes.insert(*key, (suffix.to_vec(), delta));
            }
            stats.series += 1;
            let window_end = key.window_start + *window_secs;
            if window_end <= closed_before_old {
                // Late event into a window already emitted: amend it with a new revision.
                stats.amended += 1;
                to_emit.push((suffix.to_vec(), Some(delta)));
                amended.insert(suffix.to_vec());
            } else if window_end <= closed_before_new {
                closing_with_delta.insert(suffix.to_vec(), delta);
            } else {
                let prefix_len = keys::window_prefix_len(meter, tenant);
                index_key.clear();
                keys::push_open_window_key(&mut index_key, window_end, &suffix[..prefix_len]);
                let window = (window_end, xxh3_128(&index_key));
                if !indexed.contains(&window) && new_index.insert(window) {
                    batch.put(&index_key, b"");
                }
            }
            let value = arena.len();
            arena = delta.encode_into(arena);
            merges.push((start, value, arena.len()));
        }
        drop(indexed);
        // Keys go into the batch in sorted order: RocksDB's memtable skiplist then reuses its
        // insertion point from one key to the next instead of searching from the top (random
        // order made memtable inserts ~40 % of the daemon's CPU under load).
        merges.sort_unstable_by(|a, b| arena[a.0..a.1].cmp(&arena[b.0..b.1]));
        for &(start, value, end) in &merges {
            batch.merge(&arena[start..value], &arena[value..end]);
        }

        // Windows that close now: everything in the close index up to the new watermark.
        let index_end = keys::open_window_key(closed_before_new, &[]);
        let open_keys = self.scan_keys(&[keys::OPEN_WINDOW], |key| {
            key.first() == Some(&keys::OPEN_WINDOW) && key.len() >= 9 && key[..9] <= index_end[..9]
        })?;
        for open_key in open_keys {
            if let Some(tenant) = keys::prefix_tenant(&open_key[9..]) {
                // A split tenant's window closes with no record (nobody holds its whole total).
                if self.tenant_sources.is_split(tenant) {
                    stats.held += 1;
                    batch.delete(&open_key);
                    continue;
                }
                // Another replica owns the tenant's partition now: it closes the window
                // (restored from the changelog); the key stays here in case it comes back.
                if !self.tenant_sources.owns(tenant) {
                    continue;
                }
            }
            // Every series of that tenant's window: the aggregate keys under its prefix.
            let prefix = keys::with_kind(keys::AGGREGATE, &open_key[9..]);
            let series = self.scan_keys(&prefix, |key| key.starts_with(&prefix))?;
            for aggregate_key in series {
                let suffix = aggregate_key[1..].to_vec();
                // Already emitted by this checkpoint as an amendment (a window past the
                // watermark still indexed: restored unemitted, or its owner was elsewhere when it
                // closed): emitting it twice would repeat its revision and rate it twice.
                if amended.contains(&suffix) {
                    continue;
                }
                let delta = closing_with_delta.remove(&suffix);
                to_emit.push((suffix, delta));
            }
            batch.delete(&open_key);
        }
        // Series first seen in this checkpoint whose window is already past the watermark.
        let mut remaining: Vec<(Vec<u8>, &AggState)> = closing_with_delta.into_iter().collect();
        remaining.sort_by(|a, b| a.0.cmp(&b.0));
        to_emit.extend(remaining.into_iter().map(|(suffix, delta)| (suffix, Some(delta))));

        // In cluster mode every outbox line also travels in its tenant's flush (`E` entries):
        // a replica that restores a flush this one never committed re-emits its lines.
        let mut outbox = OutboxLines {
            next: self.outbox_next.load(Ordering::Acquire),
            carried: self.tenant_sources.tracks_ownership().then(Vec::new),
        };
        // Lines a restore left to re-emit, oldest first: before anything this checkpoint adds.
        let reemit_restored = self.reemit_restored.load(Ordering::Acquire);
        let reemit_seen = if reemit_restored != self.reemit_moved.load(Ordering::Acquire) {
            let pending = self.scan_entries(&[keys::REEMIT], |key| key.first() == Some(&keys::REEMIT))?;
            for (key, line) in pending {
                let tenant = keys::tenant_of_state_key(&key).unwrap_or_default().to_string();
                outbox.put(&mut batch, &tenant, line);
                batch.delete(&key);
                stats.reemitted += 1;
            }
            Some(reemit_restored)
        } else {
            None
        };
        let mut emitted_revisions: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        let mut records = 0;
        let closed_at = rfc3339(now_secs);
        // Late amendments and windows closing with their delta are emitted by the owner only,
        // like windows closing by time: a deposed owner still folds what it consumed.
        let silenced = self.deposed_only(snapshot, names);
        let mut emits: FxHashMap<String, bool> = FxHashMap::default();
        for (suffix, delta) in to_emit {
            let name = keys::decode_series_suffix(&suffix).ok_or_else(|| StoreError::Corrupt {
                what: "series key",
                detail: format!("{suffix:?}"),
            })?;
            let here = match emits.get(&name.tenant) {
                Some(here) => *here,
                None => {
                    let here =
                        !silenced.contains(&name.tenant) && self.tenant_sources.emits_here(&name.tenant);
                    emits.insert(name.tenant.clone(), here);
                    here
                }
            };
            if !here {
                stats.held += usize::from(self.tenant_sources.is_split(&name.tenant));
                continue;
            }
            let mut total = match self.get(&keys::with_kind(keys::AGGREGATE, &suffix))? {
                Some(bytes) => Some(AggState::decode(&bytes).map_err(|error| StoreError::Corrupt {
                    what: "aggregate state",
                    detail: error.to_string(),
                })?),
                None => None,
            };
            if let Some(delta) = delta {
                match &mut total {
                    Some(total) => total.merge(delta).map_err(|error| StoreError::Corrupt {
                        what: "aggregate merge",
                        detail: error.to_string(),
                    })?,
                    None => total = Some(delta.clone()),
                }
            }
            let Some(total) = total else { continue };
            let revision_key = keys::with_kind(keys::REVISION, &suffix);
            let revision = match self.get(&revision_key)? {
                Some(bytes) => {
                    u32::from_be_bytes(bytes.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                        what: "revision",
                        detail: format!("{suffix:?}"),
                    })?) + 1
                }
                None => 1,
            };
            let shape = catalog.get(&name.meter);
            let window = ClosedWindow {
                tenant: &name.tenant,
                meter: &name.meter,
                dims: &name.dims,
                window_start: name.window_start,
                window_secs: shape.map_or(60, |s| s.window_secs),
                aggregation: shape.and_then(|s| crate::aggregate::Aggregation::parse(&s.aggregation)),
                scale: shape.map_or(0, |s| s.scale),
            };
            let line = WindowRecord::line_of(&window, &suffix, &total, revision, &closed_at);
            batch.put(revision_key, revision.to_be_bytes());
            if replicated {
                emitted_revisions.insert(suffix.clone(), revision);
            }
            outbox.put(&mut batch, &name.tenant, line);
            records += 1;
            if let Some(shape) = shape {
                let rated = self.rate_window(
                    &mut rating,
                    &mut batch,
                    &name,
                    &suffix,
                    &total,
                    delta,
                    revision,
                    shape,
                )?;
                for line in rated {
                    outbox.put(&mut batch, &name.tenant, line);
                    stats.rated += 1;
                }
            }
        }
        stats.records = records;
        for (tenant, line) in self.settle_closed_periods(&mut rating, &mut batch, allowed_lateness_secs)? {
            outbox.put(&mut batch, &tenant, line);
            stats.rated += 1;
        }
        rating.finish(&mut batch);

        // The dedup keys travel as one value, staged and ingested in bulk later (`dedup`), in
        // arrival order: the ingestion sorts them all at once (sorting here was ~3 % of the
        // daemon's CPU under OTLP load, on the checkpoint's critical path).
        let dedup_run = snapshot.dedup_keys.clone();
        stats.dedup_keys = dedup_run.len();
        if !dedup_run.is_empty() {
            batch.put(
                keys::dedup_run_key(snapshot.generation),
                super::dedup::encode_run(&dedup_run, now_secs),
            );
        }
        let mut streams: Vec<_> = snapshot.streams.iter().collect();
        streams.sort_unstable_by_key(|(stream, _)| *stream);
        for (stream, state) in streams {
            match state {
                Some(state) => batch.put(keys::stream_key(*stream), state.encode()),
                None => batch.delete(keys::stream_key(*stream)),
            }
        }
        for (source, next) in &snapshot.positions {
            batch.put(keys::position_key(source), next.to_be_bytes());
        }
        batch.put(
            keys::meta_key(META_CLOSED_BEFORE),
            (closed_before_new as u64).to_be_bytes(),
        );
        let outbox_next = outbox.next;
        batch.put(keys::meta_key(META_OUTBOX_NEXT), outbox_next.to_be_bytes());
        batch.put(keys::meta_key(META_GENERATION), snapshot.generation.to_be_bytes());
        let clock_mark = self.expiry.record();
        batch.put(
            keys::meta_key(super::clock::META_CLOCK),
            (clock_mark as u64).to_be_bytes(),
        );
        stats.bytes = batch.size_in_bytes();
        // Where each tenant's usage came from, learned from this cut's replicated sources.
        let mut pairs: Vec<(Arc<str>, &str)> = Vec::new();
        for source in &snapshot.sources {
            let mut last = None;
            for key in &source.series {
                if last == Some(key.tenant) {
                    continue;
                }
                last = Some(key.tenant);
                let tenant = tenants
                    .entry(key.tenant)
                    .or_insert_with(|| names.tenants.resolve(key.tenant))
                    .clone();
                pairs.push((tenant, source.source.as_str()));
            }
        }
        let tenant_sources = self.tenant_sources.learn(
            pairs.iter().map(|(tenant, source)| (&**tenant, *source)),
            &mut batch,
            now_secs,
        );
        // The emission and rating keys this batch writes for each owned source's tenants travel
        // in that source's flush; a source without new usage gets a flush of them alone.
        let mut state = if self.tenant_sources.tracks_ownership() {
            self.state_entries(&batch, outbox.carried.unwrap_or_default(), &tenant_sources)
        } else {
            FxHashMap::default()
        };
        let mut changelog = Vec::new();
        for source in &snapshot.sources {
            // A deposed writer's flushes are stale to every restore: publishing them only
            // costs (and would be found deposed again).
            if self.tenant_sources.is_deposed(&source.source) {
                continue;
            }
            changelog.extend(self.changelog_flush(
                snapshot,
                source,
                &suffixes,
                &emitted_revisions,
                state.remove(&source.source).unwrap_or_default(),
                now_secs,
            )?);
        }
        let mut state_only: Vec<_> = state.into_iter().collect();
        state_only.sort_by(|a, b| a.0.cmp(&b.0));
        for (source, entries) in state_only {
            let Some(position) = snapshot.position(&source).or(self.position(&source)?) else {
                continue;
            };
            changelog.extend(chunk_flush_with_state(
                &source,
                flush_id(self.writer()),
                position,
                now_secs,
                Vec::new(),
                Vec::new(),
                entries,
            ));
        }
        Ok(CheckpointBatch {
            batch,
            generation: snapshot.generation,
            dedup_run,
            seen_secs: now_secs,
            new_index,
            closed_before: closed_before_new,
            outbox_next,
            reemit_seen,
            stats,
            changelog,
            tenant_sources,
        })
    }

    /// Tenants of `snapshot`'s deposed sources that no known source places (first seen there):
    /// `emits_here` would let this replica emit them, as usage of its own.
    fn deposed_only(&self, snapshot: &Snapshot, names: &Names) -> FxHashSet<String> {
        let mut out = FxHashSet::default();
        for cut in &snapshot.sources {
            if !self.tenant_sources.is_deposed(&cut.source) {
                continue;
            }
            let mut last = None;
            for key in &cut.series {
                if last == Some(key.tenant) {
                    continue;
                }
                last = Some(key.tenant);
                let tenant = names.tenants.resolve(key.tenant);
                if self.tenant_sources.sources_of(&tenant).is_empty() {
                    out.insert(tenant.to_string());
                }
            }
        }
        out
    }

    /// The emission and rating keys `batch` writes (`changelog::STATE_KINDS`) and its outbox
    /// `lines` (tenant, sequence, line) as `E` entries, by the owned source whose changelog
    /// carries their tenant.
    fn state_entries(
        &self,
        batch: &WriteBatch,
        lines: Vec<(String, u64, Vec<u8>)>,
        new_pairs: &super::tenants::NewPairs,
    ) -> FxHashMap<String, Vec<StateEntry>> {
        struct Collect(Vec<StateEntry>);
        impl rocksdb::WriteBatchIteratorCf for Collect {
            fn put_cf(&mut self, cf_id: u32, key: &[u8], value: &[u8]) {
                if cf_id == 0 && key.first().is_some_and(|kind| STATE_KINDS.contains(kind)) {
                    self.0.push(StateEntry {
                        key: key.to_vec(),
                        value: Some(value.to_vec()),
                    });
                }
            }
            fn delete_cf(&mut self, cf_id: u32, key: &[u8]) {
                if cf_id == 0 && key.first().is_some_and(|kind| STATE_KINDS.contains(kind)) {
                    self.0.push(StateEntry {
                        key: key.to_vec(),
                        value: None,
                    });
                }
            }
            fn merge_cf(&mut self, _: u32, _: &[u8], _: &[u8]) {}
        }
        let mut collect = Collect(Vec::new());
        batch.iterate_cf(&mut collect);
        collect
            .0
            .extend(lines.into_iter().map(|(tenant, seq, line)| StateEntry {
                key: keys::reemit_key(&tenant, self.writer(), seq),
                value: Some(line),
            }));
        let mut by_source: FxHashMap<String, Vec<StateEntry>> = FxHashMap::default();
        let mut carriers: FxHashMap<String, Vec<String>> = FxHashMap::default();
        for entry in collect.0 {
            let Some(tenant) = keys::tenant_of_state_key(&entry.key) else {
                continue;
            };
            let sources = carriers
                .entry(tenant.to_string())
                .or_insert_with(|| self.tenant_sources.carriers(tenant, new_pairs));
            for source in sources.iter() {
                by_source.entry(source.clone()).or_default().push(entry.clone());
            }
        }
        by_source
    }

    /// One source's flush: absolute state (store total + this checkpoint's delta) and revision
    /// of every series it changed, its new dedup keys, its position, and the emission and rating
    /// keys of its tenants (`state`).
    fn changelog_flush(
        &self,
        snapshot: &Snapshot,
        source: &SourceCut,
        suffixes: &FxHashMap<SeriesKey, (Vec<u8>, &AggState)>,
        emitted_revisions: &FxHashMap<Vec<u8>, u32>,
        state: Vec<StateEntry>,
        now_secs: i64,
    ) -> Result<Vec<ChangelogChunk>, StoreError> {
        let Some(position) = snapshot.position(&source.source) else {
            // Contributions without progress cannot happen (each batch advances its offset).
            return Err(StoreError::Corrupt {
                what: "changelog",
                detail: format!("{} changed state without a position", source.source),
            });
        };
        let mut series = Vec::with_capacity(source.series.len());
        for key in &source.series {
            let Some((suffix, delta)) = suffixes.get(key) else {
                continue;
            };
            let total = match self.get(&keys::with_kind(keys::AGGREGATE, suffix))? {
                Some(bytes) => {
                    let mut total = AggState::decode(&bytes).map_err(|error| StoreError::Corrupt {
                        what: "aggregate state",
                        detail: error.to_string(),
                    })?;
                    total.merge(delta).map_err(|error| StoreError::Corrupt {
                        what: "aggregate merge",
                        detail: error.to_string(),
                    })?;
                    total
                }
                None => (*delta).clone(),
            };
            let revision = match emitted_revisions.get(suffix) {
                Some(revision) => *revision,
                None => match self.get(&keys::with_kind(keys::REVISION, suffix))? {
                    Some(bytes) => {
                        u32::from_be_bytes(bytes.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                            what: "revision",
                            detail: format!("{suffix:?}"),
                        })?)
                    }
                    None => 0,
                },
            };
            series.push(SeriesEntry {
                suffix: suffix.clone(),
                state: total.encode(),
                revision,
            });
        }
        Ok(chunk_flush_with_state(
            &source.source,
            flush_id(self.writer()),
            position,
            now_secs,
            series,
            source.dedup_keys.clone(),
            state,
        ))
    }

    /// Commits a prepared checkpoint durably (synced WAL), then stages its dedup run
    /// (`store::dedup`; `dedup_ingest_due` tells when to ingest the staged keys). An error means
    /// the batch did not commit.
    pub fn commit_checkpoint(&self, prepared: CheckpointBatch) -> Result<CheckpointStats, StoreError> {
        let stats = prepared.stats;
        self.write(prepared.batch, true)?;
        self.stage_dedup_run(prepared.generation, prepared.dedup_run, prepared.seen_secs);
        let mut indexed = self.indexed_windows.lock();
        indexed.extend(prepared.new_index);
        // Closed windows' index keys were deleted by this batch; forget them here too.
        indexed.retain(|(window_end, _)| *window_end > prepared.closed_before);
        drop(indexed);
        self.closed_before
            .store(prepared.closed_before, Ordering::Release);
        self.outbox_next.store(prepared.outbox_next, Ordering::Release);
        if let Some(seen) = prepared.reemit_seen {
            self.reemit_moved.fetch_max(seen, Ordering::AcqRel);
        }
        self.tenant_sources.apply(prepared.tenant_sources);
        Ok(stats)
    }
}

#[cfg(test)]
impl RocksStore {
    /// A checkpoint of nothing but `dedup_keys` (staged, not yet ingested).
    #[cfg(test)]
    pub(crate) fn commit_dedup_keys_for_tests(&self, generation: u64, dedup_keys: Vec<u128>, now_secs: i64) {
        let snapshot = Snapshot {
            generation,
            dedup_keys,
            ..Default::default()
        };
        let prepared = self
            .prepare_checkpoint(
                &snapshot,
                &Default::default(),
                &Default::default(),
                now_secs,
                60,
                &Default::default(),
            )
            .expect("prepare");
        self.commit_checkpoint(prepared).expect("commit");
    }
}
