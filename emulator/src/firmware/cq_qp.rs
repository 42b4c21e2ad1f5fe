//! CREATE_CQ / DESTROY_CQ / QUERY_CQ, CREATE_QP / DESTROY_QP / QUERY_QP and the QP
//! state transitions (RST2INIT, INIT2RTR, RTR2RTS, 2ERR, 2RST): the contexts the DMA
//! engine (`crate::dma`) works on.
//!
//! A CQ is a ring of 64-byte CQEs over the pages of its PAS list with a doorbell record;
//! an RC QP has one work queue buffer (receive queue first, send queue after it) over
//! its PAS list, a doorbell record (receive counter, send counter) and, from INIT2RTR,
//! a peer: the QP `remote_qpn` on the function its primary address path names (see
//! [`QpPeer`]). The engine keeps the device-side counters here, so that a state image
//! carries them with the contexts.

use std::collections::{BTreeMap, BTreeSet};

use mlx5_prm::cmd::cq::{self, cqc, CQE_SIZE, CQE_SZ_64, CQ_CQN, CQ_PAS, CQ_STATUS_OK};
use mlx5_prm::cmd::qp::{self, ads, qpc, QpState, QP_PAS, QP_QPN, SEND_WQE_BB};
use mlx5_prm::ifc::{set, Field};
use mlx5_prm::CmdStatus;

use super::caps::{LOG_MAX_CQ, LOG_MAX_CQ_SZ, LOG_MAX_MSG, LOG_MAX_QP, LOG_MAX_QP_SZ};
use super::{first_free, syndrome, Cmd, CmdFail, CmdResult, CqArm, Env, Firmware};

/// CQs one function may hold (`log_max_cq`).
pub const MAX_CQS: u32 = 1 << LOG_MAX_CQ;
/// QPs one function may hold (`log_max_qp`).
pub const MAX_QPS: u32 = 1 << LOG_MAX_QP;
/// First QP number handed out (0 and 1 are the special QPs of IB).
pub const FIRST_QPN: u32 = 2;
/// Largest `log_page_size` of a CQ or QP buffer (4 KiB << 18 = 1 GiB pages).
pub const MAX_BUF_LOG_PAGE_SIZE: u64 = 18;
/// Largest `log_rq_stride` (16 << 6 = 1 KiB receive WQEs, 64 scatter entries).
pub const MAX_LOG_RQ_STRIDE: u64 = 6;

/// Why a CQ or QP context is refused: by the live commands, and by LOAD_VHCA_STATE for
/// the contexts of an image (the same checks).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("{what} = {got} is above {max}")]
    TooBig {
        what: &'static str,
        got: u64,
        max: u64,
    },
    #[error("{what} = {got:#x}: not supported (expected {expected})")]
    Unsupported {
        what: &'static str,
        got: u64,
        expected: &'static str,
    },
    #[error("UAR {uar} is not allocated")]
    NoUar { uar: u32 },
    #[error("EQ {eqn} does not exist")]
    NoEq { eqn: u64 },
    #[error("EQ {eqn} takes asynchronous events (event_bitmask) and cannot take a CQ's completion events; name a completion EQ (created with an empty event_bitmask)")]
    NotCompletionEq { eqn: u8 },
    #[error("PD {pd} is not allocated")]
    NoPd { pd: u32 },
    #[error("CQ {cqn:#x} does not exist")]
    NoCq { cqn: u32 },
    #[error("QP {qpn:#x} does not exist")]
    NoQp { qpn: u32 },
    #[error("doorbell record at {addr:#x}: expected non-zero, 8-byte aligned and DMA-mapped")]
    BadDbr { addr: u64 },
    #[error("{what} page {index} at {pa:#x}: expected non-zero, page aligned and DMA-mapped")]
    BadPage {
        what: &'static str,
        index: usize,
        pa: u64,
    },
    #[error("the PAS has {have} entries, the buffer needs {needed}")]
    PasCount { have: usize, needed: usize },
    #[error("QP {qpn:#x} is {state}: {cmd} needs {needed}")]
    QpState {
        qpn: u32,
        state: QpState,
        cmd: &'static str,
        needed: &'static str,
    },
    #[error("{what} {id:#x} is still used by QP {qpn:#x}")]
    InUse {
        what: &'static str,
        id: u32,
        qpn: u32,
    },
    #[error("the address path names no function (fl 0, grh {grh}, rlid {rlid:#x})")]
    BadPath { grh: bool, rlid: u16 },
}

impl QueueError {
    /// The status and syndrome the live command completes with.
    pub fn fail(&self) -> CmdFail {
        match self {
            QueueError::NoUar { .. }
            | QueueError::NoEq { .. }
            | QueueError::NoPd { .. }
            | QueueError::NoCq { .. }
            | QueueError::NoQp { .. } => CmdFail::no_such_object(),
            QueueError::BadPage { .. } | QueueError::BadDbr { .. } => {
                CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_PAGE)
            }
            QueueError::QpState { .. } => {
                CmdFail::new(CmdStatus::BadQpStateErr, syndrome::WRONG_STATE)
            }
            QueueError::InUse { .. } => CmdFail::new(CmdStatus::ResBusy, syndrome::BUSY),
            QueueError::NotCompletionEq { .. } => {
                CmdFail::new(CmdStatus::BadParamErr, syndrome::NOT_COMPLETION_EQ)
            }
            _ => CmdFail::bad_param(),
        }
    }
}

/// A buffer in guest memory over a list of equal pages (a CQ ring, a QP's work queues).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// Pages are 4 KiB << this.
    pub log_page_size: u8,
    /// IOVA of each page.
    pub pas: Vec<u64>,
}

impl Ring {
    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        4096u64 << self.log_page_size
    }

    /// Bytes the pages cover.
    pub fn len(&self) -> u64 {
        self.page_size() * self.pas.len() as u64
    }

    /// Whether the buffer has no pages.
    pub fn is_empty(&self) -> bool {
        self.pas.is_empty()
    }

    /// The IOVA runs of `[off, off + len)` of the buffer, or `None` if it is outside.
    pub fn runs(&self, off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let end = off.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        let page = self.page_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut k = off;
        while k < end {
            let idx = usize::try_from(k / page).ok()?;
            let in_page = k % page;
            let n = (page - in_page).min(end - k);
            let iova = self.pas.get(idx)?.checked_add(in_page)?;
            match runs.last_mut() {
                Some((a, l)) if a.checked_add(*l) == Some(iova) => *l += n,
                _ => runs.push((iova, n)),
            }
            k += n;
        }
        Some(runs)
    }
}

