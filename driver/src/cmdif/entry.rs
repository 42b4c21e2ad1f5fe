//! Encoding a command entry and building, filling and reading mailbox chains
//! (mlx5-device.md §3.2–3.3). Pure byte work over the [`DmaArena`]; no I/O.
//!
//! The driver never follows `next` pointers the device could have changed: it keeps
//! the list of blocks it built and reads the output back through that list, as
//! `mlx5_copy_from_msg` does.

use mlx5_prm::cmdq::{
    block_count, block_signatures, entry_signature, CMD_ENTRY_SIZE, CMD_OWNER_HW, INLINE_SIZE,
    MAILBOX_BLOCK_SIZE, MAILBOX_DATA_SIZE, MLX5_PCI_CMD_XPORT,
};
use mlx5_prm::{CmdInHeader, CmdLayout, CmdOutHeader, CmdProtBlock, Opcode};
use zerocopy::{FromZeros, IntoBytes};

use super::arena::{ArenaError, DmaArena};

/// A command input of `len` bytes (at least the 16-byte header) with the header's
/// opcode and op_mod set.
pub fn new_input(opcode: Opcode, op_mod: u16, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len.max(INLINE_SIZE)];
    m[..INLINE_SIZE].copy_from_slice(CmdInHeader::new(opcode, op_mod).as_bytes());
    m
}

/// The input header of a message (zeros where the message is shorter).
pub fn in_header(input: &[u8]) -> CmdInHeader {
    let mut h = CmdInHeader::new_zeroed();
    let n = input.len().min(INLINE_SIZE);
    h.as_mut_bytes()[..n].copy_from_slice(&input[..n]);
    h
}

/// The output header of a message (zeros where the message is shorter).
pub fn out_header(out: &[u8]) -> CmdOutHeader {
    let mut h = CmdOutHeader::new_zeroed();
    let n = out.len().min(INLINE_SIZE);
    h.as_mut_bytes()[..n].copy_from_slice(&out[..n]);
    h
}

/// A chain of mailbox blocks this driver built, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chain {
    blocks: Vec<u64>,
}

impl Chain {
    /// IOVA of the first block, 0 for an empty chain (`in_ptr`/`out_ptr`).
    pub fn head(&self) -> u64 {
        self.blocks.first().copied().unwrap_or(0)
    }

    /// The blocks, in chain order.
    pub fn blocks(&self) -> &[u64] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Why a chain could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("out of mailbox blocks: {need} needed, {free} free")]
    NoBlocks { need: usize, free: usize },
    #[error(transparent)]
    Arena(#[from] ArenaError),
}

/// Allocates and links a chain able to carry a `msg_len`-byte message (its bytes past
/// the 16 inline ones). Every block gets `next`, `block_num` and `token`; when `data` is
/// given (input chains) it is copied into the blocks and the blocks are signed.
pub fn build_chain(
    arena: &DmaArena,
    msg_len: usize,
    token: u8,
    data: Option<&[u8]>,
) -> Result<Chain, ChainError> {
    let need = block_count(msg_len);
    if need > arena.free_blocks() {
        return Err(ChainError::NoBlocks {
            need,
            free: arena.free_blocks(),
        });
    }
    let mut chain = Chain {
        blocks: Vec::with_capacity(need),
    };
    for _ in 0..need {
        match arena.alloc_block() {
            Some(b) => chain.blocks.push(b),
            None => {
                let free = arena.free_blocks();
                free_chain(arena, &mut chain);
                return Err(ChainError::NoBlocks { need, free });
            }
        }
    }
    let tail = msg_len.saturating_sub(INLINE_SIZE);
    for (n, &iova) in chain.blocks.iter().enumerate() {
        let mut block = CmdProtBlock::new_zeroed();
        if let Some(data) = data {
            let start = n * MAILBOX_DATA_SIZE;
            let end = (start + MAILBOX_DATA_SIZE).min(tail).min(data.len());
            if start < end {
                block.data[..end - start].copy_from_slice(&data[start..end]);
            }
        }
        block
            .next
            .set(chain.blocks.get(n + 1).copied().unwrap_or(0));
        // `need` came from a message length that fits u32, so n fits too.
        block.block_num.set(n as u32);
        block.token = token;
        if data.is_some() {
            let bytes: [u8; MAILBOX_BLOCK_SIZE] = zerocopy::transmute!(block);
            (block.ctrl_sig, block.sig) = block_signatures(&bytes);
        }
        if let Err(e) = arena.write(iova, block.as_bytes()) {
            free_chain(arena, &mut chain);
            return Err(e.into());
        }
    }
    Ok(chain)
}

/// Returns every block of `chain` to the arena and empties it.
pub fn free_chain(arena: &DmaArena, chain: &mut Chain) {
    for b in chain.blocks.drain(..) {
        if let Err(e) = arena.free_block(b) {
            tracing::error!(error = %e, "mailbox block bookkeeping");
        }
    }
}

/// Copies `out.len()` message bytes past the inline 16 from `chain` into `out`.
pub fn read_chain(arena: &DmaArena, chain: &Chain, out: &mut [u8]) -> Result<(), ArenaError> {
    for (n, chunk) in out.chunks_mut(MAILBOX_DATA_SIZE).enumerate() {
        match chain.blocks.get(n) {
            Some(&iova) => arena.read(iova, chunk)?,
            // A chain built for this length always has the block; zero-fill otherwise.
            None => chunk.fill(0),
        }
    }
    Ok(())
}

