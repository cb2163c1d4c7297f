//! The limits gate every edge shares: rate limits (GCRA per tenant and meter) and period quotas
//! decided at admission, from the very totals rating bills.
//!
//! A quota's `used` is the tenant's period quantity of the meter, the number
//! `GET /api/v1/tenants/{t}/usage` shows: read once from the store and the engine (the caller's
//! `load`, the query engine) when a (tenant, meter, period) is first needed, then moved by
//! every batch applied to the engine (`applied`, called by whoever applies, under `lock`, so a
//! load never sees a batch that `applied` also adds). Units admitted but not yet applied are
//! `held`: a hard quota refuses a unit when `used + held + units > limit`, so the sum accepted
//! in a period never exceeds the limit whatever the concurrency; a request that fails gives
//! its holds back. Refused units hold nothing and never count.
//!
//! Decisions are made at admission and what was admitted is what the log holds: replaying the
//! log after a crash applies exactly the admitted units (it decides nothing again), and a
//! restart reads `used` back from the store, so it never resets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};
use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;

use crate::aggregate::{AggState, PreAggregated};
use crate::limit::{self, Gcra, Kind, Limit, Mode, RateDecision, RateSpec, State};
use crate::model::{MeterId, SeriesKey, TenantId};
use crate::rate::plan::Plans;

/// Entries (quota periods, rate keys) untouched this long are forgotten (read again when
/// needed): memory stays proportional to the active tenants. Nanoseconds of the gate's clock.
const IDLE_NS: i128 = 600_000_000_000;
/// How often idle entries are looked for.
const SWEEP_EVERY_NS: i128 = 10_000_000_000;

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
}

#[derive(Debug)]
struct QuotaEntry {
    period_end: i64,
    used: i128,
    held: i128,
    /// The gate's clock when last used (ns).
    touched: i128,
}

/// A tenant's limits, by meter id, with its billing period.
#[derive(Debug)]
struct TenantTable {
    name: Arc<str>,
    /// (meter, kind, limit): the kind inline, so a lookup touches no limit it does not want.
    limits: Vec<(MeterId, Kind, Arc<Limit>)>,
    /// Whether any limit is a rate limit / a quota (a pass over the units is skipped without).
    has_rates: bool,
    has_quotas: bool,
    period: crate::rate::period::BillingPeriod,
    zone: Option<chrono_tz::Tz>,
    /// The last period computed: most units fall in it.
    last_period: (i64, i64),
}

impl TenantTable {
    fn period_of(&mut self, unix_secs: i64) -> (i64, i64) {
        let (start, end) = self.last_period;
        if start <= unix_secs && unix_secs < end {
            return self.last_period;
        }
        self.last_period = self.period.containing_in(unix_secs, self.zone);
        self.last_period
    }

    fn limit(&self, meter: MeterId, kind: Kind) -> Option<&Limit> {
        self.shared_limit(meter, kind).map(|limit| &**limit)
    }

    fn shared_limit(&self, meter: MeterId, kind: Kind) -> Option<&Arc<Limit>> {
        let any = match kind {
            Kind::Rate => self.has_rates,
            Kind::Quota => self.has_quotas,
        };
        if !any {
            return None;
        }
        self.limits
            .iter()
            .find(|(id, of, _)| *id == meter && *of == kind)
            .map(|(_, _, limit)| limit)
    }
}

pub struct Inner {
    /// The plans the tables were built from (rebuilt when a reload swaps them).
    plans: Option<Arc<Plans>>,
    tables: HashMap<TenantId, Option<TenantTable>>,
    rates: HashMap<(TenantId, MeterId), RateKey>,
    quotas: HashMap<QuotaKey, QuotaEntry>,
    /// The gate's clock (ns) as of the operation holding the lock, and of the last sweep.
    clock_ns: i128,
    swept_ns: i128,
    /// State changes, to whoever listens (Watch streams, the signal topic, webhooks).
    signals: tokio::sync::broadcast::Sender<Signal>,
}

/// One rate limit key's state.
#[derive(Clone, Copy, Debug, Default)]
struct RateKey {
    gcra: Gcra,
    /// The gate's clock when last decided (ns).
    touched: i128,
    /// Its last decision refused (signalled once when it starts and once when it stops).
    refusing: bool,
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

/// Why a request was refused as a whole: a rate limit it would pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateRefusal {
    pub tenant: Arc<str>,
    pub limit: Arc<Limit>,
    pub decision: RateDecision,
}

