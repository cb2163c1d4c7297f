//! Meter definitions and matching: which meters an event feeds, and the value and dimensions it
//! contributes to each.
//!
//! Input: a validated meter list from config and decoded event `data`. Output: per meter an
//! `Observation` and the event's sorted group-by dimensions. Dimensions not declared in a
//! meter's `group_by` are dropped here, which bounds series cardinality.
//! `json` is the JSON side: the JSONPath subset meters use and the borrowed, lazily parsed
//! event data it walks.
//! Must not: touch shared state or I/O.

mod json;

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::Value;

use crate::aggregate::{Aggregation, Observation};
use crate::model::{parse_decimal, Dims, MeterId, Names, QuantityError, WindowSize};
use json::Leaf;
pub use json::{JsonPath, JsonStr, Node, RawObject};

/// Longest dimension value kept; a longer value is refused (it would be a cardinality bomb).
pub const MAX_DIMENSION_VALUE_BYTES: usize = 256;

/// Where a meter's usage comes from and how it is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeterSource {
    /// CloudEvents (HTTP, Kafka) whose `type` is the meter's `event_type`; value and group-by
    /// are JSONPaths into `data`.
    CloudEvents,
    /// OTLP metric data points of the metric named `metric_name`; the value is the point's.
    OtlpMetric { metric_name: String },
    /// OTLP log records whose `event.name` attribute (or `event_name` field) is `event_name`;
    /// each record is one event, its quantity the `value_attribute` (absent: 1), its dedup id the
    /// `id_attribute`.
    OtlpLog {
        event_name: String,
        value_attribute: Option<String>,
        id_attribute: Option<String>,
    },
    /// Hits Envoy's RLS or RLQS was allowed for the meter (`ingest::limits`): a gateway limits
    /// and meters every request with one call. COUNT counts hits; SUM adds them in meter units.
    Envoy,
}

impl MeterSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            MeterSource::CloudEvents => "cloudevents",
            MeterSource::OtlpMetric { .. } => "otlp_metric",
            MeterSource::OtlpLog { .. } => "otlp_log",
            MeterSource::Envoy => "envoy",
        }
    }
}

/// A validated meter.
#[derive(Clone, Debug)]
pub struct Meter {
    pub id: MeterId,
    pub slug: String,
    pub description: Option<String>,
    pub source: MeterSource,
    /// CloudEvents meters only (empty for OTLP meters).
    pub event_type: String,
    pub aggregation: Aggregation,
    pub value_property: Option<JsonPath>,
    /// CloudEvents meters: dimension name → JSONPath into `data`. Sorted by dimension name,
    /// so extracted dimension lists come out sorted.
    pub group_by: Vec<(String, JsonPath)>,
    /// OTLP meters: dimension name → attribute key (point or record attributes first, then the
    /// resource's). Sorted by dimension name.
    pub group_by_attributes: Vec<(String, String)>,
    pub window_size: WindowSize,
    pub scale: u32,
    pub unique_exact_limit: u32,
    pub allow_negative: bool,
    /// TIME_WEIGHTED: intervals between a stream's points longer than this are not integrated.
    pub max_gap_secs: i64,
    /// Each event counts a fee on its value instead of the value itself (transaction fees).
    pub per_event_fee: Option<PerEventFee>,
}

/// `fee = clamp(value × percent / 100, min, max)` per event, rounded half away from zero to the
/// meter's scale: a percentage with a per-event minimum and maximum, which a charge on the
/// aggregate cannot express (the aggregate keeps no events). Charge the meter `per_unit` at 1.
#[derive(Clone, Debug, PartialEq)]
pub struct PerEventFee {
    pub percent: rust_decimal::Decimal,
    /// Fixed-point at the meter's scale.
    pub min: Option<i128>,
    pub max: Option<i128>,
}

impl PerEventFee {
    pub fn apply(&self, value: i128, scale: u32) -> Result<i128, String> {
        use rust_decimal::prelude::ToPrimitive;
        let amount = rust_decimal::Decimal::try_from_i128_with_scale(value, scale)
            .map_err(|_| "is too large for fee arithmetic".to_string())?;
        let fee = (amount * self.percent / rust_decimal::Decimal::ONE_HUNDRED)
            .round_dp_with_strategy(scale, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        let mut fixed = (fee * rust_decimal::Decimal::from(10i128.pow(scale)))
            .to_i128()
            .ok_or_else(|| "fee overflows".to_string())?;
        if let Some(min) = self.min {
            fixed = fixed.max(min);
        }
        if let Some(max) = self.max {
            fixed = fixed.min(max);
        }
        Ok(fixed)
    }
}

/// Why an event's data cannot feed a meter (the request gets 400 naming `field`; a value out
/// of the representable range is refused alone instead, reason `overflow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractError {
    pub field: String,
    pub reason: String,
    /// The value is well-formed but beyond `model::MAX_QUANTITY_DIGITS`.
    pub overflow: bool,
}

