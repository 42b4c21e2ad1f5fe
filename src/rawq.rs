//! A command queue driven by hand, as a guest driver (or a hostile one) drives it: a
//! raw vfio-user client, the queue page and mailboxes in a DMA-mapped memfd, entries
//! written byte by byte through prm's layouts, the doorbell rung with REGION_WRITE,
//! and every slot's ownership watched.

use std::time::{Duration, Instant};

use mlx5_prm::cmdq::{
    block_count, entry_signature, CmdLayout, CmdProtBlock, DeliveryStatus, CMD_ENTRY_SIZE,
    CMD_OUT_OFFSET, CMD_OWNER_HW, CMD_STATUS_OWN_OFFSET, INLINE_SIZE, MAILBOX_BLOCK_ALIGN,
    MAILBOX_DATA_SIZE, MLX5_PCI_CMD_XPORT,
};
use mlx5_prm::ifc::{get, hdr, set};
use mlx5_prm::iseg::{CMDQ_ADDR_H_OFFSET, CMDQ_ADDR_L_SZ_OFFSET, CMD_DBELL_OFFSET};
use mlx5_prm::Opcode;
use vfu::uapi::VFIO_PCI_BAR0_REGION_INDEX;
use vfu::{Client, VfuError};
use zerocopy::{FromZeros, IntoBytes};

use crate::mem::GuestMem;

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
/// The token of well-formed commands.
pub const TOKEN: u8 = 0x5a;
/// Memfd offset of the mailbox area [`RawQueue::chain`] and [`RawQueue::exec`] use
/// (the queue page is at offset 0).
pub const MAILBOXES: u64 = 0x1000;
/// Memory [`RawQueue::exec`] needs: 32 slots' input and output chains.
pub const EXEC_MEM: u64 = MAILBOXES + 0x7_8000;
/// How long a rung slot may take by default; the firmware answers in microseconds.
pub const SLOT_TIMEOUT: Duration = Duration::from_secs(5);

/// A command entry as a test writes it; [`Entry::new`] is a well-formed one.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// `type`: [`MLX5_PCI_CMD_XPORT`] unless a test breaks it.
    pub ty: u8,
    /// The message; its first 16 bytes go inline.
    pub input: &'a [u8],
    pub inlen: u32,
    pub in_ptr: u64,
    pub outlen: u32,
    pub out_ptr: u64,
    pub token: u8,
    /// Whether `sig` is computed (else 0).
    pub signed: bool,
}