/// A completion queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cq {
    pub cqn: u32,
    /// 2^this CQEs.
    pub log_size: u8,
    pub ring: Ring,
    pub uar: u32,
    /// The EQ of its completion events.
    pub eqn: u8,
    /// IOVA of the doorbell record (consumer index, arm word).
    pub dbr: u64,
    /// CQEs written (the producer counter, 24 bits, wrapping).
    pub pi: u32,
    /// `status`: OK, or overflow once a CQE found the ring full.
    pub status: u8,
    /// Arm state (cqc `st`).
    pub arm: CqArm,
    /// Arm sequence number (2 bits): advanced by every completion event; an arm
    /// request must carry it.
    pub arm_sn: u8,
    /// CQEs fully in guest memory (24 bits, wrapping): equal to `pi` whenever no CQE is
    /// being written.
    pub written: u32,
    /// Index of the last solicited or error CQE written.
    pub last_solicited: Option<u32>,
}

impl Cq {
    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        1 << self.log_size
    }
}

/// Where a QP's peer is: the function (`vhca_id`) its primary address path names and
/// the QP number there. `fl` (force loopback) names this function; otherwise a GID
/// (`grh` = 1, [`mlx5_prm::cmd::qp::gid_of`]) or a LID ([`mlx5_prm::cmd::qp::lid_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpPeer {
    pub vhca_id: u16,
    pub qpn: u32,
}

/// An RC queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qp {
    pub qpn: u32,
    pub state: QpState,
    pub pd: u32,
    pub uar: u32,
    pub log_msg_max: u8,
    /// Whether the QP has a receive queue (`rq_type` regular).
    pub has_rq: bool,
    pub log_rq_size: u8,
    /// A receive WQE is 16 << this bytes.
    pub log_rq_stride: u8,
    /// Whether the QP has a send queue (`no_sq` = 0).
    pub has_sq: bool,
    /// 2^this 64-byte send basic blocks.
    pub log_sq_size: u8,
    pub buf: Ring,
    pub cqn_snd: u32,
    pub cqn_rcv: u32,
    /// IOVA of the doorbell record (receive counter, send counter).
    pub dbr: u64,
    /// Remote reads / writes allowed (`rre`, `rwe`).
    pub rre: bool,
    pub rwe: bool,
    /// Set by INIT2RTR.
    pub peer: Option<QpPeer>,
    /// Send basic blocks consumed (`hw_sq_wqebb_counter`): the next WQE starts here.
    pub sq_ci: u16,
    /// Receive WQEs consumed (`hw_rq_counter`).
    pub rq_ci: u32,
}

impl Qp {
    /// Bytes of the receive queue at the start of the buffer.
    pub fn rq_bytes(&self) -> u64 {
        if self.has_rq {
            (1u64 << self.log_rq_size) << (4 + self.log_rq_stride)
        } else {
            0
        }
    }

    /// Bytes of the send queue after the receive queue.
    pub fn sq_bytes(&self) -> u64 {
        if self.has_sq {
            (1u64 << self.log_sq_size) * SEND_WQE_BB as u64
        } else {
            0
        }
    }

    /// Send basic blocks in the ring.
    pub fn sq_entries(&self) -> u32 {
        if self.has_sq {
            1 << self.log_sq_size
        } else {
            0
        }
    }

    /// Receive WQEs in the ring.
    pub fn rq_entries(&self) -> u32 {
        if self.has_rq {
            1 << self.log_rq_size
        } else {
            0
        }
    }

    /// Whether the QP may start send WQEs.
    pub fn can_send(&self) -> bool {
        self.state == QpState::Rts
    }

    /// Whether the QP accepts requests from its peer.
    pub fn can_receive(&self) -> bool {
        matches!(self.state, QpState::Rtr | QpState::Rts)
    }
}

fn too_big(what: &'static str, got: u64, max: u64) -> Result<(), QueueError> {
    if got > max {
        return Err(QueueError::TooBig { what, got, max });
    }
    Ok(())
}

fn must_be(
    what: &'static str,
    got: u64,
    want: u64,
    expected: &'static str,
) -> Result<(), QueueError> {
    if got != want {
        return Err(QueueError::Unsupported {
            what,
            got,
            expected,
        });
    }
    Ok(())
}

/// A buffer's pages: as many as `bytes` needs, each non-zero and aligned to the page.
pub fn check_ring(what: &'static str, ring: &Ring, bytes: u64) -> Result<(), QueueError> {
    too_big(
        "log_page_size",
        ring.log_page_size.into(),
        MAX_BUF_LOG_PAGE_SIZE,
    )?;
    let needed = bytes.div_ceil(ring.page_size()) as usize;
    if ring.pas.len() != needed {
        return Err(QueueError::PasCount {
            have: ring.pas.len(),
            needed,
        });
    }
    for (index, &pa) in ring.pas.iter().enumerate() {
        if pa == 0 || !pa.is_multiple_of(ring.page_size()) {
            return Err(QueueError::BadPage { what, index, pa });
        }
    }
    Ok(())
}

/// A doorbell record address: non-zero and 8-byte aligned.
pub fn check_dbr(addr: u64) -> Result<(), QueueError> {
    if addr == 0 || !addr.is_multiple_of(8) {
        return Err(QueueError::BadDbr { addr });
    }
    Ok(())
}

/// A CQ as CREATE_CQ would have created it (numbers in range, UAR and a completion EQ
/// present). `eqs` maps every EQ number to whether it takes completion events
/// ([`mlx5_prm::cmd::eq::is_completion_eq`]).
pub fn check_cq(c: &Cq, uars: &BTreeSet<u32>, eqs: &BTreeMap<u8, bool>) -> Result<(), QueueError> {
    too_big("log_cq_size", c.log_size.into(), LOG_MAX_CQ_SZ)?;
    if !uars.contains(&c.uar) {
        return Err(QueueError::NoUar { uar: c.uar });
    }
    match eqs.get(&c.eqn) {
        None => return Err(QueueError::NoEq { eqn: c.eqn.into() }),
        Some(false) => return Err(QueueError::NotCompletionEq { eqn: c.eqn }),
        Some(true) => {}
    }
    check_dbr(c.dbr)?;
    check_ring("CQ", &c.ring, u64::from(c.entries()) * CQE_SIZE as u64)
}

