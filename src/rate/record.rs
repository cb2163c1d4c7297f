//! The rated usage record (what billing systems consume) and the per-period ledger entry the
//! checkpoint keeps beside the aggregates, in the same WriteBatch.
//!
//! Attribution: a (tenant, meter) billing period is priced on its total across every dimension
//! and window; each time a window's record is (re)emitted, the period total moves and the
//! increment `rounded(price(after)) − rounded(price(before))` is added to *that window's* amount.
//! A record carries the window's whole amount so far, with a revision; upserting by `record_id`
//! and keeping the highest revision leaves records whose amounts sum to the period's rounded
//! price (proved for any order of changes in `ledger`'s property test and end to end).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{Charge, ChargeModel, RateError};
use crate::aggregate::{AggState, Aggregation};

/// A closed window's aggregate, one JSON line in the usage file. `record_id` is deterministic
/// from (meter, tenant, window, dims); a later `revision` replaces an earlier one (upsert).
#[derive(Debug, Serialize)]
pub struct WindowRecord<'a> {
    pub kind: &'static str,
    pub record_id: String,
    pub revision: u32,
    pub tenant: &'a str,
    pub meter: &'a str,
    pub dims: serde_json::Map<String, serde_json::Value>,
    pub window_start: String,
    pub window_end: String,
    pub aggregation: &'a str,
    /// Exact decimal string.
    pub quantity: String,
    pub closed_at: String,
}

/// A closed window, as its record reads it.
pub struct ClosedWindow<'a> {
    pub tenant: &'a str,
    pub meter: &'a str,
    pub dims: &'a [(String, String)],
    pub window_start: i64,
    pub window_secs: i64,
    /// The meter's aggregation decides how a state reads (TIME_WEIGHTED: value × hours); None:
    /// the meter is no longer configured and its state reads as its own kind.
    pub aggregation: Option<Aggregation>,
    pub scale: u32,
}

impl WindowRecord<'_> {
    /// The JSONL line of `window`'s record: `total` at `revision`, deterministic `record_id`
    /// from the series' key suffix.
    pub fn line_of(
        window: &ClosedWindow<'_>,
        suffix: &[u8],
        total: &AggState,
        revision: u32,
        closed_at: &str,
    ) -> Vec<u8> {
        let record = WindowRecord {
            kind: "window",
            record_id: record_id(suffix),
            revision,
            tenant: window.tenant,
            meter: window.meter,
            dims: dims_object(window.dims),
            window_start: crate::model::rfc3339(window.window_start),
            window_end: crate::model::rfc3339(window.window_start + window.window_secs),
            aggregation: window
                .aggregation
                .map_or(total.kind(), |aggregation| aggregation.as_str()),
            quantity: window.aggregation.map_or_else(
                || total.value_string(window.scale),
                |aggregation| total.quantity_string(aggregation, window.scale),
            ),
            closed_at: closed_at.to_string(),
        };
        jsonl(&record)
    }
}

/// One JSONL line of a record (window or rated).
pub fn jsonl(record: &impl Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(record).expect("invariant: records serialize");
    line.push(b'\n');
    line
}

/// A series' dimensions as the JSON object records carry.
pub fn dims_object(dims: &[(String, String)]) -> serde_json::Map<String, serde_json::Value> {
    dims.iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect()
}

/// A record's id: the hex xxh3-128 of its identity bytes (stable across versions: consumers
/// upsert by it).
pub fn record_id(suffix: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(suffix))
}

/// One line of the rated output (JSONL file, Kafka topic, webhook batch, `GET /api/v1/rated`).
/// Field names are a contract; decimals are strings (exact).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RatedRecord {
    /// Always `"rated"` (the usage file also carries `"window"` records).
    pub kind: String,
    /// Deterministic from (tenant, meter, dims, window): the upsert key.
    pub record_id: String,
    /// Increases with every change of the window; the highest one replaces the others.
    pub revision: u32,
    pub tenant: String,
    pub meter: String,
    pub dims: serde_json::Map<String, serde_json::Value>,
    pub window_start: String,
    pub window_end: String,
    pub period_start: String,
    pub period_end: String,
    /// The window's own quantity (exact decimal).
    pub quantity: String,
    /// Everything billed to this window so far, in the currency's minor units.
    pub amount: String,
    /// What this revision adds to the previous one (negative: a credit under volume pricing).
    pub increment: String,
    pub currency: String,
    pub plan_id: String,
    pub plan_version: u32,
    pub model: String,
    pub discount_percent: String,
    /// The period's total quantity and rounded price as of this revision.
    pub period_quantity: String,
    pub period_amount: String,
    /// How the period's price splits into tiers as of this revision (graduated/volume).
    pub tiers: Vec<TierAmount>,
    /// Event-time bounds of the usage this record covers (the window).
    pub event_time_from: String,
    pub event_time_to: String,
    /// Ingest-time bound: every event counted here was durable before this instant.
    pub rated_at: String,
    /// The part of `amount` the plan's prepaid commitment covers, and the rest (billed as
    /// overage); they sum to `amount`. Without a commitment, `prepaid` is 0.
    pub prepaid: String,
    pub overage: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TierAmount {
    pub tier: usize,
    pub units: String,
    pub unit_price: String,
    pub flat_price: String,
    pub amount: String,
}

