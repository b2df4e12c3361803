//! What the file-reading targets share: a scratch path on tmpfs (one per fuzzing process) and
//! small limits, so each run stays fast and its memory bounded.

use std::path::PathBuf;

/// `name` under /dev/shm (or the temp dir), unique to this process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("wsa-fuzz-{}-{name}", std::process::id()))
}

/// Room for a few hundred small images: enough to reach every branch, small enough that a
/// header claiming millions is refused by the limits, not by the allocator.
#[allow(dead_code)] // not every target reads an image set
pub fn small_limits() -> datasets::Limits {
    datasets::Limits {
        max_images: 512,
        max_side: 64,
        max_classes: 128,
        max_total_bytes: 1 << 22,
    }
}
