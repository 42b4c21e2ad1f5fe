//! The OBJECTS section: UARs, PDs, EQs with their PAS lists and indices, the command
//! EQ, mkeys with their MTT lists, firmware pages.

use std::collections::BTreeSet;

use mlx5_prm::cmd::eq::{
    CREATE_EQ_IN_EVENT_BITMASK_WORDS, EQ_BASE_PAGE_SIZE, EQ_DOORBELL_CI_MASK, EVENT_TYPE_CMD,
};

use mlx5_prm::cmd::cq::{CQ_STATUS_OK, CQ_STATUS_OVERFLOW, CQ_STATUS_WRITE_FAIL};
use mlx5_prm::cmd::qp::QpState;
use mlx5_prm::state_image::{
    CmdEqField, CqEntryHead, EqEntryHead, MkeyEntryHead, QpEntryHead, CQ_ENTRY_HEAD_LEN,
    EQ_ENTRY_HEAD_LEN, LIST_COUNT_LEN, MKEY_ENTRY_HEAD_LEN, QP_ENTRY_HEAD_LEN, QP_FLAGS_ALL,
    QP_FLAG_PEER, QP_FLAG_RQ, QP_FLAG_RRE, QP_FLAG_RWE, QP_FLAG_SQ,
};
use zerocopy::FromZeros;

use super::codec::{bad, flag, zeroed, R, W};
use super::{CqImage, EqImage, MkeyImage, ObjectsImage, QpImage, StateError};
use crate::firmware::checks::*;
use crate::firmware::{CqArm, QpPeer, Ring};

fn list<T: Copy>(w: &mut W, items: &[T], mut put: impl FnMut(&mut W, T)) {
    w.count(items.len());
    for &v in items {
        put(w, v);
    }
}

pub(super) fn encode(o: &ObjectsImage) -> Vec<u8> {
    let mut w = W(Vec::new());
    list(&mut w, &o.uars, |w, u| {
        w.u32(u);
    });
    list(&mut w, &o.pds, |w, p| {
        w.u32(p);
    });
    let mut cmd_eq = CmdEqField::new_zeroed();
    cmd_eq.present = u8::from(o.cmd_eq.is_some());
    cmd_eq.eqn = o.cmd_eq.unwrap_or(0);
    w.put(&cmd_eq);
    w.count(o.eqs.len());
    for e in &o.eqs {
        let mut h = EqEntryHead::new_zeroed();
        h.eqn = e.eqn;
        h.armed = u8::from(e.armed);
        h.intr.set(e.intr);
        h.uar.set(e.uar);
        h.log_size.set(e.log_size);
        h.page_size.set(e.page_size);
        h.pi.set(e.pi);
        h.written.set(e.written);
        h.ci.set(e.ci);
        w.put(&h);
        list(&mut w, &e.event_bitmask, |w, m| {
            w.u64(m);
        });
        list(&mut w, &e.pas, |w, a| {
            w.u64(a);
        });
    }
    w.count(o.mkeys.len());
    for m in &o.mkeys {
        let mut h = MkeyEntryHead::new_zeroed();
        h.index.set(m.index);
        h.variant = m.variant;
        h.pd.set(m.pd);
        h.start.set(m.start);
        h.len.set(m.len);
        h.log_page_size.set(m.log_page_size);
        w.put(&h);
        list(&mut w, &m.mtt, |w, a| {
            w.u64(a);
        });
    }
    list(&mut w, &o.fw_pages, |w, a| {
        w.u64(a);
    });
    w.count(o.cqs.len());
    for c in &o.cqs {
        let mut h = CqEntryHead::new_zeroed();
        h.cqn.set(c.cqn);
        h.log_size = c.log_size;
        h.log_page_size = c.ring.log_page_size;
        h.status = c.status;
        h.eqn = c.eqn;
        h.uar.set(c.uar);
        h.pi.set(c.pi);
        h.dbr.set(c.dbr);
        w.put(&h);
        list(&mut w, &c.ring.pas, |w, a| {
            w.u64(a);
        });
    }
    w.count(o.qps.len());
    for q in &o.qps {
        let mut h = QpEntryHead::new_zeroed();
        h.qpn.set(q.qpn);
        h.state = q.state.into();
        let bit = |on: bool, b: u8| if on { b } else { 0 };
        h.flags = bit(q.has_rq, QP_FLAG_RQ)
            | bit(q.has_sq, QP_FLAG_SQ)
            | bit(q.rre, QP_FLAG_RRE)
            | bit(q.rwe, QP_FLAG_RWE)
            | bit(q.peer.is_some(), QP_FLAG_PEER);
        h.log_msg_max = q.log_msg_max;
        h.log_rq_size = q.log_rq_size;
        h.log_rq_stride = q.log_rq_stride;
        h.log_sq_size = q.log_sq_size;
        h.log_page_size = q.buf.log_page_size;
        h.pd.set(q.pd);
        h.uar.set(q.uar);
        h.cqn_snd.set(q.cqn_snd);
        h.cqn_rcv.set(q.cqn_rcv);
        h.dbr.set(q.dbr);
        if let Some(p) = q.peer {
            h.peer_vhca_id.set(p.vhca_id);
            h.peer_qpn.set(p.qpn);
        }
        h.sq_ci.set(q.sq_ci);
        h.rq_ci.set(q.rq_ci);
        w.put(&h);
        list(&mut w, &q.buf.pas, |w, a| {
            w.u64(a);
        });
    }
    w.0
}

