//! Our vfio-user client against our server, over real sockets, with a real adapter
//! behind: every command round-trips, and hostile input gets a clear errno while the
//! connection stays in sync.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mlx5_emulator::bar0::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};
use mlx5_emulator::pci::caps::{PCIE_CAP_OFFSET, PCIE_DEVCTL_BCR_FLR, PCIE_DEVCTL_OFFSET};
use mlx5_emulator::pci::INTERRUPT_LINE_OFFSET;
use mlx5_prm::iseg::{CMDIF_REV, CMDIF_REV_FW_SUB_OFFSET, CMDIF_REV_SHIFT, CMDQ_ADDR_H_OFFSET};
use mlx5_testbed::irq::{enable_msix, msix_eventfd};
use mlx5_testbed::mem::memfd;
use mlx5_testbed::reply::remote_errno;
use mlx5_testbed::wait::wait_until;
use mlx5_testbed::{init_tracing, Testbed};
use vfu::proto::*;
use vfu::uapi::*;
use vfu::{Client, Errno, VfuError};
use vmm_sys_util::eventfd::EventFd;

const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const INTERRUPT_LINE: u64 = INTERRUPT_LINE_OFFSET as u64;

fn raw_errno(c: &mut Client, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Errno {
    match c.send_raw(cmd, 0, payload, fds).expect("transport") {
        Some(Err(e)) => e,
        other => panic!("expected an error reply to command {cmd}, got {other:?}"),
    }
}

fn assert_in_sync(c: &mut Client) {
    let info = c.device_info().expect("connection still in sync");
    assert_eq!(info.num_regions, VFIO_PCI_NUM_REGIONS);
}

fn read_u16(c: &mut Client, region: u32, off: u64) -> u16 {
    let mut b = [0u8; 2];
    c.region_read(region, off, &mut b).unwrap();
    u16::from_le_bytes(b)
}

#[test]
fn device_regions_and_irqs_are_described() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    let caps = c.server_caps().clone();
    assert_eq!(caps.max_msg_fds, 16);
    assert_eq!(caps.max_data_xfer_size, 1 << 20);
    let info = c.device_info().unwrap();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let bar0 = c.region_info(BAR0).unwrap();
    assert_eq!(bar0.size, 32 << 20);
    assert_eq!(
        bar0.flags,
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
    );
    let cfg = c.region_info(CONFIG).unwrap();
    assert_eq!(cfg.size, 4096);
    for i in [1, 3, 4, 5, 6, 8] {
        assert_eq!(c.region_info(i).unwrap().size, 0, "region {i}");
    }
    // BAR2: device memory, mmappable as one sparse area over its memfd.
    let bar2 = c.region_info(2).unwrap();
    assert_eq!(bar2.size, 1 << 20);
    assert_eq!(bar2.sparse_areas, vec![(0, 1 << 20)]);
    assert!(bar2.fd.is_some());
    assert_ne!(bar2.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(remote_errno(c.region_info(9)), Errno::EINVAL);
    let msix = c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(msix.count, 16);
    assert_eq!(msix.flags, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE);
    assert_eq!(
        c.irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap().count,
        0,
        "a VF has no INTx"
    );
    assert_eq!(c.irq_info(VFIO_PCI_ERR_IRQ_INDEX).unwrap().count, 1);
    assert_eq!(c.irq_info(VFIO_PCI_REQ_IRQ_INDEX).unwrap().count, 1);
    assert_eq!(remote_errno(c.irq_info(5)), Errno::EINVAL);
    // The PF is 15b3:101d with INTx.
    let mut p = Client::connect(&tb.pf_socket()).unwrap();
    assert_eq!(read_u16(&mut p, CONFIG, 2), 0x101d);
    assert_eq!(p.irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap().count, 1);
}

#[test]
fn every_command_round_trips() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut c = tb.vf_client(0);

    // REGION_READ / REGION_WRITE on config space and BAR0.
    assert_eq!(read_u16(&mut c, CONFIG, 0), 0x15b3);
    assert_eq!(read_u16(&mut c, CONFIG, 2), 0x101e);
    let mut class = [0u8; 3];
    c.region_read(CONFIG, 9, &mut class).unwrap();
    assert_eq!(class, [0, 0, 2]);
    c.region_write(CONFIG, INTERRUPT_LINE, &[0x2b]).unwrap();
    let mut b = [0u8; 1];
    c.region_read(CONFIG, INTERRUPT_LINE, &mut b).unwrap();
    assert_eq!(b, [0x2b]);
    let mut rev = [0u8; 4];
    c.region_read(BAR0, CMDIF_REV_FW_SUB_OFFSET, &mut rev)
        .unwrap();
    assert_eq!(
        u32::from_be_bytes(rev) >> CMDIF_REV_SHIFT,
        u32::from(CMDIF_REV),
        "cmdif_rev"
    );

    // A posted write is applied before a later read (in-order processing).
    c.region_write_posted(BAR0, CMDQ_ADDR_H_OFFSET, &0x1234_5678u32.to_be_bytes())
        .unwrap();
    let mut hi = [0u8; 4];
    c.region_read(BAR0, CMDQ_ADDR_H_OFFSET, &mut hi).unwrap();
    assert_eq!(u32::from_be_bytes(hi), 0x1234_5678);

    // REGION_WRITE_MULTI.
    c.region_write_multi(&[
        (CONFIG, INTERRUPT_LINE, &[0x11]),
        (BAR0, CMDQ_ADDR_H_OFFSET, &[0, 0, 0, 9]),
    ])
    .unwrap();
    c.region_read(CONFIG, INTERRUPT_LINE, &mut b).unwrap();
    assert_eq!(b, [0x11]);
    c.region_read(BAR0, CMDQ_ADDR_H_OFFSET, &mut hi).unwrap();
    assert_eq!(u32::from_be_bytes(hi), 9);

    // DMA_MAP / DMA_UNMAP with a memfd, seen by the device.
    let mem = memfd("test-dma", 0x10000);
    let rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    c.dma_map(0x100000, 0x8000, mem.as_raw_fd(), 0, rw).unwrap();
    c.dma_map(0x200000, 0x8000, mem.as_raw_fd(), 0x8000, rw)
        .unwrap();
    vf.dma().write(0x100010, b"device wrote").unwrap();
    let mut back = [0u8; 12];
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut back, 0x10).unwrap();
    assert_eq!(&back, b"device wrote");
    c.dma_unmap(0x100000, 0x8000).unwrap();
    assert_eq!(vf.dma().windows().len(), 1);
    c.dma_unmap_all().unwrap();
    assert!(vf.dma().is_empty());

    // DEVICE_SET_IRQS with an eventfd, then the device raises MSI-X vector 3.
    let efd = msix_eventfd(&mut c, 3);
    enable_msix(&mut c);
    assert!(vf.raise_msix(3));
    assert_eq!(efd.read().unwrap(), 1);
    // DATA_NONE|TRIGGER fires the vector from the client side (loopback).
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        3,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(efd.read().unwrap(), 1);
    // DATA_BOOL|TRIGGER.
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
        3,
        1,
        &[1],
        &[],
    )
    .unwrap();
    assert_eq!(efd.read().unwrap(), 1);
    // De-assign (eventfd data with no fds), then disable the whole index.
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        3,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert!(!vf.raise_msix(3));
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
        &[],
    )
    .unwrap();

    // DEVICE_RESET returns config space to power-on.
    c.reset().unwrap();
    c.region_read(CONFIG, INTERRUPT_LINE, &mut b).unwrap();
    assert_eq!(b, [0]);

    // Not supported yet: answered with ENOTSUP, connection in sync.
    assert_eq!(
        remote_errno(c.device_feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            &[],
            16
        )),
        Errno::ENOTSUP
    );
    assert_eq!(remote_errno(c.mig_data_read(4096)), Errno::ENOTSUP);
    assert_eq!(remote_errno(c.mig_data_write(&[1, 2, 3])), Errno::ENOTSUP);
    let io_fds = IrqInfoWire {
        argsz: 16,
        flags: 0,
        index: 0,
        count: 0,
    };
    assert_eq!(
        raw_errno(
            &mut c,
            Command::DeviceGetRegionIoFds as u16,
            &io_fds.encode(),
            &[]
        ),
        Errno::ENOTSUP
    );
    assert_in_sync(&mut c);
}

