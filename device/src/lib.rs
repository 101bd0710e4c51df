//! The parts of vsnd-device that other crates use: the sandbox, so that
//! tests can run their escape attempts through exactly the code the device
//! runs.

pub mod sandbox;