/// A billing period's ledger for one (tenant, meter), persisted under an `L` key. The plan
/// version and discount are pinned when the period is first rated, so a plan reloaded in the
/// middle of a period applies from the next period on (already-rated periods keep theirs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeriodEntry {
    pub plan_id: String,
    pub plan_version: u32,
    pub discount_percent: String,
    pub period_end: i64,
    /// Merge of every rated window's state (a sum for SUM, a union for UNIQUE_COUNT, ...).
    pub state: Option<AggState>,
    /// The period quantity the last record was rated at.
    pub rated_quantity: Option<String>,
}

impl PeriodEntry {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: period entries serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<PeriodEntry, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A tenant's billing period across all its charges, persisted under a `C` key: what has been
/// billed (the sum of the charges' rounded amounts), for the prepaid commitment's drawdown and
/// the minimum-spend settlement emitted when the period closes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TenantPeriod {
    pub plan_id: String,
    pub plan_version: u32,
    pub period_end: i64,
    /// Sum of every rated record's amount in the period (the subtotal), exact decimal string.
    pub billed: String,
    /// Set once the period closed under a plan with a minimum spend: the true-up last emitted.
    pub settlement: Option<Settled>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Settled {
    pub revision: u32,
    pub true_up: String,
    /// The settlement record's cumulative prepaid and overage shares.
    pub prepaid: String,
    pub overage: String,
}

impl TenantPeriod {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: tenant periods serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<TenantPeriod, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// The period's price so far: the subtotal plus any settled true-up.
    pub fn total(&self) -> Result<Decimal, RateError> {
        let billed: Decimal = self.billed.parse().unwrap_or_default();
        let true_up: Decimal = self
            .settlement
            .as_ref()
            .and_then(|settled| settled.true_up.parse().ok())
            .unwrap_or_default();
        super::add(billed, true_up)
    }
}

/// How a change of the period's price from `before` to `after` splits between the prepaid
/// commitment and overage: the commitment covers the first `commitment` of the period's price,
/// so each record's share is `covered(after) − covered(before)` (and the rest is overage) —
/// the shares of a period's records sum to `min(price, commitment)` and `price − that`.
pub fn split_prepaid(
    commitment: Decimal,
    before: Decimal,
    after: Decimal,
) -> Result<(Decimal, Decimal), RateError> {
    let covered = |price: Decimal| price.max(Decimal::ZERO).min(commitment);
    let prepaid = super::sub(covered(after), covered(before))?;
    Ok((prepaid, super::sub(super::sub(after, before)?, prepaid)?))
}

pub fn model_name(model: &ChargeModel) -> &'static str {
    match model {
        ChargeModel::Flat { .. } => "flat",
        ChargeModel::PerUnit { .. } => "per_unit",
        ChargeModel::Package { .. } => "package",
        ChargeModel::Graduated { .. } => "graduated",
        ChargeModel::Volume { .. } => "volume",
        ChargeModel::Percentage { .. } => "percentage",
    }
}

/// Money with exactly the currency's minor units: "16.65", "1.50", "0" for JPY.
pub fn money(amount: Decimal, minor_units: u32) -> String {
    let places = minor_units as usize;
    format!("{amount:.places$}")
}

/// A quantity as the period ledger prices it: the meter's reading of the merged state.
pub fn quantity_of(state: &AggState, aggregation: Aggregation, scale: u32) -> Result<Decimal, RateError> {
    use std::str::FromStr;
    Decimal::from_str(&state.quantity_string(aggregation, scale)).map_err(|_| RateError::Overflow)
}

/// The result of rating one window change.
pub struct Rated {
    pub increment: Decimal,
    pub period_quantity: Decimal,
    pub period_amount: Decimal,
    pub tiers: Vec<TierAmount>,
}

