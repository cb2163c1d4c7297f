//! The comparison servers benchmarks measure tallyd against: a CloudEvents server that
//! decodes and validates with tallyd's decoder, and a tonic OTLP server that decodes with
//! prost; both answer and discard.

use std::sync::Arc;

use serde_json::json;

/// Decode-and-discard OTLP/gRPC baseline: tonic + prost decode, then an empty response.
pub(crate) async fn otlp_baseline_server(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    struct Discard;
    #[tonic::async_trait]
    impl MetricsService for Discard {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            std::hint::black_box(request.into_inner());
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("otlp decode-only baseline listening on {addr}");
    // The daemon's HTTP/2 windows, so both servers receive alike.
    tonic::transport::Server::builder()
        .initial_connection_window_size(Some(tallyd::ingest::otlp::grpc::H2_CONNECTION_WINDOW_BYTES))
        .initial_stream_window_size(Some(tallyd::ingest::otlp::grpc::H2_STREAM_WINDOW_BYTES))
        .add_service(
            MetricsServiceServer::new(Discard)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(64 << 20),
        )
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}

/// Decode-only baseline: the same decode and validation as tallyd's ingest, then 202.
pub(crate) async fn baseline_server(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use axum::http::{header, HeaderMap, StatusCode};
    use tallyd::ingest::decode;

    struct Baseline {
        meters: tallyd::meter::Meters,
        names: tallyd::model::Names,
    }
    let config = tallyd::Config::load(tallyd::config::DEFAULT_CONFIG, &Default::default())
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let names = tallyd::model::Names::default();
    let acceptance = config.acceptance();
    let meters = tallyd::meter::Meters::new(config.meters, &names);
    let state = Arc::new(Baseline { meters, names });
    let ingest = move |axum::extract::State(state): axum::extract::State<Arc<Baseline>>,
                       headers: HeaderMap,
                       body: axum::body::Bytes| async move {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let decoded = tokio::task::spawn_blocking(move || {
            let kind = decode::body_kind(content_type.as_deref()).ok()?;
            let raw = decode::split_body(&body, kind).ok()?;
            let now = tallyd::model::now_ms();
            decode::decode_events(&raw, &state.meters, &state.names, now, acceptance, None)
                .ok()
                .map(|decoded| decoded.metered.len())
        })
        .await
        .ok()
        .flatten();
        match decoded {
            Some(accepted) => (StatusCode::ACCEPTED, axum::Json(json!({"accepted": accepted}))),
            None => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "invalid_request"})),
            ),
        }
    };
    let app = axum::Router::new()
        .route("/api/v1/events", axum::routing::post(ingest))
        .route("/readyz", axum::routing::get(|| async { "ready" }))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("decode-only baseline listening on {addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
