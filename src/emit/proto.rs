//! Rated records as protobuf (`proto/tallyd/rated/v1/rated.proto`), for Kafka consumers who
//! want it. Hand-derived prost messages mirror the .proto field by field (no protoc at build
//! time); `tests/proto_schema.rs` checks them against protoc's reading of the file.

use crate::rate::record::RatedRecord;

#[derive(Clone, PartialEq, prost::Message)]
pub struct TierAmountProto {
    #[prost(uint32, tag = "1")]
    pub tier: u32,
    #[prost(string, tag = "2")]
    pub units: String,
    #[prost(string, tag = "3")]
    pub unit_price: String,
    #[prost(string, tag = "4")]
    pub flat_price: String,
    #[prost(string, tag = "5")]
    pub amount: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RatedRecordProto {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub record_id: String,
    #[prost(uint32, tag = "3")]
    pub revision: u32,
    #[prost(string, tag = "4")]
    pub tenant: String,
    #[prost(string, tag = "5")]
    pub meter: String,
    #[prost(btree_map = "string, string", tag = "6")]
    pub dims: std::collections::BTreeMap<String, String>,
    #[prost(string, tag = "7")]
    pub window_start: String,
    #[prost(string, tag = "8")]
    pub window_end: String,
    #[prost(string, tag = "9")]
    pub period_start: String,
    #[prost(string, tag = "10")]
    pub period_end: String,
    #[prost(string, tag = "11")]
    pub quantity: String,
    #[prost(string, tag = "12")]
    pub amount: String,
    #[prost(string, tag = "13")]
    pub increment: String,
    #[prost(string, tag = "14")]
    pub currency: String,
    #[prost(string, tag = "15")]
    pub plan_id: String,
    #[prost(uint32, tag = "16")]
    pub plan_version: u32,
    #[prost(string, tag = "17")]
    pub model: String,
    #[prost(string, tag = "18")]
    pub discount_percent: String,
    #[prost(string, tag = "19")]
    pub period_quantity: String,
    #[prost(string, tag = "20")]
    pub period_amount: String,
    #[prost(message, repeated, tag = "21")]
    pub tiers: Vec<TierAmountProto>,
    #[prost(string, tag = "22")]
    pub event_time_from: String,
    #[prost(string, tag = "23")]
    pub event_time_to: String,
    #[prost(string, tag = "24")]
    pub rated_at: String,
    #[prost(string, tag = "25")]
    pub prepaid: String,
    #[prost(string, tag = "26")]
    pub overage: String,
}

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
