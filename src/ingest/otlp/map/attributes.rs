//! Reading OTLP attributes: tenants, dimension values, ids, and the identity hashes of
//! resources, scopes, streams and points (stored: dedup keys and stream states must keep
//! their values across versions, `tests::stored_identities_keep_their_values`).

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;

pub use crate::ingest::error::RefusalReason;
use crate::meter::{Meter, MAX_DIMENSION_VALUE_BYTES};
use crate::model::{Dims, DimsCache, DimsRef, Names, MAX_ATTRIBUTES, MAX_ATTRIBUTE_BYTES};

use super::*;

/// An attribute value as a dimension or id string; composite values have none.
pub(super) fn attribute_text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(number) => Some(number.to_string()),
        any_value::Value::BoolValue(flag) => Some(flag.to_string()),
        any_value::Value::DoubleValue(number) if number.is_finite() => Some(number.to_string()),
        _ => None,
    }
}

pub(super) fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

/// The bytes an identity hash is taken over, gathered and then hashed in one call. The digest
/// is the one a streaming `Xxh3` fed the same bytes gives (the hashes are stored: dedup keys,
/// stream states), but a point's identity is a few short pieces, and streaming set up a
/// 600-byte hasher and copied each piece into its buffer: most of the mapping's hashing time.
#[derive(Default)]
pub(super) struct HashInput(smallvec::SmallVec<[u8; 256]>);

impl HashInput {
    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    pub(super) fn digest128(&self) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&self.0)
    }
}

/// Hashes attributes independently of their order (SDKs need not sort them).
pub(super) fn hash_attributes(hasher: &mut HashInput, attributes: &[KeyValue]) {
    hasher.update(&(attributes.len() as u32).to_le_bytes());
    let hash_one = |hasher: &mut HashInput, kv: &KeyValue| {
        hash_str(hasher, &kv.key);
        hash_value(hasher, kv.value.as_ref().and_then(|value| value.value.as_ref()));
    };
    // Most points carry a few attributes, already sorted: no copy to sort them (the sort is
    // stable, so both ways hash equal keys in the same order).
    if attributes.windows(2).all(|pair| pair[0].key <= pair[1].key) {
        for kv in attributes {
            hash_one(hasher, kv);
        }
    } else {
        let mut sorted: Vec<&KeyValue> = attributes.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for kv in sorted {
            hash_one(hasher, kv);
        }
    }
}

/// A type tag, then the value: `"1"` and `1` are different attributes.
pub(super) fn hash_value(hasher: &mut HashInput, value: Option<&any_value::Value>) {
    match value {
        None => hasher.update(&[0]),
        Some(any_value::Value::StringValue(text)) => {
            hasher.update(&[1]);
            hash_str(hasher, text);
        }
        Some(any_value::Value::BoolValue(flag)) => hasher.update(&[2, u8::from(*flag)]),
        Some(any_value::Value::IntValue(number)) => {
            hasher.update(&[3]);
            hasher.update(&number.to_le_bytes());
        }
        Some(any_value::Value::DoubleValue(number)) => {
            hasher.update(&[4]);
            hasher.update(&number.to_bits().to_le_bytes());
        }
        // Composite values: prost's encoding is deterministic for one value.
        Some(other) => {
            hasher.update(&[5]);
            let encoded = AnyValue {
                value: Some(other.clone()),
            }
            .encode_to_vec();
            hasher.update(&(encoded.len() as u32).to_le_bytes());
            hasher.update(&encoded);
        }
    }
}

pub(super) fn hash_str(hasher: &mut HashInput, text: &str) {
    hasher.update(&(text.len() as u32).to_le_bytes());
    hasher.update(text.as_bytes());
}

/// The tenant of a resource, or why there is none.
/// A resource, scope, point or record with more than `MAX_ATTRIBUTES` attributes is refused.
pub(super) fn too_many_attributes(
    what: &str,
    attributes: &[KeyValue],
) -> Result<(), (RefusalReason, String)> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err((
            RefusalReason::Invalid,
            format!(
                "the {what} has {} attributes; at most {MAX_ATTRIBUTES}",
                attributes.len()
            ),
        ));
    }
    Ok(())
}

