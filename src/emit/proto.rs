//! Rated records as protobuf (`proto/tallyd/rated/v1/rated.proto`), for Kafka consumers who
//! want it. The messages are generated from the .proto at build time (protox + prost-build, no
//! protoc); `tests/proto_schema.rs` also decodes the bytes with protoc's reading of the file.

use crate::rate::record::RatedRecord;

/// `tallyd.rated.v1`, generated from `proto/tallyd/rated/v1/rated.proto` at build time
/// (`build.rs`: protox + prost-build).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tallyd.rated.v1.rs"));
}

pub use v1::{RatedRecord as RatedRecordProto, TierAmount as TierAmountProto};

impl From<&RatedRecord> for RatedRecordProto {
    fn from(record: &RatedRecord) -> RatedRecordProto {
        RatedRecordProto {
            kind: record.kind.clone(),
            record_id: record.record_id.clone(),
            revision: record.revision,
            tenant: record.tenant.clone(),
            meter: record.meter.clone(),
            dims: record
                .dims
                .iter()
                .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_string()))
                .collect(),
            window_start: record.window_start.clone(),
            window_end: record.window_end.clone(),
            period_start: record.period_start.clone(),
            period_end: record.period_end.clone(),
            quantity: record.quantity.clone(),
            amount: record.amount.clone(),
            increment: record.increment.clone(),
            currency: record.currency.clone(),
            plan_id: record.plan_id.clone(),
            plan_version: record.plan_version,
            model: record.model.clone(),
            discount_percent: record.discount_percent.clone(),
            period_quantity: record.period_quantity.clone(),
            period_amount: record.period_amount.clone(),
            tiers: record
                .tiers
                .iter()
                .map(|tier| TierAmountProto {
                    tier: tier.tier as u32,
                    units: tier.units.clone(),
                    unit_price: tier.unit_price.clone(),
                    flat_price: tier.flat_price.clone(),
                    amount: tier.amount.clone(),
                })
                .collect(),
            event_time_from: record.event_time_from.clone(),
            event_time_to: record.event_time_to.clone(),
            rated_at: record.rated_at.clone(),
            prepaid: record.prepaid.clone(),
            overage: record.overage.clone(),
        }
    }
}

/// A JSON rated-record line as protobuf bytes (None: not a rated record).
pub fn encode_line(line: &[u8]) -> Option<Vec<u8>> {
    let record: RatedRecord = serde_json::from_slice(line).ok()?;
    Some(prost::Message::encode_to_vec(&RatedRecordProto::from(&record)))
}
