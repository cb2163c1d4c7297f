//! Failpoints: I/O errors a filesystem cannot make on demand (EIO), for the fault tests.
//!
//! `TALLYD_FAILPOINTS_FILE=<path>`: while that file exists, every point it names (one per line)
//! fails with EIO (raw OS error 5); delete or empty the file and
//! the points work again. A test can so break and heal the disk under a running daemon. Unset
//! (production): one load per pass.
//!
//! A line `<point>:stall` holds the thread that reaches the point until the line is gone (then
//! the point fails or passes as the file then says): a test can so keep a write in flight, for
//! a client to hang up meanwhile, and choose its outcome afterwards. Only for points reached on
//! the stage threads (the commit stage's log writes), never on the async executor.
//!
//! Points: `store-write` (every RocksDB write batch: checkpoints, the dedup stage's bookkeeping,
//! emitter cursors), `ingest-log-write` (appending to and syncing the ingest log).

use std::sync::OnceLock;

pub const STORE_WRITE: &str = "store-write";
pub const INGEST_LOG_WRITE: &str = "ingest-log-write";

/// Raw OS error of EIO on Linux.
const EIO: i32 = 5;

fn file() -> Option<&'static std::path::Path> {
    static FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os("TALLYD_FAILPOINTS_FILE").map(Into::into))
        .as_deref()
}

/// EIO if `point` is armed right now.
pub fn check(point: &str) -> std::io::Result<()> {
    let Some(path) = file() else { return Ok(()) };
    loop {
        let armed = std::fs::read_to_string(path).unwrap_or_default();
        let names = |wanted: &str| armed.lines().any(|line| line.trim() == wanted);
        if names(&format!("{point}:stall")) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        if names(point) {
            return Err(std::io::Error::from_raw_os_error(EIO));
        }
        return Ok(());
    }
}
