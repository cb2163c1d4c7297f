//! Envoy RLS load: `ShouldRateLimit` calls, one descriptor each (the tenant drawn Zipf-skewed,
//! the meter `--rls-meter`), as an Envoy rate-limit filter sends them; and the comparison
//! point, a do-nothing RLS server that answers OK to everything (`--rls-baseline-server`).

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use crate::{Generator, Target};

/// A new RLS connection to `addr`.
pub(crate) async fn rls_target(addr: &str) -> anyhow::Result<Target> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(Target::Rls(RateLimitServiceClient::new(channel)))
}

/// One request: `tenant-<zipf>` and the meter, one hit.
pub(crate) fn rls_request(generator: &mut Generator) -> RateLimitRequest {
    let tenant = generator.tenants.sample(&mut generator.rng);
    let entry = |key: &str, value: String| Entry {
        key: key.to_string(),
        value,
    };
    RateLimitRequest {
        domain: generator.args.rls_domain.clone(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                entry("tenant", format!("tenant-{tenant}")),
                entry("meter", generator.args.rls_meter.clone()),
            ],
            limit: None,
            hits_addend: None,
            is_negative_hits: false,
        }],
        hits_addend: 0,
    }
}

/// One call; `Some(over_limit)` when answered (OK and OVER_LIMIT are both decisions).
pub(crate) async fn rls_call(
    client: &mut RateLimitServiceClient<tonic::transport::Channel>,
    request: RateLimitRequest,
) -> Option<bool> {
    let response = client.should_rate_limit(request).await.ok()?.into_inner();
    Some(response.overall_code == Code::OverLimit as i32)
}

/// The baseline: decodes each request and answers OK, nothing else.
pub(crate) async fn rls_baseline_server(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    struct AlwaysOk;
    #[tonic::async_trait]
    impl RateLimitService for AlwaysOk {
        async fn should_rate_limit(
            &self,
            request: tonic::Request<RateLimitRequest>,
        ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
            std::hint::black_box(request.into_inner());
            Ok(tonic::Response::new(RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            }))
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("rls do-nothing baseline listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(AlwaysOk))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}
