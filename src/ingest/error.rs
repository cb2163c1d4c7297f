//! Why a whole ingest request is not accepted, and the one map from that to HTTP statuses and
//! gRPC codes (every edge answers through it, so a condition reads the same on every protocol).
//!
//! Retry rules follow the OTLP specification: UNAVAILABLE (503) is retryable and carries a
//! delay (RetryInfo / Retry-After); INVALID_ARGUMENT (400), UNAUTHENTICATED (401) and a request
//! too large (413 / RESOURCE_EXHAUSTED without RetryInfo) are not: the same bytes cannot succeed.
//! A rate limit (429 / RESOURCE_EXHAUSTED *with* RetryInfo) is retryable after its delay: the
//! collector retries RESOURCE_EXHAUSTED only when RetryInfo is present.

use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;

/// How long a client should wait before retrying an UNAVAILABLE answer.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A problem that makes a request invalid; `index` is the event's position in the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub index: Option<usize>,
    pub field: String,
    pub reason: String,
}

impl FieldError {
    /// A problem with the request body as a whole.
    pub fn body(reason: impl Into<String>) -> FieldError {
        FieldError {
            index: None,
            field: "body".into(),
            reason: reason.into(),
        }
    }
}

/// Why a valid unit (event, point, record) is not counted. A closed set: it is the `reason`
/// label of `tallyd_ingest_refused_total` and the dead letters' `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// No tenant (OTLP: the attribute is missing or not a string).
    NoTenant,
    /// The resource names a tenant other than the API key's.
    WrongTenant,
    /// A value, timestamp, attribute or shape problem in a unit the protocol refuses alone
    /// (OTLP points, Kafka messages); CloudEvents over HTTP fail the whole request instead.
    Invalid,
    /// Older than `max_lateness_secs`.
    TooLate,
    /// Newer than `max_future_secs`.
    TooFarInFuture,
    /// Its usage would take a series past what it can hold exactly (38 significant digits).
    Overflow,
    /// It would start a new series beyond `aggregate.max_series_per_tenant` or `max_series`.
    CardinalityLimit,
    /// It would take the tenant past a hard quota of its plan (`limit`); never counted against
    /// any limit.
    QuotaExceeded,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NoTenant => "no_tenant",
            RefusalReason::WrongTenant => "wrong_tenant",
            RefusalReason::Invalid => "invalid",
            RefusalReason::TooLate => "too_late",
            RefusalReason::TooFarInFuture => "too_far_in_future",
            RefusalReason::Overflow => "overflow",
            RefusalReason::CardinalityLimit => "cardinality_limit",
            RefusalReason::QuotaExceeded => "quota_exceeded",
        }
    }
}

impl From<crate::auth::AuthError> for IngestError {
    fn from(error: crate::auth::AuthError) -> IngestError {
        if error.is_unauthenticated() {
            IngestError::Unauthenticated(error.to_string())
        } else {
            IngestError::Forbidden(error.to_string())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Missing or unknown API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known key without the scope (or tenant) the request needs.
    #[error("{0}")]
    Forbidden(String),
    /// Malformed: nothing counted; retrying the same bytes cannot help. `errors` names each
    /// problem where the protocol can say which event and field it is (CloudEvents).
    #[error("{message}")]
    Invalid {
        message: String,
        errors: Vec<FieldError>,
    },
    /// A body in an encoding or media type the edge does not read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Larger than `max_body_bytes` (a protocol that reports it as invalid uses `Invalid`).
    #[error("{0}")]
    TooLarge(String),
    /// The body did not arrive within `server.body_timeout_secs`.
    #[error("{0}")]
    TimedOut(String),
    /// Overloaded, not ready, shutting down or storage trouble: nothing counted; retry after
    /// the delay.
    #[error("{0}")]
    Unavailable(String),
    /// Over a rate limit of the tenant's plan: a business decision, not overload. Retry
    /// after `retry_after` (429 / RESOURCE_EXHAUSTED with RetryInfo); nothing was counted.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
        /// `RateLimit-Policy` and `RateLimit` (IETF draft-10) values.
        policy: String,
        state: String,
    },
}

impl IngestError {
    /// An invalid request with one message and no per-field list.
    pub fn invalid(message: impl Into<String>) -> IngestError {
        IngestError::Invalid {
            message: message.into(),
            errors: Vec::new(),
        }
    }

    /// An invalid request listing every problem (the message summarises them).
    pub fn fields(errors: Vec<FieldError>) -> IngestError {
        let events = errors
            .iter()
            .filter_map(|e| e.index)
            .collect::<std::collections::BTreeSet<_>>();
        let message = match errors.first() {
            Some(first) if errors.len() == 1 => format!("{}: {}", first.field, first.reason),
            _ => format!(
                "{} problems in {} event(s); nothing was counted",
                errors.len(),
                events.len()
            ),
        };
        IngestError::Invalid { message, errors }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            IngestError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            IngestError::Forbidden(_) => StatusCode::FORBIDDEN,
            IngestError::Invalid { .. } => StatusCode::BAD_REQUEST,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            IngestError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            IngestError::Forbidden(_) => tonic::Code::PermissionDenied,
            IngestError::Invalid { .. } | IngestError::UnsupportedMediaType(_) => {
                tonic::Code::InvalidArgument
            }
            IngestError::TooLarge(_) => tonic::Code::ResourceExhausted,
            IngestError::TimedOut(_) => tonic::Code::DeadlineExceeded,
            IngestError::Unavailable(_) => tonic::Code::Unavailable,
            IngestError::RateLimited { .. } => tonic::Code::ResourceExhausted,
        }
    }

