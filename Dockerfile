# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run as a non-root user on a slim Debian.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
COPY proto ./proto
RUN cargo build --release --locked --bin tallyd --bin tallyd-loadgen

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tallyd --create-home tallyd
COPY --from=build /src/target/release/tallyd /src/target/release/tallyd-loadgen /usr/local/bin/
COPY config/tallyd.toml /etc/tallyd/tallyd.toml
USER tallyd
WORKDIR /var/lib/tallyd
ENV TALLYD__STORAGE__DATA_DIR=/var/lib/tallyd/data \
    TALLYD__EMIT__FILE__PATH=/var/lib/tallyd/data/usage.jsonl \
    TALLYD__DEAD_LETTER__PATH=/var/lib/tallyd/data/dead-letter.jsonl \
    TALLYD__SERVER__HTTP_ADDR=0.0.0.0:8080 \
    TALLYD__SERVER__OTLP_GRPC_ADDR=0.0.0.0:4317 \
    TALLYD__SERVER__OTLP_HTTP_ADDR=0.0.0.0:4318 \
    TALLYD__LIMITS__GRPC_ADDR=0.0.0.0:8081
# Listeners reachable from outside the container: tallyd refuses to start without API keys
# ([[auth.keys]] in a mounted config) unless TALLYD__AUTH__ALLOW_UNAUTHENTICATED=true.
VOLUME ["/var/lib/tallyd"]
EXPOSE 8080 4317 4318 8081
HEALTHCHECK --interval=10s --timeout=2s CMD ["curl", "-fsS", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tallyd"]
CMD ["run", "--config", "/etc/tallyd/tallyd.toml", "--log-json"]
