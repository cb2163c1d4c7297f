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
use crate::rate::plan::Plan;
use crate::rate::plan::Plans;
use crate::rate::record::{
    model_name, money, rate_change, split_prepaid, PeriodEntry, RatedRecord, Settled, TenantPeriod,
};
use crate::rate::{add, sub, RateError};

/// One checkpoint's rating work: period entries read once and written back once.
pub struct RatingBatch<'a> {
    plans: &'a Plans,
    entries: FxHashMap<Vec<u8>, PeriodEntry>,
    periods: FxHashMap<Vec<u8>, TenantPeriod>,
    rated_at: String,
    now_secs: i64,
}

impl<'a> RatingBatch<'a> {
    pub fn new(plans: &'a Plans, now_secs: i64) -> RatingBatch<'a> {
        RatingBatch {
            plans,
            entries: FxHashMap::default(),
            periods: FxHashMap::default(),
            rated_at: rfc3339(now_secs),
            now_secs,
        }
    }

    /// Writes the touched period entries.
    pub fn finish(self, batch: &mut WriteBatch) {
        let mut entries: Vec<_> = self.entries.into_iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, entry) in entries {
            batch.put(key, entry.encode());
        }
        let mut periods: Vec<_> = self.periods.into_iter().collect();
        periods.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, period) in periods {
            batch.put(key, period.encode());
        }
    }
}

fn decimal(text: &str, what: &'static str) -> Result<Decimal, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt {
        what,
        detail: text.to_string(),
    })
}

/// A settlement whose amounts overflow: counted and logged, the period stays as it was.
fn settlement_failed(tenant: &str, error: RateError) -> Option<Vec<u8>> {
    metrics::counter!(crate::telemetry::RATING_FAILURES).increment(1);
    tracing::error!(%error, tenant, "cannot settle the period's minimum spend");
    None
}

/// The `record_id` of a tenant period's minimum-spend settlement.
fn settlement_record_id(tenant: &str, period_start: i64) -> String {
    let mut input = b"minimum\0".to_vec();
    input.extend_from_slice(&keys::tenant_period_key(tenant, period_start));
    crate::rate::record::record_id(&input)
}

/// The `record_id` of a window's rated record: distinct from its window record's id, so one file
/// can carry both kinds and an upsert by id never mixes them.
pub fn rated_record_id(suffix: &[u8]) -> String {
    let mut input = b"rated\0".to_vec();
    input.extend_from_slice(suffix);
    crate::rate::record::record_id(&input)
}

