//! Peer-to-peer DMA over real sockets: a VMM maps one function's device memory (BAR2)
//! into another function's IOVA space, with the memfd from REGION_INFO or, as QEMU
//! does, without an fd at the address it gave the BAR; the device's DMA into that
//! window goes through the target function, whose suspend state applies. A write into
//! a responder-suspended target is refused and recorded (writer, target, address,
//! length, sequence), never silent.
//!
//! The device DMA used here is the firmware's own: SAVE_VHCA_STATE writing its image
//! into a buffer whose mkey points into the peer's BAR2 window, issued by the PF. A
//! window the client keeps (no fd, not a BAR of ours) is served with DMA_READ and
//! DMA_WRITE requests to the client.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlx5_emulator::{MigState, ViolationKind};
use mlx5_prm::cmd::migration::*;
use mlx5_prm::ifc::set;
use mlx5_prm::Opcode;
use mlx5_testbed::bringup::{pf_up, run_vhca, stop_vhca, vhca_input};
use mlx5_testbed::devmem::{dev_mem, pattern, write};
use mlx5_testbed::{init_tracing, Testbed};
use mlx5vf::cmdif::CmdError;
use mlx5vf::hca::Hca;
use vfu::proto::{Command, DmaMap};
use vfu::uapi::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
};
use vfu::{DmaError, DmaRequest};

const RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
/// Where the PF's client maps a VF's BAR2.
const P2P_IOVA: u64 = 0x40_0000_0000;
/// Where the guest put VF 1's BAR2 (programmed into its config space).
const BAR2_GPA: u64 = 0xe000_0000;
/// The SAVE buffer's size: room for the image of a VF with 1 MiB of device memory.
const BUF: u64 = 1 << 20;

/// A writable DMA_MAP of `size` bytes at `iova` without an fd, as QEMU sends for memory
/// it cannot share (another device's mmapped BAR, unshared RAM).
fn map_fdless(c: &mut vfu::Client, iova: u64, size: u64) {
    let req = DmaMap {
        argsz: 32,
        flags: RW,
        offset: 0,
        address: iova,
        size,
    };
    c.send_raw(Command::DmaMap as u16, 0, &req.encode(), &[])
        .unwrap()
        .unwrap()
        .expect("fd-less DMA_MAP");
}

/// SAVE_VHCA_STATE of `vhca_id` into the buffer behind `mkey` (va 0, `BUF` bytes).
fn save_image(pf: &Hca, vhca_id: u16, mkey: u32) -> Result<u64, CmdError> {
    let mut m = vhca_input(Opcode::SaveVhcaState, 0, SAVE_VHCA_STATE_IN_LEN, vhca_id);
    set(&mut m, SAVE_VHCA_STATE_IN_VA, 0);
    set(&mut m, SAVE_VHCA_STATE_IN_MKEY, mkey.into());
    set(&mut m, SAVE_VHCA_STATE_IN_SIZE, BUF);
    let out = pf.cmd().exec(&m, SAVE_VHCA_STATE_OUT_LEN)?;
    Ok(mlx5_prm::ifc::get(
        &out,
        SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE,
    ))
}

/// An mkey of the PF over `BUF` bytes at `iova` (4 KiB pages).
fn mkey_over(pf: &Hca, iova: u64) -> u32 {
    let mtt: Vec<u64> = (0..BUF / 4096).map(|i| iova + i * 4096).collect();
    pf.create_mkey(&mtt, 12, BUF, 0x33)
        .expect("mkey over the P2P window")
}

/// A few pages of device memory, so the VF's image fits the 1 MiB window.
fn some_state(f: &mlx5_emulator::Function, seed: u64) {
    for page in [0u64, 5, 77] {
        write(f, page * 4096, &pattern(4096, seed + page));
    }
}

/// The image a SAVE wrote starts with the state image magic (`prm::state_image`).
fn starts_like_an_image(b: &[u8]) -> bool {
    b[..8] != [0u8; 8]
}