/// A QP as CREATE_QP (and the transitions) would have left it.
pub fn check_qp(
    q: &Qp,
    uars: &BTreeSet<u32>,
    pds: &BTreeSet<u32>,
    cqs: &BTreeMap<u32, Cq>,
) -> Result<(), QueueError> {
    too_big("log_msg_max", q.log_msg_max.into(), LOG_MAX_MSG)?;
    too_big("log_rq_size", q.log_rq_size.into(), LOG_MAX_QP_SZ)?;
    too_big("log_sq_size", q.log_sq_size.into(), LOG_MAX_QP_SZ)?;
    too_big("log_rq_stride", q.log_rq_stride.into(), MAX_LOG_RQ_STRIDE)?;
    if !pds.contains(&q.pd) {
        return Err(QueueError::NoPd { pd: q.pd });
    }
    if !uars.contains(&q.uar) {
        return Err(QueueError::NoUar { uar: q.uar });
    }
    for (used, cqn) in [(q.has_sq, q.cqn_snd), (q.has_rq, q.cqn_rcv)] {
        if used && !cqs.contains_key(&cqn) {
            return Err(QueueError::NoCq { cqn });
        }
    }
    let bytes = q.rq_bytes() + q.sq_bytes();
    if bytes == 0 {
        // Neither queue (`no_sq` with a zero-size RQ): what mlx5vf creates as its page
        // tracker's fw QP, on whose behalf the firmware sends. No buffer, no doorbell
        // record (mlx5vf leaves `dbr_addr` 0).
        return check_ring("QP", &q.buf, 0);
    }
    check_dbr(q.dbr)?;
    check_ring("QP", &q.buf, bytes)
}

/// Reads a PAS list of `needed` entries at `f` of the input.
fn read_pas(cmd: &Cmd<'_>, f: Field, needed: usize) -> Result<Vec<u64>, CmdFail> {
    let in_len = needed
        .checked_mul(8)
        .and_then(|b| b.checked_add(cq::CREATE_CQ_IN_LEN))
        .ok_or_else(CmdFail::bad_param)?;
    cmd.need_in(in_len)?;
    Ok((0..needed)
        .map(|i| f.nth(i).map_or(0, |f| cmd.get(f)))
        .collect())
}

/// Every page of `ring` and the doorbell record are DMA-mapped (one byte read each).
fn probe(env: &dyn Env, what: &'static str, ring: &Ring, dbr: u64) -> Result<(), QueueError> {
    let mut b = [0u8; 1];
    for (index, &pa) in ring.pas.iter().enumerate() {
        if env.dma_read(pa, &mut b).is_err() {
            return Err(QueueError::BadPage { what, index, pa });
        }
    }
    // A QP with neither queue has no doorbell record (see `check_qp`).
    let queueless = what == "QP" && ring.pas.is_empty();
    if !queueless && env.dma_read(dbr, &mut b).is_err() {
        return Err(QueueError::BadDbr { addr: dbr });
    }
    Ok(())
}

fn refuse(op: &'static str) -> impl Fn(QueueError) -> CmdFail {
    move |e| {
        tracing::info!(command = op, error = %e, "queue command refused");
        e.fail()
    }
}

impl Firmware {
    /// The CQ `cqn`.
    pub fn cq(&self, cqn: u32) -> Option<&Cq> {
        self.cqs.get(&cqn)
    }

    /// The CQ `cqn`, to post a CQE.
    pub fn cq_mut(&mut self, cqn: u32) -> Option<&mut Cq> {
        self.cqs.get_mut(&cqn)
    }

    /// The QP `qpn`.
    pub fn qp(&self, qpn: u32) -> Option<&Qp> {
        self.qps.get(&qpn)
    }

    /// The QP `qpn`, to advance its counters or move it to ERR.
    pub fn qp_mut(&mut self, qpn: u32) -> Option<&mut Qp> {
        self.qps.get_mut(&qpn)
    }

    /// Every QP number, ascending.
    pub fn qpns(&self) -> Vec<u32> {
        self.qps.keys().copied().collect()
    }

    /// Every EQ, with whether it takes completion events.
    fn eq_kinds(&self) -> BTreeMap<u8, bool> {
        self.eqs
            .iter()
            .map(|(&n, e)| (n, mlx5_prm::cmd::eq::is_completion_eq(&e.event_bitmask)))
            .collect()
    }

    pub(super) fn create_cq(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(cq::CREATE_CQ_IN_LEN, cq::CREATE_CQ_OUT_LEN)?;
        let r = refuse("CREATE_CQ");
        let g = |f| cmd.get(cq::in_msg(f));
        for (f, what, want, expected) in [
            (cqc::CQE_SZ, "cqe_sz", u64::from(CQE_SZ_64), "64-byte CQEs"),
            (cqc::CC, "cc", 0, "0"),
            (cqc::CQE_COMP_EN, "cqe_comp_en", 0, "0"),
            (cqc::DBR_UMEM_VALID, "dbr_umem_valid", 0, "0"),
            (cqc::PAGE_OFFSET, "page_offset", 0, "0"),
        ] {
            must_be(what, g(f), want, expected).map_err(&r)?;
        }
        let log_size = g(cqc::LOG_CQ_SIZE);
        too_big("log_cq_size", log_size, LOG_MAX_CQ_SZ).map_err(&r)?;
        let lps = g(cqc::LOG_PAGE_SIZE);
        too_big("log_page_size", lps, MAX_BUF_LOG_PAGE_SIZE).map_err(&r)?;
        let eqn = g(cqc::C_EQN);
        if eqn > u64::from(u8::MAX) {
            return Err(r(QueueError::NoEq { eqn }));
        }
        let bytes = (1u64 << log_size) * CQE_SIZE as u64;
        let needed = bytes.div_ceil(4096 << lps) as usize;
        let pas = read_pas(cmd, CQ_PAS, needed)?;
        let c = Cq {
            cqn: 0,
            log_size: log_size as u8,
            ring: Ring {
                log_page_size: lps as u8,
                pas,
            },
            uar: g(cqc::UAR_PAGE) as u32,
            eqn: eqn as u8,
            dbr: g(cqc::DBR_ADDR),
            pi: 0,
            status: CQ_STATUS_OK,
            arm: CqArm::Idle,
            arm_sn: 0,
            written: 0,
            last_solicited: None,
        };
        check_cq(&c, &self.uars, &self.eq_kinds()).map_err(&r)?;
        probe(env, "CQ", &c.ring, c.dbr).map_err(&r)?;
        let cqn = first_free(self.cqs.keys(), 1, MAX_CQS).ok_or_else(CmdFail::no_resources)?;
        self.cqs.insert(cqn, Cq { cqn, ..c });
        set(&mut out, CQ_CQN, u64::from(cqn));
        Ok(out)
    }

