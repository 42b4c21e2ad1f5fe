//! One QP's send queue, WQE by WQE: read the WQE from guest memory, resolve its keys,
//! move the data through the DMA paths of the two functions, write the CQEs.

use std::sync::{Arc, MutexGuard};

use mlx5_prm::cmd::cq::{CQ_STATUS_OK, CQ_STATUS_OVERFLOW, CQ_STATUS_WRITE_FAIL};
use mlx5_prm::cmd::qp::{QpState, QP_DBR_RCV_OFFSET, QP_DBR_SND_OFFSET, SEND_WQE_BB};
use mlx5_prm::wqe::{
    op_own, vendor_synd as vs, Cqe, CqeOpcode, CqeSyndrome, CtrlSeg, DataSeg, ErrCqe, RaddrSeg,
    WqeOpcode, CQE_LEN, CQE_OP_OWN_OFFSET, DS_PER_BB, INLINE_SEG, INVALID_LKEY, MAX_WQE_DS, WQE_DS,
};
use vfu::DmaError;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use mlx5_prm::cmd::cq::{CQ_ERROR_ACCESS_VIOLATION, CQ_ERROR_OVERRUN};
use mlx5_prm::cmd::eq::{EQE_SIZE, EVENT_TYPE_CQ_ERROR, EVENT_TYPE_WQ_CATAS_ERROR};

use super::Host;
use crate::firmware::{
    comp_eqe, cq_error_eqe, qp_event_eqe, Firmware, P2pSource, Peer, Qp, QpPeer,
};

/// Bytes moved per DMA read/write pair: a request is copied through a bounce buffer of
/// at most this size.
pub const COPY_CHUNK: usize = 256 * 1024;

/// The function at the far end of a request: this one, or a peer through the fabric.
enum Side<'a> {
    Own(&'a dyn Host),
    Peer(Arc<dyn Peer>),
}

/// A write by the engine of this function for QP `qpn` (own side), or a peer's write.
fn write_for(side: &Side<'_>, qpn: u32, iova: u64, data: &[u8]) -> Result<(), DmaError> {
    match side {
        Side::Own(h) => h.env().dma_write_by(iova, data, qpn),
        Side::Peer(p) => p.dma_write(iova, data),
    }
}

impl Side<'_> {
    fn fw(&self) -> MutexGuard<'_, Firmware> {
        match self {
            Side::Own(h) => h.firmware().lock(),
            Side::Peer(p) => p.firmware(),
        }
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        match self {
            Side::Own(h) => h.env().dma_read(iova, buf),
            Side::Peer(p) => p.dma_read(iova, buf),
        }
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        match self {
            Side::Own(h) => h.env().dma_write(iova, data),
            Side::Peer(p) => p.dma_write(iova, data),
        }
    }

    fn kick(&self, qpn: u32) {
        match self {
            Side::Own(h) => h.env().dma_kick(qpn),
            Side::Peer(p) => p.dma_kick(qpn),
        }
    }

    /// Posts `eqe` on EQ `eqn` of this side's function (and raises its vector if the
    /// EQ is armed). Called holding no lock.
    fn post_eqe(&self, eqn: u8, eqe: [u8; EQE_SIZE]) {
        let posted = match self {
            Side::Own(h) => h.firmware().post_eqe(h.env(), eqn, eqe),
            Side::Peer(p) => p.post_eqe(eqn, eqe),
        };
        if !posted {
            tracing::debug!(
                eqn,
                event_type = eqe[1],
                "event EQE not posted (EQ gone or full)"
            );
        }
    }

    /// Posts an asynchronous event on the EQ that subscribed to `event_type`, if any.
    fn async_event(&self, event_type: u8, eqe: [u8; EQE_SIZE]) {
        let eqn = self.fw().async_eq(event_type);
        if let Some(eqn) = eqn {
            self.post_eqe(eqn, eqe);
        }
    }
}

/// Ends a peer's admission of a request when dropped.
struct Admitted(Arc<dyn Peer>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.end_dma();
    }
}

/// Why a WQE failed: the requester's error CQE, and what the responder gets, if the
/// request reached a responder QP that must go to ERR with it.
#[derive(Debug, Clone, Copy)]
struct Fail {
    syndrome: CqeSyndrome,
    vendor: u8,
    responder: Option<CqeSyndrome>,
}

const fn fail(syndrome: CqeSyndrome, vendor: u8) -> Fail {
    Fail {
        syndrome,
        vendor,
        responder: None,
    }
}