    /// The retry delay to send with the answer (`Retry-After`, RetryInfo); none: do not retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IngestError::Unavailable(_) => Some(RETRY_AFTER),
            IngestError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The HTTP headers of this answer: `Retry-After` (whole seconds) when it is retryable, and
    /// a rate limit's `RateLimit-Policy` / `RateLimit` (IETF draft-10).
    pub fn insert_headers(&self, headers: &mut axum::http::HeaderMap) {
        use axum::http::{header, HeaderValue};
        if let Some(delay) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(delay.as_secs().max(1)));
        }
        if let IngestError::RateLimited { policy, state, .. } = self {
            for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.insert(name, value);
                }
            }
        }
    }

    pub fn grpc_status(&self) -> tonic::Status {
        use prost::Message;
        use tonic_types::{ErrorDetails, StatusExt};
        let message = self.to_string();
        match self.retry_after() {
            // Retryable per the OTLP spec; RetryInfo tells the exporter how long to wait: in
            // the status details (the collector reads them) and as the
            // `google.rpc.retryinfo-bin` trailer (the Python SDK reads that).
            Some(delay) => {
                let mut status = tonic::Status::with_error_details(
                    self.grpc_code(),
                    message,
                    ErrorDetails::with_retry_info(Some(delay)),
                );
                let info = tonic_types::pb::RetryInfo {
                    retry_delay: Some(prost_types::Duration {
                        seconds: delay.as_secs() as i64,
                        nanos: delay.subsec_nanos() as i32,
                    }),
                };
                status.metadata_mut().insert_bin(
                    "google.rpc.retryinfo-bin",
                    tonic::metadata::MetadataValue::from_bytes(&info.encode_to_vec()),
                );
                status
            }
            None => tonic::Status::new(self.grpc_code(), message),
        }
    }

    pub fn outcome(&self) -> &'static str {
        match self {
            IngestError::Unauthenticated(_) => "unauthenticated",
            IngestError::Forbidden(_) => "forbidden",
            IngestError::Invalid { .. } | IngestError::UnsupportedMediaType(_) | IngestError::TooLarge(_) => {
                "invalid"
            }
            IngestError::TimedOut(_) => "timeout",
            IngestError::Unavailable(_) => "unavailable",
            IngestError::RateLimited { .. } => "rate_limited",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One condition, one answer on every protocol; only UNAVAILABLE invites a retry.
    #[test]
    fn each_error_maps_to_one_http_status_and_grpc_code() {
        let cases = [
            (
                IngestError::Unauthenticated("k".into()),
                401,
                tonic::Code::Unauthenticated,
                false,
            ),
            (
                IngestError::Forbidden("k".into()),
                403,
                tonic::Code::PermissionDenied,
                false,
            ),
            (
                IngestError::invalid("bad"),
                400,
                tonic::Code::InvalidArgument,
                false,
            ),
            (
                IngestError::UnsupportedMediaType("text".into()),
                415,
                tonic::Code::InvalidArgument,
                false,
            ),
            (
                IngestError::TooLarge("big".into()),
                413,
                tonic::Code::ResourceExhausted,
                false,
            ),
            (
                IngestError::TimedOut("slow".into()),
                408,
                tonic::Code::DeadlineExceeded,
                false,
            ),
            (
                IngestError::Unavailable("busy".into()),
                503,
                tonic::Code::Unavailable,
                true,
            ),
            (
                IngestError::RateLimited {
                    message: "over".into(),
                    retry_after: Duration::from_secs(3),
                    policy: String::new(),
                    state: String::new(),
                },
                429,
                tonic::Code::ResourceExhausted,
                true,
            ),
        ];
        for (error, http, grpc, retry) in cases {
            assert_eq!(error.http_status().as_u16(), http, "{error:?}");
            assert_eq!(error.grpc_code(), grpc, "{error:?}");
            assert_eq!(error.grpc_status().code(), grpc, "{error:?}");
            assert_eq!(error.retry_after().is_some(), retry, "{error:?}");
        }
    }

    #[test]
    fn a_list_of_problems_is_summarised() {
        let one = IngestError::fields(vec![FieldError::body("empty body")]);
        assert_eq!(one.to_string(), "body: empty body");
        let field = |index| FieldError {
            index: Some(index),
            field: "time".into(),
            reason: "not RFC 3339".into(),
        };
        let many = IngestError::fields(vec![field(0), field(0), field(3)]);
        assert_eq!(many.to_string(), "3 problems in 2 event(s); nothing was counted");
    }
}