/// Folds a window change into the period entry and prices it: `change` is the window's whole
/// state when the ledger has not seen the window yet, else the delta that amended it.
pub fn rate_change(
    entry: &mut PeriodEntry,
    charge: &Charge,
    change: Option<&AggState>,
    aggregation: Aggregation,
    scale: u32,
) -> Result<Rated, RateError> {
    if let Some(change) = change {
        match &mut entry.state {
            Some(state) => state.merge(change).map_err(|_| RateError::Overflow)?,
            None => entry.state = Some(change.clone()),
        }
    }
    let period_quantity = match &entry.state {
        Some(state) => quantity_of(state, aggregation, scale)?,
        None => Decimal::ZERO,
    };
    let before = match &entry.rated_quantity {
        Some(text) => Some(text.parse::<Decimal>().map_err(|_| RateError::Overflow)?),
        None => None,
    };
    let increment = charge.increment(before, period_quantity)?;
    let priced = charge.price(period_quantity)?;
    entry.rated_quantity = Some(period_quantity.normalize().to_string());
    Ok(Rated {
        increment,
        period_quantity,
        period_amount: priced.rounded,
        tiers: priced
            .tiers
            .iter()
            .map(|line| TierAmount {
                tier: line.tier,
                units: line.units.normalize().to_string(),
                unit_price: line.unit_price.normalize().to_string(),
                flat_price: line.flat_price.normalize().to_string(),
                amount: line.amount.normalize().to_string(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Observation;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn entry() -> PeriodEntry {
        PeriodEntry {
            plan_id: "pro".into(),
            plan_version: 1,
            discount_percent: "0".into(),
            period_end: 0,
            state: None,
            rated_quantity: None,
        }
    }

    fn per_unit(price: &str, free: &str) -> Charge {
        Charge {
            meter: "m".into(),
            model: ChargeModel::PerUnit {
                unit_price: price.parse().unwrap(),
            },
            free_units: free.parse().unwrap(),
            discount_percent: Decimal::ZERO,
            minor_units: 2,
        }
    }

    #[test]
    fn unique_counts_are_priced_on_the_union_of_the_period() {
        // $5 per monthly active user, 5 free: ann and bob on day 1, bob and cy on day 2 → 3
        // distinct users (not 4), all within the free tier; then 4 more on day 3 → 7 → $10.
        let charge = per_unit("5", "5");
        let users = |names: &[&str]| {
            let hash = |name: &str| Observation::Unique(xxhash_rust::xxh3::xxh3_64(name.as_bytes()));
            let mut state = AggState::from_observation(Aggregation::UniqueCount, hash(names[0]), 0, 1000);
            for name in &names[1..] {
                state.observe(hash(name), 0).unwrap();
            }
            state
        };
        let mut ledger = entry();
        let unique = Aggregation::UniqueCount;
        let day1 = rate_change(&mut ledger, &charge, Some(&users(&["ann", "bob"])), unique, 0).unwrap();
        let day2 = rate_change(&mut ledger, &charge, Some(&users(&["bob", "cy"])), unique, 0).unwrap();
        assert_eq!(day2.period_quantity, Decimal::from(3));
        let day3 = rate_change(
            &mut ledger,
            &charge,
            Some(&users(&["d", "e", "f", "g"])),
            unique,
            0,
        )
        .unwrap();
        assert_eq!(
            (day1.increment, day2.increment, day3.increment),
            (Decimal::ZERO, Decimal::ZERO, Decimal::from(10))
        );
    }

    proptest! {
        /// However a period's price moves (volume credits included), the records' prepaid
        /// shares sum to the commitment's drawdown and their overage to the rest.
        #[test]
        fn prepaid_shares_sum_to_the_drawdown(
            moves in proptest::collection::vec(-500i64..2_000, 1..30),
            commitment in 0i64..10_000,
        ) {
            let commitment = Decimal::new(commitment, 2);
            let (mut price, mut prepaid, mut overage) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
            for step in moves {
                // The period price never goes below zero.
                let after = (price + Decimal::new(step, 2)).max(Decimal::ZERO);
                let (p, o) = split_prepaid(commitment, price, after).unwrap();
                prop_assert_eq!(p + o, after - price);
                prepaid += p;
                overage += o;
                price = after;
            }
            prop_assert_eq!(prepaid, price.min(commitment));
            prop_assert_eq!(overage, price - price.min(commitment));
        }

        /// SUM meters: however changes (first sightings and amendments) are split and ordered,
        /// the per-window amounts sum to the price of the period total.
        #[test]
        fn window_amounts_sum_to_the_period_price(
            changes in proptest::collection::vec((0u8..8, 0i64..5_000), 1..40),
        ) {
            let charge = per_unit("0.0013", "250");
            let mut ledger = entry();
            let mut amounts: HashMap<u8, Decimal> = HashMap::new();
            let mut total = 0i64;
            for (window, quantity) in changes {
                let delta = AggState::from_observation(Aggregation::Sum, Observation::Value(quantity as i128), 0, 0);
                let rated = rate_change(&mut ledger, &charge, Some(&delta), Aggregation::Sum, 0).unwrap();
                *amounts.entry(window).or_default() += rated.increment;
                total += quantity;
                prop_assert_eq!(rated.period_quantity, Decimal::from(total));
            }
            let sum: Decimal = amounts.values().copied().sum();
            prop_assert_eq!(sum, charge.price(Decimal::from(total)).unwrap().rounded);
        }
    }
}
