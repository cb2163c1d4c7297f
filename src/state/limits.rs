//! The limits gate every edge shares: rate limits (GCRA per tenant and meter) and period quotas
//! decided at admission, from the very totals rating bills.
//!
//! A quota's `used` is the tenant's period quantity of the meter, the number
//! `GET /api/v1/tenants/{t}/usage` shows: read once from the store and the engine (the caller's
//! `load`, the query engine) when a (tenant, meter, period) is first needed into the period's
//! `taken`, which every decision then moves by the units it admits (applied plus admitted in
//! flight: one number, compared by decisions and written only by them). A hard quota refuses a
//! unit when `taken + units > limit`, so the sum accepted in a period never exceeds the limit
//! whatever the concurrency; a request that fails gives its holds back. Applying a decided
//! batch moves nothing (`Gate::applied`); a load excludes appliers (`applying`), so it never
//! sees a batch that `applied` also adds nor misses one it skipped, and a period a decision in
//! flight took from is never read again (`Inner::in_flight`). Refused units hold nothing and
//! never count.
//!
//! Decisions are made at admission and what was admitted is what the log holds: replaying the
//! log after a crash applies exactly the admitted units (it decides nothing again), and a
//! restart reads `used` back from the store, so it never resets.
//!
//! Concurrency: quotas take the gate's one lock (they move with the engine). Rate limits do
//! not: tenants' tables live in a sharded map read under a shard's read lock, and each rate
//! key's GCRA state is one 128-bit word changed by compare-and-swap, so a decision costs a
//! map read, a TSC clock read and one CAS (BENCHMARKS.md, "Limits"). A request's rate limits
//! are all or nothing: when a later key refuses, the keys that allowed give their units back.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard, RwLock};
use portable_atomic::AtomicI128;
use rustc_hash::{FxBuildHasher, FxHashMap as HashMap};
use smallvec::SmallVec;

use crate::aggregate::{AggState, PreAggregated};
use crate::limit::{self, Gcra, Kind, Limit, Mode, RateDecision, RateSpec, State};
use crate::model::{MeterId, SeriesKey, TenantId};
use crate::rate::plan::Plans;

/// Entries (quota periods, rate keys) untouched this long are forgotten (read again when
/// needed): memory stays proportional to the active tenants. Nanoseconds of the gate's clock.
const IDLE_NS: i128 = 600_000_000_000;
/// How often idle entries are looked for.
const SWEEP_EVERY_NS: i64 = 10_000_000_000;
/// A table's `touched` is kept in units of 2^27 ns (≈ 134 ms): a hot tenant's decisions
/// rarely write it.
const TOUCH_SHIFT: u32 = 27;

/// A (tenant, meter, billing period) whose quota is tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    pub tenant: TenantId,
    pub meter: MeterId,
    pub period_start: i64,
}

/// Units a request was admitted with and has not applied yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub key: QuotaKey,
    pub units: i128,
    /// The decision that took them (`Inner::in_flight` until applied or released).
    pub request: u64,
}

#[derive(Debug)]
struct QuotaEntry {
    period_end: i64,
    /// The period's usage as decided: what has been applied (what rating bills) and what
    /// requests in flight were admitted with, which a failed request gives back. Applying a
    /// batch whose units were all decided moves nothing here: the commit stage never touches
    /// an entry the request threads write (its cache line would move between cores).
    taken: i128,
    /// The newest decision that took units of it: while that one may be in flight
    /// (`Inner::in_flight`), the entry is kept (a total read again from the store would miss
    /// its units, which applying it does not add).
    last_request: u64,
    /// The gate's clock when last used (ns).
    touched: i128,
    /// The quota (interned: read by every tenant of the plan, hot in the cache) and the
    /// generation of the plans it is from: `decide_known` decides from the entry alone.
    limit: Arc<Limit>,
    generation: u32,
}

impl QuotaEntry {
    /// Decision `request` takes `units` at the gate's clock `now_ns`; `taken` before.
    fn take(&mut self, units: i128, request: u64, now_ns: i128) -> i128 {
        let before = self.taken;
        self.taken = self.taken.saturating_add(units);
        self.last_request = request;
        self.touched = now_ns;
        before
    }

    /// The quota the entry decides by is `table`'s (a reload may have changed it).
    fn follow(&mut self, key: &QuotaKey, table: &TenantTable) {
        if self.generation != table.generation {
            if let Some(limit) = table.limit(key.meter, Kind::Quota) {
                self.limit = limit.clone();
                self.generation = table.generation;
            }
        }
    }
}

/// A tenant as the gate's lock knows it (`Inner::known`): what `decide_known` needs, in one
/// map bucket, so that a request over hundreds of tenants reads a line per tenant rather than
/// its table, the table's limits and its period as well.
#[derive(Debug)]
struct Known {
    generation: u32,
    /// Meters with a quota, as bits by id (ids under 64; `wide`: some id is larger, and the
    /// table says).
    quota_meters: u64,
    wide: bool,
    /// The newest period a decision computed for the tenant.
    period: std::cell::Cell<(i64, i64)>,
    table: Option<Arc<TenantTable>>,
}

impl Known {
    fn new(generation: u32, table: Option<Arc<TenantTable>>) -> Known {
        let (mut quota_meters, mut wide) = (0u64, false);
        for (meter, kind, _) in table.iter().flat_map(|table| table.limits.iter()) {
            if *kind == Kind::Quota {
                match 1u64.checked_shl(*meter) {
                    Some(bit) => quota_meters |= bit,
                    None => wide = true,
                }
            }
        }
        Known {
            generation,
            quota_meters,
            wide,
            period: std::cell::Cell::new((0, 0)),
            table,
        }
    }

    /// The tenant's table when `meter` has a quota.
    fn quota_table(&self, meter: MeterId) -> Option<&TenantTable> {
        let table = self.table.as_deref()?;
        let listed = meter < 64 && (self.quota_meters >> meter) & 1 == 1;
        (listed || (self.wide && table.limit(meter, Kind::Quota).is_some())).then_some(table)
    }

    /// The start of the period `unix_secs` is in.
    fn period_start(&self, table: &TenantTable, unix_secs: i64) -> i64 {
        let (start, end) = self.period.get();
        if start <= unix_secs && unix_secs < end {
            return start;
        }
        let period = table.period_of(unix_secs);
        if period.0 > start {
            self.period.set(period);
        }
        period.0
    }
}

/// One rate limit key (a tenant's meter): its GCRA state in one atomic word and its limit,
/// shared by every tenant with the same limit (32 bytes: the map's buckets stay small, and
/// the spec a decision reads is one allocation per plan, hot in the cache).
#[derive(Debug)]
struct RateSlot {
    tat: AtomicI128,
    limit: Arc<Limit>,
    meter: MeterId,
    /// 0: its last decision allowed. Else it refuses (signalled once when it starts and once
    /// when it stops): 1, or, when a log took it over (`Rates::Charge`), 2 + the gate-clock
    /// second its latest `exceeded` said the excess drains at (`publishes_over`).
    refusing: AtomicU32,
}

impl RateSlot {
    fn spec(&self) -> RateSpec {
        self.limit.rate.expect("invariant: rate limits have a spec")
    }

    fn state(&self) -> Gcra {
        Gcra::from_raw(self.tat.load(Ordering::Acquire))
    }

