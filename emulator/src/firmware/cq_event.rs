//! CQ arming and the events of CQs and QPs: the UAR CQ doorbell, completion EQEs on the
//! CQ's `c_eqn`, CQ and QP error EQEs on the EQs that subscribed to them, and the log of
//! UAR writes the device refused.
//!
//! # Arming (PRM "CQ doorbell"; `mlx5_cq_arm`)
//!
//! Software writes the arm word `cmd_sn << 28 | cmd << 24 | ci` into the CQ doorbell
//! record (`arm_db`, byte 4), then the 8-byte UAR register at 0x20 of the CQ's
//! `uar_page`: the same word at 0x20, the CQ number at 0x24 (one 8-byte store, or 0x20
//! then 0x24). The device acts on the second word, with the first word that preceded it
//! on that UAR page:
//!
//! * `cmd_sn` must equal the CQ's arm sequence number, which starts at 0 and advances
//!   (mod 4) with every completion event the CQ generates; software advances its copy on
//!   every completion EQE it takes for the CQ (`++cq->arm_sn`). An arm with another
//!   number repeats an arm that already fired and is ignored.
//! * `cmd` 0 (ARM_NEXT): the next CQE fires; 1 (ARM_SOLICITED): the next solicited CQE
//!   (the receive completion of a message sent with the solicited-event bit) or error
//!   CQE fires. If CQEs past `ci` are in memory already (one that qualifies, for
//!   ARM_SOLICITED), the arm fires at once, so a CQE written between software's last
//!   poll and its arm is never left without an event.
//! * Firing disarms the CQ (cqc `st` FIRED) and writes one completion EQE (type 0x00,
//!   `data.comp.cqn`) into the CQ's EQ, whose MSI-X vector is raised if the EQ is armed
//!   (and the EQ disarmed, as for every EQE): one interrupt per arm.
//!
//! A write the device cannot take — an unallocated UAR page, an offset that is no
//! register, a `cqn` word with no arm word before it, reserved bits or an unknown `cmd`,
//! a CQ or EQ not on that UAR page — changes nothing and is recorded ([`UarLog`], with a
//! rate-limited warning).

use std::collections::VecDeque;

use mlx5_prm::cmd::cq::{
    split_cq_arm_word, CqArmCmd, CQC_ST_ARMED, CQC_ST_FIRED, CQC_ST_SOLICITED_ARMED, CQ_DB_CI_MASK,
    CQ_DB_CQN_MASK,
};
use mlx5_prm::cmd::eq::{
    EQE_COMP_CQN, EQE_CQ_ERR_CQN, EQE_CQ_ERR_SYNDROME, EQE_QP_SRQ_N, EQE_QP_SRQ_TYPE, EQE_SIZE,
    EQE_TYPE, EVENT_QUEUE_TYPE_QP, EVENT_TYPE_COMP, EVENT_TYPE_CQ_ERROR,
};
use mlx5_prm::ifc::set;

use super::{Cq, Firmware};

/// Refused UAR writes kept in a function's [`UarLog`] (oldest dropped first).
pub const UAR_LOG_CAPACITY: usize = 256;

/// The arm state of a CQ (cqc `st`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CqArm {
    /// Not armed since it was created.
    #[default]
    Idle,
    /// Armed for the next CQE ([`CqArmCmd::Next`]) or the next solicited one.
    Armed(CqArmCmd),
    /// Its arm fired and has not been renewed.
    Fired,
}

impl CqArm {
    /// cqc `st` as QUERY_CQ reports it (0 before the first arm).
    pub fn st(self) -> u8 {
        match self {
            CqArm::Idle => 0,
            CqArm::Armed(CqArmCmd::Next) => CQC_ST_ARMED,
            CqArm::Armed(CqArmCmd::Solicited) => CQC_ST_SOLICITED_ARMED,
            CqArm::Fired => CQC_ST_FIRED,
        }
    }

    /// The state a cqc `st` names (a state image carries it so).
    pub fn from_st(st: u8) -> Option<Self> {
        match st {
            0 => Some(CqArm::Idle),
            CQC_ST_ARMED => Some(CqArm::Armed(CqArmCmd::Next)),
            CQC_ST_SOLICITED_ARMED => Some(CqArm::Armed(CqArmCmd::Solicited)),
            CQC_ST_FIRED => Some(CqArm::Fired),
            _ => None,
        }
    }
}

