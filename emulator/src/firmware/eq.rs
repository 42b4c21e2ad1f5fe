//! CREATE_EQ / DESTROY_EQ, the EQ rings in guest memory, their arm and consumer-index
//! doorbells in the UAR, and posting EQEs (mlx5-device.md §3.7).
//!
//! An EQ is a ring of 2^log_eq_size 64-byte EQEs laid over the pages of its PAS list
//! (page size 4 KiB << log_page_size). The device writes EQE `pi` with owner
//! `(pi >> log_eq_size) & 1`, then, if the EQ is armed, raises MSI-X `intr` and disarms
//! it. Writing `(ci | eqn << 24)` to UAR + 0x40 updates the consumer index and arms;
//! UAR + 0x48 only updates it. Arming while EQEs the driver has not consumed are present
//! fires at once (so an EQE posted between the driver's last poll and its arm is never
//! left without an interrupt).

use std::collections::BTreeSet;

use mlx5_prm::cmd::eq::*;
use mlx5_prm::ifc::set;
use mlx5_prm::CmdStatus;

use super::caps::{LOG_MAX_EQ_SZ, MAX_NUM_EQS};
use super::MSIX_VECTORS;
use super::{first_free, syndrome, Cmd, CmdFail, CmdResult, Env, Firmware, UarAction, UarRefusal};

/// Largest eqc `log_page_size` accepted (EQ pages of up to 256 MiB).
pub const MAX_EQ_LOG_PAGE_SIZE: u64 = 16;
/// Lowest EQ number handed out (0 is never used, so a driver that ignores the returned
/// number is caught).
pub const FIRST_EQN: u32 = 1;

/// Why an EQ is refused: by CREATE_EQ, and by LOAD_VHCA_STATE for an EQ in an image
/// (the same checks, so a restored EQ is one the live command would have created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EqError {
    #[error("log_eq_size {got} is above log_max_eq_sz {max}")]
    LogSize { got: u64, max: u64 },
    #[error("log_page_size {got} is above {max}")]
    LogPageSize { got: u64, max: u64 },
    #[error("intr {got} is not one of the {vectors} MSI-X vectors")]
    Intr { got: u64, vectors: u16 },
    #[error("page_offset {got}: expected 0")]
    PageOffset { got: u64 },
    #[error("UAR {uar} is not allocated")]
    NoUar { uar: u32 },
    #[error("EQ page {index} at {pa:#x}: expected non-zero and 4 KiB aligned")]
    BadPage { index: usize, pa: u64 },
    #[error("a command EQ exists already")]
    SecondCmdEq,
}

impl EqError {
    /// The status and syndrome CREATE_EQ completes with.
    pub fn fail(&self) -> CmdFail {
        match self {
            EqError::NoUar { .. } => CmdFail::no_such_object(),
            EqError::BadPage { .. } => CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_PAGE),
            _ => CmdFail::bad_param(),
        }
    }
}

/// The eqc values CREATE_EQ checks; returns the EQ page size in bytes.
pub fn check_eqc(
    log_size: u64,
    log_page: u64,
    intr: u64,
    page_offset: u64,
) -> Result<u64, EqError> {
    if log_size > LOG_MAX_EQ_SZ {
        return Err(EqError::LogSize {
            got: log_size,
            max: LOG_MAX_EQ_SZ,
        });
    }
    if log_page > MAX_EQ_LOG_PAGE_SIZE {
        return Err(EqError::LogPageSize {
            got: log_page,
            max: MAX_EQ_LOG_PAGE_SIZE,
        });
    }
    if intr >= u64::from(MSIX_VECTORS) {
        return Err(EqError::Intr {
            got: intr,
            vectors: MSIX_VECTORS,
        });
    }
    if page_offset != 0 {
        return Err(EqError::PageOffset { got: page_offset });
    }
    Ok(EQ_BASE_PAGE_SIZE << log_page)
}

/// The EQ's doorbell UAR must be allocated.
pub fn check_eq_uar(uars: &BTreeSet<u32>, uar: u32) -> Result<(), EqError> {
    if uars.contains(&uar) {
        Ok(())
    } else {
        Err(EqError::NoUar { uar })
    }
}