impl RocksStore {
    /// Rates one emitted window: `total` is its state now, `delta` what this checkpoint added.
    /// Returns the outbox lines: the rated record (none when the tenant's plan has no charge for
    /// the meter, or the meter cannot be priced) and, when the window amends a period already
    /// settled, the settlement's new revision. Rating errors are logged and counted, never fatal
    /// to the checkpoint: the window record still goes out.
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
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let Some(aggregation) = Aggregation::parse(&shape.aggregation) else {
            return Ok(Vec::new());
        };
        if aggregation == Aggregation::Distribution {
            return Ok(Vec::new());
        }
        let plans = rating.plans;
        let Some((current, current_discount)) = plans.for_tenant(&name.tenant) else {
            return Ok(Vec::new());
        };
        let zone = plans.timezone(&name.tenant);
        let (period_start, period_end) = plans
            .period_of(&name.tenant, current)
            .containing_in(name.window_start, zone);
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
            return Ok(Vec::new());
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
                return Ok(Vec::new());
            }
        };
        let (before, prepaid_before, overage_before) = match &previous {
            Some(record) => (
                decimal(&record.amount, "rated record amount")?,
                decimal(&record.prepaid, "rated record prepaid")?,
                decimal(&record.overage, "rated record overage")?,
            ),
            None => (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO),
        };
        // The tenant's period across charges: the commitment draws down in rating order.
        let period_key = keys::tenant_period_key(&name.tenant, period_start);
        let mut period = self.tenant_period(
            rating,
            batch,
            &period_key,
            plan,
            &name.tenant,
            period_start,
            period_end,
        )?;
        let billed_before = decimal(&period.billed, "tenant period billed")?;
        // Checked: amounts derive from usage. An amount past rust_decimal's 96 bits leaves the
        // window unrated (counted and logged) instead of failing the checkpoint for everyone.
        let sums = (|| {
            let total_before = period.total()?;
            let (prepaid_share, overage_share) = split_prepaid(
                plan.prepaid_commitment,
                total_before,
                add(total_before, rated.increment)?,
            )?;
            Ok::<_, RateError>((
                add(billed_before, rated.increment)?,
                add(before, rated.increment)?,
                add(prepaid_before, prepaid_share)?,
                add(overage_before, overage_share)?,
            ))
        })();
        let (billed, amount, prepaid, overage) = match sums {
            Ok(sums) => sums,
            Err(error) => {
                metrics::counter!(crate::telemetry::RATING_FAILURES).increment(1);
                tracing::error!(%error, tenant = %name.tenant, meter = %name.meter, "cannot rate window");
                return Ok(Vec::new());
            }
        };
        period.billed = billed.normalize().to_string();
        let mut lines = Vec::new();
        // A period already settled (closed under a minimum spend): its true-up moves too.
        if period.settlement.is_some() {
            lines.extend(self.settle(rating, &mut period, plan, &name.tenant, period_start)?);
        }
        let minor = charge.minor_units;
        let window_end = name.window_start + shape.window_secs;
        let record = RatedRecord {
            kind: "rated".into(),
            record_id: rated_record_id(suffix),
            revision,
            tenant: name.tenant.clone(),
            meter: name.meter.clone(),
            dims: crate::rate::record::dims_object(&name.dims),
            window_start: rfc3339(name.window_start),
            window_end: rfc3339(window_end),
            period_start: rfc3339(period_start),
            period_end: rfc3339(updated.period_end),
            quantity: total.quantity_string(aggregation, shape.scale),
            amount: money(amount, minor),
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
            prepaid: money(prepaid, minor),
            overage: money(overage, minor),
        };
        let mut line = serde_json::to_vec(&record).expect("invariant: rated records serialize");
        batch.put(&rated_key, &line);
        rating.entries.insert(ledger_key, updated);
        rating.periods.insert(period_key, period);
        line.push(b'\n');
        lines.insert(0, line);
        Ok(lines)
    }

    /// A tenant period from this checkpoint's cache or the store, or a new one (indexed to be
    /// settled when it closes).
    #[allow(clippy::too_many_arguments)]
    fn tenant_period(
        &self,
        rating: &mut RatingBatch<'_>,
        batch: &mut WriteBatch,
        key: &[u8],
        plan: &Plan,
        tenant: &str,
        period_start: i64,
        period_end: i64,
    ) -> Result<TenantPeriod, StoreError> {
        if let Some(period) = rating.periods.get(key) {
            return Ok(period.clone());
        }
        if let Some(bytes) = self.get(key)? {
            return TenantPeriod::decode(&bytes).map_err(|error| StoreError::Corrupt {
                what: "tenant period",
                detail: error.to_string(),
            });
        }
        batch.put(keys::period_close_key(period_end, tenant, period_start), b"");
        Ok(TenantPeriod {
            plan_id: plan.id.clone(),
            plan_version: plan.version,
            period_end,
            billed: "0".into(),
            settlement: None,
        })
    }

    /// (Re)computes a closed period's minimum-spend true-up; a new revision of its settlement
    /// record when it changed (or the first one).
    fn settle(
        &self,
        rating: &RatingBatch<'_>,
        period: &mut TenantPeriod,
        plan: &Plan,
        tenant: &str,
        period_start: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let billed = decimal(&period.billed, "tenant period billed")?;
        let Ok(true_up) = sub(plan.minimum_spend, billed).map(|gap| gap.max(Decimal::ZERO)) else {
            return Ok(settlement_failed(tenant, RateError::Overflow));
        };
        let total_before = match period.total() {
            Ok(total) => total,
            Err(error) => return Ok(settlement_failed(tenant, error)),
        };
        let (revision, true_up_before) = match &period.settlement {
            Some(settled) => (settled.revision, decimal(&settled.true_up, "settled true-up")?),
            None => (0, Decimal::ZERO),
        };
        if revision > 0 && true_up == true_up_before {
            return Ok(None);
        }
        let id = settlement_record_id(tenant, period_start);
        let (prepaid_before, overage_before) = match &period.settlement {
            Some(settled) => (
                decimal(&settled.prepaid, "settlement prepaid")?,
                decimal(&settled.overage, "settlement overage")?,
            ),
            None => (Decimal::ZERO, Decimal::ZERO),
        };
        let minor = crate::rate::minor_unit_exponent(&plan.currency).unwrap_or(2);
        let sums = (|| {
            let total_after = add(sub(total_before, true_up_before)?, true_up)?;
            let (prepaid_share, overage_share) =
                split_prepaid(plan.prepaid_commitment, total_before, total_after)?;
            Ok::<_, RateError>((
                add(prepaid_before, prepaid_share)?,
                add(overage_before, overage_share)?,
                sub(true_up, true_up_before)?,
                total_after,
            ))
        })();
        let (prepaid, overage, increment, total_after) = match sums {
            Ok(sums) => sums,
            Err(error) => return Ok(settlement_failed(tenant, error)),
        };
        period.settlement = Some(Settled {
            revision: revision + 1,
            true_up: true_up.normalize().to_string(),
            prepaid: prepaid.normalize().to_string(),
            overage: overage.normalize().to_string(),
        });
        let record = RatedRecord {
            kind: "rated".into(),
            record_id: id,
            revision: revision + 1,
            tenant: tenant.to_string(),
            meter: String::new(),
            dims: Default::default(),
            window_start: rfc3339(period_start),
            window_end: rfc3339(period.period_end),
            period_start: rfc3339(period_start),
            period_end: rfc3339(period.period_end),
            quantity: money(billed, minor),
            amount: money(true_up, minor),
            increment: money(increment, minor),
            currency: plan.currency.clone(),
            plan_id: plan.id.clone(),
            plan_version: plan.version,
            model: "minimum_spend".into(),
            discount_percent: "0".into(),
            period_quantity: money(billed, minor),
            period_amount: money(total_after, minor),
            tiers: Vec::new(),
            event_time_from: rfc3339(period_start),
            event_time_to: rfc3339(period.period_end),
            rated_at: rating.rated_at.clone(),
            prepaid: money(prepaid, minor),
            overage: money(overage, minor),
        };
        // The usage file and the emitters carry it like any rated record (meter "").
        Ok(Some(crate::rate::record::jsonl(&record)))
    }

    /// Settles the tenant periods that closed (period end + `allowed_lateness` has passed) under
    /// a plan with a minimum spend, and drops their close-index entries. Returns outbox lines.
    pub(super) fn settle_closed_periods(
        &self,
        rating: &mut RatingBatch<'_>,
        batch: &mut WriteBatch,
        allowed_lateness_secs: i64,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let watermark = rating.now_secs - allowed_lateness_secs;
        let due = self.scan_keys(&[keys::PERIOD_CLOSE], |key| {
            key.first() == Some(&keys::PERIOD_CLOSE)
                && keys::time_from_bytes(&key[1..]).is_some_and(|end| end <= watermark)
        })?;
        let mut lines = Vec::new();
        for close_key in due {
            let Some((_, tenant, period_start)) = keys::decode_period_close_key(&close_key) else {
                batch.delete(&close_key);
                continue;
            };
            // Another replica owns the tenant now: it settles (the key stays for a return).
            if !self.tenant_sources.emits_here(&tenant) {
                continue;
            }
            batch.delete(&close_key);
            let key = keys::tenant_period_key(&tenant, period_start);
            let mut period = match rating.periods.get(&key) {
                Some(period) => period.clone(),
                None => match self.get(&key)? {
                    Some(bytes) => TenantPeriod::decode(&bytes).map_err(|error| StoreError::Corrupt {
                        what: "tenant period",
                        detail: error.to_string(),
                    })?,
                    None => continue,
                },
            };
            let plans = rating.plans;
            let Some(plan) = plans
                .version(&period.plan_id, period.plan_version)
                .or_else(|| plans.current(&period.plan_id))
            else {
                continue;
            };
            if plan.minimum_spend.is_zero() {
                continue;
            }
            if let Some(line) = self.settle(rating, &mut period, plan, &tenant, period_start)? {
                lines.push((tenant.clone(), line));
            }
            rating.periods.insert(key, period);
        }
        Ok(lines)
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
            let prefix = keys::rated_prefix(meter, tenant);
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