    pub(super) fn destroy_cq(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(cq::DESTROY_CQ_IN_LEN, cq::DESTROY_CQ_OUT_LEN)?;
        let r = refuse("DESTROY_CQ");
        let cqn = cmd.get(CQ_CQN) as u32;
        if !self.cqs.contains_key(&cqn) {
            return Err(r(QueueError::NoCq { cqn }));
        }
        if let Some(q) = self
            .qps
            .values()
            .find(|q| (q.has_sq && q.cqn_snd == cqn) || (q.has_rq && q.cqn_rcv == cqn))
        {
            return Err(r(QueueError::InUse {
                what: "CQ",
                id: cqn,
                qpn: q.qpn,
            }));
        }
        self.cqs.remove(&cqn);
        Ok(out)
    }

    pub(super) fn query_cq(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        cmd.lengths(cq::QUERY_CQ_IN_LEN, cq::QUERY_CQ_OUT_LEN)?;
        let cqn = cmd.get(CQ_CQN) as u32;
        let c = self
            .cqs
            .get(&cqn)
            .ok_or_else(|| refuse("QUERY_CQ")(QueueError::NoCq { cqn }))?;
        let len = cq::QUERY_CQ_OUT_LEN + 8 * c.ring.pas.len();
        let mut out = vec![0u8; len.min(cmd.outlen.max(cq::QUERY_CQ_OUT_LEN))];
        let mut s = |f, v: u64| set(&mut out, cq::in_msg(f), v);
        s(cqc::STATUS, c.status.into());
        s(cqc::ST, c.arm.st().into());
        s(cqc::LOG_CQ_SIZE, c.log_size.into());
        s(cqc::UAR_PAGE, c.uar.into());
        s(cqc::C_EQN, c.eqn.into());
        s(cqc::LOG_PAGE_SIZE, c.ring.log_page_size.into());
        s(cqc::PRODUCER_COUNTER, c.pi.into());
        s(cqc::DBR_ADDR, c.dbr);
        for (i, &pa) in c.ring.pas.iter().enumerate() {
            if let Some(f) = CQ_PAS.nth(i) {
                set(&mut out, f, pa);
            }
        }
        Ok(out)
    }

    pub(super) fn create_qp(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(qp::CREATE_QP_IN_LEN, qp::CREATE_QP_OUT_LEN)?;
        let r = refuse("CREATE_QP");
        let g = |f| cmd.get(qp::in_msg(f));
        for (f, what, want, expected) in [
            (qp::CREATE_QP_IN_QPC_EXT, "qpc_ext", 0, "0"),
            (qp::CREATE_QP_IN_WQ_UMEM_VALID, "wq_umem_valid", 0, "0"),
        ] {
            must_be(what, cmd.get(f), want, expected).map_err(&r)?;
        }
        for (f, what, want, expected) in [
            (qpc::ST, "st", u64::from(qp::QP_ST_RC), "RC"),
            (
                qpc::PM_STATE,
                "pm_state",
                u64::from(qp::QP_PM_MIGRATED),
                "MIGRATED",
            ),
            (qpc::DBR_UMEM_VALID, "dbr_umem_valid", 0, "0"),
            (qpc::PAGE_OFFSET, "page_offset", 0, "0"),
        ] {
            must_be(what, g(f), want, expected).map_err(&r)?;
        }
        let rq_type = g(qpc::RQ_TYPE) as u8;
        let has_rq = match rq_type {
            qp::RQ_TYPE_REGULAR => true,
            qp::RQ_TYPE_ZERO_SIZE => false,
            t => {
                return Err(r(QueueError::Unsupported {
                    what: "rq_type",
                    got: t.into(),
                    expected: "regular or zero-size",
                }))
            }
        };
        let (log_rq_size, log_rq_stride) = (g(qpc::LOG_RQ_SIZE), g(qpc::LOG_RQ_STRIDE));
        too_big("log_rq_size", log_rq_size, LOG_MAX_QP_SZ).map_err(&r)?;
        too_big("log_rq_stride", log_rq_stride, MAX_LOG_RQ_STRIDE).map_err(&r)?;
        let log_sq_size = g(qpc::LOG_SQ_SIZE);
        too_big("log_sq_size", log_sq_size, LOG_MAX_QP_SZ).map_err(&r)?;
        let lps = g(qpc::LOG_PAGE_SIZE);
        too_big("log_page_size", lps, MAX_BUF_LOG_PAGE_SIZE).map_err(&r)?;
        let log_msg_max = g(qpc::LOG_MSG_MAX);
        too_big("log_msg_max", log_msg_max, LOG_MAX_MSG).map_err(&r)?;
        let mut q = Qp {
            qpn: 0,
            state: QpState::Rst,
            pd: g(qpc::PD) as u32,
            uar: g(qpc::UAR_PAGE) as u32,
            log_msg_max: log_msg_max as u8,
            has_rq,
            log_rq_size: if has_rq { log_rq_size as u8 } else { 0 },
            log_rq_stride: if has_rq { log_rq_stride as u8 } else { 0 },
            has_sq: g(qpc::NO_SQ) == 0,
            log_sq_size: log_sq_size as u8,
            buf: Ring {
                log_page_size: lps as u8,
                pas: Vec::new(),
            },
            cqn_snd: g(qpc::CQN_SND) as u32,
            cqn_rcv: g(qpc::CQN_RCV) as u32,
            dbr: g(qpc::DBR_ADDR),
            rre: false,
            rwe: false,
            peer: None,
            sq_ci: 0,
            rq_ci: 0,
        };
        let bytes = q.rq_bytes() + q.sq_bytes();
        let needed = bytes.div_ceil(4096 << lps) as usize;
        q.buf.pas = read_pas(cmd, QP_PAS, needed)?;
        check_qp(&q, &self.uars, &self.pds, &self.cqs).map_err(&r)?;
        probe(env, "QP", &q.buf, q.dbr).map_err(&r)?;
        let qpn = first_free(self.qps.keys(), FIRST_QPN, FIRST_QPN + MAX_QPS - 1)
            .ok_or_else(CmdFail::no_resources)?;
        self.qps.insert(qpn, Qp { qpn, ..q });
        set(&mut out, QP_QPN, u64::from(qpn));
        Ok(out)
    }

