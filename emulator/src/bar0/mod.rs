//! BAR0: the initialization segment and the MSI-X table and PBA.
//!
//! Layout of the 32 MiB memory BAR of one function:
//!
//! | range                      | contents                                           |
//! |----------------------------|----------------------------------------------------|
//! | 0 .. 0x2010                | init segment ([`iseg`]), 32-bit big-endian words   |
//! | 0x3000 .. 0x100_0000       | UAR pages (4 KiB each, index >= 3)                 |
//! | 0x100_0000 .. 0x100_1000   | MSI-X table ([`msix`]), 16 bytes per vector, LE    |
//! | 0x100_1000 .. 0x100_2000   | MSI-X PBA, one bit per vector in u64 words, LE     |
//!
//! Everything else reads 0 and drops writes. UAR pages are write-only doorbells for now:
//! they read 0 and every written 4-byte word is reported as [`Bar0Effect::UarWrite`].
//!
//! Client accesses may have any offset and length. They are validated once (checked
//! arithmetic, [`MAX_ACCESS_LEN`]) and then split into aligned 4-byte words; every
//! region boundary is word aligned, so each word belongs to exactly one region. A
//! partial-word write touches only the bytes written (read-modify-write under the
//! register's masks).

pub mod iseg;
pub mod msix;

use std::time::Instant;

use iseg::Iseg;
use msix::Msix;

/// Size of BAR0 (a power of two, as a PCI BAR must be).
pub const BAR0_SIZE: u64 = 0x200_0000;
/// sizeof(struct mlx5_init_seg); the iseg occupies 0..ISEG_END.
pub const ISEG_END: u64 = iseg::ISEG_SIZE;
/// UAR page size (MLX5_ADAPTER_PAGE_SIZE, uar_4k layout).
pub use mlx5_prm::cmd::uar::UAR_PAGE_SIZE;
/// First UAR index handed out; lower pages would alias the iseg (uar2pfn).
pub const UAR_FIRST_INDEX: u64 = 3;
pub const UAR_START: u64 = UAR_FIRST_INDEX * UAR_PAGE_SIZE;
pub const UAR_END: u64 = 0x100_0000;
/// MSI-X table (PCI_MSIX_TABLE offset, BIR 0).
pub const MSIX_TABLE_OFFSET: u64 = 0x100_0000;
/// PCI_MSIX_ENTRY_SIZE (declared with the MSI-X capability).
pub use crate::pci::caps::MSIX_ENTRY_SIZE;
/// MSI-X pending bit array (PCI_MSIX_PBA offset, BIR 0).
pub const MSIX_PBA_OFFSET: u64 = 0x100_1000;
/// Space reserved for the PBA.
pub const MSIX_PBA_REGION: u64 = 0x1000;
/// At least 8 vectors keeps old kernels with fixed vector numbers happy.
pub const MSIX_MIN_VECTORS: u16 = 8;
/// As many entries as fit before the PBA (256); this, not PCI's 2048, is the bound.
pub const MSIX_MAX_VECTORS: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / MSIX_ENTRY_SIZE) as u16;
/// Largest single client access.
pub const MAX_ACCESS_LEN: usize = 1 << 20;

/// A client access BAR0 refuses (the vfio-user layer turns it into an errno).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Bar0Error {
    #[error("BAR0 access at {offset:#x} of {len} bytes is outside 0..{BAR0_SIZE:#x}")]
    OutOfRange { offset: u64, len: usize },
    #[error("BAR0 access of {len} bytes exceeds the {max}-byte limit")]
    TooLong { len: usize, max: usize },
}

