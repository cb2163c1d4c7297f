//! Billing periods: calendar months (optionally anchored to a billing day) or days, in UTC.
//!
//! An anchor day past the end of a short month falls on that month's last day (a tenant billed
//! on the 31st is billed on 28/29 February and 30 April), as Lago and Stripe do.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

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

    /// The period `[start, end)` (unix seconds) containing `unix_secs`.
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

    proptest! {
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
