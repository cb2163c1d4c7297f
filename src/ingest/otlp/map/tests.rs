//! The mapping's tests: examples per shape, golden identities, property tests.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};

use crate::aggregate::streams::StreamKind;
use crate::aggregate::{AggState, Aggregation};
use crate::ingest::decode::dedup_key;
use crate::meter::Meters;
use crate::model::{Acceptance, Dims, Names};

use super::attributes::*;
use super::histograms::*;
use super::logs::*;
use super::metrics::*;
use super::*;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use proptest::prelude::*;

const NOW_MS: i64 = 1_795_321_200_000;
const NOW_NS: u64 = NOW_MS as u64 * 1_000_000;

fn meters(names: &Names) -> Meters {
    let config = crate::Config::load(
        r#"
[[meters]]
slug = "requests"
source = "otlp_metric"
metric_name = "http.server.requests"
aggregation = "SUM"
group_by = { route = "http.route", region = "cloud.region" }
scale = 0
[[meters]]
slug = "request_points"
source = "otlp_metric"
metric_name = "http.server.requests"
aggregation = "COUNT"
[[meters]]
slug = "storage_peak"
source = "otlp_metric"
metric_name = "storage.used"
aggregation = "MAX"
scale = 3
[[meters]]
slug = "storage_sum"
source = "otlp_metric"
metric_name = "storage.bad"
aggregation = "SUM"
[[meters]]
slug = "latency_count"
source = "otlp_metric"
metric_name = "latency"
aggregation = "COUNT"
[[meters]]
slug = "latency_sum"
source = "otlp_metric"
metric_name = "latency"
aggregation = "SUM"
scale = 3
[[meters]]
slug = "runs"
source = "otlp_log"
event_name = "workflow.run"
value_attribute = "steps"
id_attribute = "event.id"
aggregation = "SUM"
scale = 0
"#,
        &Default::default(),
    )
    .unwrap();
    Meters::new(config.meters, names)
}

fn context<'a>(meters: &'a Meters, names: &'a Names, key_tenant: Option<&'a str>) -> MapContext<'a> {
    MapContext {
        meters,
        names,
        tenant_attribute: "tenant.id",
        key_tenant,
        now_ms: NOW_MS,
        acceptance: Acceptance {
            allowed_lateness_secs: 60,
            max_lateness_secs: 86_400,
            max_future_secs: 300,
            not_before_ms: i64::MIN,
        },
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn number(value: number_data_point::Value, attributes: Vec<KeyValue>, time: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: NOW_NS - 60_000_000_000,
        time_unix_nano: time,
        value: Some(value),
        ..Default::default()
    }
}

fn request(tenant: Option<&str>, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: tenant
                    .map(|t| vec![text("tenant.id", t), text("cloud.region", "eu")])
                    .unwrap_or_default(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn sum(
    name: &str,
    temporality: AggregationTemporality,
    monotonic: bool,
    points: Vec<NumberDataPoint>,
) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: temporality as i32,
            is_monotonic: monotonic,
        })),
        ..Default::default()
    }
}

fn int(value: i64) -> number_data_point::Value {
    number_data_point::Value::AsInt(value)
}

#[test]
fn delta_sums_add_with_a_dedup_key_and_resource_dimensions() {
    let names = Names::default();
    let meters = meters(&names);
    let points = vec![number(int(5), vec![text("http.route", "/a")], NOW_NS)];
    let metric = sum(
        "http.server.requests",
        AggregationTemporality::Delta,
        true,
        points,
    );
    let mapped = map_metrics(
        &request(Some("acme"), vec![metric.clone()]),
        &context(&meters, &names, None),
    );
    assert_eq!((mapped.total, mapped.accepted(), mapped.refused.len()), (1, 1, 0));
    let point = &mapped.points[0];
    assert!(point.dedup_key.is_some());
    let mut states: Vec<(String, Dims, AggState)> = point
        .updates
        .iter()
        .map(|(key, state)| {
            (
                names.meters.resolve(key.meter).to_string(),
                names.dims.resolve(key.dims).to_vec(),
                state.clone(),
            )
        })
        .collect();
    states.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        states,
        vec![
            ("request_points".into(), Vec::new(), AggState::Count(1)),
            (
                "requests".into(),
                vec![("region".into(), "eu".into()), ("route".into(), "/a".into())],
                AggState::Sum(5.into())
            ),
        ]
    );
    // The same point re-sent has the same key; another tenant's does not.
    let again = map_metrics(
        &request(Some("acme"), vec![metric.clone()]),
        &context(&meters, &names, None),
    );
    assert_eq!(again.points[0].dedup_key, point.dedup_key);
    let other = map_metrics(
        &request(Some("globex"), vec![metric]),
        &context(&meters, &names, None),
    );
    assert_ne!(other.points[0].dedup_key, point.dedup_key);
}

