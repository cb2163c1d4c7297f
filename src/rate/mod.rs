//! Pure pricing: what a billing period's usage costs under a plan's charge, and the increment to
//! emit when a window's usage lands. No I/O, no clock; `plan` validates the config shapes.
//!
//! Rounding rule: the price of a period total is computed exactly in decimal, then rounded half
//! away from zero to the currency's minor unit (ISO 4217 exponent). Each emitted increment is
//! `rounded(price(after)) − rounded(price(before))`, so the increments of a period always sum to
//! its rounded price, whatever the tiers and however the usage was split or ordered.
//!
//! Volume pricing is not monotone: crossing into a cheaper tier reprices every unit, so an
//! increment can be negative (a credit), as at Stripe.
//!
//! Free units are taken off the period total before the model applies (Lago's "free units"):
//! tiers and packages count billable units. A flat fee is owed for the period whatever the usage,
//! so it is part of the first increment.
//!
//! Not here (they need more than a period total): a percentage's per-event minimum/maximum (the
//! aggregates keep no events); minimum spend and prepaid commitments are period settlements
//! across charges (`plan::Plan::settle`), shown by the bill preview.

pub mod currency;
pub mod ledger;
pub mod period;
pub mod plan;
pub mod record;

use rust_decimal::{Decimal, RoundingStrategy};

pub use currency::minor_unit_exponent;

/// One tier of a graduated or volume charge. `up_to` is the inclusive upper bound of billable
/// units (cumulative from zero); `None` is the last, unbounded tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    /// Charged once when any unit falls in the tier (graduated) or when the total does (volume).
    pub flat_price: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeModel {
    /// A fixed fee per billing period.
    Flat { amount: Decimal },
    /// Every billable unit at one price.
    PerUnit { unit_price: Decimal },
    /// Billable units in packages of `size`, a started package paid in full.
    Package { size: Decimal, price: Decimal },
    /// Each tier's units at that tier's price, plus the flat price of every tier entered.
    Graduated { tiers: Vec<Tier> },
    /// All units at the price of the tier the total falls in, plus that tier's flat price.
    Volume { tiers: Vec<Tier> },
    /// A percentage (`rate`, e.g. 2.9 for 2.9 %) of a monetary quantity (a SUM meter of
    /// amounts, such as payment volume): cost pass-through and transaction fees.
    Percentage { rate: Decimal },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    pub meter: String,
    pub model: ChargeModel,
    pub free_units: Decimal,
    /// Taken off the exact price before rounding (e.g. 10 for a non-production environment).
    pub discount_percent: Decimal,
    /// The currency's minor-unit exponent (2 for USD, 0 for JPY, 3 for KWD).
    pub minor_units: u32,
}

/// How one tier contributed to a price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierLine {
    pub tier: usize,
    pub units: Decimal,
    pub unit_price: Decimal,
    pub flat_price: Decimal,
    pub amount: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priced {
    /// Exact, before rounding.
    pub exact: Decimal,
    /// Rounded half away from zero to the currency's minor unit.
    pub rounded: Decimal,
    pub tiers: Vec<TierLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("amount overflows 96-bit decimal arithmetic")]
    Overflow,
    #[error("quantity must not be negative")]
    NegativeQuantity,
}

/// Why a charge definition cannot be priced.
pub fn validate_tiers(tiers: &[Tier]) -> Result<(), String> {
    if tiers.is_empty() {
        return Err("needs at least one tier".into());
    }
    let mut previous = Decimal::ZERO;
    for (index, tier) in tiers.iter().enumerate() {
        let last = index + 1 == tiers.len();
        match (tier.up_to, last) {
            (None, true) => {}
            (None, false) => return Err(format!("tier {index}: only the last tier may omit up_to")),
            (Some(_), true) => {
                return Err(format!("tier {index}: the last tier must omit up_to (unbounded)"))
            }
            (Some(bound), false) if bound <= previous => {
                return Err(format!(
                    "tier {index}: up_to {bound} must exceed the previous bound {previous}"
                ))
            }
            (Some(bound), false) => previous = bound,
        }
        if tier.unit_price.is_sign_negative() || tier.flat_price.is_sign_negative() {
            return Err(format!("tier {index}: prices must not be negative"));
        }
    }
    Ok(())
}