/// Why the device refused a UAR write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UarRefusal {
    #[error("UAR page {page} is not allocated (ALLOC_UAR it first)")]
    NoUar { page: u32 },
    #[error("offset {offset:#x} of a UAR page is no register (CQ doorbell 0x20/0x24, EQ doorbells 0x40/0x48, send doorbells 0x800+)")]
    NoRegister { offset: u32 },
    #[error("CQ doorbell word 0x24 (cqn {value:#x}) without its arm word at 0x20 first: write 0x20 then 0x24, or both as one 8-byte store")]
    CqnWithoutArm { value: u32 },
    #[error("CQ arm word {word:#010x}: reserved bits 31:30 are set")]
    ArmReserved { word: u32 },
    #[error("CQ arm word {word:#010x}: cmd {cmd} is neither ARM_NEXT (0) nor ARM_SOLICITED (1)")]
    ArmCmd { word: u32, cmd: u32 },
    #[error("CQ doorbell cqn word {value:#010x}: reserved bits 31:24 are set")]
    CqnReserved { value: u32 },
    #[error("CQ doorbell names CQ {cqn:#x}, which is not a CQ of UAR page {page} (cqc uar_page)")]
    NoCq { cqn: u32, page: u32 },
    #[error(
        "send doorbell names QP {qpn:#x}, which is not a QP of UAR page {page} (qpc uar_page)"
    )]
    NoQp { qpn: u32, page: u32 },
    #[error("EQ doorbell names EQ {eqn}, which is not an EQ of UAR page {page} (eqc uar_page)")]
    NoEq { eqn: u8, page: u32 },
}

/// One refused UAR write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UarWrite {
    /// UAR page index (BAR0 offset / 4 KiB).
    pub page: u32,
    /// Offset of the 4-byte word in the page.
    pub offset: u32,
    /// The word, as the driver wrote it (big-endian in BAR0).
    pub value: u32,
    pub why: UarRefusal,
}

/// The UAR writes a function refused: a bounded log and a total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UarLog {
    recent: VecDeque<UarWrite>,
    total: u64,
}

impl UarLog {
    /// Refused writes since power-on (the log keeps the last [`UAR_LOG_CAPACITY`]).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The last refused writes, oldest first.
    pub fn recent(&self) -> Vec<UarWrite> {
        self.recent.iter().copied().collect()
    }

    fn push(&mut self, w: UarWrite) {
        if self.recent.len() >= UAR_LOG_CAPACITY {
            self.recent.pop_front();
        }
        self.recent.push_back(w);
        self.total += 1;
    }
}

/// What a UAR write asks of the function once the firmware lock is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UarAction {
    /// An EQ armed with EQEs unconsumed: raise its vector.
    Raise(u16),
    /// A CQ arm fired at once: post its completion EQE on EQ `eqn`.
    CqEvent { eqn: u8, cqn: u32 },
}

/// A completion EQE (type 0x00) for CQ `cqn`, owner byte left to the poster.
pub fn comp_eqe(cqn: u32) -> [u8; EQE_SIZE] {
    let mut e = [0u8; EQE_SIZE];
    set(&mut e, EQE_TYPE, u64::from(EVENT_TYPE_COMP));
    set(&mut e, EQE_COMP_CQN, u64::from(cqn & CQ_DB_CQN_MASK));
    e
}

/// A CQ error EQE (type 0x04) for CQ `cqn` with `syndrome` (`CQ_ERROR_*`).
pub fn cq_error_eqe(cqn: u32, syndrome: u8) -> [u8; EQE_SIZE] {
    let mut e = [0u8; EQE_SIZE];
    set(&mut e, EQE_TYPE, u64::from(EVENT_TYPE_CQ_ERROR));
    set(&mut e, EQE_CQ_ERR_CQN, u64::from(cqn & CQ_DB_CQN_MASK));
    set(&mut e, EQE_CQ_ERR_SYNDROME, u64::from(syndrome));
    e
}

/// A QP event EQE of `event_type` (`data.qp_srq`, queue type QP) for QP `qpn`.
pub fn qp_event_eqe(event_type: u8, qpn: u32) -> [u8; EQE_SIZE] {
    let mut e = [0u8; EQE_SIZE];
    set(&mut e, EQE_TYPE, u64::from(event_type));
    set(&mut e, EQE_QP_SRQ_TYPE, u64::from(EVENT_QUEUE_TYPE_QP));
    set(&mut e, EQE_QP_SRQ_N, u64::from(qpn & CQ_DB_CQN_MASK));
    e
}