#[test]
fn unknown_command_gets_enosys_then_the_next_command_works() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    for cmd in [0u16, 14, 19, 0xffff] {
        // A payload too, which the server must consume.
        assert_eq!(
            raw_errno(&mut c, cmd, &[0xa5; 100], &[]),
            Errno::ENOSYS,
            "command {cmd}"
        );
        assert_in_sync(&mut c);
    }
    // Server-to-client commands sent the wrong way.
    assert_eq!(
        raw_errno(&mut c, Command::DmaRead as u16, &[0; 16], &[]),
        Errno::EINVAL
    );
    assert_in_sync(&mut c);
}

#[test]
fn error_replies_are_typed_reply_with_a_nonzero_errno() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut s = UnixStream::connect(tb.vf_socket(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    let h = Header {
        msg_id: 7,
        command: 99,
        msg_size: 16,
        flags: 0,
        error: 0,
    };
    s.write_all(&h.encode()).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    let rh = Header::decode(&r);
    assert_eq!(rh.flags, FLAGS_TYPE_REPLY | FLAGS_ERROR);
    assert_eq!(rh.msg_id, 7);
    assert_eq!(rh.command, 99);
    assert_eq!(rh.msg_size, 16);
    assert_ne!(rh.error, 0);
}

#[test]
fn version_rules() {
    init_tracing();
    let tb = Testbed::start(1);
    // A command before VERSION is refused.
    let mut c = Client::unnegotiated(UnixStream::connect(tb.vf_socket(0)).unwrap()).unwrap();
    assert_eq!(
        raw_errno(
            &mut c,
            Command::DeviceGetInfo as u16,
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[]
        ),
        Errno::EINVAL
    );
    // Major 1 is not spoken; bad JSON is EINVAL; then a good proposal works.
    let mut w = Writer::new();
    w.u16(1).u16(0);
    assert_eq!(
        raw_errno(&mut c, Command::Version as u16, &w.finish(), &[]),
        Errno::ENOTSUP
    );
    let mut w = Writer::new();
    w.u16(0)
        .u16(0)
        .bytes(b"{\"capabilities\":{\"max_msg_fds\":\"lots\"}}\0");
    assert_eq!(
        raw_errno(&mut c, Command::Version as u16, &w.finish(), &[]),
        Errno::EINVAL
    );
    // A migration object without fields, and a higher minor: answered with minor 0.
    let mut w = Writer::new();
    w.u16(0)
        .u16(7)
        .bytes(b"{\"capabilities\":{\"migration\":{},\"max_msg_fds\":4}}\0");
    let reply = c
        .send_raw(Command::Version as u16, 0, &w.finish(), &[])
        .unwrap()
        .unwrap()
        .unwrap();
    let mut r = Reader::new(&reply.payload);
    assert_eq!((r.u16().unwrap(), r.u16().unwrap()), (0, 0));
    let text = r.rest();
    assert_eq!(text.last(), Some(&0), "JSON ends in NUL");
    let caps = vfu::caps::Capabilities::parse(text).unwrap();
    assert!(caps.migration);
    assert!(
        !caps.write_multiple,
        "not offered by the client, not answered"
    );
    // VERSION twice is refused.
    let mut w = Writer::new();
    w.u16(0).u16(0);
    assert_eq!(
        raw_errno(&mut c, Command::Version as u16, &w.finish(), &[]),
        Errno::EINVAL
    );
    assert_in_sync(&mut c);
}

#[test]
fn hostile_sizes_and_lengths() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);

    // Above the cap: the payload is consumed, E2BIG, still in sync.
    let big = vec![0u8; (1 << 20) + 64 * 1024 + 1];
    let r = c
        .send_raw(Command::RegionWrite as u16, 0, &big, &[])
        .unwrap()
        .unwrap();
    assert_eq!(r.unwrap_err(), Errno::E2BIG);
    assert_in_sync(&mut c);

    // argsz lies.
    let gi = DeviceInfo {
        argsz: 8,
        ..Default::default()
    };
    assert_eq!(
        raw_errno(&mut c, Command::DeviceGetInfo as u16, &gi.encode(), &[]),
        Errno::EINVAL
    );
    let ri = RegionInfoWire {
        argsz: 31,
        index: 0,
        ..Default::default()
    };
    assert_eq!(
        raw_errno(
            &mut c,
            Command::DeviceGetRegionInfo as u16,
            &ri.encode(),
            &[]
        ),
        Errno::EINVAL
    );
    let mem = memfd("test-dma", 0x4000);
    let dm = DmaMap {
        argsz: 16,
        flags: 3,
        offset: 0,
        address: 0,
        size: 0x1000,
    };
    assert_eq!(
        raw_errno(
            &mut c,
            Command::DmaMap as u16,
            &dm.encode(),
            &[mem.as_raw_fd()]
        ),
        Errno::EINVAL
    );
    // REGION_WRITE whose count does not match its data.
    let mut p = RegionAccess {
        offset: INTERRUPT_LINE,
        region: CONFIG,
        count: 8,
    }
    .encode();
    p.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        raw_errno(&mut c, Command::RegionWrite as u16, &p, &[]),
        Errno::EINVAL
    );
    // A truncated fixed part.
    assert_eq!(
        raw_errno(&mut c, Command::RegionRead as u16, &[0; 10], &[]),
        Errno::EINVAL
    );
    assert_in_sync(&mut c);

    // Offsets: overflow of u64, past the end, a region with no data, an index past the end.
    let mut four = [0u8; 4];
    assert_eq!(
        remote_errno(c.region_read(CONFIG, u64::MAX - 1, &mut four)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.region_write(CONFIG, 4094, &four)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.region_write(BAR0, (32 << 20) - 2, &four)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.region_read(VFIO_PCI_ROM_REGION_INDEX, 0, &mut four)),
        Errno::EINVAL
    );
    assert_eq!(remote_errno(c.region_read(9, 0, &mut four)), Errno::EINVAL);
    // A read above max_data_xfer_size in one message.
    let huge = RegionAccess {
        offset: 0,
        region: BAR0,
        count: (1 << 20) + 1,
    };
    assert_eq!(
        raw_errno(&mut c, Command::RegionRead as u16, &huge.encode(), &[]),
        Errno::EINVAL
    );
    assert_in_sync(&mut c);
}