/// Checked decimal arithmetic: amounts derive from usage, and rust_decimal's operators panic
/// past 96 bits; every step on them is checked and an overflow is a `RateError` instead.
pub fn add(a: Decimal, b: Decimal) -> Result<Decimal, RateError> {
    a.checked_add(b).ok_or(RateError::Overflow)
}

pub fn sub(a: Decimal, b: Decimal) -> Result<Decimal, RateError> {
    a.checked_sub(b).ok_or(RateError::Overflow)
}

pub fn mul(a: Decimal, b: Decimal) -> Result<Decimal, RateError> {
    a.checked_mul(b).ok_or(RateError::Overflow)
}

impl Charge {
    /// The price of a period's total usage (in the meter's units).
    pub fn price(&self, quantity: Decimal) -> Result<Priced, RateError> {
        if quantity.is_sign_negative() && !quantity.is_zero() {
            return Err(RateError::NegativeQuantity);
        }
        let billable = sub(quantity, self.free_units)?.max(Decimal::ZERO);
        let mut tiers = Vec::new();
        let exact = match &self.model {
            ChargeModel::Flat { amount } => *amount,
            ChargeModel::PerUnit { unit_price } => mul(billable, *unit_price)?,
            ChargeModel::Percentage { rate } => mul(billable, *rate)? / Decimal::ONE_HUNDRED,
            ChargeModel::Package { size, price } => {
                let packages = (billable / *size).ceil();
                mul(packages, *price)?
            }
            ChargeModel::Graduated { tiers: defined } => {
                let mut total = Decimal::ZERO;
                let mut lower = Decimal::ZERO;
                for (index, tier) in defined.iter().enumerate() {
                    if billable <= lower {
                        break;
                    }
                    let upper = tier.up_to.map_or(billable, |bound| bound.min(billable));
                    let units = sub(upper, lower)?;
                    let amount = add(mul(units, tier.unit_price)?, tier.flat_price)?;
                    total = add(total, amount)?;
                    tiers.push(TierLine {
                        tier: index,
                        units,
                        unit_price: tier.unit_price,
                        flat_price: tier.flat_price,
                        amount,
                    });
                    lower = upper;
                }
                total
            }
            ChargeModel::Volume { tiers: defined } => {
                if billable.is_zero() {
                    Decimal::ZERO
                } else {
                    let (index, tier) = defined
                        .iter()
                        .enumerate()
                        .find(|(_, tier)| tier.up_to.is_none_or(|bound| billable <= bound))
                        .expect("invariant: validated tiers end with an unbounded tier");
                    let amount = add(mul(billable, tier.unit_price)?, tier.flat_price)?;
                    tiers.push(TierLine {
                        tier: index,
                        units: billable,
                        unit_price: tier.unit_price,
                        flat_price: tier.flat_price,
                        amount,
                    });
                    amount
                }
            }
        };
        let exact = if self.discount_percent.is_zero() {
            exact
        } else {
            let keep = (Decimal::ONE_HUNDRED - self.discount_percent) / Decimal::ONE_HUNDRED;
            mul(exact, keep)?
        };
        Ok(Priced {
            exact,
            rounded: exact.round_dp_with_strategy(self.minor_units, RoundingStrategy::MidpointAwayFromZero),
            tiers,
        })
    }

