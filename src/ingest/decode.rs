//! CloudEvents JSON → metered events. Pure: no shared state but the name tables, no I/O, no clock
//! (the caller passes `now`), so it can be fuzzed and property-tested.
//!
//! Two kinds of "no": an *invalid* event (malformed, missing field, bad value) fails the whole
//! request with every problem named, so the client can fix and resend it; a *refused* event
//! (valid but outside the acceptance window) is reported and dead-lettered while the rest counts.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

use super::admission::Countable;
use super::error::{FieldError, RefusalReason};
use crate::aggregate::{Aggregation, Observation};
use crate::meter::{JsonStr, Meters, Node, RawObject};
use crate::model::{
    parse_rfc3339_ms, Acceptance, DimsCache, Names, SeriesKey, TenantId, MAX_ATTRIBUTE_BYTES,
};

/// Why an event older than `Acceptance::not_before_ms` is refused (`store::clock`).
pub const CLOCK_WENT_BACK: &str =
    "time is older than the dedup horizon allows since the daemon's clock went back \
     (an earlier, later clock may have expired this event's dedup key)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/cloudevents+json`: one event object.
    Single,
    /// `application/cloudevents-batch+json`: an array of events.
    Batch,
    /// `application/json`: an event object or an array of them.
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub index: usize,
    pub reason: RefusalReason,
    pub message: String,
}

pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, FieldError> {
    let Some(content_type) = content_type else {
        return Err(FieldError {
            index: None,
            field: "content-type".into(),
            reason: "missing; use application/cloudevents+json, application/cloudevents-batch+json or application/json".into(),
        });
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/cloudevents+json" => Ok(BodyKind::Single),
        "application/cloudevents-batch+json" => Ok(BodyKind::Batch),
        "application/json" => Ok(BodyKind::Either),
        _ => Err(FieldError {
            index: None,
            field: "content-type".into(),
            reason: format!(
                "`{content_type}` is not application/cloudevents+json, application/cloudevents-batch+json or application/json"
            ),
        }),
    }
}

/// Splits a body into raw events without decoding them, so each event's errors carry its index.
pub fn split_body(body: &[u8], kind: BodyKind) -> Result<Vec<&RawValue>, FieldError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let is_array = match (first, kind) {
        (None, _) => return Err(FieldError::body("empty body")),
        (Some(b'['), BodyKind::Batch | BodyKind::Either) => true,
        (Some(b'{'), BodyKind::Single | BodyKind::Either) => false,
        (Some(b'['), BodyKind::Single) => {
            return Err(FieldError::body(
                "application/cloudevents+json carries one event object; send arrays as application/cloudevents-batch+json",
            ))
        }
        (Some(_), BodyKind::Batch) => return Err(FieldError::body("a batch must be a JSON array of events")),
        (Some(_), _) => return Err(FieldError::body("must be a JSON event object or an array of them")),
    };
    if is_array {
        let events: Vec<&RawValue> = serde_json::from_slice(body)
            .map_err(|error| FieldError::body(format!("invalid JSON: {error}")))?;
        if events.is_empty() {
            return Err(FieldError::body("empty batch"));
        }
        Ok(events)
    } else {
        let event: &RawValue = serde_json::from_slice(body)
            .map_err(|error| FieldError::body(format!("invalid JSON: {error}")))?;
        Ok(vec![event])
    }
}

/// One meter update from one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub key: SeriesKey,
    pub aggregation: Aggregation,
    pub observation: Observation,
    pub unique_limit: u32,
}

#[derive(Debug, Clone)]
pub struct MeteredEvent {
    pub index: usize,
    pub tenant: TenantId,
    pub dedup_key: u128,
    pub ts_ms: i64,
    /// The event lands in a window that had already closed when it arrived (it amends it).
    pub late: bool,
    /// Inline for the usual single meter: no allocation per event.
    pub updates: smallvec::SmallVec<[Update; 1]>,
}

