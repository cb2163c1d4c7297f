//! The shared nouns of the data path: ids, exact quantities, windows and series keys.
//!
//! Owns: fixed-point decimal parsing and formatting (`parse_decimal`, `format_decimal`: `i128`
//! at a meter's scale), UTC window arithmetic, string interning for tenants, meters and
//! dimension sets, `SeriesKey`, and the acceptance window every edge judges event times by.
//! Must not: know about transports, storage or configuration files.

pub mod cardinality;
pub use cardinality::{DimsRef, SeriesGuard, SeriesLimit};

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// Interned tenant (CloudEvents `subject`) id; valid for the life of the process only.
pub type TenantId = u32;
/// Interned meter slug id; valid for the life of the process only.
pub type MeterId = u32;
/// Interned dimension set id (sorted `(key, value)` pairs); `0` is the empty set.
pub type DimsId = u32;

/// Largest `scale` a meter may declare (an event then carries less than 10^6 units: the value
/// keeps `MAX_QUANTITY_DIGITS` digits in all).
pub const MAX_SCALE: u32 = 18;

/// The largest quantity one event (point, record) may carry, in the meter's fixed-point units:
/// fewer than 24 significant digits at the meter's scale (scale 6: below 10^18 units; scale 0:
/// below 10^24). Why this bound makes every sum exact: a sum of `n` values stays below
/// `n × 10^24`, and i128 holds 1.7 × 10^38, so no series, window, period or query total can
/// overflow before 10^14 events have been counted into it — three years at a million events a
/// second, into one sum. Larger values are refused at admission (reason `overflow`), never
/// acknowledged and then failed.
pub const MAX_QUANTITY_DIGITS: u32 = 24;

/// Longest tenant, CloudEvents `id`, `source`, `type` or `subject` (and OTLP tenant or record
/// id) accepted, in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;
/// Attributes an OTLP resource, scope, data point or log record may carry. Lookups scan them
/// for every point and meter, so the cap keeps a request's mapping cost linear in its size: one
/// 8 MiB export with a 200,000-attribute resource would otherwise cost minutes of CPU.
pub const MAX_ATTRIBUTES: usize = 128;

/// Which event times are accepted, relative to the time of arrival, in seconds: a window
/// accepts events until its end + `allowed_lateness_secs` (later ones amend it as late
/// events), nothing older than `max_lateness_secs` nor newer than `max_future_secs`.
#[derive(Debug, Clone, Copy)]
pub struct Acceptance {
    pub allowed_lateness_secs: i64,
    pub max_lateness_secs: i64,
    pub max_future_secs: i64,
    /// Events stamped before this (unix ms) are refused as too late whatever `now` says: far in
    /// the past, unless the wall clock went back after a jump forward (`store::clock`).
    pub not_before_ms: i64,
}

/// Sorted `(key, value)` dimension pairs kept for a meter's `group_by` keys.
pub type Dims = Vec<(String, String)>;

/// One aggregated series: a meter's usage for one tenant, one dimension set, one base window.
///
/// 24 bytes: the in-memory hot key. On disk and in the ingest log the ids are replaced by strings
/// because interned ids do not survive a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub meter: MeterId,
    pub tenant: TenantId,
    pub dims: DimsId,
    /// Window start, unix seconds (UTC aligned to the meter's window size).
    pub window_start: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("not a decimal number")]
    NotANumber,
    #[error("has more than {scale} decimal places (the meter's scale); values are never rounded")]
    TooPrecise { scale: u32 },
    #[error("is out of range (at most 24 significant digits at the meter's scale)")]
    OutOfRange,
}

