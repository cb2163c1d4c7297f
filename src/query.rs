//! The usage query engine behind `GET /api/v1/meters/{slug}/query` and the bill preview.
//!
//! A query reads the checkpointed store and the deltas not yet checkpointed (pending snapshots
//! and the live engine) under the `flushing` read lock, so every acknowledged event is visible
//! exactly once. Coarser windows and whole-range rows are merges of base windows: for
//! UNIQUE_COUNT that is a union of sets, so a month's distinct users is not a sum of days.
//!
//! Blocking (it reads RocksDB): callers run it off the async executor.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::aggregate::AggState;
use crate::meter::Meter;
use crate::model::{parse_rfc3339_ms, rfc3339, Dims, WindowSize};
use crate::state::Shared;

#[derive(Debug, Default, PartialEq)]
pub struct QueryParams {
    pub subjects: Vec<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub window_size: Option<WindowSize>,
    pub group_by: Vec<String>,
    pub filters: Vec<(String, String)>,
    /// DISTRIBUTION meters: the percentiles each row reports (default 50, 95, 99).
    pub percentiles: Vec<f64>,
}

/// Percentiles a DISTRIBUTION row reports unless the query names others.
const DEFAULT_PERCENTILES: [f64; 3] = [50.0, 95.0, 99.0];

/// Parses the query string, naming every bad parameter.
pub fn parse_params(raw: &str, meter: &Meter) -> Result<QueryParams, Vec<String>> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw).map_err(|error| vec![format!("query string: {error}")])?;
    let mut params = QueryParams::default();
    let mut errors = Vec::new();
    let group_names: Vec<&str> = meter.group_names();
    for (key, value) in pairs {
        match key.as_str() {
            "subject" => params.subjects.push(value),
            "from" | "to" => match parse_rfc3339_ms(&value) {
                Some(ms) if key == "from" => params.from_ms = Some(ms),
                Some(ms) => params.to_ms = Some(ms),
                None => errors.push(format!("{key}: `{value}` is not an RFC 3339 timestamp")),
            },
            "windowSize" => match WindowSize::parse(&value) {
                Some(size) if size.seconds() < meter.window_size.seconds() => errors.push(format!(
                    "windowSize: {value} is finer than meter `{}`'s window ({})",
                    meter.slug, meter.window_size
                )),
                Some(size) => params.window_size = Some(size),
                None => errors.push(format!("windowSize: `{value}` is not one of MINUTE | HOUR | DAY")),
            },
            "percentiles" if meter.aggregation == crate::aggregate::Aggregation::Distribution => {
                for text in value.split(',').map(str::trim) {
                    match text.parse::<f64>() {
                        Ok(p) if p > 0.0 && p <= 100.0 => params.percentiles.push(p),
                        _ => errors.push(format!("percentiles: `{text}` is not a number in (0, 100]")),
                    }
                }
            }
            "percentiles" => errors.push(format!(
                "percentiles: meter `{}` is {}, not DISTRIBUTION",
                meter.slug,
                meter.aggregation.as_str()
            )),
            "windowTimeZone" => {
                if !matches!(value.as_str(), "UTC" | "Etc/UTC" | "Z") {
                    errors.push(format!(
                        "windowTimeZone: only UTC windows are supported, got `{value}`"
                    ));
                }
            }
            "groupBy" => {
                if group_names.contains(&value.as_str()) {
                    params.group_by.push(value);
                } else {
                    errors.push(format!(
                        "groupBy: `{value}` is not a group_by key of meter `{}` ({})",
                        meter.slug,
                        group_names.join(", ")
                    ));
                }
            }
            other => match other
                .strip_prefix("filterGroupBy[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                Some(name) if group_names.contains(&name) => params.filters.push((name.to_string(), value)),
                Some(name) => errors.push(format!(
                    "{other}: `{name}` is not a group_by key of meter `{}`",
                    meter.slug
                )),
                None => errors.push(format!("{other}: unknown parameter")),
            },
        }
    }
    if let (Some(from), Some(to)) = (params.from_ms, params.to_ms) {
        if from > to {
            errors.push("from: must not be after to".into());
        }
    }
    params.group_by.sort();
    params.group_by.dedup();
    if params.percentiles.is_empty() {
        params.percentiles = DEFAULT_PERCENTILES.to_vec();
    }
    if errors.is_empty() {
        Ok(params)
    } else {
        Err(errors)
    }
}

/// (bucket start, subject, group-by values).
type RowKey = (i64, String, Dims);

struct Row {
    state: AggState,
    first_window: i64,
    last_window_end: i64,
}

