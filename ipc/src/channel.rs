//! SEQPACKET framing: one encoded message per packet.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use bincode::{Decode, Encode};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};

use crate::codec::{self, CodecError, MAX_FRAME};

/// Why a send or receive failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Non-blocking socket: nothing to read, or no room to write.
    #[error("operation would block")]
    WouldBlock,
    /// The peer closed its end.
    #[error("peer closed the channel")]
    Closed,
    /// The packet was refused by the codec.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A socket error.
    #[error("channel I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Create the device⇄broker socketpair (`AF_UNIX`, `SOCK_SEQPACKET`,
/// close-on-exec).
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// One end of the SEQPACKET channel.
pub struct Channel {
    fd: OwnedFd,
    buf: Box<[u8]>,
}

impl Channel {
    /// Wrap a connected SEQPACKET socket.
    pub fn new(fd: OwnedFd) -> Self {
        Channel {
            fd,
            buf: vec![0u8; MAX_FRAME + 1].into_boxed_slice(),
        }
    }

    /// Switch the socket between blocking and non-blocking mode.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&self.fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let mut flags = OFlag::from_bits_truncate(flags);
        flags.set(OFlag::O_NONBLOCK, nonblocking);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(())
    }

    /// Encode and send one message.
    pub fn send<M: Encode>(&self, msg: &M) -> Result<(), ChannelError> {
        let bytes = codec::encode(msg)?;
        self.send_frame(&bytes)
    }

    /// Send one already-encoded frame.
    pub fn send_frame(&self, frame: &[u8]) -> Result<(), ChannelError> {
        loop {
            match socket::send(self.fd.as_raw_fd(), frame, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(ChannelError::WouldBlock),
                Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                    return Err(ChannelError::Closed)
                }
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        }
    }

    /// Receive and decode one message. A packet larger than [`MAX_FRAME`] is
    /// discarded whole and reported as [`CodecError::Oversized`].
    pub fn recv<M: Decode<()>>(&mut self) -> Result<M, ChannelError> {
        self.recv_flags(MsgFlags::empty())
    }

    /// Like [`Channel::recv`], but never blocks, whatever the socket's mode:
    /// [`ChannelError::WouldBlock`] when no packet is waiting.
    pub fn try_recv<M: Decode<()>>(&mut self) -> Result<M, ChannelError> {
        self.recv_flags(MsgFlags::MSG_DONTWAIT)
    }

    fn recv_flags<M: Decode<()>>(&mut self, flags: MsgFlags) -> Result<M, ChannelError> {
        let n = loop {
            // MSG_TRUNC makes recv return the packet's real length even when
            // it did not fit, so oversized packets are detected, not split.
            match socket::recv(
                self.fd.as_raw_fd(),
                &mut self.buf,
                MsgFlags::MSG_TRUNC | flags,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(ChannelError::WouldBlock),
                Err(nix::errno::Errno::ECONNRESET) => return Err(ChannelError::Closed),
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        };
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        let frame = self.buf.get(..n).ok_or(CodecError::Oversized(n))?;
        Ok(codec::decode(frame)?)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    #[test]
    fn messages_cross_a_socketpair() {
        let (a, b) = socketpair().unwrap();
        let a = Channel::new(a);
        let mut b = Channel::new(b);
        a.send(&DeviceMsg::Capture {
            buffer: 9,
            len: 480,
        })
        .unwrap();
        let got: DeviceMsg = b.recv().unwrap();
        assert_eq!(
            got,
            DeviceMsg::Capture {
                buffer: 9,
                len: 480
            }
        );
    }

    #[test]
    fn oversized_packet_is_refused_and_channel_stays_usable() {
        let (a, b) = socketpair().unwrap();
        let mut b = Channel::new(b);
        let big = vec![0u8; MAX_FRAME + 100];
        socket::send(a.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        let a = Channel::new(a);
        a.send(&DeviceMsg::Start {
            direction: Direction::Output,
        })
        .unwrap();
        match b.recv::<DeviceMsg>() {
            Err(ChannelError::Codec(CodecError::Oversized(n))) => assert_eq!(n, MAX_FRAME + 100),
            other => panic!("expected Oversized, got {other:?}"),
        }
        let next: DeviceMsg = b.recv().unwrap();
        assert_eq!(
            next,
            DeviceMsg::Start {
                direction: Direction::Output
            }
        );
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = socketpair().unwrap();
        drop(a);
        let mut b = Channel::new(b);
        assert!(matches!(b.recv::<DeviceMsg>(), Err(ChannelError::Closed)));
        assert!(matches!(
            b.send(&DeviceMsg::Start {
                direction: Direction::Input
            }),
            Err(ChannelError::Closed)
        ));
    }

    #[test]
    fn nonblocking_empty_channel_would_block() {
        let (_a, b) = socketpair().unwrap();
        let mut b = Channel::new(b);
        b.set_nonblocking(true).unwrap();
        assert!(matches!(
            b.recv::<DeviceMsg>(),
            Err(ChannelError::WouldBlock)
        ));
    }
}