/// What one step of a QP did.
enum Step {
    /// Nothing to do (no WQE posted, QP not in RTS or ERR, or gone).
    Idle,
    /// One WQE completed (or was flushed).
    Did,
    /// The initiator gate is closed: the QP runs again when it opens.
    Parked,
}

/// Runs at most `budget` WQEs of `qpn`; true if more may be waiting.
pub(super) fn run_qp(h: &dyn Host, qpn: u32, budget: u32) -> bool {
    for _ in 0..budget {
        match step(h, qpn) {
            Step::Did => {}
            Step::Idle | Step::Parked => return false,
        }
    }
    true
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The (receive, send) counters of a QP's doorbell record, 16 bits each as WQE
/// counters are.
fn read_dbr(side: &Side<'_>, dbr: u64) -> Result<(u16, u16), DmaError> {
    let mut b = [0u8; 8];
    side.read(dbr, &mut b)?;
    Ok((
        be32(&b[QP_DBR_RCV_OFFSET..]) as u16,
        be32(&b[QP_DBR_SND_OFFSET..]) as u16,
    ))
}

fn step(h: &dyn Host, qpn: u32) -> Step {
    let Some(q) = h.firmware().lock().qp(qpn).cloned() else {
        return Step::Idle;
    };
    let flushing = q.state == QpState::Err;
    if !(q.has_sq || q.has_rq) || !(flushing || q.can_send() && q.has_sq) {
        return Step::Idle;
    }
    let Some(_in_flight) = h.gate().enter(qpn) else {
        return Step::Parked;
    };
    let own = Side::Own(h);
    let (rq_pi, sq_pi) = match read_dbr(&own, q.dbr) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(qpn, error = %e, "QP doorbell record unreadable; QP to ERR");
            to_err(&own, qpn);
            // No CQE can report it: a catastrophic work queue error event.
            own.async_event(
                EVENT_TYPE_WQ_CATAS_ERROR,
                qp_event_eqe(EVENT_TYPE_WQ_CATAS_ERROR, qpn),
            );
            return if flushing { Step::Idle } else { Step::Did };
        }
    };
    if flushing {
        return flush_one(h, &q, rq_pi, sq_pi);
    }
    if sq_pi == q.sq_ci {
        return Step::Idle;
    }
    let outstanding = u32::from(sq_pi.wrapping_sub(q.sq_ci));
    let start = q.sq_ci;
    let (opcode, nbb, result) = if outstanding > q.sq_entries() {
        // A counter more than a ring ahead names WQEs the ring cannot hold: the one
        // error CQE retires all of them, so the flush that follows has nothing to
        // complete (completing them block by block would post more CQEs than the ring
        // has slots, and overrun a CQ sized for the ring).
        (
            0,
            sq_pi.wrapping_sub(q.sq_ci),
            Err(fail(CqeSyndrome::LocalQpOpErr, vs::OVERRUN)),
        )
    } else {
        match read_wqe(&own, &q, start, outstanding) {
            Err(f) => (0, 1, Err(f)),
            Ok((ctrl, segs)) => {
                let nbb = ctrl.ds().div_ceil(DS_PER_BB) as u16;
                let r = execute(h, &q, &ctrl, &segs);
                (ctrl.opcode(), nbb, r.map(|n| (n, ctrl.signaled())))
            }
        }
    };
    complete(h, &q, start, nbb, opcode, result);
    Step::Did
}

/// Byte offset of send basic block `bb` (a counter value) in the QP buffer.
fn sq_offset(q: &Qp, bb: u16) -> u64 {
    q.rq_bytes() + u64::from(u32::from(bb) % q.sq_entries()) * SEND_WQE_BB as u64
}

/// Reads `len` bytes at `off` of the QP buffer through `side`.
fn read_buf(side: &Side<'_>, q: &Qp, off: u64, buf: &mut [u8]) -> Result<(), Fail> {
    let runs = q
        .buf
        .runs(off, buf.len() as u64)
        .ok_or(fail(CqeSyndrome::LocalAccessErr, vs::UNMAPPED))?;
    let mut at = 0usize;
    for (iova, n) in runs {
        let n = n as usize;
        side.read(iova, &mut buf[at..at + n])
            .map_err(|_| fail(CqeSyndrome::LocalAccessErr, vs::UNMAPPED))?;
        at += n;
    }
    Ok(())
}

