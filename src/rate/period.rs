//! Billing periods: calendar months (optionally anchored to a billing day) or days, in UTC or
//! in a tenant's IANA time zone.
//!
//! An anchor day past the end of a short month falls on that month's last day (a tenant billed
//! on the 31st is billed on 28/29 February and 30 April), as Lago and Stripe do.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingPeriod {
    /// Months starting on `anchor_day` (1 = calendar months).
    Month {
        anchor_day: u32,
    },
    Day,
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let first_next = NaiveDate::from_ymd_opt(next_year, next_month, 1).expect("invariant: valid month");
    first_next
        .pred_opt()
        .expect("invariant: a day precedes the 1st")
        .day()
}

fn anchor_in(year: i32, month: u32, anchor_day: u32) -> i64 {
    let day = anchor_day.min(days_in_month(year, month));
    let date = NaiveDate::from_ymd_opt(year, month, day).expect("invariant: clamped day");
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
        .timestamp()
}

fn shift_month(year: i32, month: u32, by: i32) -> (i32, u32) {
    let index = year * 12 + month as i32 - 1 + by;
    (index.div_euclid(12), (index.rem_euclid(12) + 1) as u32)
}

impl BillingPeriod {
    pub fn parse(kind: &str, anchor_day: Option<u32>) -> Result<BillingPeriod, String> {
        match (kind, anchor_day) {
            ("MONTH", None) => Ok(BillingPeriod::Month { anchor_day: 1 }),
            ("MONTH", Some(day)) if (1..=31).contains(&day) => Ok(BillingPeriod::Month { anchor_day: day }),
            ("MONTH", Some(day)) => Err(format!("anchor_day {day} must be between 1 and 31")),
            ("DAY", None) => Ok(BillingPeriod::Day),
            ("DAY", Some(_)) => Err("anchor_day only applies to MONTH periods".into()),
            (other, _) => Err(format!("`{other}` is not one of MONTH | DAY")),
        }
    }

    /// The period `[start, end)` (unix seconds) containing `unix_secs`, with period boundaries
    /// at local midnight in `zone` (UTC when `None`). A boundary that falls in a DST gap moves
    /// to the first local instant after it.
    pub fn containing_in(&self, unix_secs: i64, zone: Option<Tz>) -> (i64, i64) {
        let Some(zone) = zone else {
            return self.containing(unix_secs);
        };
        let Some(utc) = DateTime::from_timestamp(unix_secs, 0) else {
            return self.containing(unix_secs);
        };
        // Run the UTC arithmetic on local wall-clock time, then map the bounds back.
        let local = utc.with_timezone(&zone).naive_local();
        let (start, end) = self.containing(local.and_utc().timestamp());
        let to_utc = |naive_secs: i64| -> i64 {
            let naive = DateTime::from_timestamp(naive_secs, 0)
                .unwrap_or_default()
                .naive_utc();
            // Gaps last at most a few hours; step forward to the first existing local time.
            for minutes in 0..=24 * 60 {
                let candidate = naive + chrono::Duration::minutes(minutes);
                if let Some(time) = zone.from_local_datetime(&candidate).earliest() {
                    return time.timestamp();
                }
            }
            naive_secs
        };
        (to_utc(start), to_utc(end))
    }

