//! DMA dirty logging of a VF (VFIO DMA_LOGGING_START / REPORT / STOP), built as
//! mlx5vf builds it on the PF's page tracker (drivers/vfio/pci/mlx5/cmd.c,
//! `mlx5vf_start_page_tracker`, `mlx5vf_tracker_read_and_clear`,
//! `mlx5vf_stop_page_tracker`; kernel-mlx5vf.md §5).
//!
//! [`DirtyTracker::start`] checks the ranges as the VFIO core does, reads the PF's
//! ADV_VIRTUALIZATION capabilities, and sets up on the PF: a PD, a CQ, a host QP (no
//! send queue; a receive queue of `max(2 MiB, 4 × max message) / max message` WQEs
//! over a receive buffer under its own mkey, every WQE posted, RST→INIT→RTR) and a fw
//! QP (no queues at all, RST→INIT→RTR→RTS), the two connected by force loopback,
//! then CREATE_GENERAL_OBJECT(PAGE_TRACK) for the VF's `vhca_id` with the ranges
//! (merged down to `pg_track_max_num_range` if there are more) and the page size
//! clamped to the capabilities, which it returns as the VFIO uAPI does.
//!
//! [`DirtyTracker::report`] is read-and-clear: MODIFY to REPORTING over the range,
//! then the CQ is polled — each RESP_SEND_IMM carries 8-byte page addresses at
//! `wqe_counter × max message` of the receive buffer and the tracker's state in the
//! immediate's top 4 bits — until a message says the tracker left REPORTING. Each
//! address sets the bits of every bitmap page its tracker page covers, so the bitmap
//! may use any page size the uAPI allows (a power of two, at least 4 KiB), smaller or
//! larger than the tracker's. The receive is reposted after each message. A tracker
//! in ERROR, a CQE that is not RESP_SEND_IMM, or no message within
//! [`REPORT_TIMEOUT`] fails the report with `-EIO`, and every later report too, until
//! stop and start, as in the kernel. (The kernel sleeps on the CQ's completion event
//! or the OBJECT_CHANGE event when the CQ is empty; this driver polls the CQ and, on a
//! quiet CQ, QUERY_GENERAL_OBJECT for an ERROR.)
//!
//! [`DirtyTracker::stop`] destroys the object, the QPs, the buffer, the CQ and the PD.
//!
//! Unlike the kernel, which puts the tracker's CQ on one of mlx5_core's completion
//! EQs, each tracker here brings its own completion EQ ([`DmaQueues::with_pd`]), so a
//! PF runs as many trackers at once as it has EQs left (`max_num_eqs` less the command
//! EQ: 7), fewer than the 16 the capability page allows; the next start fails with
//! the CREATE_EQ's NO_RESOURCES.

use std::time::{Duration, Instant};

use mlx5_prm::cmd::caps::{CapMode, CapType, HCA_CAP_MSG_OFFSET, QUERY_HCA_CAP_OUT_LEN};
use mlx5_prm::cmd::page_track::{
    adv_virt_cap, create_in_len, ctx, imm_state, in_msg, range_length, range_start, PageTrackState,
    GENERAL_OBJ_IN_HDR_LEN, GENERAL_OBJ_IN_OBJ_ID, GENERAL_OBJ_IN_OBJ_TYPE,
    GENERAL_OBJ_OUT_HDR_LEN, GENERAL_OBJ_OUT_OBJ_ID, MODIFY_RANGE, MODIFY_STATE,
    OBJ_TYPE_PAGE_TRACK, PAGE_TRACK_IN_LEN, QUERY_PAGE_TRACK_OUT_LEN, REPORT_ENTRY_LEN,
    TRACK_TYPE_DMA_WRITE,
};
use mlx5_prm::cmd::qp::{self, ads, qpc};
use mlx5_prm::errno::{EINVAL, EIO, EOPNOTSUPP};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::wqe::CqeOpcode;
use mlx5_prm::Opcode;

use crate::cmdif::{new_input, CmdError};
use crate::dma::{Cq, DmaQueueError, DmaQueues, Qp, QpSizes, Sge};
use crate::hca::caps::query_hca_cap_in;
use crate::hca::{Hca, HcaError};

