//! Fetching and checking a command entry, gathering its input and scattering its
//! output through the mailbox chains (mlx5-device.md §3.2–3.3, §3.6, §3.8).
//!
//! Everything here reads guest memory that the guest controls. Every length is checked
//! against a named cap before use, every chain walk is bounded by the number of blocks
//! the declared length needs, and a broken entry or chain becomes the delivery status
//! that names the problem:
//!
//! | problem | delivery status |
//! |---|---|
//! | `type` ≠ 7 | CMD_DESCR_ERR (0x10) |
//! | `token` = 0, or a block's token ≠ the entry's | TOK_ERR (0x2) |
//! | `inlen` < 16 or > [`MAX_CMD_IN_LEN`]; input chain ends (`next` = 0) early | IN_LENGTH_ERR (0x7) |
//! | `outlen` < 8 or > [`MAX_CMD_OUT_LEN`]; output chain ends early | OUT_LENGTH_ERR (0x8) |
//! | a block's `block_num` is not its position, or a block comes back (loop) | BAD_BLK_NUM_ERR (0x3) |
//! | an input block pointer misaligned or not DMA-mapped | IN_PTR_ALIGN_ERR (0x5) |
//! | an output block pointer misaligned or not DMA-mapped | OUT_PTR_ALIGN_ERR (0x4) |
//!
//! The PRM has no "unmapped pointer" status; the pointer error of that direction is the
//! closest (the kernel maps it to -EFAULT, which is what an IOMMU fault on a bad pointer
//! means). Signatures are not checked: mlx5_core runs with checksums disabled and this
//! device advertises `cmdif_checksum` = 0.

use std::collections::HashSet;

use mlx5_prm::cmdq::{
    CmdLayout, CmdProtBlock, DeliveryStatus, BLOCK_NEXT_OFFSET, CMD_ENTRY_SIZE, CMD_OUT_OFFSET,
    CMD_OWNER_HW, CMD_STATUS_OWN_OFFSET, INLINE_SIZE, MAILBOX_BLOCK_SIZE, MAILBOX_DATA_SIZE,
    MLX5_PCI_CMD_XPORT,
};
use vfu::dma::DmaError;
use vfu::Dma;
use zerocopy::FromBytes;

use crate::firmware::Env;

/// Where the queue's DMA goes: the function's [`Env`] (so that every access passes
/// the function's fault-injection point), or a bare IOVA space (unit tests).
pub trait DmaPort {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;
    /// Whether all of `iova..iova+len` can be written now, touching nothing. A port
    /// that cannot tell without writing says yes; the write itself still checks.
    fn check_writable(&self, _iova: u64, _len: usize) -> Result<(), DmaError> {
        Ok(())
    }
}

impl DmaPort for Dma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        Dma::read(self, iova, buf)
    }
    fn check_writable(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        Dma::check_writable(self, iova, len)
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        Dma::write(self, iova, data)
    }
}

impl DmaPort for dyn Env + '_ {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.dma_read(iova, buf)
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.dma_write(iova, data)
    }
    fn check_writable(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        self.dma_writable(iova, len)
    }
}

/// Largest input message accepted (1 MiB: 2048 mailboxes).
pub const MAX_CMD_IN_LEN: usize = 1 << 20;
/// Largest output message accepted.
pub const MAX_CMD_OUT_LEN: usize = 1 << 20;
/// Smallest input: the 16-byte command header.
pub const MIN_CMD_IN_LEN: usize = INLINE_SIZE;
/// Smallest output: status and syndrome (ENABLE_HCA's output is only 12 bytes).
pub const MIN_CMD_OUT_LEN: usize = 8;
/// Alignment required of a mailbox pointer (its `next` field is a be64). The kernel
/// gives 1 KiB-aligned blocks; this device asks only for natural alignment.
pub const MAILBOX_PTR_ALIGN: u64 = 8;

/// Which chain a walk is on (selects the matching delivery statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    In,
    Out,
}

impl Dir {
    fn length_err(self) -> DeliveryStatus {
        match self {
            Dir::In => DeliveryStatus::InLengthErr,
            Dir::Out => DeliveryStatus::OutLengthErr,
        }
    }