    pub(super) fn destroy_qp(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(qp::QP_SHORT_IN_LEN, qp::QP_SHORT_OUT_LEN)?;
        let qpn = cmd.get(QP_QPN) as u32;
        if self.qps.remove(&qpn).is_none() {
            return Err(refuse("DESTROY_QP")(QueueError::NoQp { qpn }));
        }
        Ok(out)
    }

    pub(super) fn query_qp(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        cmd.lengths(qp::QP_SHORT_IN_LEN, qp::QUERY_QP_OUT_LEN)?;
        let qpn = cmd.get(QP_QPN) as u32;
        let q = self
            .qps
            .get(&qpn)
            .ok_or_else(|| refuse("QUERY_QP")(QueueError::NoQp { qpn }))?;
        let len = qp::QUERY_QP_OUT_LEN + 8 * q.buf.pas.len();
        let mut out = vec![0u8; len.min(cmd.outlen.max(qp::QUERY_QP_OUT_LEN))];
        let mut s = |f, v: u64| set(&mut out, qp::in_msg(f), v);
        s(qpc::STATE, u8::from(q.state).into());
        s(qpc::ST, qp::QP_ST_RC.into());
        s(qpc::PM_STATE, qp::QP_PM_MIGRATED.into());
        s(qpc::PD, q.pd.into());
        s(qpc::LOG_MSG_MAX, q.log_msg_max.into());
        s(qpc::LOG_RQ_SIZE, q.log_rq_size.into());
        s(qpc::LOG_RQ_STRIDE, q.log_rq_stride.into());
        s(qpc::NO_SQ, (!q.has_sq).into());
        s(qpc::LOG_SQ_SIZE, q.log_sq_size.into());
        s(qpc::UAR_PAGE, q.uar.into());
        s(qpc::LOG_PAGE_SIZE, q.buf.log_page_size.into());
        s(qpc::CQN_SND, q.cqn_snd.into());
        s(qpc::CQN_RCV, q.cqn_rcv.into());
        s(qpc::RRE, q.rre.into());
        s(qpc::RWE, q.rwe.into());
        s(qpc::DBR_ADDR, q.dbr);
        let rq_type = if q.has_rq {
            qp::RQ_TYPE_REGULAR
        } else {
            qp::RQ_TYPE_ZERO_SIZE
        };
        s(qpc::RQ_TYPE, rq_type.into());
        s(qpc::HW_SQ_WQEBB_COUNTER, q.sq_ci.into());
        s(qpc::HW_RQ_COUNTER, q.rq_ci.into());
        if let Some(p) = q.peer {
            s(qpc::REMOTE_QPN, p.qpn.into());
            let mut p2 = |f, v: u64| set(&mut out, qp::path_in_msg(f), v);
            let (hi, lo) = qp::gid_of(p.vhca_id);
            p2(ads::GRH, 1);
            p2(ads::RLID, qp::lid_of(p.vhca_id).into());
            p2(ads::RGID_HI, hi);
            p2(ads::RGID_LO, lo);
        }
        for (i, &pa) in q.buf.pas.iter().enumerate() {
            if let Some(f) = QP_PAS.nth(i) {
                set(&mut out, f, pa);
            }
        }
        Ok(out)
    }