/// Something a guest write asks the rest of the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar0Effect {
    /// cmd_dbell written: bit i set means command slot i posted (zero writes are not reported).
    CommandDoorbell(u32),
    /// cmdq_addr_l_sz address bits written: the full address with the stored high word.
    CmdqAddress(u64),
    /// nic_interface (cmdq_addr_l_sz\[10:8\]) changed to this value.
    NicInterface(u8),
    /// A 4-byte word of UAR page `page` written; `offset` is word aligned within the page
    /// and `value` is the word read big-endian (as mlx5 doorbells are), unwritten bytes 0.
    UarWrite { page: u32, offset: u32, value: u32 },
    /// The guest changed the mask bit of an MSI-X vector.
    MsixMask { vector: u16, masked: bool },
}

/// BAR0 of one function.
#[derive(Debug)]
pub struct Bar0 {
    iseg: Iseg,
    msix: Msix,
    all_ones: bool,
}

/// Calls `f(word_offset, first_lane, buffer_pos, count)` for every aligned word the
/// (already validated) access `[offset, offset + len)` touches.
fn for_each_word(offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut pos = 0;
    while pos < len {
        let addr = offset + pos as u64;
        let lane = (addr % 4) as usize;
        let n = (4 - lane).min(len - pos);
        f(addr - lane as u64, lane, pos, n);
        pos += n;
    }
}

fn check(offset: u64, len: usize) -> Result<(), Bar0Error> {
    if len > MAX_ACCESS_LEN {
        return Err(Bar0Error::TooLong {
            len,
            max: MAX_ACCESS_LEN,
        });
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= BAR0_SIZE => Ok(()),
        _ => Err(Bar0Error::OutOfRange { offset, len }),
    }
}

impl Bar0 {
    /// Power-on BAR0 with `msix_vectors` clamped to `MSIX_MIN_VECTORS..=MSIX_MAX_VECTORS`
    /// (see [`Bar0::msix_vectors`] for the count actually used).
    pub fn new(msix_vectors: u16) -> Self {
        Bar0 {
            iseg: Iseg::new(),
            msix: Msix::new(msix_vectors),
            all_ones: false,
        }
    }

    pub fn msix_vectors(&self) -> u16 {
        self.msix.vectors()
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), Bar0Error> {
        check(offset, data.len())?;
        if self.all_ones {
            data.fill(0xff);
            return Ok(());
        }
        // One instant per access so internal_timer_h:l read together are coherent.
        let now = Instant::now();
        for_each_word(offset, data.len(), |word, lane, pos, n| {
            let bytes = self.read_word(word, now);
            data[pos..pos + n].copy_from_slice(&bytes[lane..lane + n]);
        });
        Ok(())
    }