/// The smallest CQ entry: its head and an empty PAS.
const CQ_ENTRY_MIN: usize = CQ_ENTRY_HEAD_LEN + LIST_COUNT_LEN;
/// The smallest QP entry: its head and an empty PAS.
const QP_ENTRY_MIN: usize = QP_ENTRY_HEAD_LEN + LIST_COUNT_LEN;

fn decode_queues(r: &mut R<'_>) -> Result<(Vec<CqImage>, Vec<QpImage>), StateError> {
    if r.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let ncq = r.count(CQ_ENTRY_MIN, "CQ list")?;
    let mut cqs = Vec::with_capacity(ncq);
    for _ in 0..ncq {
        let h: CqEntryHead = r.get("CQ")?;
        let pas = r.u64s("CQ PAS list")?;
        cqs.push(CqImage {
            cqn: h.cqn.get(),
            log_size: h.log_size,
            ring: Ring {
                log_page_size: h.log_page_size,
                pas,
            },
            uar: h.uar.get(),
            eqn: h.eqn,
            dbr: h.dbr.get(),
            pi: h.pi.get(),
            status: h.status,
            arm: CqArm::Idle,
            arm_sn: 0,
            written: h.pi.get(),
            last_solicited: None,
        });
    }
    let nqp = r.count(QP_ENTRY_MIN, "QP list")?;
    let mut qps = Vec::with_capacity(nqp);
    for _ in 0..nqp {
        let h: QpEntryHead = r.get("QP")?;
        zeroed(&[h.rsvd], "QP reserved")?;
        if h.flags & !QP_FLAGS_ALL != 0 {
            return Err(bad("QP flags", h.flags.into(), "QP_FLAG_* bits only"));
        }
        let state = QpState::try_from(h.state)
            .map_err(|_| bad("QP state", h.state.into(), "a qpc state"))?;
        let pas = r.u64s("QP PAS list")?;
        let f = |b: u8| h.flags & b != 0;
        qps.push(QpImage {
            qpn: h.qpn.get(),
            state,
            pd: h.pd.get(),
            uar: h.uar.get(),
            log_msg_max: h.log_msg_max,
            has_rq: f(QP_FLAG_RQ),
            log_rq_size: h.log_rq_size,
            log_rq_stride: h.log_rq_stride,
            has_sq: f(QP_FLAG_SQ),
            log_sq_size: h.log_sq_size,
            buf: Ring {
                log_page_size: h.log_page_size,
                pas,
            },
            cqn_snd: h.cqn_snd.get(),
            cqn_rcv: h.cqn_rcv.get(),
            dbr: h.dbr.get(),
            rre: f(QP_FLAG_RRE),
            rwe: f(QP_FLAG_RWE),
            peer: f(QP_FLAG_PEER).then(|| QpPeer {
                vhca_id: h.peer_vhca_id.get(),
                qpn: h.peer_qpn.get(),
            }),
            sq_ci: h.sq_ci.get(),
            rq_ci: h.rq_ci.get(),
        });
    }
    Ok((cqs, qps))
}

/// Entries reserved ahead at most; a longer list grows as its entries decode (each
/// one consuming its bytes).
const RESERVE_CAP: usize = 64;

