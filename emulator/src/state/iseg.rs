//! The ISEG section: the init-segment state the driver programmed (command queue
//! address and `nic_interface`), so the guest's queue keeps working after the move.

use mlx5_prm::iseg::{CMDQ_ADDR_L_MASK, NIC_INTERFACE_MASK, NIC_INTERFACE_SHIFT};
use mlx5_prm::state_image::IsegSection;
use zerocopy::FromZeros;

use super::codec::{bad, zeroed, R, W};
use super::{IsegImage, StateError, ISEG_SECTION_LEN};

/// Low bits of the command queue address that must be zero (`cmdq_addr_l_sz` carries
/// only address bits 31:12).
pub const CMDQ_ADDRESS_ALIGN_MASK: u64 = !CMDQ_ADDR_L_MASK as u64;
/// Largest `nic_interface` the register holds (its 3 bits; the register keeps whatever
/// the guest wrote, so the image does too).
pub const NIC_INTERFACE_MAX: u8 = (NIC_INTERFACE_MASK >> NIC_INTERFACE_SHIFT) as u8;

pub(super) fn encode(i: &IsegImage) -> Vec<u8> {
    let mut s = IsegSection::new_zeroed();
    s.cmdq_address.set(i.cmdq_address);
    s.nic_interface = i.nic_interface;
    let mut w = W(Vec::with_capacity(ISEG_SECTION_LEN));
    w.put(&s);
    w.0
}

pub(super) fn decode(b: &[u8]) -> Result<IsegImage, StateError> {
    let mut r = R::new(b, "ISEG");
    let s: IsegSection = r.get("ISEG")?;
    r.end()?;
    let cmdq_address = s.cmdq_address.get();
    if cmdq_address & CMDQ_ADDRESS_ALIGN_MASK != 0 {
        return Err(bad("cmdq address", cmdq_address, "4 KiB aligned"));
    }
    if s.nic_interface > NIC_INTERFACE_MAX {
        return Err(bad("nic_interface", s.nic_interface.into(), "0..=7"));
    }
    zeroed(&s.rsvd, "ISEG reserved")?;
    Ok(IsegImage {
        cmdq_address,
        nic_interface: s.nic_interface,
    })
}