/// Pages of `page_size` bytes a ring of 2^`log_size` EQEs takes (the PAS entries
/// CREATE_EQ reads). `log_size` is at most `LOG_MAX_EQ_SZ` once checked.
pub fn eq_page_count(log_size: u64, page_size: u64) -> u64 {
    ((EQE_SIZE as u64) << log_size.min(LOG_MAX_EQ_SZ)).div_ceil(page_size.max(1))
}

/// PAS entry `index`: non-zero and 4 KiB aligned (CREATE_EQ also probes that it is
/// DMA-mapped, which only the live command can).
pub fn check_eq_page(index: usize, pa: u64) -> Result<(), EqError> {
    if pa == 0 || !pa.is_multiple_of(EQ_BASE_PAGE_SIZE) {
        return Err(EqError::BadPage { index, pa });
    }
    Ok(())
}

/// At most one EQ takes command-completion events.
pub fn check_cmd_eq(wants_cmd: bool, existing: Option<u8>) -> Result<(), EqError> {
    if wants_cmd && existing.is_some() {
        return Err(EqError::SecondCmdEq);
    }
    Ok(())
}

/// One EQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EqState {
    pub eqn: u8,
    /// UAR index of its doorbell page.
    pub uar: u32,
    /// MSI-X vector.
    pub intr: u16,
    pub log_size: u32,
    /// EQ page size in bytes.
    pub page_size: u64,
    /// DMA address of each EQ page.
    pub pas: Vec<u64>,
    pub event_bitmask: [u64; CREATE_EQ_IN_EVENT_BITMASK_WORDS],
    /// Next EQE index to fill (reserved).
    pub pi: u32,
    /// EQEs fully written to guest memory.
    pub written: u32,
    /// Consumer index from the last doorbell (24 bits).
    pub ci: u32,
    pub armed: bool,
}

impl EqState {
    fn entries(&self) -> u32 {
        1u32 << self.log_size
    }

    /// Guest address of EQE `index` (mod the ring size).
    pub fn eqe_address(&self, index: u32) -> Option<u64> {
        let slot = u64::from(index & (self.entries() - 1));
        let off = slot.checked_mul(EQE_SIZE as u64)?;
        let page = usize::try_from(off / self.page_size).ok()?;
        self.pas.get(page)?.checked_add(off % self.page_size)
    }

    /// Whether EQEs were written that the last consumer index has not covered.
    fn unconsumed(&self) -> bool {
        self.written & EQ_DOORBELL_CI_MASK != self.ci
    }

    /// Whether the EQ's event bitmask takes events of `event_type`.
    pub fn wants(&self, event_type: u8) -> bool {
        let word = usize::from(event_type / 64);
        self.event_bitmask
            .get(word)
            .is_some_and(|w| w & (1u64 << (event_type % 64)) != 0)
    }
}

/// Where and how to write the next EQE: reserved by [`Firmware::reserve_cmd_eqe`],
/// written by the caller outside the lock, then committed with
/// [`Firmware::commit_eqe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EqeSlot {
    pub eqn: u8,
    pub addr: u64,
    pub owner: u8,
}

impl EqeSlot {
    /// The 64-byte command-completion EQE for completed slots `vector`.
    pub fn cmd_eqe(&self, vector: u32) -> [u8; EQE_SIZE] {
        let mut e = Self::cmd_eqe_body(vector);
        set(&mut e, EQE_OWNER, u64::from(self.owner));
        e
    }

    /// The command-completion EQE for `vector` without its owner byte.
    pub fn cmd_eqe_body(vector: u32) -> [u8; EQE_SIZE] {
        let mut e = [0u8; EQE_SIZE];
        set(&mut e, EQE_TYPE, u64::from(EVENT_TYPE_CMD));
        set(&mut e, EQE_CMD_VECTOR, u64::from(vector));
        e
    }

    /// The OBJECT_CHANGE EQE for general object `obj_id` of `obj_type`, without its
    /// owner byte.
    pub fn obj_change_eqe_body(obj_type: u16, obj_id: u32) -> [u8; EQE_SIZE] {
        use mlx5_prm::cmd::page_track::{
            EQE_OBJ_CHANGE_OBJ_ID, EQE_OBJ_CHANGE_OBJ_TYPE, EVENT_TYPE_OBJECT_CHANGE,
        };
        let mut e = [0u8; EQE_SIZE];
        set(&mut e, EQE_TYPE, u64::from(EVENT_TYPE_OBJECT_CHANGE));
        set(&mut e, EQE_OBJ_CHANGE_OBJ_TYPE, u64::from(obj_type));
        set(&mut e, EQE_OBJ_CHANGE_OBJ_ID, u64::from(obj_id));
        e
    }
}

