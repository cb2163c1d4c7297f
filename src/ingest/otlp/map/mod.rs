//! OTLP requests → meter updates. Pure: no shared state but the name tables, no I/O, no clock
//! (the caller passes `now`), so it can be property-tested like the CloudEvents decoder.
//!
//! A data point (or log record) is the unit of acceptance: it is either mapped (every meter it
//! feeds gets its update) or refused with a reason, never half-counted. Refused points are
//! reported in the OTLP partial success and dead-lettered by the edge.
//!
//! How points become usage (see the README's OTLP section for the operator's view):
//! - tenant: the resource attribute `tenant_attribute`, or the API key's tenant;
//! - meters match by metric name (`otlp_metric`) or by the record's event name (`otlp_log`);
//! - group-by dimensions come from point/record attributes, then resource attributes;
//! - DELTA sums and histogram counts/sums add, deduplicated per point by (stream, start, time)
//!   so a collector's retry never counts twice; CUMULATIVE ones become `CumulativePoint`s that
//!   the commit stage turns into deltas per stream (`aggregate::streams`);
//! - gauges (and sums' current values) feed MAX / MIN / LATEST, which are idempotent;
//! - log records count 1 (or `value_attribute`) and dedup by `id_attribute` like CloudEvents ids.

mod attributes;
mod histograms;
mod logs;
mod metrics;
#[cfg(test)]
mod tests;

use crate::aggregate::streams::CumulativePoint;
use crate::aggregate::AggState;
pub use crate::ingest::error::RefusalReason;
use crate::meter::Meters;
use crate::model::{Acceptance, Names, SeriesKey};

use attributes::*;
pub use histograms::CANONICAL_SCALE;
pub use logs::map_logs;
pub use metrics::map_metrics;

/// What the mapping needs besides the request.
pub struct MapContext<'a> {
    pub meters: &'a Meters,
    pub names: &'a Names,
    /// Resource attribute naming the tenant.
    pub tenant_attribute: &'a str,
    /// The authenticated tenant (API key); points may belong to it only.
    pub key_tenant: Option<&'a str>,
    pub now_ms: i64,
    pub acceptance: Acceptance,
}

/// Why one point or record is refused (most problems are `Invalid`; a value beyond the
/// representable range is `Overflow`).
#[derive(Debug)]
pub(super) struct PointError {
    pub reason: RefusalReason,
    pub message: String,
}

impl From<String> for PointError {
    fn from(message: String) -> PointError {
        PointError {
            reason: RefusalReason::Invalid,
            message,
        }
    }
}

/// A refused point or record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointRefusal {
    pub reason: RefusalReason,
    pub message: String,
    /// Metric name or log event name.
    pub name: String,
    pub tenant: Option<String>,
    pub time_unix_nano: u64,
}

/// One accepted point's direct updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedPoint {
    /// Set when the point adds (delta sums, counts, log records with an id): counted once per
    /// key. Idempotent updates (MAX, MIN, LATEST) need none.
    pub dedup_key: Option<u128>,
    /// Inline for one meter (the usual case): no allocation per point.
    pub updates: smallvec::SmallVec<[(SeriesKey, AggState); 1]>,
    /// Lands in a window that had already closed (it amends it).
    pub late: bool,
}

/// A request, mapped.
#[derive(Debug, Default)]
pub struct Mapped {
    pub points: Vec<MappedPoint>,
    pub cumulative: Vec<CumulativePoint>,
    pub refused: Vec<PointRefusal>,
    /// Points or records that no meter reads (accepted, not counted).
    pub unmetered: usize,
    /// Points or records in the request.
    pub total: usize,
}

impl Mapped {
    /// Points or records that count (some of them may still be duplicates).
    pub fn accepted(&self) -> usize {
        self.total - self.unmetered - self.refused.len()
    }

    /// The partial-success message: counts per distinct reason, most frequent first.
    pub fn refusal_summary(&self, noun: &str) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for refusal in &self.refused {
            match counts.iter_mut().find(|(message, _)| *message == refusal.message) {
                Some((_, count)) => *count += 1,
                None => counts.push((&refusal.message, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = counts
            .iter()
            .take(5)
            .map(|(message, count)| format!("{count} × {message}"))
            .collect();
        let more = counts.len().saturating_sub(5);
        format!(
            "{} of {} {noun} rejected: {}{}",
            self.refused.len(),
            self.total,
            shown.join("; "),
            if more > 0 {
                format!("; and {more} other reasons")
            } else {
                String::new()
            }
        )
    }
}

/// A reading's series key: a new series admitted by the cardinality guard (refused past it),
/// the meter's window of `ts_ms`, and `late` set when that window already closed.
pub(super) fn series_key(
    context: &MapContext<'_>,
    dims: &mut crate::model::DimsCache,
    meter: &crate::meter::Meter,
    tenant: (&str, &mut Option<crate::model::TenantId>),
    dims_ref: crate::model::DimsRef,
    ts_ms: i64,
    late: &mut bool,
) -> Result<SeriesKey, (RefusalReason, String)> {
    let (tenant, dims) = dims
        .admit(context.names, meter.id, tenant, dims_ref, context.now_ms)
        .map_err(|limit| (RefusalReason::CardinalityLimit, limit.to_string()))?;
    let window_start = meter.window_size.start_of(ts_ms);
    let window_end = window_start + meter.window_size.seconds();
    *late |= (window_end + context.acceptance.allowed_lateness_secs) * 1000 <= context.now_ms;
    Ok(SeriesKey {
        meter: meter.id,
        tenant,
        dims,
        window_start,
    })
}

/// The point's time in unix ms, refused when absent or outside the acceptance window.
pub(super) fn point_time(
    time_unix_nano: u64,
    context: &MapContext<'_>,
) -> Result<i64, (RefusalReason, String)> {
    if time_unix_nano == 0 {
        return Err((RefusalReason::Invalid, "time_unix_nano missing".into()));
    }
    let ts_ms = (time_unix_nano / 1_000_000) as i64;
    let acceptance = context.acceptance;
    if ts_ms < context.now_ms - acceptance.max_lateness_secs * 1000 {
        return Err((
            RefusalReason::TooLate,
            format!(
                "time is more than max_lateness_secs ({}) in the past",
                acceptance.max_lateness_secs
            ),
        ));
    }
    if ts_ms < acceptance.not_before_ms {
        return Err((
            RefusalReason::TooLate,
            crate::ingest::decode::CLOCK_WENT_BACK.into(),
        ));
    }
    if ts_ms > context.now_ms + acceptance.max_future_secs * 1000 {
        return Err((
            RefusalReason::TooFarInFuture,
            format!(
                "time is more than max_future_secs ({}) in the future",
                acceptance.max_future_secs
            ),
        ));
    }
    Ok(ts_ms)
}
