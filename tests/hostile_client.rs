//! A hostile vfio-user client against a live adapter: each attack of the resource
//! classes (interrupt fds, DMA files, fds, refusals, unmaps) gets a clear errno or is
//! absorbed, and the function keeps answering.

use std::os::fd::AsRawFd;
use std::time::Duration;

use mlx5_prm::cmd::migration::ResumeOpMod;
use mlx5_testbed::bringup::{pf_up, resume_vhca, shared_pf_up, stop_vhca};
use mlx5_testbed::devmem::{Bar2Map, BAR2};
use mlx5_testbed::mem::memfd;
use mlx5_testbed::migrate::{capture, write_in_chunks};
use mlx5_testbed::reply::remote_errno;
use mlx5_testbed::wait::{bounded, wait_until};
use mlx5_testbed::{init_tracing, Testbed};
use mlx5vf::migration::MigrationDevice;
use vfu::uapi::*;
use vfu::{Errno, VfuError};

const RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

/// Behind a vIOMMU QEMU unmaps whole address-space blocks: every window inside goes,
/// and the device can no longer reach it.
#[test]
fn a_block_unmap_removes_every_window_inside_it() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut c = tb.vf_client(0);
    let mem = memfd("hostile-unmap", 0x10000);
    c.dma_map(0x1000_0000, 0x4000, mem.as_raw_fd(), 0, RW)
        .unwrap();
    c.dma_map(0x2000_0000, 0x4000, mem.as_raw_fd(), 0x4000, RW)
        .unwrap();
    c.dma_map(0x9000_0000, 0x4000, mem.as_raw_fd(), 0x8000, RW)
        .unwrap();
    c.dma_unmap(0, 0x8000_0000)
        .expect("a block covering two windows");
    let mut b = [0u8; 8];
    assert!(vf.dma().read(0x1000_0000, &mut b).is_err());
    assert!(vf.dma().read(0x2000_0000, &mut b).is_err());
    vf.dma().read(0x9000_0000, &mut b).unwrap();
    // A block that cuts the last window is refused and leaves it whole.
    assert_eq!(
        remote_errno(c.dma_unmap(0x8000_0000, 0x1000_2000)),
        Errno::EINVAL
    );
    vf.dma().read(0x9000_3ff8, &mut b).unwrap();
    // Unmapping it again once gone is an empty range: success.
    c.dma_unmap(0x8000_0000, 0x8000_0000).unwrap();
    c.dma_unmap(0x8000_0000, 0x8000_0000).unwrap();
    assert!(vf.dma().is_empty());
    bounded(Duration::from_secs(30), move || c.device_info().unwrap());
}

/// A DMA file the client could shrink (a memfd without sealing) is refused by default,
/// and accepted under the operator's explicit opt-in.
#[test]
fn a_dma_file_that_cannot_be_sealed_is_refused_unless_allowed() {
    init_tracing();
    let unsealable = || {
        let name = std::ffi::CString::new("hostile-unsealable").unwrap();
        // SAFETY: `name` is NUL-terminated; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(0x4000).unwrap();
        f
    };
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    let f = unsealable();
    assert_eq!(
        remote_errno(c.dma_map(0x10000, 0x4000, f.as_raw_fd(), 0, RW)),
        Errno::EPERM
    );
    assert!(tb.vf(0).dma().is_empty());
    c.device_info().expect("still in sync");

    let tb = Testbed::start_with(mlx5_testbed::AdapterConfig {
        vfs: 1,
        allow_unsealed_dma: true,
        ..Default::default()
    });
    let mut c = tb.vf_client(0);
    c.dma_map(0x10000, 0x4000, f.as_raw_fd(), 0, RW)
        .expect("allowed by --allow-unsealed-dma");
    assert_eq!(tb.vf(0).dma().len(), 1);
}