impl Meter {
    /// The meter's group-by dimension names, whatever its source.
    pub fn group_names(&self) -> Vec<&str> {
        self.group_by
            .iter()
            .map(|(name, _)| name.as_str())
            .chain(self.group_by_attributes.iter().map(|(name, _)| name.as_str()))
            .collect()
    }

    /// The value this event contributes; `None` data is treated as an empty object.
    pub fn observation(&self, data: Option<&Value>) -> Result<Observation, ExtractError> {
        self.observation_in(data.map(Node::Value))
    }

    /// `observation` on either representation of the data.
    pub fn observation_in(&self, data: Option<Node<'_>>) -> Result<Observation, ExtractError> {
        let Some(path) = &self.value_property else {
            return Ok(Observation::Value(0));
        };
        let field = || path.field_name();
        let selected = data
            .and_then(|data| path.select_node(data))
            .ok_or_else(|| ExtractError {
                overflow: false,
                field: field(),
                reason: format!("missing (meter `{}` reads its value there)", self.slug),
            })?;
        if self.aggregation == Aggregation::UniqueCount {
            let text = match selected.leaf() {
                Leaf::String(text) | Leaf::Number(text) => text,
                Leaf::Bool(flag) => Cow::Borrowed(if flag { "true" } else { "false" }),
                Leaf::Null | Leaf::Composite => {
                    return Err(ExtractError {
                        overflow: false,
                        field: field(),
                        reason: "must be a string, number or boolean".to_string(),
                    })
                }
            };
            return Ok(Observation::Unique(xxhash_rust::xxh3::xxh3_64(text.as_bytes())));
        }
        let text = match selected.leaf() {
            Leaf::Number(text) | Leaf::String(text) => text,
            _ => {
                return Err(ExtractError {
                    overflow: false,
                    field: field(),
                    reason: "must be a number or a decimal string".to_string(),
                })
            }
        };
        let value = parse_decimal(&text, self.scale).map_err(|error| ExtractError {
            field: field(),
            overflow: error == QuantityError::OutOfRange,
            reason: match error {
                QuantityError::NotANumber => format!("`{text}` is not a decimal number"),
                other => format!("`{text}` {other}"),
            },
        })?;
        if value < 0 && !self.allow_negative {
            return Err(ExtractError {
                overflow: false,
                field: field(),
                reason: format!(
                    "`{text}` is negative and meter `{}` does not allow_negative",
                    self.slug
                ),
            });
        }
        match &self.per_event_fee {
            Some(fee) => fee
                .apply(value, self.scale)
                .map(Observation::Value)
                .map_err(|reason| ExtractError {
                    overflow: false,
                    field: field(),
                    reason: format!("`{text}` {reason}"),
                }),
            None => Ok(Observation::Value(value)),
        }
    }

    /// The event's group-by dimensions (sorted by name). Absent or null values are left out.
    pub fn dimensions(&self, data: Option<&Value>) -> Result<Dims, ExtractError> {
        self.dimensions_in(data.map(Node::Value))
    }

    /// `dimensions` on either representation of the data.
    /// A fingerprint of the set `dimensions_in` builds (`model::DimsCache`), without building it:
    /// each value hashes as its dimension text, length-prefixed, an absent one as `0xff`. None
    /// when `dimensions_in` would refuse the set (it then says why).
    pub fn dimensions_fingerprint(&self, data: Option<Node<'_>>) -> Option<u128> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&self.id.to_le_bytes());
        for (name, path) in &self.group_by {
            match dimension_text(name, path, data).ok()? {
                None => hasher.update(&[0xff]),
                Some(text) => {
                    hasher.update(&[0x01]);
                    hasher.update(&(text.len() as u32).to_le_bytes());
                    hasher.update(text.as_bytes());
                }
            }
        }
        Some(hasher.digest128())
    }

    pub fn dimensions_in(&self, data: Option<Node<'_>>) -> Result<Dims, ExtractError> {
        let mut dims = Vec::with_capacity(self.group_by.len());
        for (name, path) in &self.group_by {
            if let Some(text) = dimension_text(name, path, data)? {
                dims.push((name.clone(), text.into_owned()));
            }
        }
        Ok(dims)
    }
}

