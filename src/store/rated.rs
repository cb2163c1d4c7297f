//! Rating inside the checkpoint: every window record the checkpoint (re)emits is also rated
//! with its tenant's plan, and the rated record, the window's rated state (`Q` key) and the
//! period ledger (`L` key) go into the same WriteBatch as the aggregates that produced them. A
//! crash therefore either loses the whole checkpoint (its sources replay and rate it again,
//! identically) or keeps all of it: rated records are never missing or repeated.

use rocksdb::WriteBatch;
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

use super::keys::{self, SeriesName};
use super::{MeterShape, RocksStore, StoreError};
use crate::aggregate::{AggState, Aggregation};
use crate::model::rfc3339;
use crate::rate::plan::Plans;
use crate::rate::record::{model_name, money, rate_change, PeriodEntry, RatedRecord};

/// One checkpoint's rating work: period entries read once and written back once.
pub struct RatingBatch<'a> {
    plans: &'a Plans,
    entries: FxHashMap<Vec<u8>, PeriodEntry>,
    rated_at: String,
}

impl<'a> RatingBatch<'a> {
    pub fn new(plans: &'a Plans, now_secs: i64) -> RatingBatch<'a> {
        RatingBatch {
            plans,
            entries: FxHashMap::default(),
            rated_at: rfc3339(now_secs),
        }
    }

    /// Writes the touched period entries.
    pub fn finish(self, batch: &mut WriteBatch) {
        let mut entries: Vec<_> = self.entries.into_iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, entry) in entries {
            batch.put(key, entry.encode());
        }
    }
}

/// The `record_id` of a window's rated record: distinct from its window record's id, so one file
/// can carry both kinds and an upsert by id never mixes them.
pub fn rated_record_id(suffix: &[u8]) -> String {
    let mut input = b"rated\0".to_vec();
    input.extend_from_slice(suffix);
    super::checkpoint::record_id(&input)
}

impl RocksStore {
    /// Rates one emitted window: `total` is its state now, `delta` what this checkpoint added.
    /// Returns the rated record's JSON line, or `None` when the tenant's plan has no charge
    /// for the meter (or the meter cannot be priced). Rating errors are logged and counted, never
    /// fatal to the checkpoint: the window record still goes out.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rate_window(
        &self,
        rating: &mut RatingBatch<'_>,
        batch: &mut WriteBatch,
        name: &SeriesName,
        suffix: &[u8],
        total: &AggState,
        delta: Option<&AggState>,
        revision: u32,
        shape: &MeterShape,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(aggregation) = Aggregation::parse(&shape.aggregation) else {
            return Ok(None);
        };
        if aggregation == Aggregation::Distribution {
            return Ok(None);
        }
        let plans = rating.plans;
        let Some((current, current_discount)) = plans.for_tenant(&name.tenant) else {
            return Ok(None);
        };
        let zone = plans.timezone(&name.tenant);
        let (period_start, period_end) = current.period.containing_in(name.window_start, zone);
        let ledger_key = keys::ledger_key(&name.meter, &name.tenant, period_start);
        let entry = match rating.entries.get(&ledger_key) {
            Some(entry) => entry.clone(),
            None => match self.get(&ledger_key)? {
                Some(bytes) => PeriodEntry::decode(&bytes).map_err(|error| StoreError::Corrupt {
                    what: "period ledger",
                    detail: error.to_string(),
                })?,
                None => PeriodEntry {
                    plan_id: current.id.clone(),
                    plan_version: current.version,
                    discount_percent: current_discount.normalize().to_string(),
                    period_end,
                    state: None,
                    rated_quantity: None,
                },
            },
        };
        // The version the period started with; if a reload dropped it and the process restarted
        // since, the current one (said loudly: the period's earlier records used the old one).
        let plan = match plans.version(&entry.plan_id, entry.plan_version) {
            Some(plan) => plan,
            None => {
                tracing::warn!(
                    plan = %entry.plan_id, version = entry.plan_version, tenant = %name.tenant,
                    "plan version of a rated period is gone from config; rating it with the current version"
                );
                current
            }
        };
        let Some(charge) = plan.charges.iter().find(|charge| charge.meter == name.meter) else {
            return Ok(None);
        };
        let mut charge = charge.clone();
        charge.discount_percent = entry.discount_percent.parse().unwrap_or(current_discount);

