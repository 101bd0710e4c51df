//! The vsnd device⇄broker protocol.
//!
//! `vsnd-device` parses guest-controlled bytes; `vsnd-broker` holds the host
//! audio connection and the enable flags. They talk over one `SOCK_SEQPACKET`
//! socketpair, one bincode-encoded message per packet. Everything here is
//! written for a broker that treats the device as hostile:
//!
//! * [`message`]: the whole protocol as two enums ([`DeviceMsg`],
//!   [`BrokerMsg`]). There is deliberately no message by which the device can
//!   change what the broker lets through.
//! * [`codec`]: the one bincode configuration, with an explicit size limit
//!   ([`MAX_FRAME`]) and trailing bytes rejected.
//! * [`channel`]: SEQPACKET framing over a socket.

pub mod channel;
pub mod codec;
pub mod lifecycle;
pub mod message;

pub use channel::{socketpair, Channel, ChannelError};
pub use codec::{decode, encode, CodecError, MAX_FRAME};
pub use message::*;
