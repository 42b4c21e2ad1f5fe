//! Posting work to a function's DMA engine and polling its completions: RC queue pairs
//! and completion queues as a verbs provider drives them on mlx5 (`mlx5_ib` / rdma-core
//! `providers/mlx5`), for tests, benches and race scenarios.
//!
//! [`DmaQueues::new`] creates a completion EQ on the function (CQs need one); then
//! [`DmaQueues::create_cq`], [`DmaQueues::create_qp`], [`DmaQueues::connect`] (RST2INIT,
//! INIT2RTR naming the peer function by its LID, RTR2RTS), [`DmaQueues::post_send`] /
//! [`DmaQueues::post_recv`], [`DmaQueues::ring`] (doorbell record, then the UAR send
//! doorbell) and [`DmaQueues::poll`]. Data buffers are the caller's: register them with
//! [`crate::hca::Hca::create_mkey`] and name them by key and address in a [`Sge`].
//!
//! Completions are polled ([`DmaQueues::poll`], [`DmaQueues::poll_wait`]) or waited for
//! by event: [`DmaQueues::enable_events`] gives the completion EQ's MSI-X vector an
//! eventfd and arms the EQ; [`DmaQueues::arm_cq`] arms a CQ (its doorbell record's arm
//! word, then the UAR CQ doorbell at 0x20, as `mlx5_cq_arm` does);
//! [`DmaQueues::take_events`] reads the completion EQEs and re-arms the EQ;
//! [`DmaQueues::wait_event`] does all of it around a wait on the eventfd.
//!
//! Work queue and CQ buffers, and the doorbell records, are pages of the function's DMA
//! arena.

use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mlx5_prm::cmd::cq::{
    self, cq_arm_word, cqc, CqArmCmd, CQ_CQN, CQ_DBR_ARM_OFFSET, CQ_DOORBELL_OFFSET, CQ_PAS,
};
use mlx5_prm::cmd::eq::{EQE_COMP_CQN, EVENT_TYPE_COMP};
use mlx5_prm::cmd::qp::{self, ads, qpc, QpState, QP_PAS, QP_QPN, SEND_WQE_BB};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::wqe::{
    cqe_is_sw_owned, CqeOpcode, CqeSyndrome, CtrlSeg, DataSeg, ErrCqe, RaddrSeg, WqeOpcode,
    CQE_INIT_OP_OWN, CQE_LEN, CQE_OP_OWN_OFFSET, DS_PER_BB, INVALID_LKEY, UAR_BF_OFFSET, WQE_DS,
};
use mlx5_prm::Opcode;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::{FromBytes, IntoBytes};

use crate::cmdif::{new_input, ArenaError, CmdError, EqError, EventQueue, BAR0};
use crate::hca::{Hca, HcaError};

/// Bytes of an arena page.
const PAGE: u64 = 4096;
/// Log2 entries of the completion EQ.
const COMP_EQ_LOG_SIZE: u32 = 6;
/// MSI-X vector of the completion EQ (the command EQ, if any, has 0).
const COMP_EQ_VECTOR: u16 = 1;
/// `log_bf_reg_size` of this device: doorbell registers alternate at this stride.
const BF_REG_SIZE: u64 = 512;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaQueueError {
    #[error("{what}: {source}")]
    Cmd {
        what: &'static str,
        #[source]
        source: CmdError,
    },
    #[error("DMA arena: {0}")]
    Arena(#[from] ArenaError),
    #[error("completion EQ: {0}")]
    Eq(#[from] EqError),
    #[error("out of DMA arena pages ({need} needed); raise the arena size")]
    NoPages { need: usize },
    #[error("the function is not up (no UAR or PD); bring it up first")]
    NotUp,
    #[error(
        "the send queue has {free} free basic blocks, the WQE needs {need}; poll completions first"
    )]
    SqFull { free: u32, need: u32 },
    #[error("the receive queue is full ({entries} WQEs posted); poll completions first")]
    RqFull { entries: u32 },
    #[error("a WQE takes at most {max} data segments, {got} given")]
    TooManySges { got: usize, max: usize },
    #[error("vfio-user doorbell write: {0}")]
    Doorbell(String),
    #[error("no completion on CQ {cqn:#x} within {waited:?}")]
    Timeout { cqn: u32, waited: Duration },
    #[error("completion events: {0}")]
    Irq(#[from] HcaError),
    #[error("completion events are not enabled; call DmaQueues::enable_events first")]
    NoEvents,
    #[error("waiting on the completion vector's eventfd: {0}")]
    Wait(std::io::Error),
}

fn cmd(what: &'static str) -> impl FnOnce(CmdError) -> DmaQueueError {
    move |source| DmaQueueError::Cmd { what, source }
}

/// A buffer of whole arena pages.
#[derive(Debug)]
struct Pages(Vec<u64>);

impl Pages {
    fn alloc(hca: &Hca, bytes: u64) -> Result<Self, DmaQueueError> {
        let need = bytes.div_ceil(PAGE).max(1) as usize;
        let arena = hca.cmd().arena();
        let mut v = Vec::with_capacity(need);
        for _ in 0..need {
            match arena.alloc_page() {
                Some(p) => v.push(p),
                None => {
                    for p in v {
                        let _ = arena.free_page(p);
                    }
                    return Err(DmaQueueError::NoPages { need });
                }
            }
        }
        for &p in &v {
            arena.fill(p, PAGE as usize, 0)?;
        }
        Ok(Pages(v))
    }

    fn iova(&self, off: u64) -> u64 {
        self.0[(off / PAGE) as usize] + off % PAGE
    }

    fn free(self, hca: &Hca) {
        for p in self.0 {
            let _ = hca.cmd().arena().free_page(p);
        }
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    pub cqn: u32,
    log_size: u8,
    ring: Pages,
    dbr: Pages,
    ci: u32,
    /// Arm sequence number: advanced on every completion event of this CQ, carried by
    /// every arm (`cq->arm_sn` of mlx5_core).
    arm_sn: u32,
}

impl Cq {
    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        1 << self.log_size
    }

    /// The consumer index (CQEs polled, 24 bits).
    pub fn ci(&self) -> u32 {
        self.ci
    }

    /// The arm sequence number the next arm carries.
    pub fn arm_sn(&self) -> u32 {
        self.arm_sn
    }

    /// A completion event of this CQ was taken: the next arm carries the next number.
    pub fn event(&mut self) {
        self.arm_sn = self.arm_sn.wrapping_add(1);
    }
}

/// An EQE of the completion EQ, as [`DmaQueues::take_events`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A completion event (type 0x00) of CQ `cqn`.
    Completion { cqn: u32 },
    /// Any other event type.
    Other { event_type: u8 },
}

