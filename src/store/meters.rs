//! Meter shapes: what the store must know of each meter to read its stored states (aggregation,
//! scale, window size), recorded in `M meter/<slug>` keys, and the guard that refuses a config
//! change that would reinterpret them.

use std::collections::HashMap;

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{keys, RocksStore, StoreError};
use crate::meter::Meter;

/// What the store must know of a meter to interpret its stored states, kept in `M` keys so that
/// a meter removed from config can still be read, and an incompatible change is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeterShape {
    pub aggregation: String,
    pub scale: u32,
    pub window_secs: i64,
}

impl MeterShape {
    pub(super) fn encode(&self) -> String {
        format!("{}/{}/{}", self.aggregation, self.scale, self.window_secs)
    }

    pub(super) fn decode(text: &str) -> Option<MeterShape> {
        let mut parts = text.split('/');
        let shape = MeterShape {
            aggregation: parts.next()?.to_string(),
            scale: parts.next()?.parse().ok()?,
            window_secs: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(shape)
    }
}

pub type MeterCatalog = HashMap<String, MeterShape>;

impl RocksStore {
    /// Records each configured meter's shape, refusing a change that would reinterpret stored
    /// states (aggregation, scale or window size of an existing slug). Returns every known shape,
    /// including meters no longer configured.
    pub fn guard_meters(&self, meters: &[Meter]) -> Result<MeterCatalog, StoreError> {
        let mut catalog = MeterCatalog::new();
        let prefix = keys::meta_key("meter/");
        for item in self.db.iterator(IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let slug = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let shape = std::str::from_utf8(&value)
                .ok()
                .and_then(MeterShape::decode)
                .ok_or_else(|| StoreError::Corrupt {
                    what: "meter shape",
                    detail: slug.clone(),
                })?;
            catalog.insert(slug, shape);
        }
        let mut problems = Vec::new();
        let mut batch = WriteBatch::default();
        for meter in meters {
            let shape = MeterShape {
                aggregation: meter.aggregation.as_str().to_string(),
                scale: meter.scale,
                window_secs: meter.window_size.seconds(),
            };
            match catalog.get(&meter.slug) {
                Some(stored) if *stored != shape => problems.push(format!(
                    "meter `{}` was {} (stored data depends on it) and is now {}; keep it or use a new slug",
                    meter.slug,
                    stored.encode(),
                    shape.encode()
                )),
                Some(_) => {}
                None => {
                    batch.put(
                        keys::meta_key(&format!("meter/{}", meter.slug)),
                        shape.encode().as_bytes(),
                    );
                    catalog.insert(meter.slug.clone(), shape);
                }
            }
        }
        if !problems.is_empty() {
            return Err(StoreError::MeterChanged(problems.join("; ")));
        }
        self.write(batch, true)?;
        Ok(catalog)
    }
}