/// A command entry: type 7, lengths, pointers, the first 16 input bytes, token,
/// status_own = HW and the signature.
pub fn encode_entry(input: &[u8], in_ptr: u64, out_ptr: u64, outlen: u32, token: u8) -> CmdLayout {
    let mut e = CmdLayout::new_zeroed();
    e.type_ = MLX5_PCI_CMD_XPORT;
    e.inlen.set(u32::try_from(input.len()).unwrap_or(u32::MAX));
    e.in_ptr.set(in_ptr);
    let n = input.len().min(INLINE_SIZE);
    e.in_[..n].copy_from_slice(&input[..n]);
    e.out_ptr.set(out_ptr);
    e.outlen.set(outlen);
    e.token = token;
    e.status_own = CMD_OWNER_HW;
    let bytes: [u8; CMD_ENTRY_SIZE] = zerocopy::transmute!(e);
    e.sig = entry_signature(&bytes);
    e
}

/// Reads the entry at `iova` back (after the device handed it to software).
pub fn read_entry(arena: &DmaArena, iova: u64) -> Result<CmdLayout, ArenaError> {
    let mut e = CmdLayout::new_zeroed();
    arena.read(iova, e.as_mut_bytes())?;
    Ok(e)
}

const _: () = assert!(core::mem::size_of::<CmdLayout>() == CMD_ENTRY_SIZE);
const _: () = assert!(core::mem::size_of::<CmdInHeader>() == INLINE_SIZE);

#[cfg(test)]
mod tests {
    use super::super::arena::ArenaConfig;
    use super::*;

    fn arena() -> DmaArena {
        DmaArena::new(ArenaConfig {
            size: 256 << 10,
            iova: 0x4000_0000,
            mailbox_blocks: 64,
        })
        .unwrap()
    }

    fn xor(b: &[u8]) -> u8 {
        b.iter().fold(0, |a, x| a ^ x)
    }

    #[test]
    fn new_input_sets_opcode_and_op_mod_big_endian() {
        let m = new_input(Opcode::QueryHcaCap, 0x41, 16);
        assert_eq!(&m[..8], &[0x01, 0x00, 0, 0, 0, 0, 0, 0x41]);
        let h = in_header(&m);
        assert_eq!((h.opcode.get(), h.op_mod.get()), (0x100, 0x41));
    }

    #[test]
    fn entry_has_sheet_fields_and_xors_to_ff() {
        let input: Vec<u8> = (0..40u8).collect();
        let e = encode_entry(&input, 0x1000, 0x2000, 0x1010, 7);
        let e = e.as_bytes();
        assert_eq!(e[0], 7);
        assert_eq!(&e[4..8], &40u32.to_be_bytes());
        assert_eq!(&e[8..16], &0x1000u64.to_be_bytes());
        assert_eq!(&e[16..32], &input[..16]);
        assert_eq!(&e[0x30..0x38], &0x2000u64.to_be_bytes());
        assert_eq!(&e[0x38..0x3c], &0x1010u32.to_be_bytes());
        assert_eq!(e[0x3c], 7);
        assert_eq!(e[0x3f], 1);
        assert_eq!(xor(e), 0xff);
    }

    #[test]
    fn short_input_is_zero_padded_inline() {
        let e = encode_entry(&[1, 4], 0, 0, 16, 1);
        let e = e.as_bytes();
        assert_eq!(
            &e[16..32],
            &[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&e[8..16], &[0; 8]);
    }

    #[test]
    fn chains_of_zero_one_and_many_blocks() {
        let a = arena();
        for (len, blocks) in [
            (16usize, 0usize),
            (17, 1),
            (112, 1),
            (528, 1),
            (529, 2),
            (0x1010, 8),
        ] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut c = build_chain(&a, len, 0x42, Some(&msg[16.min(len)..])).unwrap();
            assert_eq!(c.len(), blocks, "len {len}");
            for (n, &b) in c.blocks().iter().enumerate() {
                let mut raw = [0u8; MAILBOX_BLOCK_SIZE];
                a.read(b, &mut raw).unwrap();
                let next = u64::from_be_bytes(raw[0x230..0x238].try_into().unwrap());
                assert_eq!(next, c.blocks().get(n + 1).copied().unwrap_or(0));
                assert_eq!(
                    u32::from_be_bytes(raw[0x238..0x23c].try_into().unwrap()),
                    n as u32
                );
                assert_eq!(raw[0x23d], 0x42);
                assert_eq!(xor(&raw[0x200..0x23f]), 0xff, "ctrl_sig");
                assert_eq!(xor(&raw[..0x240]), 0xff, "sig");
            }
            let mut back = vec![0u8; len.saturating_sub(16)];
            read_chain(&a, &c, &mut back).unwrap();
            assert_eq!(back, msg[16.min(len)..]);
            free_chain(&a, &mut c);
            assert_eq!(a.free_blocks(), 64);
        }
    }

    #[test]
    fn running_out_of_blocks_is_an_error_and_leaks_nothing() {
        let a = arena();
        let too_big = 16 + 65 * 512;
        assert!(matches!(
            build_chain(&a, too_big, 1, None),
            Err(ChainError::NoBlocks { need: 65, .. })
        ));
        assert_eq!(a.free_blocks(), 64);
    }
}
