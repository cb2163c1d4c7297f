//! Binary RocksDB keys. One leading byte names the kind; strings are length-prefixed so that a
//! prefix of fields is a prefix of bytes (meter, then tenant, then window) and scans are exact.
//!
//! ```text
//! A | meter | tenant | window_start | dims      → AggState (merge operands are deltas)
//! R | meter | tenant | window_start | dims      → u32 BE: last emitted revision of the window record
//! W | window_end | meter | tenant | window_start        → ()  a tenant's window of a meter not yet
//!                                                          closed (close index; its series are the
//!                                                          A keys with that prefix)
//! D | u128 BE                                   → u64 BE first-seen unix secs (dedup key; in
//!                                                  the `dedup` column family, see `dedup.rs`)
//! d | generation u64 BE                        → u64 BE first-seen secs, then u128 BE keys:
//!                                                  a checkpoint's dedup keys, until ingested
//! P | source name                               → u64 BE next position (e.g. ingest log sequence)
//! O | u64 BE                                    → JSON line waiting for the file emitter (outbox)
//! M | name                                      → metadata (close watermark, meter guards, ...)
//! S | u128 BE                                   → StreamState: a cumulative OTLP stream's last point
//! Q | meter | tenant | window_start | dims      → the window's latest rated record (JSON)
//! L | meter | tenant | period_start             → PeriodEntry: a billing period's rating ledger
//! C | tenant | period_start                     → TenantPeriod: a tenant's period across charges
//! T | period_end | tenant | period_start        → ()  a tenant period not yet settled (close index)
//! N | tenant | source                           → u64 BE first-seen unix secs: a replicated
//!                                                  source fed the tenant (`tenants.rs`)
//! E | tenant | writer u32 BE | seq u64 BE       → JSON line to re-emit: an outbox line of the
//!                                                  newest flush a restore applied, moved to `O`
//!                                                  by the next checkpoint (`changelog.rs`)
//! ```
//! Times are unix seconds, stored sign-flipped big-endian so that byte order is time order.

use crate::model::Dims;

pub const AGGREGATE: u8 = b'A';
pub const REVISION: u8 = b'R';
pub const OPEN_WINDOW: u8 = b'W';
pub const DEDUP: u8 = b'D';
pub const DEDUP_RUN: u8 = b'd';
pub const POSITION: u8 = b'P';
pub const OUTBOX: u8 = b'O';
pub const META: u8 = b'M';
pub const STREAM: u8 = b'S';
pub const RATED: u8 = b'Q';
pub const LEDGER: u8 = b'L';
pub const TENANT_PERIOD: u8 = b'C';
pub const PERIOD_CLOSE: u8 = b'T';
pub const TENANT_SOURCE: u8 = b'N';
pub const REEMIT: u8 = b'E';

pub fn time_bytes(unix_secs: i64) -> [u8; 8] {
    ((unix_secs as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn time_from_bytes(bytes: &[u8]) -> Option<i64> {
    let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(array) ^ (1 << 63)) as i64)
}

fn push_str(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("invariant: key strings are validated to be short");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn read_str<'a>(bytes: &'a [u8], pos: &mut usize) -> Option<&'a str> {
    let len = u16::from_be_bytes(bytes.get(*pos..*pos + 2)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(bytes.get(*pos + 2..*pos + 2 + len)?).ok()?;
    *pos += 2 + len;
    Some(text)
}

/// One tenant's window of one meter: the prefix of all its series suffixes.
pub fn window_prefix(meter: &str, tenant: &str, window_start: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + meter.len() + tenant.len());
    push_str(&mut out, meter);
    push_str(&mut out, tenant);
    out.extend_from_slice(&time_bytes(window_start));
    out
}

/// Length of `window_prefix(meter, tenant, _)`: a series suffix starts with it.
pub fn window_prefix_len(meter: &str, tenant: &str) -> usize {
    2 + meter.len() + 2 + tenant.len() + 8
}

/// The series identity shared by `A` and `R` keys: `window_prefix` then the dimensions.
pub fn series_suffix(meter: &str, tenant: &str, window_start: i64, dims: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + meter.len() + tenant.len());
    push_series_suffix(&mut out, meter, tenant, window_start, dims);
    out
}