/// Tenant `acme`'s monotonic `http.server.requests` points, mapped.
fn map_requests(
    meters: &Meters,
    names: &Names,
    temporality: AggregationTemporality,
    points: Vec<NumberDataPoint>,
) -> Mapped {
    let metric = sum("http.server.requests", temporality, true, points);
    map_metrics(
        &request(Some("acme"), vec![metric]),
        &context(meters, names, None),
    )
}

#[test]
fn points_sharing_a_request_get_their_own_dimensions() {
    let names = Names::default();
    let meters = meters(&names);
    let int_attribute = |key: &str, value: i64| KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    };
    // (attributes, expected `requests` dims); the resource says region "eu".
    type Case = (Vec<KeyValue>, Vec<(&'static str, &'static str)>);
    let cases: Vec<Case> = vec![
        (
            vec![text("http.route", "/a")],
            vec![("region", "eu"), ("route", "/a")],
        ),
        (
            vec![text("http.route", "/b")],
            vec![("region", "eu"), ("route", "/b")],
        ),
        (
            vec![text("http.route", "/a")],
            vec![("region", "eu"), ("route", "/a")],
        ),
        (vec![], vec![("region", "eu")]),
        (
            vec![text("http.route", "")],
            vec![("region", "eu"), ("route", "")],
        ),
        (
            vec![int_attribute("http.route", 7)],
            vec![("region", "eu"), ("route", "7")],
        ),
        (
            vec![text("http.route", "7")],
            vec![("region", "eu"), ("route", "7")],
        ),
        (
            vec![text("cloud.region", "us"), text("http.route", "/a")],
            vec![("region", "us"), ("route", "/a")],
        ),
    ];
    let points = cases
        .iter()
        .enumerate()
        .map(|(i, (attributes, _))| number(int(1), attributes.clone(), NOW_NS + i as u64))
        .collect();
    let mapped = map_requests(&meters, &names, AggregationTemporality::Delta, points);
    assert_eq!(mapped.points.len(), cases.len());
    let requests = names.meters.get("requests").unwrap();
    for (point, (_, expected)) in mapped.points.iter().zip(&cases) {
        let (key, _) = point
            .updates
            .iter()
            .find(|(key, _)| key.meter == requests)
            .unwrap();
        let mut expected: Dims = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expected.sort();
        let mut got = names.dims.resolve(key.dims).to_vec();
        got.sort();
        assert_eq!(got, expected);
    }
}

#[test]
fn cumulative_sums_become_stream_points() {
    let names = Names::default();
    let meters = meters(&names);
    let points = vec![number(int(40), vec![text("http.route", "/a")], NOW_NS)];
    let mapped = map_requests(&meters, &names, AggregationTemporality::Cumulative, points);
    assert_eq!(mapped.cumulative.len(), 1);
    let point = &mapped.cumulative[0];
    assert_eq!(
        (point.value, point.kind, point.aggregation),
        (40, StreamKind::Cumulative { monotonic: true }, Aggregation::Sum)
    );
    // The COUNT meter counts the point directly (deduplicated).
    assert_eq!(mapped.points.len(), 1);
    assert_eq!(mapped.points[0].updates[0].1, AggState::Count(1));
}

