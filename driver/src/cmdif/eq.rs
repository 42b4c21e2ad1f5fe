//! The command EQ as the driver sees it: a ring of 64-byte EQEs in arena pages, the
//! owner-bit rule, the consumer index and its doorbell (mlx5-device.md §3.7).
//!
//! The ring memory is written by the device; every EQE is untrusted. The consumer reads
//! at most one ring's worth of entries per pass, and the doorbell value is computed
//! here but written by the caller (it owns the vfio-user connection).

use mlx5_prm::cmd::eq::{
    create_eq_in_len, eq_doorbell_value, CREATE_EQ_IN_EVENT_BITMASK, CREATE_EQ_IN_INTR,
    CREATE_EQ_IN_LOG_EQ_SIZE, CREATE_EQ_IN_LOG_PAGE_SIZE, CREATE_EQ_IN_PAS, CREATE_EQ_IN_UAR_PAGE,
    EQE_CMD_VECTOR, EQE_OWNER_INIT_VAL, EQE_OWNER_OFFSET, EQE_SIZE, EQE_TYPE,
    EQ_DOORBELL_ARM_OFFSET, EQ_DOORBELL_NOARM_OFFSET, EVENT_TYPE_CMD, NUM_CMD_EQE, NUM_SPARE_EQE,
};
pub use mlx5_prm::cmd::uar::UAR_PAGE_SIZE;
use mlx5_prm::ifc;
use mlx5_prm::Opcode;

use super::arena::{ArenaError, DmaArena, PAGE_SIZE};

/// Largest EQ this driver builds (2^12 entries = 64 pages).
pub const MAX_LOG_EQ_SIZE: u32 = 12;
/// The kernel's command EQ: 32 command EQEs + 128 spare, rounded up to a power of two.
pub const CMD_EQ_LOG_SIZE: u32 = (NUM_CMD_EQE + NUM_SPARE_EQE)
    .next_power_of_two()
    .trailing_zeros();

/// Why an EQ could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EqError {
    #[error("EQ of 2^{0} entries is outside 1..=2^{MAX_LOG_EQ_SIZE}")]
    Size(u32),
    #[error("out of arena pages for the EQ buffer ({need} needed)")]
    NoPages { need: usize },
    #[error(transparent)]
    Arena(#[from] ArenaError),
}

/// One EQE the consumer took off the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eqe {
    pub bytes: [u8; EQE_SIZE],
}

impl Eqe {
    /// `type`, byte 1.
    pub fn event_type(&self) -> u8 {
        ifc::get(&self.bytes, EQE_TYPE) as u8
    }

    /// `data.cmd.vector`: the bitmask of completed command slots (type 0x0a only).
    pub fn cmd_vector(&self) -> Option<u32> {
        (self.event_type() == EVENT_TYPE_CMD).then(|| ifc::get(&self.bytes, EQE_CMD_VECTOR) as u32)
    }
}

/// An event queue whose buffer lives in the arena.
#[derive(Debug)]
pub struct EventQueue {
    log_size: u32,
    pages: Vec<u64>,
    uar_page: u32,
    vector: u16,
    eqn: Option<u8>,
    ci: u32,
}

impl EventQueue {
    /// Allocates the buffer (4 KiB pages, `log_page_size` 0) for 2^`log_size` EQEs and
    /// sets every owner byte to 1 (`MLX5_EQE_OWNER_INIT_VAL`), as `init_eq_buf` does.
    pub fn alloc(
        arena: &DmaArena,
        log_size: u32,
        uar_page: u32,
        vector: u16,
    ) -> Result<Self, EqError> {
        if log_size == 0 || log_size > MAX_LOG_EQ_SIZE {
            return Err(EqError::Size(log_size));
        }
        let bytes = (1u64 << log_size) * EQE_SIZE as u64;
        let need = bytes.div_ceil(PAGE_SIZE) as usize;
        let mut pages = Vec::with_capacity(need);
        for _ in 0..need {
            match arena.alloc_page() {
                Some(p) => pages.push(p),
                None => {
                    for p in pages {
                        let _ = arena.free_page(p);
                    }
                    return Err(EqError::NoPages { need });
                }
            }
        }
        let eq = EventQueue {
            log_size,
            pages,
            uar_page,
            vector,
            eqn: None,
            ci: 0,
        };
        for i in 0..eq.nent() {
            arena.write(
                eq.eqe_iova(i) + EQE_OWNER_OFFSET as u64,
                &[EQE_OWNER_INIT_VAL],
            )?;
        }
        Ok(eq)
    }

    /// Returns the buffer pages to the arena (after DESTROY_EQ).
    pub fn free(self, arena: &DmaArena) {
        for p in self.pages {
            if let Err(e) = arena.free_page(p) {
                tracing::error!(error = %e, "EQ page bookkeeping");
            }
        }
    }

