//! Accepting connections, for every listener (the HTTP API, OTLP/HTTP, OTLP/gRPC): the resource
//! control that comes before any request. Each listener keeps at most `max_connections` open;
//! one more is closed at once and counted, so a flood of connections costs file descriptors
//! and tasks only up to that cap. A connection must send its first byte within
//! `header_read_timeout`, or it is closed: hyper's protocol-detecting builder starts no timer
//! before the first byte (hyper#3962), so without this a client that connects and stays silent
//! would hold a socket and a task forever. After it, HTTP/1 request headers must arrive within
//! the same timeout (hyper's own timer, which also closes idle keep-alive connections), and
//! HTTP/2 peers that stop answering pings are dropped. What is left, a client trickling a
//! partial HTTP/2 preface, holds one slot of the cap.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use crate::config::ConnectionLimits;

/// HTTP/2 keep-alive: a ping after this much silence, and the connection closed when its
/// answer takes longer than `H2_PING_TIMEOUT` (a peer that vanished without a FIN).
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection. It holds one of its listener's slots until it is dropped.
pub struct Admitted {
    stream: TcpStream,
    _slot: Slot,
}

struct Slot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::CONNECTIONS_OPEN, "listener" => self.listener).decrement(1.0);
    }
}

fn refused(listener: &'static str, reason: &'static str) {
    metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED, "listener" => listener, "reason" => reason)
        .increment(1);
}

/// Accepts on `listener` until `shutdown`: the connections that got a slot and sent a first
/// byte in time, in the order their first bytes came. `name` labels the metrics.
pub fn accept(
    listener: TcpListener,
    name: &'static str,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Admitted>> {
    let (admitted, stream) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(%error, listener = name, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Closed now, not queued: the client sees it and retries with its backoff.
                refused(name, "max_connections");
                continue;
            };
            metrics::gauge!(crate::telemetry::CONNECTIONS_OPEN, "listener" => name).increment(1.0);
            let slot = Slot {
                _permit: permit,
                listener: name,
            };
            // Small responses go out at once (the answers are one write each).
            let _ = stream.set_nodelay(true);
            let admitted = admitted.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                match tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(read)) if read > 0 => {
                        let _ = admitted.send(Ok(Admitted { stream, _slot: slot })).await;
                    }
                    Ok(_) => {} // closed, or failed, before a byte
                    Err(_) => refused(name, "header_timeout"),
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

/// Serves `router` on `listener` until `shutdown` (in-flight requests finish, clients are told
/// to go away), over TLS when `tls` is set. HTTP/1; also HTTP/2 (h2c, or by ALPN) when
/// `http2_windows` gives its flow-control windows (connection, stream).
pub async fn serve_http(
    listener: TcpListener,
    name: &'static str,
    limits: ConnectionLimits,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http2_windows: Option<(u32, u32)>,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use tokio_stream::StreamExt;
    let mut incoming = accept(listener, name, limits, shutdown.clone());
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let (tls, router, shutdown) = (tls.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            match http2_windows {
                Some((connection_window, stream_window)) => {
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .keep_alive_interval(H2_PING_INTERVAL)
                        .keep_alive_timeout(H2_PING_TIMEOUT)
                        .initial_connection_window_size(connection_window)
                        .initial_stream_window_size(stream_window);
                }
                None => builder = builder.http1_only(),
            }
            match tls {
                None => serve_connection(&builder, stream, router, &shutdown).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            // A verified client certificate (mTLS) goes with every request.
                            let router = match peer_certificate(&stream) {
                                Some(peer) => router.layer(axum::Extension(peer)),
                                None => router,
                            };
                            serve_connection(&builder, stream, router, &shutdown).await
                        }
                        Ok(Err(error)) => tracing::debug!(%error, listener = name, "tls handshake failed"),
                        Err(_) => refused(name, "header_timeout"),
                    }
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// The leaf certificate the client presented, verified by the handshake (mTLS).
fn peer_certificate(
    stream: &tokio_rustls::server::TlsStream<Admitted>,
) -> Option<crate::auth::PeerCertificate> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    Some(crate::auth::PeerCertificate(Arc::new(leaf.to_vec())))
}

/// An admitted connection after its TLS handshake, for tonic (OTLP/gRPC): tonic hands its
/// `Connected` info to every request, so the client certificate travels with it.
pub struct TlsAdmitted {
    stream: tokio_rustls::server::TlsStream<Admitted>,
}

/// The connection info of a TLS connection: the peer address and its client certificate.
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    pub certificate: Option<crate::auth::PeerCertificate>,
}

/// The handshakes of `incoming`'s connections, concurrently (a slow client holds only its
/// own slot, for at most `header_read_timeout`); the ones that completed, as they complete.
pub fn handshake(
    mut incoming: ReceiverStream<io::Result<Admitted>>,
    acceptor: tokio_rustls::TlsAcceptor,
    name: &'static str,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<TlsAdmitted>> {
    use tokio_stream::StreamExt;
    let (done, stream) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(next) = incoming.next().await {
            let Ok(admitted) = next else { continue };
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(admitted)).await {
                    Ok(Ok(stream)) => {
                        let _ = done.send(Ok(TlsAdmitted { stream })).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, listener = name, "tls handshake failed"),
                    Err(_) => refused(name, "header_timeout"),
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

async fn serve_connection<T>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    stream: T,
    router: axum::Router,
    shutdown: &CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// `AsyncRead` + `AsyncWrite` of a wrapper, by its `stream` field.
macro_rules! delegate_io {
    ($wrapper:ty) => {
        impl AsyncRead for $wrapper {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_read(cx, buf)
            }
        }

        impl AsyncWrite for $wrapper {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.stream).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.stream.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_flush(cx)
            }

            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_shutdown(cx)
            }
        }
    };
}

delegate_io!(Admitted);
delegate_io!(TlsAdmitted);

/// tonic reads the peer address from here (as from a bare `TcpStream`).
impl tonic::transport::server::Connected for Admitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tonic::transport::server::Connected for TlsAdmitted {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        TlsPeer {
            tcp: self.stream.get_ref().0.stream.connect_info(),
            certificate: peer_certificate(&self.stream),
        }
    }
}
