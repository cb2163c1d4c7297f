//! Limits, pure: what a plan's `[[plans.limits]]` (and a tenant's `[[tenants.limits]]`) say,
//! validated at the meter's scale; the quota state a `used` amount is in; and GCRA, the exact
//! rate limiter. No clock, no I/O: callers pass the time and keep the state
//! (`state::limits` is the gate every edge shares).
//!
//! Quantities are fixed-point integers at the meter's scale, like every quantity in tallyd
//! (COUNT meters count events: scale 0), so a limit of "0.5" GB on a scale-9 meter is
//! 500,000,000 units and no decision ever rounds.

pub mod gcra;

use serde::Deserialize;

use crate::aggregate::Aggregation;
use crate::model::{fixed_point_setting, format_decimal};

pub use gcra::{Gcra, RateDecision, RateSpec};

/// `[[plans.limits]]` / `[[tenants.limits]]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub meter: String,
    /// quota | rate
    pub kind: String,
    /// In the meter's units: a decimal string or an integer.
    pub limit: toml::Value,
    /// Quota only: hard (refuse what would go over) | soft (accept, signal, bill as overage).
    #[serde(default)]
    pub mode: Option<String>,
    /// Percent of the limit; each crossing is signalled once per period.
    #[serde(default)]
    pub thresholds: Option<Vec<u32>>,
    /// Rate only: second | minute | hour | day.
    #[serde(default)]
    pub per: Option<String>,
    /// Rate only: units allowed at once (default: `limit`).
    #[serde(default)]
    pub burst: Option<toml::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Quota,
    Rate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Quota => "quota",
            Kind::Rate => "rate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Refuse what would take `used` past the limit.
    Hard,
    /// Accept, signal, bill the overage.
    Soft,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hard => "hard",
            Mode::Soft => "soft",
        }
    }
}

/// One validated limit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub meter: String,
    pub kind: Kind,
    /// Rate limits are always hard (a request over one is refused and retried later).
    pub mode: Mode,
    /// Fixed point at `scale`.
    pub limit: i128,
    /// The meter's scale (0 for COUNT).
    pub scale: u32,
    /// Percent, ascending, without duplicates.
    pub thresholds: Vec<u32>,
    /// Rate limits: the rate and burst.
    pub rate: Option<RateSpec>,
}

impl Limit {
    /// An amount of this limit's meter as a decimal string.
    pub fn format(&self, units: i128) -> String {
        format_decimal(units, self.scale)
    }
}

/// The largest limit (and burst) accepted: 10^30 units at the meter's scale. Quotas compare
/// `used + units` with it in i128 (10^38) without overflow, and GCRA's scaled times stay
/// far below the i128 range.
const MAX_LIMIT: i128 = 1_000_000_000_000_000_000_000_000_000_000;

/// The scale a meter's quantities are counted in: COUNT meters count events.
pub fn unit_scale(aggregation: Aggregation, meter_scale: u32) -> u32 {
    match aggregation {
        Aggregation::Count => 0,
        _ => meter_scale,
    }
}

/// Whether a meter's period quantity only grows by each accepted event's own amount, so a
/// refusal decided per event is exact (SUM, COUNT). Other aggregations are limited by soft
/// quotas only (a hard quota on a UNIQUE_COUNT would need the period's member set per event).
pub fn is_additive(aggregation: Aggregation) -> bool {
    matches!(aggregation, Aggregation::Sum | Aggregation::Count)
}

fn amount(value: &toml::Value, scale: u32, at: &str, errors: &mut Vec<String>) -> Option<i128> {
    let units = fixed_point_setting(value, scale, at, errors)?;
    if units <= 0 {
        errors.push(format!("{at}: must be more than 0"));
        return None;
    }
    if units > MAX_LIMIT {
        errors.push(format!(
            "{at}: `{}` is larger than 10^30 units",
            format_decimal(units, scale)
        ));
        return None;
    }
    Some(units)
}