impl MeteredEvent {
    /// Folds every meter update of this event into `batch`.
    pub fn fold_into(
        &self,
        batch: &mut crate::aggregate::PreAggregated,
    ) -> Result<(), crate::aggregate::MergeError> {
        for update in &self.updates {
            batch.observe(
                update.key,
                update.aggregation,
                update.observation,
                self.ts_ms,
                update.unique_limit,
            )?;
        }
        Ok(())
    }
}

impl crate::state::limits::Contributes for MeteredEvent {
    fn contributions(&self, each: &mut dyn FnMut(SeriesKey, i128)) {
        for update in &self.updates {
            match (update.aggregation, &update.observation) {
                (Aggregation::Sum, Observation::Value(value)) => each(update.key, *value),
                (Aggregation::Count, _) => each(update.key, 1),
                _ => {}
            }
        }
    }
}

impl Countable for MeteredEvent {
    fn dedup_key(&self) -> Option<u128> {
        Some(self.dedup_key)
    }

    fn is_late(&self) -> bool {
        self.late
    }

    fn fold_into(
        &self,
        batch: &mut crate::aggregate::PreAggregated,
    ) -> Result<(), crate::aggregate::MergeError> {
        MeteredEvent::fold_into(self, batch)
    }
}

/// The outcome of decoding one request that had no invalid event.
#[derive(Debug, Default)]
pub struct Decoded {
    pub metered: Vec<MeteredEvent>,
    pub refused: Vec<Refusal>,
    pub unmetered: usize,
}

/// Identity of an event for dedup: tenant, CloudEvents source and id, length-prefixed so that
/// no two different triples hash the same input (one tenant can never suppress another's events).
pub fn dedup_key(tenant: &str, source: &str, id: &str) -> u128 {
    let mut hasher = Xxh3::new();
    for part in [tenant, source, id] {
        hasher.update(&(part.len() as u32).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.digest128()
}

/// One envelope attribute, however the event was decoded.
#[derive(Debug, PartialEq, Eq)]
enum Attribute<'a> {
    Absent,
    Text(Cow<'a, str>),
    /// Present but not a string; the JSON rendering, for the error message.
    NotText(String),
}

/// The `data` attribute.
#[derive(Debug, PartialEq)]
enum Data<'a> {
    Absent,
    Object(RawData<'a>),
    NotObject,
}

/// A JSON object's text: borrowed from the body (fast path) or re-serialized (fallback). Meters
/// read it through `meter::RawObject` without building a `Value` per event.
#[derive(Debug)]
enum RawData<'a> {
    Borrowed(&'a RawValue),
    Owned(Box<RawValue>),
}

impl RawData<'_> {
    fn get(&self) -> &RawValue {
        match self {
            RawData::Borrowed(raw) => raw,
            RawData::Owned(raw) => raw,
        }
    }
}

/// Same JSON, however it is spelled (the two decoding paths differ in whitespace and escapes).
impl PartialEq for RawData<'_> {
    fn eq(&self, other: &Self) -> bool {
        let parse = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).ok();
        parse(self.get()) == parse(other.get())
    }
}

/// An event's CloudEvents envelope, decoded either way (see `envelope`).
#[derive(Debug, PartialEq)]
struct Envelope<'a> {
    specversion: Attribute<'a>,
    id: Attribute<'a>,
    source: Attribute<'a>,
    event_type: Attribute<'a>,
    subject: Attribute<'a>,
    time: Attribute<'a>,
    data: Data<'a>,
}

/// The fast path: every envelope attribute a string (or absent/null), borrowed from the body.
#[derive(serde::Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow, default)]
    specversion: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    source: Option<JsonStr<'a>>,
    #[serde(borrow, default, rename = "type")]
    event_type: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    subject: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    time: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn text_attribute(value: Option<JsonStr<'_>>) -> Attribute<'_> {
    value.map_or(Attribute::Absent, |text| Attribute::Text(text.0))
}

fn data_from(value: Option<Value>) -> Data<'static> {
    match value {
        None | Some(Value::Null) => Data::Absent,
        Some(object @ Value::Object(_)) => match serde_json::value::to_raw_value(&object) {
            Ok(raw) => Data::Object(RawData::Owned(raw)),
            Err(_) => Data::NotObject,
        },
        Some(_) => Data::NotObject,
    }
}