/// The gate's answer for one batch of units.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The units refused (over a hard quota) and why, by ascending index.
    pub refused: Vec<(usize, String)>,
    /// What the admitted units hold until applied.
    pub holds: Vec<Hold>,
}

/// A batch's units of one rate-limited (tenant, meter), with its rate.
type Demand = ((TenantId, MeterId), i128, RateSpec);
/// A unit's units of one quota period: (period, units, mode, limit, scale).
type Want = (QuotaKey, i128, Mode, i128, u32);

/// Decisions of one batch by kind and outcome, recorded once (`tallyd_limit_decisions_total`).
#[derive(Default)]
struct Counts([[u64; 3]; 2]);

const OUTCOMES: [&str; 3] = ["allowed", "refused", "warned"];

impl Counts {
    fn add(&mut self, kind: Kind, outcome: &'static str) {
        let o = OUTCOMES.iter().position(|known| *known == outcome).unwrap_or(0);
        self.0[kind as usize][o] += 1;
    }

    fn record(&self) {
        // Handles registered once (the daemon installs its recorder before any decision): a
        // decision must not pay for building label sets.
        static HANDLES: std::sync::OnceLock<[[metrics::Counter; 3]; 2]> = std::sync::OnceLock::new();
        let handles = HANDLES.get_or_init(|| {
            [Kind::Quota, Kind::Rate].map(|kind| {
                OUTCOMES.map(|outcome| {
                    metrics::counter!(crate::telemetry::LIMIT_DECISIONS, "kind" => kind.as_str(), "outcome" => outcome)
                })
            })
        });
        for (kind, row) in self.0.iter().enumerate() {
            for (outcome, n) in row.iter().enumerate() {
                if *n > 0 {
                    handles[kind][outcome].increment(*n);
                }
            }
        }
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
}

/// Reads a (tenant, meter) period total `[from, to)` (unix seconds) at the limit's scale.
pub type Load<'a> = &'a dyn Fn(&str, &str, i64, i64) -> Result<i128, String>;

pub struct Limits {
    epoch: Instant,
    /// Whether any plan has limits: the fast path skips the lock when none does.
    active: AtomicBool,
    inner: Mutex<Inner>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new()
    }
}