impl Cq {
    /// Fires the CQ's arm: disarmed, the sequence number advanced; returns its EQ.
    fn fire(&mut self) -> u8 {
        self.arm = CqArm::Fired;
        self.arm_sn = (self.arm_sn + 1) & 3;
        self.eqn
    }

    /// An arm request (`cmd_sn`, `cmd`, `ci`). Returns the EQ to post the completion EQE
    /// on if it fires at once.
    pub fn arm_request(&mut self, sn: u8, cmd: CqArmCmd, ci: u32) -> Option<u8> {
        if sn != self.arm_sn {
            tracing::debug!(
                cqn = self.cqn,
                sn,
                arm_sn = self.arm_sn,
                "CQ arm with a stale sequence number ignored"
            );
            return None;
        }
        self.arm = CqArm::Armed(cmd);
        let ci = ci & CQ_DB_CI_MASK;
        // CQEs in memory past `ci` (a `ci` ahead of the device counts as none).
        let pending = self.written.wrapping_sub(ci) & CQ_DB_CI_MASK;
        let pending = if pending > self.entries() { 0 } else { pending };
        let fire = match cmd {
            CqArmCmd::Next => pending > 0,
            CqArmCmd::Solicited => self
                .last_solicited
                .is_some_and(|s| s.wrapping_sub(ci) & CQ_DB_CI_MASK < pending),
        };
        fire.then(|| self.fire())
    }

    /// CQE `index` is in memory (`solicited`: a solicited or error CQE). Returns the EQ
    /// to post the completion EQE on if the CQ's arm fires.
    pub fn cqe_written(&mut self, index: u32, solicited: bool) -> Option<u8> {
        self.written = self.written.wrapping_add(1) & CQ_DB_CI_MASK;
        if solicited {
            self.last_solicited = Some(index & CQ_DB_CI_MASK);
        }
        match self.arm {
            CqArm::Armed(CqArmCmd::Next) => Some(self.fire()),
            CqArm::Armed(CqArmCmd::Solicited) if solicited => Some(self.fire()),
            _ => None,
        }
    }
}

impl Firmware {
    /// The UAR writes this function refused.
    pub fn uar_log(&self) -> &UarLog {
        &self.uar_log
    }

    /// Records a refused UAR write (and warns, at most once a second).
    pub fn refuse_uar_write(&mut self, page: u32, offset: u32, value: u32, why: UarRefusal) {
        if let Some(held) = self.uar_warnings.check() {
            tracing::warn!(
                vhca_id = self.id.vhca_id,
                page,
                offset = format_args!("{offset:#x}"),
                value = format_args!("{value:#010x}"),
                held_back = held,
                "UAR write refused: {why}"
            );
        }
        self.uar_log.push(UarWrite {
            page,
            offset,
            value,
            why,
        });
    }

    /// The second word of the CQ doorbell (`cqn`), with the arm word latched for UAR
    /// page `uar`.
    pub(super) fn cq_doorbell(
        &mut self,
        uar: u32,
        value: u32,
    ) -> Result<Option<UarAction>, UarRefusal> {
        let word = self
            .cq_arm_words
            .remove(&uar)
            .ok_or(UarRefusal::CqnWithoutArm { value })?;
        let (sn, cmd, ci, reserved) = split_cq_arm_word(word);
        if reserved != 0 {
            return Err(UarRefusal::ArmReserved { word });
        }
        let cmd = CqArmCmd::try_from(cmd).map_err(|cmd| UarRefusal::ArmCmd { word, cmd })?;
        if value & !CQ_DB_CQN_MASK != 0 {
            return Err(UarRefusal::CqnReserved { value });
        }
        let cqn = value;
        let cq = self
            .cqs
            .get_mut(&cqn)
            .filter(|c| c.uar == uar)
            .ok_or(UarRefusal::NoCq { cqn, page: uar })?;
        let fired = cq.arm_request(sn as u8, cmd, ci);
        tracing::trace!(cqn, sn, ?cmd, ci, fired = fired.is_some(), "CQ armed");
        Ok(fired.map(|eqn| UarAction::CqEvent { eqn, cqn }))
    }