fn data_from_raw(raw: &RawValue) -> Data<'_> {
    match raw.get().as_bytes().first() {
        Some(b'n') => Data::Absent,
        Some(b'{') => Data::Object(RawData::Borrowed(raw)),
        _ => Data::NotObject,
    }
}

/// Decodes one event's envelope. The typed, borrowing decoder is the fast path; when it fails
/// (a non-string attribute, invalid JSON, not an object) the event is decoded again as a
/// `Value` so that the error names the field. Both paths give the same `Envelope` for any input
/// the fast path accepts (property-tested below).
fn envelope<'a>(raw: &'a str, fast: bool) -> Result<Envelope<'a>, String> {
    if fast {
        if let Ok(wire) = serde_json::from_str::<WireEvent<'a>>(raw) {
            let data = wire.data.map_or(Data::Absent, data_from_raw);
            return Ok(Envelope {
                specversion: text_attribute(wire.specversion),
                id: text_attribute(wire.id),
                source: text_attribute(wire.source),
                event_type: text_attribute(wire.event_type),
                subject: text_attribute(wire.subject),
                time: text_attribute(wire.time),
                data,
            });
        }
    }
    let value: Value = serde_json::from_str(raw).map_err(|error| format!("invalid JSON: {error}"))?;
    let Value::Object(mut object) = value else {
        return Err("must be a JSON object".into());
    };
    let mut attribute = |name: &str| match object.remove(name) {
        None | Some(Value::Null) => Attribute::Absent,
        Some(Value::String(text)) => Attribute::Text(Cow::Owned(text)),
        Some(other) => Attribute::NotText(other.to_string()),
    };
    Ok(Envelope {
        specversion: attribute("specversion"),
        id: attribute("id"),
        source: attribute("source"),
        event_type: attribute("type"),
        subject: attribute("subject"),
        time: attribute("time"),
        data: data_from(object.remove("data")),
    })
}

fn required_string<'a>(
    value: Attribute<'a>,
    field: &str,
    index: usize,
    errors: &mut Vec<FieldError>,
) -> Option<Cow<'a, str>> {
    let error = |reason: &str| FieldError {
        index: Some(index),
        field: field.to_string(),
        reason: reason.to_string(),
    };
    match value {
        Attribute::Absent => errors.push(error("missing")),
        Attribute::Text(text) if text.is_empty() => errors.push(error("must not be empty")),
        Attribute::Text(text) if text.len() > MAX_ATTRIBUTE_BYTES => {
            errors.push(error(&format!("longer than {MAX_ATTRIBUTE_BYTES} bytes")))
        }
        Attribute::Text(text) => return Some(text),
        Attribute::NotText(_) => errors.push(error("must be a string")),
    }
    None
}

/// Decodes, validates and meters every event of a request. Either every event is valid (then
/// some may still be refused by policy) or the request is invalid and every problem is listed.
pub fn decode_events(
    raw_events: &[&RawValue],
    meters: &Meters,
    names: &Names,
    now_ms: i64,
    acceptance: Acceptance,
    tenant: Option<&str>,
) -> Result<Decoded, Vec<FieldError>> {
    let (decoded, errors) = decode_each(raw_events, meters, names, acceptance, |_| EventContext {
        now_ms,
        id: None,
        tenant,
    });
    if errors.is_empty() {
        Ok(decoded)
    } else {
        Err(errors)
    }
}

/// One event's JSON text: validated (`&RawValue`, from `split_body`) or not yet (`&str`, a
/// Kafka payload holding one object: decoding validates it, saving a scan per message).
pub trait EventText {
    fn text(&self) -> &str;
}

impl EventText for &RawValue {
    fn text(&self) -> &str {
        self.get()
    }
}

impl EventText for &str {
    fn text(&self) -> &str {
        self
    }
}