#[test]
fn bad_points_are_refused_one_by_one_with_reasons() {
    let names = Names::default();
    let meters = meters(&names);
    let route = || vec![text("http.route", "/a")];
    let points = vec![
        number(int(1), route(), NOW_NS),
        number(number_data_point::Value::AsDouble(f64::NAN), route(), NOW_NS),
        number(number_data_point::Value::AsDouble(f64::INFINITY), route(), NOW_NS),
        number(int(-1), route(), NOW_NS),
        number(int(1), route(), 0),
        number(int(1), route(), NOW_NS - 2 * 86_400 * 1_000_000_000),
        number(int(1), route(), NOW_NS + 3_600 * 1_000_000_000),
        number(int(1), vec![text("http.route", &"r".repeat(300))], NOW_NS),
    ];
    let gauge = Metric {
        name: "storage.bad".into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![number(int(1), Vec::new(), NOW_NS)],
        })),
        ..Default::default()
    };
    let metrics = vec![
        sum(
            "http.server.requests",
            AggregationTemporality::Delta,
            true,
            points,
        ),
        gauge,
    ];
    let mapped = map_metrics(&request(Some("acme"), metrics), &context(&meters, &names, None));
    assert_eq!((mapped.total, mapped.accepted()), (9, 1));
    let reasons: Vec<(RefusalReason, &str)> = mapped
        .refused
        .iter()
        .map(|refusal| (refusal.reason, refusal.message.as_str()))
        .collect();
    let has = |reason: RefusalReason, text: &str| {
        assert!(
            reasons
                .iter()
                .any(|(r, message)| *r == reason && message.contains(text)),
            "{reason:?} {text}: {reasons:?}"
        )
    };
    has(RefusalReason::Invalid, "NaN or infinite");
    has(RefusalReason::Invalid, "negative value on a monotonic sum");
    has(RefusalReason::Invalid, "time_unix_nano missing");
    has(RefusalReason::TooLate, "max_lateness_secs");
    has(RefusalReason::TooFarInFuture, "max_future_secs");
    has(RefusalReason::Invalid, "more than 256");
    has(RefusalReason::Invalid, "a gauge is not additive");
    assert_eq!(mapped.refused.len(), 8);
    let summary = mapped.refusal_summary("data points");
    assert!(summary.starts_with("8 of 9 data points rejected: "), "{summary}");
}

#[test]
fn tenants_come_from_the_resource_or_the_api_key() {
    let names = Names::default();
    let meters = meters(&names);
    let metric = || {
        sum(
            "http.server.requests",
            AggregationTemporality::Delta,
            true,
            vec![number(int(1), Vec::new(), NOW_NS)],
        )
    };
    let none = map_metrics(&request(None, vec![metric()]), &context(&meters, &names, None));
    assert_eq!(none.refused[0].reason, RefusalReason::NoTenant);
    let keyed = map_metrics(
        &request(None, vec![metric()]),
        &context(&meters, &names, Some("acme")),
    );
    assert_eq!(keyed.accepted(), 1);
    let key = keyed.points[0].updates[0].0;
    assert_eq!(&*names.tenants.resolve(key.tenant), "acme");
    let spoofed = map_metrics(
        &request(Some("globex"), vec![metric()]),
        &context(&meters, &names, Some("acme")),
    );
    assert_eq!(spoofed.refused[0].reason, RefusalReason::WrongTenant);
}

#[test]
fn histograms_feed_count_and_sum() {
    let names = Names::default();
    let meters = meters(&names);
    let histogram = |temporality: AggregationTemporality| Metric {
        name: "latency".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                start_time_unix_nano: NOW_NS - 1,
                time_unix_nano: NOW_NS,
                count: 3,
                sum: Some(0.1 + 0.2 + 0.25),
                ..Default::default()
            }],
            aggregation_temporality: temporality as i32,
        })),
        ..Default::default()
    };
    let mapped = map_metrics(
        &request(Some("acme"), vec![histogram(AggregationTemporality::Delta)]),
        &context(&meters, &names, None),
    );
    let mut states: Vec<AggState> = mapped.points[0]
        .updates
        .iter()
        .map(|(_, state)| state.clone())
        .collect();
    states.sort_by_key(|state| state.kind());
    assert_eq!(states, vec![AggState::Count(3), AggState::Sum(550.into())]);
    let mapped = map_metrics(
        &request(Some("acme"), vec![histogram(AggregationTemporality::Cumulative)]),
        &context(&meters, &names, None),
    );
    let mut values: Vec<i128> = mapped.cumulative.iter().map(|point| point.value).collect();
    values.sort();
    assert_eq!(values, vec![3, 550]);
}