/// `series_suffix` appended to `out` (a checkpoint writes all its keys into one buffer).
pub fn push_series_suffix(
    out: &mut Vec<u8>,
    meter: &str,
    tenant: &str,
    window_start: i64,
    dims: &[(String, String)],
) {
    push_str(out, meter);
    push_str(out, tenant);
    out.extend_from_slice(&time_bytes(window_start));
    out.push(u8::try_from(dims.len()).expect("invariant: group_by has fewer than 256 keys"));
    for (name, value) in dims {
        push_str(out, name);
        push_str(out, value);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesName {
    pub meter: String,
    pub tenant: String,
    pub window_start: i64,
    pub dims: Dims,
}

pub fn decode_series_suffix(bytes: &[u8]) -> Option<SeriesName> {
    let mut pos = 0;
    let meter = read_str(bytes, &mut pos)?.to_string();
    let tenant = read_str(bytes, &mut pos)?.to_string();
    let window_start = time_from_bytes(bytes.get(pos..)?)?;
    pos += 8;
    let count = *bytes.get(pos)?;
    pos += 1;
    let mut dims = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = read_str(bytes, &mut pos)?.to_string();
        let value = read_str(bytes, &mut pos)?.to_string();
        dims.push((name, value));
    }
    (pos == bytes.len()).then_some(SeriesName {
        meter,
        tenant,
        window_start,
        dims,
    })
}

/// The window start of a series suffix, without allocating (for the compaction filter).
pub fn suffix_window_start(bytes: &[u8]) -> Option<i64> {
    let mut pos = 0;
    read_str(bytes, &mut pos)?;
    read_str(bytes, &mut pos)?;
    time_from_bytes(bytes.get(pos..)?)
}

pub fn with_kind(kind: u8, suffix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + suffix.len());
    out.push(kind);
    out.extend_from_slice(suffix);
    out
}

/// Prefix of all `A` keys of a meter, or of one tenant's series of a meter.
pub fn aggregate_prefix(meter: &str, tenant: Option<&str>) -> Vec<u8> {
    let mut out = vec![AGGREGATE];
    push_str(&mut out, meter);
    if let Some(tenant) = tenant {
        push_str(&mut out, tenant);
    }
    out
}

/// Prefix of all `Q` (rated record) keys of a meter, or of one tenant's.
pub fn rated_prefix(meter: &str, tenant: Option<&str>) -> Vec<u8> {
    let mut out = aggregate_prefix(meter, tenant);
    out[0] = RATED;
    out
}

pub fn open_window_key(window_end: i64, window_prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + window_prefix.len());
    push_open_window_key(&mut out, window_end, window_prefix);
    out
}

/// `open_window_key` appended to `out`.
pub fn push_open_window_key(out: &mut Vec<u8>, window_end: i64, window_prefix: &[u8]) {
    out.push(OPEN_WINDOW);
    out.extend_from_slice(&time_bytes(window_end));
    out.extend_from_slice(window_prefix);
}

/// A (tenant, meter) billing period's ledger; same layout as a window prefix.
pub fn ledger_key(meter: &str, tenant: &str, period_start: i64) -> Vec<u8> {
    with_kind(LEDGER, &window_prefix(meter, tenant, period_start))
}

/// A tenant's billing period across its charges.
pub fn tenant_period_key(tenant: &str, period_start: i64) -> Vec<u8> {
    let mut out = vec![TENANT_PERIOD];
    push_str(&mut out, tenant);
    out.extend_from_slice(&time_bytes(period_start));
    out
}

/// The close-index entry of a tenant period (sorted by period end).
pub fn period_close_key(period_end: i64, tenant: &str, period_start: i64) -> Vec<u8> {
    let mut out = vec![PERIOD_CLOSE];
    out.extend_from_slice(&time_bytes(period_end));
    push_str(&mut out, tenant);
    out.extend_from_slice(&time_bytes(period_start));
    out
}

/// (period_end, tenant, period_start) of a close-index key.
pub fn decode_period_close_key(key: &[u8]) -> Option<(i64, String, i64)> {
    let period_end = time_from_bytes(key.get(1..)?)?;
    let mut pos = 9;
    let tenant = read_str(key, &mut pos)?.to_string();
    let period_start = time_from_bytes(key.get(pos..)?)?;
    (pos + 8 == key.len()).then_some((period_end, tenant, period_start))
}

/// The tenant of a series suffix or window prefix (meter, then tenant).
pub fn prefix_tenant(prefix: &[u8]) -> Option<&str> {
    let mut pos = 0;
    read_str(prefix, &mut pos)?;
    read_str(prefix, &mut pos)
}