/// Parses a decimal literal (`12`, `-0.5`, `1.25e3`, `"7.000"`) into a fixed-point integer with
/// `scale` decimal places. Exact: a value that needs more places than `scale` is refused, never rounded.
pub fn parse_decimal(text: &str, scale: u32) -> Result<i128, QuantityError> {
    let text = text.trim();
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(pos) => {
            let exp: i32 = rest[pos + 1..].parse().map_err(|_| QuantityError::NotANumber)?;
            (&rest[..pos], exp)
        }
        None => (rest, 0),
    };
    let (int_part, frac_part) = match mantissa.find('.') {
        Some(pos) => (&mantissa[..pos], &mantissa[pos + 1..]),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(QuantityError::NotANumber);
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit()) || !frac_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QuantityError::NotANumber);
    }
    // digits * 10^(exponent - frac_len) is the exact value; shift it to `scale` places. The
    // digits are read in place (every event's value passes here: no allocation).
    let digits = || int_part.bytes().chain(frac_part.bytes());
    let leading_zeros = digits().take_while(|b| *b == b'0').count();
    let mut significant = int_part.len() + frac_part.len() - leading_zeros;
    let mut shift = exponent as i64 - frac_part.len() as i64 + scale as i64;
    if shift < 0 {
        // Dropping places is only allowed when they are zeros.
        let drop = ((-shift) as u64).min(significant as u64) as usize;
        if digits()
            .skip(leading_zeros + significant - drop)
            .any(|b| b != b'0')
        {
            return Err(QuantityError::TooPrecise { scale });
        }
        significant -= drop;
        shift = 0;
    }
    if significant == 0 {
        return Ok(0);
    }
    if significant as i64 + shift > i64::from(MAX_QUANTITY_DIGITS) {
        return Err(QuantityError::OutOfRange);
    }
    // At most MAX_QUANTITY_DIGITS digits: far below i128::MAX, see the constant.
    let mut value = digits()
        .skip(leading_zeros)
        .take(significant)
        .fold(0i128, |value, b| value * 10 + i128::from(b - b'0'));
    for _ in 0..shift {
        value = value.checked_mul(10).ok_or(QuantityError::OutOfRange)?;
    }
    Ok(if negative { -value } else { value })
}

/// A config amount (a decimal string or an integer, never a TOML float: it would have lost
/// exactness already) as fixed point at `scale`; a problem is named at `at` in `errors`.
pub fn fixed_point_setting(
    value: &toml::Value,
    scale: u32,
    at: &str,
    errors: &mut Vec<String>,
) -> Option<i128> {
    let text = match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => {
            errors.push(format!(
                "{at}: {f} is a TOML float (binary, inexact); write it as a string, e.g. \"{f}\""
            ));
            return None;
        }
        other => {
            errors.push(format!(
                "{at}: must be a decimal string, got {}",
                other.type_str()
            ));
            return None;
        }
    };
    match parse_decimal(&text, scale) {
        Ok(value) => Some(value),
        Err(error) => {
            errors.push(format!("{at}: `{text}` {error}"));
            None
        }
    }
}

/// A binary double (an OTLP `as_double` value) as fixed point at `scale`: its shortest decimal
/// representation (the digits that round-trip, e.g. `0.1`, not 0.1000000000000000055…), rounded
/// half away from zero to `scale` places. Doubles cannot be exact; this is the one rounding rule
/// for them. NaN and infinities are refused.
pub fn decimal_from_f64(value: f64, scale: u32) -> Result<i128, QuantityError> {
    if !value.is_finite() {
        return Err(QuantityError::NotANumber);
    }
    // Rust prints the shortest round-tripping digits, never in exponent form.
    let text = format!("{}", value.abs());
    let (int_part, frac_part) = text.split_once('.').unwrap_or((&text, ""));
    let scale_places = scale as usize;
    let (kept, dropped) = if frac_part.len() > scale_places {
        frac_part.split_at(scale_places)
    } else {
        (frac_part, "")
    };
    let mut magnitude = parse_decimal(&format!("{int_part}.{kept}0"), scale)?;
    if dropped.as_bytes().first().is_some_and(|digit| *digit >= b'5') {
        magnitude += 1;
        // Rounding 99…9.5 up can reach the bound itself.
        if magnitude >= 10i128.pow(MAX_QUANTITY_DIGITS) {
            return Err(QuantityError::OutOfRange);
        }
    }
    Ok(if value.is_sign_negative() {
        -magnitude
    } else {
        magnitude
    })
}

