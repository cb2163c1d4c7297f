//! OTLP/gRPC: `opentelemetry.proto.collector.{metrics,logs}.v1.*Service/Export` on tonic.
//!
//! The generated servers decode with prost inside tonic and answer a malformed message with
//! INTERNAL; OTLP clients must not retry a malformed request, so tallyd takes the message as
//! raw bytes (`RawCodec`) and decodes it itself on the blocking pool: INVALID_ARGUMENT with
//! prost's reason, and no decoding on the async executor. Framing, gzip and the message size
//! limit stay tonic's.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use bytes::{Buf, BufMut};
use tonic::codec::{
    Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings, EncodeBuf, Encoder,
};
use tonic::codegen::{http, Body, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};

use super::{Encoding, OtlpIngest, Signal};

/// Which signal a service instance serves (its gRPC name and path).
pub trait SignalService: Send + Sync + 'static {
    const SIGNAL: Signal;
    const NAME: &'static str;
    const PATH: &'static str;
}

pub struct Metrics;
pub struct Logs;

impl SignalService for Metrics {
    const SIGNAL: Signal = Signal::Metrics;
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const PATH: &'static str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
}

impl SignalService for Logs {
    const SIGNAL: Signal = Signal::Logs;
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const PATH: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
}

/// One OTLP export service.
pub struct ExportService<S> {
    ingest: OtlpIngest,
    max_message_bytes: usize,
    _signal: PhantomData<S>,
}

impl<S> Clone for ExportService<S> {
    fn clone(&self) -> Self {
        ExportService {
            ingest: self.ingest.clone(),
            max_message_bytes: self.max_message_bytes,
            _signal: PhantomData,
        }
    }
}

impl<S: SignalService> ExportService<S> {
    pub fn new(ingest: OtlpIngest) -> Self {
        let max_message_bytes = ingest.admission.shared.config.max_body_bytes;
        ExportService {
            ingest,
            max_message_bytes,
            _signal: PhantomData,
        }
    }
}

impl<S: SignalService> NamedService for ExportService<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for ExportService<S>
where
    S: SignalService,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            if request.uri().path() != S::PATH {
                return Ok(tonic::Status::unimplemented(format!(
                    "{} is not served here",
                    request.uri().path()
                ))
                .into_http());
            }
            let mut gzip = EnabledCompressionEncodings::default();
            gzip.enable(CompressionEncoding::Gzip);
            let mut grpc = Grpc::new(RawCodec)
                .apply_compression_config(gzip, gzip)
                .apply_max_message_size_config(Some(service.max_message_bytes), None);
            Ok(grpc.unary(Unary::<S>(service.ingest, PhantomData), request).await)
        })
    }
}

struct Unary<S>(OtlpIngest, PhantomData<S>);

impl<S: SignalService> UnaryService<Bytes> for Unary<S> {
    type Response = Vec<u8>;
    type Future = BoxFuture<tonic::Response<Vec<u8>>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let ingest = self.0.clone();
        Box::pin(async move {
            let metadata = request.metadata();
            let text = |name: &str| metadata.get(name).and_then(|value| value.to_str().ok());
            let peer = request
                .extensions()
                .get::<crate::ingest::listen::TlsPeer>()
                .and_then(|peer| peer.certificate.as_ref());
            let key_tenant = ingest
                .authenticate(text("authorization"), text("x-api-key"), peer, "otlp_grpc")
                .map_err(|error| error.grpc_status())?;
            let body = request.into_inner();
            let outcome = ingest
                .accept(S::SIGNAL, Encoding::Protobuf, body, key_tenant)
                .await
                .map_err(|error| error.grpc_status())?;
            Ok(tonic::Response::new(
                outcome.encode(S::SIGNAL, Encoding::Protobuf),
            ))
        })
    }
}

/// Passes message bytes through: requests are decoded by `OtlpIngest`, responses arrive
/// encoded. The load generator uses it as a client codec too (requests it encoded itself).
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buffer: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        buffer.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(buffer.copy_to_bytes(buffer.remaining())))
    }
}

/// HTTP/2 flow-control windows the server grants (h2's default is 64 KiB for the connection and
/// each stream). An exporter multiplexes its concurrent exports over one connection, and a
/// 1,000-point export is ≈ 70 kB: with 64 KiB for the whole connection every request waited
/// for window updates, which the server sends from its async workers, and those share the two
/// cores with the decoding threads. So the connection stalled behind whichever update was late,
/// and tallyd sat half idle at 16 exports in flight (BENCHMARKS.md, "OTLP ingest"). These windows let a
/// few dozen whole requests travel at once. Cost: up to 16 MiB per connection of received data
/// not yet read (tonic reads bodies as they arrive); a body is still capped by `max_body_bytes`.
pub const H2_CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
pub const H2_STREAM_WINDOW_BYTES: u32 = 4 << 20;

/// Serves both export services on `listener` until `shutdown`, over TLS when `tls` is set:
/// rustls with the reloading certificate and optional client certificates, like the other
/// listeners (tonic's own TLS reads its PEM once and keeps no client certificate at hand).
pub async fn serve(
    ingest: OtlpIngest,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    tls: Option<tokio_rustls::rustls::ServerConfig>,
) -> Result<(), tonic::transport::Error> {
    use crate::ingest::listen;
    let limits = ingest.admission.shared.config.connections;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(listen::H2_PING_INTERVAL))
        .http2_keepalive_timeout(Some(listen::H2_PING_TIMEOUT))
        .initial_connection_window_size(Some(H2_CONNECTION_WINDOW_BYTES))
        .initial_stream_window_size(Some(H2_STREAM_WINDOW_BYTES))
        .add_service(ExportService::<Metrics>::new(ingest.clone()))
        .add_service(ExportService::<Logs>::new(ingest));
    let incoming = listen::accept(listener, "otlp_grpc", limits, shutdown.clone());
    let stop = async move { shutdown.cancelled().await };
    match tls {
        None => router.serve_with_incoming_shutdown(incoming, stop).await,
        Some(mut config) => {
            config.alpn_protocols = vec![b"h2".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
            let incoming = listen::handshake(incoming, acceptor, "otlp_grpc", limits);
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    }
}
