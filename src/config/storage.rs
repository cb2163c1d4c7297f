//! `[storage]` (data directory, ingest log, retention, dedup filter) and `[aggregate]`
//! (checkpoints, lateness, the dedup horizon), validated together: the horizon and the
//! retention must cover the acceptance window.

use super::raw::{RawAggregate, RawStorage};

/// Whether an HTTP batch is fsynced before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSync {
    /// fsync before acknowledging: survives power loss.
    Fsync,
    /// write to the OS before acknowledging: survives a process crash (kill -9), not power loss.
    None,
}

pub(super) fn validate_storage(
    storage: &RawStorage,
    aggregate: &RawAggregate,
    errors: &mut Vec<String>,
) -> LogSync {
    let ingest_log_sync = match storage.ingest_log_sync.as_str() {
        "fsync" => LogSync::Fsync,
        "none" => LogSync::None,
        other => {
            errors.push(format!(
                "storage.ingest_log_sync: `{other}` is not one of fsync | none"
            ));
            LogSync::Fsync
        }
    };
    if storage.ingest_log_segment_bytes < 1 << 20 {
        errors.push("storage.ingest_log_segment_bytes: must be at least 1048576".into());
    }
    if storage.retention_days == 0 {
        errors.push("storage.retention_days: must be positive".into());
    }
    if storage.dedup_filter_max_mib > 1 << 20 {
        errors.push("storage.dedup_filter_max_mib: must be at most 1048576 (1 TiB)".into());
    }
    if aggregate.flush_interval_ms == 0 {
        errors.push("aggregate.flush_interval_ms: must be positive".into());
    }
    if aggregate.max_series_per_tenant == 0 || aggregate.max_series == 0 {
        errors.push("aggregate.max_series_per_tenant and aggregate.max_series: must be positive".into());
    }
    if aggregate.max_series_per_tenant > aggregate.max_series {
        errors.push("aggregate.max_series_per_tenant: must not exceed aggregate.max_series".into());
    }
    if aggregate.max_pending_series == 0 {
        errors.push("aggregate.max_pending_series: must be positive".into());
    }
    if aggregate.allowed_lateness_secs > aggregate.max_lateness_secs {
        errors.push("aggregate.allowed_lateness_secs: must not exceed aggregate.max_lateness_secs".into());
    }
    // A duplicate must never outlive its dedup key while still being acceptable: keys live
    // `dedup_horizon_secs` from first sight, and an event is accepted from `max_future_secs`
    // ahead to `max_lateness_secs` behind.
    if aggregate.dedup_horizon_secs < aggregate.max_lateness_secs + aggregate.max_future_secs {
        errors.push(format!(
            "aggregate.dedup_horizon_secs: must be at least max_lateness_secs + max_future_secs ({}), \
             or a late duplicate could be counted twice",
            aggregate.max_lateness_secs + aggregate.max_future_secs
        ));
    }
    if storage.retention_days * 86_400 < aggregate.max_lateness_secs {
        errors.push("storage.retention_days: must cover aggregate.max_lateness_secs".into());
    }
    ingest_log_sync
}