/// The WQE at basic block `start`: its control segment and all its segments (control
/// included), read across the end of the ring if it wraps.
fn read_wqe(
    side: &Side<'_>,
    q: &Qp,
    start: u16,
    outstanding: u32,
) -> Result<(CtrlSeg, Vec<u8>), Fail> {
    let mut first = [0u8; SEND_WQE_BB];
    read_buf(side, q, sq_offset(q, start), &mut first)?;
    let ctrl = CtrlSeg::read_from_bytes(&first[..WQE_DS]).expect("16 bytes");
    let ds = ctrl.ds();
    let nbb = ds.div_ceil(DS_PER_BB) as u32;
    if ds == 0 || ds > MAX_WQE_DS || nbb > outstanding || nbb > q.sq_entries() {
        return Err(fail(CqeSyndrome::LocalQpOpErr, vs::BAD_DS));
    }
    let mut segs = vec![0u8; nbb as usize * SEND_WQE_BB];
    segs[..SEND_WQE_BB].copy_from_slice(&first);
    for i in 1..nbb as u16 {
        let at = usize::from(i) * SEND_WQE_BB;
        read_buf(
            side,
            q,
            sq_offset(q, start.wrapping_add(i)),
            &mut segs[at..at + SEND_WQE_BB],
        )?;
    }
    segs.truncate(ds * WQE_DS);
    Ok((ctrl, segs))
}

/// Data segments from `bytes` (16 each). A receive list ends early at a zero count with
/// the invalid lkey.
fn data_segs(bytes: &[u8], recv: bool) -> Result<Vec<DataSeg>, Fail> {
    let mut out = Vec::new();
    for c in bytes.chunks_exact(WQE_DS) {
        let d = DataSeg::read_from_bytes(c).expect("16 bytes");
        if recv && d.byte_count.get() == 0 && d.lkey.get() == INVALID_LKEY {
            break;
        }
        if d.byte_count.get() & INLINE_SEG != 0 {
            return Err(fail(CqeSyndrome::LocalQpOpErr, vs::INLINE));
        }
        out.push(d);
    }
    Ok(out)
}

/// A data segment's length: `byte_count`, where 0 means 2^31.
fn seg_len(d: &DataSeg) -> u64 {
    match d.byte_count.get() {
        0 => 1 << 31,
        n => u64::from(n),
    }
}

/// Resolves `(key, va, len)` through an mkey of PD `pd`: its IOVA runs, or the vendor
/// syndrome (bad key / out of the mkey).
fn resolve(fw: &Firmware, pd: u32, key: u32, va: u64, len: u64) -> Result<Vec<(u64, u64)>, u8> {
    let m = fw
        .mkey(mlx5_prm::cmd::pd_mkey::mkey_to_index(key))
        .filter(|m| m.key() == key && m.pd == pd)
        .ok_or(vs::BAD_KEY)?;
    if len == 0 {
        return Ok(Vec::new());
    }
    m.translate(va, len).map_err(|_| vs::OUT_OF_MKEY)
}

fn resolve_segs(fw: &Firmware, pd: u32, segs: &[DataSeg]) -> Result<Vec<(u64, u64)>, u8> {
    let mut runs = Vec::new();
    for d in segs {
        runs.extend(resolve(fw, pd, d.lkey.get(), d.addr.get(), seg_len(d))?);
    }
    Ok(runs)
}

/// Which side of a copy failed, and how.
enum CopyError {
    Src(DmaError),
    Dst(DmaError),
}

impl CopyError {
    /// The requester's error CQE when the local (`local_src`: the source) or the remote
    /// side failed. A write a P2P window's target refused (it is responder-suspended)
    /// is a remote operation error wherever the window was.
    fn fail(&self, local_is_src: bool) -> Fail {
        let (e, local) = match self {
            CopyError::Src(e) => (e, local_is_src),
            CopyError::Dst(e) => (e, !local_is_src),
        };
        match e {
            DmaError::Refused { .. } => fail(CqeSyndrome::RemoteOpErr, vs::PEER_FROZEN),
            _ if local => fail(CqeSyndrome::LocalAccessErr, vs::UNMAPPED),
            _ => fail(CqeSyndrome::RemoteAccessErr, vs::UNMAPPED),
        }
    }
}

/// A position in a list of IOVA runs.
struct Cursor<'a> {
    runs: &'a [(u64, u64)],
    idx: usize,
    off: u64,
}

impl<'a> Cursor<'a> {
    fn new(runs: &'a [(u64, u64)]) -> Self {
        Cursor {
            runs,
            idx: 0,
            off: 0,
        }
    }

