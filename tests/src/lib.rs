//! Test support for vsnd's integration tests.
//!
//! * [`frontend`] — a vhost-user *frontend* (the part QEMU plays): memfd guest
//!   memory, split virtqueues driven by hand, real eventfds, and a raw API for
//!   hostile-guest tests.
//! * [`snd`] — virtio-snd wire constants, request builders and response
//!   parsers, written from the virtio specification (§5.14) independently of
//!   the device crate, so that the tests are a second opinion on the format.
//! * [`ctl`] — the control socket, `vsnd-ctl` and `socat` as any user, the
//!   audit log, `/proc` views of a process, and the rogue device's reports
//!   (shared by the gate and rogue-device tests).
//! * [`fixture`] — a running broker in a private directory, PCM data, and
//!   helpers that drive streams and transfers (shared by the integration
//!   tests).
//! * [`process`] — the real broker as a child process: its stderr line by
//!   line, its exit status, descriptors handed over, signals.
//! * [`alsa`] — ALSA without a sound card: a private configuration with
//!   `type file` PCMs over `null` for the broker's ALSA backend.
//! * [`bin_path`] — where the workspace binaries the tests run are.

pub mod alsa;
pub mod ctl;
pub mod fixture;
pub mod frontend;
pub mod pipewire;
pub mod process;
pub mod snd;

use std::path::PathBuf;

/// Environment variable that, when set, names the directory holding the
/// workspace binaries (overrides the lookup next to the test executable).
pub const BIN_DIR_ENV: &str = "VSND_BIN_DIR";

/// Path of the workspace binary `name` (`vsnd-broker`, `vsnd-device`).
///
/// Integration tests run from `target/<profile>/deps/<test>-<hash>`; cargo puts
/// the workspace's binaries in `target/<profile>/`, so that is where we look
/// (or in `$VSND_BIN_DIR` when set).
///
/// # Panics
///
/// When the binary does not exist: tests cannot do anything useful without it,
/// and the message says how to build it. This is the one function of this
/// crate that panics on purpose.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()
                .unwrap_or_else(|e| panic!("cannot find the running test executable: {e}"));
            let mut dir = exe
                .parent()
                .unwrap_or_else(|| panic!("test executable {} has no parent dir", exe.display()))
                .to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}; build the workspace binaries first with \
             `cargo build --workspace --bins` (same profile as the tests, e.g. add --release \
             for `cargo test --release`), or point ${BIN_DIR_ENV} at the directory holding them",
            path.display()
        );
    }
    path
}