#[test]
fn save_into_a_peers_bar2_memfd_lands_through_the_peer_and_a_frozen_peer_refuses_it() {
    init_tracing();
    let tb = Testbed::builder().vfs(2).control().start();
    let (vf0, vf1) = (tb.vf(0), tb.vf(1));
    let (v0, v1) = (vf0.id.vhca_id, vf1.id.vhca_id);
    some_state(&vf0, 7);
    let pf = pf_up(&tb.pf_socket());
    // The VMM hands VF 1's BAR2 memfd (from its REGION_INFO) to the PF's IOVA space.
    let mut c1 = tb.vf_client(1);
    let bar2 = c1.region_info(VFIO_PCI_BAR2_REGION_INDEX).unwrap();
    let fd = bar2.fd.expect("BAR2 is mmappable");
    pf.cmd()
        .client()
        .dma_map(P2P_IOVA, BUF, fd.as_raw_fd(), 0, RW)
        .unwrap();
    let desc = tb.pf().dma().describe(P2P_IOVA).unwrap();
    assert!(desc.contains(&format!("BAR2 of vhca {v1}")), "{desc}");
    let mkey = mkey_over(&pf, P2P_IOVA);

    // VF 1 running: the image lands in its device memory, through it.
    stop_vhca(&pf, v0);
    let size = save_image(&pf, v0, mkey).expect("save into a running peer");
    assert!(size > 0 && size <= BUF);
    let landed = dev_mem(&vf1);
    assert!(starts_like_an_image(&landed));
    assert!(vf1.violations().is_empty());

    // VF 1 frozen: the first write of the next SAVE is refused and recorded; SAVE fails
    // and VF 1's memory is what it was.
    stop_vhca(&pf, v1);
    let e = save_image(&pf, v0, mkey).expect_err("save into a frozen peer");
    assert_eq!(e.syndrome(), Some(mig_syndrome_dma_fault()), "{e}");
    assert_eq!(dev_mem(&vf1), landed, "a refused write changed nothing");
    let v = vf1.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::P2pWrite);
    assert_eq!(v[0].writer_vhca_id, Some(tb.pf().id.vhca_id));
    assert_eq!(v[0].qpn, None, "the firmware wrote, not a QP");
    assert_eq!(v[0].target_vhca_id, v1);
    assert_eq!(v[0].address, 0);
    assert!(v[0].len > 0);
    assert!(v[0].seq > 0);
    assert!(v[0].to_string().contains("vhca 0"), "{}", v[0]);
    assert_eq!(
        tb.adapter.violations().len(),
        1,
        "the adapter-wide log has it"
    );
    assert_eq!(vf1.migration_state(), MigState::ResponderSuspended);

    // Thawed, the same SAVE lands again.
    run_vhca(&pf, v1);
    save_image(&pf, v0, mkey).expect("save after the peer resumed");
    assert_eq!(vf1.violations().len(), 1);
}

/// The syndrome a SAVE completes with when writing its buffer faults.
fn mig_syndrome_dma_fault() -> u32 {
    mlx5_emulator::firmware::mig_syndrome::DMA_FAULT
}

#[test]
fn fd_less_map_of_a_bar2_the_same_vmm_programmed_is_routed_through_that_function() {
    init_tracing();
    let tb = Testbed::start(2);
    let (vf0, vf1) = (tb.vf(0), tb.vf(1));
    let (v0, v1) = (vf0.id.vhca_id, vf1.id.vhca_id);
    some_state(&vf0, 9);
    let pf = pf_up(&tb.pf_socket());
    // The guest programs VF 1's BAR2 and turns memory decoding on (QEMU forwards config
    // writes to the device).
    let mut c1 = tb.vf_client(1);
    let bar = (BAR2_GPA as u32 | 0xc).to_le_bytes();
    c1.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x18, &bar)
        .unwrap();
    c1.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x1c, &0u32.to_le_bytes())
        .unwrap();
    c1.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &0x6u16.to_le_bytes())
        .unwrap();
    // QEMU maps the mmapped BAR into the PF's IOVA space at its guest address, no fd.
    map_fdless(&mut pf.cmd().client(), BAR2_GPA, BUF);
    let desc = tb.pf().dma().describe(BAR2_GPA).unwrap();
    assert!(desc.contains(&format!("BAR2 of vhca {v1}")), "{desc}");
    let mkey = mkey_over(&pf, BAR2_GPA);
    stop_vhca(&pf, v0);
    save_image(&pf, v0, mkey).expect("save through the routed window");
    assert!(starts_like_an_image(&dev_mem(&vf1)));
    // The freeze holds on this path too: it never reaches the client's own mapping.
    stop_vhca(&pf, v1);
    let before = dev_mem(&vf1);
    save_image(&pf, v0, mkey).expect_err("refused by the frozen peer");
    assert_eq!(dev_mem(&vf1), before);
    let v = vf1.violations();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].kind, ViolationKind::P2pWrite);
    assert_eq!(v[0].writer_vhca_id, Some(0));
}

