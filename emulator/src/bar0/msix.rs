//! MSI-X table and pending bit array (PCI Local Bus spec, MSI-X chapter).
//!
//! Unlike the init segment these structures are little-endian. The table is 16 bytes
//! per vector: message address low, message address high, message data, vector control
//! (bit 0 = mask). The PBA is one bit per vector in little-endian u64 words; the guest
//! can only read it, the device sets and clears bits with [`Msix::set_pending`].
//! Offsets given to [`Msix::read_table`] and friends are relative to the structure and
//! 4-byte aligned; anything past the populated entries reads 0 and drops writes.

use super::{Bar0Effect, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS, MSIX_MIN_VECTORS};

pub const MSIX_ENTRY_ADDR_LO: usize = 0; // Message Address
pub const MSIX_ENTRY_ADDR_HI: usize = 1; // Message Upper Address
pub const MSIX_ENTRY_DATA: usize = 2; // Message Data
pub const MSIX_ENTRY_VECTOR_CTRL: usize = 3; // Vector Control
pub const MSIX_ENTRY_CTRL_MASKBIT: u32 = 1; // PCI_MSIX_ENTRY_CTRL_MASKBIT
const WORDS_PER_ENTRY: usize = (MSIX_ENTRY_SIZE / 4) as usize;
/// Writable bits per entry word: the address is DWORD aligned, only the mask bit of
/// vector control is defined.
const ENTRY_WRITABLE: [u32; WORDS_PER_ENTRY] = [0xffff_fffc, u32::MAX, u32::MAX, 1];
/// Power-on entry: everything 0 but the mask bit.
const ENTRY_RESET: [u32; WORDS_PER_ENTRY] = [0, 0, 0, MSIX_ENTRY_CTRL_MASKBIT];

/// One decoded table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub masked: bool,
}

#[derive(Debug)]
pub struct Msix {
    table: Vec<[u32; WORDS_PER_ENTRY]>,
    pba: Vec<u64>,
}

impl Msix {
    /// `vectors` is clamped to `MSIX_MIN_VECTORS..=MSIX_MAX_VECTORS`.
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors.clamp(MSIX_MIN_VECTORS, MSIX_MAX_VECTORS));
        Msix {
            table: vec![ENTRY_RESET; n],
            pba: vec![0; n.div_ceil(64)],
        }
    }

    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Power-on state: every vector masked, nothing pending.
    pub fn reset(&mut self) {
        self.table.fill(ENTRY_RESET);
        self.pba.fill(0);
    }

    /// Size in bytes of the populated PBA (whole u64 words).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    fn slot(offset: u64) -> (usize, usize) {
        let word = (offset / 4) as usize;
        (word / WORDS_PER_ENTRY, word % WORDS_PER_ENTRY)
    }

    pub fn read_table(&self, offset: u64) -> u32 {
        let (v, w) = Self::slot(offset);
        self.table.get(v).map_or(0, |e| e[w])
    }

    /// A guest write to the table word at `offset`; `bytes` masks the bytes written.
    pub fn write_table(&mut self, offset: u64, value: u32, bytes: u32, fx: &mut Vec<Bar0Effect>) {
        let (v, w) = Self::slot(offset);
        let Some(e) = self.table.get_mut(v) else {
            return;
        };
        let set = ENTRY_WRITABLE[w] & bytes;
        let old = e[w];
        e[w] = (old & !set) | (value & set);
        tracing::trace!(vector = v, word = w, value = e[w], "msix table write");
        if w == MSIX_ENTRY_VECTOR_CTRL && (old ^ e[w]) & MSIX_ENTRY_CTRL_MASKBIT != 0 {
            let masked = e[w] & MSIX_ENTRY_CTRL_MASKBIT != 0;
            fx.push(Bar0Effect::MsixMask {
                vector: v as u16,
                masked,
            });
        }
    }

    pub fn read_pba(&self, offset: u64) -> u32 {
        let word = self.pba.get((offset / 8) as usize).copied().unwrap_or(0);
        if offset & 4 == 0 {
            word as u32
        } else {
            (word >> 32) as u32
        }
    }

    /// Device-side: mark `vector` pending or not. Returns false if there is no such vector.
    pub fn set_pending(&mut self, vector: u16, pending: bool) -> bool {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return false;
        }
        let bit = 1u64 << (v % 64);
        if pending {
            self.pba[v / 64] |= bit;
        } else {
            self.pba[v / 64] &= !bit;
        }
        true
    }

    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        v < self.table.len() && self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.table.get(usize::from(vector)).map(|e| MsixEntry {
            address: u64::from(e[MSIX_ENTRY_ADDR_HI]) << 32 | u64::from(e[MSIX_ENTRY_ADDR_LO]),
            data: e[MSIX_ENTRY_DATA],
            masked: e[MSIX_ENTRY_VECTOR_CTRL] & MSIX_ENTRY_CTRL_MASKBIT != 0,
        })
    }

    pub fn masked(&self, vector: u16) -> bool {
        match self.entry(vector) {
            Some(e) => e.masked,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_count_is_clamped() {
        assert_eq!(Msix::new(0).vectors(), MSIX_MIN_VECTORS);
        assert_eq!(Msix::new(u16::MAX).vectors(), MSIX_MAX_VECTORS);
        assert_eq!(Msix::new(65).pba_size(), 16);
    }

    #[test]
    fn entry_decodes_and_mask_change_is_reported() {
        let mut m = Msix::new(8);
        let mut fx = Vec::new();
        m.write_table(16, 0xfee0_0003, u32::MAX, &mut fx);
        m.write_table(20, 0x1, u32::MAX, &mut fx);
        m.write_table(24, 0x4041, u32::MAX, &mut fx);
        assert!(fx.is_empty());
        m.write_table(28, 0xffff_fff1, u32::MAX, &mut fx);
        assert_eq!(m.read_table(28), 1, "reserved control bits stay 0");
        assert!(fx.is_empty(), "mask unchanged");
        m.write_table(28, 0, u32::MAX, &mut fx);
        assert_eq!(
            fx,
            vec![Bar0Effect::MsixMask {
                vector: 1,
                masked: false
            }]
        );
        let e = m.entry(1).unwrap();
        assert_eq!(
            e,
            MsixEntry {
                address: 0x1_fee0_0000,
                data: 0x4041,
                masked: false
            }
        );
        assert!(m.masked(0) && m.masked(200));
        assert!(!m.set_pending(8, true));
        assert!(!m.pending(8));
    }
}
