//! Interrupts as a guest driver sets them up over vfio-user: MSI-X enabled in config
//! space, a vector's eventfd assigned with DEVICE_SET_IRQS.

use std::os::fd::AsRawFd;

use mlx5_emulator::pci::caps::{MSIX_CAP_OFFSET, MSIX_FLAGS_ENABLE, MSIX_FLAGS_OFFSET};
use vfu::uapi::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vmm_sys_util::eventfd::EventFd;

/// Sets MSI-X Enable in the function's MSI-X capability.
pub fn enable_msix(c: &mut vfu::Client) {
    let flags = MSIX_CAP_OFFSET as u64 + MSIX_FLAGS_OFFSET as u64;
    let mut ctl = [0u8; 2];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, flags, &mut ctl)
        .expect("MSI-X flags read");
    let ctl = u16::from_le_bytes(ctl) | MSIX_FLAGS_ENABLE;
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, flags, &ctl.to_le_bytes())
        .expect("MSI-X flags write");
}

/// A fresh non-blocking eventfd assigned to MSI-X `vector`.
pub fn msix_eventfd(c: &mut vfu::Client, vector: u32) -> EventFd {
    let efd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        vector,
        1,
        &[],
        &[efd.as_raw_fd()],
    )
    .expect("DEVICE_SET_IRQS eventfd");
    efd
}