    /// RST2INIT, INIT2RTR, RTR2RTS, 2ERR, 2RST.
    pub(super) fn modify_qp(
        &mut self,
        env: &dyn Env,
        op: mlx5_prm::Opcode,
        cmd: &Cmd<'_>,
    ) -> CmdResult {
        use mlx5_prm::Opcode as O;
        let (in_len, out_len, name, from, to): (_, _, &'static str, &[QpState], QpState) = match op
        {
            O::Rst2InitQp => (
                qp::MODIFY_QP_IN_LEN,
                qp::MODIFY_QP_OUT_LEN,
                "RST2INIT_QP",
                &[QpState::Rst],
                QpState::Init,
            ),
            O::Init2RtrQp => (
                qp::MODIFY_QP_IN_LEN,
                qp::MODIFY_QP_OUT_LEN,
                "INIT2RTR_QP",
                &[QpState::Init],
                QpState::Rtr,
            ),
            O::Rtr2RtsQp => (
                qp::MODIFY_QP_IN_LEN,
                qp::MODIFY_QP_OUT_LEN,
                "RTR2RTS_QP",
                &[QpState::Rtr],
                QpState::Rts,
            ),
            O::Qp2ErrQp => (
                qp::QP_SHORT_IN_LEN,
                qp::QP_SHORT_OUT_LEN,
                "2ERR_QP",
                QpState::ALL,
                QpState::Err,
            ),
            _ => (
                qp::QP_SHORT_IN_LEN,
                qp::QP_SHORT_OUT_LEN,
                "2RST_QP",
                QpState::ALL,
                QpState::Rst,
            ),
        };
        let out = cmd.lengths(in_len, out_len)?;
        let r = refuse(name);
        let qpn = cmd.get(QP_QPN) as u32;
        let own = env.id().vhca_id;
        let q = self
            .qps
            .get_mut(&qpn)
            .ok_or_else(|| r(QueueError::NoQp { qpn }))?;
        if !from.contains(&q.state) {
            let needed = match from {
                [QpState::Rst] => "RST",
                [QpState::Init] => "INIT",
                _ => "RTR",
            };
            return Err(r(QueueError::QpState {
                qpn,
                state: q.state,
                cmd: name,
                needed,
            }));
        }
        let g = |f| cmd.get(qp::in_msg(f));
        match op {
            O::Rst2InitQp => {
                q.rre = g(qpc::RRE) != 0;
                q.rwe = g(qpc::RWE) != 0;
            }
            O::Init2RtrQp => {
                let p = |f| cmd.get(qp::path_in_msg(f));
                let grh = p(ads::GRH) != 0;
                let rlid = p(ads::RLID) as u16;
                let vhca = if p(ads::FL) != 0 {
                    Some(own)
                } else if grh {
                    qp::vhca_of_gid(p(ads::RGID_HI), p(ads::RGID_LO))
                } else {
                    qp::vhca_of_lid(rlid)
                };
                let vhca_id = vhca.ok_or_else(|| r(QueueError::BadPath { grh, rlid }))?;
                let log_msg_max = g(qpc::LOG_MSG_MAX);
                if log_msg_max != 0 {
                    too_big("log_msg_max", log_msg_max, LOG_MAX_MSG).map_err(&r)?;
                    q.log_msg_max = log_msg_max as u8;
                }
                q.peer = Some(QpPeer {
                    vhca_id,
                    qpn: g(qpc::REMOTE_QPN) as u32,
                });
                // INIT2RTR may (re)state the remote access bits (opt_param_mask).
                if g(qpc::RRE) != 0 {
                    q.rre = true;
                }
                if g(qpc::RWE) != 0 {
                    q.rwe = true;
                }
            }
            O::Qp2RstQp => {
                q.peer = None;
                q.sq_ci = 0;
                q.rq_ci = 0;
                q.rre = false;
                q.rwe = false;
            }
            _ => {}
        }
        let was = q.state;
        q.state = to;
        tracing::debug!(qpn, from = %was, to = %q.state, "QP state");
        if to == QpState::Err {
            // The engine flushes what is outstanding, as hardware does in ERR.
            env.dma_kick(qpn);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{syndrome, EqState};
    use super::*;
    use mlx5_prm::ifc::get;
    use mlx5_prm::Opcode;

    const MEM: u64 = 0x100_0000;

    /// An initialized VF with UAR 3, PD 1, EQ 1 and 64 KiB of guest memory at MEM.
    fn bench() -> Bench {
        let mut b = Bench::vf();
        b.bring_up();
        ok(&b.simple(Opcode::AllocUar));
        ok(&b.simple(Opcode::AllocPd));
        b.fw.eqs.insert(
            1,
            EqState {
                eqn: 1,
                uar: 3,
                intr: 0,
                log_size: 6,
                page_size: 4096,
                pas: vec![MEM],
                event_bitmask: [0; 4],
                pi: 0,
                written: 0,
                ci: 0,
                armed: false,
            },
        );
        b.map(MEM, 0x10000);
        b
    }

    fn create_cq(
        b: &mut Bench,
        log_size: u64,
        edit: impl FnOnce(&mut [u8]),
    ) -> crate::firmware::Reply {
        let pages = ((1u64 << log_size) * 64).div_ceil(4096) as usize;
        let len = cq::create_cq_in_len(pages).unwrap();
        b.run(Opcode::CreateCq, 0, len, 16, |m| {
            set(m, cq::in_msg(cqc::LOG_CQ_SIZE), log_size);
            set(m, cq::in_msg(cqc::UAR_PAGE), 3);
            set(m, cq::in_msg(cqc::C_EQN), 1);
            set(m, cq::in_msg(cqc::DBR_ADDR), MEM + 0x8000);
            for i in 0..pages {
                set(m, CQ_PAS.nth(i).unwrap(), MEM + 0x1000 * (1 + i as u64));
            }
            edit(m)
        })
    }

    fn create_qp(b: &mut Bench, cqn: u32, edit: impl FnOnce(&mut [u8])) -> crate::firmware::Reply {
        // RQ: 4 x 32 bytes; SQ: 8 x 64 bytes: one page.
        let len = qp::create_qp_in_len(1).unwrap();
        b.run(Opcode::CreateQp, 0, len, 16, |m| {
            set(m, qp::in_msg(qpc::PM_STATE), u64::from(qp::QP_PM_MIGRATED));
            set(m, qp::in_msg(qpc::PD), 1);
            set(m, qp::in_msg(qpc::UAR_PAGE), 3);
            set(m, qp::in_msg(qpc::LOG_RQ_SIZE), 2);
            set(m, qp::in_msg(qpc::LOG_RQ_STRIDE), 1);
            set(m, qp::in_msg(qpc::LOG_SQ_SIZE), 3);
            set(m, qp::in_msg(qpc::LOG_MSG_MAX), 20);
            set(m, qp::in_msg(qpc::CQN_SND), cqn.into());
            set(m, qp::in_msg(qpc::CQN_RCV), cqn.into());
            set(m, qp::in_msg(qpc::DBR_ADDR), MEM + 0x8040);
            set(m, QP_PAS.nth(0).unwrap(), MEM + 0x4000);
            edit(m)
        })
    }

    fn modify(
        b: &mut Bench,
        op: Opcode,
        qpn: u32,
        edit: impl FnOnce(&mut [u8]),
    ) -> crate::firmware::Reply {
        let len = match op {
            Opcode::Qp2ErrQp | Opcode::Qp2RstQp => qp::QP_SHORT_IN_LEN,
            _ => qp::MODIFY_QP_IN_LEN,
        };
        b.run(op, 0, len, 16, |m| {
            set(m, QP_QPN, qpn.into());
            edit(m)
        })
    }

    #[test]
    fn cq_is_created_queried_and_destroyed_with_its_context() {
        let mut b = bench();
        let r = create_cq(&mut b, 6, |_| {});
        ok(&r);
        let cqn = get(&r.out, CQ_CQN) as u32;
        assert_eq!(cqn, 1);
        let q = b.run(Opcode::QueryCq, 0, 16, 0x200, |m| {
            set(m, CQ_CQN, cqn.into())
        });
        ok(&q);
        assert_eq!(get(&q.out, cq::in_msg(cqc::LOG_CQ_SIZE)), 6);
        assert_eq!(get(&q.out, cq::in_msg(cqc::DBR_ADDR)), MEM + 0x8000);
        assert_eq!(get(&q.out, CQ_PAS.nth(0).unwrap()), MEM + 0x1000);
        assert_eq!(b.fw.object_counts().cqs, 1);
        ok(&b.run(Opcode::DestroyCq, 0, 16, 16, |m| set(m, CQ_CQN, cqn.into())));
        fails(
            &b.run(Opcode::DestroyCq, 0, 16, 16, |m| set(m, CQ_CQN, cqn.into())),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
    }

    #[test]
    fn create_cq_needs_a_completion_eq_and_the_eq_outlives_its_cqs() {
        use mlx5_prm::cmd::eq::{DESTROY_EQ_IN_EQ_NUMBER, EVENT_TYPE_CMD};
        let mut b = bench();
        // EQ 2 takes command events: no CQ may report to it.
        let mut cmd_eq = b.fw.eqs[&1].clone();
        cmd_eq.eqn = 2;
        cmd_eq.event_bitmask[0] = 1 << EVENT_TYPE_CMD;
        b.fw.eqs.insert(2, cmd_eq);
        let r = create_cq(&mut b, 6, |m| set(m, cq::in_msg(cqc::C_EQN), 2));
        fails(&r, CmdStatus::BadParamErr, syndrome::NOT_COMPLETION_EQ);
        let r = create_cq(&mut b, 6, |_| {});
        ok(&r);
        let cqn = get(&r.out, CQ_CQN) as u32;
        // The CQ's EQ cannot go first.
        let destroy_eq = |b: &mut Bench| {
            b.run(Opcode::DestroyEq, 0, 16, 16, |m| {
                set(m, DESTROY_EQ_IN_EQ_NUMBER, 1)
            })
        };
        fails(&destroy_eq(&mut b), CmdStatus::ResBusy, syndrome::BUSY);
        ok(&b.run(Opcode::DestroyCq, 0, 16, 16, |m| set(m, CQ_CQN, cqn.into())));
        ok(&destroy_eq(&mut b));
    }

    #[test]
    fn uar_cq_doorbell_arms_reports_st_and_refuses_bad_writes() {
        use crate::firmware::{UarAction, UarRefusal};
        use mlx5_prm::cmd::cq::{
            cq_arm_word, CqArmCmd, CQC_ST_ARMED, CQC_ST_FIRED, CQ_DOORBELL_CQN_OFFSET,
            CQ_DOORBELL_OFFSET,
        };
        let mut b = bench();
        let cqn = get(&create_cq(&mut b, 6, |_| {}).out, CQ_CQN) as u32;
        let st = |b: &mut Bench| {
            let q = b.run(Opcode::QueryCq, 0, 16, 0x200, |m| {
                set(m, CQ_CQN, cqn.into())
            });
            get(&q.out, cq::in_msg(cqc::ST)) as u8
        };
        assert_eq!(st(&mut b), 0);
        // Arm word, then cqn word: armed, nothing pending.
        let arm = cq_arm_word(0, CqArmCmd::Next, 0);
        assert_eq!(b.fw.uar_write(3, CQ_DOORBELL_OFFSET, arm), None);
        assert_eq!(b.fw.uar_write(3, CQ_DOORBELL_CQN_OFFSET, cqn), None);
        assert_eq!(st(&mut b), CQC_ST_ARMED);
        // A CQE lands: the arm fires towards EQ 1.
        assert_eq!(b.fw.cq_mut(cqn).unwrap().cqe_written(0, false), Some(1));
        assert_eq!(st(&mut b), CQC_ST_FIRED);
        // Re-armed with the next number at ci 0: CQE 0 is pending, fires at once.
        b.fw.uar_write(3, CQ_DOORBELL_OFFSET, cq_arm_word(1, CqArmCmd::Next, 0));
        assert_eq!(
            b.fw.uar_write(3, CQ_DOORBELL_CQN_OFFSET, cqn),
            Some(UarAction::CqEvent { eqn: 1, cqn })
        );
        assert_eq!(b.fw.uar_log().total(), 0);
        // Bad writes change nothing and are recorded.
        let bad = [
            (
                3,
                CQ_DOORBELL_CQN_OFFSET,
                cqn,
                UarRefusal::CqnWithoutArm { value: cqn },
            ),
            (9, CQ_DOORBELL_OFFSET, arm, UarRefusal::NoUar { page: 9 }),
            (3, 0x10, 0, UarRefusal::NoRegister { offset: 0x10 }),
        ];
        for (page, off, v, why) in bad {
            assert_eq!(b.fw.uar_write(page, off, v), None);
            assert_eq!(b.fw.uar_log().recent().last().unwrap().why, why);
        }
        for (word, cqn_word, why) in [
            (
                0xc000_0000,
                cqn,
                UarRefusal::ArmReserved { word: 0xc000_0000 },
            ),
            (
                0x0200_0000,
                cqn,
                UarRefusal::ArmCmd {
                    word: 0x0200_0000,
                    cmd: 2,
                },
            ),
            (
                0x2000_0000,
                0x100_0000 | cqn,
                UarRefusal::CqnReserved {
                    value: 0x100_0000 | cqn,
                },
            ),
            (0x2000_0000, 77, UarRefusal::NoCq { cqn: 77, page: 3 }),
        ] {
            b.fw.uar_write(3, CQ_DOORBELL_OFFSET, word);
            assert_eq!(b.fw.uar_write(3, CQ_DOORBELL_CQN_OFFSET, cqn_word), None);
            assert_eq!(b.fw.uar_log().recent().last().unwrap().why, why);
        }
        assert_eq!(b.fw.uar_log().total(), 7);
        assert_eq!(st(&mut b), CQC_ST_FIRED, "no bad write armed the CQ");
    }

    #[test]
    fn create_cq_refuses_bad_contexts_with_status_and_syndrome() {
        let mut b = bench();
        let bad = |b: &mut Bench, f: Field, v: u64| create_cq(b, 6, |m| set(m, cq::in_msg(f), v));
        fails(
            &bad(&mut b, cqc::CQE_SZ, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &bad(&mut b, cqc::CQE_COMP_EN, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &bad(&mut b, cqc::UAR_PAGE, 9),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
        fails(
            &bad(&mut b, cqc::C_EQN, 5),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
        fails(
            &bad(&mut b, cqc::DBR_ADDR, 0),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &bad(&mut b, cqc::DBR_ADDR, 0x7000_0000),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create_cq(&mut b, 6, |m| set(m, CQ_PAS.nth(0).unwrap(), 0x7000_0000)),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create_cq(&mut b, 6, |m| set(m, CQ_PAS.nth(0).unwrap(), MEM + 0x10)),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create_cq(&mut b, 17, |_| {}),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        // The PAS list the ring needs is missing from the input.
        let r = b.run(Opcode::CreateCq, 0, cq::CREATE_CQ_IN_LEN, 16, |m| {
            set(m, cq::in_msg(cqc::LOG_CQ_SIZE), 6);
        });
        fails(&r, CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT);
        assert_eq!(b.fw.object_counts().cqs, 0, "nothing half-created");
    }

    #[test]
    fn qp_walks_its_states_and_refuses_wrong_transitions() {
        let mut b = bench();
        let cqn = get(&create_cq(&mut b, 6, |_| {}).out, CQ_CQN) as u32;
        let r = create_qp(&mut b, cqn, |_| {});
        ok(&r);
        let qpn = get(&r.out, QP_QPN) as u32;
        assert_eq!(qpn, FIRST_QPN);
        assert_eq!(b.fw.qp(qpn).unwrap().state, QpState::Rst);
        fails(
            &modify(&mut b, Opcode::Init2RtrQp, qpn, |_| {}),
            CmdStatus::BadQpStateErr,
            syndrome::WRONG_STATE,
        );
        ok(&modify(&mut b, Opcode::Rst2InitQp, qpn, |m| {
            set(m, qp::in_msg(qpc::RWE), 1);
        }));
        // A path that names no function.
        fails(
            &modify(&mut b, Opcode::Init2RtrQp, qpn, |_| {}),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        ok(&modify(&mut b, Opcode::Init2RtrQp, qpn, |m| {
            set(m, qp::in_msg(qpc::REMOTE_QPN), 7);
            set(m, qp::path_in_msg(ads::RLID), u64::from(qp::lid_of(4)));
        }));
        let q = b.fw.qp(qpn).unwrap();
        assert_eq!(q.peer, Some(QpPeer { vhca_id: 4, qpn: 7 }));
        assert!(q.rwe && !q.rre);
        ok(&modify(&mut b, Opcode::Rtr2RtsQp, qpn, |_| {}));
        let out = b.run(Opcode::QueryQp, 0, 16, 0x200, |m| {
            set(m, QP_QPN, qpn.into())
        });
        ok(&out);
        assert_eq!(
            get(&out.out, qp::in_msg(qpc::STATE)),
            u64::from(u8::from(QpState::Rts))
        );
        assert_eq!(get(&out.out, qp::in_msg(qpc::REMOTE_QPN)), 7);
        assert_eq!(
            get(&out.out, qp::path_in_msg(ads::RLID)),
            u64::from(qp::lid_of(4))
        );
        fails(
            &b.run(Opcode::DestroyCq, 0, 16, 16, |m| set(m, CQ_CQN, cqn.into())),
            CmdStatus::ResBusy,
            syndrome::BUSY,
        );
        ok(&modify(&mut b, Opcode::Qp2ErrQp, qpn, |_| {}));
        assert_eq!(b.fw.qp(qpn).unwrap().state, QpState::Err);
        b.fw.qp_mut(qpn).unwrap().sq_ci = 5;
        ok(&modify(&mut b, Opcode::Qp2RstQp, qpn, |_| {}));
        let q = b.fw.qp(qpn).unwrap();
        assert_eq!((q.state, q.sq_ci, q.peer), (QpState::Rst, 0, None));
        // Force loopback names this function whatever the path says.
        ok(&modify(&mut b, Opcode::Rst2InitQp, qpn, |_| {}));
        ok(&modify(&mut b, Opcode::Init2RtrQp, qpn, |m| {
            set(m, qp::in_msg(qpc::REMOTE_QPN), qpn.into());
            set(m, qp::path_in_msg(ads::FL), 1);
        }));
        assert_eq!(b.fw.qp(qpn).unwrap().peer.unwrap().vhca_id, b.id.vhca_id);
        ok(&b.run(Opcode::DestroyQp, 0, 16, 16, |m| set(m, QP_QPN, qpn.into())));
        ok(&b.run(Opcode::DestroyCq, 0, 16, 16, |m| set(m, CQ_CQN, cqn.into())));
        assert_eq!(b.fw.object_counts().qps, 0);
    }

    #[test]
    fn create_qp_refuses_bad_contexts_with_status_and_syndrome() {
        let mut b = bench();
        let cqn = get(&create_cq(&mut b, 6, |_| {}).out, CQ_CQN) as u32;
        let with =
            |b: &mut Bench, f: Field, v: u64| create_qp(b, cqn, |m| set(m, qp::in_msg(f), v));
        fails(
            &with(&mut b, qpc::ST, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &with(&mut b, qpc::PD, 9),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
        fails(
            &with(&mut b, qpc::CQN_SND, 77),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
        fails(
            &with(&mut b, qpc::RQ_TYPE, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &with(&mut b, qpc::LOG_RQ_STRIDE, 7),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &with(&mut b, qpc::DBR_ADDR, MEM + 4),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create_qp(&mut b, cqn, |m| set(m, qp::CREATE_QP_IN_WQ_UMEM_VALID, 1)),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        // log_sq_size 7: two pages, one given.
        fails(
            &with(&mut b, qpc::LOG_SQ_SIZE, 7),
            CmdStatus::BadInpLenErr,
            syndrome::SHORT_INPUT,
        );
        assert_eq!(b.fw.object_counts().qps, 0);
        fails(
            &modify(&mut b, Opcode::Rst2InitQp, 2, |_| {}),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
    }

    #[test]
    fn ring_runs_follow_the_pages() {
        let r = Ring {
            log_page_size: 0,
            pas: vec![0x10000, 0x11000, 0x30000],
        };
        assert_eq!(r.runs(0xff0, 0x20), Some(vec![(0x10ff0, 0x20)]));
        assert_eq!(
            r.runs(0x1ff0, 0x20),
            Some(vec![(0x11ff0, 0x10), (0x30000, 0x10)])
        );
        assert_eq!(r.runs(0x2ff0, 0x20), None);
        assert_eq!(r.runs(u64::MAX, 2), None);
    }
}