impl Firmware {
    pub fn eq(&self, eqn: u8) -> Option<&EqState> {
        self.eqs.get(&eqn)
    }

    pub(super) fn create_eq(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(CREATE_EQ_IN_LEN, CREATE_EQ_OUT_LEN)?;
        let log_size = cmd.get(CREATE_EQ_IN_LOG_EQ_SIZE);
        let uar = cmd.get(CREATE_EQ_IN_UAR_PAGE) as u32;
        let intr = cmd.get(CREATE_EQ_IN_INTR);
        let log_page = cmd.get(CREATE_EQ_IN_LOG_PAGE_SIZE);
        let refuse = |e: EqError| {
            tracing::info!(error = %e, "CREATE_EQ refused");
            e.fail()
        };
        let page_size = check_eqc(log_size, log_page, intr, cmd.get(CREATE_EQ_IN_PAGE_OFFSET))
            .map_err(refuse)?;
        check_eq_uar(&self.uars, uar).map_err(refuse)?;
        let mut event_bitmask = [0u64; CREATE_EQ_IN_EVENT_BITMASK_WORDS];
        for (i, w) in event_bitmask.iter_mut().enumerate() {
            *w = CREATE_EQ_IN_EVENT_BITMASK.nth(i).map_or(0, |f| cmd.get(f));
        }
        let npages = usize::try_from(eq_page_count(log_size, page_size))
            .map_err(|_| CmdFail::bad_param())?;
        cmd.need_in(create_eq_in_len(npages).ok_or_else(CmdFail::bad_param)?)?;
        let mut pas = Vec::with_capacity(npages);
        for i in 0..npages {
            let pa = CREATE_EQ_IN_PAS.nth(i).map_or(0, |f| cmd.get(f));
            check_eq_page(i, pa).map_err(refuse)?;
            let mut probe = [0u8; 1];
            if env.dma_read(pa, &mut probe).is_err() {
                tracing::info!(
                    pa = format_args!("{pa:#x}"),
                    "CREATE_EQ: page not DMA-mapped"
                );
                return Err(EqError::BadPage { index: i, pa }.fail());
            }
            pas.push(pa);
        }
        let eq = EqState {
            eqn: 0,
            uar,
            intr: intr as u16,
            log_size: log_size as u32,
            page_size,
            pas,
            event_bitmask,
            pi: 0,
            written: 0,
            ci: 0,
            armed: false,
        };
        let is_cmd = eq.wants(EVENT_TYPE_CMD);
        check_cmd_eq(is_cmd, self.cmd_eq).map_err(refuse)?;
        let keys: Vec<u32> = self.eqs.keys().map(|&k| u32::from(k)).collect();
        let last = FIRST_EQN + MAX_NUM_EQS as u32 - 1;
        let eqn = first_free(keys.iter(), FIRST_EQN, last).ok_or_else(CmdFail::no_resources)? as u8;
        self.eqs.insert(eqn, EqState { eqn, ..eq });
        if is_cmd {
            self.cmd_eq = Some(eqn);
        }
        set(&mut out, CREATE_EQ_OUT_EQ_NUMBER, u64::from(eqn));
        Ok(out)
    }

    pub(super) fn destroy_eq(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(DESTROY_EQ_IN_LEN, DESTROY_EQ_OUT_LEN)?;
        let eqn = cmd.get(DESTROY_EQ_IN_EQ_NUMBER) as u8;
        if !self.eqs.contains_key(&eqn) {
            return Err(CmdFail::no_such_object());
        }
        // A CQ's events name its EQ: the CQ goes first (and an image never holds a CQ
        // without its EQ).
        if let Some(c) = self.cqs.values().find(|c| c.eqn == eqn) {
            tracing::info!(
                eqn,
                cqn = c.cqn,
                "DESTROY_EQ refused: CQ still reports to it"
            );
            return Err(CmdFail::new(CmdStatus::ResBusy, syndrome::BUSY));
        }
        self.eqs.remove(&eqn);
        if self.cmd_eq == Some(eqn) {
            self.cmd_eq = None;
        }
        Ok(out)
    }