pub(super) fn tenant_of(
    resource: &[KeyValue],
    context: &MapContext<'_>,
) -> Result<String, (RefusalReason, String)> {
    too_many_attributes("resource", resource)?;
    let named = find(resource, context.tenant_attribute);
    let named = match named {
        None => None,
        Some(value) => match &value.value {
            Some(any_value::Value::StringValue(text)) if !text.is_empty() => Some(text.as_str()),
            _ => {
                return Err((
                    RefusalReason::NoTenant,
                    format!(
                        "resource attribute `{}` must be a non-empty string",
                        context.tenant_attribute
                    ),
                ))
            }
        },
    };
    match (named, context.key_tenant) {
        (Some(named), Some(key)) if named != key => Err((
            RefusalReason::WrongTenant,
            format!(
                "resource attribute `{}` names another tenant than the API key's",
                context.tenant_attribute
            ),
        )),
        (_, Some(key)) => Ok(key.to_string()),
        (Some(named), None) if named.len() > MAX_ATTRIBUTE_BYTES => Err((
            RefusalReason::NoTenant,
            format!(
                "resource attribute `{}` is longer than {MAX_ATTRIBUTE_BYTES} bytes",
                context.tenant_attribute
            ),
        )),
        (Some(named), None) => Ok(named.to_string()),
        (None, None) => Err((
            RefusalReason::NoTenant,
            format!(
                "resource attribute `{}` missing (it names the tenant)",
                context.tenant_attribute
            ),
        )),
    }
}

/// A meter's dimensions from the point's attributes, then the resource's.
pub(super) fn dimensions(meter: &Meter, point: &[KeyValue], resource: &[KeyValue]) -> Result<Dims, String> {
    let mut dims = Vec::with_capacity(meter.group_by_attributes.len());
    for (name, attribute) in &meter.group_by_attributes {
        let Some(value) = find(point, attribute).or_else(|| find(resource, attribute)) else {
            continue;
        };
        let Some(text) = attribute_text(value) else {
            return Err(format!(
                "attribute `{attribute}` (group_by `{name}`) must be a string, number or boolean"
            ));
        };
        if text.len() > MAX_DIMENSION_VALUE_BYTES {
            return Err(format!(
                "attribute `{attribute}` (group_by `{name}`) is {} bytes, more than {MAX_DIMENSION_VALUE_BYTES}",
                text.len()
            ));
        }
        dims.push((name.clone(), text));
    }
    Ok(dims)
}

/// A fingerprint of `meter`'s dimension values for a point (`model::DimsCache`): each value
/// hashes self-delimited (type tag, length), an absent one as `0xff`.
pub(super) fn dims_fingerprint(meter: &Meter, point: &[KeyValue], resource: &[KeyValue]) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&meter.id.to_le_bytes());
    for (_, attribute) in &meter.group_by_attributes {
        match find(point, attribute).or_else(|| find(resource, attribute)) {
            None => hasher.update(&[0xff]),
            Some(value) => hash_value(&mut hasher, value.value.as_ref()),
        }
    }
    hasher.digest128()
}

/// The interned id of `meter`'s dimensions for a point, or why they cannot be read.
pub(super) fn lookup_dims(
    cache: &mut DimsCache,
    meter: &Meter,
    point: &[KeyValue],
    resource: &[KeyValue],
    names: &Names,
) -> Result<DimsRef, String> {
    cache.lookup(Some(dims_fingerprint(meter, point, resource)), names, || {
        dimensions(meter, point, resource)
    })
}

/// Identity of a point's stream without the meter: tenant (it may come from an API key, not
/// the resource), resource, scope, metric, attributes.
pub(super) fn series_hash(tenant: &str, scope_hash: u128, metric: &str, attributes: &[KeyValue]) -> u128 {
    let mut hasher = HashInput::default();
    hash_str(&mut hasher, tenant);
    hasher.update(&scope_hash.to_le_bytes());
    hash_str(&mut hasher, metric);
    hash_attributes(&mut hasher, attributes);
    hasher.digest128()
}

/// A scope's part of its points' identity: the resource's attributes, the scope's name and
/// version.
pub(super) fn scope_hash(resource_hash: u128, scope: Option<(&str, &str)>) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&resource_hash.to_le_bytes());
    if let Some((name, version)) = scope {
        hash_str(&mut hasher, name);
        hash_str(&mut hasher, version);
    }
    hasher.digest128()
}

/// One bucket of a histogram stream (the bucket's index: bounds must not change mid-stream,
/// as the OTLP data model requires of cumulative points).
pub(super) fn bucket_stream(stream: u128, bucket: i64) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&stream.to_le_bytes());
    hasher.update(&bucket.to_le_bytes());
    hasher.digest128()
}

pub(super) fn with_meter(series: u128, slug: &str) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&series.to_le_bytes());
    hash_str(&mut hasher, slug);
    hasher.digest128()
}

/// A delta point's identity for dedup: the same point re-sent by a retrying collector has the
/// same stream, start and time; two different points of one stream never do.
/// `series` already names the tenant. One-shot over a fixed layout with its own seed, apart from
/// CloudEvents and log-record ids (it runs once per point).
pub(super) fn point_dedup_key(series: u128, start_ns: u64, time_ns: u64) -> u128 {
    const POINT_KEY_SEED: u64 = 0x6f74_6c70_2e70_6f69; // "otlp.poi"
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&series.to_le_bytes());
    bytes[16..24].copy_from_slice(&start_ns.to_le_bytes());
    bytes[24..].copy_from_slice(&time_ns.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128_with_seed(&bytes, POINT_KEY_SEED)
}