/// Smallest page size of the uAPI (START and REPORT).
pub const MIN_PAGE_SIZE: u64 = 4096;
/// Most ranges one START takes (the VFIO core's `LOG_MAX_RANGES`, PAGE_SIZE / 16).
pub const MAX_RANGES: usize = 256;
/// The receive area the kernel gives the host QP at least.
pub const MIN_RQ_SIZE: u64 = 2 << 20;
/// How long a report waits for the tracker's next message.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

const EOVERFLOW: i32 = 75;
const E2BIG: i32 = 7;

/// Why a dirty-logging call failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("invalid dirty-logging request: {0}")]
    Invalid(String),
    #[error("{got} ranges given, at most {max} are taken; merge them first")]
    TooManyRanges { got: usize, max: usize },
    #[error("range {iova:#x}+{length:#x} wraps the address space")]
    Overflow { iova: u64, length: u64 },
    #[error("the device cannot track this: {0}")]
    NotSupported(String),
    #[error("dirty logging is not started; call start first")]
    NotStarted,
    #[error("the page tracker failed ({0}); stop and start again, and treat all memory as dirty")]
    Tracker(String),
    #[error("{what}: {source}")]
    Cmd {
        what: &'static str,
        #[source]
        source: CmdError,
    },
    #[error(transparent)]
    Queue(#[from] DmaQueueError),
    #[error(transparent)]
    Hca(#[from] HcaError),
}

impl DirtyError {
    /// The errno the VFIO ioctl would return.
    pub fn errno(&self) -> i32 {
        match self {
            DirtyError::Invalid(_) | DirtyError::NotStarted => -EINVAL,
            DirtyError::TooManyRanges { .. } => -E2BIG,
            DirtyError::Overflow { .. } => -EOVERFLOW,
            DirtyError::NotSupported(_) => -EOPNOTSUPP,
            DirtyError::Cmd { source, .. } => source.errno(),
            _ => -EIO,
        }
    }
}

fn cmd(what: &'static str) -> impl FnOnce(CmdError) -> DirtyError {
    move |source| DirtyError::Cmd { what, source }
}

/// The PF's ADV_VIRTUALIZATION limits mlx5vf sizes its tracker with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerCaps {
    pub max_num_range: u8,
    pub log_min_addr_space: u8,
    pub log_max_addr_space: u8,
    pub log_max_msg_size: u8,
    pub log_min_page_size: u8,
    pub log_max_page_size: u8,
}

impl TrackerCaps {
    /// QUERY_HCA_CAP(ADV_VIRTUALIZATION, CUR) of `pf`; `NotSupported` if the PF does
    /// not advertise `adv_virtualization`.
    pub fn query(pf: &Hca) -> Result<Self, DirtyError> {
        let general = pf
            .cmd()
            .exec(
                &query_hca_cap_in(CapType::General, CapMode::Cur, None),
                QUERY_HCA_CAP_OUT_LEN,
            )
            .map_err(cmd("query general caps"))?;
        let adv = mlx5_prm::cmd::caps::cmd_hca_cap::ADV_VIRTUALIZATION;
        if get(&general[HCA_CAP_MSG_OFFSET..], adv) == 0 {
            return Err(DirtyError::NotSupported(
                "the PF does not advertise adv_virtualization (no page tracker)".into(),
            ));
        }
        let out = pf
            .cmd()
            .exec(
                &query_hca_cap_in(CapType::AdvVirtualization, CapMode::Cur, None),
                QUERY_HCA_CAP_OUT_LEN,
            )
            .map_err(cmd("query adv_virtualization caps"))?;
        let p = &out[HCA_CAP_MSG_OFFSET..];
        let g = |f| get(p, f) as u8;
        Ok(TrackerCaps {
            max_num_range: g(adv_virt_cap::PG_TRACK_MAX_NUM_RANGE),
            log_min_addr_space: g(adv_virt_cap::PG_TRACK_LOG_MIN_ADDR_SPACE),
            log_max_addr_space: g(adv_virt_cap::PG_TRACK_LOG_MAX_ADDR_SPACE),
            log_max_msg_size: g(adv_virt_cap::PG_TRACK_LOG_MAX_MSG_SIZE),
            log_min_page_size: g(adv_virt_cap::PG_TRACK_LOG_MIN_PAGE_SIZE),
            log_max_page_size: g(adv_virt_cap::PG_TRACK_LOG_MAX_PAGE_SIZE),
        })
    }
}