/// The interrupt side of the completion EQ, once [`DmaQueues::enable_events`] ran.
struct Events {
    eventfd: EventFd,
    /// Completion events read for CQs other than the one being waited for.
    unclaimed: Vec<u32>,
}

/// Sizes of a new QP (log2 of entries; the receive WQE stride as log2 of 16-byte
/// segments: stride 2 = 4 scatter entries).
#[derive(Debug, Clone, Copy)]
pub struct QpSizes {
    pub log_sq: u8,
    pub log_rq: u8,
    pub log_rq_stride: u8,
    pub log_msg_max: u8,
    /// No send queue (`no_sq`): `log_sq` is ignored.
    pub no_sq: bool,
    /// A zero-size receive queue (`rq_type` ZERO_LEN): `log_rq` is ignored. With
    /// `no_sq` the QP has no buffer and no doorbell record at all (a page tracker's
    /// fw QP, on whose behalf the firmware sends).
    pub zero_rq: bool,
}

impl QpSizes {
    fn rq_bytes(&self) -> u64 {
        if self.zero_rq {
            0
        } else {
            (1u64 << self.log_rq) << (4 + self.log_rq_stride)
        }
    }

    fn sq_bytes(&self) -> u64 {
        if self.no_sq {
            0
        } else {
            (1u64 << self.log_sq) * SEND_WQE_BB as u64
        }
    }
}

impl Default for QpSizes {
    fn default() -> Self {
        QpSizes {
            log_sq: 6,
            log_rq: 6,
            log_rq_stride: 2,
            log_msg_max: 30,
            no_sq: false,
            zero_rq: false,
        }
    }
}

/// An RC queue pair.
#[derive(Debug)]
pub struct Qp {
    pub qpn: u32,
    sizes: QpSizes,
    buf: Pages,
    dbr: Pages,
    /// Send basic blocks posted (the send counter).
    sq_pi: u16,
    /// Send basic blocks known complete (from CQEs), for the room check.
    sq_done: u16,
    /// Receive WQEs posted.
    rq_pi: u16,
    /// Receive WQEs known complete.
    rq_done: u16,
    /// Which doorbell register the next doorbell uses (they alternate).
    bf_toggle: bool,
    /// Basic blocks of each posted WQE by its index, to release room on its CQE.
    wqe_bbs: Vec<u8>,
}

impl Qp {
    fn rq_bytes(&self) -> u64 {
        self.sizes.rq_bytes()
    }

    fn sq_entries(&self) -> u32 {
        if self.sizes.no_sq {
            0
        } else {
            1 << self.sizes.log_sq
        }
    }

    /// The send counter (basic blocks posted).
    pub fn sq_pi(&self) -> u16 {
        self.sq_pi
    }
}

/// A data segment: `len` bytes at `addr` of the mkey `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub lkey: u32,
    pub addr: u64,
    pub len: u32,
}

/// A send work request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendWr {
    Nop,
    /// Writes the local segments to `raddr` of the peer's mkey `rkey`.
    RdmaWrite {
        sges: Vec<Sge>,
        raddr: u64,
        rkey: u32,
        imm: Option<u32>,
    },
    /// Reads from `raddr` of the peer's mkey `rkey` into the local segments.
    RdmaRead {
        sges: Vec<Sge>,
        raddr: u64,
        rkey: u32,
    },
    /// Sends the local segments into the peer's next receive WQE.
    Send {
        sges: Vec<Sge>,
        imm: Option<u32>,
    },
}

/// What a CQE reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub opcode: CqeOpcode,
    pub qpn: u32,
    pub wqe_counter: u16,
    pub byte_cnt: u32,
    pub imm: u32,
    /// Error CQEs: the syndrome and the device's reason within it.
    pub syndrome: Option<CqeSyndrome>,
    pub vendor_err: u8,
    /// The raw syndrome byte of an error CQE (for one this crate does not name).
    pub raw_syndrome: u8,
}