/// Additive contributions of one unit: (series, units at the meter's limit scale).
pub trait Contributes {
    fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128));
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
        Limits {
            epoch: Instant::now(),
            active: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                plans: None,
                tables: HashMap::default(),
                rates: HashMap::default(),
                quotas: HashMap::default(),
                clock_ns: 0,
                swept_ns: 0,
                signals,
            }),
        }
    }

    /// Every state change from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Signal> {
        self.inner.lock().signals.subscribe()
    }

    /// Nanoseconds on the gate's monotonic clock.
    pub fn now_ns(&self) -> i128 {
        self.epoch.elapsed().as_nanos() as i128
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The plans in force changed (start, reload): tables are rebuilt from them on next use.
    pub fn set_plans(&self, plans: &Arc<Plans>) {
        self.active.store(plans.any_limits(), Ordering::Relaxed);
        let mut inner = self.inner.lock();
        inner.plans = Some(plans.clone());
        inner.tables.clear();
    }

    /// The lock `applied` needs; an applier holds it across the engine apply.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
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
        rates: bool,
        load: Load<'_>,
    ) -> Result<Verdict, LimitError> {
        let mut verdict = Verdict::default();
        if !self.is_active() {
            return Ok(verdict);
        }
        let now_ns = self.now_ns();
        let mut counts = Counts::default();
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        inner.clock_ns = now_ns;
        if now_ns - inner.swept_ns > SWEEP_EVERY_NS {
            inner.swept_ns = now_ns;
            inner.sweep(now_ns);
        }
        // Rate limits: the request's demand per (tenant, meter), all allowed or none taken.
        let mut demand: SmallVec<[Demand; 2]> = SmallVec::new();
        for (unit, _) in units.iter().zip(fresh).filter(|(_, fresh)| rates && **fresh) {
            unit.contributions(&mut |key, units| {
                let Some(spec) = inner
                    .table(key.tenant, names, meters)
                    .and_then(|table| table.limit(key.meter, Kind::Rate))
                    .and_then(|limit| limit.rate)
                else {
                    return;
                };
                match demand
                    .iter_mut()
                    .find(|(id, _, _)| *id == (key.tenant, key.meter))
                {
                    Some((_, total, _)) => *total = total.saturating_add(units),
                    None => demand.push(((key.tenant, key.meter), units, spec)),
                }
            });
        }
        let mut taken: SmallVec<[((TenantId, MeterId), Gcra); 2]> = SmallVec::new();
        for &((tenant, meter), units, spec) in &demand {
            let mut state = inner
                .rates
                .get(&(tenant, meter))
                .map(|key| key.gcra)
                .unwrap_or_default();
            if !state.take(now_ns, units, &spec) {
                // Refused: the details once, for the answer (nothing was taken).
                let decision = state.check(now_ns, units, &spec);
                counts.add(Kind::Rate, "refused");
                inner.rate_refused(tenant, meter, decision, now_ns);
                let table = inner.tables[&tenant]
                    .as_ref()
                    .expect("invariant: a demand has its table");
                let refusal = RateRefusal {
                    tenant: table.name.clone(),
                    limit: table
                        .shared_limit(meter, Kind::Rate)
                        .expect("invariant: a demand has its rate limit")
                        .clone(),
                    decision,
                };
                drop(guard);
                counts.record();
                return Err(LimitError::Rate(Box::new(refusal)));
            }
            taken.push(((tenant, meter), state));
        }
        for ((tenant, meter), state) in taken {
            inner.rate_allowed(tenant, meter, state, now_ns);
            counts.add(Kind::Rate, "allowed");
        }
        // Quotas, unit by unit in order: (period, units, mode, limit, scale).
        let mut wants: SmallVec<[Want; 2]> = SmallVec::new();
        for (index, unit) in units.iter().enumerate() {
            if !fresh[index] {
                continue;
            }
            wants.clear();
            unit.contributions(&mut |key, units| {
                let Some(table) = inner.table_mut(key.tenant, names, meters) else {
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
                match wants.iter_mut().find(|want| want.0 == quota_key) {
                    Some(want) => want.1 = want.1.saturating_add(units),
                    None => wants.push((quota_key, units, mode, limit, scale)),
                }
            });
            if wants.is_empty() {
                continue;
            }
            let mut over: Option<String> = None;
            for &(key, units, mode, limit, scale) in &wants {
                let entry = inner.entry(key, names, meters, load)?;
                let taken = entry.used.saturating_add(entry.held);
                if mode == Mode::Hard && taken.saturating_add(units) > limit {
                    let format = |units: i128| crate::model::format_decimal(units, scale);
                    over = Some(format!(
                        "tenant `{}` is over its quota of `{}`: {} of {} used this period, the event needs {}; \
                         the quota resets at {}",
                        names.tenants.resolve(key.tenant),
                        meters.by_id(key.meter).map_or("?", |meter| meter.slug.as_str()),
                        format(taken),
                        format(limit),
                        format(units),
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
                    for &(key, units, _, limit, _) in &wants {
                        let entry = inner.quotas.get_mut(&key).expect("invariant: entry made above");
                        entry.held = entry.held.saturating_add(units);
                        warned |= entry.used.saturating_add(entry.held) > limit;
                        verdict.holds.push(Hold { key, units });
                    }
                    counts.add(Kind::Quota, if warned { "warned" } else { "allowed" });
                }
            }
        }
        drop(guard);
        counts.record();
        Ok(verdict)
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
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        inner.clock_ns = now_ns;
        let plans = inner.plans.clone().unwrap_or_default();
        let mut answers = Vec::with_capacity(asks.len());
        let mut trials: Vec<(TenantId, MeterId, Gcra, RateDecision)> = Vec::new();
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
            let Some(table) = inner.table_mut(tenant, names, meters) else {
                answers.push(answer);
                continue;
            };
            let rate = table.limit(meter, Kind::Rate).cloned();
            let quota = table.limit(meter, Kind::Quota).cloned();
            let (period_start, _) = table.period_of(now_ms.div_euclid(1000));
            if let Some(limit) = rate {
                let spec = limit.rate.expect("invariant: rate limits have a spec");
                let mut gcra = inner
                    .rates
                    .get(&(tenant, meter))
                    .map(|key| key.gcra)
                    .unwrap_or_default();
                let decision = gcra.check(now_ns, ask.units, &spec);
                if !decision.allowed {
                    answer.allowed = false;
                    answer.retry_after_ns = decision.retry_after_ns;
                    answer.deciding = Some(answer.limits.len());
                }
                answer
                    .limits
                    .push(rate_standing(limit, &gcra, now_ns, now_ms, Some(decision)));
                trials.push((tenant, meter, gcra, decision));
            }
            if let Some(limit) = quota {
                let key = QuotaKey {
                    tenant,
                    meter,
                    period_start,
                };
                let entry = inner.entry(key, names, meters, load)?;
                let taken = entry.used.saturating_add(entry.held);
                if limit.mode == Mode::Hard && taken.saturating_add(ask.units) > limit.limit {
                    answer.allowed = false;
                    answer.deciding.get_or_insert(answer.limits.len());
                }
                let (_, standing) = inner.quota_standing(&key).expect("invariant: tracked above");
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
        if consume {
            let all = answers.iter().all(|answer| answer.allowed);
            for (tenant, meter, gcra, decision) in trials {
                if all {
                    inner.rate_allowed(tenant, meter, gcra, now_ns);
                    counts.add(Kind::Rate, "allowed");
                } else if !decision.allowed {
                    inner.rate_refused(tenant, meter, decision, now_ns);
                    counts.add(Kind::Rate, "refused");
                }
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
        drop(guard);
        counts.record();
        Ok(answers)
    }

    /// Gives back the holds of a request that was not applied.
    pub fn release(&self, holds: &[Hold]) {
        if holds.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        for hold in holds {
            if let Some(entry) = inner.quotas.get_mut(&hold.key) {
                entry.held = entry.held.saturating_sub(hold.units);
            }
        }
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
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        inner.clock_ns = now_ns;
        let plans = inner.plans.clone().unwrap_or_default();
        let limits = plans.limits_for(tenant);
        let tenant_id = names.tenants.get(tenant);
        let now_ms = crate::model::now_ms();
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
                    let used = match (tenant_id, meter) {
                        (Some(tenant_id), Some(meter)) => {
                            let key = QuotaKey {
                                tenant: tenant_id,
                                meter,
                                period_start: start,
                            };
                            inner.entry(key, names, meters, load)?.used
                        }
                        // Never seen: nothing used.
                        _ => 0,
                    };
                    out.push(Standing {
                        used,
                        remaining: (limit.limit - used).max(0),
                        state: limit::quota_state(used, &limit),
                        period: (start, end),
                        resets_at_ms: end * 1000,
                        limit,
                    });
                }
                Kind::Rate => {
                    let gcra = match (tenant_id, meter) {
                        (Some(tenant_id), Some(meter)) => inner
                            .rates
                            .get(&(tenant_id, meter))
                            .map(|key| key.gcra)
                            .unwrap_or_default(),
                        _ => Gcra::default(),
                    };
                    out.push(rate_standing(limit, &gcra, now_ns, now_ms, None));
                }
            }
        }
        Ok(out)
    }
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
    Standing {
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

impl Inner {
    fn signal(&self, tenant: Arc<str>, standing: Standing, crossed: Vec<u32>) {
        // No listener: nothing to do (send fails only then).
        let _ = self.signals.send(Signal {
            tenant,
            standing,
            crossed,
            at_ms: crate::model::now_ms(),
        });
    }

    fn rate_limit(&self, tenant: TenantId, meter: MeterId) -> Option<(Arc<str>, Limit)> {
        let table = self.tables.get(&tenant)?.as_ref()?;
        Some((table.name.clone(), table.limit(meter, Kind::Rate)?.clone()))
    }

    fn rate_refused(&mut self, tenant: TenantId, meter: MeterId, decision: RateDecision, now_ns: i128) {
        let key = self.rates.entry((tenant, meter)).or_default();
        let started = !key.refusing;
        key.refusing = true;
        key.touched = now_ns;
        let gcra = key.gcra;
        if started {
            if let Some((name, limit)) = self.rate_limit(tenant, meter) {
                let standing = rate_standing(limit, &gcra, now_ns, crate::model::now_ms(), Some(decision));
                self.signal(name, standing, Vec::new());
            }
        }
    }

    fn rate_allowed(&mut self, tenant: TenantId, meter: MeterId, gcra: Gcra, now_ns: i128) {
        let key = self.rates.entry((tenant, meter)).or_default();
        let stopped = key.refusing;
        *key = RateKey {
            gcra,
            touched: now_ns,
            refusing: false,
        };
        if stopped {
            if let Some((name, limit)) = self.rate_limit(tenant, meter) {
                let standing = rate_standing(limit, &gcra, now_ns, crate::model::now_ms(), None);
                self.signal(name, standing, Vec::new());
            }
        }
    }

    /// A tracked quota period's standing (its `used`, as applied).
    fn quota_standing(&self, key: &QuotaKey) -> Option<(Arc<str>, Standing)> {
        let table = self.tables.get(&key.tenant)?.as_ref()?;
        let limit = table.limit(key.meter, Kind::Quota)?.clone();
        let entry = self.quotas.get(key)?;
        Some((
            table.name.clone(),
            Standing {
                used: entry.used,
                remaining: (limit.limit - entry.used).max(0),
                state: limit::quota_state(entry.used, &limit),
                period: (key.period_start, entry.period_end),
                resets_at_ms: entry.period_end * 1000,
                limit,
            },
        ))
    }

    fn build(
        plans: Option<&Arc<Plans>>,
        tenant: TenantId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) -> Option<TenantTable> {
        let plans = plans?;
        let name = names.tenants.resolve(tenant);
        let (plan, _) = plans.for_tenant(&name)?;
        let limits: Vec<(MeterId, Kind, Arc<Limit>)> = plans
            .limits_for(&name)
            .into_iter()
            .filter_map(|limit| {
                meters
                    .by_slug(&limit.meter)
                    .map(|meter| (meter.id, limit.kind, Arc::new(limit)))
            })
            .collect();
        if limits.is_empty() {
            return None;
        }
        Some(TenantTable {
            has_rates: limits.iter().any(|(_, kind, _)| *kind == Kind::Rate),
            has_quotas: limits.iter().any(|(_, kind, _)| *kind == Kind::Quota),
            name: name.clone(),
            limits,
            period: plans.period_of(&name, plan),
            zone: plans.timezone(&name),
            last_period: (0, 0),
        })
    }

    fn table(
        &mut self,
        tenant: TenantId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) -> Option<&TenantTable> {
        self.table_mut(tenant, names, meters).map(|table| &*table)
    }

    fn table_mut(
        &mut self,
        tenant: TenantId,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
    ) -> Option<&mut TenantTable> {
        let Inner { tables, plans, .. } = self;
        tables
            .entry(tenant)
            .or_insert_with(|| Inner::build(plans.as_ref(), tenant, names, meters))
            .as_mut()
    }

    /// The tracked quota period, read from the store and engine the first time.
    fn entry(
        &mut self,
        key: QuotaKey,
        names: &crate::model::Names,
        meters: &crate::meter::Meters,
        load: Load<'_>,
    ) -> Result<&mut QuotaEntry, LimitError> {
        if !self.quotas.contains_key(&key) {
            let tenant = names.tenants.resolve(key.tenant);
            let meter = meters
                .by_id(key.meter)
                .map(|meter| meter.slug.clone())
                .unwrap_or_default();
            let period_end = self
                .table_mut(key.tenant, names, meters)
                .map_or(key.period_start, |table| table.period_of(key.period_start).1);
            let used = load(&tenant, &meter, key.period_start, period_end).map_err(LimitError::Load)?;
            self.quotas.insert(
                key,
                QuotaEntry {
                    period_end,
                    used,
                    held: 0,
                    touched: self.clock_ns,
                },
            );
            // A period first tracked (a new period, or after a restart): its state, once.
            if let Some((name, standing)) = self.quota_standing(&key) {
                self.signal(name, standing, Vec::new());
            }
        }
        let entry = self.quotas.get_mut(&key).expect("invariant: inserted above");
        entry.touched = self.clock_ns;
        Ok(entry)
    }

    /// A batch was applied to the engine (with the lock held across the apply): tracked quota
    /// periods move by its additive states, and the request's holds are given back (its
    /// units are now in `used`).
    pub fn applied(&mut self, batch: &PreAggregated, holds: &[Hold]) {
        for hold in holds {
            if let Some(entry) = self.quotas.get_mut(&hold.key) {
                entry.held = entry.held.saturating_sub(hold.units);
            }
        }
        if self.quotas.is_empty() {
            return;
        }
        for (key, state) in &batch.series {
            let Some(units) = additive(state) else { continue };
            let Some(Some(table)) = self.tables.get_mut(&key.tenant) else {
                continue;
            };
            if table.limit(key.meter, Kind::Quota).is_none() {
                continue;
            }
            let (period_start, _) = table.period_of(key.window_start);
            let quota_key = QuotaKey {
                tenant: key.tenant,
                meter: key.meter,
                period_start,
            };
            let Some(entry) = self.quotas.get_mut(&quota_key) else {
                continue;
            };
            let before = entry.used;
            entry.used = entry.used.saturating_add(units);
            let after = entry.used;
            let limit = table
                .limit(key.meter, Kind::Quota)
                .expect("invariant: checked above");
            let crossed = limit::crossed(before, after, limit);
            if !crossed.is_empty() || limit::quota_state(before, limit) != limit::quota_state(after, limit) {
                if let Some((name, standing)) = self.quota_standing(&quota_key) {
                    self.signal(name, standing, crossed);
                }
            }
        }
    }

    /// Forgets idle rate keys (their buckets are full) and quota periods nobody touched lately.
    fn sweep(&mut self, now_ns: i128) {
        let tables = &self.tables;
        self.rates.retain(|(tenant, meter), key| {
            let spec = tables
                .get(tenant)
                .and_then(Option::as_ref)
                .and_then(|table| table.limit(*meter, Kind::Rate))
                .and_then(|limit| limit.rate);
            let recent = key.touched > now_ns - 1_000_000_000;
            match spec {
                Some(spec) => !key.gcra.is_idle(now_ns, &spec) || recent || key.refusing,
                None => false,
            }
        });
        self.quotas
            .retain(|_, entry| entry.held != 0 || now_ns - entry.touched < IDLE_NS);
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

    /// Applies `units` as the commit stage would: the batch's deltas and its holds, under the lock.
    fn apply(fixture: &Fixture, units: &[(i128, bool)], holds: &[Hold]) {
        let mut batch = PreAggregated::default();
        for &(units, admitted) in units {
            if admitted {
                batch
                    .merge_state(fixture.key, &AggState::Sum(units.into()))
                    .unwrap();
            }
        }
        fixture.limits.lock().applied(&batch, holds);
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
        /// Requests decided in one order, applied (or failed) in another: the units admitted
        /// and applied never exceed the limit, a unit is refused only when it did not fit
        /// beside what was used and held at its decision, and `used` ends as the base plus
        /// exactly what was applied.
        #[test]
        fn admitted_units_never_exceed_a_hard_quota_whatever_the_interleaving(
            base in 0i128..120,
            requests in prop::collection::vec(
                (prop::collection::vec(1i128..40, 1..5), any::<bool>(), any::<u8>()),
                1..40,
            ),
        ) {
            let fixture = fixture();
            let load = move |_: &str, _: &str, _: i64, _: i64| Ok(base);
            // Per request in flight: its (units, admitted), its holds, whether it will fail.
            type InFlight = (Vec<(i128, bool)>, Vec<Hold>, bool);
            let mut in_flight: Vec<InFlight> = Vec::new();
            let (mut applied, mut held) = (0i128, 0i128);
            for (sizes, fails, order) in requests {
                let units: Vec<Unit> = sizes.iter().map(|&n| Unit(fixture.key, n)).collect();
                let fresh = vec![true; units.len()];
                let verdict = fixture
                    .limits
                    .decide(&fixture.names, &fixture.meters, &units, &fresh, true, &load)
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
                in_flight.push((decided, verdict.holds, fails));
                // Apply (or fail) one of the requests in flight, in an arbitrary order.
                if order % 2 == 0 {
                    let (decided, holds, fails) = in_flight.remove(order as usize % in_flight.len());
                    let units: i128 = decided.iter().filter(|(_, ok)| *ok).map(|(n, _)| n).sum();
                    held -= units;
                    if fails {
                        fixture.limits.release(&holds);
                    } else {
                        apply(&fixture, &decided, &holds);
                        applied += units;
                    }
                }
            }
            for (decided, holds, _) in in_flight {
                held -= decided.iter().filter(|(_, ok)| *ok).map(|(n, _)| n).sum::<i128>();
                apply(&fixture, &decided, &holds);
                applied += decided.iter().filter(|(_, ok)| *ok).map(|(n, _)| n).sum::<i128>();
            }
            prop_assert_eq!(held, 0);
            prop_assert!(applied <= (100 - base).max(0));
            prop_assert_eq!(used(&fixture, base), base + applied);
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
                        let verdict = fixture
                            .limits
                            .decide(&fixture.names, &fixture.meters, &[Unit(fixture.key, n)], &[true], true, &load)
                            .unwrap();
                        apply(&fixture, &[(n, verdict.refused.is_empty())], &verdict.holds);
                        verdict.refused.is_empty()
                    })
                    .collect::<Vec<bool>>()
            };
            prop_assert_eq!(decide_all(), decide_all());
        }
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
                true,
                &load,
            )
            .unwrap();
        assert!(verdict.refused.is_empty());
        assert_eq!(verdict.holds.iter().map(|hold| hold.units).sum::<i128>(), 5);
    }
}
