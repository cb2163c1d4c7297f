//! Generates prost types from tallyd's own protocol definitions in `proto/` (OTLP's come from
//! the `opentelemetry-proto` crate). protox compiles the files in Rust: no protoc, no download.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: &[&str] = &["proto/tallyd/rated/v1/rated.proto"];
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    prost_build::Config::new()
        // Deterministic bytes: map fields encode in key order.
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