    fn ptr_err(self) -> DeliveryStatus {
        match self {
            Dir::In => DeliveryStatus::InPtrAlignErr,
            Dir::Out => DeliveryStatus::OutPtrAlignErr,
        }
    }
}

/// An entry as fetched from the queue.
#[derive(Debug)]
pub enum Fetched {
    /// The ownership bit is 0: software owns the slot, so there is nothing to execute.
    NotOwned,
    /// A hardware-owned entry.
    Entry(CmdLayout),
}

/// Reads the 64-byte entry at `addr`.
pub fn fetch_entry(dma: &(impl DmaPort + ?Sized), addr: u64) -> Result<Fetched, DmaError> {
    let mut raw = [0u8; CMD_ENTRY_SIZE];
    dma.read(addr, &mut raw)?;
    // The array is exactly the entry size, so this cannot fail.
    let Ok(entry) = CmdLayout::read_from_bytes(&raw) else {
        return Ok(Fetched::NotOwned);
    };
    if entry.status_own & CMD_OWNER_HW == 0 {
        return Ok(Fetched::NotOwned);
    }
    Ok(Fetched::Entry(entry))
}

/// A command ready to execute: its input and where its output goes.
#[derive(Debug)]
pub struct Prepared {
    /// Exactly `inlen` bytes.
    pub input: Vec<u8>,
    pub outlen: usize,
    /// The output chain's block addresses, as many as `outlen` needs.
    pub out_blocks: Vec<u64>,
}

/// Checks the entry, gathers the input and walks the output chain. The output chain is
/// checked whole before execution (every block mapped and writable, not only its
/// control tail) so a broken one never loses the result of a command that changed
/// state.
pub fn prepare(dma: &(impl DmaPort + ?Sized), e: &CmdLayout) -> Result<Prepared, DeliveryStatus> {
    if e.type_ != MLX5_PCI_CMD_XPORT {
        return Err(DeliveryStatus::CmdDescrErr);
    }
    if e.token == 0 {
        return Err(DeliveryStatus::TokenErr);
    }
    let inlen = usize::try_from(e.inlen.get()).map_err(|_| DeliveryStatus::InLengthErr)?;
    if !(MIN_CMD_IN_LEN..=MAX_CMD_IN_LEN).contains(&inlen) {
        return Err(DeliveryStatus::InLengthErr);
    }
    let outlen = usize::try_from(e.outlen.get()).map_err(|_| DeliveryStatus::OutLengthErr)?;
    if !(MIN_CMD_OUT_LEN..=MAX_CMD_OUT_LEN).contains(&outlen) {
        return Err(DeliveryStatus::OutLengthErr);
    }
    let mut input = Vec::with_capacity(inlen);
    input.extend_from_slice(&e.in_);
    walk_chain(dma, e.in_ptr.get(), inlen, e.token, Dir::In, |data| {
        let want = (inlen - input.len()).min(MAILBOX_DATA_SIZE);
        input.extend_from_slice(&data[..want]);
    })?;
    let out_blocks = walk_chain(dma, e.out_ptr.get(), outlen, e.token, Dir::Out, |_| {})?;
    input.truncate(inlen);
    Ok(Prepared {
        input,
        outlen,
        out_blocks,
    })
}