/// Validates one limit against its meter (`None`: no such meter); every problem is reported.
pub fn validate(
    raw: &RawLimit,
    at: &str,
    meter: Option<(Aggregation, u32)>,
    errors: &mut Vec<String>,
) -> Option<Limit> {
    let before = errors.len();
    let Some((aggregation, meter_scale)) = meter else {
        errors.push(format!("{at}.meter: no meter `{}`", raw.meter));
        return None;
    };
    let kind = match raw.kind.as_str() {
        "quota" => Kind::Quota,
        "rate" => Kind::Rate,
        other => {
            errors.push(format!("{at}.kind: `{other}` is not one of quota | rate"));
            return None;
        }
    };
    let scale = unit_scale(aggregation, meter_scale);
    let limit = amount(&raw.limit, scale, &format!("{at}.limit"), errors);
    let mode = match (kind, raw.mode.as_deref()) {
        (Kind::Quota, None | Some("hard")) => Mode::Hard,
        (Kind::Quota, Some("soft")) => Mode::Soft,
        (Kind::Quota, Some(other)) => {
            errors.push(format!("{at}.mode: `{other}` is not one of hard | soft"));
            Mode::Hard
        }
        (Kind::Rate, None) => Mode::Hard,
        (Kind::Rate, Some(_)) => {
            errors.push(format!(
                "{at}.mode: applies to quotas only (a rate limit always refuses)"
            ));
            Mode::Hard
        }
    };
    if (mode == Mode::Hard || kind == Kind::Rate) && !is_additive(aggregation) {
        errors.push(format!(
            "{at}: meter `{}` is {aggregation:?}; hard quotas and rate limits need a SUM or COUNT meter \
             (use mode = \"soft\" to signal on it)",
            raw.meter
        ));
    }
    let mut thresholds = raw.thresholds.clone().unwrap_or_else(|| vec![80, 100]);
    if let Some(bad) = thresholds.iter().find(|percent| !(1..=1000).contains(*percent)) {
        errors.push(format!(
            "{at}.thresholds: {bad} must be between 1 and 1000 (percent)"
        ));
    }
    thresholds.sort_unstable();
    thresholds.dedup();
    let rate = match kind {
        Kind::Quota => {
            for (key, set) in [("per", raw.per.is_some()), ("burst", raw.burst.is_some())] {
                if set {
                    errors.push(format!("{at}.{key}: applies to rate limits only"));
                }
            }
            None
        }
        Kind::Rate => {
            let per_secs: Option<i128> = match raw.per.as_deref() {
                Some("second") => Some(1),
                Some("minute") => Some(60),
                Some("hour") => Some(3600),
                Some("day") => Some(86_400),
                Some(other) => {
                    errors.push(format!(
                        "{at}.per: `{other}` is not one of second | minute | hour | day"
                    ));
                    None
                }
                None => {
                    errors.push(format!(
                        "{at}.per: a rate limit needs one of second | minute | hour | day"
                    ));
                    None
                }
            };
            let burst = match &raw.burst {
                Some(value) => amount(value, scale, &format!("{at}.burst"), errors),
                None => limit,
            };
            for (key, units) in [("limit", limit), ("burst", burst)] {
                if units.is_some_and(|units| units > gcra::MAX_RATE_UNITS) {
                    errors.push(format!("{at}.{key}: a rate limit takes at most 10^18 units"));
                }
            }
            match (limit, per_secs, burst) {
                (Some(limit), Some(per_secs), Some(burst)) => Some(RateSpec {
                    limit,
                    per_ns: per_secs * 1_000_000_000,
                    burst,
                }),
                _ => None,
            }
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(Limit {
        meter: raw.meter.clone(),
        kind,
        mode,
        limit: limit?,
        scale,
        thresholds,
        rate,
    })
}

/// A plan's limits with a tenant's overrides: a tenant limit replaces the plan's limit of the
/// same meter and kind.
pub fn merge(plan: &[Limit], tenant: &[Limit]) -> Vec<Limit> {
    let mut merged: Vec<Limit> = plan
        .iter()
        .filter(|limit| {
            !tenant
                .iter()
                .any(|own| own.meter == limit.meter && own.kind == limit.kind)
        })
        .cloned()
        .collect();
    merged.extend(tenant.iter().cloned());
    merged.sort_by(|a, b| (a.meter.as_str(), a.kind).cmp(&(b.meter.as_str(), b.kind)));
    merged
}

/// Where a quota stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    Ok,
    /// At or past a threshold below 100 %.
    Warning,
    /// Nothing more fits (hard) or the limit is passed (soft).
    Exceeded,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Warning => "warning",
            State::Exceeded => "exceeded",
        }
    }
}

/// The state of a quota at `used`: exceeded once `used` reaches the limit, warning from the
/// lowest threshold under 100 % on.
pub fn quota_state(used: i128, limit: &Limit) -> State {
    if used >= limit.limit {
        State::Exceeded
    } else if limit
        .thresholds
        .iter()
        .any(|&percent| percent < 100 && reached(used, limit.limit, percent))
    {
        State::Warning
    } else {
        State::Ok
    }
}

/// `used >= limit × percent / 100`, exactly (no division).
pub fn reached(used: i128, limit: i128, percent: u32) -> bool {
    used.saturating_mul(100) >= limit.saturating_mul(i128::from(percent))
}