    /// The EQ that takes asynchronous events of `event_type` (its `event_bitmask` bit),
    /// if one does.
    pub fn async_eq(&self, event_type: u8) -> Option<u8> {
        self.eqs
            .values()
            .find(|e| e.wants(event_type))
            .map(|e| e.eqn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::Ring;
    use mlx5_prm::cmd::cq::CQ_STATUS_OK;

    fn cq() -> Cq {
        Cq {
            cqn: 5,
            log_size: 2,
            ring: Ring {
                log_page_size: 0,
                pas: vec![0x1000],
            },
            uar: 3,
            eqn: 2,
            dbr: 0x2000,
            pi: 0,
            status: CQ_STATUS_OK,
            arm: CqArm::Idle,
            arm_sn: 0,
            written: 0,
            last_solicited: None,
        }
    }

    #[test]
    fn arm_next_fires_once_and_needs_the_next_sequence_number() {
        let mut c = cq();
        assert_eq!(c.cqe_written(0, false), None, "unarmed: no event");
        // CQE 0 is unconsumed (ci 0): the arm fires at once.
        assert_eq!(c.arm_request(0, CqArmCmd::Next, 0), Some(2));
        assert_eq!((c.arm, c.arm_sn), (CqArm::Fired, 1));
        // The same arm again (stale number): ignored.
        assert_eq!(c.arm_request(0, CqArmCmd::Next, 1), None);
        assert_eq!(c.arm, CqArm::Fired);
        assert_eq!(c.cqe_written(1, false), None);
        // Re-armed with the new number after consuming both: the next CQE fires.
        assert_eq!(c.arm_request(1, CqArmCmd::Next, 2), None);
        assert_eq!(c.arm.st(), CQC_ST_ARMED);
        assert_eq!(c.cqe_written(2, false), Some(2));
        assert_eq!(c.cqe_written(3, false), None, "one event per arm");
        assert_eq!(c.arm_sn, 2);
        // A ci ahead of the device is no pending CQE.
        assert_eq!(c.arm_request(2, CqArmCmd::Next, 9), None);
    }

    #[test]
    fn arm_solicited_waits_for_a_solicited_or_error_cqe() {
        let mut c = cq();
        assert_eq!(c.arm_request(0, CqArmCmd::Solicited, 0), None);
        assert_eq!(c.arm.st(), CQC_ST_SOLICITED_ARMED);
        assert_eq!(c.cqe_written(0, false), None);
        assert_eq!(c.cqe_written(1, true), Some(2));
        // Re-armed at ci 1: CQE 1 (solicited) is still unconsumed: fires at once.
        assert_eq!(c.arm_request(1, CqArmCmd::Solicited, 1), Some(2));
        // Re-armed at ci 2: nothing solicited past it.
        assert_eq!(c.arm_request(2, CqArmCmd::Solicited, 2), None);
    }

    #[test]
    fn st_round_trips_and_eqes_are_laid_out() {
        for a in [
            CqArm::Idle,
            CqArm::Armed(CqArmCmd::Next),
            CqArm::Armed(CqArmCmd::Solicited),
            CqArm::Fired,
        ] {
            assert_eq!(CqArm::from_st(a.st()), Some(a));
        }
        assert_eq!(CqArm::from_st(1), None);
        let e = comp_eqe(0x12_3456);
        assert_eq!((e[1], &e[56..60]), (0, &[0, 0x12, 0x34, 0x56][..]));
        let e = cq_error_eqe(7, 1);
        assert_eq!((e[1], e[35], e[43]), (EVENT_TYPE_CQ_ERROR, 7, 1));
        let e = qp_event_eqe(0x05, 9);
        assert_eq!((e[1], e[52], e[59]), (5, 0, 9));
    }

    #[test]
    fn uar_log_is_bounded_and_counts_all() {
        let mut l = UarLog::default();
        for i in 0..(UAR_LOG_CAPACITY as u32 + 10) {
            l.push(UarWrite {
                page: 3,
                offset: 0,
                value: i,
                why: UarRefusal::NoRegister { offset: 0 },
            });
        }
        assert_eq!(l.total(), UAR_LOG_CAPACITY as u64 + 10);
        assert_eq!(l.recent().len(), UAR_LOG_CAPACITY);
        assert_eq!(l.recent()[0].value, 10);
    }
}
