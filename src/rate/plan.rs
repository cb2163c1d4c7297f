//! Plans and tenants from config (`[[plans]]`, `[[tenants]]`, `[rating] default_plan`),
//! validated into the pure pricing types. Amounts are decimal strings (or integers) in config:
//! a TOML float would already have lost exactness, so it is refused with a hint.

use std::collections::HashMap;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Deserialize;

use super::period::BillingPeriod;
use super::{minor_unit_exponent, validate_tiers, Charge, ChargeModel, Tier};
use crate::aggregate::Aggregation;
use crate::limit::{Limit, RawLimit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub id: String,
    #[serde(default = "one")]
    pub version: u32,
    pub currency: String,
    #[serde(default = "month")]
    pub billing_period: String,
    #[serde(default)]
    pub anchor_day: Option<u32>,
    /// Owed per period at least: usage below it is trued up to it.
    #[serde(default)]
    pub minimum_spend: Option<toml::Value>,
    /// Prepaid per period: usage draws it down before overage is billed.
    #[serde(default)]
    pub prepaid_commitment: Option<toml::Value>,
    #[serde(default)]
    pub charges: Vec<RawCharge>,
    /// Rate limits and period quotas (`crate::limit`).
    #[serde(default)]
    pub limits: Vec<RawLimit>,
}

fn one() -> u32 {
    1
}

fn month() -> String {
    "MONTH".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCharge {
    pub meter: String,
    pub model: String,
    #[serde(default)]
    pub free_units: Option<toml::Value>,
    /// `flat`: the fee per period.
    #[serde(default)]
    pub amount: Option<toml::Value>,
    #[serde(default)]
    pub unit_price: Option<toml::Value>,
    #[serde(default)]
    pub package_size: Option<toml::Value>,
    #[serde(default)]
    pub package_price: Option<toml::Value>,
    #[serde(default)]
    pub tiers: Vec<RawTier>,
    /// `percentage`: the percent of the (monetary) quantity, e.g. "2.9".
    #[serde(default)]
    pub rate: Option<toml::Value>,
    /// `percentage`: refused with the reason (the aggregates keep no individual events).
    #[serde(default)]
    pub per_event_min: Option<toml::Value>,
    #[serde(default)]
    pub per_event_max: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    #[serde(default)]
    pub up_to: Option<toml::Value>,
    pub unit_price: Option<toml::Value>,
    #[serde(default)]
    pub flat_price: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    pub plan: String,
    #[serde(default)]
    pub discount_percent: Option<toml::Value>,
    /// IANA time zone of the tenant's billing periods (default UTC), e.g. "Europe/Berlin".
    #[serde(default)]
    pub timezone: Option<String>,
    /// The tenant's billing day (1-31) for MONTH plans, overriding the plan's `anchor_day`.
    #[serde(default)]
    pub anchor_day: Option<u32>,
    /// Overrides the plan's limit of the same meter and kind.
    #[serde(default)]
    pub limits: Vec<RawLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRating {
    /// The plan of tenants not listed in `[[tenants]]` (none: they are not priced).
    #[serde(default)]
    pub default_plan: Option<String>,
}

/// One version of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub id: String,
    pub version: u32,
    pub currency: String,
    pub period: BillingPeriod,
    /// With `discount_percent` 0: a tenant's discount is applied by `Plans::charges_for`.
    pub charges: Vec<Charge>,
    pub minimum_spend: Decimal,
    pub prepaid_commitment: Decimal,
    /// Its rate limits and quotas.
    pub limits: Vec<Limit>,
}

/// A period's usage price settled against the plan's minimum and prepaid commitment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// Sum of the charges' rounded amounts.
    pub subtotal: Decimal,
    /// What the minimum adds when usage is below it.
    pub minimum_true_up: Decimal,
    /// `subtotal + minimum_true_up`: the period's price.
    pub total: Decimal,
    /// The part of `total` the prepaid commitment covers.
    pub prepaid_used: Decimal,
    /// Billed beyond the commitment.
    pub overage: Decimal,
}