impl<'a> Entry<'a> {
    /// A signed, hardware-owned entry for `input` (lengths from the slices, no mailboxes).
    pub fn new(input: &'a [u8], outlen: usize) -> Entry<'a> {
        Entry {
            ty: MLX5_PCI_CMD_XPORT,
            input,
            inlen: input.len() as u32,
            in_ptr: 0,
            outlen: outlen as u32,
            out_ptr: 0,
            token: TOKEN,
            signed: true,
        }
    }

    /// The 64 bytes, `status_own` = hardware.
    pub fn encode(&self) -> [u8; CMD_ENTRY_SIZE] {
        let mut e = CmdLayout::new_zeroed();
        e.type_ = self.ty;
        e.inlen.set(self.inlen);
        e.in_ptr.set(self.in_ptr);
        let k = self.input.len().min(INLINE_SIZE);
        e.in_[..k].copy_from_slice(&self.input[..k]);
        e.out_ptr.set(self.out_ptr);
        e.outlen.set(self.outlen);
        e.token = self.token;
        e.status_own = CMD_OWNER_HW;
        let mut b = [0u8; CMD_ENTRY_SIZE];
        b.copy_from_slice(e.as_bytes());
        if self.signed {
            e.sig = entry_signature(&b);
            b.copy_from_slice(e.as_bytes());
        }
        b
    }
}

/// One mailbox block as a test writes it (signatures left 0).
pub fn encode_block(data: &[u8], num: u32, token: u8, next_iova: u64) -> Vec<u8> {
    let mut b = CmdProtBlock::new_zeroed();
    b.data[..data.len()].copy_from_slice(data);
    b.next.set(next_iova);
    b.block_num.set(num);
    b.token = token;
    b.as_bytes().to_vec()
}

/// A message of `len` bytes with `op` and `op_mod` in its header.
pub fn input(op: Opcode, op_mod: u16, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    set(&mut m, hdr::OPCODE, u64::from(u16::from(op)));
    set(&mut m, hdr::OP_MOD, u64::from(op_mod));
    m
}

/// (status, syndrome) of an output.
pub fn status(out: &[u8]) -> (u8, u32) {
    (get(out, hdr::STATUS) as u8, get(out, hdr::SYNDROME) as u32)
}

/// Memfd offset of `slot`'s entry.
pub fn entry_off(slot: u8) -> u64 {
    u64::from(slot) * CMD_ENTRY_SIZE as u64
}

/// `status_own` of `slot` in a queue page at the start of `mem`.
pub fn status_own(mem: &GuestMem, slot: u8) -> u8 {
    mem.read(entry_off(slot) + CMD_STATUS_OWN_OFFSET as u64, 1)[0]
}

/// The command queue of one function, driven by hand.
pub struct RawQueue {
    pub client: Client,
    /// The queue page (offset 0) and everything mailboxes and pages point at.
    pub mem: GuestMem,
}

impl RawQueue {
    /// Maps `size` bytes of guest memory at `iova` into `client`'s function and points
    /// its command queue at the memory's first page.
    pub fn new(mut client: Client, iova: u64, size: u64) -> RawQueue {
        let mem = GuestMem::mapped(&mut client, "rawq", iova, size);
        let mut q = RawQueue { client, mem };
        q.program(iova).expect("program the queue address");
        q
    }

    /// Writes cmdq_addr_h then cmdq_addr_l_sz (big-endian words, high first).
    pub fn program(&mut self, addr: u64) -> Result<(), VfuError> {
        self.client.region_write(
            BAR0,
            CMDQ_ADDR_H_OFFSET,
            &((addr >> 32) as u32).to_be_bytes(),
        )?;
        self.client
            .region_write(BAR0, CMDQ_ADDR_L_SZ_OFFSET, &(addr as u32).to_be_bytes())
    }

    /// A BAR0 register (big-endian).
    pub fn read_reg(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .region_read(BAR0, off, &mut b)
            .expect("BAR0 read");
        u32::from_be_bytes(b)
    }

    pub fn write(&self, off: u64, data: &[u8]) {
        self.mem.write(off, data);
    }

    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        self.mem.read(off, len)
    }

    /// Writes a mailbox block at memfd offset `off`.
    pub fn block(&self, off: u64, data: &[u8], num: u32, token: u8, next_iova: u64) {
        self.write(off, &encode_block(data, num, token, next_iova));
    }

    /// Builds a correct chain for a `len`-byte message (`data` = its bytes 16..) at
    /// [`MAILBOXES`] + `area`, one block per KiB; returns the first block's IOVA (0 if
    /// none is needed).
    pub fn chain(&self, area: u64, data: &[u8], len: usize) -> u64 {
        let n = block_count(len);
        let base = MAILBOXES + area;
        for i in 0..n {
            let lo = (i * MAILBOX_DATA_SIZE).min(data.len());
            let hi = ((i + 1) * MAILBOX_DATA_SIZE).min(data.len());
            let next = if i + 1 < n {
                self.mem
                    .iova_of(base + (i as u64 + 1) * MAILBOX_BLOCK_ALIGN)
            } else {
                0
            };
            self.block(
                base + i as u64 * MAILBOX_BLOCK_ALIGN,
                &data[lo..hi],
                i as u32,
                TOKEN,
                next,
            );
        }
        if n == 0 {
            0
        } else {
            self.mem.iova_of(base)
        }
    }

    /// Writes `entry` into `slot`, hardware-owned.
    pub fn entry(&self, slot: u8, entry: &Entry<'_>) {
        self.write(entry_off(slot), &entry.encode());
    }