/// The VFIO core's checks of a START: 1..=[`MAX_RANGES`] ranges, each aligned to
/// `page_size` (a power of two of at least 4 KiB), not wrapping, not overlapping.
/// Returns them sorted.
pub fn check_start(ranges: &[(u64, u64)], page_size: u64) -> Result<Vec<(u64, u64)>, DirtyError> {
    if ranges.is_empty() {
        return Err(DirtyError::Invalid("no ranges given".into()));
    }
    if ranges.len() > MAX_RANGES {
        return Err(DirtyError::TooManyRanges {
            got: ranges.len(),
            max: MAX_RANGES,
        });
    }
    check_page_size(page_size)?;
    let mut v = ranges.to_vec();
    v.sort_unstable();
    let mut prev_end = 0u64;
    for (i, &(iova, length)) in v.iter().enumerate() {
        if length == 0 || !iova.is_multiple_of(page_size) || !length.is_multiple_of(page_size) {
            return Err(DirtyError::Invalid(format!(
                "range {iova:#x}+{length:#x} is empty or not aligned to the page size {page_size:#x}"
            )));
        }
        let end = iova
            .checked_add(length)
            .ok_or(DirtyError::Overflow { iova, length })?;
        if i > 0 && iova < prev_end {
            return Err(DirtyError::Invalid(format!(
                "range {iova:#x}+{length:#x} overlaps the one before it"
            )));
        }
        prev_end = end;
    }
    Ok(v)
}

fn check_page_size(page_size: u64) -> Result<(), DirtyError> {
    if page_size < MIN_PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(DirtyError::Invalid(format!(
            "page size {page_size:#x} is not a power of two of at least 4 KiB"
        )));
    }
    Ok(())
}

/// Merges sorted, disjoint `ranges` down to `max` by joining the two neighbours with
/// the smallest gap, over and over (what `vfio_combine_iova_ranges` does).
pub fn combine_ranges(mut ranges: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let max = max.max(1);
    while ranges.len() > max {
        let (i, _) = ranges
            .windows(2)
            .enumerate()
            .map(|(i, w)| (i, w[1].0 - (w[0].0 + w[0].1)))
            .min_by_key(|&(_, gap)| gap)
            .expect("two ranges or more");
        let (s, _) = ranges[i];
        let (s2, l2) = ranges.remove(i + 1);
        ranges[i].1 = s2 + l2 - s;
    }
    ranges
}

/// A VF's dirty logging, running on its PF.
pub struct DirtyTracker<'h> {
    pf: &'h Hca,
    queues: Option<DmaQueues<'h>>,
    pd: u32,
    cq: Option<Cq>,
    host_qp: Option<Qp>,
    fw_qp: Option<Qp>,
    recv_pages: Vec<u64>,
    recv_mkey: Option<u32>,
    obj_id: Option<u32>,
    vhca_id: u16,
    page_size: u64,
    max_msg: u64,
    recv_wqes: u32,
    is_err: bool,
}

impl<'h> DirtyTracker<'h> {
    /// DMA_LOGGING_START for the VF `vhca_id` through its PF `pf`: tracks DMA writes
    /// into `ranges` ((iova, length)) at `page_size`, clamped to what the tracker
    /// supports; [`DirtyTracker::page_size`] is the size it tracks at.
    pub fn start(
        pf: &'h Hca,
        vhca_id: u16,
        ranges: &[(u64, u64)],
        page_size: u64,
    ) -> Result<Self, DirtyError> {
        let ranges = check_start(ranges, page_size)?;
        let caps = TrackerCaps::query(pf)?;
        let max_msg = 1u64 << caps.log_max_msg_size;
        let rq_size = MIN_RQ_SIZE.max(4 * max_msg);
        let recv_wqes = rq_size.div_ceil(max_msg).next_power_of_two() as u32;
        let log_page = (page_size.trailing_zeros() as u8)
            .clamp(caps.log_min_page_size, caps.log_max_page_size);
        let ranges = combine_ranges(ranges, usize::from(caps.max_num_range));
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let log_space = 64 - (total - 1).leading_zeros() as u8;
        if log_space < caps.log_min_addr_space || log_space > caps.log_max_addr_space {
            return Err(DirtyError::NotSupported(format!(
                "the ranges span 2^{log_space} bytes; the tracker takes 2^{}..=2^{}",
                caps.log_min_addr_space, caps.log_max_addr_space
            )));
        }
        let pd = pf.alloc_pd()?;
        let mut t = DirtyTracker {
            pf,
            queues: None,
            pd,
            cq: None,
            host_qp: None,
            fw_qp: None,
            recv_pages: Vec::new(),
            recv_mkey: None,
            obj_id: None,
            vhca_id,
            page_size: 1 << log_page,
            max_msg,
            recv_wqes,
            is_err: false,
        };
        // On failure, `t` is dropped and frees what was made.
        t.build(&ranges, log_space, caps.log_max_msg_size, rq_size)?;
        tracing::info!(
            vhca_id,
            page_size = t.page_size,
            ranges = ranges.len(),
            "dirty logging started"
        );
        Ok(t)
    }

