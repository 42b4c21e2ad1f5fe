//! The OBJECTS section: UARs, PDs, EQs with their PAS lists and indices, the command
//! EQ, mkeys with their MTT lists, firmware pages.

use mlx5_prm::cmd::eq::CREATE_EQ_IN_EVENT_BITMASK_WORDS;

use super::codec::{bad, flag, R, W};
use super::{EqImage, MkeyImage, ObjectsImage, StateError};

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
