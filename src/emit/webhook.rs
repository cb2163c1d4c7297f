//! Rated records POSTed to an HTTP endpoint in batches: `{"records": [ ... ]}` (each element a
//! rated record as in the JSONL file). With a `secret`, every request is signed:
//! `x-tallyd-timestamp: <unix seconds>` and
//! `x-tallyd-signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`; a receiver
//! recomputes it and rejects stale timestamps (replays). Any non-2xx answer or transport error
//! is retried with capped exponential backoff by the emit loop; the batch stays in the outbox
//! until acknowledged. At-least-once: receivers upsert by `record_id`, keeping the highest
//! `revision`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::EmitWebhookConfig;

pub const WEBHOOK_EMITTER: &str = "webhook";

pub struct WebhookSink {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    url: String,
    secret: Option<String>,
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("invariant: HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

impl WebhookSink {
    pub fn new(config: &EmitWebhookConfig) -> Result<WebhookSink, super::EmitError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            // A redirect turns the POST into a GET that a 2xx would count as delivered: a 3xx
            // is a refusal to retry (the URL is the operator's to fix), never followed.
            .redirect(reqwest::redirect::Policy::none());
        // https: the certificate is verified against the system's CAs and `ca_path`'s.
        if let Some(path) = &config.ca_path {
            let pem = std::fs::read(path)?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder.build()?;
        Ok(WebhookSink {
            runtime,
            client,
            url: config.url.clone(),
            secret: config.secret.clone(),
        })
    }
}

impl super::Sink for WebhookSink {
    fn name(&self) -> &'static str {
        WEBHOOK_EMITTER
    }

    fn deliver(&mut self, lines: &[&[u8]]) -> Result<(), super::DeliveryError> {
        let mut body = Vec::with_capacity(lines.iter().map(|line| line.len() + 1).sum::<usize>() + 16);
        body.extend_from_slice(br#"{"records":["#);
        for (index, line) in lines.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(line);
        }
        body.extend_from_slice(b"]}");
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json");
        if let Some(secret) = &self.secret {
            let timestamp = crate::model::now_ms().div_euclid(1000);
            request = request
                .header("x-tallyd-timestamp", timestamp.to_string())
                .header(
                    "x-tallyd-signature",
                    signature(secret.as_bytes(), timestamp, &body),
                );
        }
        let request = request.body(body);
        let output = self.url.clone();
        self.runtime.block_on(async move {
            let response = request
                .send()
                .await
                .map_err(|error| super::DeliveryError::Unreachable {
                    output: output.clone(),
                    detail: error.to_string(),
                })?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let text = response.text().await.unwrap_or_default();
            let text: String = text.chars().take(200).collect();
            let detail = format!("HTTP {status}: {text}");
            // 4xx says the batch itself is wrong (except a timeout or a rate limit).
            let permanent = status.is_client_error()
                && status != reqwest::StatusCode::REQUEST_TIMEOUT
                && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
            Err(if permanent {
                super::DeliveryError::Rejected {
                    output,
                    status: status.as_u16(),
                    detail,
                }
            } else {
                super::DeliveryError::Refused { output, detail }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Expected value from Python: hmac.new(key, b"1700000000.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            super::signature(b"0123456789abcdef", 1_700_000_000, b"{}"),
            "sha256=e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e"
        );
    }
}
