//! A client we did not write: the `vfio_user` crate (0.1.7, rust-vmm) drives a VF of
//! the in-process adapter, and the emulator side checks that what the client did
//! arrived.
//!
//! The crate's client has known bugs (docs in `vfio-user.md` section 3.5). These tests
//! work around them here, never in our server:
//! - `Client::resettable()` is inverted: it reports `false` exactly when the server
//!   sets `VFIO_DEVICE_FLAGS_RESET`, so a correct server reads as "not resettable".
//! - The client never checks the Error bit: it always reads a success-sized reply, so
//!   an error reply would hang or desynchronise it. Nothing here provokes an error; the
//!   emulator side is inspected instead of relying on the client's `Ok(())`.
//! - It proposes version 0.1 and capabilities `{max_msg_fds, max_data_xfer_size,
//!   migration: {pgsize}}`; our server must answer 0.0 and a `migration` object with a
//!   numeric `pgsize` (the crate fails to parse anything else), which `Client::new`
//!   checks for us.
//! - It does not expose the number of IRQ indices from DEVICE_GET_INFO (the field is
//!   private), and asking for an index past the end would be an error reply. So the
//!   five indices are queried one by one and the count itself is not asserted through
//!   this client.
//!
//! Every blocking client call runs under a deadline so that a hang fails the test
//! instead of stalling the run.

use mlx5_emulator::pci;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use mlx5_prm::iseg::{CMDIF_REV, CMDIF_REV_FW_SUB_OFFSET, CMDIF_REV_SHIFT};
use mlx5_testbed::mem::memfd;
use mlx5_testbed::wait::{bounded, eventually};
use mlx5_testbed::Testbed;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The VF as designed.
const VENDOR_ID: u16 = 0x15b3;
const DEVICE_ID: u16 = 0x101e;
const NUM_REGIONS: u32 = 9;
const BAR0_REGION: u32 = 0;
const BAR2_REGION: u32 = 2;
const CONFIG_REGION: u32 = 7;
const BAR0_SIZE: u64 = 0x200_0000;
const CONFIG_SIZE: u64 = 4096;
const NUM_IRQ_INDICES: u32 = 5;
const MSIX_IRQ_INDEX: u32 = 2;
const MSIX_VECTORS: u32 = 16;

/// Config space offsets (PCI Local Bus spec), as the emulator's config space names them.
const PCI_VENDOR_ID: u64 = pci::VENDOR_ID_OFFSET as u64;
const PCI_COMMAND: u64 = pci::COMMAND_OFFSET as u64;
const PCI_COMMAND_MEMORY: u16 = pci::COMMAND_MEMORY_SPACE;
const PCI_STATUS: u64 = pci::STATUS_OFFSET as u64;
const PCI_STATUS_CAP_LIST: u16 = pci::STATUS_CAP_LIST;
const PCI_CLASS_PROG: u64 = pci::CLASS_CODE_OFFSET as u64;
const PCI_CAPABILITY_LIST: u64 = pci::CAPABILITY_LIST_OFFSET as u64;
const PCI_INTERRUPT_LINE: u64 = pci::INTERRUPT_LINE_OFFSET as u64;
const PCI_CAP_ID_MSIX: u8 = pci::caps::CAP_ID_MSIX;
const PCI_MSIX_FLAGS_ENABLE: u16 = pci::caps::MSIX_FLAGS_ENABLE;
const PCI_MSIX_FLAGS_MASKALL: u16 = pci::caps::MSIX_FLAGS_MASKALL;

/// DMA window used by the tests.
const IOVA: u64 = 0x1_0000_0000;
const DMA_SIZE: u64 = 64 * 1024;

/// Whole-test limit; every step is a few local socket round trips.
const TEST_DEADLINE: Duration = Duration::from_secs(30);
/// How long the server thread may take to clean up after a client's EOF.
const CLEANUP_WAIT: Duration = Duration::from_secs(5);

fn connect(path: &Path) -> Client {
    Client::new(path).unwrap_or_else(|e| panic!("vfio_user::Client::new({path:?}): {e:?}"))
}

fn read_bytes<const N: usize>(c: &mut Client, region: u32, offset: u64) -> [u8; N] {
    let mut buf = [0u8; N];
    c.region_read(region, offset, &mut buf)
        .unwrap_or_else(|e| panic!("REGION_READ region {region} offset {offset:#x}: {e:?}"));
    buf
}

fn write_bytes(c: &mut Client, region: u32, offset: u64, data: &[u8]) {
    c.region_write(region, offset, data)
        .unwrap_or_else(|e| panic!("REGION_WRITE region {region} offset {offset:#x}: {e:?}"));
}

fn cfg_read8(c: &mut Client, offset: u64) -> u8 {
    read_bytes::<1>(c, CONFIG_REGION, offset)[0]
}