#[test]
fn hostile_dma_and_irq_requests() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut c = tb.vf_client(0);
    let mem = memfd("test-dma", 0x40000);
    let rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

    c.dma_map(0x10000, 0x4000, mem.as_raw_fd(), 0, rw).unwrap();
    // Overlap, in every position.
    for (iova, size) in [
        (0x10000, 0x4000),
        (0xf000, 0x2000),
        (0x13000, 0x2000),
        (0x8000, 0x20000),
    ] {
        assert_eq!(
            remote_errno(c.dma_map(iova, size, mem.as_raw_fd(), 0, rw)),
            Errno::EEXIST,
            "{iova:#x}"
        );
    }
    // Past the end of the file, unaligned, wrapping, no permission bits.
    assert_eq!(
        remote_errno(c.dma_map(0x40000, 0x2000, mem.as_raw_fd(), 0x3f000, rw)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.dma_map(0x40001, 0x1000, mem.as_raw_fd(), 0, rw)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.dma_map(u64::MAX - 0xfff, 0x2000, mem.as_raw_fd(), 0, rw)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.dma_map(0x40000, 0x1000, mem.as_raw_fd(), 0, 0)),
        Errno::EINVAL
    );
    // Without an fd the client keeps the memory: a read-only window (QEMU's ROM ranges)
    // and a writable one (guest RAM that is not shared memory) are both served with
    // DMA_READ / DMA_WRITE requests to the client (tests/p2p.rs covers them in full);
    // a client without a DMA handler refuses them, and the device access fails.
    let ro = DmaMap {
        argsz: 32,
        flags: VFIO_DMA_MAP_FLAG_READ,
        offset: 0,
        address: 0xc0000,
        size: 0x20000,
    };
    assert!(c
        .send_raw(Command::DmaMap as u16, 0, &ro.encode(), &[])
        .unwrap()
        .unwrap()
        .is_ok());
    let dma = vf.dma().clone();
    let reader = std::thread::spawn(move || {
        let mut x = [0u8; 4];
        dma.read(0xc0000, &mut x)
    });
    assert_eq!(
        c.serve_requests(1, Instant::now() + Duration::from_secs(5))
            .unwrap(),
        1
    );
    assert!(matches!(
        reader.join().unwrap(),
        Err(vfu::DmaError::Client {
            iova: 0xc0000,
            op: "DMA_READ",
            ..
        })
    ));
    let mut x = [0u8; 4];
    assert!(matches!(
        vf.dma().write(0xc0000, &x),
        Err(vfu::DmaError::Permission { .. })
    ));
    assert!(vf.dma().read(0xe0000, &mut x).is_err(), "past the window");
    c.dma_unmap(0xc0000, 0x20000).unwrap();
    let dm = DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        address: 0x80000,
        size: 0x1000,
    };
    assert!(c
        .send_raw(Command::DmaMap as u16, 0, &dm.encode(), &[])
        .unwrap()
        .unwrap()
        .is_ok());
    c.dma_unmap(0x80000, 0x1000).unwrap();
    // Unmap as Linux type1 does: a range covering no window succeeds, a range cutting
    // a window in part is refused and leaves it whole; a bad ALL.
    c.dma_unmap(0x90000, 0x1000).unwrap();
    assert_eq!(remote_errno(c.dma_unmap(0x10000, 0x1000)), Errno::EINVAL);
    assert_eq!(remote_errno(c.dma_unmap(0x0, 0x12000)), Errno::EINVAL);
    assert_eq!(vf.dma().windows().len(), 1);
    let bad_all = DmaUnmap {
        argsz: 24,
        flags: VFIO_DMA_UNMAP_FLAG_ALL,
        address: 0x10000,
        size: 0x4000,
    };
    assert_eq!(
        raw_errno(&mut c, Command::DmaUnmap as u16, &bad_all.encode(), &[]),
        Errno::EINVAL
    );
    assert_eq!(
        vf.dma().windows().len(),
        1,
        "failed requests changed nothing"
    );

    // More fds than negotiated (16): refused, fds closed, still in sync.
    let fds: Vec<EventFd> = (0..17).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let set = IrqSetWire {
        argsz: 20,
        flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: VFIO_PCI_MSIX_IRQ_INDEX,
        start: 0,
        count: 16,
    };
    assert_eq!(
        raw_errno(&mut c, Command::DeviceSetIrqs as u16, &set.encode(), &raw),
        Errno::EINVAL
    );
    assert_in_sync(&mut c);
    // fds on a command that takes none.
    let rd = RegionAccess {
        offset: 0,
        region: CONFIG,
        count: 4,
    };
    assert_eq!(
        raw_errno(&mut c, Command::RegionRead as u16, &rd.encode(), &raw[..1]),
        Errno::EINVAL
    );

    // SET_IRQS beyond the vector count, on a missing index, with bad flags, fd count mismatch.
    let e = EventFd::new(0).unwrap();
    let trig = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        remote_errno(c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            trig,
            15,
            2,
            &[],
            &[e.as_raw_fd(); 2]
        )),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trig, 16, 1, &[], &[e.as_raw_fd()])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trig, u32::MAX, 2, &[], &[])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.set_irqs(7, trig, 0, 1, &[], &[e.as_raw_fd()])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0x25, 0, 1, &[], &[])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trig, 0, 2, &[], &[e.as_raw_fd()])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            2,
            &[1, 5],
            &[]
        )),
        Errno::EINVAL
    );
    // MSI-X is masked in its table, not through SET_IRQS.
    assert_eq!(
        remote_errno(c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
            0,
            1,
            &[],
            &[]
        )),
        Errno::EINVAL
    );
    assert_eq!(
        vf.lock().irqs.eventfd_count(),
        0,
        "failed requests changed nothing"
    );

    // REGION_WRITE_MULTI: one bad entry means none is applied.
    let before = read_u16(&mut c, CONFIG, INTERRUPT_LINE);
    assert_eq!(
        remote_errno(
            c.region_write_multi(&[(CONFIG, INTERRUPT_LINE, &[0x44]), (CONFIG, 4095, &[1, 2])])
        ),
        Errno::EINVAL
    );
    assert_eq!(read_u16(&mut c, CONFIG, INTERRUPT_LINE), before);
    assert_in_sync(&mut c);
}