impl Plan {
    /// Minimum first (it is part of the price), then the prepaid commitment draws the price down.
    pub fn settle(&self, subtotal: Decimal) -> Result<Settlement, super::RateError> {
        let minimum_true_up = super::sub(self.minimum_spend, subtotal)?.max(Decimal::ZERO);
        let total = super::add(subtotal, minimum_true_up)?;
        let prepaid_used = total.min(self.prepaid_commitment);
        Ok(Settlement {
            subtotal,
            minimum_true_up,
            total,
            prepaid_used,
            overage: super::sub(total, prepaid_used)?,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TenantPlan {
    pub plan: String,
    pub discount_percent: Decimal,
    pub timezone: Option<chrono_tz::Tz>,
    pub anchor_day: Option<u32>,
    /// Overrides of the plan's limits.
    pub limits: Vec<Limit>,
}

/// Every plan version, the tenants' assignments and the default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plans {
    /// Sorted by (id, version).
    pub plans: Vec<Plan>,
    pub tenants: HashMap<String, TenantPlan>,
    pub default_plan: Option<String>,
}

impl Plans {
    /// The newest version of `id` (older versions stay for periods already rated with them).
    pub fn current(&self, id: &str) -> Option<&Plan> {
        self.plans
            .iter()
            .filter(|plan| plan.id == id)
            .max_by_key(|plan| plan.version)
    }

    /// A tenant's plan (its own, else the default) and discount.
    pub fn for_tenant(&self, tenant: &str) -> Option<(&Plan, Decimal)> {
        match self.tenants.get(tenant) {
            Some(assigned) => self
                .current(&assigned.plan)
                .map(|plan| (plan, assigned.discount_percent)),
            None => self
                .default_plan
                .as_deref()
                .and_then(|id| self.current(id))
                .map(|plan| (plan, Decimal::ZERO)),
        }
    }

    /// A specific version (kept after a reload for periods already rated with it).
    pub fn version(&self, id: &str, version: u32) -> Option<&Plan> {
        self.plans
            .iter()
            .find(|plan| plan.id == id && plan.version == version)
    }

    /// The time zone of a tenant's billing periods (`None`: UTC).
    pub fn timezone(&self, tenant: &str) -> Option<chrono_tz::Tz> {
        self.tenants.get(tenant).and_then(|assigned| assigned.timezone)
    }

    /// A tenant's billing period under `plan`: the plan's, with the tenant's billing day when it
    /// has one and the plan bills monthly.
    pub fn period_of(&self, tenant: &str, plan: &Plan) -> BillingPeriod {
        match (
            plan.period,
            self.tenants.get(tenant).and_then(|assigned| assigned.anchor_day),
        ) {
            (BillingPeriod::Month { .. }, Some(anchor_day)) => BillingPeriod::Month { anchor_day },
            (period, _) => period,
        }
    }

    /// After a reload: plan versions the new config no longer lists are kept, so periods
    /// already rated with them are finished with them.
    pub fn keep_versions_of(&mut self, previous: &Plans) {
        for plan in &previous.plans {
            if self.version(&plan.id, plan.version).is_none() {
                self.plans.push(plan.clone());
            }
        }
        self.plans
            .sort_by(|a, b| (a.id.as_str(), a.version).cmp(&(b.id.as_str(), b.version)));
    }

    /// A tenant's limits: its plan's, with its own overrides (none without a plan).
    pub fn limits_for(&self, tenant: &str) -> Vec<Limit> {
        let Some((plan, _)) = self.for_tenant(tenant) else {
            return Vec::new();
        };
        let own = self
            .tenants
            .get(tenant)
            .map_or(&[][..], |assigned| &assigned.limits);
        crate::limit::merge(&plan.limits, own)
    }

    /// Whether any plan or tenant has a limit (when none does, admission skips limits).
    pub fn any_limits(&self) -> bool {
        self.plans.iter().any(|plan| !plan.limits.is_empty())
            || self.tenants.values().any(|tenant| !tenant.limits.is_empty())
    }

    /// The plan's charges with the tenant's discount applied.
    pub fn charges_for(plan: &Plan, discount_percent: Decimal) -> Vec<Charge> {
        plan.charges
            .iter()
            .cloned()
            .map(|mut charge| {
                charge.discount_percent = discount_percent;
                charge
            })
            .collect()
    }
}

/// A decimal from config: a string or an integer, never a float.
fn decimal(value: &toml::Value, at: &str, errors: &mut Vec<String>) -> Option<Decimal> {
    let parsed = match value {
        toml::Value::String(text) => {
            Decimal::from_str(text.trim()).map_err(|_| format!("`{text}` is not a decimal"))
        }
        toml::Value::Integer(n) => Ok(Decimal::from(*n)),
        toml::Value::Float(f) => Err(format!(
            "{f} is a TOML float (binary, inexact); write it as a string, e.g. \"{f}\""
        )),
        other => Err(format!("must be a decimal string, got {}", other.type_str())),
    };
    match parsed {
        Ok(value) if value.is_sign_negative() && !value.is_zero() => {
            errors.push(format!("{at}: must not be negative"));
            None
        }
        Ok(value) => Some(value),
        Err(reason) => {
            errors.push(format!("{at}: {reason}"));
            None
        }
    }
}

fn required(value: &Option<toml::Value>, at: &str, model: &str, errors: &mut Vec<String>) -> Option<Decimal> {
    match value {
        Some(value) => decimal(value, at, errors),
        None => {
            errors.push(format!("{at}: required by model `{model}`"));
            None
        }
    }
}

fn charge(
    raw: &RawCharge,
    at: &str,
    minor_units: u32,
    meters: &[&str],
    errors: &mut Vec<String>,
) -> Option<Charge> {
    if !meters.contains(&raw.meter.as_str()) {
        errors.push(format!("{at}.meter: no meter `{}`", raw.meter));
    }
    let free_units = match &raw.free_units {
        Some(value) => decimal(value, &format!("{at}.free_units"), errors)?,
        None => Decimal::ZERO,
    };
    let model_name = raw.model.as_str();
    let tiers = |errors: &mut Vec<String>| -> Option<Vec<Tier>> {
        let mut tiers = Vec::new();
        for (index, tier) in raw.tiers.iter().enumerate() {
            let tier_at = format!("{at}.tiers[{index}]");
            let up_to = match &tier.up_to {
                Some(value) => Some(decimal(value, &format!("{tier_at}.up_to"), errors)?),
                None => None,
            };
            let unit_price = match &tier.unit_price {
                Some(value) => decimal(value, &format!("{tier_at}.unit_price"), errors)?,
                None => Decimal::ZERO,
            };
            let flat_price = match &tier.flat_price {
                Some(value) => decimal(value, &format!("{tier_at}.flat_price"), errors)?,
                None => Decimal::ZERO,
            };
            tiers.push(Tier {
                up_to,
                unit_price,
                flat_price,
            });
        }
        if let Err(reason) = validate_tiers(&tiers) {
            errors.push(format!("{at}.tiers: {reason}"));
            return None;
        }
        Some(tiers)
    };
    let model = match model_name {
        "flat" => ChargeModel::Flat {
            amount: required(&raw.amount, &format!("{at}.amount"), model_name, errors)?,
        },
        "per_unit" => ChargeModel::PerUnit {
            unit_price: required(&raw.unit_price, &format!("{at}.unit_price"), model_name, errors)?,
        },
        "package" => {
            let size = required(
                &raw.package_size,
                &format!("{at}.package_size"),
                model_name,
                errors,
            )?;
            let price = required(
                &raw.package_price,
                &format!("{at}.package_price"),
                model_name,
                errors,
            )?;
            if size.is_zero() {
                errors.push(format!("{at}.package_size: must be positive"));
                return None;
            }
            ChargeModel::Package { size, price }
        }
        "graduated" => ChargeModel::Graduated {
            tiers: tiers(errors)?,
        },
        "volume" => ChargeModel::Volume {
            tiers: tiers(errors)?,
        },
        "percentage" => {
            if raw.per_event_min.is_some() || raw.per_event_max.is_some() {
                errors.push(format!(
                    "{at}: per_event_min/per_event_max are not supported on a charge: it prices aggregated \
                     usage, which keeps no individual events; give the meter \
                     `per_event_fee = {{ percent, min, max }}` and charge it per_unit at 1"
                ));
            }
            let rate = required(&raw.rate, &format!("{at}.rate"), model_name, errors)?;
            if rate > Decimal::ONE_HUNDRED {
                errors.push(format!("{at}.rate: {rate} is a percent and must be at most 100"));
            }
            ChargeModel::Percentage { rate }
        }
        other => {
            errors.push(format!(
                "{at}.model: `{other}` is not one of flat | per_unit | package | graduated | volume | percentage"
            ));
            return None;
        }
    };
    Some(Charge {
        meter: raw.meter.clone(),
        model,
        free_units,
        discount_percent: Decimal::ZERO,
        minor_units,
    })
}

/// Validates plans and tenants against the configured meter slugs; every problem is reported.
pub fn validate(
    raw_plans: Vec<RawPlan>,
    raw_tenants: Vec<RawTenant>,
    rating: RawRating,
    meters: &[(&str, Aggregation, u32)],
    errors: &mut Vec<String>,
) -> Plans {
    let slugs: Vec<&str> = meters.iter().map(|(slug, _, _)| *slug).collect();
    let shape = |slug: &str| {
        meters
            .iter()
            .find(|(known, _, _)| *known == slug)
            .map(|(_, aggregation, scale)| (*aggregation, *scale))
    };
    let limits = |raw: &[RawLimit], at: &str, errors: &mut Vec<String>| {
        let mut limits: Vec<Limit> = Vec::new();
        for (l, one) in raw.iter().enumerate() {
            let limit_at = format!("{at}.limits[{l}]");
            if raw[..l]
                .iter()
                .any(|earlier| earlier.meter == one.meter && earlier.kind == one.kind)
            {
                errors.push(format!(
                    "{limit_at}: meter `{}` already has a {} limit here",
                    one.meter, one.kind
                ));
            }
            limits.extend(crate::limit::validate(one, &limit_at, shape(&one.meter), errors));
        }
        limits
    };
    let mut plans: Vec<Plan> = Vec::new();
    for (index, raw) in raw_plans.iter().enumerate() {
        let at = format!("plans[{index}]");
        if raw.id.is_empty() {
            errors.push(format!("{at}.id: must not be empty"));
        }
        if plans.iter().any(|p| p.id == raw.id && p.version == raw.version) {
            errors.push(format!(
                "{at}: plan `{}` version {} is defined twice",
                raw.id, raw.version
            ));
        }
        let Some(minor_units) = minor_unit_exponent(&raw.currency) else {
            errors.push(format!(
                "{at}.currency: `{}` is not an ISO 4217 code tallyd knows",
                raw.currency
            ));
            continue;
        };
        let period = match BillingPeriod::parse(&raw.billing_period, raw.anchor_day) {
            Ok(period) => period,
            Err(reason) => {
                errors.push(format!("{at}.billing_period: {reason}"));
                continue;
            }
        };
        let mut charges = Vec::new();
        for (c, raw_charge) in raw.charges.iter().enumerate() {
            let charge_at = format!("{at}.charges[{c}]");
            if charges
                .iter()
                .any(|existing: &Charge| existing.meter == raw_charge.meter)
            {
                errors.push(format!(
                    "{charge_at}.meter: `{}` already has a charge in this plan",
                    raw_charge.meter
                ));
            }
            if let Some(charge) = charge(raw_charge, &charge_at, minor_units, &slugs, errors) {
                charges.push(charge);
            }
        }
        let mut money = |value: &Option<toml::Value>, key: &str| match value {
            Some(value) => decimal(value, &format!("{at}.{key}"), errors).unwrap_or_default(),
            None => Decimal::ZERO,
        };
        let minimum_spend = money(&raw.minimum_spend, "minimum_spend");
        let prepaid_commitment = money(&raw.prepaid_commitment, "prepaid_commitment");
        let limits = limits(&raw.limits, &at, errors);
        plans.push(Plan {
            id: raw.id.clone(),
            version: raw.version,
            currency: raw.currency.clone(),
            period,
            charges,
            minimum_spend,
            prepaid_commitment,
            limits,
        });
    }
    plans.sort_by(|a, b| (a.id.as_str(), a.version).cmp(&(b.id.as_str(), b.version)));
    let mut tenants = HashMap::new();
    for (index, raw) in raw_tenants.into_iter().enumerate() {
        let at = format!("tenants[{index}]");
        if !plans.iter().any(|plan| plan.id == raw.plan) {
            errors.push(format!("{at}.plan: no plan `{}`", raw.plan));
        }
        let discount_percent = match &raw.discount_percent {
            Some(value) => decimal(value, &format!("{at}.discount_percent"), errors).unwrap_or_default(),
            None => Decimal::ZERO,
        };
        if discount_percent > Decimal::ONE_HUNDRED {
            errors.push(format!("{at}.discount_percent: must be at most 100"));
        }
        let timezone = match &raw.timezone {
            Some(name) => match name.parse::<chrono_tz::Tz>() {
                Ok(zone) => Some(zone),
                Err(_) => {
                    errors.push(format!(
                        "{at}.timezone: `{name}` is not an IANA time zone (e.g. \"Europe/Berlin\")"
                    ));
                    None
                }
            },
            None => None,
        };
        if let Some(day) = raw.anchor_day {
            if !(1..=31).contains(&day) {
                errors.push(format!("{at}.anchor_day: {day} must be between 1 and 31"));
            }
            let monthly = plans
                .iter()
                .filter(|plan| plan.id == raw.plan)
                .all(|plan| matches!(plan.period, BillingPeriod::Month { .. }));
            if !monthly {
                errors.push(format!(
                    "{at}.anchor_day: plan `{}` does not bill monthly",
                    raw.plan
                ));
            }
        }
        let limits = limits(&raw.limits, &at, errors);
        let assigned = TenantPlan {
            plan: raw.plan,
            discount_percent,
            timezone,
            anchor_day: raw.anchor_day,
            limits,
        };
        if tenants.insert(raw.id.clone(), assigned).is_some() {
            errors.push(format!("{at}.id: tenant `{}` is listed twice", raw.id));
        }
    }
    if let Some(default) = &rating.default_plan {
        if !plans.iter().any(|plan| &plan.id == default) {
            errors.push(format!("rating.default_plan: no plan `{default}`"));
        }
    }
    Plans {
        plans,
        tenants,
        default_plan: rating.default_plan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METERS: [&str; 5] = ["tokens", "api_calls", "mau", "data_gb", "nodes"];

    fn load(text: &str) -> Result<Plans, Vec<String>> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            plans: Vec<RawPlan>,
            #[serde(default)]
            tenants: Vec<RawTenant>,
            #[serde(default)]
            rating: RawRating,
        }
        let doc: Doc = toml::from_str(text).map_err(|error| vec![error.to_string()])?;
        let mut errors = Vec::new();
        let meters: Vec<(&str, Aggregation, u32)> =
            METERS.iter().map(|slug| (*slug, Aggregation::Sum, 0)).collect();
        let plans = validate(doc.plans, doc.tenants, doc.rating, &meters, &mut errors);
        if errors.is_empty() {
            Ok(plans)
        } else {
            Err(errors)
        }
    }

    fn d(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    /// The issue's example plan, verbatim, plus the seed pricing's per-unit charges (shared
    /// with the end-to-end test and the docs).
    const PRO: &str = include_str!("../../config/plans.example.toml");

    fn price(plans: &Plans, tenant: &str, meter: &str, quantity: &str) -> Decimal {
        let (plan, discount) = plans.for_tenant(tenant).unwrap();
        let charge = Plans::charges_for(plan, discount)
            .into_iter()
            .find(|charge| charge.meter == meter)
            .unwrap();
        charge.price(d(quantity)).unwrap().rounded
    }

    #[test]
    fn the_issue_example_prices_the_seed_usage() {
        let mut text = PRO.to_string();
        text.push_str("[rating]\ndefault_plan = \"pro\"\n");
        let plans = load(&text).unwrap();
        // 12 100 tokens, 100 free: 1000 x 0.002 + (9000 x 0.0015 + 1) + 2000 x 0.001 = 18.50.
        assert_eq!(price(&plans, "globex", "tokens", "12100"), d("18.50"));
        // acme has 10 % off (a non-production environment): 16.65.
        assert_eq!(price(&plans, "acme", "tokens", "12100"), d("16.65"));
        // 2 500 calls in packages of 1 000: three packages.
        assert_eq!(price(&plans, "globex", "api_calls", "2500"), d("1.50"));
        // $5 per monthly active user.
        assert_eq!(price(&plans, "globex", "mau", "3"), d("15"));
        // $0.10/GB after a free GB: 3.5 GB → 0.25; with 10 % off 0.225 rounds half away → 0.23.
        assert_eq!(price(&plans, "globex", "data_gb", "3.5"), d("0.25"));
        assert_eq!(price(&plans, "acme", "data_gb", "3.5"), d("0.23"));
        // $20 per node.
        assert_eq!(price(&plans, "globex", "nodes", "4"), d("80"));
    }

    #[test]
    fn tenants_without_a_plan_are_not_priced_unless_there_is_a_default() {
        let plans = load(PRO).unwrap();
        assert!(plans.for_tenant("acme").is_some());
        assert!(plans.for_tenant("globex").is_none());
    }

    #[test]
    fn a_tenants_billing_day_overrides_the_plans() {
        let text = format!("{PRO}\n[[tenants]]\nid = \"globex\"\nplan = \"pro\"\nanchor_day = 15\n");
        let plans = load(&text).unwrap();
        let plan = plans.current("pro").unwrap();
        assert_eq!(
            plans.period_of("globex", plan),
            BillingPeriod::Month { anchor_day: 15 }
        );
        assert_eq!(plans.period_of("acme", plan), plan.period);
        let errors = load(&format!(
            "{PRO}\n[[tenants]]\nid = \"x\"\nplan = \"pro\"\nanchor_day = 32\n"
        ))
        .unwrap_err()
        .join("\n");
        assert!(
            errors.contains("tenants[1].anchor_day: 32 must be between 1 and 31"),
            "{errors}"
        );
    }

    #[test]
    fn the_newest_version_applies_and_older_ones_are_kept() {
        let text = format!(
            "{PRO}\n[[plans]]\nid = \"pro\"\nversion = 2\ncurrency = \"USD\"\n[[plans.charges]]\nmeter = \"mau\"\nmodel = \"per_unit\"\nunit_price = \"4\"\n"
        );
        let plans = load(&text).unwrap();
        assert_eq!(plans.plans.len(), 2);
        assert_eq!(plans.for_tenant("acme").unwrap().0.version, 2);
        assert_eq!(price(&plans, "acme", "mau", "10"), d("36"));
    }

    #[test]
    fn minimum_spend_trues_up_and_prepaid_commitment_draws_down() {
        let text = format!(
            "{PRO}\n[[plans]]\nid = \"pro\"\nversion = 2\ncurrency = \"USD\"\nminimum_spend = \"50\"\nprepaid_commitment = \"100\"\n"
        );
        let plans = load(&text).unwrap();
        let plan = plans.current("pro").unwrap();
        let settle = |subtotal: &str| plan.settle(d(subtotal)).unwrap();
        // Below the minimum: trued up to 50, all of it prepaid.
        let low = settle("31.73");
        assert_eq!(
            (low.minimum_true_up, low.total, low.prepaid_used, low.overage),
            (d("18.27"), d("50"), d("50"), d("0"))
        );
        // Between: no true-up, all prepaid.
        assert_eq!(settle("80").overage, d("0"));
        // Beyond the commitment: the rest is overage.
        let high = settle("130.50");
        assert_eq!(
            (high.minimum_true_up, high.prepaid_used, high.overage),
            (d("0"), d("100"), d("30.50"))
        );
        // Plans without either: the subtotal is the total and all of it is billed.
        let plain = plans
            .plans
            .iter()
            .find(|p| p.version == 1)
            .unwrap()
            .settle(d("12.34"))
            .unwrap();
        assert_eq!(
            (plain.total, plain.prepaid_used, plain.overage),
            (d("12.34"), d("0"), d("12.34"))
        );
    }

    #[test]
    fn every_problem_is_named() {
        let text = r#"
[[plans]]
id = "bad"
currency = "USX"
[[plans]]
id = "worse"
currency = "EUR"
billing_period = "WEEK"
[[plans]]
id = "pro"
currency = "USD"
[[plans.charges]]
meter = "tokenz"
model = "per_unit"
unit_price = 0.002
[[plans.charges]]
meter = "api_calls"
model = "package"
package_size = "1000"
[[plans.charges]]
meter = "mau"
model = "graduated"
tiers = [ { unit_price = "1" }, { up_to = "10", unit_price = "2" } ]
[[plans.charges]]
meter = "nodes"
model = "percentage"
per_event_max = "5"
[[tenants]]
id = "acme"
plan = "gold"
discount_percent = "150"
timezone = "Mars/Olympus"
[rating]
default_plan = "silver"
"#;
        let errors = load(text).unwrap_err().join("\n");
        for expected in [
            "plans[0].currency: `USX`",
            "plans[1].billing_period: `WEEK`",
            "plans[2].charges[0].meter: no meter `tokenz`",
            "plans[2].charges[0].unit_price: 0.002 is a TOML float",
            "plans[2].charges[1].package_price: required by model `package`",
            "plans[2].charges[2].tiers: tier 0: only the last tier may omit up_to",
            "plans[2].charges[3]: per_event_min/per_event_max are not supported",
            "plans[2].charges[3].rate: required by model `percentage`",
            "tenants[0].plan: no plan `gold`",
            "tenants[0].discount_percent: must be at most 100",
            "tenants[0].timezone: `Mars/Olympus` is not an IANA time zone",
            "rating.default_plan: no plan `silver`",
        ] {
            assert!(errors.contains(expected), "missing `{expected}` in:\n{errors}");
        }
    }
}