    /// The period `[start, end)` (unix seconds, UTC boundaries) containing `unix_secs`.
    pub fn containing(&self, unix_secs: i64) -> (i64, i64) {
        match *self {
            BillingPeriod::Day => {
                let start = unix_secs.div_euclid(86_400) * 86_400;
                (start, start + 86_400)
            }
            BillingPeriod::Month { anchor_day } => {
                let time: DateTime<Utc> = DateTime::from_timestamp(unix_secs, 0).unwrap_or_default();
                let (year, month) = (time.year(), time.month());
                let this = anchor_in(year, month, anchor_day);
                let (start_year, start_month) = if this <= unix_secs {
                    (year, month)
                } else {
                    shift_month(year, month, -1)
                };
                let (end_year, end_month) = shift_month(start_year, start_month, 1);
                (
                    anchor_in(start_year, start_month, anchor_day),
                    anchor_in(end_year, end_month, anchor_day),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text).unwrap().timestamp()
    }

    #[test]
    fn calendar_months_and_days() {
        let month = BillingPeriod::parse("MONTH", None).unwrap();
        assert_eq!(
            month.containing(at("2026-11-22T04:21:15Z")),
            (at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            month.containing(at("2026-12-31T23:59:59Z")),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        let day = BillingPeriod::parse("DAY", None).unwrap();
        assert_eq!(
            day.containing(at("2026-11-22T04:21:15Z")),
            (at("2026-11-22T00:00:00Z"), at("2026-11-23T00:00:00Z"))
        );
    }

    #[test]
    fn anchor_days_clamp_to_short_months() {
        let on_31st = BillingPeriod::parse("MONTH", Some(31)).unwrap();
        assert_eq!(
            on_31st.containing(at("2027-02-15T00:00:00Z")),
            (at("2027-01-31T00:00:00Z"), at("2027-02-28T00:00:00Z"))
        );
        assert_eq!(
            on_31st.containing(at("2028-03-01T00:00:00Z")),
            (at("2028-02-29T00:00:00Z"), at("2028-03-31T00:00:00Z"))
        );
        let on_15th = BillingPeriod::parse("MONTH", Some(15)).unwrap();
        assert_eq!(
            on_15th.containing(at("2026-11-14T23:59:59Z")),
            (at("2026-10-15T00:00:00Z"), at("2026-11-15T00:00:00Z"))
        );
        assert!(BillingPeriod::parse("MONTH", Some(0)).is_err());
        assert!(BillingPeriod::parse("WEEK", None).is_err());
        assert!(BillingPeriod::parse("DAY", Some(3)).is_err());
    }

    #[test]
    fn periods_follow_the_tenants_time_zone_across_dst() {
        let month = BillingPeriod::parse("MONTH", None).unwrap();
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // November in Berlin (UTC+1) starts at 23:00 UTC on 31 October; the period before
        // spans the end of summer time (UTC+2 → UTC+1).
        assert_eq!(
            month.containing_in(at("2026-11-22T04:21:15Z"), Some(berlin)),
            (at("2026-10-31T23:00:00Z"), at("2026-11-30T23:00:00Z"))
        );
        assert_eq!(
            month.containing_in(at("2026-10-31T22:30:00Z"), Some(berlin)),
            (at("2026-09-30T22:00:00Z"), at("2026-10-31T23:00:00Z"))
        );
        let day = BillingPeriod::parse("DAY", None).unwrap();
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        assert_eq!(
            day.containing_in(at("2026-11-22T16:00:00Z"), Some(tokyo)),
            (at("2026-11-22T15:00:00Z"), at("2026-11-23T15:00:00Z"))
        );
        assert_eq!(day.containing_in(12345, None), day.containing(12345));
    }

    proptest! {
        /// Local periods tile time too, DST transitions included.
        #[test]
        fn local_periods_tile_time(ts in 0i64..4_000_000_000, zone in 0usize..4, monthly in any::<bool>()) {
            let zones = ["Europe/Berlin", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"];
            let zone: Tz = zones[zone].parse().unwrap();
            let period = if monthly { BillingPeriod::Month { anchor_day: 1 } } else { BillingPeriod::Day };
            let (start, end) = period.containing_in(ts, Some(zone));
            prop_assert!(start <= ts && ts < end, "{} not in [{}, {})", ts, start, end);
            prop_assert_eq!(period.containing_in(end, Some(zone)).0, end);
            prop_assert_eq!(period.containing_in(start, Some(zone)), (start, end));
        }

        /// Periods tile time: each instant is in exactly one, and the next period starts where
        /// this one ends.
        #[test]
        fn periods_tile_time(ts in 0i64..4_000_000_000, anchor in 1u32..=31, monthly in any::<bool>()) {
            let period = if monthly { BillingPeriod::Month { anchor_day: anchor } } else { BillingPeriod::Day };
            let (start, end) = period.containing(ts);
            prop_assert!(start <= ts && ts < end);
            prop_assert_eq!(period.containing(end).0, end);
            prop_assert_eq!(period.containing(start), (start, end));
            prop_assert!(end - start >= 86_400 && end - start <= 31 * 86_400);
        }
    }
}
