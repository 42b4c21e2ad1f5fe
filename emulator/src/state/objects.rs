//! The OBJECTS section: UARs, PDs, EQs with their PAS lists and indices, the command
//! EQ, mkeys with their MTT lists, firmware pages.

use std::collections::BTreeSet;

use mlx5_prm::cmd::eq::{
    CREATE_EQ_IN_EVENT_BITMASK_WORDS, EQ_BASE_PAGE_SIZE, EQ_DOORBELL_CI_MASK, EVENT_TYPE_CMD,
};

use super::codec::{bad, flag, R, W};
use super::{EqImage, MkeyImage, ObjectsImage, StateError};
use crate::firmware::checks::*;

pub(super) fn encode(o: &ObjectsImage) -> Vec<u8> {
    let mut w = W(Vec::new());
    w.count(o.uars.len());
    o.uars.iter().for_each(|&u| {
        w.u32(u);
    });
    w.count(o.pds.len());
    o.pds.iter().for_each(|&p| {
        w.u32(p);
    });
    w.u8(u8::from(o.cmd_eq.is_some()))
        .u8(o.cmd_eq.unwrap_or(0))
        .u16(0);
    w.count(o.eqs.len());
    for e in &o.eqs {
        w.u8(e.eqn).u8(u8::from(e.armed)).u16(e.intr).u32(e.uar);
        w.u32(e.log_size).u64(e.page_size);
        w.u32(e.pi).u32(e.written).u32(e.ci);
        w.count(e.event_bitmask.len());
        e.event_bitmask.iter().for_each(|&m| {
            w.u64(m);
        });
        w.count(e.pas.len());
        e.pas.iter().for_each(|&a| {
            w.u64(a);
        });
    }
    w.count(o.mkeys.len());
    for m in &o.mkeys {
        w.u32(m.index).u8(m.variant).u8(0).u16(0).u32(m.pd);
        w.u64(m.start).u64(m.len).u32(m.log_page_size);
        w.count(m.mtt.len());
        m.mtt.iter().for_each(|&a| {
            w.u64(a);
        });
    }
    w.count(o.fw_pages.len());
    o.fw_pages.iter().for_each(|&a| {
        w.u64(a);
    });
    w.0
}

pub(super) fn decode(b: &[u8]) -> Result<ObjectsImage, StateError> {
    let mut r = R::new(b, "OBJECTS");
    let uars = r.u32s("UAR list")?;
    let pds = r.u32s("PD list")?;
    let has_cmd_eq = flag(r.u8("cmd_eq present")?, "cmd_eq present")?;
    let cmd_eq_n = r.u8("cmd_eq")?;
    r.zero(2, "OBJECTS reserved")?;
    let cmd_eq = has_cmd_eq.then_some(cmd_eq_n);
    // The smallest EQ entry: fixed fields + two empty lists.
    let neq = r.count(36, "EQ list")?;
    let mut eqs = Vec::with_capacity(neq);
    for _ in 0..neq {
        let eqn = r.u8("eqn")?;
        let armed = flag(r.u8("EQ armed")?, "EQ armed")?;
        let intr = r.u16("EQ intr")?;
        let uar = r.u32("EQ uar")?;
        let log_size = r.u32("EQ log_size")?;
        let page_size = r.u64("EQ page_size")?;
        let pi = r.u32("EQ pi")?;
        let written = r.u32("EQ written")?;
        let ci = r.u32("EQ ci")?;
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
            eqn,
            uar,
            intr,
            log_size,
            page_size,
            pas,
            event_bitmask,
            pi,
            written,
            ci,
            armed,
        });
    }
    let nmkeys = r.count(36, "mkey list")?;
    let mut mkeys = Vec::with_capacity(nmkeys);
    for _ in 0..nmkeys {
        let index = r.u32("mkey index")?;
        let variant = r.u8("mkey variant")?;
        r.zero(3, "mkey reserved")?;
        let pd = r.u32("mkey pd")?;
        let start = r.u64("mkey start")?;
        let len = r.u64("mkey len")?;
        let log_page_size = r.u32("mkey log_page_size")?;
        let mtt = r.u64s("mkey MTT")?;
        mkeys.push(MkeyImage {
            index,
            variant,
            pd,
            start,
            len,
            log_page_size,
            mtt,
        });
    }
    let fw_pages = r.u64s("firmware page list")?;
    r.end()?;
    Ok(ObjectsImage {
        uars,
        pds,
        cmd_eq,
        eqs,
        mkeys,
        fw_pages,
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
    let mut eqns = BTreeSet::new();
    let mut cmd_eq = None;
    for e in &o.eqs {
        check_eq(e, &uars, cmd_eq)?;
        if !eqns.insert(e.eqn) {
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