#[test]
fn failing_posted_write_is_not_answered_and_stream_stays_in_sync() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    c.region_write_posted(CONFIG, 4094, &[1, 2, 3, 4]).unwrap();
    c.region_write_posted(CONFIG, INTERRUPT_LINE, &[0x66])
        .unwrap();
    // If the server had answered the failing posted write, this reply would not match.
    assert_eq!(read_u16(&mut c, CONFIG, INTERRUPT_LINE) & 0xff, 0x66);
}

#[test]
fn undersized_message_gets_einval_and_the_connection_closes() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    let r = c
        .send_with_size(Command::DeviceGetInfo as u16, 0, 8, &[], &[])
        .unwrap()
        .unwrap();
    assert_eq!(r.unwrap_err(), Errno::EINVAL);
    assert!(c.device_info().is_err(), "the server closed the connection");
    // The socket serves the next client.
    let mut c2 = tb.vf_client(0);
    assert_in_sync(&mut c2);
}

#[test]
fn disconnect_drops_dma_and_irqs_and_keeps_device_state() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mem = memfd("test-dma", 0x4000);
    {
        let mut c = tb.vf_client(0);
        c.region_write(CONFIG, INTERRUPT_LINE, &[0x5a]).unwrap();
        c.region_write(BAR0, CMDQ_ADDR_H_OFFSET, &0xabcd_0000u32.to_be_bytes())
            .unwrap();
        c.dma_map(0x0, 0x4000, mem.as_raw_fd(), 0, 3).unwrap();
        let _efd = msix_eventfd(&mut c, 0);
        assert_eq!(vf.dma().len(), 1);
        assert_eq!(vf.lock().irqs.eventfd_count(), 1);
        c.shutdown();
    }
    wait_until(
        "DMA maps and IRQ fds dropped",
        Duration::from_secs(5),
        || vf.dma().is_empty() && vf.lock().irqs.eventfd_count() == 0,
    );
    let mut c = tb.vf_client(0);
    let mut b = [0u8; 1];
    c.region_read(CONFIG, INTERRUPT_LINE, &mut b).unwrap();
    assert_eq!(b, [0x5a], "config space persists");
    let mut w = [0u8; 4];
    c.region_read(BAR0, CMDQ_ADDR_H_OFFSET, &mut w).unwrap();
    assert_eq!(u32::from_be_bytes(w), 0xabcd_0000, "BAR0 registers persist");
    assert!(vf.dma().read(0, &mut b).is_err(), "old maps are gone");
}