/// The tenant of an emission or rating key (`W`, `R`, `Q`, `L`, `C`, `T`) or a line to re-emit (`E`).
pub fn tenant_of_state_key(key: &[u8]) -> Option<&str> {
    let mut pos = 1;
    match *key.first()? {
        OPEN_WINDOW => prefix_tenant(key.get(9..)?),
        REVISION | RATED | LEDGER => {
            read_str(key, &mut pos)?;
            read_str(key, &mut pos)
        }
        TENANT_PERIOD | REEMIT => read_str(key, &mut pos),
        PERIOD_CLOSE => {
            pos = 9;
            read_str(key, &mut pos)
        }
        _ => None,
    }
}

/// A (tenant, source) pair: the source fed the tenant's usage.
pub fn tenant_source_key(tenant: &str, source: &str) -> Vec<u8> {
    let mut out = vec![TENANT_SOURCE];
    push_str(&mut out, tenant);
    push_str(&mut out, source);
    out
}

/// (tenant, source) of a `tenant_source_key`.
pub fn decode_tenant_source_key(key: &[u8]) -> Option<(String, String)> {
    let mut pos = 1;
    let tenant = read_str(key, &mut pos)?.to_string();
    let source = read_str(key, &mut pos)?.to_string();
    (key.first() == Some(&TENANT_SOURCE) && pos == key.len()).then_some((tenant, source))
}

pub fn dedup_key(key: u128) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = DEDUP;
    out[1..].copy_from_slice(&key.to_be_bytes());
    out
}

pub fn dedup_run_key(generation: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = DEDUP_RUN;
    out[1..].copy_from_slice(&generation.to_be_bytes());
    out
}

pub fn stream_key(stream: u128) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = STREAM;
    out[1..].copy_from_slice(&stream.to_be_bytes());
    out
}

pub fn position_key(source: &str) -> Vec<u8> {
    with_kind(POSITION, source.as_bytes())
}

/// A line to re-emit: `writer`'s outbox line `seq`, for `tenant`.
pub fn reemit_key(tenant: &str, writer: u32, seq: u64) -> Vec<u8> {
    let mut out = vec![REEMIT];
    push_str(&mut out, tenant);
    out.extend_from_slice(&writer.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

pub fn outbox_key(seq: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = OUTBOX;
    out[1..].copy_from_slice(&seq.to_be_bytes());
    out
}

pub fn meta_key(name: &str) -> Vec<u8> {
    with_kind(META, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_round_trips_and_orders_by_window() {
        let dims = vec![("model".to_string(), "gpt-4".to_string())];
        let early = series_suffix("tokens", "acme", -120, &dims);
        let late = series_suffix("tokens", "acme", 60, &dims);
        assert!(early < late, "byte order must be time order");
        let decoded = decode_series_suffix(&late).unwrap();
        assert_eq!(decoded.meter, "tokens");
        assert_eq!(decoded.tenant, "acme");
        assert_eq!(decoded.window_start, 60);
        assert_eq!(decoded.dims, dims);
        assert_eq!(suffix_window_start(&early), Some(-120));
        let prefix = window_prefix("tokens", "acme", 60);
        assert_eq!(prefix.len(), window_prefix_len("tokens", "acme"));
        assert!(late.starts_with(&prefix));
        assert!(decode_series_suffix(&late[..late.len() - 1]).is_none());
    }

    #[test]
    fn tenant_source_keys_keep_their_layout() {
        let key = tenant_source_key("acme", "kafka/usage/3");
        assert_eq!(key, b"N\x00\x04acme\x00\x0dkafka/usage/3");
        assert_eq!(
            decode_tenant_source_key(&key),
            Some(("acme".to_string(), "kafka/usage/3".to_string()))
        );
        assert_eq!(decode_tenant_source_key(&key[..key.len() - 1]), None);
        assert_eq!(decode_tenant_source_key(&with_kind(LEDGER, &key[1..])), None);
    }

    #[test]
    fn tenant_prefix_does_not_match_longer_tenant() {
        let key = with_kind(AGGREGATE, &series_suffix("m", "acme-2", 0, &[]));
        assert!(key.starts_with(&aggregate_prefix("m", None)));
        assert!(!key.starts_with(&aggregate_prefix("m", Some("acme"))));
    }
}
