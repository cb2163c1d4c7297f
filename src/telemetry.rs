//! Logs and metrics: tracing init, the Prometheus recorder, and the closed catalogue of metric
//! names. Labels come from closed sets (`source`, `outcome`, `reason`, `output`); a tenant id is
//! never a label (unbounded cardinality).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// `{source, outcome}`; outcome ∈ accepted | duplicate | refused | invalid.
pub const INGEST_EVENTS: &str = "tallyd_ingest_events_total";
/// `{source, reason}`: events refused by policy (and dead-lettered).
pub const INGEST_REFUSED: &str = "tallyd_ingest_refused_total";
/// `{source}`: accepted events that amended an already-closed window.
pub const INGEST_LATE: &str = "tallyd_ingest_late_events_total";
/// `{source}`: accepted events whose type matches no meter.
pub const INGEST_UNMETERED: &str = "tallyd_ingest_unmetered_events_total";
/// `{source, code}`: requests by HTTP status.
pub const INGEST_REQUESTS: &str = "tallyd_ingest_requests_total";
pub const INGEST_LOG_BYTES: &str = "tallyd_ingest_log_bytes_total";
/// Push requests refused because checkpoints are behind (`aggregate.max_pending_series`).
pub const INGEST_BACKPRESSURE: &str = "tallyd_ingest_backpressure_total";
/// Requests per group commit (one fsync each).
pub const INGEST_COMMIT_GROUP: &str = "tallyd_ingest_commit_group_requests";
/// `{source, stage}`: seconds a push request spends per stage (stage ∈ prepare | commit):
/// prepare = decode + map + dedup on the blocking pool; commit = waiting for the durable ack.
pub const INGEST_STAGE_SECONDS: &str = "tallyd_ingest_stage_seconds";
/// Series with a delta not yet checkpointed.
pub const ACTIVE_SERIES: &str = "tallyd_aggregate_active_series";
/// Dedup keys reserved or applied but not yet checkpointed.
pub const DEDUP_PENDING: &str = "tallyd_dedup_pending_keys";
/// Bulk moves of staged dedup keys into the store (`pipeline::dedup`), by outcome (ok, error).
pub const DEDUP_INGESTIONS: &str = "tallyd_dedup_ingestions_total";
pub const DEDUP_INGEST_DURATION: &str = "tallyd_dedup_ingest_seconds";
/// `{answer}`: dedup keys looked up past memory, answered by the filter (never stored) or by
/// the store's column family.
pub const DEDUP_LOOKUPS: &str = "tallyd_dedup_lookups_total";
/// Bytes of the current dedup filter (0: not built yet, or off).
pub const DEDUP_FILTER_BYTES: &str = "tallyd_dedup_filter_bytes";
/// Keys in the current dedup filter when it was built, plus those added since.
pub const DEDUP_FILTER_KEYS: &str = "tallyd_dedup_filter_keys";
/// `{outcome}`: builds of the dedup filter (ok, error).
pub const DEDUP_FILTER_BUILDS: &str = "tallyd_dedup_filter_builds_total";
pub const FLUSH_DURATION: &str = "tallyd_flush_duration_seconds";
pub const CHECKPOINT_BYTES: &str = "tallyd_checkpoint_bytes_total";
pub const CHECKPOINT_SERIES: &str = "tallyd_checkpoint_series_total";
pub const CHECKPOINT_FAILURES: &str = "tallyd_checkpoint_failures_total";
pub const CHECKPOINT_LAST_SUCCESS: &str = "tallyd_checkpoint_last_success_timestamp_seconds";
/// Seconds since the last successful checkpoint, at scrape time (alert when it exceeds a few
/// flush intervals: acknowledged usage is then only in the ingest log).
pub const CHECKPOINT_LAG: &str = "tallyd_checkpoint_lag_seconds";
/// `{output, kind}`.
pub const EMIT_RECORDS: &str = "tallyd_emit_records_total";
/// `{output}`.
pub const EMIT_FAILURES: &str = "tallyd_emit_failures_total";
/// Outbox lines an emitter has not delivered yet, by output.
pub const EMIT_BACKLOG: &str = "tallyd_emit_backlog_records";
/// `{output}`: records an output refused again and again (HTTP 4xx, a line it cannot encode),
/// set aside in `<data_dir>/parked/<output>.jsonl` so that the records behind them flow; sent
/// again by `POST /api/v1/outputs/{output}/replay`.
pub const EMIT_PARKED: &str = "tallyd_emit_parked_records_total";
/// Rated records produced by checkpoints, and windows that could not be rated (overflow).
pub const RATED_RECORDS: &str = "tallyd_rating_records_total";
pub const RATING_FAILURES: &str = "tallyd_rating_failures_total";
pub const PLAN_RELOADS: &str = "tallyd_rating_plan_reloads_total";
/// `{listener, reason}`: listener ∈ http | otlp_grpc | otlp_http; reason ∈ missing_key |
/// unknown_key | scope | tenant. Requests refused by authentication or authorization.
pub const AUTH_FAILURES: &str = "tallyd_auth_failures_total";
/// API key sets swapped in by a config reload.
pub const AUTH_RELOADS: &str = "tallyd_auth_key_reloads_total";
/// `{kind, outcome}`: kind ∈ quota | rate; outcome ∈ allowed | refused | warned (a soft quota
/// passed). Business decisions, apart from overload (`tallyd_ingest_backpressure_total`, 503).
pub const LIMIT_DECISIONS: &str = "tallyd_limit_decisions_total";
/// `{channel}`: limit states sent to listeners; channel ∈ watch | kafka | webhook.
pub const LIMIT_SIGNALS: &str = "tallyd_limit_signals_total";
/// `{service, code}`: calls on the limits listener; service ∈ rls | check | watch.
pub const LIMITS_REQUESTS: &str = "tallyd_limits_requests_total";
/// `{service}`: their latency, from the request to the answer.
pub const LIMITS_REQUEST_SECONDS: &str = "tallyd_limits_request_seconds";
pub const PLAN_RELOAD_FAILURES: &str = "tallyd_rating_plan_reload_failures_total";
pub const STORE_LIVE_BYTES: &str = "tallyd_store_live_bytes";
/// `{topic, partition}`: messages behind the high watermark, for partitions this replica owns.
pub const KAFKA_LAG: &str = "tallyd_kafka_consumer_lag";
/// Kafka messages consumed (events inside them: `tallyd_ingest_events_total{source="kafka"}`).
pub const KAFKA_MESSAGES: &str = "tallyd_kafka_messages_total";
/// `{kind}`: kind ∈ assign | revoke.
pub const KAFKA_REBALANCES: &str = "tallyd_kafka_rebalances_total";
pub const KAFKA_DEAD_LETTERS: &str = "tallyd_kafka_dead_letters_total";
/// Times the Kafka source rejoined its group because partitions had no live consumer.
pub const KAFKA_ORPHAN_REJOINS: &str = "tallyd_kafka_orphan_rejoins_total";
/// Dead-letter file rotations (`dead_letter.max_file_bytes`).
pub const FILE_ROTATIONS: &str = "tallyd_dead_letter_rotations_total";
/// `{listener}`: open connections; `{listener, reason}`: connections closed before a request,
/// reason ∈ max_connections | header_timeout (`ingest::listen`).
pub const CONNECTIONS_OPEN: &str = "tallyd_connections_open";
pub const CONNECTIONS_REFUSED: &str = "tallyd_connections_refused_total";
/// Seconds from a checkpoint making offsets durable to their commit to Kafka.
pub const KAFKA_COMMIT_DELAY: &str = "tallyd_kafka_commit_delay_seconds";
pub const KAFKA_ERRORS: &str = "tallyd_kafka_consumer_errors_total";
/// Times consumption paused because checkpoints fell behind (`kafka.max_pending_series`).
pub const KAFKA_PAUSES: &str = "tallyd_kafka_pauses_total";
/// `{}`: offsets a partition skipped between batches (see `SourceContext::check_gaps`).
pub const KAFKA_OFFSET_GAPS: &str = "tallyd_kafka_offset_gaps_total";
/// Distinct series (meter, tenant, dimension set) active in the current UTC day, counted
/// against `aggregate.max_series` (`model::cardinality`).
pub const SERIES_ACTIVE_TODAY: &str = "tallyd_series_active_today";
/// `{table}`: table ∈ tenants | dims. Values in the process's id tables (they only grow, by at
/// most `aggregate.max_series` a day; a restart starts them empty).
pub const INTERNED_VALUES: &str = "tallyd_interned_values";
/// `{table}`: values dropped from an id table after two days unused (`model::Interner::rotate`).
pub const INTERNED_DROPPED: &str = "tallyd_interned_values_dropped_total";
/// Cumulative OTLP streams held (one state each), and those forgotten after two silent horizons.
pub const STREAMS: &str = "tallyd_otlp_streams";
pub const STREAMS_FORGOTTEN: &str = "tallyd_otlp_streams_forgotten_total";
/// Changelog messages published (one flush per partition per checkpoint, split in chunks).
pub const CHANGELOG_CHUNKS: &str = "tallyd_changelog_chunks_total";
/// `{outcome}`: outcome ∈ restored | skipped (local store already current) | own_flush (ahead only by
/// this store's own flush, published before a crash cut its local commit: the input is replayed).
pub const CHANGELOG_RESTORES: &str = "tallyd_changelog_restores_total";
/// Records a restore found in the newest flush it applied and a checkpoint then re-emitted (their
/// owner may have died before its outbox had them; identical lines if it had not).
pub const CHANGELOG_REEMITTED: &str = "tallyd_changelog_reemitted_records_total";
/// Times this replica found another's fence after its own in a partition's changelog: it was
/// a zombie owner (deposed without hearing of it yet) and stopped emitting for that partition.
pub const CHANGELOG_DEPOSED: &str = "tallyd_changelog_deposed_total";
/// `{outcome}`: outcome ∈ ok | failed. A base folded from a partition's changelog.
pub const CHANGELOG_COMPACTIONS: &str = "tallyd_changelog_compactions_total";
/// Ingest partitions this replica owns (cluster mode).
pub const CLUSTER_OWNED_PARTITIONS: &str = "tallyd_cluster_owned_partitions";
/// Events an edge produced to the ingest topic, acknowledged by Kafka (cluster mode).
pub const CLUSTER_FORWARDED: &str = "tallyd_cluster_forwarded_events_total";
pub const CLUSTER_FORWARD_FAILURES: &str = "tallyd_cluster_forward_failures_total";
/// Queries refused 409 `tenant_split`: a subject's usage is on partitions different replicas own.
pub const CLUSTER_SPLIT_ANSWERS: &str = "tallyd_cluster_split_tenant_answers_total";
/// Members-topic records ignored for lacking this cluster's signature (`cluster.secret`).
pub const CLUSTER_UNSIGNED_RECORDS: &str = "tallyd_cluster_unsigned_records_total";
/// Windows of split tenants closed without a window or rated record (no replica holds their
/// whole total; ARCHITECTURE.md, cluster mode).
pub const CLUSTER_SPLIT_WINDOWS_HELD: &str = "tallyd_cluster_split_tenant_windows_held_total";
/// Queries answered with the owning replica's address instead of data (cluster mode).
pub const CLUSTER_QUERY_REDIRECTS: &str = "tallyd_cluster_query_redirects_total";
/// A tenant's usage found on a second partition (`store::tenants`).
pub const CLUSTER_TENANT_PARTITION_CONFLICTS: &str = "tallyd_cluster_tenant_partition_conflicts_total";

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global metrics recorder once per process and returns the render handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(FLUSH_DURATION.to_string()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(INGEST_COMMIT_GROUP.to_string()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(INGEST_STAGE_SECONDS.to_string()),
                        &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(KAFKA_COMMIT_DELAY.to_string()),
                        &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                    )
                })
                .expect("invariant: bucket lists are non-empty")
                .install_recorder();
            match handle {
                Ok(handle) => {
                    describe();
                    handle
                }
                // Another recorder is installed (e.g. an embedding test harness): render ours anyway.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        INGEST_EVENTS,
        "events received, by source and outcome (accepted, duplicate, refused, invalid)"
    );
    describe_counter!(
        INGEST_REFUSED,
        "events refused by policy and written to the dead letter output, by reason"
    );
    describe_counter!(
        INGEST_LATE,
        "accepted events that amended an already closed window"
    );
    describe_counter!(INGEST_UNMETERED, "accepted events whose type matches no meter");
    describe_gauge!(
        SERIES_ACTIVE_TODAY,
        "distinct series active in the current UTC day (aggregate.max_series caps them)"
    );
    describe_gauge!(INTERNED_VALUES, "values in the process's id tables, by table");
    describe_gauge!(STREAMS, "cumulative OTLP streams whose last point is held");
    describe_counter!(
        STREAMS_FORGOTTEN,
        "cumulative OTLP streams forgotten after two horizons of silence"
    );
    describe_counter!(INGEST_REQUESTS, "ingest requests by status code");
    describe_counter!(INGEST_LOG_BYTES, Unit::Bytes, "bytes appended to the ingest log");
    describe_counter!(
        INGEST_BACKPRESSURE,
        "push requests refused (retryable) because checkpoints are behind, by source"
    );
    describe_histogram!(INGEST_COMMIT_GROUP, "requests made durable by one group commit");
    describe_histogram!(
        INGEST_STAGE_SECONDS,
        Unit::Seconds,
        "seconds a push request spends preparing (decode, map, dedup) and waiting for its durable commit"
    );
    describe_gauge!(ACTIVE_SERIES, "series with usage not yet checkpointed");
    describe_gauge!(
        DEDUP_PENDING,
        "dedup keys held in memory: in flight, or checkpointed and staged until the store ingests them"
    );
    describe_counter!(
        DEDUP_INGESTIONS,
        "bulk moves of staged dedup keys into the store, by outcome (an error keeps them staged and retries)"
    );
    describe_histogram!(
        DEDUP_INGEST_DURATION,
        Unit::Seconds,
        "one bulk move of staged dedup keys: sort, SST file, ingestion, forgetting them in memory"
    );
    describe_counter!(
        DEDUP_LOOKUPS,
        "dedup keys looked up past memory, by answer: filter (never stored, no disk read) or store"
    );
    describe_gauge!(
        DEDUP_FILTER_BYTES,
        Unit::Bytes,
        "memory of the in-memory dedup key filter"
    );
    describe_gauge!(
        DEDUP_FILTER_KEYS,
        "keys the dedup filter holds (expired ones until the next build)"
    );
    describe_counter!(
        DEDUP_FILTER_BUILDS,
        "builds of the dedup filter from the store, by outcome"
    );
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "checkpoint duration");
    describe_counter!(CHECKPOINT_BYTES, Unit::Bytes, "bytes written by checkpoints");
    describe_counter!(CHECKPOINT_SERIES, "series deltas written by checkpoints");
    describe_counter!(CHECKPOINT_FAILURES, "checkpoints that failed and were retried");
    describe_gauge!(
        CHECKPOINT_LAST_SUCCESS,
        Unit::Seconds,
        "unix time of the last successful checkpoint"
    );
    describe_gauge!(
        CHECKPOINT_LAG,
        Unit::Seconds,
        "seconds since the last successful checkpoint"
    );
    describe_counter!(EMIT_RECORDS, "records written downstream, by output and kind");
    describe_counter!(EMIT_FAILURES, "failed attempts to write downstream, by output");
    describe_gauge!(EMIT_BACKLOG, "outbox records not yet delivered, by output");
    describe_counter!(
        EMIT_PARKED,
        "records an output kept refusing, set aside (parked) for a replay, by output"
    );
    describe_counter!(PLAN_RELOADS, "plan sets swapped in by a reload");
    describe_counter!(
        AUTH_FAILURES,
        "requests refused by authentication or authorization"
    );
    describe_counter!(AUTH_RELOADS, "API key sets swapped in by a config reload");
    describe_counter!(LIMIT_SIGNALS, "limit states sent to listeners, by channel");
    describe_counter!(
        LIMITS_REQUESTS,
        "calls on the limits listener, by service (rls, check, watch) and code"
    );
    describe_histogram!(
        LIMITS_REQUEST_SECONDS,
        Unit::Seconds,
        "latency of calls on the limits listener, by service"
    );
    describe_counter!(
        LIMIT_DECISIONS,
        "limit decisions at admission, by kind (quota, rate) and outcome (allowed, refused, warned)"
    );
    describe_counter!(
        PLAN_RELOAD_FAILURES,
        "reloads refused (invalid config), the running plans kept"
    );
    describe_counter!(RATED_RECORDS, "rated usage records produced by checkpoints");
    describe_counter!(
        RATING_FAILURES,
        "windows that could not be rated (decimal overflow)"
    );
    describe_gauge!(STORE_LIVE_BYTES, Unit::Bytes, "RocksDB live SST bytes");
    describe_gauge!(KAFKA_LAG, "consumer lag per owned partition, in messages");
    describe_counter!(KAFKA_MESSAGES, "Kafka messages consumed");
    describe_counter!(
        KAFKA_REBALANCES,
        "consumer group rebalances, by kind (assign, revoke)"
    );
    describe_counter!(
        KAFKA_DEAD_LETTERS,
        "records written to the Kafka dead-letter topic"
    );
    describe_counter!(
        KAFKA_ORPHAN_REJOINS,
        "times the Kafka source rejoined its group: partitions with waiting messages had no live consumer"
    );
    describe_counter!(
        FILE_ROTATIONS,
        "dead-letter file rotations (the file before the previous one is gone)"
    );
    describe_gauge!(CONNECTIONS_OPEN, "open connections per listener");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "connections closed before a request, by listener and reason (max_connections, header_timeout)"
    );
    describe_histogram!(
        KAFKA_COMMIT_DELAY,
        Unit::Seconds,
        "delay from a checkpoint to the Kafka offset commit it allows"
    );
    describe_counter!(KAFKA_ERRORS, "errors reported by the Kafka consumer");
    describe_counter!(
        KAFKA_PAUSES,
        "times consumption paused for checkpoints to catch up"
    );
    describe_gauge!(CLUSTER_OWNED_PARTITIONS, "ingest partitions this replica owns");
    describe_counter!(
        CLUSTER_FORWARDED,
        "events produced to the ingest topic by this replica's edges"
    );
    describe_counter!(
        CLUSTER_FORWARD_FAILURES,
        "forwarding attempts Kafka did not acknowledge (client got 503)"
    );
    describe_counter!(CLUSTER_QUERY_REDIRECTS, "queries sent to the owning replica");
    describe_counter!(
        CLUSTER_TENANT_PARTITION_CONFLICTS,
        "tenants found on a second partition: no single owner holds their whole total"
    );
}

/// Initialises structured logs on stderr. `filter` uses `RUST_LOG` syntax.
pub fn init_tracing(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal; files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // Already initialised (tests): keep the first subscriber.
    let _ = result;
}