fn cfg_read16(c: &mut Client, offset: u64) -> u16 {
    u16::from_le_bytes(read_bytes(c, CONFIG_REGION, offset))
}

fn cfg_write16(c: &mut Client, offset: u64, value: u16) {
    write_bytes(c, CONFIG_REGION, offset, &value.to_le_bytes());
}

/// Walks the standard capability list through region 7 and returns the offset of
/// capability `id`.
fn find_capability(c: &mut Client, id: u8) -> Option<u64> {
    if cfg_read16(c, PCI_STATUS) & PCI_STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut at = u64::from(cfg_read8(c, PCI_CAPABILITY_LIST) & !0x3);
    // A list longer than the header-space capability slots would be a loop.
    for _ in 0..48 {
        if at == 0 {
            return None;
        }
        let [cap_id, next] = read_bytes::<2>(c, CONFIG_REGION, at);
        if cap_id == id {
            return Some(at);
        }
        at = u64::from(next & !0x3);
    }
    panic!("capability list does not terminate");
}

/// Turns MSI-X on (enable set, function mask clear) through config space.
fn enable_msix(c: &mut Client) {
    let cap = find_capability(c, PCI_CAP_ID_MSIX).expect("VF has an MSI-X capability");
    let ctl = cfg_read16(c, cap + 2);
    cfg_write16(
        c,
        cap + 2,
        (ctl | PCI_MSIX_FLAGS_ENABLE) & !PCI_MSIX_FLAGS_MASKALL,
    );
    assert_ne!(cfg_read16(c, cap + 2) & PCI_MSIX_FLAGS_ENABLE, 0);
}

/// BAR0 offset of the MSI-X PBA, from the capability (BIR must be BAR0).
fn msix_pba_offset(c: &mut Client) -> u64 {
    let cap = find_capability(c, PCI_CAP_ID_MSIX).expect("VF has an MSI-X capability");
    let pba = u32::from_le_bytes(read_bytes(c, CONFIG_REGION, cap + 8));
    assert_eq!(pba & 0x7, 0, "PBA lives in BAR0");
    u64::from(pba & !0x7)
}

#[test]
fn vfio_user_crate_client_negotiates_and_lists_regions_and_irqs() {
    mlx5_testbed::init_tracing();
    bounded(TEST_DEADLINE, || {
        let tb = Testbed::start(1);
        // Client::new negotiates (our 0.0 answer to its 0.1 proposal, JSON it can
        // parse), then fetches DEVICE_GET_INFO and every region's info.
        let mut c = connect(&tb.vf_socket(0));

        // The server sets RESET; the crate inverts the flag (bug 2 of section 3.5), so
        // a correct server reads as "not resettable" here.
        assert!(
            !c.resettable(),
            "vfio_user 0.1.7 reports resettable() == !RESET; true means our server did not set VFIO_DEVICE_FLAGS_RESET"
        );

        // The client builds its region list from num_regions, one GET_REGION_INFO each.
        for index in 0..NUM_REGIONS {
            let r = c
                .region(index)
                .unwrap_or_else(|| panic!("region {index} missing"));
            assert_eq!(r.index, index, "region {index} reports its own index");
            // BAR2 (device memory) is the one mmappable region: one sparse area, an fd.
            let bar2 = index == BAR2_REGION;
            assert_eq!(
                r.sparse_areas.len(),
                usize::from(bar2),
                "region {index}: sparse mmap"
            );
            assert_eq!(r.file_offset.is_some(), bar2, "region {index}: mmap fd");
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            match index {
                BAR2_REGION => assert_eq!(r.size, 1 << 20, "BAR2 = --dev-mem default"),
                BAR0_REGION => {
                    assert_eq!(r.size, BAR0_SIZE, "BAR0 size");
                    assert_eq!(r.flags, rw, "BAR0 flags");
                }
                CONFIG_REGION => {
                    assert_eq!(r.size, CONFIG_SIZE, "config region size");
                    assert_eq!(r.flags, rw, "config region flags");
                }
                _ => assert_eq!(r.size, 0, "region {index} is absent (size 0)"),
            }
        }
        assert!(c.region(NUM_REGIONS).is_none(), "exactly 9 regions");

        for index in 0..NUM_IRQ_INDICES {
            let irq = c
                .get_irq_info(index)
                .unwrap_or_else(|e| panic!("GET_IRQ_INFO {index}: {e:?}"));
            assert_eq!(irq.index, index, "IRQ info echoes the index");
            assert_ne!(
                irq.flags & VFIO_IRQ_INFO_EVENTFD,
                0,
                "index {index} takes eventfds"
            );
            match index {
                // A VF has neither INTx nor MSI.
                0 | 1 => assert_eq!(irq.count, 0, "IRQ index {index} count"),
                MSIX_IRQ_INDEX => {
                    assert_eq!(irq.count, MSIX_VECTORS, "MSI-X vectors");
                    assert_ne!(irq.flags & VFIO_IRQ_INFO_NORESIZE, 0, "MSI-X is NORESIZE");
                }
                // ERR and REQ.
                _ => assert_eq!(irq.count, 1, "IRQ index {index} count"),
            }
        }
        c.shutdown().expect("shutdown");
    });
}