    /// A 4-byte write to UAR page `uar` at `offset` (other than a send doorbell): the EQ
    /// doorbells, the CQ arm doorbell. Returns what to do once the firmware lock is
    /// dropped; a write the device cannot take is recorded ([`Firmware::uar_log`]).
    pub fn uar_write(&mut self, uar: u32, offset: u32, value: u32) -> Option<UarAction> {
        use mlx5_prm::cmd::cq::{CQ_DOORBELL_CQN_OFFSET, CQ_DOORBELL_OFFSET};
        let r = if !self.uars.contains(&uar) {
            Err(UarRefusal::NoUar { page: uar })
        } else {
            match offset {
                EQ_DOORBELL_ARM_OFFSET | EQ_DOORBELL_NOARM_OFFSET => self
                    .eq_doorbell(uar, offset == EQ_DOORBELL_ARM_OFFSET, value)
                    .map(|v| v.map(UarAction::Raise)),
                CQ_DOORBELL_OFFSET => {
                    self.cq_arm_words.insert(uar, value);
                    Ok(None)
                }
                CQ_DOORBELL_CQN_OFFSET => self.cq_doorbell(uar, value),
                _ => Err(UarRefusal::NoRegister { offset }),
            }
        };
        r.unwrap_or_else(|why| {
            self.refuse_uar_write(uar, offset, value, why);
            None
        })
    }

    /// The EQ doorbell: consumer index update, and arm if `arm`. Returns the MSI-X
    /// vector to raise if the write armed an EQ with unconsumed EQEs.
    fn eq_doorbell(&mut self, uar: u32, arm: bool, value: u32) -> Result<Option<u16>, UarRefusal> {
        let (eqn, ci) = split_eq_doorbell(value);
        let eq = self
            .eqs
            .get_mut(&eqn)
            .filter(|eq| eq.uar == uar)
            .ok_or(UarRefusal::NoEq { eqn, page: uar })?;
        eq.ci = ci;
        if arm {
            eq.armed = true;
        }
        if eq.armed && eq.unconsumed() {
            eq.armed = false;
            return Ok(Some(eq.intr));
        }
        Ok(None)
    }

    /// Reserves the next EQE of the command EQ (see [`Firmware::reserve_eqe`]).
    pub fn reserve_cmd_eqe(&mut self) -> Option<EqeSlot> {
        let eqn = self.cmd_eq?;
        self.reserve_eqe(eqn)
    }

    /// Reserves the next EQE of EQ `eqn`. `None` if there is no such EQ, or it would
    /// overrun (the EQE is then dropped with a warning, as the driver must keep its
    /// consumer index within the ring).
    pub fn reserve_eqe(&mut self, eqn: u8) -> Option<EqeSlot> {
        let Some(eq) = self.eqs.get_mut(&eqn) else {
            tracing::debug!(eqn, "EQE for no EQ dropped");
            return None;
        };
        let outstanding = eq.pi.wrapping_sub(eq.ci) & EQ_DOORBELL_CI_MASK;
        if outstanding >= eq.entries() {
            tracing::warn!(eqn, pi = eq.pi, ci = eq.ci, "EQ overrun; EQE dropped");
            return None;
        }
        let addr = eq.eqe_address(eq.pi)?;
        let owner = eqe_owner(eq.pi, eq.log_size);
        eq.pi = eq.pi.wrapping_add(1);
        Some(EqeSlot { eqn, addr, owner })
    }