    fn build(
        &mut self,
        ranges: &[(u64, u64)],
        log_space: u8,
        log_msg: u8,
        rq_size: u64,
    ) -> Result<(), DirtyError> {
        let q = DmaQueues::with_pd(self.pf, self.pd)?;
        let log_cq = self.recv_wqes.trailing_zeros() as u8;
        let cq = q.create_cq(log_cq)?;
        let log_rq = log_cq;
        let host = q.create_qp(
            &cq,
            &cq,
            QpSizes {
                log_rq,
                log_rq_stride: 0,
                no_sq: true,
                ..QpSizes::default()
            },
        );
        self.cq = Some(cq);
        self.queues = Some(q);
        let q = self.queues.as_ref().expect("just set");
        let cq = self.cq.as_ref().expect("just set");
        self.host_qp = Some(host?);
        // The receive buffer under its own mkey, virtual address 0 at its first byte.
        let arena = self.pf.cmd().arena();
        for _ in 0..rq_size.div_ceil(4096) {
            let p = arena.alloc_page().ok_or(DmaQueueError::NoPages {
                need: rq_size.div_ceil(4096) as usize,
            })?;
            self.recv_pages.push(p);
        }
        self.recv_mkey =
            Some(
                self.pf
                    .create_mkey_in_pd(self.pd, &self.recv_pages, 12, rq_size, 0x7d)?,
            );
        let fw = q.create_qp(
            cq,
            cq,
            QpSizes {
                no_sq: true,
                zero_rq: true,
                ..QpSizes::default()
            },
        )?;
        let fw_qpn = fw.qpn;
        self.fw_qp = Some(fw);
        let host_qpn = self.host_qp.as_ref().expect("just set").qpn;
        // Host QP: INIT, every receive posted, RTR. fw QP: INIT, RTR, RTS.
        self.activate(host_qpn, fw_qpn, true)?;
        self.activate(fw_qpn, host_qpn, false)?;
        // CREATE_GENERAL_OBJECT(PAGE_TRACK).
        let mut m = new_input(Opcode::CreateGeneralObject, 0, create_in_len(ranges.len()));
        set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
        let mut s = |f, v: u64| set(&mut m, in_msg(f), v);
        s(ctx::VHCA_ID, self.vhca_id.into());
        s(ctx::TRACK_TYPE, TRACK_TYPE_DMA_WRITE.into());
        s(
            ctx::LOG_PAGE_SIZE,
            u64::from(self.page_size.trailing_zeros()),
        );
        s(ctx::LOG_MSG_SIZE, log_msg.into());
        s(ctx::REPORTING_QPN, fw_qpn.into());
        s(ctx::NUM_RANGES, ranges.len() as u64);
        s(ctx::LOG_ADDR_SPACE_SIZE, log_space.into());
        for (i, &(iova, len)) in ranges.iter().enumerate() {
            if let (Some(a), Some(l)) = (range_start(i), range_length(i)) {
                set(&mut m, a, iova);
                set(&mut m, l, len);
            }
        }
        let out = self
            .pf
            .cmd()
            .exec(&m, GENERAL_OBJ_OUT_HDR_LEN)
            .map_err(cmd("create page tracker"))?;
        self.obj_id = Some(get(&out, GENERAL_OBJ_OUT_OBJ_ID) as u32);
        Ok(())
    }