/// Formats a fixed-point integer as a plain decimal string without trailing zeros (`1.5`, `-3`, `0.000001`).
pub fn format_decimal(value: i128, scale: u32) -> String {
    if scale == 0 {
        return value.to_string();
    }
    let negative = value < 0;
    let magnitude = value.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = if magnitude.len() <= scale {
        format!("{}{}", "0".repeat(scale + 1 - magnitude.len()), magnitude)
    } else {
        magnitude
    };
    let (int_part, frac_part) = padded.split_at(padded.len() - scale);
    let frac_part = frac_part.trim_end_matches('0');
    let sign = if negative { "-" } else { "" };
    if frac_part.is_empty() {
        format!("{sign}{int_part}")
    } else {
        format!("{sign}{int_part}.{frac_part}")
    }
}

/// Base window sizes; coarser views are merges of base windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
}

impl WindowSize {
    pub fn seconds(self) -> i64 {
        match self {
            WindowSize::Minute => 60,
            WindowSize::Hour => 3_600,
            WindowSize::Day => 86_400,
        }
    }

    /// Start (unix seconds) of the UTC-aligned window containing `unix_ms`.
    pub fn start_of(self, unix_ms: i64) -> i64 {
        unix_ms.div_euclid(1000).div_euclid(self.seconds()) * self.seconds()
    }