/// Walks the chain starting at `first` for a message of `len` bytes: exactly
/// `block_count(len)` blocks, each checked (alignment, mapping, block number, token,
/// no block visited twice). Calls `data` with each input block's data (only for
/// [`Dir::In`]; output blocks are read only up to their control fields).
fn walk_chain(
    dma: &(impl DmaPort + ?Sized),
    first: u64,
    len: usize,
    token: u8,
    dir: Dir,
    mut data: impl FnMut(&[u8]),
) -> Result<Vec<u64>, DeliveryStatus> {
    let blocks = mlx5_prm::cmdq::block_count(len);
    let mut addrs = Vec::with_capacity(blocks);
    let mut seen = HashSet::with_capacity(blocks);
    let mut next = first;
    for i in 0..blocks {
        if next == 0 {
            return Err(dir.length_err());
        }
        if !next.is_multiple_of(MAILBOX_PTR_ALIGN) {
            return Err(dir.ptr_err());
        }
        if !seen.insert(next) {
            return Err(DeliveryStatus::BadBlockNumErr);
        }
        let mut raw = [0u8; MAILBOX_BLOCK_SIZE];
        let (buf, base) = match dir {
            Dir::In => (&mut raw[..], next),
            // Only the control tail (next, block_num, token, signatures) is needed.
            Dir::Out => (
                &mut raw[BLOCK_NEXT_OFFSET..],
                next.checked_add(BLOCK_NEXT_OFFSET as u64)
                    .ok_or(dir.ptr_err())?,
            ),
        };
        dma.read(base, buf).map_err(|_| dir.ptr_err())?;
        // The whole output block must take the output: a command that changed state
        // and then could not report it (MANAGE_PAGES' pages, a created object) would
        // leave the driver and the device disagreeing.
        if dir == Dir::Out {
            dma.check_writable(next, MAILBOX_BLOCK_SIZE)
                .map_err(|_| dir.ptr_err())?;
        }
        let Ok(block) = CmdProtBlock::read_from_bytes(&raw) else {
            return Err(DeliveryStatus::FwErr);
        };
        if u64::from(block.block_num.get()) != i as u64 {
            return Err(DeliveryStatus::BadBlockNumErr);
        }
        if block.token != token {
            return Err(DeliveryStatus::TokenErr);
        }
        if dir == Dir::In {
            data(&block.data);
        }
        addrs.push(next);
        next = block.next.get();
    }
    Ok(addrs)
}

/// Writes `out` (already cut to `outlen`) to the entry's inline `out` and the output
/// blocks' data. Does not touch `status_own`.
pub fn scatter(
    dma: &(impl DmaPort + ?Sized),
    entry_addr: u64,
    out: &[u8],
    blocks: &[u64],
) -> Result<(), DmaError> {
    let inline = out.len().min(INLINE_SIZE);
    let out_addr = entry_addr
        .checked_add(CMD_OUT_OFFSET as u64)
        .ok_or(DmaError::Overflow {
            iova: entry_addr,
            len: CMD_OUT_OFFSET as u64,
        })?;
    dma.write(out_addr, &out[..inline])?;
    for (chunk, &addr) in out[inline..].chunks(MAILBOX_DATA_SIZE).zip(blocks) {
        dma.write(addr, chunk)?;
    }
    Ok(())
}