impl Completion {
    /// Whether the CQE reports success.
    pub fn is_ok(&self) -> bool {
        !matches!(self.opcode, CqeOpcode::ReqErr | CqeOpcode::RespErr)
    }
}

/// The peer of a QP: the QP `qpn` on function `vhca_id` (this one with `loopback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddr {
    pub vhca_id: u16,
    pub qpn: u32,
    /// Sets `fl` (force loopback): the peer is on this function.
    pub loopback: bool,
}

/// The DMA queues of one function: its completion EQ, UAR and PD.
pub struct DmaQueues<'h> {
    hca: &'h Hca,
    eq: Mutex<Option<EventQueue>>,
    eqn: u8,
    uar: u32,
    pd: u32,
    events: Mutex<Option<Events>>,
    /// QPs and CQs created here and not destroyed: dropping the queues destroys them
    /// before the EQ (which the firmware keeps while a CQ names it).
    live: Mutex<Live>,
}

#[derive(Debug, Default)]
struct Live {
    qps: std::collections::BTreeSet<u32>,
    cqs: std::collections::BTreeSet<u32>,
}

impl<'h> DmaQueues<'h> {
    /// Creates the completion EQ on `hca`, which must be up.
    pub fn new(hca: &'h Hca) -> Result<Self, DmaQueueError> {
        let pd = hca.info().ok_or(DmaQueueError::NotUp)?.pd;
        Self::with_pd(hca, pd)
    }