#[test]
fn vfio_user_crate_client_reads_ids_and_init_segment() {
    mlx5_testbed::init_tracing();
    bounded(TEST_DEADLINE, || {
        let tb = Testbed::start(1);
        let mut c = connect(&tb.vf_socket(0));

        let ids: [u8; 4] = read_bytes(&mut c, CONFIG_REGION, PCI_VENDOR_ID);
        assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), VENDOR_ID, "vendor");
        assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), DEVICE_ID, "device");
        let class: [u8; 3] = read_bytes(&mut c, CONFIG_REGION, PCI_CLASS_PROG);
        assert_eq!(class, [0x00, 0x00, 0x02], "class: Ethernet controller");

        // The whole 64-byte header in one read agrees with the narrow reads.
        let header: [u8; 64] = read_bytes(&mut c, CONFIG_REGION, 0);
        assert_eq!(header[..4], ids);
        assert_eq!(header[9..12], class);

        // Init segment `cmdif_rev_fw_sub` (big-endian), the revision in the upper half.
        let rev = u32::from_be_bytes(read_bytes(&mut c, BAR0_REGION, CMDIF_REV_FW_SUB_OFFSET));
        assert_eq!(
            rev >> CMDIF_REV_SHIFT,
            u32::from(CMDIF_REV),
            "cmdif_rev_fw_sub = {rev:#010x}"
        );
        c.shutdown().expect("shutdown");
    });
}

#[test]
fn vfio_user_crate_client_dma_maps_memfd_resets_and_unmaps() {
    mlx5_testbed::init_tracing();
    bounded(TEST_DEADLINE, || {
        let tb = Testbed::start(1);
        let vf = tb.vf(0);
        let mut c = connect(&tb.vf_socket(0));
        assert!(
            vf.dma().windows().is_empty(),
            "no DMA maps before the client's"
        );

        let mem = memfd("interop-guest-ram", DMA_SIZE);
        c.dma_map(0, IOVA, DMA_SIZE, mem.as_raw_fd())
            .expect("DMA_MAP");
        let windows = vf.dma().windows();
        assert_eq!(windows.len(), 1, "one window after DMA_MAP: {windows:?}");
        assert_eq!(windows[0].iova, IOVA);
        assert_eq!(windows[0].size, DMA_SIZE);
        assert_eq!(windows[0].flags, 0x3, "the crate always maps READ|WRITE");

        // The device writes guest memory; the client sees it in its memfd.
        let msg = b"written by the device";
        vf.dma()
            .write(IOVA + 0x1230, msg)
            .expect("device DMA write");
        let mut seen = [0u8; 21];
        mem.read_exact_at(&mut seen, 0x1230).expect("read memfd");
        assert_eq!(&seen, msg);
        // The client writes its memory; the device reads it, across a page boundary.
        mem.write_all_at(b"from the driver", 0x2ff8)
            .expect("write memfd");
        let mut got = [0u8; 15];
        vf.dma()
            .read(IOVA + 0x2ff8, &mut got)
            .expect("device DMA read");
        assert_eq!(&got, b"from the driver");

        // DEVICE_RESET returns config space to power-on and keeps the VMM's DMA maps.
        let cmd = cfg_read16(&mut c, PCI_COMMAND);
        cfg_write16(&mut c, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY);
        assert_ne!(cfg_read16(&mut c, PCI_COMMAND) & PCI_COMMAND_MEMORY, 0);
        c.reset().expect("DEVICE_RESET");
        assert_eq!(
            cfg_read16(&mut c, PCI_COMMAND) & PCI_COMMAND_MEMORY,
            0,
            "reset clears memory enable"
        );
        assert_eq!(vf.dma().windows(), windows, "reset keeps DMA maps");
        // The BAR still answers after the reset.
        let rev = u32::from_be_bytes(read_bytes(&mut c, BAR0_REGION, CMDIF_REV_FW_SUB_OFFSET));
        assert_eq!(rev >> CMDIF_REV_SHIFT, u32::from(CMDIF_REV));

        c.dma_unmap(IOVA, DMA_SIZE).expect("DMA_UNMAP");
        assert!(
            vf.dma().windows().is_empty(),
            "DMA_UNMAP removed the window"
        );
        assert!(
            vf.dma().write(IOVA, b"x").is_err(),
            "device DMA into an unmapped IOVA fails"
        );
        c.shutdown().expect("shutdown");
    });
}