#[test]
fn histogram_buckets_become_distribution_observations() {
    use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets as ExpBuckets;
    let explicit = Buckets::Explicit {
        bounds: &[1.0, 10.0],
        counts: &[2, 3, 4],
    };
    assert_eq!(
        bucket_values(&explicit, Some(0.5), Some(20.0)).unwrap(),
        vec![(0, 0.75, 2), (1, 5.5, 3), (2, 20.0, 4)]
    );
    assert!(bucket_values(
        &Buckets::Explicit {
            bounds: &[1.0],
            counts: &[1]
        },
        None,
        None
    )
    .is_err());
    let positive = ExpBuckets {
        offset: 0,
        bucket_counts: vec![1, 0, 2],
    };
    // Scale 0: base 2, bucket k covers (2^k, 2^(k+1)], taken at 2^(k + 0.5).
    let exponential = Buckets::Exponential {
        scale: 0,
        zero_count: 5,
        positive: Some(&positive),
        negative: None,
    };
    let values = bucket_values(&exponential, None, None).unwrap();
    assert_eq!(values[0], (i64::MIN, 0.0, 5));
    assert!((values[1].1 - 2f64.sqrt()).abs() < 1e-12 && values[1].2 == 1);
    assert!((values[2].1 - 2f64.powf(2.5)).abs() < 1e-9 && values[2].2 == 2);
    let negative = ExpBuckets {
        offset: 0,
        bucket_counts: vec![1],
    };
    let with_negative = Buckets::Exponential {
        scale: 0,
        zero_count: 0,
        positive: None,
        negative: Some(&negative),
    };
    assert!(bucket_values(&with_negative, None, None).is_err());
    assert!(bucket_values(&Buckets::None, None, None).is_err());
}

fn log_request(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![text("tenant.id", "acme"), text("service.name", "engine")],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn record(attributes: Vec<KeyValue>) -> LogRecord {
    LogRecord {
        time_unix_nano: NOW_NS,
        attributes,
        ..Default::default()
    }
}

#[test]
fn log_records_are_events_with_ids() {
    let names = Names::default();
    let meters = meters(&names);
    let steps = |n: i64| KeyValue {
        key: "steps".into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(n)),
        }),
        ..Default::default()
    };
    let records = vec![
        record(vec![
            text("event.name", "workflow.run"),
            text("event.id", "r1"),
            steps(4),
        ]),
        record(vec![
            text("event.name", "workflow.run"),
            text("event.id", "r1"),
            steps(4),
        ]),
        record(vec![text("event.name", "workflow.run"), steps(2)]),
        record(vec![
            text("event.name", "workflow.run"),
            text("event.id", "r2"),
            text("steps", "many"),
        ]),
        record(vec![text("event.name", "other")]),
        record(Vec::new()),
    ];
    let mapped = map_logs(&log_request(records), &context(&meters, &names, None));
    assert_eq!((mapped.total, mapped.unmetered, mapped.refused.len()), (6, 2, 2));
    assert_eq!(mapped.points.len(), 2);
    assert_eq!(mapped.points[0].dedup_key, mapped.points[1].dedup_key);
    assert_eq!(
        mapped.points[0].dedup_key,
        Some(dedup_key("acme", "engine", "r1"))
    );
    assert_eq!(mapped.points[0].updates[0].1, AggState::Sum(4.into()));
    assert!(mapped
        .refused
        .iter()
        .any(|r| r.message.contains("`event.id` missing")));
    assert!(mapped
        .refused
        .iter()
        .any(|r| r.message.contains("`steps` is not a finite decimal number")));
}

