//! `tallyd`: CLI → load + validate config (exit 64 if bad) → telemetry → bind → run → exit code.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tallyd::config::{Config, DEFAULT_CONFIG};

// jemalloc, not glibc malloc: decoding a 1,000-point OTLP request grows its Vec<NumberDataPoint>
// by doubling, and glibc's large reallocs copied and consolidated (malloc ≈ 25 % of the daemon's
// samples under OTLP load; BENCHMARKS.md, "OTLP ingest").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tallyd",
    version,
    about = "Streaming usage aggregator: exact usage per tenant and meter"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (TOML). Without it the embedded default config is used.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log filter, RUST_LOG syntax.
    #[arg(long, global = true, default_value = "info", env = "TALLYD_LOG")]
    log_level: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    /// How long shutdown may take to drain and write the final checkpoint.
    #[arg(long, global = true, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Start even though ingest-log records are damaged (not a torn tail): replay the intact
    /// ones, skip the damaged ones (their usage is lost and logged) and keep the damaged segment
    /// as `.corrupt`. Without it tallyd refuses to start and says why.
    #[arg(long, global = true)]
    salvage_ingest_log: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Check a config and exit 0, or 64 listing every problem.
    Validate,
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    let text = match path {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?
        }
        None => DEFAULT_CONFIG.to_string(),
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config = Config::load(&text, &env).map_err(|errors| errors.to_string())?;
    config.source_path = path.cloned();
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match load_config(cli.config.as_ref()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("invalid configuration:");
            for line in errors.lines() {
                eprintln!("  - {line}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, Some(Command::Validate)) {
        println!("configuration ok: {}", config.summary());
        return ExitCode::SUCCESS;
    }

    config.salvage_ingest_log = cli.salvage_ingest_log;
    tallyd::telemetry::init_tracing(&cli.log_level, cli.log_json);
    if let Some(offset) = std::env::var("TALLYD_CLOCK_OFFSET_MS")
        .ok()
        .and_then(|text| text.parse::<i64>().ok())
    {
        tracing::warn!(
            offset_ms = offset,
            "fault injection: the wall clock is shifted (TALLYD_CLOCK_OFFSET_MS)"
        );
        tallyd::model::set_clock_offset_ms(offset);
    }
    tracing::info!(config = %config.summary(), "starting tallyd {}", env!("CARGO_PKG_VERSION"));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|error| anyhow::anyhow!("cannot bind http_addr {}: {error}", config.http_addr))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        tallyd::shutdown::cancel_on_signal(shutdown.clone());
        tallyd::run(
            config,
            listener,
            shutdown,
            Duration::from_secs(cli.shutdown_grace_secs),
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("tallyd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