        let rated_key = keys::with_kind(keys::RATED, suffix);
        let previous: Option<RatedRecord> = match self.get(&rated_key)? {
            Some(bytes) => Some(
                serde_json::from_slice(&bytes).map_err(|error| StoreError::Corrupt {
                    what: "rated record",
                    detail: error.to_string(),
                })?,
            ),
            None => None,
        };
        // A window the ledger has not seen contributes its whole state; a rated one its delta.
        let change = if previous.is_some() { delta } else { Some(total) };
        let mut updated = entry;
        let rated = match rate_change(&mut updated, &charge, change, aggregation, shape.scale) {
            Ok(rated) => rated,
            Err(error) => {
                metrics::counter!(crate::telemetry::RATING_FAILURES).increment(1);
                tracing::error!(%error, tenant = %name.tenant, meter = %name.meter, "cannot rate window");
                return Ok(None);
            }
        };
        let before: Decimal = match &previous {
            Some(record) => record.amount.parse().map_err(|_| StoreError::Corrupt {
                what: "rated record amount",
                detail: record.amount.clone(),
            })?,
            None => Decimal::ZERO,
        };
        let minor = charge.minor_units;
        let window_end = name.window_start + shape.window_secs;
        let record = RatedRecord {
            kind: "rated".into(),
            record_id: rated_record_id(suffix),
            revision,
            tenant: name.tenant.clone(),
            meter: name.meter.clone(),
            dims: name
                .dims
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
            window_start: rfc3339(name.window_start),
            window_end: rfc3339(window_end),
            period_start: rfc3339(period_start),
            period_end: rfc3339(updated.period_end),
            quantity: total.quantity_string(aggregation, shape.scale),
            amount: money(before + rated.increment, minor),
            increment: money(rated.increment, minor),
            currency: plan.currency.clone(),
            plan_id: plan.id.clone(),
            plan_version: plan.version,
            model: model_name(&charge.model).into(),
            discount_percent: charge.discount_percent.normalize().to_string(),
            period_quantity: rated.period_quantity.normalize().to_string(),
            period_amount: money(rated.period_amount, minor),
            tiers: rated.tiers,
            event_time_from: rfc3339(name.window_start),
            event_time_to: rfc3339(window_end),
            rated_at: rating.rated_at.clone(),
        };
        let mut line = serde_json::to_vec(&record).expect("invariant: rated records serialize");
        batch.put(&rated_key, &line);
        rating.entries.insert(ledger_key, updated);
        line.push(b'\n');
        Ok(Some(line))
    }

    /// The plan version (id, version, discount) a (tenant, period) was first rated with, from
    /// any of `meters`' ledgers: the bill preview prices the period as its records were.
    pub fn pinned_plan(
        &self,
        tenant: &str,
        meters: &[String],
        period_start: i64,
    ) -> Result<Option<(String, u32, String)>, StoreError> {
        for meter in meters {
            if let Some(bytes) = self.get(&keys::ledger_key(meter, tenant, period_start))? {
                let entry = PeriodEntry::decode(&bytes).map_err(|error| StoreError::Corrupt {
                    what: "period ledger",
                    detail: error.to_string(),
                })?;
                return Ok(Some((entry.plan_id, entry.plan_version, entry.discount_percent)));
            }
        }
        Ok(None)
    }

    /// Latest rated records of `[from, to)` (window start, unix seconds), for `meters`, of one
    /// tenant or all, at most `limit` (and whether more matched).
    pub fn rated_records(
        &self,
        meters: &[String],
        tenant: Option<&str>,
        from_secs: i64,
        to_secs: i64,
        limit: usize,
    ) -> Result<(Vec<RatedRecord>, bool), StoreError> {
        let mut out = Vec::new();
        for meter in meters {
            let mut prefix = keys::aggregate_prefix(meter, tenant);
            prefix[0] = keys::RATED;
            for item in self
                .db
                .iterator(rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward))
            {
                let (key, value) = item?;
                if !key.starts_with(&prefix) {
                    break;
                }
                let Some(start) = keys::suffix_window_start(&key[1..]) else {
                    continue;
                };
                if start < from_secs || start >= to_secs {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(
                    serde_json::from_slice(&value).map_err(|error| StoreError::Corrupt {
                        what: "rated record",
                        detail: error.to_string(),
                    })?,
                );
            }
        }
        Ok((out, false))
    }
}