    fn read_word(&self, word: u64, now: Instant) -> [u8; 4] {
        if word < ISEG_END {
            self.iseg.read(word, now).to_be_bytes()
        } else if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&word) {
            self.msix.read_table(word - MSIX_TABLE_OFFSET).to_le_bytes()
        } else if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PBA_REGION).contains(&word) {
            self.msix.read_pba(word - MSIX_PBA_OFFSET).to_le_bytes()
        } else {
            // UAR pages are write-only doorbells; the rest is reserved.
            [0; 4]
        }
    }

    /// A client write. A device in all-ones mode (dead link) drops every write.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Vec<Bar0Effect>, Bar0Error> {
        check(offset, data.len())?;
        let mut effects = Vec::new();
        if self.all_ones {
            return Ok(effects);
        }
        for_each_word(offset, data.len(), |word, lane, pos, n| {
            let mut bytes = [0u8; 4];
            let mut mask = [0u8; 4];
            bytes[lane..lane + n].copy_from_slice(&data[pos..pos + n]);
            mask[lane..lane + n].fill(0xff);
            self.write_word(word, bytes, mask, &mut effects);
        });
        Ok(effects)
    }

    fn write_word(&mut self, word: u64, bytes: [u8; 4], mask: [u8; 4], fx: &mut Vec<Bar0Effect>) {
        if word < ISEG_END {
            let (v, m) = (u32::from_be_bytes(bytes), u32::from_be_bytes(mask));
            self.iseg.write(word, v, m, fx);
        } else if (UAR_START..UAR_END).contains(&word) {
            let page = (word / UAR_PAGE_SIZE) as u32;
            let offset = (word % UAR_PAGE_SIZE) as u32;
            let value = u32::from_be_bytes(bytes);
            tracing::trace!(page, offset, value, "uar write");
            fx.push(Bar0Effect::UarWrite {
                page,
                offset,
                value,
            });
        } else if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&word) {
            let (v, m) = (u32::from_le_bytes(bytes), u32::from_le_bytes(mask));
            self.msix.write_table(word - MSIX_TABLE_OFFSET, v, m, fx);
        }
        // PBA is read-only to the client; everything else is reserved.
    }

    /// Power-on state: registers, health, faults, MSI-X. The internal timer keeps running.
    pub fn reset(&mut self) {
        self.iseg.reset();
        self.msix.reset();
        self.all_ones = false;
    }

    pub fn cmdq_address(&self) -> u64 {
        self.iseg.cmdq_address()
    }

    pub fn nic_interface(&self) -> u8 {
        self.iseg.nic_interface()
    }

    /// Device-side nic_interface change (e.g. SW_RESET then DISABLED in a fatal flow).
    pub fn set_nic_interface(&mut self, state: u8) {
        self.iseg.set_nic_interface(state);
    }

    /// health.synd (0x23d) and health.ext_synd (0x23e). `synd` 0 means healthy.
    pub fn set_health_syndrome(&mut self, synd: u8, ext_synd: u16) {
        self.iseg.set_health_syndrome(synd, ext_synd);
    }

    /// health.rfr_severity (0x238): `mlx5_prm::iseg::HEALTH_RFR_MASK`, `HEALTH_CRR_MASK`, severity.
    pub fn set_rfr_severity(&mut self, rfr_severity: u8) {
        self.iseg.set_rfr_severity(rfr_severity);
    }

    /// Health buffer back to its power-on contents (the counter is not touched).
    pub fn clear_health(&mut self) {
        self.iseg.clear_health();
    }

    pub fn freeze_health_counter(&mut self, frozen: bool) {
        self.iseg.freeze_health_counter(frozen);
    }

    /// Dead device: every BAR0 byte reads 0xff and writes are dropped.
    pub fn set_all_ones(&mut self, on: bool) {
        self.all_ones = on;
    }

    pub fn all_ones(&self) -> bool {
        self.all_ones
    }

    /// `initializing` bit 31 (firmware busy) for modelling the pre-init wait.
    pub fn set_initializing(&mut self, busy: bool) {
        self.iseg.set_initializing(busy);
    }

    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// Device-side MSI-X access (`set_pending`).
    pub fn msix_mut(&mut self) -> &mut Msix {
        &mut self.msix
    }
}

#[cfg(test)]
mod tests {
    use super::iseg::*;
    use super::*;
    use mlx5_prm::iseg::{NicInterface, HEALTH_RFR_MASK};
    use std::time::Duration;

    fn rd(b: &Bar0, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        b.read(off, &mut v).unwrap();
        v
    }

    fn rd32be(b: &Bar0, off: u64) -> u32 {
        u32::from_be_bytes(rd(b, off, 4).try_into().unwrap())
    }

    fn rd32le(b: &Bar0, off: u64) -> u32 {
        u32::from_le_bytes(rd(b, off, 4).try_into().unwrap())
    }

    #[test]
    fn fw_rev_and_cmdif_rev_read_big_endian() {
        let b = Bar0::new(8);
        assert_eq!(rd(&b, 0, 4), [0, 39, 0, 22]);
        assert_eq!(rd(&b, 4, 4), [0, 5, 0x03, 0xea]);
        assert_eq!(rd32be(&b, 4) >> 16, 5);
        assert_ne!(rd32be(&b, HEALTH_FW_VER_OFFSET), u32::MAX);
        assert_eq!(rd32be(&b, INITIALIZING_OFFSET), 0);
        assert_eq!(rd32be(&b, CMD_Q_INIT_TO_OFFSET), 0);
    }