    /// Number of entries.
    pub fn nent(&self) -> u32 {
        1 << self.log_size
    }

    pub fn log_size(&self) -> u32 {
        self.log_size
    }

    /// The buffer pages (the CREATE_EQ `pas[]`).
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    pub fn uar_page(&self) -> u32 {
        self.uar_page
    }

    /// The MSI-X vector (`eqc.intr`).
    pub fn vector(&self) -> u16 {
        self.vector
    }

    /// The EQ number the firmware gave, once created.
    pub fn eqn(&self) -> Option<u8> {
        self.eqn
    }

    /// Records the EQ number from the CREATE_EQ output.
    pub fn set_eqn(&mut self, eqn: u8) {
        self.eqn = Some(eqn);
    }

    /// The consumer index.
    pub fn ci(&self) -> u32 {
        self.ci
    }

    fn eqe_iova(&self, index: u32) -> u64 {
        let off = u64::from(index & (self.nent() - 1)) * EQE_SIZE as u64;
        // `pages` covers nent·64 bytes by construction, so the index is in range.
        self.pages[(off / PAGE_SIZE) as usize] + off % PAGE_SIZE
    }

    /// CREATE_EQ input for this EQ subscribed to `event_mask` (bit n = event type n
    /// in `event_bitmask[0]`).
    pub fn create_input(&self, event_mask: u64) -> Vec<u8> {
        let len = create_eq_in_len(self.pages.len()).unwrap_or(0);
        let mut m = super::new_input(Opcode::CreateEq, 0, len);
        ifc::set(&mut m, CREATE_EQ_IN_LOG_EQ_SIZE, u64::from(self.log_size));
        ifc::set(&mut m, CREATE_EQ_IN_UAR_PAGE, u64::from(self.uar_page));
        ifc::set(&mut m, CREATE_EQ_IN_INTR, u64::from(self.vector));
        ifc::set(&mut m, CREATE_EQ_IN_LOG_PAGE_SIZE, 0);
        ifc::set(&mut m, CREATE_EQ_IN_EVENT_BITMASK, event_mask);
        for (i, &p) in self.pages.iter().enumerate() {
            if let Some(f) = CREATE_EQ_IN_PAS.nth(i) {
                ifc::set(&mut m, f, p);
            }
        }
        m
    }

    /// The next software-owned EQE, advancing the consumer index; `None` when the entry
    /// at the consumer index still belongs to the device. An entry is ours when its
    /// owner bit equals the pass parity `(ci >> log_size) & 1`.
    pub fn next(&mut self, arena: &DmaArena) -> Result<Option<Eqe>, ArenaError> {
        let iova = self.eqe_iova(self.ci);
        let owner = arena.load_acquire(iova + EQE_OWNER_OFFSET as u64)?;
        let parity = ((self.ci >> self.log_size) & 1) as u8;
        if owner & 1 != parity {
            return Ok(None);
        }
        let mut bytes = [0u8; EQE_SIZE];
        arena.read(iova, &mut bytes)?;
        self.ci = self.ci.wrapping_add(1) & 0x00ff_ffff;
        Ok(Some(Eqe { bytes }))
    }

    /// Takes every available EQE (at most one ring's worth), calling `doorbell` with
    /// a non-arming CI update every [`NUM_SPARE_EQE`] / 2 entries so the device never
    /// overruns. Returns the EQEs taken.
    pub fn drain(
        &mut self,
        arena: &DmaArena,
        mut doorbell: impl FnMut(u64, [u8; 4]),
    ) -> Result<Vec<Eqe>, ArenaError> {
        let mut out = Vec::new();
        for n in 1..=self.nent() {
            match self.next(arena)? {
                Some(e) => out.push(e),
                None => break,
            }
            if (n as usize).is_multiple_of(NUM_SPARE_EQE / 2) {
                let (off, v) = self.doorbell(false);
                doorbell(off, v);
            }
        }
        Ok(out)
    }