#[test]
fn fd_less_windows_the_client_keeps_are_served_with_dma_read_and_dma_write() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut c = tb.vf_client(0);
    // The client's memory, 64 KiB at 0x9000_0000, that it never shares.
    const BASE: u64 = 0x9000_0000;
    let mem = Arc::new(Mutex::new(vec![0u8; 0x10000]));
    let m = Arc::clone(&mem);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    c.set_dma_handler(Box::new(move |req| {
        let mut mem = m.lock().unwrap();
        match req {
            DmaRequest::Read { address, count } => {
                s.lock().unwrap().push(("read", address, count as usize));
                let at = address.checked_sub(BASE).ok_or(vfu::Errno::EFAULT)? as usize;
                mem.get(at..at + count as usize)
                    .map(<[u8]>::to_vec)
                    .ok_or(vfu::Errno::EFAULT)
            }
            DmaRequest::Write { address, data } => {
                s.lock().unwrap().push(("write", address, data.len()));
                let at = address.checked_sub(BASE).ok_or(vfu::Errno::EFAULT)? as usize;
                mem.get_mut(at..at + data.len())
                    .ok_or(vfu::Errno::EFAULT)?
                    .copy_from_slice(data);
                Ok(Vec::new())
            }
        }
    }));
    map_fdless(&mut c, BASE, 0x10000);
    assert_eq!(
        vf.dma().describe(BASE).as_deref(),
        Some(vfu::client_dma::CLIENT_WINDOW)
    );
    // The device writes 5000 bytes across a page boundary and reads them back; the
    // client answers from its own thread (it is the VMM).
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
    let dma = vf.dma().clone();
    let d = data.clone();
    let device = std::thread::spawn(move || {
        dma.write(BASE + 0xf00, &d)?;
        let mut back = vec![0u8; d.len()];
        dma.read(BASE + 0xf00, &mut back)?;
        Ok::<_, DmaError>(back)
    });
    let served = c
        .serve_requests(2, Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(served, 2);
    let back = device.join().unwrap().expect("device access");
    assert_eq!(back, data);
    assert_eq!(&mem.lock().unwrap()[0xf00..0xf00 + 5000], &data[..]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("write", BASE + 0xf00, 5000), ("read", BASE + 0xf00, 5000)]
    );
    // An access running past the window fails before anything is asked; a refused
    // request fails the device's access with the client's errno; the connection stays
    // in sync.
    assert!(matches!(
        vf.dma().write(BASE + 0xfff0, &[1u8; 0x20]),
        Err(DmaError::NotMapped { .. })
    ));
    let dma = vf.dma().clone();
    let device = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        // Inside the window, outside the client's memory: the client says EFAULT.
        dma.read(BASE + 0x10000 - 8, &mut b).map(|_| b)
    });
    mem.lock().unwrap().truncate(0x8000);
    c.serve_requests(1, Instant::now() + Duration::from_secs(10))
        .unwrap();
    match device.join().unwrap() {
        Err(DmaError::Client { op, why, .. }) => {
            assert_eq!(op, "DMA_READ");
            assert!(why.contains("EFAULT"), "{why}");
        }
        other => panic!("expected the client's refusal, got {other:?}"),
    }
    c.device_info().expect("in sync");
    // Nobody answering: the device's access times out, bounded; a disconnect fails it at
    // once.
    let dma = vf.dma().clone();
    let device = std::thread::spawn(move || {
        let t = Instant::now();
        let r = dma.write(BASE, &[0u8; 4]);
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    let (r, took) = device.join().unwrap();
    assert!(matches!(r, Err(DmaError::Client { .. })), "{r:?}");
    assert!(took < Duration::from_secs(5), "failed at the disconnect");
}

#[test]
fn replies_to_concurrent_client_dma_may_come_in_any_order_and_strays_are_dropped() {
    use std::os::unix::net::UnixStream;
    use vfu::channel::{Channel, Incoming};
    use vfu::proto::{dma_rw, Header};
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let stream = UnixStream::connect(tb.vf_socket(0)).unwrap();
    let raw = Channel::new(stream.try_clone().unwrap());
    let mut c = vfu::Client::unnegotiated(stream).unwrap();
    c.negotiate(&vfu::caps::Capabilities::client_proposal())
        .unwrap();
    const BASE: u64 = 0xa000_0000;
    map_fdless(&mut c, BASE, 0x10000);
    // Four device threads read four different places at once.
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let dma = vf.dma().clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 16];
                dma.read(BASE + i * 0x1000, &mut b).map(|_| b)
            })
        })
        .collect();
    let mut reqs = Vec::new();
    while reqs.len() < 4 {
        match raw.recv(1 << 20).unwrap() {
            Incoming::Message(m) => reqs.push(m),
            other => panic!("{other:?}"),
        }
    }
    // A reply to nothing first: dropped, nobody fails.
    let stray = Header {
        msg_id: 0x1234,
        command: Command::DmaRead as u16,
        msg_size: 16,
        flags: vfu::proto::FLAGS_TYPE_REPLY,
        error: 0,
    };
    raw.send(&stray, &[], &[]).unwrap();
    // Then the replies, last request first: each reader gets its own bytes.
    for m in reqs.iter().rev() {
        let (address, count) = dma_rw::decode_read(&m.payload).unwrap();
        let fill = ((address - BASE) / 0x1000) as u8 + 0x10;
        let payload = dma_rw::encode_write(address, &vec![fill; count as usize]);
        raw.send(&m.header.reply(payload.len()), &payload, &[])
            .unwrap();
    }
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap().expect("read through the client");
        assert_eq!(got, [0x10 + i as u8; 16], "reader {i}");
    }
    c.device_info().expect("the connection is in sync");
}