    /// What to emit when the period total moves from `before` to `after`: the difference of the
    /// rounded prices. `before = None` means nothing has been billed in the period yet.
    pub fn increment(&self, before: Option<Decimal>, after: Decimal) -> Result<Decimal, RateError> {
        let billed = match before {
            Some(before) => self.price(before)?.rounded,
            None => Decimal::ZERO,
        };
        sub(self.price(after)?.rounded, billed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    fn charge(model: ChargeModel) -> Charge {
        Charge {
            meter: "m".into(),
            model,
            free_units: Decimal::ZERO,
            discount_percent: Decimal::ZERO,
            minor_units: 2,
        }
    }

    fn tier(up_to: Option<&str>, unit: &str, flat: &str) -> Tier {
        Tier {
            up_to: up_to.map(d),
            unit_price: d(unit),
            flat_price: d(flat),
        }
    }

    /// Users: first 100 at $10, 101–200 at $8, beyond 200 at $6 (the seed pricing's steps).
    fn user_tiers() -> Vec<Tier> {
        vec![
            tier(Some("100"), "10", "0"),
            tier(Some("200"), "8", "0"),
            tier(None, "6", "0"),
        ]
    }

    /// The example plan: 100 free tokens, then graduated tiers.
    fn tokens() -> Charge {
        Charge {
            free_units: d("100"),
            ..charge(ChargeModel::Graduated {
                tiers: vec![
                    tier(Some("1000"), "0.002", "0"),
                    tier(Some("10000"), "0.0015", "1"),
                    tier(None, "0.001", "0"),
                ],
            })
        }
    }

    #[test]
    fn pay_as_you_go_from_the_seed_pricing() {
        // $0.10 / GB data ingested.
        let data = charge(ChargeModel::PerUnit {
            unit_price: d("0.10"),
        });
        assert_eq!(data.price(d("12.345")).unwrap().rounded, d("1.23"));
        assert_eq!(
            data.price(d("12.355")).unwrap().rounded,
            d("1.24"),
            "half away from zero"
        );
        // $0.001 / API call.
        let calls = charge(ChargeModel::PerUnit {
            unit_price: d("0.001"),
        });
        assert_eq!(calls.price(d("1234567")).unwrap().rounded, d("1234.57"));
        // $5 / user / month, $20 / node / month.
        let users = charge(ChargeModel::PerUnit { unit_price: d("5") });
        assert_eq!(users.price(d("7")).unwrap().rounded, d("35"));
        let nodes = charge(ChargeModel::PerUnit { unit_price: d("20") });
        assert_eq!(nodes.price(d("12")).unwrap().rounded, d("240"));
    }

    #[test]
    fn percentage_of_a_monetary_quantity() {
        // Cost pass-through at 2.9 % of payment volume; 0.029 × 1234.56 = 35.80224 → 35.80.
        let fees = charge(ChargeModel::Percentage { rate: d("2.9") });
        assert_eq!(fees.price(d("1234.56")).unwrap().rounded, d("35.80"));
        assert_eq!(fees.price(d("0")).unwrap().rounded, d("0"));
        // A free allowance of 100 (currency units) before the fee applies.
        let with_free = Charge {
            free_units: d("100"),
            ..fees
        };
        assert_eq!(with_free.price(d("150")).unwrap().rounded, d("1.45"));
    }

    #[test]
    fn freemium_allowance_is_free_then_billed() {
        // Free tier: 1 GB included, then $0.10 / GB.
        let data = Charge {
            free_units: d("1"),
            ..charge(ChargeModel::PerUnit {
                unit_price: d("0.10"),
            })
        };
        assert_eq!(data.price(d("0.8")).unwrap().rounded, d("0"));
        assert_eq!(data.price(d("11")).unwrap().rounded, d("1.00"));
    }

    #[test]
    fn packages_round_up() {
        // $0.50 per started 1,000 API calls; workflow runs in packages of 10 k at $20.
        let calls = charge(ChargeModel::Package {
            size: d("1000"),
            price: d("0.50"),
        });
        assert_eq!(calls.price(d("0")).unwrap().rounded, d("0"));
        assert_eq!(calls.price(d("1")).unwrap().rounded, d("0.50"));
        assert_eq!(calls.price(d("2500")).unwrap().rounded, d("1.50"));
        assert_eq!(calls.price(d("3000")).unwrap().rounded, d("1.50"));
        let runs = charge(ChargeModel::Package {
            size: d("10000"),
            price: d("20"),
        });
        assert_eq!(runs.price(d("50001")).unwrap().rounded, d("120"));
    }

    #[test]
    fn graduated_tiers_with_flat_prices() {
        let tokens = tokens();
        assert_eq!(tokens.price(d("100")).unwrap().rounded, d("0"));
        assert_eq!(tokens.price(d("1100")).unwrap().rounded, d("2.00"));
        // 1000 × 0.002 + 4000 × 0.0015 + 1 (tier 2 entered).
        let priced = tokens.price(d("5100")).unwrap();
        assert_eq!(priced.rounded, d("9.00"));
        assert_eq!(priced.tiers.len(), 2);
        assert_eq!(priced.tiers[1].units, d("4000"));
        // + 9000 × 0.0015 + 10000 × 0.001.
        assert_eq!(tokens.price(d("20100")).unwrap().rounded, d("26.50"));
        // Users: first 100 at $10, 101–200 at $8, beyond at $6.
        let users = charge(ChargeModel::Graduated { tiers: user_tiers() });
        assert_eq!(users.price(d("250")).unwrap().rounded, d("2100"));
    }

    #[test]
    fn volume_prices_every_unit_at_the_reached_tier() {
        let users = charge(ChargeModel::Volume { tiers: user_tiers() });
        assert_eq!(users.price(d("100")).unwrap().rounded, d("1000"));
        assert_eq!(users.price(d("150")).unwrap().rounded, d("1200"));
        assert_eq!(users.price(d("250")).unwrap().rounded, d("1500"));
        assert_eq!(users.price(d("0")).unwrap().rounded, d("0"));
    }

    #[test]
    fn flat_fee_is_owed_for_the_period_and_discounts_apply_before_rounding() {
        // Starter tier: $99 / month; a non-production environment at 10 % off.
        let starter = Charge {
            discount_percent: d("10"),
            ..charge(ChargeModel::Flat { amount: d("99") })
        };
        assert_eq!(starter.price(d("0")).unwrap().rounded, d("89.10"));
        assert_eq!(starter.increment(None, d("0")).unwrap(), d("89.10"));
        assert_eq!(starter.increment(Some(d("0")), d("5")).unwrap(), d("0"));
    }

    #[test]
    fn minor_units_follow_the_currency() {
        let yen = Charge {
            minor_units: minor_unit_exponent("JPY").unwrap(),
            ..charge(ChargeModel::PerUnit {
                unit_price: d("0.15"),
            })
        };
        assert_eq!(yen.price(d("7")).unwrap().rounded, d("1")); // 1.05 → 1
        let dinar = Charge {
            minor_units: minor_unit_exponent("KWD").unwrap(),
            ..charge(ChargeModel::PerUnit {
                unit_price: d("0.0015"),
            })
        };
        assert_eq!(dinar.price(d("3")).unwrap().rounded, d("0.005")); // 0.0045 → 0.005
    }

    #[test]
    fn tier_definitions_are_validated() {
        assert!(validate_tiers(&[]).is_err());
        assert!(
            validate_tiers(&[tier(Some("10"), "1", "0")]).is_err(),
            "last must be unbounded"
        );
        assert!(validate_tiers(&[tier(None, "1", "0"), tier(None, "1", "0")]).is_err());
        assert!(validate_tiers(&[
            tier(Some("10"), "1", "0"),
            tier(Some("10"), "1", "0"),
            tier(None, "1", "0")
        ])
        .is_err());
        assert!(validate_tiers(&[tier(Some("10"), "-1", "0"), tier(None, "1", "0")]).is_err());
        assert!(validate_tiers(&[tier(Some("10"), "1", "0"), tier(None, "0.5", "2")]).is_ok());
    }

    /// Straightforward references: graduated unit by unit, volume by scanning tiers.
    fn reference(model: &ChargeModel, billable: u32) -> Decimal {
        match model {
            ChargeModel::Graduated { tiers } => {
                let mut total = Decimal::ZERO;
                let mut entered = vec![false; tiers.len()];
                for unit in 1..=billable {
                    let unit = Decimal::from(unit);
                    let index = tiers
                        .iter()
                        .position(|t| t.up_to.is_none_or(|b| unit <= b))
                        .unwrap();
                    total += tiers[index].unit_price;
                    if !entered[index] {
                        entered[index] = true;
                        total += tiers[index].flat_price;
                    }
                }
                total
            }
            ChargeModel::Volume { tiers } if billable > 0 => {
                let q = Decimal::from(billable);
                let t = tiers.iter().find(|t| t.up_to.is_none_or(|b| q <= b)).unwrap();
                q * t.unit_price + t.flat_price
            }
            _ => Decimal::ZERO,
        }
    }

    fn arb_tiers() -> impl Strategy<Value = Vec<Tier>> {
        proptest::collection::vec((1u32..300, 0u32..5000, 0u32..300), 1..5).prop_map(|raw| {
            let mut bound = 0u32;
            let count = raw.len();
            raw.into_iter()
                .enumerate()
                .map(|(i, (width, milli, flat_cents))| {
                    bound += width;
                    Tier {
                        up_to: (i + 1 < count).then(|| Decimal::from(bound)),
                        unit_price: Decimal::new(milli as i64, 3),
                        flat_price: Decimal::new(flat_cents as i64, 2),
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn tiered_prices_match_the_reference(tiers in arb_tiers(), billable in 0u32..1500, volume in any::<bool>()) {
            let model = if volume { ChargeModel::Volume { tiers } } else { ChargeModel::Graduated { tiers } };
            let expected = reference(&model, billable);
            let priced = charge(model).price(Decimal::from(billable)).unwrap();
            prop_assert_eq!(priced.exact, expected);
            let from_lines: Decimal = priced.tiers.iter().map(|l| l.amount).sum();
            prop_assert_eq!(from_lines, expected, "the tier breakdown adds up to the price");
        }

        /// However a period's usage is split into windows, and in whatever order the windows
        /// land, the increments sum to the rounded price of the total, to the minor unit.
        #[test]
        fn increments_sum_to_the_rounded_period_price(
            tiers in arb_tiers(),
            model_kind in 0u8..5,
            windows in proptest::collection::vec(0u32..400_000, 1..30),
            free in 0u32..500,
            discount in 0u32..50,
        ) {
            let model = match model_kind {
                0 => ChargeModel::Graduated { tiers },
                1 => ChargeModel::Volume { tiers },
                2 => ChargeModel::Package { size: Decimal::from(7), price: d("0.35") },
                3 => ChargeModel::Percentage { rate: d("2.9") },
                _ => ChargeModel::PerUnit { unit_price: d("0.00123") },
            };
            let charge = Charge {
                free_units: Decimal::from(free),
                discount_percent: Decimal::from(discount),
                ..charge(model)
            };
            let monotone = !matches!(charge.model, ChargeModel::Volume { .. });
            let mut total = None::<Decimal>;
            let mut emitted = Decimal::ZERO;
            for window in &windows {
                // Window quantities in thousandths: fractional usage too.
                let after = total.unwrap_or(Decimal::ZERO) + Decimal::new(*window as i64, 3);
                let increment = charge.increment(total, after).unwrap();
                // More usage never costs less, except under volume pricing, where crossing into a
                // cheaper tier reprices every unit (the increment is then a credit).
                prop_assert!(!monotone || increment >= Decimal::ZERO, "negative increment {}", increment);
                emitted += increment;
                total = Some(after);
            }
            let final_price = charge.price(total.unwrap()).unwrap().rounded;
            prop_assert_eq!(emitted, final_price);
            prop_assert_eq!(emitted.round_dp(2), emitted, "every increment is in whole minor units");
        }
    }
}
