//! OTLP/HTTP: `POST /v1/metrics` and `POST /v1/logs`, protobuf or JSON, optionally gzip, over
//! plain TCP or TLS (`tls`). The protocol only: reading and inflating the body, content types,
//! the `google.rpc.Status` error body; the rest is `OtlpIngest::accept`.

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prost::Message;
use serde_json::json;

use super::{grpc, Encoding, IngestError, OtlpIngest, Signal};
use crate::auth::PeerCertificate;
use crate::ingest::admission::BodyError;

/// Routes `POST /v1/metrics` and `POST /v1/logs`. A gzip body is inflated as it is read
/// (tower-http), so `max_body_bytes` caps the inflated size and a zip bomb costs no more than
/// that; other encodings reach the handler untouched and are refused there.
pub fn http_router(ingest: OtlpIngest) -> axum::Router {
    axum::Router::new()
        .route("/v1/metrics", axum::routing::post(post_metrics))
        .route("/v1/logs", axum::routing::post(post_logs))
        .with_state(ingest)
        .layer(
            tower_http::decompression::RequestDecompressionLayer::new()
                .gzip(true)
                .pass_through_unaccepted(true),
        )
}

async fn post_metrics(
    State(ingest): State<OtlpIngest>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    post(ingest, Signal::Metrics, peer, headers, body).await
}

async fn post_logs(
    State(ingest): State<OtlpIngest>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    post(ingest, Signal::Logs, peer, headers, body).await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

const PROTOBUF: &str = "application/x-protobuf";

async fn post(
    ingest: OtlpIngest,
    signal: Signal,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let content_type = header_str(&headers, header::CONTENT_TYPE.as_str())
        .map(|value| value.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let encoding = match content_type.as_deref() {
        Some("application/x-protobuf" | "application/protobuf") => Encoding::Protobuf,
        Some("application/json") => Encoding::Json,
        other => {
            let message = format!(
                "content-type `{}` is not application/x-protobuf or application/json",
                other.unwrap_or("(missing)")
            );
            return http_error(Encoding::Json, &IngestError::UnsupportedMediaType(message));
        }
    };
    let result = async {
        // The key first: nothing is read or inflated for a request without one.
        let key_tenant = ingest.authenticate(
            header_str(&headers, header::AUTHORIZATION.as_str()),
            header_str(&headers, "x-api-key"),
            peer.as_ref().map(|Extension(peer)| peer),
            "otlp_http",
        )?;
        // Gzip was taken off by the decompression layer (with the header); what is left here
        // is an encoding tallyd does not read.
        if let Some(other) =
            header_str(&headers, header::CONTENT_ENCODING.as_str()).filter(|encoding| *encoding != "identity")
        {
            return Err(IngestError::invalid(format!(
                "content-encoding `{other}` is not supported (use gzip or none)"
            )));
        }
        let (permit, bytes) =
            ingest
                .admission
                .read_body(&headers, body)
                .await
                .map_err(|error| match error {
                    BodyError::Refused(error) => error,
                    BodyError::TooLarge(limit) => IngestError::TooLarge(format!(
                        "body (inflated) larger than max_body_bytes ({limit}); export smaller batches"
                    )),
                    BodyError::TimedOut(timeout) => IngestError::TimedOut(format!(
                        "body not received within {}s (server.body_timeout_secs)",
                        timeout.as_secs()
                    )),
                    BodyError::Unreadable(error) => {
                        IngestError::invalid(format!("body could not be read or inflated: {error}"))
                    }
                })?;
        ingest
            .accept_admitted(signal, encoding, bytes, key_tenant, Some(permit))
            .await
    }
    .await;
    match result {
        Ok(outcome) => {
            let content_type = match encoding {
                Encoding::Protobuf => PROTOBUF,
                Encoding::Json => "application/json",
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type)],
                outcome.encode(signal, encoding),
            )
                .into_response()
        }
        Err(error) => http_error(encoding, &error),
    }
}

/// An error body as the OTLP spec asks: a `google.rpc.Status`, encoded like the request; the
/// status and retry delay from the one map (`IngestError`).
fn http_error(encoding: Encoding, error: &IngestError) -> Response {
    let grpc_code = error.grpc_code() as i32;
    let message = error.to_string();
    let (content_type, body) = match encoding {
        Encoding::Protobuf => (
            PROTOBUF,
            tonic_types::pb::Status {
                code: grpc_code,
                message,
                details: Vec::new(),
            }
            .encode_to_vec(),
        ),
        Encoding::Json => (
            "application/json",
            serde_json::to_vec(&json!({"code": grpc_code, "message": message}))
                .expect("invariant: errors serialize"),
        ),
    };
    let mut response = (error.http_status(), [(header::CONTENT_TYPE, content_type)], body).into_response();
    error.insert_headers(response.headers_mut());
    response
}

/// Serves OTLP/HTTP on `listener` until `shutdown`, over TLS when `tls` is set.
pub async fn serve_http(
    ingest: OtlpIngest,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    tls: Option<tokio_rustls::rustls::ServerConfig>,
) -> std::io::Result<()> {
    let limits = ingest.admission.shared.config.connections;
    let router = http_router(ingest);
    let tls = tls.map(|tls| tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls)));
    // HTTP/2 (h2c, or by ALPN): the gRPC listener's windows, for the same reason (`grpc`).
    let windows = (grpc::H2_CONNECTION_WINDOW_BYTES, grpc::H2_STREAM_WINDOW_BYTES);
    crate::ingest::listen::serve_http(
        listener,
        "otlp_http",
        limits,
        router,
        tls,
        Some(windows),
        shutdown,
    )
    .await;
    Ok(())
}
