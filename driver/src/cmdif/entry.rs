//! Encoding a command entry and building, filling and reading mailbox chains
//! (mlx5-device.md §3.2–3.3). Pure byte work over the [`DmaArena`]; no I/O.
//!
//! The driver never follows `next` pointers the device could have changed: it keeps
//! the list of blocks it built and reads the output back through that list, as
//! `mlx5_copy_from_msg` does.

use mlx5_prm::cmdq::{
    block_count, block_signatures, entry_signature, BLOCK_CTRL_SIG_OFFSET, BLOCK_NEXT_OFFSET,
    BLOCK_NUM_OFFSET, BLOCK_SIG_OFFSET, BLOCK_TOKEN_OFFSET, CMD_ENTRY_SIZE, CMD_INLEN_OFFSET,
    CMD_IN_OFFSET, CMD_IN_PTR_OFFSET, CMD_OUTLEN_OFFSET, CMD_OUT_OFFSET, CMD_OUT_PTR_OFFSET,
    CMD_OWNER_HW, CMD_SIG_OFFSET, CMD_STATUS_OWN_OFFSET, CMD_TOKEN_OFFSET, INLINE_SIZE,
    MAILBOX_BLOCK_SIZE, MAILBOX_DATA_SIZE, MLX5_PCI_CMD_XPORT,
};

use super::arena::{ArenaError, DmaArena};

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
    arena: &mut DmaArena,
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
    let mut block = [0u8; MAILBOX_BLOCK_SIZE];
    for (n, &iova) in chain.blocks.iter().enumerate() {
        block.fill(0);
        if let Some(data) = data {
            let start = n * MAILBOX_DATA_SIZE;
            let end = (start + MAILBOX_DATA_SIZE).min(tail).min(data.len());
            if start < end {
                block[..end - start].copy_from_slice(&data[start..end]);
            }
        }
        let next = chain.blocks.get(n + 1).copied().unwrap_or(0);
        block[BLOCK_NEXT_OFFSET..BLOCK_NEXT_OFFSET + 8].copy_from_slice(&next.to_be_bytes());
        // `need` came from a message length that fits u32, so n fits too.
        block[BLOCK_NUM_OFFSET..BLOCK_NUM_OFFSET + 4].copy_from_slice(&(n as u32).to_be_bytes());
        block[BLOCK_TOKEN_OFFSET] = token;
        if data.is_some() {
            let (ctrl, sig) = block_signatures(&block);
            block[BLOCK_CTRL_SIG_OFFSET] = ctrl;
            block[BLOCK_SIG_OFFSET] = sig;
        }
        if let Err(e) = arena.write(iova, &block) {
            free_chain(arena, &mut chain);
            return Err(e.into());
        }
    }
    Ok(chain)
}

/// Returns every block of `chain` to the arena and empties it.
pub fn free_chain(arena: &mut DmaArena, chain: &mut Chain) {
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
pub fn encode_entry(
    input: &[u8],
    in_ptr: u64,
    out_ptr: u64,
    outlen: u32,
    token: u8,
) -> [u8; CMD_ENTRY_SIZE] {
    let mut e = [0u8; CMD_ENTRY_SIZE];
    e[0] = MLX5_PCI_CMD_XPORT;
    let inlen = u32::try_from(input.len()).unwrap_or(u32::MAX);
    e[CMD_INLEN_OFFSET..CMD_INLEN_OFFSET + 4].copy_from_slice(&inlen.to_be_bytes());
    e[CMD_IN_PTR_OFFSET..CMD_IN_PTR_OFFSET + 8].copy_from_slice(&in_ptr.to_be_bytes());
    let n = input.len().min(INLINE_SIZE);
    e[CMD_IN_OFFSET..CMD_IN_OFFSET + n].copy_from_slice(&input[..n]);
    e[CMD_OUT_PTR_OFFSET..CMD_OUT_PTR_OFFSET + 8].copy_from_slice(&out_ptr.to_be_bytes());
    e[CMD_OUTLEN_OFFSET..CMD_OUTLEN_OFFSET + 4].copy_from_slice(&outlen.to_be_bytes());
    e[CMD_TOKEN_OFFSET] = token;
    e[CMD_STATUS_OWN_OFFSET] = CMD_OWNER_HW;
    e[CMD_SIG_OFFSET] = entry_signature(&e);
    e
}

/// The inline output bytes of a completed entry.
pub fn entry_out(entry: &[u8; CMD_ENTRY_SIZE]) -> [u8; INLINE_SIZE] {
    let mut o = [0u8; INLINE_SIZE];
    o.copy_from_slice(&entry[CMD_OUT_OFFSET..CMD_OUT_OFFSET + INLINE_SIZE]);
    o
}

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
    fn entry_has_sheet_fields_and_xors_to_ff() {
        let input: Vec<u8> = (0..40u8).collect();
        let e = encode_entry(&input, 0x1000, 0x2000, 0x1010, 7);
        assert_eq!(e[0], 7);
        assert_eq!(&e[4..8], &40u32.to_be_bytes());
        assert_eq!(&e[8..16], &0x1000u64.to_be_bytes());
        assert_eq!(&e[16..32], &input[..16]);
        assert_eq!(&e[0x30..0x38], &0x2000u64.to_be_bytes());
        assert_eq!(&e[0x38..0x3c], &0x1010u32.to_be_bytes());
        assert_eq!(e[0x3c], 7);
        assert_eq!(e[0x3f], 1);
        assert_eq!(xor(&e), 0xff);
    }

    #[test]
    fn short_input_is_zero_padded_inline() {
        let e = encode_entry(&[1, 4], 0, 0, 16, 1);
        assert_eq!(
            &e[16..32],
            &[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&e[8..16], &[0; 8]);
    }

    #[test]
    fn chains_of_zero_one_and_many_blocks() {
        let mut a = arena();
        for (len, blocks) in [
            (16usize, 0usize),
            (17, 1),
            (112, 1),
            (528, 1),
            (529, 2),
            (0x1010, 8),
        ] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut c = build_chain(&mut a, len, 0x42, Some(&msg[16.min(len)..])).unwrap();
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
            free_chain(&mut a, &mut c);
            assert_eq!(a.free_blocks(), 64);
        }
    }

    #[test]
    fn running_out_of_blocks_is_an_error_and_leaks_nothing() {
        let mut a = arena();
        let too_big = 16 + 65 * 512;
        assert!(matches!(
            build_chain(&mut a, too_big, 1, None),
            Err(ChainError::NoBlocks { need: 65, .. })
        ));
        assert_eq!(a.free_blocks(), 64);
    }
}
