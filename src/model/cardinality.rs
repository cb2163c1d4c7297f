//! The cardinality guard: how many distinct series (meter, tenant, dimension set) ingest may
//! create per tenant (`[aggregate] max_series_per_tenant`) and in all (`max_series`).
//!
//! A series is *active* from its first usage in a UTC day to the day's end; the count starts
//! again each day, so series that stopped (a retired model name, a deleted route) free their
//! place without a restart. A new series beyond a cap is refused with reason
//! `cardinality_limit`; series already active keep counting, so a tenant that floods distinct
//! dimension values loses only the flood. The guard decides before anything is interned: a
//! refused tenant or dimension value takes no memory, and the id tables grow by at most
//! `max_series` values a day; values unused for two days are dropped (`Interner::rotate`).

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{Dims, DimsId, MeterId, Names, TenantId};

/// Why a new series was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeriesLimit {
    #[error(
        "new series refused: the tenant has {limit} active series today \
         (aggregate.max_series_per_tenant); its existing series keep counting"
    )]
    PerTenant { limit: usize },
    #[error(
        "new series refused: {limit} series are active today (aggregate.max_series); \
         existing series keep counting"
    )]
    Total { limit: usize },
}

pub struct SeriesGuard {
    per_tenant: AtomicUsize,
    total: AtomicUsize,
    active: Mutex<Active>,
}

#[derive(Default)]
struct Active {
    /// UTC day (unix days) the sets below count.
    day: i64,
    series: FxHashSet<(MeterId, TenantId, DimsId)>,
    per_tenant: FxHashMap<TenantId, usize>,
}

impl Default for SeriesGuard {
    /// Unlimited until `set_limits` (tests, tools that replay trusted input).
    fn default() -> Self {
        SeriesGuard {
            per_tenant: AtomicUsize::new(usize::MAX),
            total: AtomicUsize::new(usize::MAX),
            active: Mutex::new(Active::default()),
        }
    }
}

impl SeriesGuard {
    pub fn set_limits(&self, per_tenant: usize, total: usize) {
        self.per_tenant.store(per_tenant, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Series active today.
    pub fn active(&self) -> usize {
        self.active.lock().series.len()
    }
}

/// A dimension set looked up but not interned: interning waits for the guard's decision.
#[derive(Debug)]
pub enum DimsRef {
    Interned(DimsId),
    /// Not in the id table yet, with the fingerprint to cache its id under once admitted.
    New(Dims, Option<u128>),
}

impl Names {
    /// Admits series (meter, `tenant`, `dims`) under the caps, interning the tenant and the
    /// dimension set only once admitted. `tenant_id` is the tenant's id if already known.
    pub fn admit_series(
        &self,
        meter: MeterId,
        tenant: &str,
        tenant_id: Option<TenantId>,
        dims: DimsRef,
        now_ms: i64,
    ) -> Result<(TenantId, DimsId), SeriesLimit> {
        let guard = &self.series;
        let mut active = guard.active.lock();
        let day = now_ms.div_euclid(86_400_000);
        if day != active.day {
            // A new day: every series counts again from its first usage.
            *active = Active {
                day,
                ..Active::default()
            };
        }
        let tenant_id = tenant_id.or_else(|| self.tenants.get(tenant));
        let dims_id = match &dims {
            DimsRef::Interned(id) => Some(*id),
            DimsRef::New(dims, _) => self.dims.get(dims),
        };
        if let (Some(tenant), Some(dims)) = (tenant_id, dims_id) {
            if active.series.contains(&(meter, tenant, dims)) {
                return Ok((tenant, dims));
            }
        }
        let per_tenant = guard.per_tenant.load(Ordering::Relaxed);
        let tenant_count = tenant_id.and_then(|id| active.per_tenant.get(&id)).copied();
        if tenant_count.unwrap_or(0) >= per_tenant {
            return Err(SeriesLimit::PerTenant { limit: per_tenant });
        }
        let total = guard.total.load(Ordering::Relaxed);
        if active.series.len() >= total {
            return Err(SeriesLimit::Total { limit: total });
        }
        let tenant_id = tenant_id.unwrap_or_else(|| self.tenants.intern(tenant));
        let dims_id = match (dims_id, dims) {
            (Some(id), _) => id,
            (None, DimsRef::New(dims, _)) => self.dims.intern(&dims),
            (None, DimsRef::Interned(id)) => id,
        };
        active.series.insert((meter, tenant_id, dims_id));
        *active.per_tenant.entry(tenant_id).or_default() += 1;
        Ok((tenant_id, dims_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;

    fn dims(value: &str) -> DimsRef {
        DimsRef::New(vec![("route".to_string(), value.to_string())], None)
    }

    #[test]
    fn new_series_beyond_a_tenants_cap_are_refused_and_known_ones_keep_counting() {
        let names = Names::default();
        names.series.set_limits(2, 100);
        let now = 10 * DAY_MS;
        let (acme, a) = names.admit_series(1, "acme", None, dims("/a"), now).unwrap();
        names
            .admit_series(1, "acme", Some(acme), dims("/b"), now)
            .unwrap();
        assert_eq!(
            names.admit_series(1, "acme", Some(acme), dims("/c"), now),
            Err(SeriesLimit::PerTenant { limit: 2 })
        );
        // Refused values are not interned: a flood takes no memory.
        assert_eq!(names.dims.get(&[("route".to_string(), "/c".to_string())]), None);
        // Known series still count; another meter's series is a new series.
        assert_eq!(
            names.admit_series(1, "acme", Some(acme), DimsRef::Interned(a), now),
            Ok((acme, a))
        );
        assert!(names
            .admit_series(2, "acme", Some(acme), dims("/a"), now)
            .is_err());
        // Another tenant has its own allowance, even for the same dimension values.
        assert!(names.admit_series(1, "umbrella", None, dims("/c"), now).is_ok());
        // The next day counts again.
        assert!(names
            .admit_series(1, "acme", Some(acme), dims("/c"), now + DAY_MS)
            .is_ok());
    }

    #[test]
    fn the_total_cap_refuses_new_tenants_too_and_interns_nothing() {
        let names = Names::default();
        names.series.set_limits(10, 3);
        let now = 3 * DAY_MS;
        for tenant in ["t1", "t2", "t3"] {
            names.admit_series(1, tenant, None, dims("/"), now).unwrap();
        }
        assert_eq!(
            names.admit_series(1, "t4", None, dims("/"), now),
            Err(SeriesLimit::Total { limit: 3 })
        );
        assert_eq!(names.tenants.get("t4"), None);
        assert_eq!(names.series.active(), 3);
    }
}