    #[test]
    fn cmdq_addr_latches_address_and_nic_interface_not_geometry() {
        let mut b = Bar0::new(8);
        assert_eq!(rd32be(&b, 0x14) & 0xff, 0x56);
        let fx = b.write(0x10, &0x1234_5678u32.to_be_bytes()).unwrap();
        assert!(fx.is_empty());
        let fx = b.write(0x14, &0x9abc_d0ffu32.to_be_bytes()).unwrap();
        assert_eq!(fx, vec![Bar0Effect::CmdqAddress(0x1234_5678_9abc_d000)]);
        assert_eq!(rd32be(&b, 0x14), 0x9abc_d056);
        assert_eq!(b.cmdq_address(), 0x1234_5678_9abc_d000);
        // mlx5_set_nic_state: (cur & 0xfffff000) | DISABLED << 8
        let v = (rd32be(&b, 0x14) & 0xffff_f000) | 1 << 8;
        let fx = b.write(0x14, &v.to_be_bytes()).unwrap();
        assert_eq!(
            fx,
            vec![
                Bar0Effect::CmdqAddress(0x1234_5678_9abc_d000),
                Bar0Effect::NicInterface(1)
            ]
        );
        assert_eq!(b.nic_interface(), u8::from(NicInterface::Disabled));
        assert_eq!(rd32be(&b, 0x14), 0x9abc_d156);
    }

    #[test]
    fn doorbell_reports_mask_and_reads_zero() {
        let mut b = Bar0::new(8);
        let fx = b.write(0x18, &0x8000_0001u32.to_be_bytes()).unwrap();
        assert_eq!(fx, vec![Bar0Effect::CommandDoorbell(0x8000_0001)]);
        assert_eq!(rd32be(&b, 0x18), 0);
        // One byte at 0x1b is bits 7:0 of the big-endian word.
        assert_eq!(
            b.write(0x1b, &[0x04]).unwrap(),
            vec![Bar0Effect::CommandDoorbell(4)]
        );
        assert!(b.write(0x18, &[0; 4]).unwrap().is_empty());
    }

    #[test]
    fn read_only_and_reserved_registers_drop_writes() {
        let mut b = Bar0::new(8);
        let before = rd(&b, 0, 8);
        assert!(b.write(0, &[0xff; 8]).unwrap().is_empty());
        assert_eq!(rd(&b, 0, 8), before);
        assert!(b.write(0x100, &[0xff; 4]).unwrap().is_empty());
        assert_eq!(rd32be(&b, 0x100), 0);
        assert!(b.write(CLR_INTX_OFFSET, &[0xff; 4]).unwrap().is_empty());
        assert!(b.write(0x2010, &[0xff; 0x100]).unwrap().is_empty());
        assert_eq!(rd(&b, 0x2010, 0x100), vec![0; 0x100]);
    }

    #[test]
    fn health_counter_ticks_and_stops_when_frozen() {
        let mut b = Bar0::new(8);
        let a = rd32be(&b, 0x1010);
        std::thread::sleep(Duration::from_millis(5));
        let c = rd32be(&b, 0x1010);
        assert_ne!(a, 0);
        assert_ne!(a, c);
        b.freeze_health_counter(true);
        let f = rd32be(&b, 0x1010);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(rd32be(&b, 0x1010), f);
        b.freeze_health_counter(false);
        std::thread::sleep(Duration::from_millis(5));
        assert_ne!(rd32be(&b, 0x1010), f);
    }

