//! The HCA section: life cycle, ISSI and the GENERAL capability page (CUR) as
//! SET_HCA_CAP left it.

use mlx5_prm::cmd::caps::HCA_CAP_SIZE;
use mlx5_prm::state_image::{HcaSectionHead, LifeCycle};
use zerocopy::FromZeros;

use super::codec::{bad, zeroed, R, W};
use super::{HcaImage, ObjectsImage, StateError, HCA_SECTION_LEN};
use crate::firmware::checks::{check_general_caps, check_issi, check_startup_pages};

pub(super) fn encode(h: &HcaImage) -> Vec<u8> {
    let mut head = HcaSectionHead::new_zeroed();
    head.life_cycle = h.life_cycle.into();
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
    let life_cycle = LifeCycle::try_from(head.life_cycle)
        .map_err(|_| bad("life_cycle", head.life_cycle.into(), "0, 1 or 2"))?;
    let caps_len = head.caps_len.get();
    if caps_len as usize != HCA_CAP_SIZE {
        return Err(bad("caps length", caps_len.into(), "4096"));
    }
    let caps = r.take(u64::from(caps_len), "caps")?.into();
    r.end()?;
    Ok(HcaImage {
        life_cycle,
        issi: head.issi.get(),
        caps,
    })
}

/// Reruns SET_ISSI's and SET_HCA_CAP's checks on the section, and INIT_HCA's page check
/// for an initialized HCA (with the firmware pages of the OBJECTS section).
pub(super) fn check(h: &HcaImage, objects: &ObjectsImage) -> Result<(), StateError> {
    check_issi(h.issi.into()).map_err(StateError::Hca)?;
    check_general_caps(&h.caps).map_err(StateError::Caps)?;
    if h.life_cycle == LifeCycle::Initialized {
        check_startup_pages(objects.fw_pages.len()).map_err(StateError::FwPage)?;
    }
    Ok(())
}