    /// The EQE reserved in `slot` is in guest memory: returns the vector to raise if the
    /// EQ was armed (it is then disarmed).
    pub fn commit_eqe(&mut self, slot: &EqeSlot) -> Option<u16> {
        let eq = self.eqs.get_mut(&slot.eqn)?;
        eq.written = eq.written.wrapping_add(1);
        if eq.armed {
            eq.armed = false;
            return Some(eq.intr);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::syndrome;
    use super::super::test_support::*;
    use super::*;
    use mlx5_prm::ifc::get;
    use mlx5_prm::{CmdStatus, Opcode};

    fn create(
        b: &mut Bench,
        log_size: u64,
        uar: u32,
        intr: u64,
        cmd_events: bool,
        pas: &[u64],
    ) -> super::super::Reply {
        let len = create_eq_in_len(pas.len()).unwrap();
        b.run(Opcode::CreateEq, 0, len, 16, |m| {
            set(m, CREATE_EQ_IN_LOG_EQ_SIZE, log_size);
            set(m, CREATE_EQ_IN_UAR_PAGE, u64::from(uar));
            set(m, CREATE_EQ_IN_INTR, intr);
            if cmd_events {
                set(m, CREATE_EQ_IN_EVENT_BITMASK, 1 << EVENT_TYPE_CMD);
            }
            for (i, &pa) in pas.iter().enumerate() {
                set(m, CREATE_EQ_IN_PAS.nth(i).unwrap(), pa);
            }
        })
    }

    #[test]
    fn cmd_eq_ring_addresses_owner_phase_and_arming() {
        let mut b = Bench::vf();
        b.bring_up();
        b.map(0x40_0000, 0x2000);
        ok(&b.simple(Opcode::AllocUar));
        // 128 EQEs = 8 KiB = two 4 KiB pages.
        let r = create(&mut b, 7, 3, 2, true, &[0x40_1000, 0x40_0000]);
        ok(&r);
        let eqn = get(&r.out, CREATE_EQ_OUT_EQ_NUMBER) as u8;
        assert_eq!(eqn, 1);
        assert_eq!(b.fw.cmd_eq(), Some(eqn));
        // Not armed: EQEs are written without an interrupt.
        let s = b.fw.reserve_cmd_eqe().unwrap();
        assert_eq!((s.addr, s.owner), (0x40_1000, 0));
        assert_eq!(b.fw.commit_eqe(&s), None);
        // Arming with an unconsumed EQE fires at once and disarms.
        assert_eq!(
            b.fw.uar_write(3, EQ_DOORBELL_ARM_OFFSET, eq_doorbell_value(eqn, 0)),
            Some(UarAction::Raise(2))
        );
        assert!(!b.fw.eq(eqn).unwrap().armed);
        // Consumed and armed: the next EQE fires.
        assert_eq!(
            b.fw.uar_write(3, EQ_DOORBELL_ARM_OFFSET, eq_doorbell_value(eqn, 1)),
            None
        );
        let s = b.fw.reserve_cmd_eqe().unwrap();
        assert_eq!(b.fw.commit_eqe(&s), Some(2));
        // Update without arming.
        assert_eq!(
            b.fw.uar_write(3, EQ_DOORBELL_NOARM_OFFSET, eq_doorbell_value(eqn, 2)),
            None
        );
        let s = b.fw.reserve_cmd_eqe().unwrap();
        assert_eq!(b.fw.commit_eqe(&s), None);
        // Wrong UAR or EQ number: ignored and recorded.
        assert_eq!(
            b.fw.uar_write(4, EQ_DOORBELL_ARM_OFFSET, eq_doorbell_value(eqn, 0)),
            None
        );
        assert_eq!(
            b.fw.uar_write(3, EQ_DOORBELL_ARM_OFFSET, eq_doorbell_value(9, 0)),
            None
        );
        let log = b.fw.uar_log().recent();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].why, UarRefusal::NoUar { page: 4 });
        assert_eq!(log[1].why, UarRefusal::NoEq { eqn: 9, page: 3 });
        // Walk the ring: EQE 64 sits on the second page; after 128 the owner flips.
        for i in 3..200u32 {
            b.fw.uar_write(3, EQ_DOORBELL_NOARM_OFFSET, eq_doorbell_value(eqn, i));
            let s = b.fw.reserve_cmd_eqe().unwrap();
            let idx = i % 128;
            let page = if idx < 64 { 0x40_1000 } else { 0x40_0000 };
            assert_eq!(s.addr, page + u64::from(idx % 64) * 64, "eqe {i}");
            assert_eq!(s.owner, u8::from(i >= 128));
            b.fw.commit_eqe(&s);
        }
        let e = EqeSlot {
            eqn,
            addr: 0,
            owner: 1,
        }
        .cmd_eqe(1 << 31);
        assert_eq!((e[1], e[32], e[63]), (EVENT_TYPE_CMD, 0x80, 1));
    }