    /// `mlx5vf_activate_qp`: RST2INIT (remote read/write), the host QP's receives,
    /// INIT2RTR by force loopback to `remote`, and RTR2RTS for the fw QP.
    fn activate(&mut self, qpn: u32, remote: u32, host: bool) -> Result<(), DirtyError> {
        let q = self.queues.as_ref().expect("queues");
        q.modify(qpn, Opcode::Rst2InitQp, |m| {
            set(m, qp::path_in_msg(ads::VHCA_PORT_NUM), 1);
            set(m, qp::in_msg(qpc::PM_STATE), qp::QP_PM_MIGRATED.into());
            set(m, qp::in_msg(qpc::RRE), 1);
            set(m, qp::in_msg(qpc::RWE), 1);
        })?;
        if host {
            for i in 0..self.recv_wqes {
                self.post_recv(u64::from(i) * self.max_msg)?;
            }
        }
        let q = self.queues.as_ref().expect("queues");
        q.modify(qpn, Opcode::Init2RtrQp, |m| {
            set(m, qp::in_msg(qpc::MTU), 5);
            set(m, qp::in_msg(qpc::LOG_MSG_MAX), 30);
            set(m, qp::in_msg(qpc::REMOTE_QPN), remote.into());
            set(m, qp::path_in_msg(ads::VHCA_PORT_NUM), 1);
            set(m, qp::path_in_msg(ads::FL), 1);
        })?;
        if host {
            return Ok(());
        }
        q.modify(qpn, Opcode::Rtr2RtsQp, |m| {
            set(m, qp::in_msg(qpc::RETRY_COUNT), 7);
            set(m, qp::in_msg(qpc::RNR_RETRY), 7);
        })?;
        Ok(())
    }

    fn post_recv(&mut self, offset: u64) -> Result<(), DirtyError> {
        let (Some(q), Some(h), Some(lkey)) =
            (self.queues.as_ref(), self.host_qp.as_mut(), self.recv_mkey)
        else {
            return Err(DirtyError::NotStarted);
        };
        q.post_recv(
            h,
            &[Sge {
                lkey,
                addr: offset,
                len: self.max_msg as u32,
            }],
        )?;
        Ok(())
    }

    /// The page size the tracker tracks at (what START returns).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The tracker's object id on the PF.
    pub fn object_id(&self) -> Option<u32> {
        self.obj_id
    }

    /// The host QP the reports arrive on (and the fw QP they are sent from).
    pub fn qpns(&self) -> Option<(u32, u32)> {
        Some((self.host_qp.as_ref()?.qpn, self.fw_qp.as_ref()?.qpn))
    }

    /// DMA_LOGGING_REPORT: sets in `bitmap` (bit i = the page of `page_size` bytes at
    /// `iova + i × page_size`, LSB first in each u64) every page of
    /// `iova..iova+length` the VF's DMA wrote since the last report, and clears them
    /// in the device. Only sets bits. On an error, treat the range as all dirty.
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DirtyError> {
        check_page_size(page_size)?;
        if length == 0 || !iova.is_multiple_of(page_size) || !length.is_multiple_of(page_size) {
            return Err(DirtyError::Invalid(format!(
                "report range {iova:#x}+{length:#x} is empty or not aligned to {page_size:#x}"
            )));
        }
        iova.checked_add(length)
            .ok_or(DirtyError::Overflow { iova, length })?;
        let bits = length / page_size;
        if (bitmap.len() as u64).saturating_mul(64) < bits {
            return Err(DirtyError::Invalid(format!(
                "the bitmap holds {} bits, the range needs {bits}",
                bitmap.len() * 64
            )));
        }
        let obj = self.obj_id.ok_or(DirtyError::NotStarted)?;
        if self.is_err {
            return Err(DirtyError::Tracker("an earlier report failed".into()));
        }
        let r = self.read_and_clear(obj, iova, length, page_size, bitmap);
        if r.is_err() {
            self.is_err = true;
        }
        r
    }