/// Identities are stored (dedup keys in RocksDB and the ingest log, stream states), so a
/// new version must compute exactly the old values or retries after an upgrade would count
/// twice and cumulative streams restart. These values come from the first implementation.
#[test]
fn stored_identities_keep_their_values() {
    let attributes = vec![
        text("http.route", "/v1/r3"),
        KeyValue {
            key: "code".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(200)),
            }),
            ..Default::default()
        },
        KeyValue {
            key: "list".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::ArrayValue(
                    opentelemetry_proto::tonic::common::v1::ArrayValue {
                        values: vec![AnyValue {
                            value: Some(any_value::Value::BoolValue(true)),
                        }],
                    },
                )),
            }),
            ..Default::default()
        },
    ];
    let series = series_hash(
        "acme",
        0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
        "http.server.requests",
        &attributes,
    );
    assert_eq!(series, 0xf53bbd772eb3aceadbebac1abc194bfa);
    assert_eq!(point_dedup_key(series, 1, 2), 0x2ce8729e1823db89dcc42e3af2334f17);
    assert_eq!(with_meter(series, "requests"), 0x4f6761613286748eccd85c0dcb6de958);
    assert_eq!(bucket_stream(series, -3), 0xe18fac28c7b14e112446703032aba5b2);
    let mut hasher = HashInput::default();
    hash_attributes(&mut hasher, &attributes);
    assert_eq!(hasher.digest128(), 0x8b277837f25d68ac1e8137ebb85708d2);
    let mut resource = HashInput::default();
    hash_attributes(&mut resource, &attributes[..2]);
    assert_eq!(
        scope_hash(resource.digest128(), Some(("io.opentelemetry.sdk", "1.2.3"))),
        0x906ffc736d06a3b34fe91f57c13880cb
    );
}

fn any_double() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(1e300),
        Just(-1e-300),
        -1e6f64..1e6,
        any::<f64>(),
    ]
}

fn any_time() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(NOW_NS),
        (NOW_NS - 3_600_000_000_000)..(NOW_NS + 3_600_000_000_000),
        any::<u64>(),
    ]
}

fn any_number_point() -> impl Strategy<Value = NumberDataPoint> {
    (
        any_time(),
        any_time(),
        prop_oneof![
            any::<i64>().prop_map(number_data_point::Value::AsInt),
            any_double().prop_map(number_data_point::Value::AsDouble),
        ],
        proptest::option::of("[a-z/]{0,300}"),
    )
        .prop_map(|(start, time, value, route)| NumberDataPoint {
            attributes: route.map(|r| vec![text("http.route", &r)]).unwrap_or_default(),
            start_time_unix_nano: start,
            time_unix_nano: time,
            value: Some(value),
            ..Default::default()
        })
}

proptest! {
    /// An SDK halving a cumulative exponential histogram's resolution (merging bucket pairs)
    /// leaves its canonical buckets unchanged, so every canonical stream stays monotonic.
    #[test]
    fn rescaling_keeps_canonical_buckets(
        scale in CANONICAL_SCALE + 1..12,
        offset in -200i32..200,
        counts in proptest::collection::vec(0u64..50, 1..40),
        zero in 0u64..5,
    ) {
        use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets as ExpBuckets;
        let fine = ExpBuckets { offset, bucket_counts: counts.clone() };
        // Downscale by one: index i → i >> 1 (floor), as SDKs do.
        let coarse_offset = offset >> 1;
        let mut coarse_counts = Vec::new();
        for (k, count) in counts.iter().enumerate() {
            let target = ((offset + k as i32) >> 1) - coarse_offset;
            if coarse_counts.len() <= target as usize {
                coarse_counts.resize(target as usize + 1, 0);
            }
            coarse_counts[target as usize] += count;
        }
        let coarse = ExpBuckets { offset: coarse_offset, bucket_counts: coarse_counts };
        let before = canonical_buckets(scale, zero, Some(&fine), None, None).unwrap();
        let after = canonical_buckets(scale - 1, zero, Some(&coarse), None, None).unwrap();
        prop_assert_eq!(before, after);
    }
}