    /// (BAR0 offset, big-endian value) of the CI doorbell: UAR page + 0x40 to update
    /// and arm, + 0x48 to update only.
    pub fn doorbell(&self, arm: bool) -> (u64, [u8; 4]) {
        let reg = if arm {
            EQ_DOORBELL_ARM_OFFSET
        } else {
            EQ_DOORBELL_NOARM_OFFSET
        };
        let off = u64::from(self.uar_page) * UAR_PAGE_SIZE + u64::from(reg);
        let v = eq_doorbell_value(self.eqn.unwrap_or(0), self.ci);
        (off, v.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::super::arena::ArenaConfig;
    use super::*;
    use mlx5_prm::cmd::eq::eqe_owner;

    fn arena() -> DmaArena {
        DmaArena::new(ArenaConfig {
            size: 256 << 10,
            iova: 0x8000_0000,
            mailbox_blocks: 4,
        })
        .unwrap()
    }

    /// What the device does: write EQE `pi` with the owner for its pass.
    fn produce(a: &DmaArena, eq: &EventQueue, pi: u32, vector: u32) {
        let mut e = [0u8; EQE_SIZE];
        e[1] = EVENT_TYPE_CMD;
        e[32..36].copy_from_slice(&vector.to_be_bytes());
        e[EQE_OWNER_OFFSET] = eqe_owner(pi, eq.log_size);
        a.write(eq.eqe_iova(pi), &e).unwrap();
    }

    #[test]
    fn fresh_ring_is_all_device_owned() {
        let a = arena();
        let mut eq = EventQueue::alloc(&a, 3, 3, 0).unwrap();
        assert_eq!(eq.pages().len(), 1);
        assert!(eq.next(&a).unwrap().is_none());
        assert_eq!(eq.ci(), 0);
    }

    #[test]
    fn owner_parity_flips_each_pass_and_ring_spans_pages() {
        let a = arena();
        // 128 entries of 64 bytes = 2 pages.
        let mut eq = EventQueue::alloc(&a, 7, 3, 0).unwrap();
        assert_eq!(eq.pages().len(), 2);
        for pi in 0..300u32 {
            produce(&a, &eq, pi, 1 << (pi % 32));
            let e = eq.next(&a).unwrap().expect("eqe");
            assert_eq!(e.cmd_vector(), Some(1 << (pi % 32)));
            // A stale entry of the previous pass is never taken twice.
            assert!(eq.next(&a).unwrap().is_none(), "pi {pi}");
        }
        assert_eq!(eq.ci(), 300);
    }

    #[test]
    fn drain_is_bounded_by_the_ring_and_updates_ci_on_the_way() {
        let a = arena();
        let mut eq = EventQueue::alloc(&a, CMD_EQ_LOG_SIZE, 5, 0).unwrap();
        eq.set_eqn(9);
        assert_eq!(eq.nent(), 256);
        // A device that marks every entry ours (owner 0 on the first pass): a hostile
        // or confused device cannot make the consumer loop forever.
        for pi in 0..256 {
            produce(&a, &eq, pi, 0);
        }
        let mut bells = Vec::new();
        let got = eq.drain(&a, |off, v| bells.push((off, v))).unwrap();
        assert_eq!(got.len(), 256);
        assert_eq!(bells.len(), 4);
        assert_eq!(bells[0].0, 5 * 4096 + 0x48);
        assert_eq!(u32::from_be_bytes(bells[0].1), (9 << 24) | 64);
        // Second pass: entries still carry owner 0, the parity is now 1.
        assert!(eq.drain(&a, |_, _| {}).unwrap().is_empty());
        let (off, v) = eq.doorbell(true);
        assert_eq!(off, 5 * 4096 + 0x40);
        assert_eq!(u32::from_be_bytes(v), (9 << 24) | 256);
    }

    #[test]
    fn other_event_types_carry_no_cmd_vector() {
        let mut e = Eqe { bytes: [0; 64] };
        e.bytes[1] = 0x0b;
        e.bytes[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(e.cmd_vector(), None);
    }

    #[test]
    fn create_input_carries_the_eqc_and_pas() {
        let a = arena();
        let mut eq = EventQueue::alloc(&a, CMD_EQ_LOG_SIZE, 7, 0).unwrap();
        eq.set_eqn(1);
        let m = eq.create_input(1 << EVENT_TYPE_CMD);
        assert_eq!(m.len(), 0x110 + 8 * 4);
        assert_eq!(&m[0..2], &[0x03, 0x01]);
        assert_eq!(m[0x1c] & 0x1f, 8);
        assert_eq!(&m[0x1d..0x20], &[0, 0, 7]);
        assert_eq!(m[0x27], 0);
        assert_eq!(&m[0x58..0x60], &(1u64 << 0x0a).to_be_bytes());
        for (i, p) in eq.pages().iter().enumerate() {
            assert_eq!(&m[0x110 + 8 * i..0x118 + 8 * i], &p.to_be_bytes());
        }
        eq.free(&a);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let a = arena();
        assert!(matches!(
            EventQueue::alloc(&a, 0, 3, 0),
            Err(EqError::Size(0))
        ));
        assert!(matches!(
            EventQueue::alloc(&a, 13, 3, 0),
            Err(EqError::Size(13))
        ));
        // 2^12 entries need 64 pages; this arena has fewer.
        assert!(matches!(
            EventQueue::alloc(&a, 12, 3, 0),
            Err(EqError::NoPages { need: 64 })
        ));
    }
}
