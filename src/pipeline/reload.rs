//! Plan hot reload: on SIGHUP, or when the config file's modification time changes (polled),
//! the file is read and validated again; if it is valid, its plans and tenant assignments
//! replace the running ones. Plan versions the new file no longer lists are kept, so billing
//! periods already rated with them finish with them (each period pins its plan version when it is
//! first rated, see `rate::record::PeriodEntry`). Everything else in the file needs a restart; a
//! change there is logged, not applied. An invalid file changes nothing and is logged with every
//! problem.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::config::Config;

const POLL: Duration = Duration::from_secs(1);

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|meta| meta.modified()).ok()
}

/// Reads and validates the file again; swaps the plans if it is valid.
pub fn reload(shared: &Shared, path: &PathBuf) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(&text, &env).map_err(|errors| errors.to_string().replace('\n', "; "))?;
    // Keys rotate without a restart (the file was valid: a public listener keeps keys).
    shared.keys.replace(config.auth.keys);
    let mut plans = config.plans;
    let mut current = shared.plans.write();
    plans.keep_versions_of(&current);
    if plans == **current {
        return Ok(());
    }
    let versions: Vec<String> = plans
        .plans
        .iter()
        .map(|plan| format!("{}@{}", plan.id, plan.version))
        .collect();
    *current = Arc::new(plans);
    shared.limits.set_plans(&current);
    metrics::counter!(crate::telemetry::PLAN_RELOADS).increment(1);
    tracing::info!(plans = %versions.join(","), "plans reloaded");
    Ok(())
}

/// Watches for SIGHUP and file changes until `shutdown`.
pub fn spawn(shared: Arc<Shared>, path: PathBuf, shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; plans reload on file change only");
                None
            }
        };
        let mut seen = modified(&path);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup => "SIGHUP",
                _ = tokio::time::sleep(POLL) => {
                    let now = modified(&path);
                    if now == seen { continue; }
                    seen = now;
                    "file change"
                }
            };
            let (shared, path) = (shared.clone(), path.clone());
            let result = tokio::task::spawn_blocking(move || reload(&shared, &path)).await;
            match result {
                Ok(Ok(())) => tracing::debug!(trigger, "config reread"),
                Ok(Err(problems)) => {
                    metrics::counter!(crate::telemetry::PLAN_RELOAD_FAILURES).increment(1);
                    tracing::error!(trigger, %problems, "config not reloaded; the running plans stay");
                }
                Err(error) => tracing::error!(%error, "plan reload panicked"),
            }
        }
    });
}