    /// Applies `f(iova, range of buf)` over the next `buf_len` bytes.
    fn each(
        &mut self,
        buf_len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let mut at = 0usize;
        while at < buf_len {
            let Some(&(iova, len)) = self.runs.get(self.idx) else {
                return Err(DmaError::NotMapped {
                    iova: 0,
                    len: (buf_len - at) as u64,
                });
            };
            let n = ((len - self.off) as usize).min(buf_len - at);
            f(iova + self.off, at..at + n)?;
            at += n;
            self.off += n as u64;
            if self.off == len {
                self.idx += 1;
                self.off = 0;
            }
        }
        Ok(())
    }
}

/// Copies `len` bytes from `src_runs` of `src` to `dst_runs` of `dst`, through a bounce
/// buffer of at most [`COPY_CHUNK`] bytes.
fn copy(
    src: &Side<'_>,
    src_runs: &[(u64, u64)],
    dst: &Side<'_>,
    dst_runs: &[(u64, u64)],
    len: u64,
    qpn: u32,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; (len as usize).min(COPY_CHUNK)];
    let (mut s, mut d) = (Cursor::new(src_runs), Cursor::new(dst_runs));
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(COPY_CHUNK);
        let chunk = &mut buf[..n];
        s.each(n, |iova, r| src.read(iova, &mut chunk[r]))
            .map_err(CopyError::Src)?;
        d.each(n, |iova, r| write_for(dst, qpn, iova, &chunk[r]))
            .map_err(CopyError::Dst)?;
        left -= n as u64;
    }
    Ok(())
}

/// Executes one WQE; returns the byte count of its CQE.
fn execute(h: &dyn Host, q: &Qp, ctrl: &CtrlSeg, segs: &[u8]) -> Result<u32, Fail> {
    let op = WqeOpcode::try_from(ctrl.opcode())
        .map_err(|_| fail(CqeSyndrome::LocalQpOpErr, vs::BAD_OPCODE))?;
    if ctrl.qpn() != q.qpn {
        return Err(fail(CqeSyndrome::LocalQpOpErr, vs::BAD_QPN));
    }
    let rdma = matches!(
        op,
        WqeOpcode::RdmaWrite | WqeOpcode::RdmaWriteImm | WqeOpcode::RdmaRead
    );
    let first_data = if rdma { 2 } else { 1 };
    if op == WqeOpcode::Nop {
        return Ok(0);
    }
    if segs.len() < first_data * WQE_DS {
        return Err(fail(CqeSyndrome::LocalQpOpErr, vs::BAD_DS));
    }
    let sges = data_segs(&segs[first_data * WQE_DS..], false)?;
    let total: u64 = sges.iter().map(seg_len).sum();
    if total > 1u64 << q.log_msg_max {
        return Err(fail(CqeSyndrome::LocalLengthErr, vs::TOO_LONG));
    }
    let resolved = resolve_segs(&h.firmware().lock(), q.pd, &sges);
    let local = resolved.map_err(|v| fail(CqeSyndrome::LocalProtErr, v))?;
    let own_id = h.env().id().vhca_id;
    let peer = q
        .peer
        .ok_or(fail(CqeSyndrome::TransportRetryExcErr, vs::NO_PEER))?;
    let (side, _admitted) = if peer.vhca_id == own_id {
        (Side::Own(h), None)
    } else {
        let p = h
            .env()
            .peer(peer.vhca_id)
            .ok_or(fail(CqeSyndrome::TransportRetryExcErr, vs::NO_PEER))?;
        let writer = P2pSource {
            vhca_id: own_id,
            qpn: Some(q.qpn),
        };
        let address = if rdma {
            RaddrSeg::read_from_bytes(&segs[WQE_DS..2 * WQE_DS])
                .expect("16 bytes")
                .raddr
                .get()
        } else {
            0
        };
        // A read changes nothing at the responder; it is admitted all the same, so a
        // frozen function answers nothing at all.
        if !p.admit_dma(writer, address, total) {
            return Err(fail(CqeSyndrome::RemoteOpErr, vs::PEER_FROZEN));
        }
        (Side::Peer(Arc::clone(&p)), Some(Admitted(p)))
    };
    let me = QpPeer {
        vhca_id: own_id,
        qpn: q.qpn,
    };
    let tq = side
        .fw()
        .qp(peer.qpn)
        .filter(|t| t.can_receive() && t.peer == Some(me))
        .cloned()
        .ok_or(fail(CqeSyndrome::TransportRetryExcErr, vs::NO_PEER))?;
    let own = Side::Own(h);
    let imm = ctrl.imm.get();
    match op {
        WqeOpcode::RdmaWrite | WqeOpcode::RdmaWriteImm | WqeOpcode::RdmaRead => {
            let raddr = RaddrSeg::read_from_bytes(&segs[WQE_DS..2 * WQE_DS]).expect("16 bytes");
            let write = op != WqeOpcode::RdmaRead;
            if !(if write { tq.rwe } else { tq.rre }) {
                return Err(fail(CqeSyndrome::RemoteInvalReqErr, vs::NOT_ENABLED));
            }
            let resolved = resolve(
                &side.fw(),
                tq.pd,
                raddr.rkey.get(),
                raddr.raddr.get(),
                total,
            );
            let remote = resolved.map_err(|v| fail(CqeSyndrome::RemoteAccessErr, v))?;
            let r = if write {
                copy(&own, &local, &side, &remote, total, q.qpn)
            } else {
                copy(&side, &remote, &own, &local, total, q.qpn)
            };
            r.map_err(|e| e.fail(write))?;
            if op == WqeOpcode::RdmaWriteImm {
                let msg = Incoming {
                    total,
                    imm: Some(imm),
                    scatter: false,
                    solicited: ctrl.solicited(),
                };
                receive(Src::Runs(&own, &local), &side, &tq, msg, q.qpn)?;
            }
        }
        WqeOpcode::Send | WqeOpcode::SendImm => {
            let imm = (op == WqeOpcode::SendImm).then_some(imm);
            let msg = Incoming {
                total,
                imm,
                scatter: true,
                solicited: ctrl.solicited(),
            };
            receive(Src::Runs(&own, &local), &side, &tq, msg, q.qpn)?;
        }
        WqeOpcode::Nop => {}
    }
    Ok(total.min(u64::from(u32::MAX)) as u32)
}