    pub fn parse(text: &str) -> Option<WindowSize> {
        match text {
            "MINUTE" => Some(WindowSize::Minute),
            "HOUR" => Some(WindowSize::Hour),
            "DAY" => Some(WindowSize::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WindowSize::Minute => "MINUTE",
            WindowSize::Hour => "HOUR",
            WindowSize::Day => "DAY",
        }
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A thread-safe interner: value → `u32` id and back, with generations so that values nobody
/// uses any more are dropped.
///
/// Ids are process-local; everything that outlives the process stores the value itself. Every
/// lookup stamps the value with the current generation; `rotate` (the checkpoint thread, once
/// a UTC day, right after a checkpoint committed) starts a new generation and drops the values
/// not looked up during the last two, so memory is bounded by what ingest admits in three days
/// (`[aggregate] max_series` a day at most), not by the process's uptime. Safe because no
/// holder keeps an id that long without looking its value up again: engine deltas live until
/// the next checkpoint, requests and Kafka batches seconds (one stuck behind a dead-letter topic
/// that is down for two days would fail its checkpoint on resolve: the daemon exits and the
/// partition replays from its committed offsets, nothing lost). Ids of dropped values are not
/// handed out again until the 32-bit counter wraps.
pub struct Interner<T: ?Sized + Hash + Eq> {
    inner: RwLock<InternerInner<T>>,
    generation: AtomicU32,
    /// Ids below this are never dropped (`pin_existing`).
    pinned: AtomicU32,
}

struct InternerInner<T: ?Sized> {
    ids: HashMap<Arc<T>, Slot>,
    values: rustc_hash::FxHashMap<u32, Arc<T>>,
    next: u32,
}

/// An interned value's id and the last generation it was looked up in.
struct Slot {
    id: u32,
    seen: AtomicU32,
}

impl<T: ?Sized + Hash + Eq> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            inner: RwLock::new(InternerInner {
                ids: HashMap::new(),
                values: Default::default(),
                next: 0,
            }),
            generation: AtomicU32::new(0),
            pinned: AtomicU32::new(0),
        }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    pub fn get(&self, value: &T) -> Option<u32> {
        let inner = self.inner.read();
        let slot = inner.ids.get(value)?;
        self.stamp(slot);
        Some(slot.id)
    }

    /// Marks `slot` as used in this generation (a store only when it changes: the line is
    /// shared by every thread looking the value up).
    fn stamp(&self, slot: &Slot) {
        let generation = self.generation.load(Ordering::Relaxed);
        if slot.seen.load(Ordering::Relaxed) != generation {
            slot.seen.store(generation, Ordering::Relaxed);
        }
    }

    pub fn intern_with(&self, value: &T, to_owned: impl FnOnce(&T) -> Arc<T>) -> u32 {
        if let Some(id) = self.get(value) {
            return id;
        }
        let mut inner = self.inner.write();
        if let Some(slot) = inner.ids.get(value) {
            self.stamp(slot);
            return slot.id;
        }
        // Past a wrap of the counter, skip ids still live.
        let mut id = inner.next;
        while inner.values.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        inner.next = id.wrapping_add(1);
        let owned = to_owned(value);
        inner.values.insert(id, owned.clone());
        let seen = AtomicU32::new(self.generation.load(Ordering::Relaxed));
        inner.ids.insert(owned, Slot { id, seen });
        id
    }

    /// The value of an id handed out by `get` or `intern` within the last two generations.
    pub fn resolve(&self, id: u32) -> Arc<T> {
        self.inner
            .read()
            .values
            .get(&id)
            .cloned()
            .expect("invariant: an id is resolved within two generations of its value's last lookup")
    }

    /// Keeps every value interned so far for good (e.g. the empty dimension set, id 0).
    pub fn pin_existing(&self) {
        let next = self.inner.read().next;
        self.pinned.store(next, Ordering::Relaxed);
    }

    /// Starts a new generation and drops the values not looked up in the two before it;
    /// returns how many were dropped.
    pub fn rotate(&self) -> usize {
        let mut inner = self.inner.write();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let pinned = self.pinned.load(Ordering::Relaxed);
        let InternerInner { ids, values, .. } = &mut *inner;
        let before = ids.len();
        ids.retain(|_, slot| {
            let idle = generation.wrapping_sub(slot.seen.load(Ordering::Relaxed));
            let keep = idle <= 2 || slot.id < pinned;
            if !keep {
                values.remove(&slot.id);
            }
            keep
        });
        before - ids.len()
    }

    pub fn len(&self) -> usize {
        self.inner.read().values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Interner<str> {
    pub fn intern(&self, value: &str) -> u32 {
        self.intern_with(value, |v| Arc::from(v))
    }
}

impl Interner<[(String, String)]> {
    pub fn intern(&self, value: &[(String, String)]) -> u32 {
        self.intern_with(value, |v| Arc::from(v))
    }
}

/// Dimension sets a request or batch already interned, by a 128-bit fingerprint of the values
/// they are built from. The events of one batch share a few sets (the same routes, models,
/// regions); building one (a vector and a string per dimension) and looking it up in the shared
/// interner cost more than the rest of metering the event. Each source fingerprints its values
/// self-delimited (type or presence tag, length), so a 128-bit xxh3 collision, the bar dedup keys
/// already set, is the only way two different sets meet.
#[derive(Default)]
pub struct DimsCache {
    ids: rustc_hash::FxHashMap<u128, DimsId>,
    /// Series this request or batch already admitted (`Names::admit_series` takes a lock).
    admitted: rustc_hash::FxHashSet<(MeterId, TenantId, DimsId)>,
}

impl DimsCache {
    /// The id cached under `fingerprint`, else `build`'s set interned (and cached). No
    /// fingerprint, or a refusal from `build`, is not cached: refusals are rare and each needs
    /// its message. For trusted input (replayed or forwarded usage was admitted before).
    pub fn get_or_intern<E>(
        &mut self,
        fingerprint: Option<u128>,
        names: &Names,
        build: impl FnOnce() -> Result<Dims, E>,
    ) -> Result<DimsId, E> {
        match self.lookup(fingerprint, names, build)? {
            DimsRef::Interned(id) => Ok(id),
            DimsRef::New(dims, fingerprint) => {
                let id = names.dims.intern(&dims);
                if let Some(fingerprint) = fingerprint {
                    self.ids.insert(fingerprint, id);
                }
                Ok(id)
            }
        }
    }

    /// The set's id if it has one, else the set built, not interned (see `admit`).
    pub fn lookup<E>(
        &mut self,
        fingerprint: Option<u128>,
        names: &Names,
        build: impl FnOnce() -> Result<Dims, E>,
    ) -> Result<DimsRef, E> {
        if let Some(id) = fingerprint.and_then(|fingerprint| self.ids.get(&fingerprint)) {
            return Ok(DimsRef::Interned(*id));
        }
        let dims = build()?;
        match names.dims.get(&dims) {
            Some(id) => {
                if let Some(fingerprint) = fingerprint {
                    self.ids.insert(fingerprint, id);
                }
                Ok(DimsRef::Interned(id))
            }
            None => Ok(DimsRef::New(dims, fingerprint)),
        }
    }

    /// Admits series (meter, tenant, dims) under the cardinality caps (`Names::admit_series`),
    /// once per request or batch; sets `tenant_id` when the tenant gets its id.
    pub fn admit(
        &mut self,
        names: &Names,
        meter: MeterId,
        (tenant, tenant_id): (&str, &mut Option<TenantId>),
        dims: DimsRef,
        now_ms: i64,
    ) -> Result<(TenantId, DimsId), SeriesLimit> {
        if let (Some(tenant), DimsRef::Interned(dims)) = (*tenant_id, &dims) {
            if self.admitted.contains(&(meter, tenant, *dims)) {
                return Ok((tenant, *dims));
            }
        }
        let fingerprint = match &dims {
            DimsRef::New(_, fingerprint) => *fingerprint,
            DimsRef::Interned(_) => None,
        };
        let (tenant, dims) = names.admit_series(meter, tenant, *tenant_id, dims, now_ms)?;
        *tenant_id = Some(tenant);
        self.admitted.insert((meter, tenant, dims));
        if let Some(fingerprint) = fingerprint {
            self.ids.insert(fingerprint, dims);
        }
        Ok((tenant, dims))
    }
}

/// All process-local id tables. Dimension set `0` is always the empty set.
pub struct Names {
    pub tenants: Interner<str>,
    pub meters: Interner<str>,
    pub dims: Interner<[(String, String)]>,
    /// What ingest may add to `tenants` and `dims` (`cardinality`).
    pub series: SeriesGuard,
    /// The UTC day of the last `rotate_if_due` (`i64::MIN`: none yet).
    rotated_day: AtomicI64,
}

impl Default for Names {
    fn default() -> Self {
        let names = Names {
            tenants: Interner::default(),
            meters: Interner::default(),
            dims: Interner::default(),
            series: SeriesGuard::default(),
            rotated_day: AtomicI64::new(i64::MIN),
        };
        let empty = names.dims.intern(&[]);
        debug_assert_eq!(empty, 0);
        names.dims.pin_existing();
        names
    }
}

impl Names {
    /// Once a UTC day, right after a checkpoint committed (so no delta of the engine's last cut
    /// is still held): drops the tenants and dimension sets nobody looked up in two days
    /// (`Interner::rotate`). Meters are few and never dropped. Returns (tenants, dims) dropped.
    pub fn rotate_if_due(&self, now_ms: i64) -> Option<(usize, usize)> {
        let day = now_ms.div_euclid(86_400_000);
        let last = self.rotated_day.swap(day, Ordering::Relaxed);
        if last == i64::MIN || day <= last {
            // The first call only notes the day; a clock stepping back rotates nothing.
            if day < last {
                self.rotated_day.store(last, Ordering::Relaxed);
            }
            return None;
        }
        Some((self.tenants.rotate(), self.dims.rotate()))
    }
}

/// Renders unix seconds as RFC 3339 UTC (`2026-11-22T04:00:00Z`).
pub fn rfc3339(unix_secs: i64) -> String {
    match chrono::DateTime::from_timestamp(unix_secs, 0) {
        Some(time) => time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => unix_secs.to_string(),
    }
}

/// Renders unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(unix_ms) {
        Some(time) => time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => unix_ms.to_string(),
    }
}

/// Renders unix milliseconds as RFC 3339 UTC, with milliseconds only when they are not zero.
pub fn rfc3339_ms_compact(unix_ms: i64) -> String {
    if unix_ms.rem_euclid(1000) == 0 {
        rfc3339(unix_ms.div_euclid(1000))
    } else {
        rfc3339_ms(unix_ms)
    }
}

/// Parses an RFC 3339 timestamp into unix milliseconds (sub-millisecond digits are truncated:
/// timestamps only choose a window, they are never summed).
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.timestamp_millis())
}

