//! Guest buffers as scatter-gather lists, with every access bounds-checked
//! against guest memory.

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Most descriptors accepted in one chain (direct and indirect together).
/// Longer chains are refused as malformed.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// A run of guest memory: (address, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// The readable or the writable part of a descriptor chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sg {
    segs: Vec<Segment>,
    len: u64,
}

/// Why a chain could not be used at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong,
    #[error(
        "chain is broken: it loops, a next index or indirect table is invalid, \
         a descriptor cannot be read, or it is longer than 4 GiB"
    )]
    Broken,
    #[error("guest memory access out of range")]
    OutOfRange,
}

impl Sg {
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the chain has no bytes in this direction.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.segs.push(Segment { addr, len });
            self.len = self.len.saturating_add(u64::from(len));
        }
    }

    /// Copy `buf.len()` bytes starting `offset` bytes into the list.
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.walk(offset, buf.len(), |addr, start, n| {
            let dst = buf
                .get_mut(start..start + n)
                .ok_or(ChainError::OutOfRange)?;
            mem.read_slice(dst, addr)
                .map_err(|_| ChainError::OutOfRange)?;
            done += n;
            Ok(())
        })?;
        if done == buf.len() {
            Ok(())
        } else {
            Err(ChainError::OutOfRange)
        }
    }

    /// Copy `data` into the list starting `offset` bytes in.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.walk(offset, data.len(), |addr, start, n| {
            let src = data.get(start..start + n).ok_or(ChainError::OutOfRange)?;
            mem.write_slice(src, addr)
                .map_err(|_| ChainError::OutOfRange)?;
            done += n;
            Ok(())
        })?;
        if done == data.len() {
            Ok(())
        } else {
            Err(ChainError::OutOfRange)
        }
    }

    /// Visit the pieces of `[offset, offset + len)`: (guest address, offset
    /// into the caller's buffer, length).
    fn walk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(ChainError::OutOfRange)?;
        if end > self.len {
            return Err(ChainError::OutOfRange);
        }
        let mut seg_start = 0u64;
        let mut pos = offset;
        for seg in &self.segs {
            if pos >= end {
                break;
            }
            let seg_end = seg_start + u64::from(seg.len);
            if pos < seg_end {
                let within = pos - seg_start;
                let n = (seg_end.min(end) - pos) as usize;
                let addr = seg.addr.checked_add(within).ok_or(ChainError::OutOfRange)?;
                f(addr, (pos - offset) as usize, n)?;
                pos += n as u64;
            }
            seg_start = seg_end;
        }
        Ok(())
    }
}

/// The two halves of a chain.
#[derive(Debug, Default)]
pub struct Chain {
    /// Device-readable descriptors, in order.
    pub readable: Sg,
    /// Device-writable descriptors, in order.
    pub writable: Sg,
}

/// Split a descriptor chain into its readable and writable parts.
///
/// virtio-queue's iterator stops, without saying so, at a loop (after a
/// queue's worth of descriptors), at a `next` index past the table, at a
/// descriptor or indirect table it cannot read or accept, and when the chain
/// passes 4 GiB. In each case the last descriptor it yielded still has
/// `VIRTQ_DESC_F_NEXT` set (or it yielded none): such a chain is refused as
/// [`ChainError::Broken`] rather than acted on as if its prefix were the
/// whole request. This also bounds the total count.
pub fn split_chain<M>(chain: DescriptorChain<M>) -> Result<Chain, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut out = Chain::default();
    let mut ended = false;
    for (n, desc) in chain.enumerate() {
        if n >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        ended = !desc.has_next();
        push_desc(&mut out, &desc);
    }
    if ended {
        Ok(out)
    } else {
        Err(ChainError::Broken)
    }
}

fn push_desc(out: &mut Chain, desc: &Descriptor) {
    if desc.is_write_only() {
        out.writable.push(desc.addr(), desc.len());
    } else {
        out.readable.push(desc.addr(), desc.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn sg(parts: &[(u64, u32)]) -> Sg {
        let mut s = Sg::default();
        for &(a, l) in parts {
            s.push(GuestAddress(a), l);
        }
        s
    }

    #[test]
    fn reads_and_writes_span_segments() {
        let m = mem();
        let s = sg(&[(0x100, 3), (0x0, 0), (0x200, 5)]);
        assert_eq!(s.len(), 8);
        s.write_at(&m, 1, &[1, 2, 3, 4, 5]).unwrap();
        let mut all = [0u8; 8];
        s.read_at(&m, 0, &mut all).unwrap();
        assert_eq!(all, [0, 1, 2, 3, 4, 5, 0, 0]);
        let mut raw = [0u8; 3];
        m.read_slice(&mut raw, GuestAddress(0x200)).unwrap();
        assert_eq!(raw, [3, 4, 5]);
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let m = mem();
        let s = sg(&[(0xfff0, 0x20)]);
        let mut buf = [0u8; 0x20];
        assert_eq!(s.read_at(&m, 0, &mut buf), Err(ChainError::OutOfRange));
        assert_eq!(
            s.write_at(&m, 0x10, &[0; 0x11]),
            Err(ChainError::OutOfRange)
        );
        let s = sg(&[(u64::MAX - 2, 8)]);
        assert!(s.read_at(&m, 0, &mut [0u8; 8]).is_err());
        assert!(s.read_at(&m, u64::MAX, &mut [0u8; 1]).is_err());
    }
}
