//! What the task's submission granted it beyond its input, as the module sees it. Without a
//! grant: no arguments, no environment, no scratch directory, and clocks stopped at the Unix
//! epoch.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a granted scratch directory is (`scratch` grant).
pub const SCRATCH_DIR: &str = "/scratch";

/// The arguments granted (`args`), without the module's own name.
pub fn args() -> Vec<String> {
    std::env::args().skip(1).collect()
}

/// An environment variable granted (`env`).
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The private scratch directory, when one was granted: empty at the start, size-capped,
/// deleted after the run.
pub fn scratch_dir() -> Option<&'static Path> {
    let dir = Path::new(SCRATCH_DIR);
    dir.is_dir().then_some(dir)
}

/// The wall clock, when it was granted (`clock`); `None` while it stands at the epoch.
pub fn now() -> Option<SystemTime> {
    let now = SystemTime::now();
    (now > UNIX_EPOCH).then_some(now)
}
