//! The HCA section: life cycle, ISSI and the GENERAL capability page (CUR) as
//! SET_HCA_CAP left it.

use mlx5_prm::cmd::caps::HCA_CAP_SIZE;
use mlx5_prm::state_image::HcaSectionHead;
use zerocopy::FromZeros;

use super::codec::{bad, zeroed, R, W};
use super::{HcaImage, StateError, HCA_SECTION_LEN};

pub(super) fn encode(h: &HcaImage) -> Vec<u8> {
    let mut head = HcaSectionHead::new_zeroed();
    head.life_cycle = h.life_cycle;
    head.issi.set(h.issi);
    head.caps_len.set(h.caps.len() as u32);
    let mut w = W(Vec::with_capacity(HCA_SECTION_LEN));
    w.put(&head).bytes(&h.caps);
    w.0
}

pub(super) fn decode(b: &[u8]) -> Result<HcaImage, StateError> {
    let mut r = R::new(b, "HCA");
    let head: HcaSectionHead = r.get("HCA head")?;
    zeroed(&[head.rsvd], "HCA reserved")?;
    let caps_len = head.caps_len.get();
    if caps_len as usize != HCA_CAP_SIZE {
        return Err(bad("caps length", caps_len.into(), "4096"));
    }
    let caps = r.take(u64::from(caps_len), "caps")?.into();
    r.end()?;
    Ok(HcaImage {
        life_cycle: head.life_cycle,
        issi: head.issi.get(),
        caps,
    })
}