#[test]
fn vfio_user_crate_client_reconnect_keeps_config_and_drops_dma_maps() {
    mlx5_testbed::init_tracing();
    bounded(TEST_DEADLINE, || {
        let tb = Testbed::start(1);
        let vf = tb.vf(0);
        let mem = memfd("interop-reconnect", DMA_SIZE);

        {
            let mut c = connect(&tb.vf_socket(0));
            write_bytes(&mut c, CONFIG_REGION, PCI_INTERRUPT_LINE, &[0x5a]);
            let cmd = cfg_read16(&mut c, PCI_COMMAND);
            cfg_write16(&mut c, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY);
            c.dma_map(0, IOVA, DMA_SIZE, mem.as_raw_fd())
                .expect("DMA_MAP");
            assert_eq!(vf.dma().windows().len(), 1, "map arrived");
            // Disconnect: shutdown, then drop (closing the fd).
            c.shutdown().expect("shutdown");
        }

        assert!(
            eventually(CLEANUP_WAIT, || vf.dma().windows().is_empty()),
            "DMA maps still present {CLEANUP_WAIT:?} after the client disconnected: {:?}",
            vf.dma().windows()
        );

        let mut c = connect(&tb.vf_socket(0));
        assert_eq!(
            cfg_read8(&mut c, PCI_INTERRUPT_LINE),
            0x5a,
            "Interrupt Line survives a reconnect"
        );
        assert_ne!(
            cfg_read16(&mut c, PCI_COMMAND) & PCI_COMMAND_MEMORY,
            0,
            "memory enable survives a reconnect"
        );
        // The same window can be mapped again: nothing of the old map is left.
        c.dma_map(0, IOVA, DMA_SIZE, mem.as_raw_fd())
            .expect("DMA_MAP after reconnect");
        assert_eq!(vf.dma().windows().len(), 1, "re-map arrived");
        vf.dma().write(IOVA, b"again").expect("device DMA write");
        let mut seen = [0u8; 5];
        mem.read_exact_at(&mut seen, 0).expect("read memfd");
        assert_eq!(&seen, b"again");

        // Dropping the client without shutdown is a disconnect too.
        drop(c);
        assert!(
            eventually(CLEANUP_WAIT, || vf.dma().windows().is_empty()),
            "DMA maps still present after the second client was dropped"
        );
    });
}

#[test]
fn vfio_user_crate_client_msix_eventfd_fires_and_pending_survives_reconnect() {
    mlx5_testbed::init_tracing();
    bounded(TEST_DEADLINE, || {
        let tb = Testbed::start(1);
        let vf = tb.vf(0);
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

        let efd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        {
            let mut c = connect(&tb.vf_socket(0));
            enable_msix(&mut c);
            c.set_irqs(MSIX_IRQ_INDEX, trigger, 0, 1, &[efd.as_raw_fd()])
                .expect("SET_IRQS MSI-X vector 0");
            assert!(
                vf.lock().irqs.has_eventfd(MSIX_IRQ_INDEX, 0),
                "vector 0 eventfd arrived"
            );
            assert!(vf.raise_msix(0), "vector 0 delivered");
            assert_eq!(efd.read().expect("eventfd fired"), 1);
            c.shutdown().expect("shutdown");
        }

        // The server drops the client's eventfds on disconnect.
        assert!(
            eventually(CLEANUP_WAIT, || !vf
                .lock()
                .irqs
                .has_eventfd(MSIX_IRQ_INDEX, 0)),
            "MSI-X eventfd still assigned after the client disconnected"
        );
        // With no eventfd the interrupt waits in the PBA, and the old eventfd stays quiet.
        assert!(!vf.raise_msix(0), "nothing to deliver to");
        assert!(
            efd.read().is_err(),
            "the old client's eventfd must not fire"
        );

        let mut c = connect(&tb.vf_socket(0));
        let pba = msix_pba_offset(&mut c);
        let bits = u64::from_le_bytes(read_bytes(&mut c, BAR0_REGION, pba));
        assert_eq!(bits & 1, 1, "vector 0 pending in the PBA (read {bits:#x})");

        // Wiring a new eventfd delivers the pending interrupt (MSI-X is still enabled:
        // config state survived the reconnect).
        let efd2 = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        c.set_irqs(MSIX_IRQ_INDEX, trigger, 0, 1, &[efd2.as_raw_fd()])
            .expect("SET_IRQS after reconnect");
        assert_eq!(efd2.read().expect("pending interrupt delivered"), 1);
        let bits = u64::from_le_bytes(read_bytes(&mut c, BAR0_REGION, pba));
        assert_eq!(bits & 1, 0, "PBA bit cleared on delivery (read {bits:#x})");
        c.shutdown().expect("shutdown");
    });
}