/// The smallest EQ entry: its head and two empty lists.
const EQ_ENTRY_MIN: usize = EQ_ENTRY_HEAD_LEN + 2 * LIST_COUNT_LEN;
/// The smallest mkey entry: its head and an empty MTT.
const MKEY_ENTRY_MIN: usize = MKEY_ENTRY_HEAD_LEN + LIST_COUNT_LEN;

pub(super) fn decode(b: &[u8]) -> Result<ObjectsImage, StateError> {
    let mut r = R::new(b, "OBJECTS");
    let uars = r.u32s("UAR list")?;
    let pds = r.u32s("PD list")?;
    let c: CmdEqField = r.get("cmd_eq")?;
    let has_cmd_eq = flag(c.present, "cmd_eq present")?;
    zeroed(&c.rsvd, "OBJECTS reserved")?;
    let cmd_eq = has_cmd_eq.then_some(c.eqn);
    let neq = r.count(EQ_ENTRY_MIN, "EQ list")?;
    // A count is refused above the firmware's table before anything is reserved, and
    // the reservation itself never exceeds the table: a decoded entry takes more room
    // than its smallest encoding, so a count that merely fits the bytes could reserve
    // several times the section's size.
    if neq as u64 > MAX_NUM_EQS {
        return Err(bad("EQ count", neq as u64, "at most MAX_NUM_EQS (8)"));
    }
    let mut eqs = Vec::with_capacity(neq);
    for _ in 0..neq {
        let h: EqEntryHead = r.get("EQ")?;
        let words = r.u32("EQ event_bitmask words")?;
        if words as usize != CREATE_EQ_IN_EVENT_BITMASK_WORDS {
            return Err(bad(
                "EQ event_bitmask words",
                words.into(),
                "CREATE_EQ_IN_EVENT_BITMASK_WORDS",
            ));
        }
        let mut event_bitmask = [0u64; CREATE_EQ_IN_EVENT_BITMASK_WORDS];
        for m in &mut event_bitmask {
            *m = r.u64("EQ event_bitmask")?;
        }
        let pas = r.u64s("EQ PAS list")?;
        eqs.push(EqImage {
            eqn: h.eqn,
            uar: h.uar.get(),
            intr: h.intr.get(),
            log_size: h.log_size.get(),
            page_size: h.page_size.get(),
            pas,
            event_bitmask,
            pi: h.pi.get(),
            written: h.written.get(),
            ci: h.ci.get(),
            armed: flag(h.armed, "EQ armed")?,
        });
    }
    let nmkeys = r.count(MKEY_ENTRY_MIN, "mkey list")?;
    if nmkeys as u64 > u64::from(MAX_MKEYS) {
        return Err(bad("mkey count", nmkeys as u64, "at most MAX_MKEYS"));
    }
    let mut mkeys = Vec::with_capacity(nmkeys.min(RESERVE_CAP));
    for _ in 0..nmkeys {
        let h: MkeyEntryHead = r.get("mkey")?;
        zeroed(&h.rsvd, "mkey reserved")?;
        let mtt = r.u64s("mkey MTT")?;
        mkeys.push(MkeyImage {
            index: h.index.get(),
            variant: h.variant,
            pd: h.pd.get(),
            start: h.start.get(),
            len: h.len.get(),
            log_page_size: h.log_page_size.get(),
            mtt,
        });
    }
    let fw_pages = r.u64s("firmware page list")?;
    let (cqs, qps) = decode_queues(&mut r)?;
    r.end()?;
    Ok(ObjectsImage {
        uars,
        pds,
        cmd_eq,
        eqs,
        mkeys,
        fw_pages,
        cqs,
        qps,
    })
}