#[test]
fn coarse_cumulative_exponential_histograms_are_refused() {
    let error = canonical_buckets(CANONICAL_SCALE - 1, 0, None, None, None).unwrap_err();
    assert!(error.contains("DELTA"), "{error}");
}

fn any_metric() -> impl Strategy<Value = Metric> {
    use opentelemetry_proto::tonic::metrics::v1::{
        exponential_histogram_data_point, ExponentialHistogram, ExponentialHistogramDataPoint, Summary,
        SummaryDataPoint,
    };
    let names = proptest::sample::select(vec![
        "http.server.requests",
        "storage.used",
        "storage.bad",
        "latency",
        "other",
    ]);
    let data = prop_oneof![
        proptest::collection::vec(any_number_point(), 0..4)
            .prop_map(|data_points| metric::Data::Gauge(Gauge { data_points })),
        (
            proptest::collection::vec(any_number_point(), 0..4),
            -1i32..4,
            any::<bool>()
        )
            .prop_map(|(data_points, temporality, monotonic)| metric::Data::Sum(Sum {
                data_points,
                aggregation_temporality: temporality,
                is_monotonic: monotonic,
            })),
        (
            any_time(),
            proptest::collection::vec(any_double(), 0..5),
            proptest::collection::vec(0u64..1000, 0..7),
            proptest::option::of(any_double()),
            proptest::option::of(any_double()),
            -1i32..4,
        )
            .prop_map(|(time, bounds, counts, sum, max, temporality)| {
                metric::Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        start_time_unix_nano: time.saturating_sub(1),
                        time_unix_nano: time,
                        count: counts.iter().sum(),
                        sum,
                        bucket_counts: counts,
                        explicit_bounds: bounds,
                        max,
                        min: sum,
                        ..Default::default()
                    }],
                    aggregation_temporality: temporality,
                })
            }),
        (
            any_time(),
            -20i32..30,
            any::<i32>(),
            proptest::collection::vec(0u64..100, 0..5),
            0u64..3
        )
            .prop_map(|(time, scale, offset, counts, zero_count)| {
                metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![ExponentialHistogramDataPoint {
                        start_time_unix_nano: time.saturating_sub(1),
                        time_unix_nano: time,
                        count: counts.iter().sum::<u64>() + zero_count,
                        scale,
                        zero_count,
                        positive: Some(exponential_histogram_data_point::Buckets {
                            offset,
                            bucket_counts: counts.clone(),
                        }),
                        negative: Some(exponential_histogram_data_point::Buckets {
                            offset,
                            bucket_counts: counts,
                        }),
                        ..Default::default()
                    }],
                    aggregation_temporality: 1,
                })
            }),
        (any_time(), any_double()).prop_map(|(time, sum)| metric::Data::Summary(Summary {
            data_points: vec![SummaryDataPoint {
                time_unix_nano: time,
                sum,
                count: 3,
                ..Default::default()
            }],
        })),
    ];
    (names, proptest::option::of(data)).prop_map(|(name, data)| Metric {
        name: name.into(),
        data,
        ..Default::default()
    })
}

fn every_aggregation(names: &Names) -> Meters {
    let mut text = String::new();
    for (name, aggregations) in [
        (
            "http.server.requests",
            vec!["SUM", "COUNT", "MAX", "TIME_WEIGHTED", "DISTRIBUTION"],
        ),
        ("storage.used", vec!["MIN", "LATEST", "TIME_WEIGHTED"]),
        ("latency", vec!["SUM", "COUNT", "MAX", "MIN", "DISTRIBUTION"]),
    ] {
        for (i, aggregation) in aggregations.iter().enumerate() {
            let scale = if i % 2 == 0 { 18 } else { 0 };
            let value_scale = if *aggregation == "COUNT" {
                String::new()
            } else {
                format!("scale = {scale}\n")
            };
            text.push_str(&format!(
                "[[meters]]\nslug = \"m{}\"\nsource = \"otlp_metric\"\nmetric_name = \"{name}\"\naggregation = \"{aggregation}\"\ngroup_by = {{ route = \"http.route\" }}\n{value_scale}",
                text.len()
            ));
        }
    }
    Meters::new(
        crate::Config::load(&text, &Default::default()).unwrap().meters,
        names,
    )
}

