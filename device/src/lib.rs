//! vsnd-device as a library: the binary `vsnd-device` is a thin `main` over
//! these modules. They are public so that the tests and the fuzz targets run
//! exactly the code the device runs (the sandbox, the control-request model,
//! the descriptor-chain parsing); they are not a stable API.

pub mod backend;
pub mod control;
pub mod sandbox;
pub mod sg;
pub mod virtio_snd;