/// A message arriving at a responder QP: its length, immediate data, and whether it is
/// scattered into the receive WQE (SEND) or only completes it (RDMA_WRITE_IMM).
struct Incoming {
    total: u64,
    imm: Option<u32>,
    scatter: bool,
    /// Sent with the solicited-event bit: its receive CQE fires ARM_SOLICITED.
    solicited: bool,
}

/// Where the bytes of an incoming message come from: the requester's local runs, or
/// a firmware buffer (a message the firmware sends on a QP's behalf).
enum Src<'s, 'h> {
    Runs(&'s Side<'h>, &'s [(u64, u64)]),
    Bytes(&'s [u8]),
}

/// The responder's half of a SEND (scatter into the next receive WQE) or an
/// RDMA_WRITE_IMM (`scatter` false: the WQE is consumed for its CQE only).
fn receive(
    src: Src<'_, '_>,
    side: &Side<'_>,
    tq: &Qp,
    msg: Incoming,
    qpn: u32,
) -> Result<(), Fail> {
    let Incoming {
        total,
        imm,
        scatter,
        solicited,
    } = msg;
    let responder = |syndrome, vendor, resp| Fail {
        syndrome,
        vendor,
        responder: Some(resp),
    };
    if !tq.has_rq {
        return Err(fail(CqeSyndrome::RemoteInvalReqErr, vs::NO_RECV));
    }
    let (rq_pi, _) =
        read_dbr(side, tq.dbr).map_err(|_| fail(CqeSyndrome::RemoteAccessErr, vs::UNMAPPED))?;
    if rq_pi == tq.rq_ci as u16 {
        return Err(fail(CqeSyndrome::RnrRetryExcErr, vs::NO_RECV));
    }
    let slot = tq.rq_ci % tq.rq_entries();
    let stride = 16usize << tq.log_rq_stride;
    let wqe_counter = tq.rq_ci as u16;
    let fail_resp = |f: Fail| {
        if let Some(resp) = f.responder {
            responder_error(side, tq.qpn, wqe_counter, resp);
        }
        f
    };
    if scatter {
        let mut wqe = vec![0u8; stride];
        read_buf(side, tq, u64::from(slot) * stride as u64, &mut wqe).map_err(|_| {
            fail_resp(responder(
                CqeSyndrome::RemoteOpErr,
                vs::UNMAPPED,
                CqeSyndrome::LocalAccessErr,
            ))
        })?;
        let sges = data_segs(&wqe, true).map_err(|f| {
            fail_resp(responder(
                CqeSyndrome::RemoteInvalReqErr,
                f.vendor,
                CqeSyndrome::LocalQpOpErr,
            ))
        })?;
        let room: u64 = sges.iter().map(seg_len).sum();
        if room < total {
            return Err(fail_resp(responder(
                CqeSyndrome::RemoteInvalReqErr,
                vs::TOO_LONG,
                CqeSyndrome::LocalLengthErr,
            )));
        }
        // The firmware lock is released before a failure is handled (that takes it).
        let resolved = resolve_segs(&side.fw(), tq.pd, &sges);
        let dst = resolved.map_err(|v| {
            fail_resp(responder(
                CqeSyndrome::RemoteAccessErr,
                v,
                CqeSyndrome::LocalProtErr,
            ))
        })?;
        let copied = match src {
            Src::Runs(own, local) => copy(own, local, side, &dst, total, qpn),
            Src::Bytes(b) => Cursor::new(&dst)
                .each(b.len(), |iova, r| write_for(side, qpn, iova, &b[r]))
                .map_err(CopyError::Dst),
        };
        copied.map_err(|e| match e {
            CopyError::Src(_) => e.fail(true),
            CopyError::Dst(DmaError::Refused { .. }) => e.fail(true),
            CopyError::Dst(_) => fail_resp(responder(
                CqeSyndrome::RemoteAccessErr,
                vs::UNMAPPED,
                CqeSyndrome::LocalAccessErr,
            )),
        })?;
    }
    // Consume the receive WQE (unless the QP changed meanwhile) and complete it.
    let cqn = {
        let mut fw = side.fw();
        match fw.qp_mut(tq.qpn) {
            Some(t) if t.rq_ci == tq.rq_ci && t.can_receive() => {
                t.rq_ci = t.rq_ci.wrapping_add(1);
                t.cqn_rcv
            }
            _ => return Ok(()),
        }
    };
    let opcode = match (imm, scatter) {
        (Some(_), false) => CqeOpcode::RespWrImm,
        (Some(_), true) => CqeOpcode::RespSendImm,
        _ => CqeOpcode::RespSend,
    };
    let mut cqe = Cqe::new_zeroed();
    cqe.imm.set(imm.unwrap_or(0));
    cqe.byte_cnt.set(total.min(u64::from(u32::MAX)) as u32);
    cqe.sop_drop_qpn.set(tq.qpn);
    cqe.wqe_counter.set(wqe_counter);
    post_cqe(side, cqn, opcode, cqe.as_bytes(), solicited);
    Ok(())
}

/// The responder QP `qpn` fails on receive WQE `wqe_counter`: it is consumed with an
/// error CQE, the QP goes to ERR and its engine flushes the rest.
fn responder_error(side: &Side<'_>, qpn: u32, wqe_counter: u16, syndrome: CqeSyndrome) {
    let cqn = {
        let mut fw = side.fw();
        let Some(t) = fw.qp_mut(qpn) else { return };
        t.rq_ci = t.rq_ci.wrapping_add(1);
        t.state = QpState::Err;
        t.cqn_rcv
    };
    post_cqe(
        side,
        cqn,
        CqeOpcode::RespErr,
        err_cqe(qpn, 0, wqe_counter, syndrome, vs::FLUSHED).as_bytes(),
        false,
    );
    side.kick(qpn);
}

fn err_cqe(qpn: u32, opcode: u8, wqe_counter: u16, syndrome: CqeSyndrome, vendor: u8) -> ErrCqe {
    let mut e = ErrCqe::new_zeroed();
    e.syndrome = syndrome.into();
    e.vendor_err_synd = vendor;
    e.s_wqe_opcode_qpn
        .set((u32::from(opcode) << 24) | (qpn & 0x00ff_ffff));
    e.wqe_counter.set(wqe_counter);
    e
}

/// Moves `qpn` to ERR (its engine then flushes what is outstanding).
fn to_err(side: &Side<'_>, qpn: u32) {
    if let Some(q) = side.fw().qp_mut(qpn) {
        q.state = QpState::Err;
    }
    side.kick(qpn);
}

/// Ends the WQE that started at `start`: advances the send counter, writes the CQE
/// (always on error; on success if the WQE asked for one) and, on error, moves the QP
/// to ERR.
fn complete(
    h: &dyn Host,
    q: &Qp,
    start: u16,
    nbb: u16,
    opcode: u8,
    result: Result<(u32, bool), Fail>,
) {
    let own = Side::Own(h);
    let cqn = {
        let mut fw = h.firmware().lock();
        let Some(cur) = fw.qp_mut(q.qpn) else { return };
        // A 2RST or 2ERR (or a reset) meanwhile: this WQE's completion is theirs now.
        if cur.sq_ci != start || cur.state != QpState::Rts {
            return;
        }
        cur.sq_ci = start.wrapping_add(nbb.max(1));
        if result.is_err() {
            cur.state = QpState::Err;
        }
        cur.cqn_snd
    };
    match result {
        Ok((bytes, signaled)) => {
            if signaled {
                let mut cqe = Cqe::new_zeroed();
                cqe.byte_cnt.set(bytes);
                cqe.sop_drop_qpn.set(q.qpn);
                cqe.wqe_counter.set(start);
                if !post_cqe(&own, cqn, CqeOpcode::Req, cqe.as_bytes(), false) {
                    to_err(&own, q.qpn);
                }
            }
        }
        Err(f) => {
            tracing::info!(
                vhca_id = h.env().id().vhca_id,
                qpn = q.qpn,
                wqe = start,
                opcode,
                syndrome = %f.syndrome,
                vendor = f.vendor,
                "WQE failed; QP to ERR"
            );
            let e = err_cqe(q.qpn, opcode, start, f.syndrome, f.vendor);
            post_cqe(&own, cqn, CqeOpcode::ReqErr, e.as_bytes(), false);
            h.env().dma_kick(q.qpn);
        }
    }
}

/// One flush step of a QP in ERR: the next outstanding send WQE, else the next posted
/// receive WQE, completes with WR_FLUSH_ERR.
fn flush_one(h: &dyn Host, q: &Qp, rq_pi: u16, sq_pi: u16) -> Step {
    let own = Side::Own(h);
    if q.has_sq && sq_pi != q.sq_ci {
        let outstanding = u32::from(sq_pi.wrapping_sub(q.sq_ci));
        let (opcode, nbb) = match read_wqe(&own, q, q.sq_ci, outstanding.min(q.sq_entries())) {
            Ok((c, _)) => (c.opcode(), c.ds().div_ceil(DS_PER_BB) as u16),
            Err(_) => (0, 1),
        };
        // A counter more than a ring ahead is flushed one ring's worth at most.
        let nbb = if outstanding > q.sq_entries() {
            sq_pi.wrapping_sub(q.sq_ci)
        } else {
            nbb
        };
        let cqn = {
            let mut fw = h.firmware().lock();
            let Some(cur) = fw.qp_mut(q.qpn) else {
                return Step::Idle;
            };
            if cur.sq_ci != q.sq_ci || cur.state != QpState::Err {
                return Step::Did;
            }
            cur.sq_ci = q.sq_ci.wrapping_add(nbb.max(1));
            cur.cqn_snd
        };
        let e = err_cqe(q.qpn, opcode, q.sq_ci, CqeSyndrome::WrFlushErr, vs::FLUSHED);
        post_cqe(&own, cqn, CqeOpcode::ReqErr, e.as_bytes(), false);
        return Step::Did;
    }
    if q.has_rq && rq_pi != q.rq_ci as u16 {
        let behind = u32::from(rq_pi.wrapping_sub(q.rq_ci as u16));
        let n = if behind > q.rq_entries() { behind } else { 1 };
        let cqn = {
            let mut fw = h.firmware().lock();
            let Some(cur) = fw.qp_mut(q.qpn) else {
                return Step::Idle;
            };
            if cur.rq_ci != q.rq_ci || cur.state != QpState::Err {
                return Step::Did;
            }
            cur.rq_ci = q.rq_ci.wrapping_add(n);
            cur.cqn_rcv
        };
        let e = err_cqe(
            q.qpn,
            0,
            q.rq_ci as u16,
            CqeSyndrome::WrFlushErr,
            vs::FLUSHED,
        );
        post_cqe(&own, cqn, CqeOpcode::RespErr, e.as_bytes(), false);
        return Step::Did;
    }
    Step::Idle
}

/// Writes a CQE (`bytes` with `op_own` filled in) at the producer index of CQ `cqn` of
/// `side`; false if the CQ is gone, in error or full (it then goes to overflow, as
/// hardware reports a CQ overrun, with a CQ error event). The CQE's last byte, holding
/// the owner bit, is written after the rest, so software never sees a CQE it owns
/// half-written; then, if the CQ is armed and the CQE qualifies (any CQE for ARM_NEXT;
/// a `solicited` or error CQE for ARM_SOLICITED), its completion EQE goes to the CQ's
/// EQ.
fn post_cqe(side: &Side<'_>, cqn: u32, opcode: CqeOpcode, bytes: &[u8], solicited: bool) -> bool {
    let Some(dbr) = side.fw().cq(cqn).map(|c| c.dbr) else {
        return false;
    };
    let mut ci = [0u8; 4];
    let ci_ok = side.read(dbr, &mut ci).is_ok();
    let ci = be32(&ci) & 0x00ff_ffff;
    let cq_error =
        |syndrome: u8| side.async_event(EVENT_TYPE_CQ_ERROR, cq_error_eqe(cqn, syndrome));
    let reserved = {
        let mut fw = side.fw();
        let Some(c) = fw.cq_mut(cqn) else {
            return false;
        };
        if c.status != CQ_STATUS_OK {
            return false;
        }
        if !ci_ok {
            c.status = CQ_STATUS_WRITE_FAIL;
            None
        } else if c.pi.wrapping_sub(ci) & 0x00ff_ffff >= c.entries() {
            tracing::warn!(cqn, pi = c.pi, ci, "CQ overrun; CQ to overflow");
            c.status = CQ_STATUS_OVERFLOW;
            None
        } else {
            let pi = c.pi;
            c.pi = pi.wrapping_add(1) & 0x00ff_ffff;
            let off = u64::from(pi % c.entries()) * CQE_LEN as u64;
            let Some(runs) = c.ring.runs(off, CQE_LEN as u64) else {
                return false;
            };
            // 64 bytes inside one page: a single run.
            Some((runs[0].0, op_own(opcode, pi, c.log_size), pi))
        }
    };
    let Some((iova, own_byte, pi)) = reserved else {
        cq_error(if ci_ok {
            CQ_ERROR_OVERRUN
        } else {
            CQ_ERROR_ACCESS_VIOLATION
        });
        return false;
    };
    let mut cqe = [0u8; CQE_LEN];
    cqe.copy_from_slice(&bytes[..CQE_LEN]);
    cqe[CQE_OP_OWN_OFFSET] = own_byte;
    let written = side.write(iova, &cqe[..CQE_OP_OWN_OFFSET]).is_ok()
        && side
            .write(iova + CQE_OP_OWN_OFFSET as u64, &cqe[CQE_OP_OWN_OFFSET..])
            .is_ok();
    if !written {
        if let Some(c) = side.fw().cq_mut(cqn) {
            c.status = CQ_STATUS_WRITE_FAIL;
        }
        cq_error(CQ_ERROR_ACCESS_VIOLATION);
        return false;
    }
    let solicited = solicited || matches!(opcode, CqeOpcode::ReqErr | CqeOpcode::RespErr);
    let fired = side
        .fw()
        .cq_mut(cqn)
        .and_then(|c| c.cqe_written(pi, solicited));
    if let Some(eqn) = fired {
        side.post_eqe(eqn, comp_eqe(cqn));
    }
    true
}

/// Why a firmware-originated SEND did not land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FwSendError {
    /// The sending QP is not in RTS, or not connected to a ready QP of this function.
    #[error("the sending QP is not connected to a ready QP of this function")]
    NotReady,
    /// The receiving QP has no receive WQE posted (an RNR NAK: try again later).
    #[error("no receive WQE posted at the receiving QP")]
    NoRecv,
    /// The receive failed (its WQE completed with an error CQE, the QP went to ERR).
    #[error("the receive failed: {0}")]
    Failed(CqeSyndrome),
}

/// A SEND_IMM of `data` with immediate `imm` that the firmware makes on behalf of QP
/// `qpn` of this function (a page tracker's report from its `reporting_qpn`): the
/// next receive WQE of the QP `qpn` is connected to consumes it and completes with
/// RESP_SEND_IMM, exactly as if the QP had posted it. The sending QP needs neither a
/// send queue nor a CQ (nothing completes on its side). Its peer must be on this
/// function (force loopback, as mlx5vf connects them).
pub fn fw_send(h: &dyn Host, qpn: u32, data: &[u8], imm: u32) -> Result<(), FwSendError> {
    let own_id = h.env().id().vhca_id;
    let q = h
        .firmware()
        .lock()
        .qp(qpn)
        .filter(|q| q.can_send())
        .cloned()
        .ok_or(FwSendError::NotReady)?;
    let peer = q
        .peer
        .filter(|p| p.vhca_id == own_id)
        .ok_or(FwSendError::NotReady)?;
    let me = QpPeer {
        vhca_id: own_id,
        qpn,
    };
    let tq = h
        .firmware()
        .lock()
        .qp(peer.qpn)
        .filter(|t| t.can_receive() && t.peer == Some(me))
        .cloned()
        .ok_or(FwSendError::NotReady)?;
    let msg = Incoming {
        total: data.len() as u64,
        imm: Some(imm),
        scatter: true,
        solicited: false,
    };
    receive(Src::Bytes(data), &Side::Own(h), &tq, msg, qpn).map_err(|f| match f.syndrome {
        CqeSyndrome::RnrRetryExcErr => FwSendError::NoRecv,
        s => FwSendError::Failed(s),
    })
}