/// The QEMU model of P2P: VF 0's own IOVA space maps VF 1's BAR2 (with its memfd); a
/// QP on VF 0 writes there with an rkey of VF 0's own (loopback). The write leaves VF 0
/// through its DMA path and reaches VF 1 through the P2P window: it lands while VF 1
/// runs, and while VF 1 is frozen it is refused (error CQE, QP to ERR) and recorded as
/// a P2P violation naming VF 0's QP.
#[test]
fn an_engine_write_through_a_p2p_window_lands_or_is_refused_with_its_qp_recorded() {
    use mlx5_testbed::dma::{self, connect, end, next};
    use mlx5vf::dma::{DmaQueues, QpSizes, SendWr, Sge};
    init_tracing();
    let tb = Testbed::start(2);
    let vf1 = tb.vf(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    // VF 1's VMM stays attached: its BAR2 memfd is device memory only while it is.
    let mut c1 = tb.vf_client(1);
    let bar2 = c1.region_info(VFIO_PCI_BAR2_REGION_INDEX).unwrap();
    let fd = bar2.fd.expect("BAR2 is mmappable");
    n.hca
        .cmd()
        .client()
        .dma_map(P2P_IOVA + (1 << 30), BUF, fd.as_raw_fd(), 0, RW)
        .unwrap();
    let mtt: Vec<u64> = (0..BUF / 4096)
        .map(|i| P2P_IOVA + (1 << 30) + i * 4096)
        .collect();
    let peer_key = n.hca.create_mkey(&mtt, 12, BUF, 0x44).unwrap();
    let q = DmaQueues::new(&n.hca).unwrap();
    let mut a = end(&q, 6, QpSizes::default());
    let b = end(&q, 6, QpSizes::default());
    connect(&q, &a, &q, &b);
    let write = |a: &mut mlx5_testbed::dma::End, off: u64, data: &[u8]| {
        n.mem.write(0, data);
        q.post_send(
            &mut a.qp,
            &SendWr::RdmaWrite {
                sges: vec![Sge {
                    lkey: n.key,
                    addr: 0,
                    len: data.len() as u32,
                }],
                raddr: off,
                rkey: peer_key,
                imm: None,
            },
            true,
        )
        .unwrap();
        q.ring(&mut a.qp).unwrap();
        next(&q, a)
    };
    let c = write(&mut a, 0x3000, b"peer-to-peer");
    assert!(c.is_ok(), "{c:?}");
    assert_eq!(&dev_mem(&vf1)[0x3000..0x300c], b"peer-to-peer");
    vf1.suspend_initiator().unwrap();
    vf1.freeze(Duration::from_secs(5)).unwrap();
    let c = write(&mut a, 0x5000, b"too late");
    assert!(!c.is_ok(), "{c:?}");
    assert_eq!(
        q.query_qp(a.qp.qpn).unwrap().0,
        mlx5_prm::cmd::qp::QpState::Err
    );
    assert_ne!(&dev_mem(&vf1)[0x5000..0x5008], b"too late");
    let v = vf1.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::P2pWrite);
    assert_eq!(v[0].writer_vhca_id, Some(tb.vf(0).id.vhca_id));
    assert_eq!(v[0].qpn, Some(a.qp.qpn));
    assert_eq!((v[0].address, v[0].len), (0x5000, 8));
    vf1.thaw().unwrap();
    vf1.resume_initiator().unwrap();
}