    #[test]
    fn overrun_drops_the_eqe() {
        let mut b = Bench::vf();
        b.bring_up();
        b.map(0x40_0000, 0x1000);
        ok(&b.simple(Opcode::AllocUar));
        ok(&create(&mut b, 1, 3, 0, true, &[0x40_0000]));
        for _ in 0..2 {
            let s = b.fw.reserve_cmd_eqe().unwrap();
            b.fw.commit_eqe(&s);
        }
        assert_eq!(b.fw.reserve_cmd_eqe(), None);
    }

    /// The failure a live command completes with is the shared validator's.
    fn fails_with(r: &super::super::Reply, why: EqError) {
        let want = why.fail();
        fails(r, want.status, want.syndrome);
    }

    #[test]
    fn create_eq_refuses_with_the_reasons_load_gives() {
        let mut b = Bench::vf();
        b.bring_up();
        b.map(0x40_0000, 0x1000);
        fails_with(
            &create(&mut b, 5, 3, 0, false, &[0x40_0000]),
            check_eq_uar(&b.fw.uars, 3).unwrap_err(),
        );
        ok(&b.simple(Opcode::AllocUar));
        fails_with(
            &create(&mut b, 17, 3, 0, false, &[0x40_0000]),
            check_eqc(17, 0, 0, 0).unwrap_err(),
        );
        fails_with(
            &create(&mut b, 5, 3, 16, false, &[0x40_0000]),
            check_eqc(5, 0, 16, 0).unwrap_err(),
        );
        fails_with(
            &create(&mut b, 5, 3, 0, false, &[0x40_0010]),
            check_eq_page(0, 0x40_0010).unwrap_err(),
        );
        ok(&create(&mut b, 5, 3, 0, true, &[0x40_0000]));
        fails_with(
            &create(&mut b, 5, 3, 0, true, &[0x40_0000]),
            check_cmd_eq(true, Some(1)).unwrap_err(),
        );
    }

    #[test]
    fn create_eq_checks_its_context_and_pages() {
        let mut b = Bench::vf();
        b.bring_up();
        b.map(0x40_0000, 0x1000);
        // No such UAR.
        fails(
            &create(&mut b, 5, 3, 0, false, &[0x40_0000]),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
        ok(&b.simple(Opcode::AllocUar));
        fails(
            &create(&mut b, 5, 3, 16, false, &[0x40_0000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &create(&mut b, 17, 3, 0, false, &[0x40_0000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &create(&mut b, 5, 3, 0, false, &[0x50_0000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create(&mut b, 5, 3, 0, false, &[0x40_0010]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        // 2^7 EQEs need two pages; one given.
        fails(
            &create(&mut b, 7, 3, 0, false, &[0x40_0000]),
            CmdStatus::BadInpLenErr,
            syndrome::SHORT_INPUT,
        );
        ok(&create(&mut b, 5, 3, 0, true, &[0x40_0000]));
        fails(
            &create(&mut b, 5, 3, 0, true, &[0x40_0000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        // The UAR is busy while the EQ uses it.
        let r = b.run(Opcode::DeallocUar, 0, 16, 16, |m| {
            set(m, mlx5_prm::cmd::uar::DEALLOC_UAR_IN_UAR, 3)
        });
        fails(&r, CmdStatus::ResBusy, syndrome::BUSY);
        for _ in 1..MAX_NUM_EQS {
            ok(&create(&mut b, 5, 3, 0, false, &[0x40_0000]));
        }
        fails(
            &create(&mut b, 5, 3, 0, false, &[0x40_0000]),
            CmdStatus::NoResErr,
            syndrome::NO_RESOURCES,
        );
        assert_eq!(b.fw.object_counts().eqs, MAX_NUM_EQS as usize);
        let r = b.run(Opcode::DestroyEq, 0, 16, 16, |m| {
            set(m, DESTROY_EQ_IN_EQ_NUMBER, 1)
        });
        ok(&r);
        assert_eq!(b.fw.cmd_eq(), None);
        let r = b.run(Opcode::DestroyEq, 0, 16, 16, |m| {
            set(m, DESTROY_EQ_IN_EQ_NUMBER, 1)
        });
        fails(&r, CmdStatus::BadResErr, syndrome::NO_SUCH_OBJECT);
    }
}