    /// [`DmaQueues::new`] whose QPs go into `pd` (a PD the caller allocated, as mlx5vf
    /// allocates one for its page tracker).
    pub fn with_pd(hca: &'h Hca, pd: u32) -> Result<Self, DmaQueueError> {
        let info = hca.info().ok_or(DmaQueueError::NotUp)?;
        let mut eq = EventQueue::alloc(
            hca.cmd().arena(),
            COMP_EQ_LOG_SIZE,
            info.uar,
            COMP_EQ_VECTOR,
        )?;
        let out = hca
            .cmd()
            .exec(&eq.create_input(0), mlx5_prm::cmd::eq::CREATE_EQ_OUT_LEN)
            .map_err(cmd("create completion EQ"));
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                eq.free(hca.cmd().arena());
                return Err(e);
            }
        };
        let eqn = get(&out, mlx5_prm::cmd::eq::CREATE_EQ_OUT_EQ_NUMBER) as u8;
        eq.set_eqn(eqn);
        Ok(DmaQueues {
            hca,
            eq: Mutex::new(Some(eq)),
            eqn,
            uar: info.uar,
            pd,
            events: Mutex::new(None),
            live: Mutex::new(Live::default()),
        })
    }

    /// The completion EQ's number (every CQ of these queues names it as `c_eqn`).
    pub fn eqn(&self) -> u8 {
        self.eqn
    }

    fn eq(&self) -> MutexGuard<'_, Option<EventQueue>> {
        self.eq.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn events(&self) -> MutexGuard<'_, Option<Events>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completion by event: the completion EQ's MSI-X vector gets an eventfd (MSI-X
    /// enabled, the vector unmasked) and the EQ is armed. Idempotent.
    pub fn enable_events(&self) -> Result<(), DmaQueueError> {
        let mut ev = self.events();
        if ev.is_some() {
            return Ok(());
        }
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(DmaQueueError::Wait)?;
        self.hca.attach_msix(COMP_EQ_VECTOR, &eventfd)?;
        self.arm_eq()?;
        *ev = Some(Events {
            eventfd,
            unclaimed: Vec::new(),
        });
        Ok(())
    }

    /// The EQ doorbell at UAR + 0x40: consumer index, and arm.
    fn arm_eq(&self) -> Result<(), DmaQueueError> {
        let (off, v) = match self.eq().as_ref() {
            Some(eq) => eq.doorbell(true),
            None => return Err(DmaQueueError::NoEvents),
        };
        self.uar_write(off, &v)
    }

    fn uar_write(&self, off: u64, bytes: &[u8]) -> Result<(), DmaQueueError> {
        self.hca
            .cmd()
            .client()
            .region_write(BAR0, off, bytes)
            .map_err(|e| DmaQueueError::Doorbell(e.to_string()))
    }

    /// Arms `c` for its next CQE (`solicited`: its next solicited or error CQE), as
    /// `mlx5_cq_arm` does: the arm word `arm_sn << 28 | cmd << 24 | ci` into the doorbell
    /// record's `arm_db`, then that word and the CQ number as one 8-byte write to the
    /// UAR CQ doorbell (0x20). CQEs already past the consumer index fire at once.
    pub fn arm_cq(&self, c: &Cq, solicited: bool) -> Result<(), DmaQueueError> {
        let cmd = if solicited {
            CqArmCmd::Solicited
        } else {
            CqArmCmd::Next
        };
        let word = cq_arm_word(c.arm_sn, cmd, c.ci);
        self.hca
            .cmd()
            .arena()
            .write(c.dbr.0[0] + CQ_DBR_ARM_OFFSET as u64, &word.to_be_bytes())?;
        let mut db = [0u8; 8];
        db[..4].copy_from_slice(&word.to_be_bytes());
        db[4..].copy_from_slice(&c.cqn.to_be_bytes());
        let off = u64::from(self.uar) * PAGE + u64::from(CQ_DOORBELL_OFFSET);
        self.uar_write(off, &db)
    }

    /// Interrupts delivered on the completion vector since the last call (the
    /// eventfd's counter, read and cleared; 0 if none).
    pub fn interrupts(&self) -> Result<u64, DmaQueueError> {
        let ev = self.events();
        let ev = ev.as_ref().ok_or(DmaQueueError::NoEvents)?;
        match ev.eventfd.read() {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(DmaQueueError::Wait(e)),
        }
    }

    /// Waits at most `timeout` for an interrupt on the completion vector; returns the
    /// interrupts counted (consumed), 0 if none came.
    pub fn wait_interrupt(&self, timeout: Duration) -> Result<u64, DmaQueueError> {
        let fd = {
            let ev = self.events();
            ev.as_ref()
                .ok_or(DmaQueueError::NoEvents)?
                .eventfd
                .as_raw_fd()
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `p` is one valid pollfd for the duration of the call; the eventfd it
        // names lives in `self.events` until `self` is dropped, which this borrow
        // outlasts.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(DmaQueueError::Wait(e));
        }
        if n == 0 {
            return Ok(0);
        }
        self.interrupts()
    }

    /// Reads the EQEs the device wrote on the completion EQ, then updates its consumer
    /// index and arms it again. Each completion event of a CQ in `cqs` advances its arm
    /// sequence number ([`Cq::event`]), as `mlx5_eq_comp_int` does; completion events
    /// of other CQs are returned all the same.
    pub fn take_events(&self, cqs: &mut [&mut Cq]) -> Result<Vec<Event>, DmaQueueError> {
        let arena = self.hca.cmd().arena();
        let mut doorbells = Vec::new();
        let eqes = {
            let mut eq = self.eq();
            let eq = eq.as_mut().ok_or(DmaQueueError::NoEvents)?;
            eq.drain(arena, |off, v| doorbells.push((off, v)))?
        };
        for (off, v) in doorbells {
            self.uar_write(off, &v)?;
        }
        let mut out = Vec::with_capacity(eqes.len());
        for e in eqes {
            let ev = if e.event_type() == EVENT_TYPE_COMP {
                let cqn = get(&e.bytes, EQE_COMP_CQN) as u32;
                if let Some(c) = cqs.iter_mut().find(|c| c.cqn == cqn) {
                    c.event();
                }
                Event::Completion { cqn }
            } else {
                Event::Other {
                    event_type: e.event_type(),
                }
            };
            out.push(ev);
        }
        self.arm_eq()?;
        Ok(out)
    }

    /// The next CQE of `c`, waiting by event: poll; if empty, arm `c` and wait (at most
    /// until `timeout` has passed in all) for the completion vector's interrupt, take
    /// the EQEs, poll again. Needs [`DmaQueues::enable_events`].
    pub fn wait_event(
        &self,
        c: &mut Cq,
        mut q: Option<&mut Qp>,
        timeout: Duration,
    ) -> Result<Completion, DmaQueueError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = self.poll(c, q.as_deref_mut())? {
                return Ok(done);
            }
            // An event taken earlier for this CQ: its arm is spent; re-arm with the
            // next number.
            let claimed = {
                let mut ev = self.events();
                let ev = ev.as_mut().ok_or(DmaQueueError::NoEvents)?;
                let before = ev.unclaimed.len();
                ev.unclaimed.retain(|&n| n != c.cqn);
                before - ev.unclaimed.len()
            };
            for _ in 0..claimed {
                c.event();
            }
            self.arm_cq(c, false)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DmaQueueError::Timeout {
                    cqn: c.cqn,
                    waited: timeout,
                });
            }
            self.wait_interrupt(left)?;
            let events = self.take_events(&mut [&mut *c])?;
            let mut ev = self.events();
            if let Some(ev) = ev.as_mut() {
                for e in events {
                    if let Event::Completion { cqn } = e {
                        if cqn != c.cqn {
                            ev.unclaimed.push(cqn);
                        }
                    }
                }
            }
        }
    }

    /// The function's PD (QPs are created in it; register data buffers with
    /// [`Hca::create_mkey`], which uses the same PD).
    pub fn pd(&self) -> u32 {
        self.pd
    }

    /// The function's `vhca_id`.
    pub fn vhca_id(&self) -> u16 {
        self.hca.info().map_or(0, |i| i.vhca_id)
    }

    /// CREATE_CQ of 2^`log_size` CQEs.
    pub fn create_cq(&self, log_size: u8) -> Result<Cq, DmaQueueError> {
        let ring = Pages::alloc(self.hca, (1u64 << log_size) * CQE_LEN as u64)?;
        let dbr = Pages::alloc(self.hca, 8)?;
        let arena = self.hca.cmd().arena();
        for i in 0..(1u64 << log_size) {
            arena.write(
                ring.iova(i * CQE_LEN as u64 + CQE_OP_OWN_OFFSET as u64),
                &[CQE_INIT_OP_OWN],
            )?;
        }
        let mut m = new_input(
            Opcode::CreateCq,
            0,
            cq::create_cq_in_len(ring.0.len()).unwrap_or(cq::CREATE_CQ_IN_LEN),
        );
        set(&mut m, cq::in_msg(cqc::LOG_CQ_SIZE), log_size.into());
        set(&mut m, cq::in_msg(cqc::UAR_PAGE), self.uar.into());
        set(&mut m, cq::in_msg(cqc::C_EQN), self.eqn.into());
        set(&mut m, cq::in_msg(cqc::DBR_ADDR), dbr.0[0]);
        for (i, &p) in ring.0.iter().enumerate() {
            if let Some(f) = CQ_PAS.nth(i) {
                set(&mut m, f, p);
            }
        }
        match self.hca.cmd().exec(&m, cq::CREATE_CQ_OUT_LEN) {
            Ok(out) => Ok(Cq {
                cqn: {
                    let cqn = get(&out, CQ_CQN) as u32;
                    self.live().cqs.insert(cqn);
                    cqn
                },
                log_size,
                ring,
                dbr,
                ci: 0,
                arm_sn: 0,
            }),
            Err(e) => {
                ring.free(self.hca);
                dbr.free(self.hca);
                Err(cmd("create CQ")(e))
            }
        }
    }

    /// DESTROY_CQ; its pages go back to the arena.
    pub fn destroy_cq(&self, c: Cq) -> Result<(), DmaQueueError> {
        self.destroy_cqn(c.cqn)?;
        c.ring.free(self.hca);
        c.dbr.free(self.hca);
        Ok(())
    }

    fn destroy_cqn(&self, cqn: u32) -> Result<(), DmaQueueError> {
        let mut m = new_input(Opcode::DestroyCq, 0, cq::DESTROY_CQ_IN_LEN);
        set(&mut m, CQ_CQN, cqn.into());
        self.hca
            .cmd()
            .exec(&m, cq::DESTROY_CQ_OUT_LEN)
            .map_err(cmd("destroy CQ"))?;
        self.live().cqs.remove(&cqn);
        Ok(())
    }

    fn destroy_qpn(&self, qpn: u32) -> Result<(), DmaQueueError> {
        let mut m = new_input(Opcode::DestroyQp, 0, qp::QP_SHORT_IN_LEN);
        set(&mut m, QP_QPN, qpn.into());
        self.hca
            .cmd()
            .exec(&m, qp::QP_SHORT_OUT_LEN)
            .map_err(cmd("destroy QP"))?;
        self.live().qps.remove(&qpn);
        Ok(())
    }

    /// CREATE_QP (RC, in the function's PD) with send completions on `scq` and
    /// receive completions on `rcq`.
    pub fn create_qp(&self, scq: &Cq, rcq: &Cq, sizes: QpSizes) -> Result<Qp, DmaQueueError> {
        let bytes = sizes.rq_bytes() + sizes.sq_bytes();
        let (buf, dbr) = if bytes == 0 {
            (Pages(Vec::new()), Pages(Vec::new()))
        } else {
            (Pages::alloc(self.hca, bytes)?, Pages::alloc(self.hca, 8)?)
        };
        let mut m = new_input(
            Opcode::CreateQp,
            0,
            qp::create_qp_in_len(buf.0.len()).unwrap_or(qp::CREATE_QP_IN_LEN),
        );
        let s = |m: &mut Vec<u8>, f, v: u64| set(m, qp::in_msg(f), v);
        s(&mut m, qpc::ST, qp::QP_ST_RC.into());
        s(&mut m, qpc::PM_STATE, qp::QP_PM_MIGRATED.into());
        s(&mut m, qpc::PD, self.pd.into());
        s(&mut m, qpc::UAR_PAGE, self.uar.into());
        s(&mut m, qpc::LOG_MSG_MAX, sizes.log_msg_max.into());
        s(&mut m, qpc::LOG_RQ_SIZE, sizes.log_rq.into());
        s(&mut m, qpc::LOG_RQ_STRIDE, sizes.log_rq_stride.into());
        s(&mut m, qpc::LOG_SQ_SIZE, sizes.log_sq.into());
        if sizes.no_sq {
            s(&mut m, qpc::NO_SQ, 1);
        } else {
            s(&mut m, qpc::CQN_SND, scq.cqn.into());
        }
        if sizes.zero_rq {
            s(&mut m, qpc::RQ_TYPE, qp::RQ_TYPE_ZERO_SIZE.into());
        } else {
            s(&mut m, qpc::CQN_RCV, rcq.cqn.into());
        }
        if let Some(&d) = dbr.0.first() {
            s(&mut m, qpc::DBR_ADDR, d);
        }
        for (i, &p) in buf.0.iter().enumerate() {
            if let Some(f) = QP_PAS.nth(i) {
                set(&mut m, f, p);
            }
        }
        match self.hca.cmd().exec(&m, qp::CREATE_QP_OUT_LEN) {
            Ok(out) => Ok(Qp {
                qpn: {
                    let qpn = get(&out, QP_QPN) as u32;
                    self.live().qps.insert(qpn);
                    qpn
                },
                sizes,
                buf,
                dbr,
                sq_pi: 0,
                sq_done: 0,
                rq_pi: 0,
                rq_done: 0,
                bf_toggle: false,
                wqe_bbs: vec![0; 1 << sizes.log_sq],
            }),
            Err(e) => {
                buf.free(self.hca);
                dbr.free(self.hca);
                Err(cmd("create QP")(e))
            }
        }
    }

    /// DESTROY_QP; its pages go back to the arena.
    pub fn destroy_qp(&self, q: Qp) -> Result<(), DmaQueueError> {
        self.destroy_qpn(q.qpn)?;
        q.buf.free(self.hca);
        q.dbr.free(self.hca);
        Ok(())
    }

    /// RST2INIT (remote read and write allowed), INIT2RTR to `peer` (by LID, or `fl`),
    /// RTR2RTS.
    pub fn connect(&self, q: &Qp, peer: QpAddr) -> Result<(), DmaQueueError> {
        self.modify(q.qpn, Opcode::Rst2InitQp, |m| {
            set(m, qp::in_msg(qpc::RRE), 1);
            set(m, qp::in_msg(qpc::RWE), 1);
            set(m, qp::path_in_msg(ads::VHCA_PORT_NUM), 1);
        })?;
        self.modify(q.qpn, Opcode::Init2RtrQp, |m| {
            set(m, qp::in_msg(qpc::MTU), 5);
            set(m, qp::in_msg(qpc::LOG_MSG_MAX), q.sizes.log_msg_max.into());
            set(m, qp::in_msg(qpc::REMOTE_QPN), peer.qpn.into());
            if peer.loopback {
                set(m, qp::path_in_msg(ads::FL), 1);
            } else {
                set(
                    m,
                    qp::path_in_msg(ads::RLID),
                    qp::lid_of(peer.vhca_id).into(),
                );
            }
        })?;
        self.modify(q.qpn, Opcode::Rtr2RtsQp, |m| {
            set(m, qp::in_msg(qpc::RETRY_COUNT), 7);
            set(m, qp::in_msg(qpc::RNR_RETRY), 7);
        })
    }

    /// A QP state command (RST2INIT, INIT2RTR, RTR2RTS, 2ERR, 2RST) with the context
    /// `edit` fills.
    pub fn modify(
        &self,
        qpn: u32,
        op: Opcode,
        edit: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), DmaQueueError> {
        let (len, out) = match op {
            Opcode::Qp2ErrQp | Opcode::Qp2RstQp => (qp::QP_SHORT_IN_LEN, qp::QP_SHORT_OUT_LEN),
            _ => (qp::MODIFY_QP_IN_LEN, qp::MODIFY_QP_OUT_LEN),
        };
        let mut m = new_input(op, 0, len);
        set(&mut m, QP_QPN, qpn.into());
        edit(&mut m);
        self.hca
            .cmd()
            .exec(&m, out)
            .map(drop)
            .map_err(cmd("modify QP"))
    }

    /// QUERY_QP: the QP's state and its device counters (send basic blocks, receive
    /// WQEs consumed).
    pub fn query_qp(&self, qpn: u32) -> Result<(QpState, u16, u32), DmaQueueError> {
        let mut m = new_input(Opcode::QueryQp, 0, qp::QP_SHORT_IN_LEN);
        set(&mut m, QP_QPN, qpn.into());
        let out = self
            .hca
            .cmd()
            .exec(&m, qp::QUERY_QP_OUT_LEN)
            .map_err(cmd("query QP"))?;
        let state =
            QpState::try_from(get(&out, qp::in_msg(qpc::STATE)) as u8).unwrap_or(QpState::Err);
        Ok((
            state,
            get(&out, qp::in_msg(qpc::HW_SQ_WQEBB_COUNTER)) as u16,
            get(&out, qp::in_msg(qpc::HW_RQ_COUNTER)) as u32,
        ))
    }

    /// Writes a send WQE at the send counter (not rung yet: see [`DmaQueues::ring`]).
    /// Returns its WQE index (the `wqe_counter` its CQE will carry).
    pub fn post_send(&self, q: &mut Qp, wr: &SendWr, signaled: bool) -> Result<u16, DmaQueueError> {
        self.post_send_with(q, wr, signaled, false)
    }

    /// [`DmaQueues::post_send`] with the solicited-event bit set: the receive CQE of
    /// the message fires the peer's CQ armed for solicited completions.
    pub fn post_send_solicited(
        &self,
        q: &mut Qp,
        wr: &SendWr,
        signaled: bool,
    ) -> Result<u16, DmaQueueError> {
        self.post_send_with(q, wr, signaled, true)
    }

    fn post_send_with(
        &self,
        q: &mut Qp,
        wr: &SendWr,
        signaled: bool,
        solicited: bool,
    ) -> Result<u16, DmaQueueError> {
        let mut segs: Vec<u8> = Vec::new();
        let (op, sges, raddr) = match wr {
            SendWr::Nop => (WqeOpcode::Nop, &[][..], None),
            SendWr::RdmaWrite {
                sges,
                raddr,
                rkey,
                imm,
            } => (
                if imm.is_some() {
                    WqeOpcode::RdmaWriteImm
                } else {
                    WqeOpcode::RdmaWrite
                },
                &sges[..],
                Some((*raddr, *rkey)),
            ),
            SendWr::RdmaRead { sges, raddr, rkey } => {
                (WqeOpcode::RdmaRead, &sges[..], Some((*raddr, *rkey)))
            }
            SendWr::Send { sges, imm } => (
                if imm.is_some() {
                    WqeOpcode::SendImm
                } else {
                    WqeOpcode::Send
                },
                &sges[..],
                None,
            ),
        };
        let imm = match wr {
            SendWr::RdmaWrite { imm, .. } | SendWr::Send { imm, .. } => imm.unwrap_or(0),
            _ => 0,
        };
        let ds = 1 + usize::from(raddr.is_some()) + sges.len();
        let max = mlx5_prm::wqe::MAX_WQE_DS;
        if ds > max {
            return Err(DmaQueueError::TooManySges {
                got: sges.len(),
                max: max - 2,
            });
        }
        let mut ctrl = CtrlSeg::new(op, q.sq_pi, q.qpn, ds as u8, signaled);
        ctrl.imm.set(imm);
        if solicited {
            ctrl.fm_ce_se |= mlx5_prm::wqe::CTRL_SOLICITED;
        }
        segs.extend_from_slice(ctrl.as_bytes());
        if let Some((addr, rkey)) = raddr {
            let mut r = RaddrSeg::default();
            r.raddr.set(addr);
            r.rkey.set(rkey);
            segs.extend_from_slice(r.as_bytes());
        }
        for s in sges {
            segs.extend_from_slice(data_seg(s).as_bytes());
        }
        self.write_wqe(q, &segs)
    }

    /// Writes `segs` (a whole WQE, control segment first) at the send counter and
    /// advances it. Raw: a test may write any bytes a hostile driver would.
    pub fn write_wqe(&self, q: &mut Qp, segs: &[u8]) -> Result<u16, DmaQueueError> {
        let nbb = segs.len().div_ceil(SEND_WQE_BB).max(1) as u32;
        let free = q.sq_entries() - u32::from(q.sq_pi.wrapping_sub(q.sq_done));
        if nbb > free {
            return Err(DmaQueueError::SqFull { free, need: nbb });
        }
        let arena = self.hca.cmd().arena();
        let idx = q.sq_pi;
        for (i, bb) in segs.chunks(SEND_WQE_BB).enumerate() {
            let slot = u32::from(idx.wrapping_add(i as u16)) % q.sq_entries();
            let off = q.rq_bytes() + u64::from(slot) * SEND_WQE_BB as u64;
            let mut block = [0u8; SEND_WQE_BB];
            block[..bb.len()].copy_from_slice(bb);
            arena.write(q.buf.iova(off), &block)?;
        }
        let slot = (u32::from(idx) % q.sq_entries()) as usize;
        q.wqe_bbs[slot] = nbb as u8;
        q.sq_pi = idx.wrapping_add(nbb as u16);
        Ok(idx)
    }

    /// Posts a receive WQE scattering into `sges` (up to the stride's entries; the
    /// list is ended with the invalid lkey if shorter), and writes the receive counter
    /// into the doorbell record.
    pub fn post_recv(&self, q: &mut Qp, sges: &[Sge]) -> Result<u16, DmaQueueError> {
        let per = 1usize << q.sizes.log_rq_stride;
        if sges.len() > per {
            return Err(DmaQueueError::TooManySges {
                got: sges.len(),
                max: per,
            });
        }
        let entries = 1u32 << q.sizes.log_rq;
        if u32::from(q.rq_pi.wrapping_sub(q.rq_done)) >= entries {
            return Err(DmaQueueError::RqFull { entries });
        }
        let mut wqe = vec![0u8; per * WQE_DS];
        for (i, s) in sges.iter().enumerate() {
            wqe[i * WQE_DS..(i + 1) * WQE_DS].copy_from_slice(data_seg(s).as_bytes());
        }
        if sges.len() < per {
            let mut end = DataSeg::default();
            end.lkey.set(INVALID_LKEY);
            wqe[sges.len() * WQE_DS..(sges.len() + 1) * WQE_DS].copy_from_slice(end.as_bytes());
        }
        let arena = self.hca.cmd().arena();
        let slot = u32::from(q.rq_pi) % entries;
        arena.write(q.buf.iova(u64::from(slot) * (per * WQE_DS) as u64), &wqe)?;
        let idx = q.rq_pi;
        q.rq_pi = idx.wrapping_add(1);
        arena.write(
            q.dbr.0[0] + qp::QP_DBR_RCV_OFFSET as u64,
            &u32::from(q.rq_pi).to_be_bytes(),
        )?;
        Ok(idx)
    }

    /// Rings the send queue: the send counter into the doorbell record, then the first
    /// 8 bytes of the last WQE's control segment into the UAR's doorbell register.
    pub fn ring(&self, q: &mut Qp) -> Result<(), DmaQueueError> {
        self.ring_counter(q, q.sq_pi)
    }

    /// [`DmaQueues::ring`] with any send counter (hostile tests: a counter that runs
    /// past what was posted).
    pub fn ring_counter(&self, q: &mut Qp, counter: u16) -> Result<(), DmaQueueError> {
        let arena = self.hca.cmd().arena();
        arena.write(
            q.dbr.0[0] + qp::QP_DBR_SND_OFFSET as u64,
            &u32::from(counter).to_be_bytes(),
        )?;
        let last = counter.wrapping_sub(1);
        let ctrl = CtrlSeg::new(WqeOpcode::Nop, last, q.qpn, 1, false);
        let off = u64::from(self.uar) * PAGE
            + u64::from(UAR_BF_OFFSET)
            + if q.bf_toggle { BF_REG_SIZE } else { 0 };
        q.bf_toggle = !q.bf_toggle;
        self.hca
            .cmd()
            .client()
            .region_write(BAR0, off, &ctrl.as_bytes()[..8])
            .map_err(|e| DmaQueueError::Doorbell(e.to_string()))
    }

    /// The next CQE of `c`, if the device has written one; advances the consumer index
    /// (and its doorbell record) and releases the send or receive room it completes.
    pub fn poll(
        &self,
        c: &mut Cq,
        q: Option<&mut Qp>,
    ) -> Result<Option<Completion>, DmaQueueError> {
        let arena = self.hca.cmd().arena();
        let slot = c.ci % c.entries();
        let at = c.ring.iova(u64::from(slot) * CQE_LEN as u64);
        let own = arena.load_acquire(at + CQE_OP_OWN_OFFSET as u64)?;
        if !cqe_is_sw_owned(own, c.ci, c.log_size) {
            return Ok(None);
        }
        let mut b = [0u8; CQE_LEN];
        arena.read(at, &mut b)?;
        let opcode = CqeOpcode::try_from(own >> 4).unwrap_or(CqeOpcode::Invalid);
        let e = ErrCqe::read_from_bytes(&b[..]).expect("64 bytes");
        let qpn = e.s_wqe_opcode_qpn.get() & 0x00ff_ffff;
        let err = matches!(opcode, CqeOpcode::ReqErr | CqeOpcode::RespErr);
        let done = Completion {
            opcode,
            qpn,
            wqe_counter: e.wqe_counter.get(),
            byte_cnt: u32::from_be_bytes([b[0x2c], b[0x2d], b[0x2e], b[0x2f]]),
            imm: u32::from_be_bytes([b[0x24], b[0x25], b[0x26], b[0x27]]),
            syndrome: if err {
                CqeSyndrome::try_from(e.syndrome).ok()
            } else {
                None
            },
            vendor_err: if err { e.vendor_err_synd } else { 0 },
            raw_syndrome: if err { e.syndrome } else { 0 },
        };
        c.ci = c.ci.wrapping_add(1) & 0x00ff_ffff;
        arena.write(c.dbr.0[0], &c.ci.to_be_bytes())?;
        if let Some(q) = q.filter(|q| q.qpn == qpn) {
            let send = matches!(opcode, CqeOpcode::Req | CqeOpcode::ReqErr);
            let recv = matches!(
                opcode,
                CqeOpcode::RespSend | CqeOpcode::RespSendImm | CqeOpcode::RespWrImm
            ) || opcode == CqeOpcode::RespErr;
            if send {
                let slot = (u32::from(done.wqe_counter) % q.sq_entries()) as usize;
                let n = u16::from(q.wqe_bbs[slot].max(1));
                q.sq_done = done.wqe_counter.wrapping_add(n);
            } else if recv {
                q.rq_done = done.wqe_counter.wrapping_add(1);
            }
        }
        Ok(Some(done))
    }

    /// Polls `c` until a CQE arrives or `timeout` passes.
    pub fn poll_wait(
        &self,
        c: &mut Cq,
        mut q: Option<&mut Qp>,
        timeout: Duration,
    ) -> Result<Completion, DmaQueueError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(done) = self.poll(c, q.as_deref_mut())? {
                return Ok(done);
            }
            if start.elapsed() >= timeout {
                return Err(DmaQueueError::Timeout {
                    cqn: c.cqn,
                    waited: timeout,
                });
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Destroys the QPs and CQs created here that are still alive (their buffers stay
    /// with the [`Qp`] and [`Cq`] values, whose pages the arena keeps), then the
    /// completion EQ.
    pub fn close(mut self) -> Result<(), DmaQueueError> {
        self.destroy_eq()
    }

    fn destroy_eq(&mut self) -> Result<(), DmaQueueError> {
        let Some(eq) = self.eq().take() else {
            return Ok(());
        };
        let (qps, cqs) = {
            let l = self.live();
            (l.qps.clone(), l.cqs.clone())
        };
        for qpn in qps {
            if let Err(e) = self.destroy_qpn(qpn) {
                tracing::warn!(qpn, error = %e, "QP left behind");
            }
        }
        for cqn in cqs {
            if let Err(e) = self.destroy_cqn(cqn) {
                tracing::warn!(cqn, error = %e, "CQ left behind");
            }
        }
        let mut m = new_input(Opcode::DestroyEq, 0, mlx5_prm::cmd::eq::DESTROY_EQ_IN_LEN);
        set(
            &mut m,
            mlx5_prm::cmd::eq::DESTROY_EQ_IN_EQ_NUMBER,
            self.eqn.into(),
        );
        let r = self
            .hca
            .cmd()
            .exec(&m, mlx5_prm::cmd::eq::DESTROY_EQ_OUT_LEN)
            .map(drop)
            .map_err(cmd("destroy completion EQ"));
        eq.free(self.hca.cmd().arena());
        r
    }
}

impl Drop for DmaQueues<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.destroy_eq() {
            tracing::warn!(error = %e, "completion EQ left behind");
        }
    }
}

fn data_seg(s: &Sge) -> DataSeg {
    let mut d = DataSeg::default();
    d.byte_count.set(s.len);
    d.lkey.set(s.lkey);
    d.addr.set(s.addr);
    d
}

/// Basic blocks a WQE of `ds` segments takes.
pub const fn wqe_bbs(ds: usize) -> usize {
    ds.div_ceil(DS_PER_BB)
}