    #[test]
    fn internal_timer_is_monotonic_and_read_only() {
        let mut b = Bar0::new(8);
        let t = |b: &Bar0| u64::from_be_bytes(rd(b, 0x1000, 8).try_into().unwrap());
        let t0 = t(&b);
        b.write(0x1000, &[0; 8]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
        assert!(t(&b) >= t0 + 1_000_000);
    }

    #[test]
    fn all_ones_mode_reads_ff_everywhere_and_drops_writes() {
        let mut b = Bar0::new(8);
        b.set_all_ones(true);
        assert_eq!(rd(&b, 0, 16), vec![0xff; 16]);
        assert_eq!(rd32be(&b, HEALTH_FW_VER_OFFSET), u32::MAX);
        assert_eq!(rd32le(&b, MSIX_TABLE_OFFSET), u32::MAX);
        assert!(b.write(0x18, &[0xff; 4]).unwrap().is_empty());
        b.set_all_ones(false);
        assert_eq!(rd32be(&b, 0x4), 5 << 16 | 1002);
    }

    #[test]
    fn health_syndrome_is_visible_at_0x23d() {
        let mut b = Bar0::new(8);
        assert_eq!(rd(&b, 0x200, 0x40)[..0x30], [0; 0x30]);
        b.set_health_syndrome(0x1, 0xbeef);
        assert_eq!(rd(&b, 0x23c, 4), [0, 0x01, 0xbe, 0xef]);
        assert_eq!(rd(&b, HEALTH_SYND_OFFSET, 1), [0x01]);
        b.set_rfr_severity(HEALTH_RFR_MASK);
        assert_eq!(rd(&b, 0x238, 1), [0x80]);
        b.clear_health();
        assert_eq!(rd(&b, 0x238, 8), [0; 8]);
    }

    #[test]
    fn msix_table_is_little_endian_rw_and_masked_at_power_on() {
        let mut b = Bar0::new(16);
        for v in 0..16u64 {
            assert_eq!(rd32le(&b, MSIX_TABLE_OFFSET + v * 16 + 12), 1);
        }
        let e = MSIX_TABLE_OFFSET + 3 * 16;
        b.write(e, &0xfee0_1000u32.to_le_bytes()).unwrap();
        b.write(e + 4, &0u32.to_le_bytes()).unwrap();
        b.write(e + 8, &0x0000_4023u32.to_le_bytes()).unwrap();
        let fx = b.write(e + 12, &0u32.to_le_bytes()).unwrap();
        assert_eq!(
            fx,
            vec![Bar0Effect::MsixMask {
                vector: 3,
                masked: false
            }]
        );
        assert_eq!(rd(&b, e, 4), [0x00, 0x10, 0xe0, 0xfe]);
        assert_eq!(rd32le(&b, e + 8), 0x4023);
        let ent = b.msix().entry(3).unwrap();
        assert_eq!(
            (ent.address, ent.data, ent.masked),
            (0xfee0_1000, 0x4023, false)
        );
        // 8-byte write covering address lo+hi.
        b.write(e, &0x0000_0001_fee0_2000u64.to_le_bytes()).unwrap();
        assert_eq!(b.msix().entry(3).unwrap().address, 0x1_fee0_2000);
        // Entries past the vector count read 0.
        assert_eq!(rd32le(&b, MSIX_TABLE_OFFSET + 16 * 16 + 12), 0);
    }

    #[test]
    fn pba_is_read_only_and_reflects_set_pending() {
        let mut b = Bar0::new(70);
        assert!(b.write(MSIX_PBA_OFFSET, &[0xff; 16]).unwrap().is_empty());
        assert_eq!(rd(&b, MSIX_PBA_OFFSET, 16), vec![0; 16]);
        assert!(b.msix_mut().set_pending(1, true));
        assert!(b.msix_mut().set_pending(65, true));
        assert_eq!(rd32le(&b, MSIX_PBA_OFFSET), 0b10);
        assert_eq!(rd32le(&b, MSIX_PBA_OFFSET + 8), 0b10);
        assert!(b.msix().pending(65));
        b.msix_mut().set_pending(1, false);
        assert!(!b.msix().pending(1));
        assert_eq!(rd32le(&b, MSIX_PBA_OFFSET), 0);
    }

    #[test]
    fn hostile_offsets_and_lengths_are_errors() {
        let mut b = Bar0::new(8);
        let mut one = [0u8; 4];
        assert_eq!(
            b.read(BAR0_SIZE - 2, &mut one),
            Err(Bar0Error::OutOfRange {
                offset: BAR0_SIZE - 2,
                len: 4
            })
        );
        assert_eq!(
            b.read(u64::MAX - 1, &mut one),
            Err(Bar0Error::OutOfRange {
                offset: u64::MAX - 1,
                len: 4
            })
        );
        assert!(matches!(
            b.write(u64::MAX, &[1]),
            Err(Bar0Error::OutOfRange { .. })
        ));
        assert!(b.write(BAR0_SIZE - 4, &[0; 4]).is_ok());
        assert!(b.read(BAR0_SIZE, &mut []).is_ok());
        let big = vec![0; MAX_ACCESS_LEN + 1];
        assert_eq!(
            b.write(0, &big),
            Err(Bar0Error::TooLong {
                len: MAX_ACCESS_LEN + 1,
                max: MAX_ACCESS_LEN
            })
        );
        assert_eq!(MSIX_MAX_VECTORS, 256);
        assert_eq!(Bar0::new(4096).msix_vectors(), MSIX_MAX_VECTORS);
    }

    #[test]
    fn reset_restores_power_on_state() {
        let mut b = Bar0::new(8);
        let pristine = rd(&b, 0, 0x1000);
        b.write(0x10, &[0xaa; 8]).unwrap();
        b.set_health_syndrome(0xb, 7);
        b.set_nic_interface(NicInterface::SwReset.into());
        b.freeze_health_counter(true);
        b.set_initializing(true);
        b.write(MSIX_TABLE_OFFSET + 12, &[0; 4]).unwrap();
        b.msix_mut().set_pending(0, true);
        b.set_all_ones(true);
        b.reset();
        assert!(!b.all_ones());
        assert_eq!(rd(&b, 0, 0x1000), pristine);
        assert_eq!((b.cmdq_address(), b.nic_interface()), (0, 0));
        assert!(b.msix().masked(0) && !b.msix().pending(0));
        let a = rd32be(&b, 0x1010);
        std::thread::sleep(Duration::from_millis(3));
        assert_ne!(rd32be(&b, 0x1010), a, "health counter ticks again");
    }

    #[test]
    fn partial_and_unaligned_accesses() {
        let mut b = Bar0::new(8);
        // Two bytes straddling fw_rev and cmdif_rev_fw_sub.
        assert_eq!(rd(&b, 3, 2), [22, 0]);
        // Read the geometry byte alone.
        assert_eq!(rd(&b, 0x17, 1), [0x56]);
        // Write the address byte by byte, unaligned, across cmdq_addr_h and _l_sz.
        b.write(0x13, &[0x01, 0x12, 0x34]).unwrap();
        b.write(0x16, &[0xf0]).unwrap(); // bits 15:8: address 15:12 = f, nic 0 (bit 11 reserved)
        assert_eq!(rd32be(&b, 0x10), 0x0000_0001);
        assert_eq!(rd32be(&b, 0x14), 0x1234_f056);
        // A single byte to nic_interface keeps the address and geometry.
        let fx = b.write(0x16, &[0xf2]).unwrap();
        assert_eq!(fx.last(), Some(&Bar0Effect::NicInterface(2)));
        assert_eq!(b.cmdq_address(), 0x1_1234_f000);
        // Unaligned UAR write reports whole big-endian words.
        let fx = b.write(0x3042, &[0xab, 0xcd, 0xef]).unwrap();
        assert_eq!(
            fx,
            vec![
                Bar0Effect::UarWrite {
                    page: 3,
                    offset: 0x40,
                    value: 0x0000_abcd
                },
                Bar0Effect::UarWrite {
                    page: 3,
                    offset: 0x44,
                    value: 0xef00_0000
                },
            ]
        );
        assert_eq!(rd(&b, 0x3040, 8), vec![0; 8]);
        // UAR pages below index 3 are not UARs.
        assert!(b.write(0x2040, &[1; 4]).unwrap().is_empty());
    }
}