/// Reruns the live commands' checks on every object (ALLOC_UAR, ALLOC_PD,
/// MANAGE_PAGES, CREATE_EQ, CREATE_MKEY), plus what only an image can get wrong:
/// numbers the firmware would have handed out itself, duplicates, list lengths that
/// must be exact.
pub(super) fn check(o: &ObjectsImage) -> Result<(), StateError> {
    let mut uars = BTreeSet::new();
    for &u in &o.uars {
        check_uar_index(u).map_err(StateError::Uar)?;
        if !uars.insert(u) {
            return Err(bad("UAR", u.into(), "each UAR once"));
        }
    }
    let mut pds = BTreeSet::new();
    for &pd in &o.pds {
        check_pd_index(pd).map_err(StateError::Pd)?;
        if !pds.insert(pd) {
            return Err(bad("PD", pd.into(), "each PD once"));
        }
    }
    check_page_count(o.fw_pages.len()).map_err(StateError::FwPage)?;
    let mut pages = BTreeSet::new();
    for &pa in &o.fw_pages {
        check_fw_page(&BTreeSet::new(), &mut pages, pa).map_err(StateError::FwPage)?;
    }
    let mut eqns = std::collections::BTreeMap::new();
    let mut cmd_eq = None;
    for e in &o.eqs {
        check_eq(e, &uars, cmd_eq)?;
        let completion = mlx5_prm::cmd::eq::is_completion_eq(&e.event_bitmask);
        if eqns.insert(e.eqn, completion).is_some() {
            return Err(bad("EQ number", e.eqn.into(), "each EQ once"));
        }
        if e.wants(EVENT_TYPE_CMD) {
            cmd_eq = Some(e.eqn);
        }
    }
    if o.cmd_eq != cmd_eq {
        let got = o.cmd_eq.map_or(u64::MAX, u64::from);
        return Err(bad("command EQ", got, "the EQ taking command events"));
    }
    let mut mkeys = BTreeSet::new();
    for m in &o.mkeys {
        check_mkey(m, &pds)?;
        if !mkeys.insert(m.index) {
            return Err(bad("mkey index", m.index.into(), "each mkey once"));
        }
    }
    check_queues(o, &uars, &pds, &eqns)
}

/// CQs and QPs as CREATE_CQ / CREATE_QP and the transitions would have left them, with
/// the firmware's own numbers, each once.
fn check_queues(
    o: &ObjectsImage,
    uars: &BTreeSet<u32>,
    pds: &BTreeSet<u32>,
    eqns: &std::collections::BTreeMap<u8, bool>,
) -> Result<(), StateError> {
    let mut cqs = std::collections::BTreeMap::new();
    for c in &o.cqs {
        let live = |source| StateError::Queue {
            what: "CQ",
            id: c.cqn,
            source,
        };
        if !(1..=MAX_CQS).contains(&c.cqn) {
            return Err(bad("CQ number", c.cqn.into(), "1..=MAX_CQS"));
        }
        if ![CQ_STATUS_OK, CQ_STATUS_OVERFLOW, CQ_STATUS_WRITE_FAIL].contains(&c.status) {
            return Err(bad(
                "CQ status",
                c.status.into(),
                "OK, overflow or write failure",
            ));
        }
        if c.pi > 0x00ff_ffff {
            return Err(bad("CQ producer counter", c.pi.into(), "24 bits"));
        }
        check_cq(c, uars, eqns).map_err(live)?;
        if cqs.insert(c.cqn, c.clone()).is_some() {
            return Err(bad("CQ number", c.cqn.into(), "each CQ once"));
        }
    }
    let mut qpns = BTreeSet::new();
    for q in &o.qps {
        let live = |source| StateError::Queue {
            what: "QP",
            id: q.qpn,
            source,
        };
        if !(FIRST_QPN..FIRST_QPN + MAX_QPS).contains(&q.qpn) {
            return Err(bad(
                "QP number",
                q.qpn.into(),
                "FIRST_QPN..FIRST_QPN+MAX_QPS",
            ));
        }
        check_qp(q, uars, pds, &cqs).map_err(live)?;
        let connected = matches!(
            q.state,
            QpState::Rtr | QpState::Rts | QpState::Sqer | QpState::SqDrained
        );
        if connected && q.peer.is_none() {
            return Err(bad("QP peer", 0, "a peer for a QP past INIT2RTR"));
        }
        if matches!(q.state, QpState::Rst | QpState::Init) && q.peer.is_some() {
            return Err(bad("QP peer", 1, "no peer before INIT2RTR"));
        }
        if q.peer.is_some_and(|p| p.qpn > 0x00ff_ffff) {
            return Err(bad(
                "QP peer QPN",
                q.peer.map_or(0, |p| p.qpn).into(),
                "24 bits",
            ));
        }
        if q.state == QpState::Rst && (q.sq_ci != 0 || q.rq_ci != 0) {
            return Err(bad("QP counters", q.sq_ci.into(), "0 in RST"));
        }
        if !qpns.insert(q.qpn) {
            return Err(bad("QP number", q.qpn.into(), "each QP once"));
        }
    }
    Ok(())
}