/// A tenant's total of a meter over the windows starting in `[from_secs, to_secs)` (a billing
/// period), as fixed-point units at the meter's limit scale (`limit::unit_scale`): the same
/// number the bill preview prices. Blocking: reads the store.
pub fn period_units(
    shared: &Shared,
    slug: &str,
    tenant: &str,
    from_secs: i64,
    to_secs: i64,
) -> Result<i128, String> {
    let Some(meter) = shared.meters.by_slug(slug) else {
        return Ok(0);
    };
    let params = QueryParams {
        subjects: vec![tenant.to_string()],
        from_ms: Some(from_secs.saturating_mul(1000)),
        to_ms: Some(to_secs.saturating_mul(1000)),
        ..QueryParams::default()
    };
    let result = run_query(shared, slug, &params).map_err(|error| error.to_string())?;
    let Some(row) = result["data"].as_array().and_then(|rows| rows.first()) else {
        return Ok(0);
    };
    let scale = crate::limit::unit_scale(meter.aggregation, meter.scale);
    crate::model::parse_decimal(&row["value"].to_string(), scale)
        .map_err(|error| format!("meter `{slug}` total {}: {error}", row["value"]))
}

/// The limits gate's reader of quota periods (`state::limits::Load`): `period_units`.
pub fn quota_loader(shared: &Shared) -> impl Fn(&str, &str, i64, i64) -> Result<i128, String> + '_ {
    move |tenant, meter, from, to| period_units(shared, meter, tenant, from, to)
}

/// Where each of `tenant`'s limits stands now (blocking: a period not tracked yet reads the
/// store).
pub fn limits_now(
    shared: &Shared,
    tenant: &str,
) -> Result<Vec<crate::state::limits::Standing>, crate::state::limits::LimitError> {
    shared.limits.standing(
        tenant,
        &shared.names,
        &shared.meters,
        crate::model::now_ms().div_euclid(1000),
        &quota_loader(shared),
    )
}

