//! The JSON side of meters: the JSONPath subset (`$`, `.name`, `['name']`, `[index]`), and
//! event data as meters read it, borrowed from the request body and parsed only as deep as a
//! path goes (no `serde_json::Value` per event on the ingest path).

use std::borrow::Cow;
use std::fmt;

use serde_json::value::RawValue;
use serde_json::Value;

/// The subset of JSONPath meters use: `$`, `.name`, `['name']`, `["name"]` and `[index]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| "must start with `$`".to_string())?;
        let mut segments = Vec::new();
        let bytes = rest.as_bytes();
        let mut pos = 0;
        while pos < bytes.len() {
            match bytes[pos] {
                b'.' => {
                    let start = pos + 1;
                    let mut end = start;
                    while end < bytes.len() && bytes[end] != b'.' && bytes[end] != b'[' {
                        end += 1;
                    }
                    let name = &rest[start..end];
                    if name.is_empty() || name == "*" {
                        return Err(format!("empty or wildcard name at offset {}", start + 1));
                    }
                    segments.push(Segment::Key(name.to_string()));
                    pos = end;
                }
                b'[' => {
                    let close = rest[pos..]
                        .find(']')
                        .map(|offset| pos + offset)
                        .ok_or_else(|| "unclosed `[`".to_string())?;
                    let inner = &rest[pos + 1..close];
                    let quoted = inner.len() >= 2
                        && ((inner.starts_with('\'') && inner.ends_with('\''))
                            || (inner.starts_with('"') && inner.ends_with('"')));
                    if quoted {
                        segments.push(Segment::Key(inner[1..inner.len() - 1].to_string()));
                    } else {
                        let index: usize = inner
                            .parse()
                            .map_err(|_| format!("unsupported selector `[{inner}]`"))?;
                        segments.push(Segment::Index(index));
                    }
                    pos = close + 1;
                }
                other => return Err(format!("unexpected `{}` at offset {}", other as char, pos + 1)),
            }
        }
        if segments.is_empty() {
            return Err("selects the whole document; name a property such as `$.tokens`".to_string());
        }
        Ok(JsonPath {
            text: text.to_string(),
            segments,
        })
    }

    pub fn select<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        let mut current = value;
        for segment in &self.segments {
            current = match segment {
                Segment::Key(key) => current.as_object()?.get(key)?,
                Segment::Index(index) => current.as_array()?.get(*index)?,
            };
        }
        Some(current)
    }

    /// `select` on either representation of event data.
    pub fn select_node<'v>(&self, node: Node<'v>) -> Option<Node<'v>> {
        let mut current = node;
        for segment in &self.segments {
            current = match segment {
                Segment::Key(key) => current.key(key)?,
                Segment::Index(index) => current.index(*index)?,
            };
        }
        Some(current)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The path as a field name for error messages: `$.usage.tokens` → `data.usage.tokens`.
    pub fn field_name(&self) -> String {
        format!("data{}", &self.text[1..])
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A JSON string, borrowed from the input unless it holds escapes. serde's own `Cow<str>` only
/// borrows as a struct field marked `borrow`; inside an `Option` or as a map key it always
/// allocates (six allocations per CloudEvent envelope, measured).
#[derive(Debug)]
pub struct JsonStr<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Text<'a> {
            type Value = JsonStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<JsonStr<'a>, E> {
                Ok(JsonStr(Cow::Borrowed(text)))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<JsonStr<'a>, E> {
                Ok(JsonStr(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<JsonStr<'a>, E> {
                Ok(JsonStr(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(Text(std::marker::PhantomData))
    }
}

/// A JSON object's members as raw text, split once (duplicate names: the last wins, as in
/// `serde_json::Value`).
#[derive(Debug, Default)]
pub struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawObject<'a> {
    /// None: not a JSON object.
    pub fn parse(raw: &'a RawValue) -> Option<RawObject<'a>> {
        if !raw.get().starts_with('{') {
            return None;
        }
        serde_json::from_str(raw.get()).ok()
    }

    /// Each member's name and whether it borrows from the input (tests).
    #[cfg(test)]
    pub fn member_names(&self) -> Vec<(&str, bool)> {
        self.0
            .iter()
            .map(|(name, _)| (name.as_ref(), matches!(name, Cow::Borrowed(_))))
            .collect()
    }

    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name == key)
            .map(|(_, value)| *value)
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Members<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<RawObject<'a>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some((name, value)) = map.next_entry::<JsonStr<'a>, &'a RawValue>()? {
                    members.push((name.0, value));
                }
                Ok(RawObject(members))
            }
        }
        deserializer.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// Event data as meters read it: a parsed `Value` (tests, other sources), or raw JSON text