proptest! {
    /// Whatever a client sends, mapping never panics and accounts for every point: each is
    /// accepted, refused with a reason, or unmetered; and the accepted ones fold (with the
    /// commit stage's stream conversion) without a panic.
    #[test]
    fn any_request_maps_without_panicking_and_accounts_for_every_point(
        resources in proptest::collection::vec(
            (proptest::option::of("[a-z]{0,3}|x{257}"), proptest::collection::vec(any_metric(), 0..4)),
            0..3,
        ),
        key_tenant in proptest::option::of(Just("acme")),
    ) {
        let names = Names::default();
        let meters = every_aggregation(&names);
        let request = ExportMetricsServiceRequest {
            resource_metrics: resources
                .into_iter()
                .map(|(tenant, metrics)| {
                    let mut request = request(None, metrics);
                    if let Some(tenant) = tenant {
                        request.resource_metrics[0].resource = Some(Resource {
                            attributes: vec![text("tenant.id", &tenant)],
                            ..Default::default()
                        });
                    }
                    request.resource_metrics.remove(0)
                })
                .collect(),
        };
        let mapped = map_metrics(&request, &context(&meters, &names, key_tenant));
        let points: usize = request
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| point_shapes(m).len())
            .sum();
        prop_assert_eq!(mapped.total, points);
        prop_assert!(mapped.refused.len() + mapped.unmetered <= mapped.total);
        prop_assert!(mapped.refused.iter().all(|refusal| !refusal.message.is_empty()));
        let mut batch = crate::aggregate::PreAggregated::default();
        for point in &mapped.points {
            for (key, state) in &point.updates {
                let _ = batch.merge_state(*key, state);
            }
        }
        let mut streams = crate::aggregate::streams::Streams::default();
        let _ = streams.fold(&mapped.cumulative, &mut batch, &mut Default::default());
    }

    /// Gathering the bytes and hashing them at once gives what streaming them gives, for
    /// any split into pieces (the identities were first computed with a streaming hasher).
    #[test]
    fn gathered_input_hashes_as_streamed(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
        let mut streamed = xxhash_rust::xxh3::Xxh3::new();
        let mut gathered = HashInput::default();
        for piece in &pieces {
            streamed.update(piece);
            gathered.update(piece);
        }
        prop_assert_eq!(gathered.digest128(), streamed.digest128());
    }

    /// SDKs need not order attributes: a point's identity (dedup key, stream) ignores order.
    #[test]
    fn attribute_order_does_not_change_identity(
        attributes in proptest::collection::btree_map("[a-z]{1,4}", "[a-z0-9]{0,6}", 0..6),
        seed in any::<u64>(),
    ) {
        let names = Names::default();
        let meters = meters(&names);
        let mut ordered: Vec<KeyValue> = attributes.iter().map(|(k, v)| text(k, v)).collect();
        let mapped_for = |attributes: Vec<KeyValue>, temporality| {
            let metric = sum("http.server.requests", temporality, true, vec![number(int(3), attributes, NOW_NS)]);
            map_metrics(&request(Some("acme"), vec![metric]), &context(&meters, &names, None))
        };
        let first = mapped_for(ordered.clone(), AggregationTemporality::Delta);
        let first_cumulative = mapped_for(ordered.clone(), AggregationTemporality::Cumulative);
        let len = ordered.len().max(1);
        ordered.rotate_left((seed as usize) % len);
        ordered.reverse();
        let second = mapped_for(ordered.clone(), AggregationTemporality::Delta);
        let second_cumulative = mapped_for(ordered, AggregationTemporality::Cumulative);
        prop_assert_eq!(first.points[0].dedup_key, second.points[0].dedup_key);
        prop_assert_eq!(first_cumulative.cumulative[0].stream, second_cumulative.cumulative[0].stream);
    }
}