/// Blocking: reads the store.
pub fn run_query(
    shared: &Shared,
    slug: &str,
    params: &QueryParams,
) -> Result<Value, crate::store::StoreError> {
    let meter = shared
        .meters
        .by_slug(slug)
        .expect("invariant: the handler checked the slug");
    let window_secs = meter.window_size.seconds();
    // A base window is in range when its start is in [from, to).
    let from_secs = params.from_ms.map_or(i64::MIN / 4, |ms| {
        ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) > 0)
    });
    let to_secs = params.to_ms.map_or(i64::MAX / 4, |ms| {
        ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) > 0)
    });
    let tenant_ids: Option<Vec<u32>> = (!params.subjects.is_empty()).then(|| {
        params
            .subjects
            .iter()
            .filter_map(|subject| shared.names.tenants.get(subject))
            .collect()
    });

    // Everything not yet checkpointed, plus a consistent view of the store.
    let guard = shared.flushing.read();
    let snapshot = shared.store.snapshot();
    let pending: Vec<_> = guard.clone();
    let in_range = |key: &crate::model::SeriesKey| {
        key.meter == meter.id
            && key.window_start >= from_secs
            && key.window_start < to_secs
            && tenant_ids.as_ref().is_none_or(|ids| ids.contains(&key.tenant))
    };
    let mut unflushed = shared.engine.collect(in_range);
    drop(guard);
    // A snapshot whose batch committed after `flushing` was read is already in the store.
    let committed = shared.store.checkpoint_generation(&snapshot)?;
    for snapshot in pending.iter().filter(|pending| pending.generation > committed) {
        unflushed.extend(snapshot.deltas.iter().filter(|(key, _)| in_range(key)).cloned());
    }

    let mut series: Vec<(String, i64, Dims, AggState)> = Vec::new();
    if params.subjects.is_empty() {
        for (name, state) in shared
            .store
            .scan_series(&snapshot, slug, None, from_secs, to_secs)?
        {
            series.push((name.tenant, name.window_start, name.dims, state));
        }
    } else {
        for subject in &params.subjects {
            for (name, state) in
                shared
                    .store
                    .scan_series(&snapshot, slug, Some(subject), from_secs, to_secs)?
            {
                series.push((name.tenant, name.window_start, name.dims, state));
            }
        }
    }
    drop(snapshot);
    for (key, state) in unflushed {
        series.push((
            shared.names.tenants.resolve(key.tenant).to_string(),
            key.window_start,
            shared.names.dims.resolve(key.dims).to_vec(),
            state,
        ));
    }

    let mut rows: BTreeMap<RowKey, Row> = BTreeMap::new();
    for (tenant, window_start, dims, state) in series {
        let matches_filters = params
            .filters
            .iter()
            .all(|(name, value)| dims.iter().any(|(k, v)| k == name && v == value));
        if !matches_filters {
            continue;
        }
        let projected: Vec<(String, String)> = dims
            .into_iter()
            .filter(|(name, _)| params.group_by.contains(name))
            .collect();
        let bucket = match params.window_size {
            Some(size) => size.start_of(window_start * 1000),
            None => 0,
        };
        match rows.get_mut(&(bucket, tenant.clone(), projected.clone())) {
            Some(row) => {
                if let Err(error) = row.state.merge(&state) {
                    return Err(crate::store::StoreError::Corrupt {
                        what: "series state",
                        detail: error.to_string(),
                    });
                }
                row.first_window = row.first_window.min(window_start);
                row.last_window_end = row.last_window_end.max(window_start + window_secs);
            }
            None => {
                rows.insert(
                    (bucket, tenant, projected),
                    Row {
                        state,
                        first_window: window_start,
                        last_window_end: window_start + window_secs,
                    },
                );
            }
        }
    }

    let data: Vec<Value> = rows
        .into_iter()
        .map(|((bucket, tenant, dims), row)| {
            let (start, end) = match params.window_size {
                Some(size) => (rfc3339(bucket), rfc3339(bucket + size.seconds())),
                None => (
                    params
                        .from_ms
                        .map_or_else(|| rfc3339(row.first_window), crate::model::rfc3339_ms_compact),
                    params
                        .to_ms
                        .map_or_else(|| rfc3339(row.last_window_end), crate::model::rfc3339_ms_compact),
                ),
            };
            let value = row.state.quantity_string(meter.aggregation, meter.scale);
            let number: Value = value
                .parse::<serde_json::Number>()
                .map(Value::Number)
                .unwrap_or(Value::String(value));
            let group_by: Map<String, Value> = params
                .group_by
                .iter()
                .map(|name| {
                    let value = dims
                        .iter()
                        .find(|(k, _)| k == name)
                        .map_or(Value::Null, |(_, v)| Value::String(v.clone()));
                    (name.clone(), value)
                })
                .collect();
            let mut row_json = json!({
                "value": number,
                "windowStart": start,
                "windowEnd": end,
                "subject": tenant,
                "groupBy": group_by,
            });
            if let AggState::Distribution(distribution) = &row.state {
                // `value` is the observation count; percentiles are exact decimals at the
                // meter's scale of the histogram's bucket values (within 1 %).
                let percentiles: Map<String, Value> = params
                    .percentiles
                    .iter()
                    .map(|p| {
                        let value = crate::model::format_decimal(
                            i128::from(distribution.value_at_quantile(p / 100.0)),
                            meter.scale,
                        );
                        let number = value
                            .parse::<serde_json::Number>()
                            .map_or(Value::String(value), Value::Number);
                        (format!("p{p}"), number)
                    })
                    .collect();
                row_json["percentiles"] = Value::Object(percentiles);
            }
            row_json
        })
        .collect();
    Ok(json!({
        "from": params.from_ms.map(crate::model::rfc3339_ms_compact),
        "to": params.to_ms.map(crate::model::rfc3339_ms_compact),
        "windowSize": params.window_size.map(|size| size.as_str()),
        "data": data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::kafka::{Folder, KafkaMessage};
    use crate::pipeline::Stages;
    use crate::state::SnapshotCut;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// The daemon's stages, checkpointing only when a test cuts one.
    fn stages(dir: &std::path::Path) -> Stages {
        Stages::for_tests(dir, 3_600_000)
    }

    /// `count` CloudEvents of 1 token each (7 tenants × 3 models), offsets from `first`.
    fn messages(first: i64, count: i64) -> Vec<KafkaMessage> {
        let time = crate::model::rfc3339_ms(crate::model::now_ms() - 5_000);
        (first..first + count)
            .map(|i| KafkaMessage {
                topic: "usage".into(),
                partition: 0,
                offset: i,
                timestamp_ms: crate::model::now_ms(),
                key: None,
                payload: Some(
                    format!(
                        r#"{{"specversion":"1.0","id":"e{i}","source":"t","type":"llm.prompt","subject":"tenant-{}","time":"{time}","data":{{"tokens":1,"model":"m{}"}}}}"#,
                        i % 7,
                        i % 3
                    )
                    .into_bytes(),
                ),
                header_id: None,
                forwarded: false,
                signature: None,
            })
            .collect()
    }

    fn tokens(shared: &Arc<Shared>) -> u64 {
        let answer = run_query(shared, "tokens", &QueryParams::default()).unwrap();
        answer["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["value"].as_u64().unwrap())
            .sum()
    }

    /// Hands a snapshot the test held back to the checkpoint stage and waits until it left
    /// `flushing` (committed).
    fn commit_held(stages: &Stages, snapshot: Arc<crate::store::checkpoint::Snapshot>) {
        stages.checkpoints.send(snapshot).unwrap();
        while !stages.shared.flushing.read().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The window a checkpoint opens by committing without holding `flushing`: its batch is in
    /// the store while its snapshot is still listed. Queries then count it once, from the store.
    #[test]
    fn a_committed_snapshot_still_listed_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let stages = stages(dir.path());
        let shared = stages.shared.clone();
        let mut folder = Folder::new(shared.clone(), false);
        folder.apply(folder.fold(&messages(0, 40)));
        // Cut a snapshot but keep it from the checkpoint thread: it stays in `flushing`.
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        assert!(matches!(shared.try_snapshot(&sender), SnapshotCut::Cut(_)));
        let snapshot = receiver.recv().unwrap();
        assert_eq!(tokens(&shared), 40, "in flight: counted from `flushing`");
        let prepared = shared
            .store
            .prepare_checkpoint(
                &snapshot,
                &shared.names,
                &shared.catalog,
                crate::model::now_ms() / 1000,
                shared.config.allowed_lateness_secs,
                &shared.plans.read().clone(),
            )
            .unwrap();
        shared.store.commit_checkpoint(prepared).unwrap();
        assert_eq!(tokens(&shared), 40, "committed and still listed: counted once");
        shared
            .flushing
            .write()
            .retain(|pending| !Arc::ptr_eq(pending, &snapshot));
        // What the checkpoint stage does after a commit (it did not see this snapshot).
        shared.generations.lock().durable = snapshot.generation;
        shared.checkpoint_busy.store(false, Ordering::Release);
        assert_eq!(tokens(&shared), 40, "committed: counted from the store");
        // The next generation is not mistaken for the committed one.
        folder.apply(folder.fold(&messages(40, 10)));
        assert!(matches!(shared.try_snapshot(&sender), SnapshotCut::Cut(_)));
        let next = receiver.recv().unwrap();
        assert!(next.generation > snapshot.generation);
        assert_eq!(tokens(&shared), 50);
        commit_held(&stages, next);
        assert_eq!(tokens(&shared), 50);
        drop((folder, shared));
        assert!(stages.drain());

        // After a restart generations continue from the store's: a snapshot in flight is not
        // taken for one the store already holds.
        let stages = self::stages(dir.path());
        let shared = stages.shared.clone();
        let mut folder = Folder::new(shared.clone(), false);
        folder.apply(folder.fold(&messages(50, 5)));
        assert!(matches!(shared.try_snapshot(&sender), SnapshotCut::Cut(_)));
        let pending = receiver.recv().unwrap();
        assert_eq!(tokens(&shared), 55);
        commit_held(&stages, pending);
        assert_eq!(tokens(&shared), 55);
        drop((folder, shared));
        assert!(stages.drain());
    }

    /// The same under real concurrency: queries beside checkpoints committed by the checkpoint
    /// thread see every applied event exactly once.
    #[test]
    fn queries_beside_checkpoints_count_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let stages = stages(dir.path());
        let shared = stages.shared.clone();
        // Events whose application started / finished: a query's total must lie between the
        // finished count before it and the started count after it.
        let (started, finished) = (AtomicU64::new(0), AtomicU64::new(0));
        let (stop, queries) = (AtomicBool::new(false), AtomicU64::new(0));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    let low = finished.load(Ordering::Acquire);
                    let total = tokens(&shared);
                    let high = started.load(Ordering::Acquire);
                    assert!(
                        (low..=high).contains(&total),
                        "query saw {total} tokens, applied between {low} and {high}"
                    );
                    queries.fetch_add(1, Ordering::Relaxed);
                }
            });
            let mut folder = Folder::new(shared.clone(), false);
            for round in 0..60i64 {
                started.fetch_add(50, Ordering::AcqRel);
                let folded = folder.fold(&messages(round * 50, 50));
                assert!(folded.dead_letters.is_empty());
                folder.apply(folded);
                finished.fetch_add(50, Ordering::AcqRel);
                if round % 3 != 2 {
                    assert!(shared.checkpoint_now(&stages.checkpoints, Duration::from_secs(30)));
                }
            }
            stop.store(true, Ordering::Release);
        });
        assert!(queries.load(Ordering::Relaxed) > 0);
        assert_eq!(tokens(&shared), 3000);
        drop(shared);
        assert!(stages.drain());
    }
}