/// The thresholds `before → after` crosses upwards (each signalled once per period).
pub fn crossed(before: i128, after: i128, limit: &Limit) -> Vec<u32> {
    limit
        .thresholds
        .iter()
        .copied()
        .filter(|&percent| !reached(before, limit.limit, percent) && reached(after, limit.limit, percent))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawLimit {
        toml::from_str(text).unwrap()
    }

    fn check(text: &str, meter: Option<(Aggregation, u32)>) -> Result<Limit, Vec<String>> {
        let mut errors = Vec::new();
        let limit = validate(&raw(text), "plans[0].limits[0]", meter, &mut errors);
        limit.ok_or(errors)
    }

    #[test]
    fn limits_are_fixed_point_at_the_meters_scale() {
        let quota = check(
            "meter = \"data_gb\"\nkind = \"quota\"\nlimit = \"0.5\"\nmode = \"soft\"",
            Some((Aggregation::Sum, 9)),
        )
        .unwrap();
        assert_eq!(
            (quota.limit, quota.mode, quota.thresholds.clone()),
            (500_000_000, Mode::Soft, vec![80, 100])
        );
        assert_eq!(quota.format(quota.limit), "0.5");
        let rate = check(
            "meter = \"api_calls\"\nkind = \"rate\"\nlimit = 20\nper = \"minute\"",
            Some((Aggregation::Count, 0)),
        )
        .unwrap();
        assert_eq!(
            rate.rate,
            Some(RateSpec {
                limit: 20,
                per_ns: 60_000_000_000,
                burst: 20
            })
        );
    }

    #[test]
    fn every_problem_is_named() {
        let errors = check(
            "meter = \"mau\"\nkind = \"quota\"\nlimit = 1.5\nper = \"second\"\nthresholds = [0]",
            Some((Aggregation::UniqueCount, 0)),
        )
        .unwrap_err();
        let text = errors.join("\n");
        for expected in [
            "limit: 1.5 is a TOML float",
            "hard quotas and rate limits need a SUM or COUNT meter",
            "thresholds: 0 must be between 1 and 1000",
            "per: applies to rate limits only",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        let errors = check("meter = \"x\"\nkind = \"quota\"\nlimit = 1", None).unwrap_err();
        assert_eq!(errors, vec!["plans[0].limits[0].meter: no meter `x`"]);
        let errors = check(
            "meter = \"tokens\"\nkind = \"rate\"\nlimit = \"0.001\"\nburst = -1",
            Some((Aggregation::Sum, 0)),
        )
        .unwrap_err();
        let text = errors.join("\n");
        assert!(
            text.contains("limit: `0.001` has more than 0 decimal places"),
            "{text}"
        );
        assert!(text.contains("burst: must be more than 0"), "{text}");
        assert!(text.contains("per: a rate limit needs one of"), "{text}");
    }

    #[test]
    fn a_tenants_limit_replaces_the_plans_of_the_same_meter_and_kind() {
        let limit = |meter: &str, kind: Kind, units: i128| Limit {
            meter: meter.into(),
            kind,
            mode: Mode::Hard,
            limit: units,
            scale: 0,
            thresholds: vec![100],
            rate: None,
        };
        let plan = [
            limit("a", Kind::Quota, 10),
            limit("a", Kind::Rate, 5),
            limit("b", Kind::Quota, 1),
        ];
        let merged = merge(&plan, &[limit("a", Kind::Quota, 99)]);
        let units: Vec<(String, Kind, i128)> = merged
            .iter()
            .map(|l| (l.meter.clone(), l.kind, l.limit))
            .collect();
        assert_eq!(
            units,
            vec![
                ("a".into(), Kind::Quota, 99),
                ("a".into(), Kind::Rate, 5),
                ("b".into(), Kind::Quota, 1)
            ]
        );
    }

    #[test]
    fn states_and_crossings_are_exact() {
        let quota = Limit {
            meter: "m".into(),
            kind: Kind::Quota,
            mode: Mode::Hard,
            limit: 10_000,
            scale: 0,
            thresholds: vec![80, 100],
            rate: None,
        };
        assert_eq!(quota_state(7_999, &quota), State::Ok);
        assert_eq!(quota_state(8_000, &quota), State::Warning);
        assert_eq!(quota_state(10_000, &quota), State::Exceeded);
        assert_eq!(crossed(7_999, 8_000, &quota), vec![80]);
        assert_eq!(crossed(0, 20_000, &quota), vec![80, 100]);
        assert!(crossed(8_000, 9_999, &quota).is_empty());
    }
}