/// parsed only as deep as a path goes (the ingest fast path: no `Value` per event).
#[derive(Debug, Clone, Copy)]
pub enum Node<'v> {
    Value(&'v Value),
    Raw(&'v RawValue),
    Object(&'v RawObject<'v>),
}

/// What a path selected, as far as meters care.
#[derive(Debug, PartialEq)]
pub(super) enum Leaf<'v> {
    Null,
    Bool(bool),
    /// The number's JSON text, exactly as written.
    Number(Cow<'v, str>),
    String(Cow<'v, str>),
    Composite,
}

impl<'v> Node<'v> {
    fn key(self, key: &str) -> Option<Node<'v>> {
        match self {
            Node::Value(value) => value.as_object()?.get(key).map(Node::Value),
            Node::Raw(raw) => RawObject::parse(raw)?.get(key).map(Node::Raw),
            Node::Object(object) => object.get(key).map(Node::Raw),
        }
    }

    fn index(self, index: usize) -> Option<Node<'v>> {
        match self {
            Node::Value(value) => value.as_array()?.get(index).map(Node::Value),
            Node::Raw(raw) if raw.get().starts_with('[') => {
                let items: Vec<&'v RawValue> = serde_json::from_str(raw.get()).ok()?;
                items.get(index).copied().map(Node::Raw)
            }
            Node::Raw(_) | Node::Object(_) => None,
        }
    }

    pub(super) fn leaf(self) -> Leaf<'v> {
        match self {
            Node::Value(Value::Null) => Leaf::Null,
            Node::Value(Value::Bool(flag)) => Leaf::Bool(*flag),
            Node::Value(Value::Number(number)) => Leaf::Number(Cow::Owned(number.to_string())),
            Node::Value(Value::String(text)) => Leaf::String(Cow::Borrowed(text)),
            Node::Value(_) | Node::Object(_) => Leaf::Composite,
            Node::Raw(raw) => {
                let text = raw.get();
                match text.as_bytes().first() {
                    Some(b'"') => serde_json::from_str::<JsonStr<'v>>(text)
                        .map_or(Leaf::Composite, |text| Leaf::String(text.0)),
                    Some(b'n') => Leaf::Null,
                    Some(b't') => Leaf::Bool(true),
                    Some(b'f') => Leaf::Bool(false),
                    Some(b'{' | b'[') | None => Leaf::Composite,
                    Some(_) => Leaf::Number(number_text(text)),
                }
            }
        }
    }
}

/// A JSON number's text as `serde_json::Value` renders it (with `arbitrary_precision`): as
/// written, except that an exponent is `e` with an explicit sign (`1E3` → `1e+3`). Dimension
/// values must not depend on which decoder read the event.
pub(super) fn number_text(text: &str) -> Cow<'_, str> {
    let Some(at) = text.find(['e', 'E']) else {
        return Cow::Borrowed(text);
    };
    let (mantissa, exponent) = (&text[..at], &text[at + 1..]);
    if text.as_bytes()[at] == b'e' && exponent.starts_with(['+', '-']) {
        return Cow::Borrowed(text);
    }
    let sign = if exponent.starts_with(['+', '-']) { "" } else { "+" };
    Cow::Owned(format!("{mantissa}e{sign}{exponent}"))
}