/// One group-by dimension's text in `data` (None: absent or null), or why it is refused. The
/// one rendering both `dimensions_in` and `dimensions_fingerprint` use, so they cannot drift.
fn dimension_text<'v>(
    name: &str,
    path: &JsonPath,
    data: Option<Node<'v>>,
) -> Result<Option<Cow<'v, str>>, ExtractError> {
    let text = match data.and_then(|data| path.select_node(data)).map(Node::leaf) {
        None | Some(Leaf::Null) => return Ok(None),
        Some(Leaf::String(text) | Leaf::Number(text)) => text,
        Some(Leaf::Bool(flag)) => Cow::Borrowed(if flag { "true" } else { "false" }),
        Some(Leaf::Composite) => {
            return Err(ExtractError {
                overflow: false,
                field: path.field_name(),
                reason: format!("group_by `{name}` must be a string, number or boolean"),
            })
        }
    };
    if text.len() > MAX_DIMENSION_VALUE_BYTES {
        return Err(ExtractError {
            overflow: false,
            field: path.field_name(),
            reason: format!(
                "group_by `{name}` value is {} bytes, more than {MAX_DIMENSION_VALUE_BYTES}",
                text.len()
            ),
        });
    }
    Ok(Some(text))
}

/// All meters, indexed for matching.
#[derive(Debug, Default)]
pub struct Meters {
    list: Vec<Meter>,
    by_event_type: HashMap<String, Vec<usize>>,
    by_metric_name: HashMap<String, Vec<usize>>,
    by_log_event_name: HashMap<String, Vec<usize>>,
    by_slug: HashMap<String, usize>,
    /// Config position by interned meter id.
    by_id: HashMap<MeterId, usize>,
}

impl Meters {
    /// Builds the index; meter ids are interned slugs, so ids agree with everything else that
    /// interns a slug (e.g. series replayed from the ingest log).
    pub fn new(mut meters: Vec<Meter>, names: &Names) -> Meters {
        let mut index = Meters::default();
        for (position, meter) in meters.iter_mut().enumerate() {
            meter.id = names.meters.intern(&meter.slug);
            let (table, name) = match &meter.source {
                MeterSource::CloudEvents => (Some(&mut index.by_event_type), &meter.event_type),
                MeterSource::OtlpMetric { metric_name } => (Some(&mut index.by_metric_name), metric_name),
                MeterSource::OtlpLog { event_name, .. } => (Some(&mut index.by_log_event_name), event_name),
                // Fed by the limits listener, by slug: no event matches it.
                MeterSource::Envoy => (None, &meter.slug),
            };
            if let Some(table) = table {
                table.entry(name.clone()).or_default().push(position);
            }
            index.by_slug.insert(meter.slug.clone(), position);
            index.by_id.insert(meter.id, position);
        }
        index.list = meters;
        index
    }

    pub fn matching(&self, event_type: &str) -> impl Iterator<Item = &Meter> {
        self.by_event_type
            .get(event_type)
            .into_iter()
            .flatten()
            .map(|position| &self.list[*position])
    }