/// What the transport knows about one event beyond its JSON.
#[derive(Debug, Clone, Copy)]
pub struct EventContext<'a> {
    /// The reference time for lateness and for an absent `time`. HTTP: arrival. Kafka: the
    /// message timestamp, so that replaying a partition makes the same decisions again.
    pub now_ms: i64,
    /// An id to use when the event has none (e.g. the Kafka `ce_id` header).
    pub id: Option<&'a str>,
    /// The only subject the sender may report usage for (its API key's tenant); an event for
    /// another is refused (`wrong_tenant`) before anything of it is interned.
    pub tenant: Option<&'a str>,
}

/// Like `decode_events`, but event by event: invalid events are left out of `Decoded` and
/// reported (with their index) beside it, for sources that dead-letter them one at a time.
pub fn decode_each<'c, E: EventText>(
    raw_events: &[E],
    meters: &Meters,
    names: &Names,
    acceptance: Acceptance,
    context: impl Fn(usize) -> EventContext<'c>,
) -> (Decoded, Vec<FieldError>) {
    let mut errors = Vec::new();
    let mut decoded = Decoded::default();
    let mut dims_cache = DimsCache::default();
    for (index, raw) in raw_events.iter().enumerate() {
        let EventContext {
            now_ms,
            id: fallback_id,
            tenant: only_tenant,
        } = context(index);
        let mut envelope = match envelope(raw.text(), true) {
            Ok(envelope) => envelope,
            Err(reason) => {
                errors.push(FieldError {
                    index: Some(index),
                    field: "event".into(),
                    reason,
                });
                continue;
            }
        };
        let before = errors.len();
        if let (Attribute::Absent, Some(id)) = (&envelope.id, fallback_id) {
            envelope.id = Attribute::Text(Cow::Owned(id.to_owned()));
        }
        match &envelope.specversion {
            Attribute::Absent => {}
            Attribute::Text(version) if version == "1.0" => {}
            other => errors.push(FieldError {
                index: Some(index),
                field: "specversion".into(),
                reason: match other {
                    Attribute::Text(version) => format!("must be \"1.0\", got \"{version}\""),
                    Attribute::NotText(rendered) => format!("must be \"1.0\", got {rendered}"),
                    Attribute::Absent => unreachable!("matched above"),
                },
            }),
        }
        let id = required_string(envelope.id, "id", index, &mut errors);
        let source = required_string(envelope.source, "source", index, &mut errors);
        let event_type = required_string(envelope.event_type, "type", index, &mut errors);
        let subject = required_string(envelope.subject, "subject", index, &mut errors);
        let ts_ms = match envelope.time {
            Attribute::Absent => Some(now_ms),
            Attribute::Text(text) => match parse_rfc3339_ms(&text) {
                Some(ts) => Some(ts),
                None => {
                    errors.push(FieldError {
                        index: Some(index),
                        field: "time".into(),
                        reason: format!("`{text}` is not an RFC 3339 timestamp"),
                    });
                    None
                }
            },
            Attribute::NotText(_) => {
                errors.push(FieldError {
                    index: Some(index),
                    field: "time".into(),
                    reason: "must be an RFC 3339 string".into(),
                });
                None
            }
        };
        let object = match &envelope.data {
            Data::Absent => None,
            Data::Object(raw) => RawObject::parse(raw.get()),
            Data::NotObject => None,
        };
        let data = match &envelope.data {
            Data::Absent => None,
            Data::Object(_) if object.is_some() => object.as_ref().map(Node::Object),
            Data::Object(_) | Data::NotObject => {
                errors.push(FieldError {
                    index: Some(index),
                    field: "data".into(),
                    reason: "must be a JSON object".into(),
                });
                None
            }
        };
        let (Some(id), Some(source), Some(event_type), Some(subject), Some(ts_ms), true) =
            (id, source, event_type, subject, ts_ms, errors.len() == before)
        else {
            continue;
        };
        if let Some(only) = only_tenant.filter(|only| **only != *subject) {
            decoded.refused.push(Refusal {
                index,
                reason: RefusalReason::WrongTenant,
                message: format!("subject `{subject}`: this API key reports usage for `{only}` only"),
            });
            continue;
        }

        let mut matched = meters.matching(&event_type).peekable();
        if matched.peek().is_none() {
            decoded.unmetered += 1;
            continue;
        }
        // Nothing is interned before the event is known to count (`model::cardinality`).
        let mut tenant_id = names.tenants.get(&subject);
        let mut pending: smallvec::SmallVec<[_; 2]> = smallvec::SmallVec::new();
        let mut late = false;
        // A well-formed value beyond the representable range: the event is refused alone.
        let mut overflow: Option<String> = None;
        for meter in matched {
            // Both extractions run so that a value and a dimension problem are reported together.
            let dims = dims_cache.lookup(meter.dimensions_fingerprint(data), names, || {
                meter.dimensions_in(data)
            });
            let (observation, dims) = match (meter.observation_in(data), dims) {
                (Ok(observation), Ok(dims)) => (observation, dims),
                (Err(error), Ok(_)) if error.overflow => {
                    overflow = Some(format!("{}: {}", error.field, error.reason));
                    continue;
                }
                (observation, dims) => {
                    let problems = observation.err().into_iter().chain(dims.err());
                    errors.extend(problems.map(|error| FieldError {
                        index: Some(index),
                        field: error.field,
                        reason: error.reason,
                    }));
                    continue;
                }
            };
            let window_start = meter.window_size.start_of(ts_ms);
            let window_end = window_start + meter.window_size.seconds();
            late |= (window_end + acceptance.allowed_lateness_secs) * 1000 <= now_ms;
            pending.push((meter, dims, observation, window_start));
        }
        if errors.len() != before {
            continue;
        }
        let mut refusal = if let Some(message) = overflow {
            Some((RefusalReason::Overflow, message))
        } else if ts_ms < now_ms - acceptance.max_lateness_secs * 1000 {
            Some((
                RefusalReason::TooLate,
                format!(
                    "time is more than max_lateness_secs ({}) in the past",
                    acceptance.max_lateness_secs
                ),
            ))
        } else if ts_ms < acceptance.not_before_ms {
            Some((RefusalReason::TooLate, CLOCK_WENT_BACK.to_string()))
        } else if ts_ms > now_ms + acceptance.max_future_secs * 1000 {
            Some((
                RefusalReason::TooFarInFuture,
                format!(
                    "time is more than max_future_secs ({}) in the future",
                    acceptance.max_future_secs
                ),
            ))
        } else {
            None
        };
        let mut updates = smallvec::SmallVec::new();
        if refusal.is_none() {
            for (meter, dims, observation, window_start) in pending {
                match dims_cache.admit(names, meter.id, (&subject, &mut tenant_id), dims, now_ms) {
                    Ok((tenant, dims)) => updates.push(Update {
                        key: SeriesKey {
                            meter: meter.id,
                            tenant,
                            dims,
                            window_start,
                        },
                        aggregation: meter.aggregation,
                        observation,
                        unique_limit: meter.unique_exact_limit,
                    }),
                    Err(limit) => {
                        refusal = Some((RefusalReason::CardinalityLimit, limit.to_string()));
                        break;
                    }
                }
            }
        }
        let tenant = match (refusal, tenant_id) {
            (None, Some(tenant)) => tenant,
            (refusal, _) => {
                let (reason, message) =
                    refusal.unwrap_or((RefusalReason::Invalid, "no meter took the event".to_string()));
                decoded.refused.push(Refusal {
                    index,
                    reason,
                    message,
                });
                continue;
            }
        };
        decoded.metered.push(MeteredEvent {
            index,
            tenant,
            dedup_key: dedup_key(&subject, &source, &id),
            ts_ms,
            late,
            updates,
        });
    }
    (decoded, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_CONFIG};
    use proptest::prelude::*;
    use std::collections::HashMap;

    const NOW: i64 = 1_795_321_275_000;
    const ACCEPT: Acceptance = Acceptance {
        allowed_lateness_secs: 300,
        max_lateness_secs: 86_400,
        max_future_secs: 300,
        not_before_ms: i64::MIN,
    };

    fn meters(names: &Names) -> Meters {
        let config = Config::load(DEFAULT_CONFIG, &HashMap::new()).unwrap();
        Meters::new(config.meters, names)
    }

    fn decode(body: &str, kind: BodyKind) -> Result<Decoded, Vec<FieldError>> {
        let names = Names::default();
        let meters = meters(&names);
        let raw = split_body(body.as_bytes(), kind).map_err(|e| vec![e])?;
        decode_events(&raw, &meters, &names, NOW, ACCEPT, None)
    }

    #[test]
    fn envelope_strings_borrow_from_the_body_unless_escaped() {
        let raw = r#"{"id":"a\u0042c","source":"s","type":"t","subject":"acme","time":"2026-11-22T04:20:00Z","data":{"k\"ey":1,"model":"m"}}"#;
        let envelope = envelope(raw, true).unwrap();
        assert!(matches!(&envelope.source, Attribute::Text(Cow::Borrowed("s"))));
        assert!(matches!(
            &envelope.subject,
            Attribute::Text(Cow::Borrowed("acme"))
        ));
        assert!(
            matches!(&envelope.id, Attribute::Text(Cow::Owned(id)) if id == "aBc"),
            "an escaped string is unescaped into an owned copy: {:?}",
            envelope.id
        );
        let Data::Object(data) = &envelope.data else {
            panic!("data is an object")
        };
        let object = RawObject::parse(data.get()).unwrap();
        assert_eq!(object.member_names(), vec![("k\"ey", false), ("model", true)]);
    }

    #[test]
    fn decodes_a_batch_and_meters_each_event() {
        let body = r#"[
          {"specversion":"1.0","id":"1","source":"s","type":"llm.prompt","subject":"acme","time":"2026-11-22T04:20:00Z","data":{"tokens":10,"model":"gpt"}},
          {"id":"2","source":"s","type":"api.request","subject":"acme","data":{"route":"/v1"}},
          {"id":"3","source":"s","type":"nobody.meters.this","subject":"acme"}
        ]"#;
        let decoded = decode(body, BodyKind::Batch).unwrap();
        assert_eq!(decoded.metered.len(), 2);
        assert_eq!(decoded.unmetered, 1);
        assert_eq!(decoded.metered[0].updates[0].observation, Observation::Value(10));
        assert_eq!(decoded.metered[1].ts_ms, NOW, "time defaults to receive time");
    }

    #[test]
    fn every_invalid_event_is_named_with_index_and_field() {
        let body = r#"[
          {"id":"1","source":"s","type":"llm.prompt","subject":"acme","data":{"tokens":"ten"}},
          {"source":"s","type":"llm.prompt","data":{"tokens":1}},
          {"id":"3","source":"s","type":"llm.prompt","subject":"acme","time":"yesterday","data":{"tokens":1}},
          {"id":"4","source":"s","type":"llm.prompt","subject":"acme","data":{"tokens":1.5}},
          7
        ]"#;
        let errors = decode(body, BodyKind::Batch).unwrap_err();
        let found: Vec<(Option<usize>, &str)> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (Some(0), "data.tokens"),
                (Some(1), "id"),
                (Some(1), "subject"),
                (Some(2), "time"),
                (Some(3), "data.tokens"),
                (Some(4), "event"),
            ]
        );
    }

    #[test]
    fn value_and_dimension_problems_of_one_event_are_both_reported() {
        let long = "x".repeat(300);
        let body = format!(
            r#"{{"id":"1","source":"s","type":"llm.prompt","subject":"acme","data":{{"tokens":"ten","model":"{long}"}}}}"#
        );
        let errors = decode(&body, BodyKind::Single).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["data.tokens", "data.model"]);
    }

    #[test]
    fn policy_refusals_are_not_invalid() {
        let body = r#"[
          {"id":"1","source":"s","type":"api.request","subject":"acme","time":"2020-01-01T00:00:00Z"},
          {"id":"2","source":"s","type":"api.request","subject":"acme","time":"2030-01-01T00:00:00Z"},
          {"id":"3","source":"s","type":"api.request","subject":"acme","time":"2026-11-22T04:00:00Z"}
        ]"#;
        let decoded = decode(body, BodyKind::Either).unwrap();
        let reasons: Vec<_> = decoded.refused.iter().map(|r| (r.index, r.reason)).collect();
        assert_eq!(
            reasons,
            vec![(0, RefusalReason::TooLate), (1, RefusalReason::TooFarInFuture)]
        );
        assert_eq!(decoded.metered.len(), 1);
        assert!(
            decoded.metered[0].late,
            "a 21-minute-old event lands in a closed window"
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            body_kind(Some("application/cloudevents+json; charset=utf-8")),
            Ok(BodyKind::Single)
        );
        assert_eq!(
            body_kind(Some("application/cloudevents-batch+json")),
            Ok(BodyKind::Batch)
        );
        assert!(body_kind(Some("text/plain")).is_err());
        assert!(body_kind(None).is_err());
        assert!(split_body(b"[]", BodyKind::Batch).is_err());
        assert!(split_body(b"{}", BodyKind::Batch).is_err());
        assert!(split_body(b"[{}]", BodyKind::Single).is_err());
        assert!(split_body(b"{\"a\":", BodyKind::Single).is_err());
    }

    #[test]
    fn dedup_identity_includes_tenant() {
        assert_ne!(dedup_key("acme", "s", "1"), dedup_key("globex", "s", "1"));
        assert_ne!(dedup_key("ab", "c", "1"), dedup_key("a", "bc", "1"));
        assert_eq!(dedup_key("acme", "s", "1"), dedup_key("acme", "s", "1"));
    }

    fn arb_attribute() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop_oneof![
            Just(None),
            Just(Some(serde_json::Value::Null)),
            ".{0,8}".prop_map(|text| Some(serde_json::json!(text))),
            any::<i64>().prop_map(|n| Some(serde_json::json!(n))),
            any::<bool>().prop_map(|b| Some(serde_json::json!(b))),
            Just(Some(serde_json::json!({"tokens": 1.50, "model": "m"}))),
            Just(Some(serde_json::json!(["a"]))),
        ]
    }

    proptest! {
        /// The fast (typed, borrowing) and slow (`Value`) envelope decoders agree on every input,
        /// including escapes, wrong types, nulls and extra attributes.
        #[test]
        fn fast_and_slow_envelope_decoding_agree(
            fields in proptest::collection::vec(arb_attribute(), 7),
            extra in arb_attribute(),
            escaped in any::<bool>(),
        ) {
            let names = ["specversion", "id", "source", "type", "subject", "time", "data"];
            let mut object = serde_json::Map::new();
            for (name, value) in names.iter().zip(fields) {
                if let Some(value) = value {
                    object.insert(name.to_string(), value);
                }
            }
            if let Some(extra) = extra {
                object.insert("extension".into(), extra);
            }
            let mut text = serde_json::Value::Object(object).to_string();
            if escaped {
                text = text.replace("\"id\":\"", "\"id\":\"\\u0041");
            }
            let raw: &RawValue = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(envelope(raw.get(), true), envelope(raw.get(), false));
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let names = Names::default();
            let meters = meters(&names);
            if let Ok(raw) = split_body(&body, BodyKind::Either) {
                let _ = decode_events(&raw, &meters, &names, NOW, ACCEPT, None);
            }
        }

        #[test]
        fn arbitrary_event_fields_never_panic(
            id in ".{0,5}", tokens in ".{0,12}", time in ".{0,25}", model in ".{0,5}"
        ) {
            let names = Names::default();
            let meters = meters(&names);
            let event = serde_json::json!({
                "id": id, "source": "s", "type": "llm.prompt", "subject": "t", "time": time,
                "data": {"tokens": tokens, "model": model}
            }).to_string();
            let raw = split_body(event.as_bytes(), BodyKind::Single).unwrap();
            let _ = decode_events(&raw, &meters, &names, NOW, ACCEPT, None);
        }
    }
}