/// Points that would start series past the tenant's cap are refused alone (reason
/// `cardinality_limit`), after their readings were checked and before anything of theirs is
/// interned; a point of an existing series still maps.
#[test]
fn points_past_the_series_cap_are_refused_and_nothing_of_them_is_interned() {
    let names = Names::default();
    names.series.set_limits(4, 100);
    let meters = meters(&names);
    // Each point is a `request_points` series (shared) and a `requests` series per route.
    let points = (0..5)
        .map(|i| number(int(1), vec![text("http.route", &format!("/r{i}"))], NOW_NS))
        .collect();
    let mapped = map_requests(&meters, &names, AggregationTemporality::Delta, points);
    assert_eq!((mapped.accepted(), mapped.refused.len()), (3, 2));
    assert!(mapped
        .refused
        .iter()
        .all(|refusal| refusal.reason == RefusalReason::CardinalityLimit));
    let route = |value: &str| {
        vec![
            ("region".to_string(), "eu".to_string()),
            ("route".to_string(), value.to_string()),
        ]
    };
    assert!(names.dims.get(&route("/r2")).is_some());
    assert_eq!(names.dims.get(&route("/r3")), None);
    let again = map_requests(
        &meters,
        &names,
        AggregationTemporality::Delta,
        vec![number(int(1), vec![text("http.route", "/r0")], NOW_NS + 1)],
    );
    assert_eq!((again.accepted(), again.refused.len()), (1, 0));
}

/// Attribute lookups scan a point's and its resource's attributes for every meter, so more
/// than `MAX_ATTRIBUTES` on a resource, scope or point is refused (reason `invalid`, naming
/// the cap): a request's mapping cost stays linear in its size.
#[test]
fn resources_scopes_and_points_with_too_many_attributes_are_refused() {
    use crate::model::MAX_ATTRIBUTES;
    let names = Names::default();
    let meters = meters(&names);
    let many = |prefix: &str| -> Vec<KeyValue> {
        (0..=MAX_ATTRIBUTES)
            .map(|i| text(&format!("{prefix}.{i}"), "v"))
            .collect()
    };
    let points = || vec![number(int(1), vec![text("http.route", "/a")], NOW_NS)];
    let metric = || {
        sum(
            "http.server.requests",
            AggregationTemporality::Delta,
            true,
            points(),
        )
    };

    let mut wide_resource = request(Some("acme"), vec![metric()]);
    let resource = wide_resource.resource_metrics[0].resource.as_mut().unwrap();
    resource.attributes.extend(many("r"));
    let mut wide_scope = request(Some("acme"), vec![metric()]);
    wide_scope.resource_metrics[0].scope_metrics[0].scope = Some(InstrumentationScope {
        attributes: many("s"),
        ..Default::default()
    });
    let mut attributes = many("p");
    attributes.push(text("http.route", "/a"));
    let wide_point = request(
        Some("acme"),
        vec![sum(
            "http.server.requests",
            AggregationTemporality::Delta,
            true,
            vec![number(int(1), attributes, NOW_NS)],
        )],
    );
    for (what, request) in [
        ("resource", wide_resource),
        ("scope", wide_scope),
        ("data point", wide_point),
    ] {
        let mapped = map_metrics(&request, &context(&meters, &names, None));
        assert_eq!((mapped.accepted(), mapped.refused.len()), (0, 1), "{what}");
        let refusal = &mapped.refused[0];
        assert_eq!(refusal.reason, RefusalReason::Invalid, "{what}");
        assert!(
            refusal.message.starts_with(&format!("the {what} has "))
                && refusal.message.ends_with(" attributes; at most 128"),
            "{}",
            refusal.message
        );
    }
    // At the cap, it maps.
    let mut at_cap = request(Some("acme"), vec![metric()]);
    let resource = at_cap.resource_metrics[0].resource.as_mut().unwrap();
    resource
        .attributes
        .extend(many("r").into_iter().take(MAX_ATTRIBUTES - 2));
    let mapped = map_metrics(&at_cap, &context(&meters, &names, None));
    assert_eq!((mapped.accepted(), mapped.refused.len()), (1, 0));
}