/// An EQ as CREATE_EQ would have created it with the firmware's own EQ number.
fn check_eq(e: &EqImage, uars: &BTreeSet<u32>, cmd_eq: Option<u8>) -> Result<(), StateError> {
    let live = |source| StateError::Eq { eqn: e.eqn, source };
    let last = u64::from(FIRST_EQN) + MAX_NUM_EQS - 1;
    if !(u64::from(FIRST_EQN)..=last).contains(&u64::from(e.eqn)) {
        return Err(bad(
            "EQ number",
            e.eqn.into(),
            "FIRST_EQN..FIRST_EQN+MAX_NUM_EQS",
        ));
    }
    // The image keeps the page size in bytes; CREATE_EQ took it as a log.
    let log_page = match e.page_size.checked_div(EQ_BASE_PAGE_SIZE) {
        Some(n) if n.is_power_of_two() && e.page_size.is_multiple_of(EQ_BASE_PAGE_SIZE) => {
            u64::from(n.trailing_zeros())
        }
        _ => return Err(bad("EQ page size", e.page_size, "4 KiB << log_page_size")),
    };
    check_eqc(e.log_size.into(), log_page, e.intr.into(), 0).map_err(live)?;
    check_eq_uar(uars, e.uar).map_err(live)?;
    let npages = eq_page_count(e.log_size.into(), e.page_size);
    if e.pas.len() as u64 != npages {
        return Err(bad(
            "EQ PAS count",
            e.pas.len() as u64,
            "the pages the ring needs",
        ));
    }
    for (i, &pa) in e.pas.iter().enumerate() {
        check_eq_page(i, pa).map_err(live)?;
    }
    check_cmd_eq(e.wants(EVENT_TYPE_CMD), cmd_eq).map_err(live)?;
    if e.ci > EQ_DOORBELL_CI_MASK {
        return Err(bad("EQ ci", e.ci.into(), "24 bits"));
    }
    Ok(())
}

/// An mkey as CREATE_MKEY would have created it with the firmware's own index.
fn check_mkey(m: &MkeyImage, pds: &BTreeSet<u32>) -> Result<(), StateError> {
    let live = |source| StateError::Mkey {
        index: m.index,
        source,
    };
    if !(1..=MAX_MKEYS).contains(&m.index) {
        return Err(bad("mkey index", m.index.into(), "1..=MAX_MKEYS"));
    }
    let lps = u64::from(m.log_page_size);
    let needed = check_mkey_range(lps, m.start, m.len).map_err(live)?;
    check_pd(pds, m.pd).map_err(live)?;
    check_mtt_len(m.mtt.len() as u64, needed).map_err(live)?;
    if m.mtt.len() as u64 != needed {
        return Err(bad(
            "mkey MTT count",
            m.mtt.len() as u64,
            "the pages the range needs",
        ));
    }
    for (i, &a) in m.mtt.iter().enumerate() {
        if a & MTT_PERM_MASK != 0 {
            return Err(bad("mkey MTT entry", a, "permission bits cleared"));
        }
        check_mtt_entry(i, a, lps).map_err(live)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An objects section: empty UAR and PD lists, no cmd_eq, then `neq` EQ entries of
    /// the smallest encoding (zeros), an empty mkey list, an empty page list.
    fn with_eqs(neq: u32) -> Vec<u8> {
        let mut w = W(Vec::new());
        w.u32(0).u32(0);
        w.put(&CmdEqField::new_zeroed());
        w.u32(neq);
        w.0.resize(w.0.len() + neq as usize * EQ_ENTRY_MIN, 0);
        w.u32(0).u32(0);
        w.0
    }

    #[test]
    fn a_count_above_the_firmware_table_is_refused_before_anything_is_reserved() {
        let e = decode(&with_eqs(100_000)).unwrap_err();
        assert!(e.to_string().contains("EQ count"), "{e}");
        // Within the table the count is read on (and these zero entries are refused
        // for what they hold, not for their number).
        let e = decode(&with_eqs(2)).unwrap_err();
        assert!(!e.to_string().contains("EQ count"), "{e}");
    }
}
