use super::*;

fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

#[test]
fn embedded_default_config_is_valid() {
    let config = Config::load(DEFAULT_CONFIG, &no_env()).unwrap();
    assert!(config.meters.iter().any(|m| m.slug == "tokens"));
    assert_eq!(config.flush_interval_ms, 1000);
    assert_eq!(config.dedup_horizon_secs, 3_024_000);
    // Unlisted tenants are priced with the seed pay-as-you-go plan.
    let (plan, discount) = config.plans.for_tenant("anyone").unwrap();
    assert_eq!(
        (plan.id.as_str(), plan.charges.len(), discount),
        ("payg", 5, Default::default())
    );
}

#[test]
fn env_overrides_win_and_parse_types() {
    let env = HashMap::from([
        (
            "TALLYD__AGGREGATE__FLUSH_INTERVAL_MS".to_string(),
            "250".to_string(),
        ),
        ("TALLYD__STORAGE__DATA_DIR".to_string(), "/tmp/x y".to_string()),
        ("OTHER".to_string(), "ignored".to_string()),
    ]);
    let config = Config::load(DEFAULT_CONFIG, &env).unwrap();
    assert_eq!(config.flush_interval_ms, 250);
    assert_eq!(config.data_dir, PathBuf::from("/tmp/x y"));
}

#[test]
fn unknown_keys_are_errors() {
    let error = Config::load("[server]\nhttp_adr = \"1.2.3.4:1\"\n", &no_env()).unwrap_err();
    assert!(error.to_string().contains("http_adr"), "{error}");
    let env = HashMap::from([("TALLYD__AGGREGATE__FLUSH".to_string(), "1".to_string())]);
    assert!(Config::load("", &env).unwrap_err().to_string().contains("flush"));
}

#[test]
fn every_error_is_reported_at_once() {
    let text = r#"
[server]
http_addr = "nowhere"
[aggregate]
allowed_lateness_secs = 10
max_lateness_secs = 5
[[meters]]
slug = "Bad Slug"
event_type = ""
aggregation = "AVG"
[[meters]]
slug = "tokens"
event_type = "llm"
aggregation = "SUM"
window_size = "WEEK"
scale = 30
[[meters]]
slug = "tokens"
event_type = "llm"
aggregation = "COUNT"
value_property = "$.x"
group_by = { model = "model" }
"#;
    let errors = Config::load(text, &no_env()).unwrap_err().0;
    let all = errors.join("\n");
    for needle in [
        "server.http_addr",
        "allowed_lateness_secs",
        "meters[0] (Bad Slug).slug",
        "meters[0] (Bad Slug).event_type",
        "`AVG`",
        "meters[1] (tokens).value_property: required for SUM",
        "window_size: `WEEK`",
        "scale: must be at most 18",
        "meters[2] (tokens).slug: duplicate slug",
        "COUNT meters take no value",
        "group_by.model: `model` must start with `$`",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn otlp_meters_and_listeners_are_validated_together() {
    let text = r#"
[server]
otlp_grpc_addr = "somewhere"
otlp_http_addr = ""
[otlp]
tenant_attribute = ""
[otlp.api_keys]
"tiny-key" = "acme"
[[meters]]
slug = "no_metric"
source = "otlp_metric"
aggregation = "SUM"
value_property = "$.x"
[[meters]]
slug = "gb_hours"
event_type = "storage.report"
aggregation = "TIME_WEIGHTED"
max_gap_secs = 60
[[meters]]
slug = "runs"
source = "otlp_log"
event_name = "workflow.run"
metric_name = "x"
aggregation = "MAX"
max_gap_secs = 60
[[meters]]
slug = "wat"
source = "otlp_trace"
aggregation = "SUM"
[[meters]]
slug = "p99"
source = "otlp_metric"
metric_name = "latency"
aggregation = "DISTRIBUTION"
"#;
    let all = Config::load(text, &no_env()).unwrap_err().to_string();
    for needle in [
        "server.otlp_grpc_addr: `somewhere`",
        "otlp.tenant_attribute: must not be empty",
        "the key of tenant `acme` is shorter than 16 characters",
        "meters[0] (no_metric).metric_name: required for source `otlp_metric`",
        "meters[0] (no_metric).value_property: only for cloudevents meters",
        "meters[1] (gb_hours).aggregation: TIME_WEIGHTED integrates gauge streams",
        "meters[2] (runs).metric_name: not used by source `otlp_log`",
        "meters[2] (runs).value_attribute: required for MAX",
        "meters[2] (runs).max_gap_secs: only for TIME_WEIGHTED meters",
        "meters[3] (wat).source: `otlp_trace`",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    assert!(!all.contains("tiny-key"), "API keys are secrets: {all}");
    // "" turns an OTLP listener off.
    let config = Config::load("[server]\notlp_grpc_addr = \"\"\n", &no_env()).unwrap();
    assert_eq!(
        (config.otlp_grpc_addr, config.otlp_http_addr.map(|a| a.port())),
        (None, Some(4318))
    );
}

#[test]
fn dedup_horizon_must_cover_acceptance_range() {
    let text = "[aggregate]\ndedup_horizon_secs = 100\nmax_lateness_secs = 100\nmax_future_secs = 10\nallowed_lateness_secs = 5\n";
    let all = Config::load(text, &no_env()).unwrap_err().to_string();
    assert!(all.contains("dedup_horizon_secs"), "{all}");
}

#[test]
fn a_time_weighted_gap_longer_than_the_horizon_is_refused() {
    let text = r#"
[aggregate]
dedup_horizon_secs = 200000
max_lateness_secs = 86400
[[meters]]
slug = "gb_hours"
source = "otlp_metric"
metric_name = "storage.used"
aggregation = "TIME_WEIGHTED"
max_gap_secs = 200001
"#;
    let all = Config::load(text, &no_env()).unwrap_err().to_string();
    assert!(
        all.contains("meters (gb_hours).max_gap_secs: must not exceed aggregate.dedup_horizon_secs (200000)"),
        "{all}"
    );
    let fits = text.replace("200001", "200000");
    Config::load(&fits, &no_env()).unwrap();
}