/// A refused client that claims a huge payload and trickles it byte by byte (each read
/// well inside any per-read timeout) cannot keep the function's owner from
/// reconnecting: every refusal has a total deadline and runs beside the acceptor.
#[test]
fn a_trickling_refused_client_cannot_hold_the_acceptor() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    init_tracing();
    let tb = Testbed::start(1);
    let owner = tb.vf_client(0);
    /// Stops the tricklers however the test ends, so a failure cannot hang the run.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let mut tricklers = Vec::new();
    for _ in 0..3 {
        let mut s = std::os::unix::net::UnixStream::connect(tb.vf_socket(0)).unwrap();
        let stop = Arc::clone(&stop);
        tricklers.push(std::thread::spawn(move || {
            let header = vfu::proto::Header {
                msg_id: 1,
                command: vfu::proto::Command::Version as u16,
                msg_size: u32::MAX,
                flags: 0,
                error: 0,
            };
            if s.write_all(&header.encode()).is_err() {
                return;
            }
            while !stop.load(Ordering::SeqCst) {
                if s.write_all(&[0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The owner leaves and comes back while the tricklers are still at it.
    owner.shutdown();
    drop(owner);
    let path = tb.vf_socket(0);
    // Its old connection's teardown may outlast the grace on a loaded machine (EBUSY):
    // the owner retries, as a VMM would, and must get in while the tricklers trickle.
    let mut again = bounded(Duration::from_secs(30), move || loop {
        match vfu::Client::connect(&path) {
            Ok(c) => break c,
            Err(VfuError::Remote { errno, .. }) if errno == Errno::EBUSY => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the owner cannot reconnect: {e}"),
        }
    });
    again.device_info().expect("served");
    stop.store(true, Ordering::SeqCst);
    for t in tricklers {
        t.join().unwrap();
    }
}

/// A client that fills the emulator's fd table (a distinct memfd per DMA window) while
/// another connects to the PF: the PF answers once fds are free again, and SIGTERM
/// still stops the emulator.
#[test]
fn fd_exhaustion_does_not_stop_the_other_listeners() {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;

    use mlx5_testbed::child::{emu_command, temp_dir, Emu};
    init_tracing();
    let dir = temp_dir("mlx5-emu-fds");
    let dir_arg = dir.path().to_str().unwrap().to_string();
    let mut cmd = emu_command();
    cmd.args(["--vfs", "1", "--log", "error", "--dir", &dir_arg])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, between
    // fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut emu = Emu::spawn_command(&mut cmd);
    let (pf, vf) = (dir.path().join("pf.sock"), dir.path().join("vf0.sock"));
    emu.wait_for_sockets(&[pf.clone(), vf.clone()]);
    let mut c = vfu::Client::connect(&vf).unwrap();
    // One window (one fd) at a time until the emulator's fd table is full: the map that
    // finds it full is refused with EMFILE (its fd could not be received), and the
    // connection stays in sync.
    let mut files = Vec::new();
    let full = loop {
        assert!(files.len() < 64, "the emulator's fd table never filled");
        let f = memfd("hostile-fd", 0x1000);
        match c.dma_map(files.len() as u64 * 0x1000, 0x1000, f.as_raw_fd(), 0, RW) {
            Ok(()) => files.push(f),
            Err(e) => break e,
        }
    };
    assert_eq!(remote_errno(Err::<(), _>(full)), Errno::EMFILE);
    c.device_info()
        .expect("the connection stays in sync after EMFILE");
    let pf_client = std::thread::spawn(move || {
        let mut p = vfu::Client::connect(&pf).expect("the PF answers once fds are free");
        p.device_info().expect("PF served");
    });
    std::thread::sleep(Duration::from_millis(300));
    c.dma_unmap_all().unwrap();
    bounded(Duration::from_secs(30), move || pf_client.join().unwrap());
    drop(c);
    let status = emu.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
}

fn bar2(c: &mut vfu::Client, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    c.region_read(BAR2, offset, &mut b).unwrap();
    b
}

/// BAR2 does not outlive its client: a client that left keeps its mapping (and could
/// keep the fd), but what it maps is no longer device memory. The next client gets
/// the contents, in a memfd of its own.
#[test]
fn a_departed_client_cannot_reach_the_next_clients_device_memory() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut a = tb.vf_client(0);
    let kept = Bar2Map::new(&mut a);
    kept.write(0, b"left by A");
    drop(a);
    wait_until("the server saw A leave", Duration::from_secs(10), || {
        vf.devmem().attachment() == 1
    });

    let mut b = tb.vf_client(0);
    assert_eq!(
        bar2(&mut b, 0, 9),
        b"left by A",
        "device memory outlives the client, not its mapping"
    );
    let map = Bar2Map::new(&mut b);
    map.write(0x100, b"B's secret");
    b.region_write(BAR2, 0x200, b"B by write").unwrap();
    assert_eq!(kept.read(0x100, 10), [0u8; 10], "A cannot read B's stores");
    assert_eq!(kept.read(0x200, 10), [0u8; 10], "nor B's region writes");
    kept.write(0x300, b"A's store");
    kept.write(0x100, b"overwrite!");
    let mut dm = [0u8; 10];
    vf.devmem().read(0x300, &mut dm).unwrap();
    assert_eq!(dm, [0u8; 10], "A's stores do not reach device memory");
    assert_eq!(map.read(0x100, 10), b"B's secret");
    assert_eq!(bar2(&mut b, 0x100, 10), b"B's secret");

    // A reset keeps the attachment: B still owns its mapping, and it reads zeros.
    b.reset().unwrap();
    assert_eq!(vf.devmem().attachment(), 1);
    map.write(0x400, b"after FLR");
    assert_eq!(bar2(&mut b, 0x400, 9), b"after FLR");
    assert_eq!(bar2(&mut b, 0x100, 10), [0u8; 10]);
    assert_eq!(kept.read(0x400, 9), [0u8; 9]);
}

/// Stores through a BAR2 mapping cannot change a responder-suspended function: the
/// device keeps its own copy while frozen, and at resume the client's mapping gets
/// that copy back (a store made while frozen is dropped).
#[test]
fn stores_through_a_mapping_do_not_change_a_frozen_function() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut c = tb.vf_client(0);
    let map = Bar2Map::new(&mut c);
    map.write(0x1000, b"before the freeze");
    let pf = pf_up(&tb.pf_socket());
    let vhca = vf.id.vhca_id;
    stop_vhca(&pf, vhca);
    assert!(vf.devmem().is_frozen());
    map.write(0x1000, b"while it is frozen");
    map.write(0x8000, b"new page");
    let mut dm = vec![0u8; 18];
    vf.devmem().read(0x1000, &mut dm).unwrap();
    assert_eq!(
        &dm[..17],
        b"before the freeze",
        "the device's memory did not move"
    );
    vf.devmem().read(0x8000, &mut dm).unwrap();
    assert_eq!(dm, [0u8; 18]);
    // What a SAVE would carry is the frozen memory.
    assert_eq!(vf.devmem().count_nonzero(), 1);

    resume_vhca(&pf, ResumeOpMod::Responder, vhca).unwrap();
    assert!(!vf.devmem().is_frozen());
    assert_eq!(
        map.read(0x1000, 18),
        b"before the freeze\0",
        "the page came back whole"
    );
    assert_eq!(
        map.read(0x8000, 8),
        [0u8; 8],
        "the store made while frozen is gone"
    );
    map.write(0x8000, b"thawed");
    vf.devmem().read(0x8000, &mut dm[..6]).unwrap();
    assert_eq!(&dm[..6], b"thawed", "the mapping is device memory again");
}

/// A LOAD and an FLR of its target do not interleave: an FLR that arrives while the
/// LOAD applies waits for it and then wipes all of it, never leaving part of the image
/// (device memory, say) on a function otherwise back at power-on.
#[test]
fn an_flr_during_a_load_comes_wholly_after_it() {
    init_tracing();
    let (a, b) = (Testbed::start(1), Testbed::start(1));
    let src = MigrationDevice::new(shared_pf_up(&a.pf_socket()), 0).unwrap();
    let dst = MigrationDevice::new(shared_pf_up(&b.pf_socket()), 0).unwrap();
    mlx5_testbed::devmem::fill(&a.vf(0), 5);
    let stream = capture(&src);
    let vf = b.vf(0);
    let power_on = (vf.hca_state(), vf.object_counts());
    let mut w = dst
        .set_state(mlx5vf::migration::fsm::MigState::Resuming)
        .unwrap()
        .expect("resuming stream");
    // The VF's register lock, held: the LOAD stops at its first use of it, which is
    // after its last check, in the middle of its apply.
    let held = vf.lock();
    let loader = std::thread::spawn(move || write_in_chunks(&mut w, &stream, 1 << 20));
    wait_until("the LOAD started", Duration::from_secs(30), || {
        vf.migration().busy()
    });
    std::thread::sleep(Duration::from_millis(300));
    let resetter = {
        let vf = vf.clone();
        std::thread::spawn(move || vf.reset())
    };
    std::thread::sleep(Duration::from_millis(100));
    drop(held);
    bounded(Duration::from_secs(60), move || {
        let _ = loader.join().expect("loader");
        resetter.join().expect("resetter");
    });
    assert_eq!(
        (vf.hca_state(), vf.object_counts()),
        power_on,
        "firmware at power-on"
    );
    assert!(
        mlx5_testbed::devmem::dev_mem(&vf).iter().all(|&b| b == 0),
        "no page of the image survived the FLR"
    );
}
