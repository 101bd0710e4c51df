//! vsnd-broker as a library: the binary `vsnd-broker` is a thin `main` over
//! these modules. They are public so that the fuzz targets, the man-page
//! generator and the tests reach exactly the code the broker runs; they are
//! not a stable API.

pub mod audio;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control_socket;
pub mod ctl_cli;
pub mod device_log;
pub mod gate;
pub mod session;
pub mod socket_path;
pub mod supervisor;
pub mod systemd;