    /// Posts an inline command (input and output of at most 16 bytes) in `slot`.
    pub fn post(&self, slot: u8, input: &[u8], outlen: usize) {
        assert!(input.len() <= INLINE_SIZE && outlen <= INLINE_SIZE);
        self.entry(slot, &Entry::new(input, outlen));
    }

    /// Rings the command doorbell for the slots in `mask`.
    pub fn ring(&mut self, mask: u32) {
        self.client
            .region_write(BAR0, CMD_DBELL_OFFSET, &mask.to_be_bytes())
            .expect("doorbell write");
    }

    pub fn status_own(&self, slot: u8) -> u8 {
        status_own(&self.mem, slot)
    }

    pub fn owned_by_hw(&self, slot: u8) -> bool {
        self.status_own(slot) & CMD_OWNER_HW != 0
    }

    /// Waits up to `limit` for `slot` to go back to software; its `status_own`.
    pub fn try_wait(&self, slot: u8, limit: Duration) -> Option<u8> {
        let start = Instant::now();
        loop {
            let s = self.status_own(slot);
            if s & CMD_OWNER_HW == 0 {
                return Some(s);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits for `slot` to go back to software; returns its delivery status.
    pub fn wait(&self, slot: u8) -> DeliveryStatus {
        let s = self
            .try_wait(slot, SLOT_TIMEOUT)
            .unwrap_or_else(|| panic!("slot {slot} never completed"));
        DeliveryStatus::from_status_own(s).expect("known delivery status")
    }

    /// Waits for `slot`: (delivery status, the output's command status byte).
    pub fn wait_status(&self, slot: u8) -> (DeliveryStatus, u8) {
        let d = self.wait(slot);
        (d, self.read(entry_off(slot) + CMD_OUT_OFFSET as u64, 1)[0])
    }

    /// Runs one well-formed command in `slot` (its chains in the slot's own part of
    /// the mailbox area) and returns its output (`outlen` bytes).
    pub fn exec(&mut self, slot: u8, input: &[u8], outlen: usize) -> Vec<u8> {
        assert!(
            self.mem.size() >= EXEC_MEM,
            "exec needs {EXEC_MEM:#x} bytes"
        );
        let area = u64::from(slot) * 0x10000 % 0x7_0000;
        let in_ptr = self.chain(area, input.get(INLINE_SIZE..).unwrap_or(&[]), input.len());
        let out_ptr = self.chain(area + 0x8000, &[], outlen);
        self.entry(
            slot,
            &Entry {
                in_ptr,
                out_ptr,
                ..Entry::new(input, outlen)
            },
        );
        self.ring(1 << slot);
        assert_eq!(
            self.wait(slot),
            DeliveryStatus::Ok,
            "delivery of {:#x}",
            get(input, hdr::OPCODE)
        );
        let mut out = self.read(
            entry_off(slot) + CMD_OUT_OFFSET as u64,
            INLINE_SIZE.min(outlen),
        );
        let mut left = outlen.saturating_sub(INLINE_SIZE);
        let mut b = 0u64;
        while left > 0 {
            let n = left.min(MAILBOX_DATA_SIZE);
            out.extend(self.read(self.mem.offset_of(out_ptr) + b * MAILBOX_BLOCK_ALIGN, n));
            left -= n;
            b += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx5_prm::cmdq::{CMD_SIG_OFFSET, CMD_TOKEN_OFFSET};

    #[test]
    fn a_signed_entry_xors_to_ff_and_an_unsigned_one_leaves_sig_zero() {
        let m = input(Opcode::QueryIssi, 0, 16);
        let e = Entry::new(&m, 0x70).encode();
        assert_eq!(e.iter().fold(0u8, |a, b| a ^ b), 0xff);
        assert_eq!(e[CMD_TOKEN_OFFSET], TOKEN);
        assert_eq!(e[CMD_STATUS_OWN_OFFSET], CMD_OWNER_HW);
        let u = Entry {
            signed: false,
            ..Entry::new(&m, 0x70)
        }
        .encode();
        assert_eq!(u[CMD_SIG_OFFSET], 0);
    }
}