    fn read_and_clear(
        &mut self,
        obj: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DirtyError> {
        let mut m = new_input(Opcode::ModifyGeneralObject, 0, PAGE_TRACK_IN_LEN);
        set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
        set(&mut m, GENERAL_OBJ_IN_OBJ_ID, obj.into());
        set(
            &mut m,
            in_msg(ctx::MODIFY_FIELD_SELECT),
            MODIFY_STATE | MODIFY_RANGE,
        );
        set(&mut m, in_msg(ctx::RANGE_START_ADDRESS), iova);
        set(&mut m, in_msg(ctx::LENGTH), length);
        set(
            &mut m,
            in_msg(ctx::STATE),
            (PageTrackState::Reporting as u8).into(),
        );
        self.pf
            .cmd()
            .exec(&m, GENERAL_OBJ_OUT_HDR_LEN)
            .map_err(cmd("modify page tracker to REPORTING"))?;
        let end = iova + length;
        let mut last = Instant::now();
        let mut entries = vec![0u8; self.max_msg as usize];
        loop {
            let done = {
                let (Some(q), Some(cq), Some(h)) = (
                    self.queues.as_ref(),
                    self.cq.as_mut(),
                    self.host_qp.as_mut(),
                ) else {
                    return Err(DirtyError::NotStarted);
                };
                q.poll(cq, Some(h))?
            };
            let Some(c) = done else {
                if last.elapsed() > REPORT_TIMEOUT {
                    return Err(DirtyError::Tracker(format!(
                        "no report message within {REPORT_TIMEOUT:?}"
                    )));
                }
                if last.elapsed() > Duration::from_millis(20)
                    && self.query_state(obj)? == PageTrackState::Failed
                {
                    return Err(DirtyError::Tracker("the tracker is in ERROR".into()));
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            last = Instant::now();
            if c.opcode != CqeOpcode::RespSendImm {
                return Err(DirtyError::Tracker(format!(
                    "report completion {:?} (syndrome {:?}) where RESP_SEND_IMM was expected",
                    c.opcode, c.syndrome
                )));
            }
            let state = imm_state(c.imm);
            let ix = u64::from(c.wqe_counter) % u64::from(self.recv_wqes);
            let off = ix * self.max_msg;
            let size = (c.byte_cnt as usize).min(entries.len());
            if size > 0 {
                self.read_recv(off, &mut entries[..size])?;
                for e in entries[..size].chunks_exact(REPORT_ENTRY_LEN) {
                    let addr = u64::from_be_bytes(e.try_into().expect("8 bytes"));
                    set_bits(bitmap, iova, end, page_size, addr, self.page_size);
                }
            }
            self.post_recv(off)?;
            match PageTrackState::try_from(state) {
                Ok(PageTrackState::Reporting) => {}
                Ok(PageTrackState::Tracking) => return Ok(()),
                _ => {
                    return Err(DirtyError::Tracker(format!(
                        "the tracker reported state {state}"
                    )))
                }
            }
        }
    }

    /// Reads `buf.len()` bytes at `off` of the receive buffer.
    fn read_recv(&self, off: u64, buf: &mut [u8]) -> Result<(), DirtyError> {
        let arena = self.pf.cmd().arena();
        let mut at = 0usize;
        while at < buf.len() {
            let o = off + at as u64;
            let page = *self
                .recv_pages
                .get((o / 4096) as usize)
                .ok_or_else(|| DirtyError::Tracker("report past the receive buffer".into()))?;
            let n = (4096 - (o % 4096) as usize).min(buf.len() - at);
            arena
                .read(page + o % 4096, &mut buf[at..at + n])
                .map_err(DmaQueueError::from)?;
            at += n;
        }
        Ok(())
    }

    /// QUERY_GENERAL_OBJECT: the tracker's state.
    pub fn query_state(&self, obj: u32) -> Result<PageTrackState, DirtyError> {
        let mut m = new_input(Opcode::QueryGeneralObject, 0, GENERAL_OBJ_IN_HDR_LEN);
        set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
        set(&mut m, GENERAL_OBJ_IN_OBJ_ID, obj.into());
        let out = self
            .pf
            .cmd()
            .exec(&m, QUERY_PAGE_TRACK_OUT_LEN)
            .map_err(cmd("query page tracker"))?;
        let raw = get(&out, in_msg(ctx::STATE)) as u8;
        PageTrackState::try_from(raw)
            .map_err(|_| DirtyError::Tracker(format!("unknown tracker state {raw}")))
    }

    /// DMA_LOGGING_STOP: destroys the tracker and everything it used.
    pub fn stop(mut self) -> Result<(), DirtyError> {
        let r = self.teardown();
        tracing::info!(
            vhca_id = self.vhca_id,
            ok = r.is_ok(),
            "dirty logging stopped"
        );
        r
    }

    fn teardown(&mut self) -> Result<(), DirtyError> {
        let mut first: Option<DirtyError> = None;
        let mut keep = |r: Result<(), DirtyError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(id) = self.obj_id.take() {
            let mut m = new_input(Opcode::DestroyGeneralObject, 0, GENERAL_OBJ_IN_HDR_LEN);
            set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
            set(&mut m, GENERAL_OBJ_IN_OBJ_ID, id.into());
            keep(
                self.pf
                    .cmd()
                    .exec(&m, GENERAL_OBJ_OUT_HDR_LEN)
                    .map(drop)
                    .map_err(cmd("destroy page tracker")),
            );
        }
        if let Some(q) = self.queues.as_ref() {
            if let Some(fw) = self.fw_qp.take() {
                keep(q.destroy_qp(fw).map_err(DirtyError::from));
            }
            if let Some(h) = self.host_qp.take() {
                keep(q.destroy_qp(h).map_err(DirtyError::from));
            }
        }
        if let Some(k) = self.recv_mkey.take() {
            keep(self.pf.destroy_mkey(k).map_err(DirtyError::from));
        }
        for p in std::mem::take(&mut self.recv_pages) {
            let _ = self.pf.cmd().arena().free_page(p);
        }
        if let (Some(q), Some(cq)) = (self.queues.as_ref(), self.cq.take()) {
            keep(q.destroy_cq(cq).map_err(DirtyError::from));
        }
        if let Some(q) = self.queues.take() {
            keep(q.close().map_err(DirtyError::from));
        }
        if self.pd != 0 {
            keep(self.pf.dealloc_pd(self.pd).map_err(DirtyError::from));
            self.pd = 0;
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for DirtyTracker<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(vhca_id = self.vhca_id, error = %e, "dirty tracker teardown");
        }
    }
}

/// Sets the bits of every `page_size` page of the bitmap (which starts at `start`
/// and covers up to `end`) that the tracker page at `addr` (of `tracked` bytes)
/// overlaps (`iova_bitmap_set`).
pub fn set_bits(bitmap: &mut [u64], start: u64, end: u64, page_size: u64, addr: u64, tracked: u64) {
    let lo = addr.max(start);
    let hi = addr.saturating_add(tracked).min(end);
    if lo >= hi {
        return;
    }
    let first = (lo - start) / page_size;
    let last = (hi - 1 - start) / page_size;
    for bit in first..=last {
        if let Some(w) = bitmap.get_mut((bit / 64) as usize) {
            *w |= 1u64 << (bit % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_checks_follow_the_vfio_core() {
        assert!(check_start(&[(0x2000, 0x1000), (0, 0x1000)], 4096).is_ok());
        assert_eq!(check_start(&[], 4096).unwrap_err().errno(), -EINVAL);
        let many = vec![(0, 4096); MAX_RANGES + 1];
        assert_eq!(check_start(&many, 4096).unwrap_err().errno(), -E2BIG);
        assert_eq!(
            check_start(&[(u64::MAX - 0xfff, 0x2000)], 4096)
                .unwrap_err()
                .errno(),
            -EOVERFLOW
        );
        for bad in [(0x800, 0x1000), (0, 0), (0, 0x1800)] {
            assert_eq!(check_start(&[bad], 4096).unwrap_err().errno(), -EINVAL);
        }
        assert!(check_start(&[(0, 0x2000), (0x1000, 0x1000)], 4096).is_err());
        assert!(
            check_start(&[(0, 0x3000)], 0x3000).is_err(),
            "not a power of two"
        );
    }

    #[test]
    fn ranges_merge_at_the_smallest_gap() {
        let r = vec![(0, 0x1000), (0x2000, 0x1000), (0x10000, 0x1000)];
        assert_eq!(
            combine_ranges(r.clone(), 2),
            vec![(0, 0x3000), (0x10000, 0x1000)]
        );
        assert_eq!(combine_ranges(r, 1), vec![(0, 0x11000)]);
    }

    #[test]
    fn bits_cover_the_tracker_page_at_any_bitmap_page_size() {
        let mut b = [0u64; 2];
        // A 2 MiB tracker page reported in a 4 KiB bitmap of 128 pages from 1.75 MiB:
        // its second half.
        set_bits(&mut b, 0x1c_0000, 0x24_0000, 4096, 0x20_0000, 0x20_0000);
        assert_eq!(b, [0, u64::MAX]);
        // A 4 KiB tracker page reported in a 2 MiB bitmap.
        let mut b = [0u64; 1];
        set_bits(&mut b, 0, 1 << 30, 1 << 21, 0x40_1000, 4096);
        assert_eq!(b[0], 1 << 2);
        // Outside the bitmap: nothing.
        set_bits(&mut b, 0, 1 << 21, 1 << 21, 1 << 22, 4096);
        assert_eq!(b[0], 1 << 2);
    }
}