/// Fault injection: `TALLYD_CLOCK_OFFSET_MS` (set once by `main`) shifts the daemon's wall
/// clock, as an NTP step would, so that tests can make it jump across a restart.
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

pub fn set_clock_offset_ms(offset_ms: i64) {
    CLOCK_OFFSET_MS.store(offset_ms, std::sync::atomic::Ordering::Relaxed);
}

/// Wall-clock now in unix milliseconds.
pub fn now_ms() -> i64 {
    // Straight from the system clock: chrono's `Utc::now()` builds a calendar date first, which
    // was 1 % of a Kafka pipeline's samples (the dedup horizon's compaction filter asks per key).
    use std::time::{SystemTime, UNIX_EPOCH};
    let wall = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    };
    wall + CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values nobody looked up in two generations go; used, recent and pinned ones stay; an id
    /// is never handed to another value, so a stale id cannot name the wrong tenant.
    #[test]
    fn rotation_drops_values_unused_for_two_generations_and_never_reuses_their_ids() {
        let names = Names::default();
        let tenants = &names.tenants;
        let (old, busy) = (tenants.intern("old"), tenants.intern("busy"));
        assert_eq!(tenants.rotate(), 0, "both seen in the generation that ended");
        let recent = tenants.intern("recent");
        assert_eq!(tenants.get("busy"), Some(busy));
        assert_eq!(tenants.rotate(), 0, "`old` unused for one generation only");
        assert_eq!(tenants.get("busy"), Some(busy));
        assert_eq!(tenants.rotate(), 1, "`old` unused for two generations");
        assert_eq!(tenants.get("old"), None);
        assert_eq!(
            (&*tenants.resolve(busy), &*tenants.resolve(recent)),
            ("busy", "recent")
        );
        assert_eq!(tenants.len(), 2);
        let again = tenants.intern("old");
        assert!(![old, busy, recent].contains(&again), "a new id");
        assert_eq!(&*tenants.resolve(again), "old");
        // The empty dimension set keeps id 0 however long it is unused.
        for _ in 0..5 {
            names.dims.rotate();
        }
        assert_eq!(names.dims.get(&[]), Some(0));
    }

    #[test]
    fn id_tables_rotate_once_a_utc_day_and_not_when_the_clock_steps_back() {
        const DAY_MS: i64 = 86_400_000;
        let names = Names::default();
        names.tenants.intern("gone");
        assert_eq!(
            names.rotate_if_due(10 * DAY_MS),
            None,
            "the first call notes the day"
        );
        assert_eq!(names.rotate_if_due(10 * DAY_MS + 5), None);
        assert_eq!(names.rotate_if_due(11 * DAY_MS), Some((0, 0)));
        assert_eq!(names.rotate_if_due(9 * DAY_MS), None, "a step back");
        assert_eq!(names.rotate_if_due(11 * DAY_MS + 1), None, "still day 11");
        assert_eq!(names.rotate_if_due(12 * DAY_MS), Some((0, 0)));
        assert_eq!(names.rotate_if_due(13 * DAY_MS), Some((1, 0)));
        assert!(names.tenants.is_empty());
    }

    /// Concurrent lookups and rotations: a lookup racing a rotation stamps the generation the
    /// value survives in. Each worker holds its ids across at most two rotations (a test lock
    /// stands in for the checkpoint's daily cadence) and they must all still resolve.
    #[test]
    fn ids_looked_up_recently_resolve_across_rotations() {
        let names = Names::default();
        let cadence = parking_lot::RwLock::new(());
        let rotations = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for thread in 0..3 {
                let (names, cadence, rotations) = (&names, &cadence, &rotations);
                scope.spawn(move || {
                    for round in 0..2_000 {
                        let value = format!("t{thread}-{}", round % 50);
                        let id = names.tenants.intern(&value);
                        let before = rotations.load(Ordering::SeqCst);
                        let _held = cadence.read();
                        if rotations.load(Ordering::SeqCst) <= before + 2 {
                            assert_eq!(&*names.tenants.resolve(id), value);
                        }
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..500 {
                    let _rotating = cadence.write();
                    names.tenants.rotate();
                    rotations.fetch_add(1, Ordering::SeqCst);
                }
            });
        });
    }

    #[test]
    fn doubles_round_half_away_from_zero_from_their_shortest_digits() {
        assert_eq!(decimal_from_f64(0.1 + 0.2, 6), Ok(300_000));
        assert_eq!(decimal_from_f64(1.5, 0), Ok(2));
        assert_eq!(decimal_from_f64(-1.5, 0), Ok(-2));
        assert_eq!(decimal_from_f64(2.4999, 0), Ok(2));
        assert_eq!(decimal_from_f64(12.25, 2), Ok(1225));
        assert_eq!(decimal_from_f64(1e21, 0), Ok(1_000_000_000_000_000_000_000));
        assert_eq!(decimal_from_f64(1e24, 0), Err(QuantityError::OutOfRange));
        assert_eq!(decimal_from_f64(5e-7, 6), Ok(1));
        assert_eq!(decimal_from_f64(f64::NAN, 6), Err(QuantityError::NotANumber));
        assert_eq!(decimal_from_f64(f64::INFINITY, 6), Err(QuantityError::NotANumber));
        assert_eq!(decimal_from_f64(1e300, 6), Err(QuantityError::OutOfRange));
    }
    use proptest::prelude::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_decimal("12", 6), Ok(12_000_000));
        assert_eq!(parse_decimal("-0.5", 6), Ok(-500_000));
        assert_eq!(parse_decimal("1.25e3", 2), Ok(125_000));
        assert_eq!(parse_decimal("7.000", 0), Ok(7));
        assert_eq!(parse_decimal("0.000001", 6), Ok(1));
        assert_eq!(parse_decimal("1e-6", 6), Ok(1));
        assert_eq!(parse_decimal(".5", 1), Ok(5));
        assert_eq!(parse_decimal("0", 0), Ok(0));
    }

    #[test]
    fn refuses_values_that_would_need_rounding() {
        assert_eq!(
            parse_decimal("0.0000001", 6),
            Err(QuantityError::TooPrecise { scale: 6 })
        );
        assert_eq!(
            parse_decimal("1.5", 0),
            Err(QuantityError::TooPrecise { scale: 0 })
        );
        assert_eq!(
            parse_decimal("1e-7", 6),
            Err(QuantityError::TooPrecise { scale: 6 })
        );
    }

    #[test]
    fn refuses_garbage_and_overflow() {
        for bad in ["", "-", "abc", "1.2.3", "NaN", "inf", "1e", "0x10", "1 2", "."] {
            assert_eq!(parse_decimal(bad, 6), Err(QuantityError::NotANumber), "{bad}");
        }
        assert_eq!(parse_decimal("1e40", 0), Err(QuantityError::OutOfRange));
        // The documented range: fewer than 24 significant digits at the meter's scale.
        assert_eq!(
            parse_decimal("999999999999999999999999", 0),
            Ok(10i128.pow(24) - 1)
        );
        assert_eq!(parse_decimal("1e24", 0), Err(QuantityError::OutOfRange));
        assert_eq!(
            parse_decimal("999999999999999999.999999", 6),
            Ok(10i128.pow(24) - 1)
        );
        assert_eq!(
            parse_decimal("1000000000000000000", 6),
            Err(QuantityError::OutOfRange)
        );
        assert_eq!(
            decimal_from_f64(999_999_999_999_999_999.9, 6),
            Err(QuantityError::OutOfRange)
        );
        assert_eq!(
            parse_decimal("999999999999999999999999999999999", 6),
            Err(QuantityError::OutOfRange)
        );
    }

    #[test]
    fn formats_without_trailing_zeros() {
        assert_eq!(format_decimal(12_000_000, 6), "12");
        assert_eq!(format_decimal(-500_000, 6), "-0.5");
        assert_eq!(format_decimal(1, 6), "0.000001");
        assert_eq!(format_decimal(0, 6), "0");
        assert_eq!(format_decimal(123, 0), "123");
    }

    #[test]
    fn windows_are_utc_aligned() {
        // 2026-11-22T04:21:15.500Z
        let ts = 1_795_321_275_500;
        assert_eq!(WindowSize::Minute.start_of(ts) % 60, 0);
        assert_eq!(WindowSize::Hour.start_of(ts) % 3600, 0);
        assert_eq!(WindowSize::Day.start_of(ts) % 86_400, 0);
        assert!(WindowSize::Minute.start_of(ts) <= ts / 1000);
        assert_eq!(WindowSize::Minute.start_of(-1), -60);
    }

    /// The allocating implementation `parse_decimal` replaced, kept as its oracle.
    fn parse_decimal_reference(text: &str, scale: u32) -> Result<i128, QuantityError> {
        let text = text.trim();
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(pos) => {
                let exp: i32 = rest[pos + 1..].parse().map_err(|_| QuantityError::NotANumber)?;
                (&rest[..pos], exp)
            }
            None => (rest, 0),
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(pos) => (&mantissa[..pos], &mantissa[pos + 1..]),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(QuantityError::NotANumber);
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit()) || !frac_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(QuantityError::NotANumber);
        }
        // digits * 10^(exponent - frac_len) is the exact value; shift it to `scale` places.
        let digits = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        let mut shift = exponent as i64 - frac_part.len() as i64 + scale as i64;
        let mut digits = digits.to_string();
        if shift < 0 {
            // Dropping places is only allowed when they are zeros.
            let drop = (-shift) as usize;
            let keep = digits.len().saturating_sub(drop);
            if digits[keep..].bytes().any(|b| b != b'0') {
                return Err(QuantityError::TooPrecise { scale });
            }
            digits.truncate(keep);
            shift = 0;
        }
        if digits.is_empty() {
            return Ok(0);
        }
        if digits.len() as i64 + shift > i64::from(MAX_QUANTITY_DIGITS) {
            return Err(QuantityError::OutOfRange);
        }
        let mut value: i128 = digits.parse().map_err(|_| QuantityError::OutOfRange)?;
        for _ in 0..shift {
            value = value.checked_mul(10).ok_or(QuantityError::OutOfRange)?;
        }
        Ok(if negative { -value } else { value })
    }

    proptest! {
        #[test]
        fn parse_decimal_agrees_with_its_allocating_reference(
            text in r"[ ]?[+-]?0{0,3}[0-9]{0,40}(\.[0-9]{0,40}0{0,5})?([eE][+-]?[0-9]{1,3})?[ ]?",
            scale in 0u32..=MAX_SCALE,
        ) {
            prop_assert_eq!(parse_decimal(&text, scale), parse_decimal_reference(&text, scale), "{}", text);
        }

        #[test]
        fn parse_decimal_agrees_with_its_reference_on_any_text(text in ".{0,12}", scale in 0u32..=MAX_SCALE) {
            prop_assert_eq!(parse_decimal(&text, scale), parse_decimal_reference(&text, scale));
        }

        #[test]
        fn format_then_parse_round_trips(value in any::<i64>(), scale in 0u32..=MAX_SCALE) {
            let value = value as i128;
            prop_assert_eq!(parse_decimal(&format_decimal(value, scale), scale), Ok(value));
        }
    }
}
