//! Taking a Unix socket path: a socket left by a killed broker is replaced,
//! anything else is refused.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use log::warn;

/// Make `path` free for a new listening socket (`what` names the option in
/// messages): nothing there is fine; a socket nobody listens on is removed;
/// a socket in use, or anything that is not a socket, is an error.
pub fn clear_stale_socket(path: &Path, what: &str) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{what} {} exists and is not a socket; refusing to replace it",
            path.display()
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{what} {} is in use: another process is listening on it",
            path.display()
        ));
    }
    warn!("removing stale socket {}", path.display());
    std::fs::remove_file(path)
        .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))
}