    /// OTLP metric meters fed by the metric `name`.
    pub fn matching_metric(&self, name: &str) -> impl Iterator<Item = &Meter> {
        self.by_metric_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|position| &self.list[*position])
    }

    /// OTLP log meters fed by records of the event `name`.
    pub fn matching_log_event(&self, name: &str) -> impl Iterator<Item = &Meter> {
        self.by_log_event_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|position| &self.list[*position])
    }

    /// Whether any meter reads OTLP logs (the edge skips decoding work otherwise).
    pub fn has_log_meters(&self) -> bool {
        !self.by_log_event_name.is_empty()
    }

    pub fn by_slug(&self, slug: &str) -> Option<&Meter> {
        self.by_slug.get(slug).map(|position| &self.list[*position])
    }

    pub fn by_id(&self, id: MeterId) -> Option<&Meter> {
        self.by_id.get(&id).map(|position| &self.list[*position])
    }

    pub fn all(&self) -> &[Meter] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn per_event_fees_clamp_each_event() {
        // 2.9 % per payment, at least $0.30 and at most $5.00 (amounts at scale 2).
        let fee = PerEventFee {
            percent: "2.9".parse().unwrap(),
            min: Some(30),
            max: Some(500),
        };
        assert_eq!(fee.apply(100, 2), Ok(30), "$1.00 → 0.029 → the minimum");
        assert_eq!(fee.apply(10_000, 2), Ok(290), "$100.00 → 2.90");
        assert_eq!(fee.apply(5_050, 2), Ok(146), "$50.50 → 1.4645 → 1.46");
        assert_eq!(fee.apply(5_000, 2), Ok(145), "$50.00 → 1.45 exactly");
        assert_eq!(fee.apply(100_000, 2), Ok(500), "$1000 → the maximum");
        let uncapped = PerEventFee {
            min: None,
            max: None,
            ..fee
        };
        assert_eq!(uncapped.apply(1_725, 2), Ok(50), "17.25 → 0.50025 → 0.50");
    }

    use super::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn meter(aggregation: Aggregation, value: Option<&str>) -> Meter {
        Meter {
            id: 0,
            slug: "tokens".into(),
            description: None,
            source: MeterSource::CloudEvents,
            event_type: "llm.prompt".into(),
            aggregation,
            value_property: value.map(|v| JsonPath::parse(v).unwrap()),
            group_by: vec![("model".into(), JsonPath::parse("$.model").unwrap())],
            group_by_attributes: Vec::new(),
            window_size: WindowSize::Minute,
            scale: 2,
            unique_exact_limit: 100,
            allow_negative: false,
            max_gap_secs: 900,
            per_event_fee: None,
        }
    }

    #[test]
    fn json_path_subset() {
        let data = json!({"a": {"b": [10, {"c": "x"}]}, "d.e": 3});
        assert_eq!(
            JsonPath::parse("$.a.b[0]").unwrap().select(&data),
            Some(&json!(10))
        );
        assert_eq!(
            JsonPath::parse("$.a.b[1].c").unwrap().select(&data),
            Some(&json!("x"))
        );
        assert_eq!(
            JsonPath::parse("$['d.e']").unwrap().select(&data),
            Some(&json!(3))
        );
        assert_eq!(JsonPath::parse("$.missing").unwrap().select(&data), None);
        for bad in ["tokens", "$", "$..a", "$.a[*]", "$.", "$[", "$.a[?(@.x)]"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn values_are_exact_or_refused_with_the_field() {
        let m = meter(Aggregation::Sum, Some("$.tokens"));
        let data: Value = serde_json::from_str(r#"{"tokens": 12.25, "model": "gpt"}"#).unwrap();
        assert_eq!(m.observation(Some(&data)), Ok(Observation::Value(1225)));
        let data = json!({"tokens": "7"});
        assert_eq!(m.observation(Some(&data)), Ok(Observation::Value(700)));

        let too_precise: Value = serde_json::from_str(r#"{"tokens": 0.001}"#).unwrap();
        let error = m.observation(Some(&too_precise)).unwrap_err();
        assert_eq!(error.field, "data.tokens");
        assert!(error.reason.contains("decimal places"), "{}", error.reason);

        let error = m.observation(Some(&json!({"tokens": "many"}))).unwrap_err();
        assert!(error.reason.contains("not a decimal number"));
        let error = m.observation(Some(&json!({}))).unwrap_err();
        assert!(error.reason.contains("missing"));
        let error = m.observation(Some(&json!({"tokens": -1}))).unwrap_err();
        assert!(error.reason.contains("negative"));
        let error = m.observation(Some(&json!({"tokens": [1]}))).unwrap_err();
        assert!(error.reason.contains("must be a number"));
    }

    #[test]
    fn dimensions_keep_only_group_by() {
        let m = meter(Aggregation::Count, None);
        let data = json!({"model": "gpt-4", "region": "eu"});
        assert_eq!(
            m.dimensions(Some(&data)).unwrap(),
            vec![("model".to_string(), "gpt-4".to_string())]
        );
        assert!(m.dimensions(Some(&json!({"other": 1}))).unwrap().is_empty());
        let long = "x".repeat(MAX_DIMENSION_VALUE_BYTES + 1);
        assert!(m.dimensions(Some(&json!({ "model": long }))).is_err());
    }

    fn arb_leaf() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("12".to_string()),
            Just("-3.5".to_string()),
            Just("1e3".to_string()),
            Just("1.5E-2".to_string()),
            Just("2E+1".to_string()),
            Just("1e+3".to_string()),
            Just("0.001".to_string()),
            Just("12.250".to_string()),
            Just("\"7.5\"".to_string()),
            Just("\"m\\u0031\"".to_string()),
            Just("\"gpt\"".to_string()),
            Just(format!("\"{}\"", "x".repeat(300))),
            Just("true".to_string()),
            Just("null".to_string()),
            Just("{\"x\": 4}".to_string()),
            Just("[1, \"two\"]".to_string()),
        ]
    }

    /// Two JSON spellings of each value class (empty: the member is absent).
    const SPELLINGS: [[&str; 2]; 7] = [
        ["1", "\"1\""],
        ["true", "\"true\""],
        ["null", ""],
        ["\"m1\"", "\"m\\u0031\""],
        ["\"\"", "\"\""],
        ["{\"x\":1}", "{\"x\":\"1\"}"],
        ["[1]", "{\"x\":[1]}"],
    ];

    proptest::proptest! {
        /// The fingerprint a batch caches dimension sets under names exactly one set: equal
        /// fingerprints iff equal sets (values chosen to meet: `1` and `"1"`, `true` and
        /// `"true"`, an escaped and a plain spelling, absent and null), and none iff refused.
        #[test]
        fn dimension_fingerprints_match_exactly_when_the_sets_do(
            classes in proptest::collection::vec(0usize..SPELLINGS.len(), 3),
            spellings in proptest::collection::vec(proptest::collection::vec(0usize..2, 3), 2),
            changed in proptest::option::of((0usize..3, 0usize..SPELLINGS.len())),
        ) {
            // Per key (`a`, `model`, `other`): a value class and one of its two spellings; the
            // second object has the same classes, or one key's class changed, so sets that are
            // equal and sets that differ in one value are both common.
            let pair: Vec<Vec<(&str, &str)>> = (0..2)
                .map(|side| {
                    let mut classes = classes.clone();
                    if let (1, Some((key, class))) = (side, changed) {
                        classes[key] = class;
                    }
                    ["a", "model", "other"]
                        .iter()
                        .zip(&classes)
                        .zip(&spellings[side])
                        .filter_map(|((key, class), spelling)| {
                            let text = SPELLINGS[*class][*spelling];
                            (!text.is_empty()).then_some((*key, text))
                        })
                        .collect()
                })
                .collect();
            let mut m = meter(Aggregation::Sum, Some("$.tokens"));
            m.group_by = vec![
                ("a".into(), JsonPath::parse("$.a").unwrap()),
                ("model".into(), JsonPath::parse("$.model").unwrap()),
                ("x".into(), JsonPath::parse("$.a.x").unwrap()),
            ];
            let read = |members: &Vec<(&str, &str)>| {
                let text = format!(
                    "{{{}}}",
                    members.iter().map(|(key, value)| format!("\"{key}\":{value}")).collect::<Vec<_>>().join(",")
                );
                let raw: Box<RawValue> = serde_json::from_str(&text).unwrap();
                let object = RawObject::parse(&raw).unwrap();
                let data = Some(Node::Object(&object));
                (m.dimensions_fingerprint(data), m.dimensions_in(data))
            };
            let (first, second) = (read(&pair[0]), read(&pair[1]));
            for (fingerprint, dims) in [&first, &second] {
                proptest::prop_assert_eq!(fingerprint.is_some(), dims.is_ok());
            }
            if let ((Some(f1), Ok(d1)), (Some(f2), Ok(d2))) = (&first, &second) {
                proptest::prop_assert_eq!(f1 == f2, d1 == d2, "{:?} vs {:?}", d1, d2);
            }
        }

        /// Reading raw text (the ingest fast path) and reading a parsed `Value` give the same
        /// observation and dimensions, or the same error, for any data and path.
        #[test]
        fn raw_and_parsed_data_read_the_same(
            members in proptest::collection::vec(
                (proptest::sample::select(vec!["a", "b", "tokens", "model"]), arb_leaf()),
                0..5,
            ),
            value_path in proptest::sample::select(vec!["$.tokens", "$.a", "$.a.x", "$.b[1]", "$['model']", "$.b[0]"]),
            unique in proptest::bool::ANY,
            spaced in proptest::bool::ANY,
        ) {
            let separator = if spaced { " ,\n " } else { "," };
            let text = format!(
                "{{{}}}",
                members
                    .iter()
                    .map(|(key, value)| if spaced { format!("\"{key}\" : {value}") } else { format!("\"{key}\":{value}") })
                    .collect::<Vec<_>>()
                    .join(separator)
            );
            let parsed: Value = serde_json::from_str(&text).unwrap();
            let raw: Box<RawValue> = serde_json::from_str(&text).unwrap();
            let object = RawObject::parse(&raw).unwrap();
            let mut m = meter(if unique { Aggregation::UniqueCount } else { Aggregation::Sum }, Some(value_path));
            m.group_by = vec![
                ("a".into(), JsonPath::parse("$.a").unwrap()),
                ("model".into(), JsonPath::parse("$.model").unwrap()),
                ("x".into(), JsonPath::parse("$.a.x").unwrap()),
            ];
            proptest::prop_assert_eq!(m.observation(Some(&parsed)), m.observation_in(Some(Node::Object(&object))));
            proptest::prop_assert_eq!(m.dimensions(Some(&parsed)), m.dimensions_in(Some(Node::Object(&object))));
        }
    }
}