#[test]
fn msix_pba_tracks_undelivered_vectors() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut c = tb.vf_client(0);
    let pba = |c: &mut Client| {
        let mut b = [0u8; 8];
        c.region_read(BAR0, MSIX_PBA_OFFSET, &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    // MSI-X disabled: the interrupt waits in the PBA.
    assert!(!vf.raise_msix(5));
    assert_eq!(pba(&mut c), 1 << 5);
    // Enable MSI-X and give vector 5 an eventfd: the pending interrupt is delivered.
    enable_msix(&mut c);
    assert_eq!(pba(&mut c), 1 << 5, "no eventfd yet");
    let efd = msix_eventfd(&mut c, 5);
    assert_eq!(efd.read().unwrap(), 1);
    assert_eq!(pba(&mut c), 0);
    // The PBA is read-only to the client; the table is read-write.
    c.region_write(BAR0, MSIX_PBA_OFFSET, &[0xff; 8]).unwrap();
    assert_eq!(pba(&mut c), 0);
    c.region_write(BAR0, MSIX_TABLE_OFFSET + 8, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
}

#[test]
fn flr_returns_the_function_to_power_on() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    c.region_write(CONFIG, INTERRUPT_LINE, &[0x77]).unwrap();
    c.region_write(BAR0, CMDQ_ADDR_H_OFFSET, &0x1111_0000u32.to_be_bytes())
        .unwrap();
    let devctl = PCIE_CAP_OFFSET as u64 + PCIE_DEVCTL_OFFSET as u64;
    let v = read_u16(&mut c, CONFIG, devctl);
    c.region_write(CONFIG, devctl, &(v | PCIE_DEVCTL_BCR_FLR).to_le_bytes())
        .unwrap();
    let mut b = [0u8; 1];
    c.region_read(CONFIG, INTERRUPT_LINE, &mut b).unwrap();
    assert_eq!(b, [0]);
    let mut w = [0u8; 4];
    c.region_read(BAR0, CMDQ_ADDR_H_OFFSET, &mut w).unwrap();
    assert_eq!(w, [0; 4]);
    assert_eq!(
        read_u16(&mut c, CONFIG, devctl) & PCIE_DEVCTL_BCR_FLR,
        0,
        "Initiate FLR reads 0"
    );
}

#[test]
fn a_second_client_gets_ebusy_while_the_device_is_attached() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut first = tb.vf_client(0);
    match Client::connect(&tb.vf_socket(0)) {
        Err(VfuError::Remote { errno, .. }) => assert_eq!(errno, Errno::EBUSY),
        other => panic!("expected EBUSY, got {:?}", other.map(|_| "a connection")),
    }
    assert_in_sync(&mut first);
    first.shutdown();
    drop(first);
    // Once the first client is gone the device can be attached again.
    let start = Instant::now();
    let mut second = loop {
        match Client::connect(&tb.vf_socket(0)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "still refused: {e}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert_in_sync(&mut second);
}