    /// Takes `units` at `now_ns` when they are allowed; the state seen when they are not.
    fn take(&self, now_ns: i128, units: i128) -> Result<(), Gcra> {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let mut gcra = Gcra::from_raw(current);
            if !gcra.take(now_ns, units, &self.spec()) {
                return Err(gcra);
            }
            match self
                .tat
                .compare_exchange_weak(current, gcra.to_raw(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// `Gcra::charge` on the key: takes `units` whatever the answer.
    fn charge(&self, now_ns: i128, at_ns: i128, units: i128) -> RateDecision {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let mut gcra = Gcra::from_raw(current);
            let decision = gcra.charge(now_ns, at_ns, units, &self.spec());
            match self
                .tat
                .compare_exchange_weak(current, gcra.to_raw(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return decision,
                Err(seen) => current = seen,
            }
        }
    }

    /// `take` with the answer's details (RLS, Check); `consume: false` only looks.
    fn check(&self, now_ns: i128, units: i128, consume: bool) -> (Gcra, RateDecision) {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let before = Gcra::from_raw(current);
            let mut after = before;
            let decision = after.check(now_ns, units, &self.spec());
            if !consume || !decision.allowed {
                return (before, decision);
            }
            match self
                .tat
                .compare_exchange_weak(current, after.to_raw(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return (after, decision),
                Err(seen) => current = seen,
            }
        }
    }

    fn give_back(&self, units: i128) {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let mut gcra = Gcra::from_raw(current);
            gcra.give_back(units, &self.spec());
            match self
                .tat
                .compare_exchange_weak(current, gcra.to_raw(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Whether this decision starts (refused) or ends (allowed) a run of refusals: the
    /// transitions are signalled, once each.
    fn turns(&self, refused: bool) -> bool {
        (self.refusing.load(Ordering::Relaxed) != 0) != refused
            && (self.refusing.swap(u32::from(refused), Ordering::Relaxed) != 0) != refused
    }

    /// A log took the key over (`Rates::Charge`), its excess draining at `until_s` (gate-clock
    /// seconds): whether to signal `exceeded` (again). When it starts, and when the wait has
    /// grown past the one published by an eighth of what was left of it (at least a second):
    /// edges hold the tenant until the published time, so a longer wait must reach them, but
    /// a tenant far over its rate does not signal every batch. A wait published short is
    /// corrected by the first unit after it (the key is still over, a second or more later).
    fn publishes_over(&self, now_s: u32, until_s: u32) -> bool {
        let current = self.refusing.load(Ordering::Relaxed);
        if current >= 2 {
            let published = current - 2;
            let slack = (published.saturating_sub(now_s) / 8).max(1);
            if until_s <= published.saturating_add(slack) {
                return false;
            }
        }
        self.refusing
            .compare_exchange(
                current,
                until_s.saturating_add(2),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

/// A billing period `[start, end)` (unix seconds) in one word: the start's seconds in the
/// high half, the length in the low half. None when it does not fit (before 1970, after 2106):
/// such a period is not cached.
fn pack_period((start, end): (i64, i64)) -> Option<u64> {
    let start = u32::try_from(start).ok()?;
    let length = u32::try_from(end.checked_sub(i64::from(start))?).ok()?;
    (length > 0).then_some(u64::from(start) << 32 | u64::from(length))
}

/// `pack_period`'s inverse; 0 (nothing cached) is the empty period `[0, 0)`.
fn unpack_period(packed: u64) -> (i64, i64) {
    let start = i64::from((packed >> 32) as u32);
    (start, start + i64::from(packed as u32))
}

/// A tenant's limits, by meter id, with its billing period.
#[derive(Debug)]
struct TenantTable {
    name: Arc<str>,
    /// The generation of the plans it was built from.
    generation: u32,
    /// (meter, kind, limit): the kind inline, so a lookup touches no limit it does not want.
    limits: Vec<(MeterId, Kind, Arc<Limit>)>,
    has_quotas: bool,
    period: crate::rate::period::BillingPeriod,
    zone: Option<chrono_tz::Tz>,
    /// The newest period computed, packed by `pack_period` (0: none): most units fall in
    /// it. Read without a lock, written only when a newer period starts: every request
    /// thread reads it, and a lock's write would move its cache line between them.
    last_period: AtomicU64,
    /// Rate keys after the first (which `Cached` holds inline).
    more_rates: Vec<RateSlot>,
}

impl TenantTable {
    fn period_of(&self, unix_secs: i64) -> (i64, i64) {
        let last = self.last_period.load(Ordering::Relaxed);
        let (start, end) = unpack_period(last);
        if start <= unix_secs && unix_secs < end {
            return (start, end);
        }
        let period = self.period.containing_in(unix_secs, self.zone);
        // A late unit's older period is computed each time; only a newer one is kept.
        if period.0 > start || last == 0 {
            if let Some(packed) = pack_period(period) {
                self.last_period.store(packed, Ordering::Relaxed);
            }
        }
        period
    }

    fn limit(&self, meter: MeterId, kind: Kind) -> Option<&Arc<Limit>> {
        if kind == Kind::Quota && !self.has_quotas {
            return None;
        }
        self.limits
            .iter()
            .find(|(id, of, _)| *id == meter && *of == kind)
            .map(|(_, _, limit)| limit)
    }
}

/// A tenant's entry in the gate's map, as the plans of `generation` make it: its rate keys'
/// states inline (a rate decision reads the map's bucket and nothing else), its table (None:
/// the tenant has no limits).
#[derive(Debug)]
struct Cached {
    rate: Option<RateSlot>,
    table: Option<Arc<TenantTable>>,
    /// The gate's clock when last used (ns >> TOUCH_SHIFT, wrapping).
    touched: AtomicU32,
    generation: u32,
    has_quotas: bool,
}

impl Cached {
    fn empty(generation: u32) -> Cached {
        Cached {
            rate: None,
            table: None,
            touched: AtomicU32::new(0),
            generation,
            has_quotas: false,
        }
    }

    fn rate(&self, meter: MeterId) -> Option<&RateSlot> {
        match &self.rate {
            Some(slot) if slot.meter == meter => Some(slot),
            Some(_) => self
                .table
                .as_ref()?
                .more_rates
                .iter()
                .find(|slot| slot.meter == meter),
            None => None,
        }
    }

    fn rates(&self) -> impl Iterator<Item = &RateSlot> {
        self.rate
            .iter()
            .chain(self.table.iter().flat_map(|table| table.more_rates.iter()))
    }

    fn name(&self) -> Arc<str> {
        self.table
            .as_ref()
            .map_or_else(|| Arc::from(""), |table| table.name.clone())
    }

    fn touch(&self, now_ns: i128) {
        let now = (now_ns >> TOUCH_SHIFT) as u32;
        if self.touched.load(Ordering::Relaxed) != now {
            self.touched.store(now, Ordering::Relaxed);
        }
    }

    /// Nothing to remember: every rate key is back to its full burst, none refusing, and the
    /// tenant was not seen for a second.
    fn is_idle(&self, now_ns: i128) -> bool {
        let now = (now_ns >> TOUCH_SHIFT) as u32;
        let since = i128::from(now.wrapping_sub(self.touched.load(Ordering::Relaxed))) << TOUCH_SHIFT;
        since > 1_000_000_000
            && self.rates().all(|slot| {
                slot.state().is_idle(now_ns, &slot.spec()) && slot.refusing.load(Ordering::Relaxed) == 0
            })
    }
}

/// The tables one batch meets, each with the generation of the plans it was built from (a
/// batch repeats its tenants: each is looked up once; their periods are cached by the table).
#[derive(Default)]
struct BatchTables(HashMap<TenantId, (u32, Option<Arc<TenantTable>>)>);

impl BatchTables {
    fn get(
        &mut self,
        tenant: TenantId,
        fetch: impl FnOnce() -> (u32, Option<Arc<TenantTable>>),
    ) -> Option<&Arc<TenantTable>> {
        self.0.entry(tenant).or_insert_with(fetch).1.as_ref()
    }

    fn table(&self, tenant: TenantId) -> Option<&Arc<TenantTable>> {
        self.0.get(&tenant)?.1.as_ref()
    }
}

/// The quota half of the gate: what its lock guards.
pub struct Inner {
    quotas: HashMap<QuotaKey, QuotaEntry>,
    /// The table of each tenant with a tracked period (the newest a decision met): `applied`
    /// reads it here, under the lock it holds anyway.
    tenants: HashMap<TenantId, Arc<TenantTable>>,
    /// Every tenant decisions met since the last sweep: (generation of the plans its table was
    /// built from, the table; None: no limits). `decide_known` decides from it alone.
    known: HashMap<TenantId, Known>,
    /// The gate's clock (ns) as of the operation holding the lock.
    clock_ns: i128,
    /// The next decision's number (`Hold::request`).
    next_request: u64,
    /// Decisions that hold units not yet applied nor released (and the one deciding now).
    in_flight: std::collections::BTreeSet<u64>,
}

impl Inner {
    /// The decisions of `holds` are over (applied or released).
    fn finish(&mut self, holds: &[Hold]) {
        let mut last = None;
        for hold in holds {
            // A decision's holds are contiguous: one removal each.
            if last != Some(hold.request) {
                self.in_flight.remove(&hold.request);
                last = Some(hold.request);
            }
        }
    }

    /// Gives `holds` back (their request was not applied), signalling what this changes.
    fn give_back(&mut self, limits: &Limits, holds: &[Hold]) {
        for hold in holds {
            let Some(entry) = self.quotas.get_mut(&hold.key) else {
                continue;
            };
            let before = entry.taken;
            entry.taken = entry.taken.saturating_sub(hold.units);
            let tenants = &self.tenants;
            signal_moved(limits, entry, &hold.key, before, || {
                tenants.get(&hold.key.tenant).map(|table| table.name.clone())
            });
        }
        self.finish(holds);
    }
}

/// The gate's lock held: quota periods can be read and moved. An applier holds it across its
/// engine apply and calls `applied`.
pub struct Gate<'a> {
    limits: &'a Limits,
    inner: MutexGuard<'a, Inner>,
}

/// A limit's state after a change: a quota's state or threshold crossing, a rate limit
/// starting or stopping to refuse, a quota period first tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    pub tenant: Arc<str>,
    pub standing: Standing,
    /// Thresholds (percent) crossed upwards by this change.
    pub crossed: Vec<u32>,
    pub at_ms: i64,
}

/// How many signals a slow listener may fall behind before it misses some (it is told, and
/// resynchronises from the current states).
const SIGNAL_BACKLOG: usize = 4096;

/// Why a request was refused as a whole: a rate limit it would pass. Only ids and the state
/// seen: the refusal is the hot path of a tenant over its rate (no allocation, no shared
/// counter touched); `explain` gives the details an answer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateRefusal {
    pub tenant: TenantId,
    pub meter: MeterId,
    pub units: i128,
    state: Gcra,
    spec: RateSpec,
    scale: u32,
    now_ns: i128,
}

/// A rate refusal's details: the tenant, its limit and the decision (remaining, retry after).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateExplained {
    pub tenant: Arc<str>,
    pub limit: Arc<Limit>,
    pub decision: RateDecision,
}

impl RateRefusal {
    pub fn explain(
        &self,
        limits: &Limits,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) -> RateExplained {
        let mut state = self.state;
        let decision = state.check(self.now_ns, self.units, &self.spec);
        let table = limits
            .tables
            .get(&self.tenant)
            .and_then(|cached| cached.table.clone());
        let limit = table
            .as_ref()
            .and_then(|table| table.limit(self.meter, Kind::Rate).cloned());
        RateExplained {
            tenant: table.map_or_else(|| names.tenants.resolve(self.tenant), |table| table.name.clone()),
            // A reload removed the limit since: the spec that refused.
            limit: limit.unwrap_or_else(|| {
                Arc::new(Limit {
                    meter: meters
                        .by_id(self.meter)
                        .map(|meter| meter.slug.clone())
                        .unwrap_or_default(),
                    kind: Kind::Rate,
                    mode: Mode::Hard,
                    limit: self.spec.limit,
                    scale: self.scale,
                    thresholds: Vec::new(),
                    rate: Some(self.spec),
                })
            }),
            decision,
        }
    }
}

/// The gate's answer for one batch of units.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The units refused (over a hard quota) and why, by ascending index.
    pub refused: Vec<(usize, String)>,
    /// What the admitted units hold of quotas until applied, and took from rate keys.
    pub holds: Holds,
}

/// What an admitted request holds until it is applied or released (`Limits::release`): its
/// quota units, and what it took from rate keys — given back when it is not applied (a
/// request that fails at its commit was refused: refused usage counts against no limit).
#[derive(Debug, Default)]
pub struct Holds {
    pub quotas: Vec<Hold>,
    pub rates: Taken,
}

impl Holds {
    pub fn extend(&mut self, other: Holds) {
        self.quotas.extend(other.quotas);
        self.rates.extend(other.rates);
    }
}

/// What a request's rate keys took: ((tenant, meter), units).
pub type Taken = SmallVec<[((TenantId, MeterId), i128); 2]>;

/// How long after a plan reload batches are applied by reading them whole (`Gate::applied`):
/// longer than a decided request waits for its commit.
const RELOAD_SETTLES_NS: i128 = 60_000_000_000;

/// A batch's demand of one (tenant, meter): its units and the earliest time a log received
/// them (None: now).
type Demand = ((TenantId, MeterId), i128, Option<i64>);

/// A request's demand, one entry per (tenant, meter) in the order first met: found by a scan
/// while there are few (a request of one tenant), by a map past that (a batch of hundreds of
/// tenants would scan quadratically).
#[derive(Default)]
struct Demands {
    list: SmallVec<[Demand; 2]>,
    /// Where each is in `list`, once it holds more than `SCAN_UP_TO` (empty until then).
    index: HashMap<(TenantId, MeterId), usize>,
}

const SCAN_UP_TO: usize = 8;

impl Demands {
    fn add(&mut self, id: (TenantId, MeterId), units: i128, logged: Option<i64>) {
        let found = if self.index.is_empty() {
            self.list.iter().position(|(known, _, _)| *known == id)
        } else {
            self.index.get(&id).copied()
        };
        match found {
            Some(at) => {
                let (_, total, earliest) = &mut self.list[at];
                *total = total.saturating_add(units);
                // None is now: the earliest is any time a log gave.
                *earliest = match (*earliest, logged) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (known, None) | (None, known) => known,
                };
            }
            None => {
                self.list.push((id, units, logged));
                if !self.index.is_empty() {
                    self.index.insert(id, self.list.len() - 1);
                } else if self.list.len() > SCAN_UP_TO {
                    self.index = self
                        .list
                        .iter()
                        .enumerate()
                        .map(|(at, (known, _, _))| (*known, at))
                        .collect();
                }
            }
        }
    }
}

/// A unit's units of one quota period: (period, units, mode, limit, scale).
type Want = (QuotaKey, i128, Mode, i128, u32);

const OUTCOMES: [&str; 3] = ["allowed", "refused", "warned"];

/// Decisions of one batch by kind and outcome.
#[derive(Default)]
struct Counts([[u64; 3]; 2]);

impl Counts {
    fn add(&mut self, kind: Kind, outcome: &'static str) {
        let o = OUTCOMES.iter().position(|known| *known == outcome).unwrap_or(0);
        self.0[kind as usize][o] += 1;
    }
}

/// `tallyd_limit_decisions_total`, counted per thread (two threads deciding for the same
/// tenant would otherwise fight over one counter's cache line on every decision) and
/// published to the metrics recorder when metrics are rendered (`publish_metrics`). A thread
/// owns a stripe for its life (`Claim`), so its counts are plain adds, no locked instruction
/// (8 % of an in-process decision); threads past `OWNED` share the last stripe atomically.
struct DecisionCounts {
    stripes: Box<[Stripe]>,
}

#[repr(align(128))]
#[derive(Default)]
struct Stripe([[AtomicU64; 3]; 2]);

/// Stripes owned by one thread each; stripe `OWNED` is shared by the threads beyond.
const OWNED: usize = 63;

/// Which of the `OWNED` stripes are claimed (bit n: stripe n), in every `DecisionCounts`.
static CLAIMED: AtomicU64 = AtomicU64::new(0);

/// A thread's stripe, given back when the thread exits (tokio's blocking pool comes and goes).
struct Claim(usize);

impl Claim {
    fn take() -> Claim {
        let mut claimed = CLAIMED.load(Ordering::Relaxed);
        loop {
            let free = (!claimed).trailing_zeros() as usize;
            if free >= OWNED {
                return Claim(OWNED);
            }
            // Acquire: the previous owner's last adds happen before this thread's first.
            match CLAIMED.compare_exchange_weak(
                claimed,
                claimed | 1 << free,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Claim(free),
                Err(seen) => claimed = seen,
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.0 < OWNED {
            CLAIMED.fetch_and(!(1 << self.0), Ordering::Release);
        }
    }
}

thread_local! {
    static CLAIM: Claim = Claim::take();
}

impl DecisionCounts {
    fn new() -> DecisionCounts {
        DecisionCounts {
            stripes: (0..=OWNED).map(|_| Stripe::default()).collect(),
        }
    }

    fn record(&self, counts: &Counts) {
        // A thread being torn down counts on the shared stripe.
        let claim = CLAIM.try_with(|claim| claim.0).unwrap_or(OWNED);
        let stripe = &self.stripes[claim];
        for (kind, row) in counts.0.iter().enumerate() {
            for (outcome, n) in row.iter().enumerate() {
                if *n > 0 {
                    let cell = &stripe.0[kind][outcome];
                    if claim < OWNED {
                        // Only this thread writes the cell: a plain add.
                        cell.store(cell.load(Ordering::Relaxed) + n, Ordering::Relaxed);
                    } else {
                        cell.fetch_add(*n, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn totals(&self) -> [[u64; 3]; 2] {
        let mut totals = [[0u64; 3]; 2];
        for stripe in self.stripes.iter() {
            for (kind, row) in stripe.0.iter().enumerate() {
                for (outcome, n) in row.iter().enumerate() {
                    totals[kind][outcome] += n.load(Ordering::Relaxed);
                }
            }
        }
        totals
    }
}

/// One question to `Limits::ask`: `units` of `meter` for `tenant`.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    pub tenant: &'a str,
    pub meter: &'a str,
    pub units: i128,
}

/// `Limits::ask`'s answer to one ask.
#[derive(Clone, Debug)]
pub struct Answer {
    pub allowed: bool,
    /// The meter's limits for the tenant, as they stand after the decision.
    pub limits: Vec<Standing>,
    /// The limit that decided (the one refusing, else the one with the least left).
    pub deciding: Option<usize>,
    /// Refused by a rate limit: ns until the same units would pass (None: not by waiting).
    pub retry_after_ns: Option<i128>,
    /// The tenant has a plan and the meter exists.
    pub known: bool,
}

/// A limit's standing, for `GET /api/v1/tenants/{t}/limits` and signals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    pub limit: Limit,
    pub used: i128,
    pub remaining: i128,
    pub state: State,
    /// Quotas: the billing period; rates: now and when the burst is whole again.
    pub period: (i64, i64),
    /// Unix ms when the limit resets (quota: period end; rate: burst whole again).
    pub resets_at_ms: i64,
    /// A rate limit refusing: unix ms when the same units would be allowed again (a log's
    /// usage, which is charged whatever the answer: when its excess has drained).
    pub retry_at_ms: Option<i64>,
}

/// Reads a (tenant, meter) period total `[from, to)` (unix seconds) at the limit's scale.
pub type Load<'a> = &'a dyn Fn(&str, &str, i64, i64) -> Result<i128, String>;

pub struct Limits {
    clock: quanta::Clock,
    epoch: u64,
    /// Whether any plan has limits: the fast path skips everything when none does.
    active: AtomicBool,
    /// The plans in force and their generation (tables built from older ones are rebuilt).
    plans: RwLock<(u32, Option<Arc<Plans>>)>,
    generation: AtomicU32,
    /// Limits shared by the tables built from the plans in force (one allocation per plan's
    /// limit, however many tenants have it).
    interned: Mutex<HashMap<Limit, Arc<Limit>>>,
    tables: DashMap<TenantId, Cached, FxBuildHasher>,
    /// The gate's clock (ns) at the last sweep of idle entries.
    swept_ns: AtomicI64,
    /// State changes, to whoever listens (Watch streams, the signal topic, webhooks).
    signals: tokio::sync::broadcast::Sender<Signal>,
    decisions: DecisionCounts,
    /// Appliers (shared) against a quota period's first read (exclusive): see `applying`.
    applying: RwLock<()>,
    inner: Mutex<Inner>,
    /// Cluster mode: the limits the partition owners published as used up, for edges.
    pub replicated: Replicated,
    /// The gate's clock at the last plan reload (ns; far past: none since the start).
    reloaded_ns: AtomicI64,
    /// Cluster mode: rate keys are charged from the ingest log by the tenants' owners
    /// (`Rates::Charge`), so asks (RLS) only look: their allowed hits reach the log as usage.
    charged_by_log: AtomicBool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new()
    }
}

/// Additive contributions of one unit: (series, units at the meter's limit scale).
pub trait Contributes {
    fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128));

    /// When a log received the unit (unix ms; `Rates::Charge` charges it then). None: now.
    fn logged_ms(&self) -> Option<i64> {
        None
    }
}

/// How a batch's units meet the tenants' rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rates {
    /// Over a rate, the batch is refused as a whole and takes nothing (push edges: the
    /// producer hears it at once).
    Enforce,
    /// Taken whatever the answer, each unit at the time its log received it, and signalled
    /// while over (a log's usage: nothing can refuse it any more, and a consumer draining a
    /// backlog is not a burst). What an owner publishes here, edges refuse by
    /// (`Replicated::throttled`).
    Charge,
    /// Not met (usage whose rate was decided already: Envoy's allowed hits).
    Skip,
}

/// The additive part of an aggregation state (SUM, COUNT); None for the others.
pub fn additive(state: &AggState) -> Option<i128> {
    match state {
        AggState::Sum(value) => Some(value.get()),
        AggState::Count(n) => Some(i128::from(*n)),
        _ => None,
    }
}

/// The additive contributions of pre-built states (OTLP points, forwarded usage).
pub fn state_contributions(updates: &[(SeriesKey, AggState)], each: &mut dyn FnMut(SeriesKey, i128)) {
    for (key, state) in updates {
        if let Some(units) = additive(state) {
            each(*key, units);
        }
    }
}

impl Limits {
    pub fn new() -> Limits {
        let (signals, _) = tokio::sync::broadcast::channel(SIGNAL_BACKLOG);
        let clock = quanta::Clock::new();
        let epoch = clock.raw();
        Limits {
            clock,
            epoch,
            active: AtomicBool::new(false),
            plans: RwLock::new((0, None)),
            generation: AtomicU32::new(0),
            interned: Mutex::new(HashMap::default()),
            tables: DashMap::with_hasher_and_shard_amount(FxBuildHasher, 64),
            swept_ns: AtomicI64::new(0),
            signals,
            decisions: DecisionCounts::new(),
            applying: RwLock::new(()),
            replicated: Replicated::default(),
            charged_by_log: AtomicBool::new(false),
            reloaded_ns: AtomicI64::new(i64::MIN / 2),
            inner: Mutex::new(Inner {
                quotas: HashMap::default(),
                tenants: HashMap::default(),
                known: HashMap::default(),
                clock_ns: 0,
                next_request: 1,
                in_flight: std::collections::BTreeSet::new(),
            }),
        }
    }

    /// Every state change from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    /// Nanoseconds on the gate's monotonic clock (the TSC where it is invariant).
    pub fn now_ns(&self) -> i128 {
        i128::from(self.clock.delta_as_nanos(self.epoch, self.clock.raw()))
    }

    /// Whether a batch's holds are all it adds to tracked quota periods (`Gate::applied`): not
    /// within `RELOAD_SETTLES_NS` of a reload, which may have given quotas to units decided
    /// before it (they hold nothing); past that, every batch applied was decided after it.
    fn holds_cover_batches(&self) -> bool {
        self.now_ns() - i128::from(self.reloaded_ns.load(Ordering::Relaxed)) > RELOAD_SETTLES_NS
    }

    /// Cluster mode: rate keys are charged by the owners from the ingest log, not by asks.
    pub fn charge_rates_from_log(&self) {
        self.charged_by_log.store(true, Ordering::Relaxed);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The plans in force changed (start, reload): tables are rebuilt from them on next use,
    /// keeping their rate keys' states.
    pub fn set_plans(&self, plans: &Arc<Plans>) {
        let mut current = self.plans.write();
        let generation = current.0.wrapping_add(1);
        if generation > 1 {
            self.reloaded_ns.store(self.now_ns() as i64, Ordering::Relaxed);
        }
        *current = (generation, Some(plans.clone()));
        self.interned.lock().clear();
        self.generation.store(generation, Ordering::Release);
        self.active.store(plans.any_limits(), Ordering::Relaxed);
    }

    fn plans(&self) -> Arc<Plans> {
        self.plans.read().1.clone().unwrap_or_default()
    }

    /// Held (shared) by an applier across its `Gate::applied` and its engine apply, so that a
    /// quota period's total is read (exclusively) between batches, never in the middle of one.
    pub fn applying(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.applying.read()
    }

    /// The lock quotas need (`Gate::applied` moves them).
    pub fn lock(&self) -> Gate<'_> {
        Gate {
            limits: self,
            inner: self.inner.lock(),
        }
    }

    /// Forgets the tracked quota periods (but those holding a request in flight): each is read
    /// again from the store on next use. A rebalance calls it: a partition this replica gets
    /// back was counted elsewhere meanwhile, and the restore brought that usage into the store,
    /// not into `used` (a stale `used` would admit past a hard quota).
    pub fn forget_quotas(&self) {
        // No applier between its `applied` and its engine apply meanwhile.
        let _applying = self.applying.write();
        let mut gate = self.lock();
        let oldest_in_flight = gate.inner.in_flight.first().copied();
        gate.inner
            .quotas
            .retain(|_, entry| oldest_in_flight.is_some_and(|oldest| oldest <= entry.last_request));
    }

    /// Publishes the decision counts to the metrics recorder (before metrics are rendered).
    pub fn publish_metrics(&self) {
        let totals = self.decisions.totals();
        for (kind, row) in [Kind::Quota, Kind::Rate].into_iter().zip(totals) {
            for (outcome, n) in OUTCOMES.into_iter().zip(row) {
                if n > 0 {
                    metrics::counter!(crate::telemetry::LIMIT_DECISIONS, "kind" => kind.as_str(), "outcome" => outcome)
                        .absolute(n);
                }
            }
        }
    }

    fn signal(&self, tenant: Arc<str>, standing: Standing, crossed: Vec<u32>) {
        // No listener: nothing to do (send fails only then).
        let _ = self.signals.send(Signal {
            tenant,
            standing,
            crossed,
            at_ms: crate::model::now_ms(),
        });
    }

    /// Runs `f` on the tenant's current entry (built from the plans on first use or after a
    /// reload). The entry is read under its shard's read lock: `f` must not touch the map.
    fn with_cached<R>(
        &self,
        tenant: TenantId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        f: impl FnOnce(&Cached) -> R,
    ) -> R {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            if let Some(cached) = self.tables.get(&tenant) {
                if cached.generation == generation {
                    return f(&cached);
                }
            }
            // The read guard is gone: building takes the shard's write lock.
            self.build(tenant, names, meters);
        }
    }

    /// The tenant's current table, shared (the quota path and RLS, which hold it a while).
    fn table(
        &self,
        tenant: TenantId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) -> Option<Arc<TenantTable>> {
        self.table_at(tenant, names, meters).1
    }

    /// `table` with the generation of the plans it was built from.
    fn table_at(
        &self,
        tenant: TenantId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) -> (u32, Option<Arc<TenantTable>>) {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            if let Some(cached) = self.tables.get(&tenant) {
                if cached.generation == generation {
                    return (generation, cached.table.clone());
                }
            }
            self.build(tenant, names, meters);
        }
    }

    /// The tenant's table from the plans in force, unless another thread built it already;
    /// rate keys' states carry over from the table it replaces.
    fn build(&self, tenant: TenantId, names: &crate::model::Names, meters: &crate::meter::Meters) {
        let (generation, plans) = self.plans.read().clone();
        let mut cached = self
            .tables
            .entry(tenant)
            .or_insert_with(|| Cached::empty(generation.wrapping_sub(1)));
        if cached.generation == generation {
            return;
        }
        let intern = |limit: Limit| {
            self.interned
                .lock()
                .entry(limit.clone())
                .or_insert_with(|| Arc::new(limit))
                .clone()
        };
        let built = plans.and_then(|plans| build_table(&plans, tenant, names, meters, &cached, intern));
        *cached = match built {
            Some((mut table, rate)) => Cached {
                rate,
                has_quotas: table.has_quotas,
                touched: AtomicU32::new(cached.touched.load(Ordering::Relaxed)),
                table: Some(Arc::new({
                    table.generation = generation;
                    table
                })),
                generation,
            },
            None => Cached::empty(generation),
        };
    }

    /// Forgets idle rate keys (their buckets are full) and quota periods nobody touched
    /// lately; at most once per `SWEEP_EVERY_NS`, by whichever decision notices.
    fn maybe_sweep(&self, now_ns: i128) {
        let last = self.swept_ns.load(Ordering::Relaxed);
        let now = now_ns as i64;
        if now - last <= SWEEP_EVERY_NS
            || self
                .swept_ns
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let mut gate = self.lock();
        let oldest_in_flight = gate.inner.in_flight.first().copied();
        gate.inner.quotas.retain(|_, entry| {
            oldest_in_flight.is_some_and(|oldest| oldest <= entry.last_request)
                || now_ns - entry.touched < IDLE_NS
        });
        // A tracked quota period keeps its tenant's table (`applied` moves it through it).
        let quota_tenants: rustc_hash::FxHashSet<TenantId> =
            gate.inner.quotas.keys().map(|key| key.tenant).collect();
        gate.inner
            .tenants
            .retain(|tenant, _| quota_tenants.contains(tenant));
        // Learned again by the next request meeting each (memory: the tenants of 10 s).
        gate.inner.known.clear();
        self.tables.retain(|tenant, cached| {
            cached.table.is_some() && (quota_tenants.contains(tenant) || !cached.is_idle(now_ns))
        });
    }

    /// Decides a batch of units: rate limits over the fresh units as a whole (all or nothing:
    /// `Err` refuses the request and takes nothing), then each fresh unit against its quotas in
    /// order. `fresh[i]`: unit i counts (not a duplicate).
    pub fn decide<U: Contributes>(
        &self,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        units: &[U],
        fresh: &[bool],
        rates: Rates,
        load: Load<'_>,
    ) -> Result<Verdict, LimitError> {
        if !self.is_active() {
            return Ok(Verdict::default());
        }
        let now_ns = self.now_ns();
        self.maybe_sweep(now_ns);
        let mut counts = Counts::default();
        // The request's demand per (tenant, meter), with the earliest time a log received it.
        let mut demands = Demands::default();
        for (unit, _) in units.iter().zip(fresh).filter(|(_, fresh)| **fresh) {
            let logged = unit.logged_ms();
            unit.contributions(&mut |key, units| demands.add((key.tenant, key.meter), units, logged));
        }
        let demand = &demands.list;
        let mut taken = Taken::new();
        let quotas = match rates {
            Rates::Charge => {
                taken.extend(demand.iter().map(|&(key, units, _)| (key, units)));
                self.charge_rates(names, meters, demand, now_ns, &mut counts)
            }
            Rates::Enforce | Rates::Skip => {
                match self.take_rates(names, meters, demand, rates, now_ns, &mut counts, &mut taken) {
                    Ok(quotas) => quotas,
                    Err(refusal) => {
                        self.decisions.record(&counts);
                        return Err(LimitError::Rate(refusal));
                    }
                }
            }
        };
        if !quotas {
            self.decisions.record(&counts);
            let mut verdict = Verdict::default();
            verdict.holds.rates = taken;
            return Ok(verdict);
        }
        let verdict = self.settle_quotas(names, meters, units, fresh, load, &mut taken, now_ns, &mut counts);
        self.decisions.record(&counts);
        verdict.map(|mut verdict| {
            verdict.holds.rates = taken;
            verdict
        })
    }

    /// Rate limits over a request's demand as a whole (`Rates::Enforce`): all allowed, or none
    /// taken and the refusal (boxed: the answer stays small where it is allowed). With `Rates::Skip`
    /// nothing is taken. Whether any tenant met has quotas; `taken`: what was taken.
    #[allow(clippy::too_many_arguments)]
    fn take_rates(
        &self,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        demand: &[Demand],
        rates: Rates,
        now_ns: i128,
        counts: &mut Counts,
        taken: &mut Taken,
    ) -> Result<bool, Box<RateRefusal>> {
        let mut quotas = false;
        for &((tenant, meter), units, _) in demand {
            let decided = self.with_cached(tenant, names, meters, |table| {
                table.touch(now_ns);
                quotas |= table.has_quotas;
                let slot = table.rate(meter).filter(|_| rates == Rates::Enforce)?;
                let decided = slot.take(now_ns, units);
                // Built only when someone listens: a tenant hovering at its rate turns often.
                if slot.turns(decided.is_err()) && self.signals.receiver_count() > 0 {
                    let decision = match decided {
                        Ok(()) => None,
                        Err(mut state) => Some(state.check(now_ns, units, &slot.spec())),
                    };
                    let state = slot.state();
                    let standing = rate_standing(
                        (*slot.limit).clone(),
                        &state,
                        now_ns,
                        crate::model::now_ms(),
                        decision,
                    );
                    self.signal(table.name(), standing, Vec::new());
                }
                Some(decided.map_err(|state| (state, slot.spec(), slot.limit.scale)))
            });
            match decided {
                None => {}
                Some(Ok(())) => taken.push(((tenant, meter), units)),
                Some(Err((state, spec, scale))) => {
                    self.give_back_taken(taken);
                    counts.add(Kind::Rate, "refused");
                    return Err(Box::new(RateRefusal {
                        tenant,
                        meter,
                        units,
                        state,
                        spec,
                        scale,
                        now_ns,
                    }));
                }
            }
        }
        for _ in taken.iter() {
            counts.add(Kind::Rate, "allowed");
        }
        Ok(quotas)
    }

    /// Gives back what a request's rate keys took (it was refused, left undecided, or not
    /// applied).
    fn give_back_taken(&self, taken: &[((TenantId, MeterId), i128)]) {
        for &((tenant, meter), units) in taken {
            self.give_back_units(tenant, meter, units);
        }
    }

    /// Gives `units` back to the tenant's current rate key of `meter` (one a reload replaced
    /// passes its state on when rebuilt; one forgotten meanwhile was whole already).
    fn give_back_units(&self, tenant: TenantId, meter: MeterId, units: i128) {
        if let Some(cached) = self.tables.get(&tenant) {
            if let Some(slot) = cached.rate(meter) {
                slot.give_back(units);
            }
        }
    }

    /// The quota half of `decide`, after the rates took `taken`: units refused for a quota
    /// give their rate units back (refused usage counts against no limit), and a batch that
    /// cannot be decided (a period's total unreadable: it comes again) gives all back.
    #[allow(clippy::too_many_arguments)]
    fn settle_quotas<U: Contributes>(
        &self,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        units: &[U],
        fresh: &[bool],
        load: Load<'_>,
        taken: &mut Taken,
        now_ns: i128,
        counts: &mut Counts,
    ) -> Result<Verdict, LimitError> {
        let mut verdict = Verdict::default();
        let decided = {
            let mut gate = self.lock();
            gate.inner.clock_ns = now_ns;
            gate.decide_quotas(names, meters, units, fresh, load, &mut verdict, counts)
        };
        if let Err(error) = decided {
            self.give_back_taken(taken);
            return Err(error);
        }
        if !taken.is_empty() {
            for &(index, _) in &verdict.refused {
                units[index].contributions(&mut |key, units| {
                    if let Some((_, held)) = taken.iter_mut().find(|(id, _)| *id == (key.tenant, key.meter)) {
                        self.give_back_units(key.tenant, key.meter, units);
                        // What the request still holds, should it fail before it is applied.
                        *held -= units;
                    }
                });
            }
            taken.retain(|(_, held)| *held > 0);
        }
        Ok(verdict)
    }

    /// `Rates::Charge`: takes each demand from its rate key, charged when its log received
    /// it, counted `warned` while over and signalled when a key goes over or back. Whether
    /// any tenant met has quotas.
    fn charge_rates(
        &self,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        demand: &[Demand],
        now_ns: i128,
        counts: &mut Counts,
    ) -> bool {
        let now_ms = crate::model::now_ms();
        let mut quotas = false;
        for &((tenant, meter), units, logged) in demand {
            self.with_cached(tenant, names, meters, |table| {
                table.touch(now_ns);
                quotas |= table.has_quotas;
                let Some(slot) = table.rate(meter) else { return };
                // A log's timestamp as the gate's clock; a time ahead of now is now (a
                // producer's clock ahead earns nothing), none (-1, no timestamp) is now too.
                let age_ms = logged.filter(|at| *at >= 0).map_or(0, |at| (now_ms - at).max(0));
                let at_ns = now_ns - i128::from(age_ms) * 1_000_000;
                let decision = slot.charge(now_ns, at_ns, units);
                counts.add(Kind::Rate, if decision.allowed { "allowed" } else { "warned" });
                let signal = if decision.allowed {
                    slot.turns(false)
                } else {
                    let until_ns = now_ns + decision.retry_after_ns.unwrap_or(0);
                    let seconds = |ns: i128| u32::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(u32::MAX);
                    slot.publishes_over(seconds(now_ns), seconds(until_ns + 999_999_999))
                };
                if signal && self.signals.receiver_count() > 0 {
                    let standing = rate_standing(
                        (*slot.limit).clone(),
                        &slot.state(),
                        now_ns,
                        now_ms,
                        Some(decision),
                    );
                    self.signal(table.name(), standing, Vec::new());
                }
            });
        }
        quotas
    }

    /// Cluster mode, an edge: the answer for a tenant its owner published as over its rate
    /// of `meter` (`Replicated::throttled`), with this replica's spec of the limit (replicas
    /// read the same plans). None: not over, or no such limit here.
    pub fn replicated_rate(
        &self,
        tenant: TenantId,
        meter: MeterId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        now_ms: i64,
    ) -> Option<RateExplained> {
        if self.replicated.is_empty() {
            return None;
        }
        let until =
            self.replicated
                .throttled(&names.tenants.resolve(tenant), &meters.by_id(meter)?.slug, now_ms)?;
        let table = self.table(tenant, names, meters)?;
        let limit = table.limit(meter, Kind::Rate)?.clone();
        let spec = limit.rate?;
        let wait_ns = i128::from(until - now_ms) * 1_000_000;
        Some(RateExplained {
            tenant: table.name.clone(),
            limit,
            decision: RateDecision {
                allowed: false,
                remaining: 0,
                retry_after_ns: Some(wait_ns),
                // Drained at `until`, whole again a burst's time later.
                reset_ns: wait_ns
                    + (spec.burst.saturating_mul(spec.per_ns) + spec.limit - 1) / spec.limit.max(1),
            },
        })
    }

    /// Asks (Envoy RLS descriptors, `Check`): would each tenant's `units` of a meter be allowed
    /// now? A quota is peeked (the units are not usage: only what is counted uses a quota); with
    /// `consume`, rate limits take the units when *every* ask is allowed, and nothing when one
    /// is refused (refused hits never count).
    pub fn ask(
        &self,
        asks: &[Ask<'_>],
        consume: bool,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        load: Load<'_>,
    ) -> Result<Vec<Answer>, LimitError> {
        let now_ns = self.now_ns();
        let now_ms = crate::model::now_ms();
        let mut counts = Counts::default();
        let plans = self.plans();
        // Cluster mode: the owners charge what is recorded; edges decide by their own look
        // and by what the owners published.
        let take = consume && !self.charged_by_log.load(Ordering::Relaxed);
        let replicated = !self.replicated.is_empty();
        // The quota lock, taken at the first quota (rate-only asks never wait for an apply).
        let mut gate: Option<Gate<'_>> = None;
        let mut answers = Vec::with_capacity(asks.len());
        // Rate keys decided: (tenant, meter, units, decision), to settle once all are answered.
        let mut trials: Vec<(TenantId, MeterId, i128, RateDecision)> = Vec::new();
        for ask in asks {
            let mut answer = Answer {
                allowed: true,
                limits: Vec::new(),
                deciding: None,
                retry_after_ns: None,
                known: false,
            };
            let meter = meters.by_slug(ask.meter).map(|meter| meter.id);
            // A tenant seen before is looked up; a new one is interned only when it has limits
            // (a key holder cannot grow the tables with names).
            let tenant = match (meter, names.tenants.get(ask.tenant)) {
                (None, _) => None,
                (Some(_), Some(id)) => Some(id),
                (Some(_), None) if !plans.limits_for(ask.tenant).is_empty() => {
                    Some(names.tenants.intern(ask.tenant))
                }
                (Some(_), None) => None,
            };
            let (Some(meter), Some(tenant)) = (meter, tenant) else {
                answer.known = meter.is_some() && plans.for_tenant(ask.tenant).is_some();
                answers.push(answer);
                continue;
            };
            answer.known = true;
            let Some(table) = self.table(tenant, names, meters) else {
                answers.push(answer);
                continue;
            };
            let rate = self.with_cached(tenant, names, meters, |cached| {
                cached.touch(now_ns);
                let slot = cached.rate(meter)?;
                let (state, decision) = slot.check(now_ns, ask.units, take);
                Some(((*slot.limit).clone(), state, decision))
            });
            if let Some((limit, state, mut decision)) = rate {
                let mut standing = rate_standing(limit, &state, now_ns, now_ms, Some(decision));
                let throttled = replicated
                    .then(|| self.replicated.throttled(ask.tenant, ask.meter, now_ms))
                    .flatten();
                if let Some(until) = throttled.filter(|_| decision.allowed) {
                    // Over by its owner's count (every replica's hits): refused until drained.
                    decision = RateDecision {
                        allowed: false,
                        remaining: 0,
                        retry_after_ns: Some(i128::from(until - now_ms) * 1_000_000),
                        reset_ns: decision.reset_ns,
                    };
                    standing.remaining = 0;
                    standing.state = State::Exceeded;
                    standing.retry_at_ms = Some(until);
                }
                if !decision.allowed {
                    answer.allowed = false;
                    answer.retry_after_ns = decision.retry_after_ns;
                    answer.deciding = Some(answer.limits.len());
                }
                answer.limits.push(standing);
                trials.push((tenant, meter, ask.units, decision));
            }
            if let Some(limit) = table.limit(meter, Kind::Quota).cloned() {
                let gate = gate.get_or_insert_with(|| {
                    let mut gate = self.lock();
                    gate.inner.clock_ns = now_ns;
                    gate
                });
                let (period_start, _) = table.period_of(now_ms.div_euclid(1000));
                let key = QuotaKey {
                    tenant,
                    meter,
                    period_start,
                };
                let entry = match gate.entry(key, &table, meters, load) {
                    Ok(entry) => entry,
                    Err(error) => {
                        // Undecided: the rate keys already asked take nothing.
                        if take {
                            self.give_back(&trials);
                        }
                        return Err(error);
                    }
                };
                let taken = entry.taken;
                let (_, mut standing) = gate
                    .quota_standing(&key, &table)
                    .expect("invariant: tracked above");
                // Cluster mode: the owner's count, when it published the quota used up.
                let exhausted = replicated
                    && limit.mode == Mode::Hard
                    && self
                        .replicated
                        .exhausted(ask.tenant, ask.meter, now_ms.div_euclid(1000), now_ms)
                        .is_some();
                if exhausted {
                    standing.used = standing.used.max(limit.limit);
                    standing.remaining = 0;
                    standing.state = State::Exceeded;
                }
                if exhausted || (limit.mode == Mode::Hard && taken.saturating_add(ask.units) > limit.limit) {
                    answer.allowed = false;
                    answer.deciding.get_or_insert(answer.limits.len());
                }
                answer.limits.push(standing);
            }
            if answer.deciding.is_none() && !answer.limits.is_empty() {
                // Allowed: the limit with the least left is the one to show.
                let tightest = (0..answer.limits.len())
                    .min_by_key(|&i| answer.limits[i].remaining * 100 / answer.limits[i].limit.limit.max(1))
                    .expect("invariant: not empty");
                answer.deciding = Some(tightest);
            }
            answers.push(answer);
        }
        drop(gate);
        if consume {
            let all = answers.iter().all(|answer| answer.allowed);
            if !all && take {
                // An ask refused: nothing is taken.
                self.give_back(&trials);
            }
            for (tenant, meter, _, decision) in trials {
                if decision.allowed && !all {
                    continue;
                }
                counts.add(Kind::Rate, if decision.allowed { "allowed" } else { "refused" });
                if !take {
                    // Cluster mode: the owner signals its keys' turns (one writer per key on
                    // the compacted topic).
                    continue;
                }
                self.with_cached(tenant, names, meters, |cached| {
                    let Some(slot) = cached.rate(meter) else { return };
                    if slot.turns(!decision.allowed) {
                        let standing = rate_standing(
                            (*slot.limit).clone(),
                            &slot.state(),
                            now_ns,
                            now_ms,
                            (!decision.allowed).then_some(decision),
                        );
                        self.signal(cached.name(), standing, Vec::new());
                    }
                });
            }
            for answer in &answers {
                let over_quota = !answer.allowed
                    && answer
                        .deciding
                        .is_some_and(|i| answer.limits[i].limit.kind == Kind::Quota);
                if over_quota {
                    counts.add(Kind::Quota, "refused");
                }
            }
        }
        self.decisions.record(&counts);
        Ok(answers)
    }

    /// Gives back the units the allowed rate trials of an `ask` took.
    fn give_back(&self, trials: &[(TenantId, MeterId, i128, RateDecision)]) {
        for &(tenant, meter, units, _) in trials.iter().filter(|trial| trial.3.allowed) {
            self.give_back_units(tenant, meter, units);
        }
    }

    /// The asks of an RLS call that `ask` allowed (taking their rate units) were refused after
    /// all: its hits' record met a hard quota that another call had used up meanwhile
    /// (`over_quota`: the refusal is counted), or failed. The rate units go back (refused hits
    /// never count).
    pub fn withdraw(
        &self,
        asks: &[Ask<'_>],
        over_quota: bool,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) {
        if !self.charged_by_log.load(Ordering::Relaxed) {
            for ask in asks {
                let meter = meters.by_slug(ask.meter).map(|meter| meter.id);
                if let (Some(tenant), Some(meter)) = (names.tenants.get(ask.tenant), meter) {
                    self.give_back_units(tenant, meter, ask.units);
                }
            }
        }
        if over_quota {
            let mut counts = Counts::default();
            counts.add(Kind::Quota, "refused");
            self.decisions.record(&counts);
        }
    }

    /// Gives back what a request that was not applied holds: its quota units, and its rate
    /// units to the tenants' current keys (a key forgotten meanwhile is whole already).
    pub fn release(&self, holds: &Holds) {
        self.give_back_taken(&holds.rates);
        self.release_quotas(&holds.quotas);
    }

    /// Gives back quota holds alone (a Kafka batch applied: what it charged to rate keys
    /// stays charged).
    pub fn release_quotas(&self, holds: &[Hold]) {
        if holds.is_empty() {
            return;
        }
        self.inner.lock().give_back(self, holds);
    }

    /// The standing of every limit of `tenant` now (loading quota periods not tracked yet).
    pub fn standing(
        &self,
        tenant: &str,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        now_secs: i64,
        load: Load<'_>,
    ) -> Result<Vec<Standing>, LimitError> {
        let now_ns = self.now_ns();
        let plans = self.plans();
        let limits = plans.limits_for(tenant);
        let tenant_id = names.tenants.get(tenant);
        let table = tenant_id.and_then(|id| self.table(id, names, meters));
        let now_ms = crate::model::now_ms();
        let mut gate: Option<Gate<'_>> = None;
        let mut out = Vec::new();
        for limit in limits {
            let meter = meters.by_slug(&limit.meter).map(|meter| meter.id);
            match limit.kind {
                Kind::Quota => {
                    let (period, zone) = match plans.for_tenant(tenant) {
                        Some((plan, _)) => (plans.period_of(tenant, plan), plans.timezone(tenant)),
                        None => continue,
                    };
                    let (start, end) = period.containing_in(now_secs, zone);
                    let used = match (tenant_id, meter, &table) {
                        (Some(tenant_id), Some(meter), Some(table)) => {
                            let gate = gate.get_or_insert_with(|| {
                                let mut gate = self.lock();
                                gate.inner.clock_ns = now_ns;
                                gate
                            });
                            let key = QuotaKey {
                                tenant: tenant_id,
                                meter,
                                period_start: start,
                            };
                            gate.entry(key, table, meters, load)?.taken
                        }
                        // Not interned since the start (its usage may be in the store all the
                        // same, checkpointed before a restart): read, not tracked, so that a
                        // reader cannot grow the name tables.
                        (None, Some(_), _) => {
                            load(tenant, &limit.meter, start, end).map_err(LimitError::Load)?
                        }
                        _ => 0,
                    };
                    out.push(Standing {
                        used,
                        remaining: (limit.limit - used).max(0),
                        state: limit::quota_state(used, &limit),
                        period: (start, end),
                        resets_at_ms: end * 1000,
                        retry_at_ms: None,
                        limit,
                    });
                }
                Kind::Rate => {
                    let gcra = tenant_id
                        .zip(meter)
                        .and_then(|(tenant, meter)| {
                            self.with_cached(tenant, names, meters, |cached| {
                                cached.rate(meter).map(RateSlot::state)
                            })
                        })
                        .unwrap_or_default();
                    out.push(rate_standing(limit, &gcra, now_ns, now_ms, None));
                }
            }
        }
        Ok(out)
    }
}

/// A tenant's table and rate keys from `plans` (None: no plan or no limits); rate keys'
/// states carry over from `previous` (the entry a reload replaces).
fn build_table(
    plans: &Plans,
    tenant: TenantId,
    names: &crate::model::Names,
    meters: &crate::meter::Meters,
    previous: &Cached,
    intern: impl Fn(Limit) -> Arc<Limit>,
) -> Option<(TenantTable, Option<RateSlot>)> {
    let name = names.tenants.resolve(tenant);
    let (plan, _) = plans.for_tenant(&name)?;
    let limits: Vec<(MeterId, Kind, Arc<Limit>)> = plans
        .limits_for(&name)
        .into_iter()
        .filter_map(|limit| {
            meters
                .by_slug(&limit.meter)
                .map(|meter| (meter.id, limit.kind, intern(limit)))
        })
        .collect();
    if limits.is_empty() {
        return None;
    }
    let mut rates = limits
        .iter()
        .filter(|(_, kind, _)| *kind == Kind::Rate)
        .map(|(meter, _, limit)| {
            let spec = limit.rate.expect("invariant: rate limits have a spec");
            let before = previous.rate(*meter);
            RateSlot {
                meter: *meter,
                limit: limit.clone(),
                tat: AtomicI128::new(
                    before
                        .map_or_else(Gcra::default, |slot| slot.state().rescale(&slot.spec(), &spec))
                        .to_raw(),
                ),
                refusing: AtomicU32::new(before.map_or(0, |slot| slot.refusing.load(Ordering::Relaxed))),
            }
        });
    let first = rates.next();
    let more_rates = rates.collect();
    let table = TenantTable {
        has_quotas: limits.iter().any(|(_, kind, _)| *kind == Kind::Quota),
        period: plans.period_of(&name, plan),
        zone: plans.timezone(&name),
        name,
        limits,
        last_period: AtomicU64::new(0),
        more_rates,
        generation: 0,
    };
    Some((table, first))
}

/// A rate limit's standing at `now_ns` (with `decision` when one was just made).
fn rate_standing(
    limit: Limit,
    gcra: &Gcra,
    now_ns: i128,
    now_ms: i64,
    decision: Option<RateDecision>,
) -> Standing {
    let spec = limit.rate.expect("invariant: rate limits have a spec");
    let (remaining, reset_ns) = match decision {
        Some(decision) => (decision.remaining, decision.reset_ns),
        None => gcra.peek(now_ns, &spec),
    };
    let refusing = decision.is_some_and(|decision| !decision.allowed);
    let resets_at_ms = now_ms + (reset_ns / 1_000_000) as i64;
    let retry_at_ms = decision
        .filter(|decision| !decision.allowed)
        .and_then(|decision| decision.retry_after_ns)
        .map(|ns| now_ms + ((ns + 999_999) / 1_000_000) as i64);
    Standing {
        retry_at_ms,
        used: spec.burst - remaining.max(0),
        remaining: remaining.max(0),
        state: if refusing || remaining <= 0 {
            State::Exceeded
        } else {
            State::Ok
        },
        period: (now_ms.div_euclid(1000), resets_at_ms.div_euclid(1000)),
        resets_at_ms,
        limit,
    }
}

/// Why a batch could not be decided.
#[derive(Debug)]
pub enum LimitError {
    /// A rate limit refuses the request as a whole.
    Rate(Box<RateRefusal>),
    /// A quota's period total could not be read.
    Load(String),
}

/// A tracked quota period's standing (its `used`: applied, and admitted by requests in flight).
fn quota_standing(
    quotas: &HashMap<QuotaKey, QuotaEntry>,
    key: &QuotaKey,
    table: &TenantTable,
) -> Option<(Arc<str>, Standing)> {
    let limit = table.limit(key.meter, Kind::Quota)?;
    Some((table.name.clone(), entry_standing(quotas.get(key)?, key, limit)))
}

/// A tracked quota period's standing under `limit`.
fn entry_standing(entry: &QuotaEntry, key: &QuotaKey, limit: &Limit) -> Standing {
    Standing {
        used: entry.taken,
        remaining: (limit.limit - entry.taken).max(0),
        state: limit::quota_state(entry.taken, limit),
        period: (key.period_start, entry.period_end),
        resets_at_ms: entry.period_end * 1000,
        retry_at_ms: None,
        limit: limit.clone(),
    }
}

/// A tracked period's `taken` moved from `before`: signals the state or the thresholds this
/// crossed under the quota it decides by (once per period and decision or batch). `name`:
/// the tenant's, read only for a signal.
fn signal_moved(
    limits: &Limits,
    entry: &QuotaEntry,
    key: &QuotaKey,
    before: i128,
    name: impl FnOnce() -> Option<Arc<str>>,
) {
    let (limit, after) = (&entry.limit, entry.taken);
    let crossed = limit::crossed(before, after, limit);
    if !crossed.is_empty() || limit::quota_state(before, limit) != limit::quota_state(after, limit) {
        if let Some(name) = name() {
            limits.signal(name, entry_standing(entry, key, limit), crossed);
        }
    }
}

impl Gate<'_> {
    /// `decide_whole` from the gate's own maps, when they know everything the request
    /// touches: each tenant's table from the plans in force (`Inner::known`) and each quota
    /// period tracked, with room for the request's units. No shared map is read and no
    /// reference count moves: every request thread reads the same tables, and each such write
    /// would move a cache line between cores. `false`: nothing decided nor held.
    fn decide_known<U: Contributes>(
        &mut self,
        request: u64,
        units: &[U],
        fresh: &[bool],
        verdict: &mut Verdict,
        counts: &mut Counts,
    ) -> bool {
        let limits = self.limits;
        let generation = limits.generation.load(Ordering::Acquire);
        let clock_ns = self.inner.clock_ns;
        let Inner { quotas, known, .. } = &mut *self.inner;
        // The request's units per period. Sized for a period per unit (a batch of many
        // tenants): never rehashed.
        let mut totals: HashMap<QuotaKey, i128> =
            HashMap::with_capacity_and_hasher(units.len().min(4096), Default::default());
        let (mut limited_units, mut usable) = (0u64, true);
        for (unit, _) in units.iter().zip(fresh).filter(|(_, fresh)| **fresh) {
            let mut limited = false;
            unit.contributions(&mut |key, units| {
                let tenant = match known.get(&key.tenant) {
                    Some(tenant) if usable && tenant.generation == generation => tenant,
                    _ => {
                        usable = false;
                        return;
                    }
                };
                let Some(table) = tenant.quota_table(key.meter) else {
                    return;
                };
                let quota_key = QuotaKey {
                    tenant: key.tenant,
                    meter: key.meter,
                    period_start: tenant.period_start(table, key.window_start),
                };
                let total = totals.entry(quota_key).or_insert(0);
                *total = total.saturating_add(units);
                // A negative unit: prefixes may not fit where the whole does.
                usable &= units >= 0;
                limited = true;
            });
            if !usable {
                return false;
            }
            limited_units += u64::from(limited);
        }
        let fits = |(key, units): (&QuotaKey, &i128)| {
            quotas.get(key).is_some_and(|entry| {
                entry.generation == generation && entry.taken.saturating_add(*units) <= entry.limit.limit
            })
        };
        if !totals.iter().all(fits) {
            return false;
        }
        verdict.holds.quotas.reserve(totals.len());
        for (key, units) in totals {
            let entry = quotas.get_mut(&key).expect("invariant: checked above");
            let before = entry.take(units, request, clock_ns);
            signal_moved(limits, entry, &key, before, || {
                known
                    .get(&key.tenant)
                    .and_then(|tenant| tenant.table.as_ref())
                    .map(|table| table.name.clone())
            });
            verdict.holds.quotas.push(Hold { key, units, request });
        }
        counts.0[Kind::Quota as usize][0] += limited_units;
        true
    }

    /// The request at once, when that decides exactly what unit-by-unit would: every quota
    /// period it touches has room for all of its units (`taken + total ≤ limit`) and no
    /// unit is negative, so every prefix fits too, every unit is admitted and none warns. One
    /// hold per period; `false` (nothing held) when the units must be decided one by one.
    #[allow(clippy::too_many_arguments)]
    fn decide_whole<U: Contributes>(
        &mut self,
        request: u64,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        units: &[U],
        fresh: &[bool],
        load: Load<'_>,
        tables: &mut BatchTables,
        verdict: &mut Verdict,
        counts: &mut Counts,
    ) -> Result<bool, LimitError> {
        let limits = self.limits;
        // Per period: (the request's units, the limit); the table is the batch's (no
        // reference count moved per period: tables are shared by every thread).
        let mut totals: HashMap<QuotaKey, (i128, i128)> = HashMap::default();
        let (mut limited_units, mut negative) = (0u64, false);
        for (unit, _) in units.iter().zip(fresh).filter(|(_, fresh)| **fresh) {
            let mut limited = false;
            unit.contributions(&mut |key, units| {
                let Some(table) = tables.get(key.tenant, || limits.table_at(key.tenant, names, meters))
                else {
                    return;
                };
                let Some(limit) = table.limit(key.meter, Kind::Quota).map(|limit| limit.limit) else {
                    return;
                };
                let (period_start, _) = table.period_of(key.window_start);
                let quota_key = QuotaKey {
                    tenant: key.tenant,
                    meter: key.meter,
                    period_start,
                };
                let total = totals.entry(quota_key).or_insert((0, limit));
                total.0 = total.0.saturating_add(units);
                negative |= units < 0;
                limited = true;
            });
            limited_units += u64::from(limited);
        }
        if negative {
            return Ok(false);
        }
        self.track(
            totals.keys().map(|key| {
                let table = tables
                    .table(key.tenant)
                    .expect("invariant: a period's tenant has a table");
                (*key, table)
            }),
            meters,
            load,
        )?;
        // Every period tracked and the lock not let go since: checked and taken at once.
        let fits = |(key, (units, limit)): (&QuotaKey, &(i128, i128))| {
            self.inner
                .quotas
                .get(key)
                .is_some_and(|entry| entry.taken.saturating_add(*units) <= *limit)
        };
        if !totals.iter().all(fits) {
            return Ok(false);
        }
        let (limits, clock_ns) = (self.limits, self.inner.clock_ns);
        for (key, (units, _)) in totals {
            let entry = self.inner.quotas.get_mut(&key).expect("invariant: checked above");
            let table = tables
                .table(key.tenant)
                .expect("invariant: a period's tenant has a table");
            entry.follow(&key, table);
            let before = entry.take(units, request, clock_ns);
            signal_moved(limits, entry, &key, before, || Some(table.name.clone()));
            verdict.holds.quotas.push(Hold { key, units, request });
        }
        counts.0[Kind::Quota as usize][0] += limited_units;
        Ok(true)
    }

    /// Tracks every period of `keys` (reading the totals of those not tracked yet), and
    /// returns with all of them tracked and the gate's lock not let go since the last was
    /// checked: a read lets it go, and meanwhile a rebalance may forget a period tracked
    /// before (`Limits::forget_quotas`).
    fn track<'t>(
        &mut self,
        keys: impl Iterator<Item = (QuotaKey, &'t Arc<TenantTable>)> + Clone,
        meters: &crate::meter::Meters,
        load: Load<'_>,
    ) -> Result<(), LimitError> {
        loop {
            let mut read = false;
            for (key, table) in keys.clone() {
                if !self.inner.quotas.contains_key(&key) {
                    self.entry(key, table, meters, load)?;
                    read = true;
                }
            }
            if !read {
                return Ok(());
            }
        }
    }

    /// Each fresh unit against its quotas, in order (the rate limits allowed the request):
    /// the decision is numbered and in flight from its first hold until it is applied or
    /// released; one that fails gives back what it held.
    #[allow(clippy::too_many_arguments)]
    fn decide_quotas<U: Contributes>(
        &mut self,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        units: &[U],
        fresh: &[bool],
        load: Load<'_>,
        verdict: &mut Verdict,
        counts: &mut Counts,
    ) -> Result<(), LimitError> {
        let request = self.inner.next_request;
        self.inner.next_request += 1;
        // In flight before its first hold: a period it takes from is kept whatever happens
        // while a read lets the lock go.
        self.inner.in_flight.insert(request);
        let decided = self.decide_numbered(request, names, meters, units, fresh, load, verdict, counts);
        if decided.is_err() {
            let holds = std::mem::take(&mut verdict.holds.quotas);
            self.inner.give_back(self.limits, &holds);
        }
        if verdict.holds.quotas.is_empty() {
            self.inner.in_flight.remove(&request);
        }
        decided
    }

    /// `decide_quotas` for decision `request`: from the gate's own maps, else at once, else
    /// unit by unit.
    #[allow(clippy::too_many_arguments)]
    fn decide_numbered<U: Contributes>(
        &mut self,
        request: u64,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        units: &[U],
        fresh: &[bool],
        load: Load<'_>,
        verdict: &mut Verdict,
        counts: &mut Counts,
    ) -> Result<(), LimitError> {
        if self.decide_known(request, units, fresh, verdict, counts) {
            return Ok(());
        }
        let limits = self.limits;
        let mut tables = BatchTables::default();
        if self.decide_whole(
            request,
            names,
            meters,
            units,
            fresh,
            load,
            &mut tables,
            verdict,
            counts,
        )? {
            self.follow(&tables);
            return Ok(());
        }
        // Where each quota period's hold is in `verdict.holds.quotas` (one hold per period).
        let mut held_at: HashMap<QuotaKey, usize> = HashMap::default();
        let mut wants: SmallVec<[(Want, Arc<TenantTable>); 2]> = SmallVec::new();
        for (index, unit) in units.iter().enumerate() {
            if !fresh[index] {
                continue;
            }
            wants.clear();
            unit.contributions(&mut |key, units| {
                let Some(table) = tables.get(key.tenant, || limits.table_at(key.tenant, names, meters))
                else {
                    return;
                };
                let Some((mode, limit, scale)) = table
                    .limit(key.meter, Kind::Quota)
                    .map(|limit| (limit.mode, limit.limit, limit.scale))
                else {
                    return;
                };
                let (period_start, _) = table.period_of(key.window_start);
                let quota_key = QuotaKey {
                    tenant: key.tenant,
                    meter: key.meter,
                    period_start,
                };
                match wants.iter_mut().find(|(want, _)| want.0 == quota_key) {
                    Some((want, _)) => want.1 = want.1.saturating_add(units),
                    None => wants.push(((quota_key, units, mode, limit, scale), table.clone())),
                }
            });
            if wants.is_empty() {
                continue;
            }
            self.track(wants.iter().map(|(want, table)| (want.0, table)), meters, load)?;
            let mut over: Option<String> = None;
            for ((key, units, mode, limit, scale), table) in &wants {
                let entry = self.inner.quotas.get(key).expect("invariant: tracked above");
                let taken = entry.taken;
                if *mode == Mode::Hard && taken.saturating_add(*units) > *limit {
                    let format = |units: i128| crate::model::format_decimal(units, *scale);
                    over = Some(format!(
                        "tenant `{}` is over its quota of `{}`: {} of {} used this period, the event needs {}; \
                         the quota resets at {}",
                        table.name,
                        meters.by_id(key.meter).map_or("?", |meter| meter.slug.as_str()),
                        format(taken),
                        format(*limit),
                        format(*units),
                        crate::model::rfc3339(entry.period_end),
                    ));
                    break;
                }
            }
            match over {
                Some(message) => {
                    verdict.refused.push((index, message));
                    counts.add(Kind::Quota, "refused");
                }
                None => {
                    let mut warned = false;
                    let clock_ns = self.inner.clock_ns;
                    for ((key, units, _, limit, _), table) in &wants {
                        let entry = self.inner.quotas.get_mut(key).expect("invariant: tracked above");
                        entry.follow(key, table);
                        let before = entry.take(*units, request, clock_ns);
                        warned |= entry.taken > *limit;
                        signal_moved(limits, entry, key, before, || Some(table.name.clone()));
                        match held_at.get(key) {
                            Some(&at) => {
                                let hold = &mut verdict.holds.quotas[at];
                                hold.units = hold.units.saturating_add(*units);
                            }
                            None => {
                                held_at.insert(*key, verdict.holds.quotas.len());
                                verdict.holds.quotas.push(Hold {
                                    key: *key,
                                    units: *units,
                                    request,
                                });
                            }
                        }
                    }
                    counts.add(Kind::Quota, if warned { "warned" } else { "allowed" });
                }
            }
        }
        self.follow(&tables);
        Ok(())
    }

    /// Tracked tenants follow the newest tables a decision met (a reload rebuilt them), and
    /// the gate knows them all (`decide_known`).
    fn follow(&mut self, tables: &BatchTables) {
        for (tenant, (generation, table)) in &tables.0 {
            if let (Some(table), Some(tracked)) = (table, self.inner.tenants.get_mut(tenant)) {
                if !Arc::ptr_eq(table, tracked) {
                    *tracked = table.clone();
                }
            }
            self.inner
                .known
                .insert(*tenant, Known::new(*generation, table.clone()));
        }
    }

    fn quota_standing(&self, key: &QuotaKey, table: &TenantTable) -> Option<(Arc<str>, Standing)> {
        quota_standing(&self.inner.quotas, key, table)
    }

    /// The tracked quota period, read from the store and engine the first time.
    fn entry(
        &mut self,
        key: QuotaKey,
        table: &Arc<TenantTable>,
        meters: &crate::meter::Meters,
        load: Load<'_>,
    ) -> Result<&mut QuotaEntry, LimitError> {
        if !self.inner.quotas.contains_key(&key) {
            let limits = self.limits;
            let touched = self.inner.clock_ns;
            // Read without the gate's lock (decisions go on meanwhile) but with no batch
            // between its `applied` and its engine apply: the total read here and what
            // `applied` adds from now on neither overlap nor leave a gap.
            MutexGuard::unlocked(&mut self.inner, || {
                let _exclusive = limits.applying.write();
                let meter = meters
                    .by_id(key.meter)
                    .map(|meter| meter.slug.clone())
                    .unwrap_or_default();
                let period_end = table.period_of(key.period_start).1;
                let limit = table.limit(key.meter, Kind::Quota).cloned().ok_or_else(|| {
                    LimitError::Load(format!("`{meter}` has no quota for `{}`", table.name))
                })?;
                let used =
                    load(&table.name, &meter, key.period_start, period_end).map_err(LimitError::Load)?;
                let mut inner = limits.inner.lock();
                if inner.quotas.contains_key(&key) {
                    // Another decision tracked it meanwhile (under the same exclusion).
                    return Ok(());
                }
                inner.tenants.insert(key.tenant, table.clone());
                inner.quotas.insert(
                    key,
                    QuotaEntry {
                        period_end,
                        taken: used,
                        last_request: 0,
                        touched,
                        limit,
                        generation: table.generation,
                    },
                );
                // A period first tracked (a new period, or after a restart): its state, once.
                if let Some((name, standing)) = quota_standing(&inner.quotas, &key, table) {
                    limits.signal(name, standing, Vec::new());
                }
                Ok(())
            })?;
        }
        let touched = self.inner.clock_ns;
        let entry = self
            .inner
            .quotas
            .get_mut(&key)
            .expect("invariant: inserted above");
        entry.touched = touched;
        Ok(entry)
    }

    /// A batch is being applied to the engine (the applier holds `Limits::applying` from
    /// before this call until its engine apply is done): its request's decision is over.
    ///
    /// `held_whole`: the holds are the batch's whole additive usage of tracked periods (no
    /// cumulative point derived a delta at commit): every unit met `decide`, which took it
    /// into its periods' `taken` already, so nothing moves — unless the plans were reloaded
    /// lately, which may have given quotas to units decided without. Otherwise the holds are
    /// given back and the batch's additive states taken instead (each period signalled once
    /// if that crosses anything).
    pub fn applied(&mut self, batch: &PreAggregated, holds: &[Hold], held_whole: bool) {
        if held_whole && self.limits.holds_cover_batches() {
            self.inner.finish(holds);
            return;
        }
        let limits = self.limits;
        let Inner { quotas, tenants, .. } = &mut *self.inner;
        // Each period moved, with its `taken` before this batch.
        let mut before: HashMap<QuotaKey, i128> = HashMap::default();
        for hold in holds {
            if let Some(entry) = quotas.get_mut(&hold.key) {
                before.entry(hold.key).or_insert(entry.taken);
                entry.taken = entry.taken.saturating_sub(hold.units);
            }
        }
        let mut tables = BatchTables::default();
        for (key, state) in &batch.series {
            if quotas.is_empty() {
                break;
            }
            let Some(units) = additive(state) else { continue };
            let Some(table) = tables.get(key.tenant, || (0, tenants.get(&key.tenant).cloned())) else {
                continue;
            };
            if table.limit(key.meter, Kind::Quota).is_none() {
                continue;
            }
            let quota_key = QuotaKey {
                tenant: key.tenant,
                meter: key.meter,
                period_start: table.period_of(key.window_start).0,
            };
            let Some(entry) = quotas.get_mut(&quota_key) else {
                continue;
            };
            before.entry(quota_key).or_insert(entry.taken);
            entry.taken = entry.taken.saturating_add(units);
        }
        for (key, before) in before {
            if let Some(entry) = quotas.get(&key) {
                signal_moved(limits, entry, &key, before, || {
                    tenants.get(&key.tenant).map(|table| table.name.clone())
                });
            }
        }
        self.inner.finish(holds);
    }
}

/// Cluster mode: the limits the signal topic says are used up. Partition owners decide (their
/// Kafka folders refuse what would go over a hard quota, exactly, and charge every event to
/// its rate limits, signalling when a tenant goes over); an edge refuses what they would
/// refuse anyway before forwarding it, from the owners' latest published states
/// (`cluster::limits` reads the topic): events of an exhausted hard quota's period until it
/// resets, and whole requests of a tenant over its rate until its excess has drained (the
/// record's `retry_at`). Stale at worst by the topic's delay: an edge may still forward what
/// the owner then refuses or charges, and never refuses what the owner would accept but for
/// a limit raised since (a reload re-publishes nothing until the next change).
pub struct Replicated {
    exhausted: RwLock<HashMap<(String, String), Exhausted>>,
    /// Rate limits over: (tenant, meter) → unix ms the excess has drained at.
    throttled: RwLock<HashMap<(String, String), i64>>,
    /// (tenant, meter) whose published state changed here: open RLQS streams re-assign
    /// their buckets at once instead of at Envoy's next report.
    changes: tokio::sync::broadcast::Sender<(String, String)>,
}

impl Default for Replicated {
    fn default() -> Replicated {
        Replicated {
            exhausted: RwLock::default(),
            throttled: RwLock::default(),
            changes: tokio::sync::broadcast::channel(SIGNAL_BACKLOG).0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Exhausted {
    /// The billing period (unix seconds) whose quota is used up.
    period: (i64, i64),
    resets_at_ms: i64,
}

impl Replicated {
    /// One signal-topic value (`emit::signals::record`): a hard quota `exceeded` is remembered
    /// until its period resets, a rate limit `exceeded` until its `retry_at`; any other state
    /// of the limit forgets it.
    pub fn apply(&self, value: &[u8]) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Record {
            tenant: String,
            meter: String,
            kind: String,
            mode: String,
            state: String,
            period_start: String,
            period_end: String,
            resets_at: String,
            #[serde(default)]
            retry_at: Option<String>,
        }
        let record: Record = serde_json::from_slice(value).map_err(|error| error.to_string())?;
        let time = |text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| time.timestamp_millis())
                .map_err(|error| format!("`{text}`: {error}"))
        };
        let key = (record.tenant, record.meter);
        let changed = key.clone();
        let exceeded = record.state == State::Exceeded.as_str();
        // Limits that have reset hold nothing: forgotten whenever a limit is used up, so the
        // maps stay as large as the tenants over their limits now (no later state need come).
        let now_ms = crate::model::now_ms();
        let differs = if record.kind == Kind::Rate.as_str() {
            let mut throttled = self.throttled.write();
            if exceeded {
                let until = time(record.retry_at.as_deref().unwrap_or(&record.resets_at))?;
                throttled.retain(|_, until| *until > now_ms);
                throttled.insert(key, until) != Some(until)
            } else {
                throttled.remove(&key).is_some()
            }
        } else if record.kind != Kind::Quota.as_str() {
            false
        } else if record.mode == Mode::Hard.as_str() && exceeded {
            let exhausted = Exhausted {
                period: (
                    time(&record.period_start)?.div_euclid(1000),
                    time(&record.period_end)?.div_euclid(1000),
                ),
                resets_at_ms: time(&record.resets_at)?,
            };
            let mut states = self.exhausted.write();
            states.retain(|_, state| state.resets_at_ms > now_ms);
            states.insert(key, exhausted) != Some(exhausted)
        } else {
            self.exhausted.write().remove(&key).is_some()
        };
        if differs {
            // Nobody listening: nothing to do.
            let _ = self.changes.send(changed);
        }
        Ok(())
    }

    /// The (tenant, meter) pairs whose published state changes from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(String, String)> {
        self.changes.subscribe()
    }

    pub fn is_empty(&self) -> bool {
        self.exhausted.read().is_empty() && self.throttled.read().is_empty()
    }

    /// When the tenant's hard quota of `meter` is exhausted for an event at `event_secs`: the
    /// unix ms it resets at.
    pub fn exhausted(&self, tenant: &str, meter: &str, event_secs: i64, now_ms: i64) -> Option<i64> {
        let states = self.exhausted.read();
        let state = states.get(&(tenant.to_string(), meter.to_string()))?;
        let (start, end) = state.period;
        (start <= event_secs && event_secs < end && now_ms < state.resets_at_ms).then_some(state.resets_at_ms)
    }

    /// When the tenant is over its rate limit of `meter`: the unix ms its excess has drained at.
    pub fn throttled(&self, tenant: &str, meter: &str, now_ms: i64) -> Option<i64> {
        let throttled = self.throttled.read();
        let until = *throttled.get(&(tenant.to_string(), meter.to_string()))?;
        (now_ms < until).then_some(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Names;
    use proptest::prelude::*;

    const CONFIG: &str = r#"
[[meters]]
slug = "tokens"
event_type = "llm.prompt"
aggregation = "SUM"
value_property = "$.tokens"
scale = 0

[[plans]]
id = "free"
currency = "USD"
[[plans.limits]]
meter = "tokens"
kind = "quota"
limit = "100"

[[tenants]]
id = "acme"
plan = "free"
"#;

    struct Unit(SeriesKey, i128);

    impl Contributes for Unit {
        fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128)) {
            each(self.0, self.1);
        }
    }

    struct Fixture {
        names: Names,
        meters: crate::meter::Meters,
        limits: Limits,
        key: SeriesKey,
    }

    fn fixture() -> Fixture {
        let config = Config::load(CONFIG, &Default::default()).unwrap();
        let names = Names::default();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let limits = Limits::new();
        limits.set_plans(&Arc::new(config.plans));
        let key = SeriesKey {
            meter: meters.by_slug("tokens").unwrap().id,
            tenant: names.tenants.intern("acme"),
            dims: 0,
            window_start: crate::model::now_ms().div_euclid(1000),
        };
        Fixture {
            names,
            meters,
            limits,
            key,
        }
    }

    /// Decides one unit of `units` of the fixture's key, reading a period's total with `load`.
    fn decide_one(fixture: &Fixture, units: i128, load: Load<'_>) -> Result<Verdict, LimitError> {
        fixture.limits.decide(
            &fixture.names,
            &fixture.meters,
            &[Unit(fixture.key, units)],
            &[true],
            Rates::Enforce,
            load,
        )
    }

    /// Applies `units` as the commit stage would: the batch's deltas and its holds, under the
    /// lock (`held_whole`: from the holds alone, as a batch without cumulative points is).
    fn apply_as(fixture: &Fixture, units: &[(i128, bool)], holds: &[Hold], held_whole: bool) {
        let mut batch = PreAggregated::default();
        for &(units, admitted) in units {
            if admitted {
                batch
                    .merge_state(fixture.key, &AggState::Sum(units.into()))
                    .unwrap();
            }
        }
        fixture.limits.lock().applied(&batch, holds, held_whole);
    }

    fn apply(fixture: &Fixture, units: &[(i128, bool)], holds: &[Hold]) {
        apply_as(fixture, units, holds, false);
    }

    fn used(fixture: &Fixture, base: i128) -> i128 {
        let load = move |_: &str, _: &str, _: i64, _: i64| Ok(base);
        let standing = fixture
            .limits
            .standing(
                "acme",
                &fixture.names,
                &fixture.meters,
                fixture.key.window_start,
                &load,
            )
            .unwrap();
        standing[0].used
    }

    proptest! {
        /// A request's demand is the same whether found by scan or by map: each (tenant,
        /// meter) once, in the order first met, with its sum and earliest log time.
        #[test]
        fn demands_sum_per_tenant_and_meter_however_many(
            adds in prop::collection::vec((0u32..40, 0u32..2, -5i128..100, prop::option::of(0i64..1000)), 0..300),
        ) {
            let mut demands = Demands::default();
            let mut expected: Vec<Demand> = Vec::new();
            for &(tenant, meter, units, logged) in &adds {
                demands.add((tenant, meter), units, logged);
                match expected.iter_mut().find(|(id, _, _)| *id == (tenant, meter)) {
                    Some((_, total, at)) => {
                        *total += units;
                        *at = match (*at, logged) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (known, None) | (None, known) => known,
                        };
                    }
                    None => expected.push(((tenant, meter), units, logged)),
                }
            }
            prop_assert_eq!(demands.list.to_vec(), expected);
        }

        /// A packed period is the period; one that does not fit is not packed.
        #[test]
        fn a_period_packs_into_one_word(start in -10i64..(1 << 33), length in 0i64..(1 << 33)) {
            let period = (start, start + length);
            match pack_period(period) {
                Some(packed) => {
                    prop_assert!(packed != 0);
                    prop_assert_eq!(unpack_period(packed), period);
                }
                None => prop_assert!(
                    u32::try_from(start).is_err() || u32::try_from(length).is_err() || length == 0
                ),
            }
            let (from, to) = unpack_period(0);
            prop_assert!(from >= to, "nothing cached contains no time");
        }

        /// Requests decided in one order, applied (or failed) in another: the units admitted
        /// and applied never exceed the limit, a unit is refused only when it did not fit
        /// beside what was used and held at its decision, and `used` ends as the base plus
        /// exactly what was applied — whether batches are applied by reading them or from
        /// their holds (`held_whole`), and whatever rebalances forget meanwhile (the store
        /// then holds the base and what was applied; requests in flight are not in it).
        #[test]
        fn admitted_units_never_exceed_a_hard_quota_whatever_the_interleaving(
            held_whole in any::<bool>(),
            base in 0i128..120,
            requests in prop::collection::vec(
                (prop::collection::vec(1i128..40, 1..5), any::<bool>(), any::<u8>(), any::<u8>()),
                1..40,
            ),
        ) {
            let fixture = fixture();
            let store = std::rc::Rc::new(std::cell::Cell::new(base));
            let stored = store.clone();
            let load = move |_: &str, _: &str, _: i64, _: i64| Ok(stored.get());
            // Per request in flight: its (units, admitted), its holds, whether it will fail.
            type InFlight = (Vec<(i128, bool)>, Vec<Hold>, bool);
            let mut in_flight: Vec<InFlight> = Vec::new();
            let (mut applied, mut held) = (0i128, 0i128);
            for (sizes, fails, order, forget) in requests {
                let units: Vec<Unit> = sizes.iter().map(|&n| Unit(fixture.key, n)).collect();
                let fresh = vec![true; units.len()];
                let verdict = fixture
                    .limits
                    .decide(&fixture.names, &fixture.meters, &units, &fresh, Rates::Enforce, &load)
                    .unwrap();
                let mut decided = Vec::new();
                for (index, &n) in sizes.iter().enumerate() {
                    let refused = verdict.refused.iter().any(|(i, _)| *i == index);
                    let fits = base + applied + held + n <= 100;
                    prop_assert_eq!(!refused, fits, "unit of {} beside {} used, {} held", n, base + applied, held);
                    if fits {
                        held += n;
                    }
                    decided.push((n, fits));
                }
                in_flight.push((decided, verdict.holds.quotas, fails));
                // Apply (or fail) one of the requests in flight, in an arbitrary order.
                if order % 2 == 0 {
                    let (decided, holds, fails) = in_flight.remove(order as usize % in_flight.len());
                    let units: i128 = decided.iter().filter(|(_, ok)| *ok).map(|(n, _)| n).sum();
                    held -= units;
                    if fails {
                        fixture.limits.release_quotas(&holds);
                    } else {
                        apply_as(&fixture, &decided, &holds, held_whole);
                        applied += units;
                        store.set(base + applied);
                    }
                }
                if forget % 4 == 0 {
                    fixture.limits.forget_quotas();
                }
            }
            for (decided, holds, _) in in_flight {
                held -= decided.iter().filter(|(_, ok)| *ok).map(|(n, _)| n).sum::<i128>();
                apply_as(&fixture, &decided, &holds, held_whole);
                applied += decided.iter().filter(|(_, ok)| *ok).map(|(n, _)| n).sum::<i128>();
            }
            prop_assert_eq!(held, 0);
            prop_assert!(applied <= (100 - base).max(0));
            // Tracked still (no forget since the last decision took from it) or read again.
            prop_assert_eq!(used(&fixture, base + applied), base + applied);
        }

        /// Replaying the same requests from the same stored total makes the same decisions:
        /// a gate's decisions depend on nothing but the total it read and the order of units
        /// (a restart reads the total back and the log replays only what was admitted).
        #[test]
        fn the_same_total_and_order_give_the_same_decisions(
            base in 0i128..100,
            sizes in prop::collection::vec(1i128..30, 1..30),
        ) {
            let decide_all = || {
                let fixture = fixture();
                let load = move |_: &str, _: &str, _: i64, _: i64| Ok(base);
                sizes
                    .iter()
                    .map(|&n| {
                        let verdict = decide_one(&fixture, n, &load).unwrap();
                        apply(&fixture, &[(n, verdict.refused.is_empty())], &verdict.holds.quotas);
                        verdict.refused.is_empty()
                    })
                    .collect::<Vec<bool>>()
            };
            prop_assert_eq!(decide_all(), decide_all());
        }
    }

    const RATES: &str = r#"
[[meters]]
slug = "api_calls"
event_type = "api.request"
aggregation = "COUNT"

[[plans]]
id = "metered"
currency = "USD"
[[plans.limits]]
meter = "api_calls"
kind = "rate"
limit = 100
per = "hour"

[rating]
default_plan = "metered"
"#;

    fn rate_fixture() -> (Names, crate::meter::Meters, Limits, Arc<Plans>) {
        let config = Config::load(RATES, &Default::default()).unwrap();
        let names = Names::default();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let limits = Limits::new();
        let plans = Arc::new(config.plans);
        limits.set_plans(&plans);
        (names, meters, limits, plans)
    }

    fn call(names: &Names, meters: &crate::meter::Meters, tenant: &str) -> Unit {
        Unit(
            SeriesKey {
                meter: meters.by_slug("api_calls").unwrap().id,
                tenant: names.tenants.intern(tenant),
                dims: 0,
                window_start: 0,
            },
            1,
        )
    }

    /// Threads deciding at once for one tenant (100 an hour, burst 100: one unit comes back
    /// every 36 s, longer than the test) are allowed exactly the burst between them: the CAS
    /// on the key's state loses no take and grants none twice.
    #[test]
    fn concurrent_decisions_allow_exactly_the_burst() {
        let (names, meters, limits, _) = rate_fixture();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let allowed = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        let unit = call(&names, &meters, "acme");
                        if limits
                            .decide(&names, &meters, &[unit], &[true], Rates::Enforce, &load)
                            .is_ok()
                        {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(allowed.load(Ordering::Relaxed), 100);
        // Refusals carry the exact wait: one unit every 36 s.
        let unit = call(&names, &meters, "acme");
        let Err(LimitError::Rate(refusal)) =
            limits.decide(&names, &meters, &[unit], &[true], Rates::Enforce, &load)
        else {
            panic!("the 101st call is refused");
        };
        let explained = refusal.explain(&limits, &names, &meters);
        assert_eq!(&*explained.tenant, "acme");
        assert_eq!(explained.limit.meter, "api_calls");
        let wait = explained.decision.retry_after_ns.unwrap();
        assert!(wait > 35_000_000_000 && wait <= 36_000_000_000, "{wait}");
    }

    /// A request over two tenants' rate limits is all or nothing: when the second refuses,
    /// the first gives its units back. A plan reload keeps the keys' states (no fresh burst).
    #[test]
    fn a_refused_request_takes_nothing_and_a_reload_grants_no_fresh_burst() {
        let (names, meters, limits, plans) = rate_fixture();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let decide = |units: &[Unit]| {
            let fresh = vec![true; units.len()];
            limits
                .decide(&names, &meters, units, &fresh, Rates::Enforce, &load)
                .is_ok()
        };
        for _ in 0..100 {
            assert!(decide(&[call(&names, &meters, "globex")]));
        }
        for _ in 0..99 {
            assert!(decide(&[call(&names, &meters, "initech")]));
        }
        // initech's 100th would pass alone; beside globex's 101st the request is refused...
        assert!(!decide(&[
            call(&names, &meters, "initech"),
            call(&names, &meters, "globex")
        ]));
        // ...and took nothing from initech.
        assert!(decide(&[call(&names, &meters, "initech")]));
        assert!(!decide(&[call(&names, &meters, "initech")]));
        limits.set_plans(&plans);
        assert!(!decide(&[call(&names, &meters, "globex")]));
        assert!(!decide(&[call(&names, &meters, "initech")]));
        assert!(decide(&[call(&names, &meters, "hooli")]));
    }

    /// A request the rate allowed whole and a hard quota cut: its holds carry what its admitted
    /// units took from the rate (the refused ones gave theirs back at once), and releasing
    /// them (its commit failed) leaves the rate key whole: nothing is given back twice.
    #[test]
    fn a_released_request_gives_back_exactly_what_its_admitted_units_took_from_the_rate() {
        let config = format!(
            "{RATES}[[plans.limits]]\nmeter = \"api_calls\"\nkind = \"quota\"\nlimit = 3\nmode = \"hard\"\n"
        );
        let config = Config::load(&config, &Default::default()).unwrap();
        let names = Names::default();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let limits = Limits::new();
        limits.set_plans(&Arc::new(config.plans));
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let remaining = || {
            let standing = limits
                .standing("acme", &names, &meters, crate::model::now_ms() / 1000, &load)
                .unwrap();
            let rate = standing.iter().find(|s| s.limit.kind == Kind::Rate).unwrap();
            rate.remaining
        };
        let units: Vec<Unit> = (0..5).map(|_| call(&names, &meters, "acme")).collect();
        let verdict = limits
            .decide(&names, &meters, &units, &[true; 5], Rates::Enforce, &load)
            .unwrap();
        assert_eq!(
            verdict.refused.iter().map(|(at, _)| *at).collect::<Vec<_>>(),
            [3, 4]
        );
        let api_calls = meters.by_slug("api_calls").unwrap().id;
        let acme = names.tenants.get("acme").unwrap();
        assert_eq!(verdict.holds.rates.as_slice(), [((acme, api_calls), 3)]);
        assert_eq!(remaining(), 97);
        limits.release(&verdict.holds);
        assert_eq!(remaining(), 100);
    }

    /// A unit a log received at `.1` (unix ms).
    struct Logged(Unit, i64);

    impl Contributes for Logged {
        fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128)) {
            self.0.contributions(each);
        }

        fn logged_ms(&self) -> Option<i64> {
            Some(self.1)
        }
    }

    /// A log's usage (`Rates::Charge`) is taken whatever the answer, each unit when its log
    /// received it: a backlog produced at the rate and drained at once is never over; usage
    /// past the rate is counted `warned`, signalled `exceeded` with when its excess drains,
    /// and push edges sharing the key are refused meanwhile; `ok` once drained.
    #[test]
    fn a_log_is_charged_at_its_own_times_and_signals_going_over_and_back() {
        let config = RATES.replace(
            "limit = 100\nper = \"hour\"",
            "limit = 1000\nper = \"second\"\nburst = 10",
        );
        let config = Config::load(&config, &Default::default()).unwrap();
        let names = Names::default();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let limits = Limits::new();
        limits.set_plans(&Arc::new(config.plans));
        let mut signals = limits.subscribe();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let charge = |units: &[Logged]| {
            let fresh = vec![true; units.len()];
            let verdict = limits
                .decide(&names, &meters, units, &fresh, Rates::Charge, &load)
                .expect("a log's usage is never refused for its rate");
            assert!(verdict.refused.is_empty());
        };
        // Two seconds of a producer at exactly 1000 a second, drained in one batch.
        let now = crate::model::now_ms();
        let backlog: Vec<Logged> = (0..2000)
            .map(|i| Logged(call(&names, &meters, "initech"), now - 2000 + i))
            .collect();
        charge(&backlog);
        assert!(signals.try_recv().is_err(), "a backlog at the rate is not over");
        // 30 at once against a burst of 10: over by 20 units, drained 20 ms on.
        let now = crate::model::now_ms();
        let calls: Vec<Logged> = (0..30)
            .map(|_| Logged(call(&names, &meters, "acme"), now))
            .collect();
        charge(&calls);
        let signal = signals.try_recv().expect("going over is signalled");
        assert_eq!(
            (&*signal.tenant, signal.standing.state),
            ("acme", State::Exceeded)
        );
        assert_eq!(signal.standing.limit.kind, Kind::Rate);
        let retry_at = signal.standing.retry_at_ms.expect("when the excess drains");
        assert!((now + 19..=now + 40).contains(&retry_at), "{retry_at} vs {now}");
        assert_eq!(
            limits.decisions.totals()[1],
            [1, 0, 1],
            "the backlog allowed, the burst warned"
        );
        // A push edge sharing the key is refused while the excess drains.
        assert!(matches!(
            limits.decide(
                &names,
                &meters,
                &[call(&names, &meters, "acme")],
                &[true],
                Rates::Enforce,
                &load
            ),
            Err(LimitError::Rate(_))
        ));
        std::thread::sleep(std::time::Duration::from_millis(40));
        charge(&[Logged(call(&names, &meters, "acme"), crate::model::now_ms())]);
        let signal = signals.try_recv().expect("coming back is signalled");
        assert_eq!(
            (signal.standing.state, signal.standing.retry_at_ms),
            (State::Ok, None)
        );
    }

    /// A tenant not interned since the start (its usage checkpointed before a restart, nothing
    /// replayed) stands where the store says, not at nothing, and is not interned by asking.
    #[test]
    fn a_tenant_not_seen_since_the_start_stands_where_the_store_says() {
        let config = format!("{CONFIG}\n[rating]\ndefault_plan = \"free\"\n");
        let config = Config::load(&config, &Default::default()).unwrap();
        let names = Names::default();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let limits = Limits::new();
        limits.set_plans(&Arc::new(config.plans));
        let load = |tenant: &str, meter: &str, _: i64, _: i64| {
            assert_eq!((tenant, meter), ("globex", "tokens"));
            Ok(42)
        };
        let now_secs = crate::model::now_ms().div_euclid(1000);
        let standing = limits
            .standing("globex", &names, &meters, now_secs, &load)
            .unwrap();
        assert_eq!((standing[0].used, standing[0].remaining), (42, 58));
        assert!(names.tenants.get("globex").is_none());
    }

    /// After a rebalance the store holds usage counted elsewhere meanwhile: a forgotten period
    /// is read again, so the hard quota holds with the other replica's usage in it.
    #[test]
    fn forgotten_quota_periods_are_read_again() {
        let fixture = fixture();
        let decide = |units: i128, base: i128| {
            let verdict = decide_one(&fixture, units, &move |_, _, _, _| Ok(base)).unwrap();
            (verdict.refused.is_empty(), verdict.holds.quotas)
        };
        // 50 used here; 30 tracked more...
        let (admitted, holds) = decide(30, 50);
        assert!(admitted);
        apply(&fixture, &[(30, true)], &holds);
        // ...then another replica counted 15 (the store says 95 after the restore): while the
        // period is tracked, 20 more would fit by the stale `used` (80)...
        assert_eq!(used(&fixture, 95), 80);
        fixture.limits.forget_quotas();
        // ...once forgotten, read again: 95, and 20 more go over the 100.
        assert_eq!(used(&fixture, 95), 95);
        let (admitted, _) = decide(20, 95);
        assert!(!admitted);
    }

    /// A known tenant's quota meters: by bit for ids under 64, from the table past that;
    /// a rate limit is no quota, and a tenant without limits has none.
    #[test]
    fn a_known_tenant_finds_its_quota_meters_whatever_their_ids() {
        let fixture = fixture();
        let built = fixture
            .limits
            .table(fixture.key.tenant, &fixture.names, &fixture.meters)
            .unwrap();
        let quota = built.limits[0].2.clone();
        let table = TenantTable {
            name: built.name.clone(),
            generation: 0,
            limits: vec![
                (3, Kind::Quota, quota.clone()),
                (63, Kind::Quota, quota.clone()),
                (64, Kind::Quota, quota.clone()),
                (200, Kind::Quota, quota.clone()),
                (5, Kind::Rate, quota),
            ],
            has_quotas: true,
            period: built.period,
            zone: built.zone,
            last_period: AtomicU64::new(0),
            more_rates: Vec::new(),
        };
        let known = Known::new(1, Some(Arc::new(table)));
        assert!(known.wide);
        for meter in [3, 63, 64, 200] {
            assert!(known.quota_table(meter).is_some(), "meter {meter}");
        }
        for meter in [0, 5, 62, 65, 199, u32::MAX] {
            assert!(known.quota_table(meter).is_none(), "meter {meter}");
        }
        assert!(Known::new(1, None).quota_table(3).is_none());
        // The period is the table's, cached in the bucket.
        let now = fixture.key.window_start;
        let start = known.period_start(known.table.as_deref().unwrap(), now);
        assert_eq!(start, built.period_of(now).0);
        assert_eq!(known.period.get(), built.period_of(now));
    }

    /// A reload that lowers or raises a tracked quota takes effect at the next request, also
    /// for tenants decided from the gate's own maps (`decide_known`).
    #[test]
    fn a_reloaded_quota_decides_the_next_request() {
        let fixture = fixture();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let decide = |units: i128| {
            let verdict = decide_one(&fixture, units, &load).unwrap();
            apply_as(
                &fixture,
                &[(units, verdict.refused.is_empty())],
                &verdict.holds.quotas,
                true,
            );
            verdict.refused.is_empty()
        };
        // Twice: the second request is decided from the gate's maps alone.
        assert!(decide(30));
        assert!(decide(30));
        let reload = |limit: &str| {
            let config = Config::load(
                &CONFIG.replace(r#"limit = "100""#, &format!("limit = \"{limit}\"")),
                &Default::default(),
            )
            .unwrap();
            fixture.limits.set_plans(&Arc::new(config.plans));
        };
        reload("50");
        assert!(!decide(1), "60 of a quota lowered to 50");
        assert!(!decide(1), "and again from the gate's maps");
        reload("200");
        assert!(decide(140));
        assert!(!decide(1));
        assert_eq!(used(&fixture, 0), 200);
    }

    /// A period a decision in flight took from is kept when a rebalance forgets the others
    /// (its units are in `taken`; a total read again would miss them until they are applied,
    /// which adds nothing), and forgotten once applied. A decision failing half-way (a period
    /// unreadable) gives back what it took.
    #[test]
    fn periods_in_flight_are_kept_and_a_failed_decision_gives_back() {
        let fixture = fixture();
        let decide = |units: &[Unit], load: Load<'_>| {
            let fresh = vec![true; units.len()];
            fixture.limits.decide(
                &fixture.names,
                &fixture.meters,
                units,
                &fresh,
                Rates::Enforce,
                load,
            )
        };
        let verdict = decide(&[Unit(fixture.key, 30)], &|_, _, _, _| Ok(50)).unwrap();
        fixture.limits.forget_quotas();
        // Still 80 though the store says 50: the 30 are on their way.
        assert_eq!(used(&fixture, 50), 80);
        apply_as(&fixture, &[(30, true)], &verdict.holds.quotas, true);
        assert_eq!(used(&fixture, 50), 80);
        fixture.limits.forget_quotas();
        assert_eq!(used(&fixture, 80), 80, "applied: read again from the store");
        // 5 into this period, -1 (so not decided whole), then 5 into the next month's, whose
        // total cannot be read: refused as a whole, and this period is back at 80.
        let next = SeriesKey {
            window_start: fixture.key.window_start + 40 * 86_400,
            ..fixture.key
        };
        let now = fixture.key.window_start;
        let failing = move |_: &str, _: &str, start: i64, _: i64| {
            if start > now {
                Err("disk unreadable".to_string())
            } else {
                Ok(80)
            }
        };
        let units = [Unit(fixture.key, 5), Unit(fixture.key, -1), Unit(next, 5)];
        assert!(matches!(decide(&units, &failing), Err(LimitError::Load(_))));
        assert_eq!(used(&fixture, 0), 80);
        // Nothing in flight: everything can be forgotten.
        fixture.limits.forget_quotas();
        assert!(fixture.limits.inner.lock().quotas.is_empty());
    }

    /// A log keeps charging a key that is over: the published wait must keep up (edges hold
    /// the tenant by it), without a signal for every batch: again when it grew by an eighth.
    #[test]
    fn a_growing_excess_is_published_again_when_it_grew_by_an_eighth() {
        let (names, meters, limits, _) = rate_fixture();
        let mut signals = limits.subscribe();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let mut charge = |n: usize| {
            let now = crate::model::now_ms();
            let units: Vec<Logged> = (0..n)
                .map(|_| Logged(call(&names, &meters, "acme"), now))
                .collect();
            limits
                .decide(&names, &meters, &units, &vec![true; n], Rates::Charge, &load)
                .unwrap();
            signals.try_recv().ok().map(|signal| {
                assert_eq!(signal.standing.state, State::Exceeded);
                (signal.standing.retry_at_ms.unwrap() - now) / 1000
            })
        };
        // 100 an hour, burst 100: 150 at once are 50 over (30 minutes to drain)...
        let first = charge(150).expect("over");
        assert!((1799..=1801).contains(&first), "{first}");
        // ...10 more: 6 minutes more, past an eighth of 30: published again...
        let again = charge(10).expect("published again");
        assert!((2159..=2161).contains(&again), "{again}");
        // ...1 more: 36 s, within an eighth: not.
        assert_eq!(charge(1), None);
    }

    /// Cluster mode: asks only look at rate keys (the owners charge what is recorded), and a
    /// tenant its owner published as over its rate is refused until the excess drains, at
    /// every edge: the ask and the push edges' answer carry the wait.
    #[test]
    fn edges_refuse_what_an_owner_published_as_over_its_rate() {
        let (names, meters, limits, _) = rate_fixture();
        limits.charge_rates_from_log();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(0);
        let ask = |units: i128| {
            let asks = [Ask {
                tenant: "acme",
                meter: "api_calls",
                units,
            }];
            limits.ask(&asks, true, &names, &meters, &load).unwrap().remove(0)
        };
        // Looked at, not taken: the burst stays whole however often it is asked.
        for _ in 0..3 {
            let answer = ask(100);
            assert!(answer.allowed);
            assert_eq!(answer.limits[0].remaining, 0);
        }
        assert!(ask(1).allowed);
        let now = crate::model::now_ms();
        let until = now + 30_000;
        let record = |state: &str| {
            serde_json::to_vec(&serde_json::json!({
                "tenant": "acme", "meter": "api_calls", "kind": "rate", "mode": "hard",
                "state": state, "used": "100", "limit": "100", "remaining": "0",
                "period_start": crate::model::rfc3339(now / 1000),
                "period_end": crate::model::rfc3339(now / 1000 + 3600),
                "resets_at": crate::model::rfc3339(now / 1000 + 3600),
                "retry_at": crate::model::rfc3339_ms(until),
                "at": crate::model::rfc3339_ms(now),
            }))
            .unwrap()
        };
        limits.replicated.apply(&record("exceeded")).unwrap();
        let answer = ask(1);
        assert!(!answer.allowed);
        let wait = answer.retry_after_ns.unwrap();
        assert!(wait > 29_000_000_000 && wait <= 30_000_000_000, "{wait}");
        assert_eq!(answer.limits[0].state, State::Exceeded);
        let tenant = names.tenants.intern("acme");
        let meter = meters.by_slug("api_calls").unwrap().id;
        let explained = limits
            .replicated_rate(tenant, meter, &names, &meters, now)
            .expect("refused at the edge");
        assert_eq!(explained.decision.retry_after_ns, Some(30_000_000_000));
        assert_eq!(explained.limit.rate.unwrap().limit, 100);
        let other = names.tenants.intern("globex");
        assert!(limits
            .replicated_rate(other, meter, &names, &meters, now)
            .is_none());
        assert!(limits
            .replicated_rate(tenant, meter, &names, &meters, until)
            .is_none());
        // The owner's `ok`: admitted again at once.
        limits.replicated.apply(&record("ok")).unwrap();
        assert!(ask(1).allowed);
        assert!(limits
            .replicated_rate(tenant, meter, &names, &meters, now)
            .is_none());
    }

    #[test]
    fn a_duplicate_is_not_decided_and_holds_nothing() {
        let fixture = fixture();
        let load = |_: &str, _: &str, _: i64, _: i64| Ok(95);
        let units = [Unit(fixture.key, 10), Unit(fixture.key, 5)];
        let verdict = fixture
            .limits
            .decide(
                &fixture.names,
                &fixture.meters,
                &units,
                &[false, true],
                Rates::Enforce,
                &load,
            )
            .unwrap();
        assert!(verdict.refused.is_empty());
        assert_eq!(
            verdict.holds.quotas.iter().map(|hold| hold.units).sum::<i128>(),
            5
        );
    }

    /// Every decision is counted once, whatever the number of threads: two threads counting
    /// at once while every owned stripe is held (they share the last one), and threads that
    /// exit and hand their stripes to the next.
    #[test]
    fn decision_counts_are_exact_across_threads_that_come_and_go() {
        let counts = DecisionCounts::new();
        let mut one = Counts::default();
        one.add(Kind::Rate, "allowed");
        one.add(Kind::Quota, "warned");
        one.add(Kind::Quota, "warned");
        const SHARING: u64 = 4_000_000;
        const AFTER: u64 = 1_000;
        let holding = std::sync::Barrier::new(OWNED + 1);
        let done = std::sync::Barrier::new(OWNED + 1);
        std::thread::scope(|scope| {
            for _ in 0..OWNED {
                scope.spawn(|| {
                    counts.record(&one);
                    holding.wait();
                    done.wait();
                });
            }
            holding.wait();
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        start.wait();
                        (0..SHARING).for_each(|_| counts.record(&one));
                    });
                }
            });
            done.wait();
        });
        for _ in 0..3 {
            std::thread::scope(|scope| {
                scope.spawn(|| (0..AFTER).for_each(|_| counts.record(&one)));
            });
        }
        let total = OWNED as u64 + 2 * SHARING + 3 * AFTER;
        let totals = counts.totals();
        assert_eq!(totals[Kind::Rate as usize], [total, 0, 0]);
        assert_eq!(totals[Kind::Quota as usize], [0, 0, 2 * total]);
    }
}
