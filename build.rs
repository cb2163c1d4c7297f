//! Generates prost types from tallyd's own protocol definitions in `proto/` (OTLP's come from
//! the `opentelemetry-proto` crate; Envoy's from `envoy-types`), and the tonic service of
//! `tallyd.quota.v1`. protox compiles the files in Rust: no protoc, no download.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const MESSAGES: &[&str] = &["proto/tallyd/rated/v1/rated.proto"];
    const SERVICES: &[&str] = &["proto/tallyd/quota/v1/quota.proto"];
    for proto in MESSAGES.iter().chain(SERVICES) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(MESSAGES, ["proto"])?;
    prost_build::Config::new()
        // Deterministic bytes: map fields encode in key order.
        .btree_map(["."])
        .compile_fds(descriptors)?;
    let services = protox::compile(SERVICES, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(services)?;
    Ok(())
}
