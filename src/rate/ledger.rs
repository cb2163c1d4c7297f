//! A billing period's ledger for one (tenant, meter[, dims]) under one charge: turns "this window's
//! usage changed, and the period total is now T" into the window's rated record.
//!
//! Each change bills `rounded(price(T_after)) − rounded(price(T_before))` and attributes it to the
//! window that changed; the window's record carries its *whole* attributed amount with a new
//! revision, so a billing system that upserts by record id and keeps the latest revision always
//! holds records that sum to the period's rounded price — whatever order windows and late
//! amendments arrive in.
//!
//! The caller computes the period total, because only it knows the aggregation: a sum of windows
//! for SUM/COUNT, a union for UNIQUE_COUNT (monthly active users), a maximum for MAX.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{Charge, RateError};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeriodLedger {
    /// The period total the last record was rated at; `None` until the first record.
    rated_total: Option<Decimal>,
    windows: BTreeMap<i64, WindowLine>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct WindowLine {
    quantity: Decimal,
    amount: Decimal,
    revision: u32,
}

/// The record to emit for a window (replacing any earlier revision of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RatedWindow {
    pub window_start: i64,
    pub revision: u32,
    /// The window's own quantity (as the caller reported it).
    pub quantity: Decimal,
    /// Everything billed to this window so far, rounded to the currency's minor unit.
    pub amount: Decimal,
    /// What this revision adds to the previous one.
    pub increment: Decimal,
}

impl PeriodLedger {
    /// Rates a change of window `window_start` (now holding `window_quantity`) that brought the
    /// period total to `period_total`.
    pub fn rate(
        &mut self,
        charge: &Charge,
        window_start: i64,
        window_quantity: Decimal,
        period_total: Decimal,
    ) -> Result<RatedWindow, RateError> {
        let increment = charge.increment(self.rated_total, period_total)?;
        let line = self.windows.entry(window_start).or_default();
        line.quantity = window_quantity;
        line.amount += increment;
        line.revision += 1;
        self.rated_total = Some(period_total);
        Ok(RatedWindow {
            window_start,
            revision: line.revision,
            quantity: line.quantity,
            amount: line.amount,
            increment,
        })
    }

    /// The sum of the latest revision of every window.
    pub fn billed(&self) -> Decimal {
        self.windows.values().map(|line| line.amount).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ChargeModel, Tier};
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};
    use std::str::FromStr;

    fn d(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    fn tokens() -> Charge {
        Charge {
            meter: "tokens".into(),
            model: ChargeModel::Graduated {
                tiers: vec![
                    Tier {
                        up_to: Some(d("1000")),
                        unit_price: d("0.002"),
                        flat_price: d("0"),
                    },
                    Tier {
                        up_to: Some(d("10000")),
                        unit_price: d("0.0015"),
                        flat_price: d("1"),
                    },
                    Tier {
                        up_to: None,
                        unit_price: d("0.001"),
                        flat_price: d("0"),
                    },
                ],
            },
            free_units: d("100"),
            discount_percent: d("0"),
            minor_units: 2,
        }
    }

    #[test]
    fn late_amendment_revises_the_window_it_belongs_to() {
        let charge = tokens();
        let mut ledger = PeriodLedger::default();
        let first = ledger.rate(&charge, 0, d("1100"), d("1100")).unwrap();
        assert_eq!((first.revision, first.amount), (1, d("2.00")));
        let second = ledger.rate(&charge, 60, d("4000"), d("5100")).unwrap();
        assert_eq!((second.revision, second.amount), (1, d("7.00")));
        // A late event adds 900 tokens to the first window: it gets revision 2 carrying its
        // whole amount; the latest revisions still sum to the period price.
        let amended = ledger.rate(&charge, 0, d("2000"), d("6000")).unwrap();
        assert_eq!((amended.revision, amended.quantity), (2, d("2000")));
        assert_eq!(amended.increment, d("1.35"));
        assert_eq!(amended.amount, d("3.35"));
        assert_eq!(ledger.billed(), charge.price(d("6000")).unwrap().rounded);
    }

    proptest! {
        /// Whatever order window changes (including late amendments) arrive in, the latest
        /// revision of every window sums to the rounded price of the period total.
        #[test]
        fn latest_revisions_sum_to_the_rounded_period_price(
            changes in proptest::collection::vec((0i64..20, 0u32..3_000), 1..60),
            discount in 0u32..40,
        ) {
            let charge = Charge { discount_percent: Decimal::from(discount), ..tokens() };
            let mut ledger = PeriodLedger::default();
            let mut windows: HashMap<i64, Decimal> = HashMap::new();
            let mut latest: HashMap<i64, RatedWindow> = HashMap::new();
            let mut revisions: BTreeSet<(i64, u32)> = BTreeSet::new();
            for (window, tokens) in changes {
                let quantity = windows.entry(window).or_default();
                *quantity += Decimal::from(tokens);
                let window_quantity = *quantity;
                let total: Decimal = windows.values().copied().sum();
                let record = ledger.rate(&charge, window, window_quantity, total).unwrap();
                prop_assert!(revisions.insert((window, record.revision)), "revisions never repeat");
                latest.insert(window, record);
            }
            let total: Decimal = windows.values().copied().sum();
            let upserted: Decimal = latest.values().map(|r| r.amount).sum();
            prop_assert_eq!(upserted, charge.price(total).unwrap().rounded);
            prop_assert_eq!(ledger.billed(), upserted);
        }
    }
}