/// Writes `status_own` = `(status << 1) | 0`: the slot goes back to software.
pub fn complete(
    dma: &(impl DmaPort + ?Sized),
    entry_addr: u64,
    status: DeliveryStatus,
) -> Result<(), DmaError> {
    let addr = entry_addr
        .checked_add(CMD_STATUS_OWN_OFFSET as u64)
        .ok_or(DmaError::Overflow {
            iova: entry_addr,
            len: CMD_ENTRY_SIZE as u64,
        })?;
    dma.write(addr, &[status.status_own()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx5_prm::cmdq::{BLOCK_NUM_OFFSET, BLOCK_TOKEN_OFFSET};
    use zerocopy::{FromZeros, IntoBytes};

    const BASE: u64 = 0x10_0000;

    fn dma() -> (Dma, std::fs::File) {
        let f = vfu::dma::memfd("cmdq-test", 0x10_0000).unwrap();
        let d = Dma::default();
        d.map(
            BASE,
            0x10_0000,
            f.try_clone().unwrap(),
            0,
            vfu::dma::VFIO_DMA_MAP_FLAG_READ | vfu::dma::VFIO_DMA_MAP_FLAG_WRITE,
        )
        .unwrap();
        (d, f)
    }

    /// Writes a block at `addr` with `data`, `num`, `token`, `next`.
    fn block(d: &Dma, addr: u64, data: &[u8], num: u32, token: u8, next: u64) {
        let mut b = [0u8; MAILBOX_BLOCK_SIZE];
        b[..data.len()].copy_from_slice(data);
        b[BLOCK_NEXT_OFFSET..BLOCK_NEXT_OFFSET + 8].copy_from_slice(&next.to_be_bytes());
        b[BLOCK_NUM_OFFSET..BLOCK_NUM_OFFSET + 4].copy_from_slice(&num.to_be_bytes());
        b[BLOCK_TOKEN_OFFSET] = token;
        d.write(addr, &b).unwrap();
    }

    fn entry(inlen: u32, in_ptr: u64, outlen: u32, out_ptr: u64) -> CmdLayout {
        let mut e = CmdLayout::new_zeroed();
        e.type_ = MLX5_PCI_CMD_XPORT;
        e.token = 0x33;
        e.status_own = CMD_OWNER_HW;
        e.inlen.set(inlen);
        e.in_ptr.set(in_ptr);
        e.outlen.set(outlen);
        e.out_ptr.set(out_ptr);
        for (i, b) in e.in_.iter_mut().enumerate() {
            *b = i as u8;
        }
        e
    }

    #[test]
    fn gathers_inline_and_many_blocks_exactly() {
        let (d, _f) = dma();
        let pattern: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
        // Three blocks, not in address order.
        block(&d, BASE + 0x3000, &pattern[..512], 0, 0x33, BASE + 0x1000);
        block(
            &d,
            BASE + 0x1000,
            &pattern[512..1024],
            1,
            0x33,
            BASE + 0x2000,
        );
        block(&d, BASE + 0x2000, &pattern[1024..], 2, 0x33, 0xdead_0000);
        let p = prepare(&d, &entry(16 + 1200, BASE + 0x3000, 16, 0)).unwrap();
        assert_eq!(p.input.len(), 1216);
        assert_eq!(&p.input[..16], &(0..16).collect::<Vec<u8>>()[..]);
        assert_eq!(&p.input[16..], &pattern[..]);
        assert!(p.out_blocks.is_empty());
        // Inline only: in_ptr is never followed.
        let p = prepare(&d, &entry(16, 0xbad, 16, 0xbad)).unwrap();
        assert_eq!(p.input.len(), 16);
    }

    #[test]
    fn broken_entries_and_chains_get_their_delivery_status() {
        let (d, _f) = dma();
        let mut e = entry(16, 0, 16, 0);
        e.type_ = 6;
        assert_eq!(prepare(&d, &e).unwrap_err(), DeliveryStatus::CmdDescrErr);
        let mut e = entry(16, 0, 16, 0);
        e.token = 0;
        assert_eq!(prepare(&d, &e).unwrap_err(), DeliveryStatus::TokenErr);
        assert_eq!(
            prepare(&d, &entry(15, 0, 16, 0)).unwrap_err(),
            DeliveryStatus::InLengthErr
        );
        assert_eq!(
            prepare(&d, &entry(MAX_CMD_IN_LEN as u32 + 1, 0, 16, 0)).unwrap_err(),
            DeliveryStatus::InLengthErr
        );
        assert_eq!(
            prepare(&d, &entry(16, 0, 7, 0)).unwrap_err(),
            DeliveryStatus::OutLengthErr
        );
        assert_eq!(
            prepare(&d, &entry(16, 0, u32::MAX, 0)).unwrap_err(),
            DeliveryStatus::OutLengthErr
        );
        // Declared length beyond the chain.
        block(&d, BASE, &[1; 512], 0, 0x33, 0);
        assert_eq!(
            prepare(&d, &entry(16 + 600, BASE, 16, 0)).unwrap_err(),
            DeliveryStatus::InLengthErr
        );
        assert_eq!(
            prepare(&d, &entry(16, 0, 16 + 600, BASE)).unwrap_err(),
            DeliveryStatus::OutLengthErr
        );
        // No pointer at all although the length needs a block.
        assert_eq!(
            prepare(&d, &entry(17, 0, 16, 0)).unwrap_err(),
            DeliveryStatus::InLengthErr
        );
        // A loop: block 0 → block 1 → block 0 (block_num says 0 again), or a block
        // pointing at itself with an increasing number it cannot have.
        block(&d, BASE, &[1; 512], 0, 0x33, BASE + 0x400);
        block(&d, BASE + 0x400, &[1; 512], 1, 0x33, BASE);
        assert_eq!(
            prepare(&d, &entry(16 + 512 * 5, BASE, 16, 0)).unwrap_err(),
            DeliveryStatus::BadBlockNumErr
        );
        block(&d, BASE + 0x800, &[1; 512], 0, 0x33, BASE + 0x800);
        assert_eq!(
            prepare(&d, &entry(16 + 512 * 2, BASE + 0x800, 16, 0)).unwrap_err(),
            DeliveryStatus::BadBlockNumErr
        );
        // Out of order.
        block(&d, BASE, &[1; 512], 1, 0x33, 0);
        assert_eq!(
            prepare(&d, &entry(16 + 10, BASE, 16, 0)).unwrap_err(),
            DeliveryStatus::BadBlockNumErr
        );
        // Token mismatch.
        block(&d, BASE, &[1; 512], 0, 0x34, 0);
        assert_eq!(
            prepare(&d, &entry(16 + 10, BASE, 16, 0)).unwrap_err(),
            DeliveryStatus::TokenErr
        );
        // Unmapped or misaligned pointers, each direction.
        assert_eq!(
            prepare(&d, &entry(16 + 10, 0x9000_0000, 16, 0)).unwrap_err(),
            DeliveryStatus::InPtrAlignErr
        );
        assert_eq!(
            prepare(&d, &entry(16 + 10, BASE + 4, 16, 0)).unwrap_err(),
            DeliveryStatus::InPtrAlignErr
        );
        assert_eq!(
            prepare(&d, &entry(16, 0, 32, 0x9000_0000)).unwrap_err(),
            DeliveryStatus::OutPtrAlignErr
        );
        assert_eq!(
            prepare(&d, &entry(16, 0, 32, u64::MAX - 7)).unwrap_err(),
            DeliveryStatus::OutPtrAlignErr
        );
        // A block straddling the end of the mapping.
        assert_eq!(
            prepare(&d, &entry(16 + 10, BASE + 0x10_0000 - 0x100, 16, 0)).unwrap_err(),
            DeliveryStatus::InPtrAlignErr
        );
    }

    #[test]
    fn scatter_fills_inline_then_blocks_and_complete_returns_ownership() {
        let (d, _f) = dma();
        let out_chain = [BASE + 0x2000, BASE + 0x1000];
        block(&d, out_chain[0], &[0xee; 512], 0, 0x33, out_chain[1]);
        block(&d, out_chain[1], &[0xee; 512], 1, 0x33, 0);
        let e = entry(16, 0, 16 + 600, out_chain[0]);
        d.write(BASE, e.as_bytes()).unwrap();
        let p = prepare(&d, &e).unwrap();
        assert_eq!(p.out_blocks, out_chain);
        let out: Vec<u8> = (0..616u32).map(|i| i as u8).collect();
        scatter(&d, BASE, &out, &p.out_blocks).unwrap();
        complete(&d, BASE, DeliveryStatus::Ok).unwrap();
        let mut got = [0u8; 64];
        d.read(BASE, &mut got).unwrap();
        assert_eq!(&got[0x20..0x30], &out[..16]);
        assert_eq!(got[0x3f], 0);
        let mut b = [0u8; MAILBOX_BLOCK_SIZE];
        d.read(out_chain[0], &mut b).unwrap();
        assert_eq!(&b[..512], &out[16..528]);
        assert_eq!(b[BLOCK_TOKEN_OFFSET], 0x33, "control fields untouched");
        d.read(out_chain[1], &mut b).unwrap();
        assert_eq!(&b[..88], &out[528..]);
        assert_eq!(b[88], 0xee, "nothing written past the output");
        complete(&d, BASE, DeliveryStatus::BadBlockNumErr).unwrap();
        d.read(BASE, &mut got).unwrap();
        assert_eq!(got[0x3f], 0x06);
        match fetch_entry(&d, BASE).unwrap() {
            Fetched::NotOwned => {}
            other => panic!("expected a software-owned slot, got {other:?}"),
        }
        assert!(fetch_entry(&d, 0x5000).is_err());
    }
}
