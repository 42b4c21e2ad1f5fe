//! Issue 5 acceptance, driver half: live migration of a VF between two adapters through
//! mlx5vf's arcs, stream and pre-copy (kernel-mlx5vf.md §2–§3).
//!
//! These tests need the emulator half of issue 5 (SUSPEND/RESUME/QUERY/SAVE/LOAD_VHCA
//! and device memory in BAR2). Until it is there, [`migration_ready`] sees the firmware
//! refuse QUERY_VHCA_MIGRATION_STATE with BAD_OP (or BAR2 absent) and each test prints
//! `SKIPPED` and returns.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlx5_prm::Opcode;
use mlx5_testbed::{init_tracing, Testbed};
use mlx5vf::cmdif::{new_input, ArenaConfig, CmdIf, CmdIfConfig, DmaArena};
use mlx5vf::hca::{Hca, HcaOptions};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::layout::{FLAGS_TAG_OPTIONAL, RECORD_HEADER_LEN, TAG_FW_DATA};
use mlx5vf::migration::stream::RecordHeader;
use mlx5vf::migration::{DataStream, MigError, MigrationDevice};
use rand::{Rng, SeedableRng};

/// BAR2: device memory.
const BAR2: u32 = 2;
const CMD_TIMEOUT: Duration = Duration::from_secs(10);

fn cfg(arena_mib: u64) -> CmdIfConfig {
    CmdIfConfig {
        timeout: CMD_TIMEOUT,
        pre_init_timeout: Duration::from_secs(5),
        arena: ArenaConfig {
            size: arena_mib << 20,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pf_up(socket: &Path) -> Arc<Mutex<Hca>> {
    let client = vfu::Client::connect(socket).expect("connect PF");
    let mut hca = Hca::new(CmdIf::new(client, cfg(64)).expect("PF cmdif"));
    hca.up(&HcaOptions::default()).expect("PF up");
    Arc::new(Mutex::new(hca))
}

/// Whether the adapter behind `pf` has the firmware migration commands and BAR2.
fn migration_ready(pf: &Arc<Mutex<Hca>>, vf_socket: &Path, what: &str) -> bool {
    let mut hca = pf.lock().unwrap();
    let vhca = hca.query_other_caps(1).expect("VF caps").vhca_id;
    let mut m = new_input(Opcode::QueryVhcaMigrationState, 0, 16);
    m[10..12].copy_from_slice(&vhca.to_be_bytes());
    if let Err(e) = hca.cmd().exec(&m, 64) {
        if e.status() == Some(0x2) {
            eprintln!("SKIPPED {what}: the emulator has no QUERY_VHCA_MIGRATION_STATE yet ({e})");
            return false;
        }
    }
    drop(hca);
    let mut c = vfu::Client::connect(vf_socket).expect("VF client");
    match c.region_info(BAR2) {
        Ok(r) if r.size > 0 => true,
        _ => {
            eprintln!("SKIPPED {what}: the emulator has no device memory in BAR2 yet");
            false
        }
    }
}

/// A VF brought up by its own driver (polling), as a guest would, with some objects.
struct Guest {
    hca: Hca,
    pds: Vec<u32>,
    mkeys: Vec<u32>,
}

fn guest_up(socket: &Path) -> Guest {
    let client = vfu::Client::connect(socket).expect("VF client");
    let mut hca = Hca::new(CmdIf::new(client, cfg(8)).expect("VF cmdif"));
    hca.up(&HcaOptions {
        events: false,
        ..Default::default()
    })
    .expect("VF up");
    let mut pds = Vec::new();
    let mut mkeys = Vec::new();
    for i in 0..3u8 {
        pds.push(hca.alloc_pd().expect("alloc pd"));
        let page = hca.cmd().arena_mut().alloc_page().expect("page");
        mkeys.push(hca.create_mkey(&[page], 12, 4096, i).expect("mkey"));
    }
    Guest { hca, pds, mkeys }
}

fn dev_mem_size(c: &mut vfu::Client) -> usize {
    c.region_info(BAR2).expect("BAR2 info").size as usize
}

fn fill(c: &mut vfu::Client, seed: u64) -> Vec<u8> {
    let n = dev_mem_size(c);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
    c.region_write(BAR2, 0, &data).expect("BAR2 write");
    data
}

fn dev_mem(c: &mut vfu::Client) -> Vec<u8> {
    let mut v = vec![0u8; dev_mem_size(c)];
    c.region_read(BAR2, 0, &mut v).expect("BAR2 read");
    v
}

/// Reads a saving stream until ENOMSG (pre-copy) or its end, writing into `dst`.
fn pump(src: &mut DataStream, dst: Option<&mut DataStream>, keep: &mut Vec<u8>) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut moved = 0;
    let mut dst = dst;
    for _ in 0..1_000_000 {
        match src.read_data(&mut buf) {
            Ok(0) | Err(MigError::NoMsg) => return moved,
            Ok(n) => {
                if let Some(d) = dst.as_deref_mut() {
                    let mut off = 0;
                    while off < n {
                        off += d.write_data(&buf[off..n]).expect("destination write");
                    }
                }
                keep.extend_from_slice(&buf[..n]);
                moved += n as u64;
            }
            Err(e) => panic!("source read: {e}"),
        }
    }
    panic!("stream did not end");
}

/// Pre-copy until the dirty bytes fall to `threshold`, then STOP_COPY and RUNNING on
/// the destination. Returns (bytes, rounds, downtime).
fn migrate(
    src: &MigrationDevice,
    dst: &MigrationDevice,
    threshold: u64,
    before_stop: impl FnOnce(),
) -> (u64, u32, Duration) {
    let mut out = dst
        .set_state(MigState::Resuming)
        .unwrap()
        .expect("resume stream");
    let mut input = src
        .set_state(MigState::PreCopy)
        .unwrap()
        .expect("save stream");
    let mut keep = Vec::new();
    let mut bytes = 0;
    let mut rounds = 0;
    loop {
        bytes += pump(&mut input, Some(&mut out), &mut keep);
        rounds += 1;
        let info = input.precopy_info().expect("precopy info");
        if (info.initial_bytes == 0 && info.dirty_bytes <= threshold) || rounds >= 20 {
            break;
        }
    }
    before_stop();
    let t = Instant::now();
    src.set_state(MigState::StopCopy).expect("STOP_COPY");
    bytes += pump(&mut input, Some(&mut out), &mut keep);
    dst.set_state(MigState::Running)
        .expect("destination RUNNING");
    let downtime = t.elapsed();
    src.set_state(MigState::Stop).expect("source STOP");
    // The stream is closed with the session.
    assert_eq!(
        input.read_data(&mut [0u8; 8]).unwrap_err().errno(),
        -libc::ENODEV
    );
    (bytes, rounds, downtime)
}

/// Moves the guest's command queue (its DMA arena) to the destination VF and runs a
/// command there: the function keeps working.
fn keeps_working(arena: DmaArena, dst_vf: &Path) {
    let client = vfu::Client::connect(dst_vf).expect("destination VF");
    let mut cmd = CmdIf::attach(client, arena, CMD_TIMEOUT).expect("attach");
    let m = new_input(Opcode::AllocPd, 0, 16);
    cmd.exec(&m, 16).expect("ALLOC_PD on the migrated function");
    let m = new_input(Opcode::QueryIssi, 0, 16);
    cmd.exec(&m, 0x70)
        .expect("QUERY_ISSI on the migrated function");
}

#[test]
fn round_trip_moves_device_memory_and_every_object_to_a_second_adapter() {
    init_tracing();
    let a = Testbed::start(1);
    let b = Testbed::start(1);
    let src_pf = pf_up(&a.pf_socket());
    let dst_pf = pf_up(&b.pf_socket());
    if !migration_ready(&src_pf, &a.vf_socket(0), "round trip") {
        return;
    }
    let mut guest = guest_up(&a.vf_socket(0));
    let pattern = fill(guest.hca.cmd().client(), 0x5eed);
    let src_fn = a.adapter.vf(0).unwrap().clone();
    let dst_fn = b.adapter.vf(0).unwrap().clone();
    let before = (
        src_fn.object_counts(),
        src_fn.hca_state(),
        src_fn.firmware().issi(),
    );

    let src = MigrationDevice::new(src_pf.clone(), 0).expect("source device");
    let dst = MigrationDevice::new(dst_pf.clone(), 0).expect("destination device");
    let (bytes, rounds, downtime) = migrate(&src, &dst, 64 << 10, || {});
    eprintln!("round trip: {bytes} bytes, {rounds} rounds, downtime {downtime:?}");
    assert_eq!(dst.state(), MigState::Running);
    assert_eq!(src.state(), MigState::Stop);

    let after = (
        dst_fn.object_counts(),
        dst_fn.hca_state(),
        dst_fn.firmware().issi(),
    );
    assert_eq!(after, before, "objects, life cycle and ISSI");
    for &mkey in &guest.mkeys {
        let idx = mkey >> 8;
        let s = src_fn.firmware().mkey(idx).map(|m| format!("{m:?}"));
        let d = dst_fn.firmware().mkey(idx).map(|m| format!("{m:?}"));
        assert!(s.is_some());
        assert_eq!(s, d, "mkey {mkey:#x}");
    }
    assert_eq!(guest.pds.len(), 3);
    let mut dst_client = vfu::Client::connect(&b.vf_socket(0)).expect("dst VF");
    assert!(dev_mem(&mut dst_client) == pattern, "device memory differs");
    drop(dst_client);
    let (_client, arena) = guest.hca.into_cmdif().into_parts();
    keeps_working(arena, &b.vf_socket(0));
}

struct ChildEmu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for ChildEmu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_emu() -> ChildEmu {
    let dir = tempfile::Builder::new()
        .prefix("mlx5-emu-child")
        .tempdir()
        .unwrap();
    let child = Command::new(mlx5_testbed::emu_binary())
        .args(["--vfs", "1", "--log", "warn", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn mlx5-emu");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(dir.path().join("pf.sock").exists() && dir.path().join("vf0.sock").exists()) {
        assert!(
            Instant::now() < deadline,
            "mlx5-emu did not create its sockets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ChildEmu { child, dir }
}

#[test]
fn round_trip_to_a_second_emulator_process() {
    init_tracing();
    let a = Testbed::start(1);
    let emu = spawn_emu();
    let src_pf = pf_up(&a.pf_socket());
    let dst_pf = pf_up(&emu.dir.path().join("pf.sock"));
    if !migration_ready(&dst_pf, &emu.dir.path().join("vf0.sock"), "child process") {
        return;
    }
    let mut guest = guest_up(&a.vf_socket(0));
    let pattern = fill(guest.hca.cmd().client(), 7);
    let src = MigrationDevice::new(src_pf, 0).unwrap();
    let dst = MigrationDevice::new(dst_pf, 0).unwrap();
    migrate(&src, &dst, 64 << 10, || {});
    let vf = emu.dir.path().join("vf0.sock");
    let mut c = vfu::Client::connect(&vf).unwrap();
    assert!(dev_mem(&mut c) == pattern, "device memory differs");
    drop(c);
    let (_client, arena) = guest.hca.into_cmdif().into_parts();
    keeps_working(arena, &vf);
}

#[test]
fn precopy_with_a_busy_writer_keeps_every_acknowledged_write() {
    init_tracing();
    let a = Testbed::start(1);
    let b = Testbed::start(1);
    let src_pf = pf_up(&a.pf_socket());
    let dst_pf = pf_up(&b.pf_socket());
    if !migration_ready(&src_pf, &a.vf_socket(0), "pre-copy writer") {
        return;
    }
    let mut guest = vfu::Client::connect(&a.vf_socket(0)).unwrap();
    let mut shadow = fill(&mut guest, 11);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            let n = shadow.len();
            let mut writes = 0u64;
            while !stop.load(Ordering::Acquire) && writes < 200_000 {
                let off = rng.gen_range(0..n / 8) * 8;
                let v: u64 = rng.gen();
                guest
                    .region_write(BAR2, off as u64, &v.to_le_bytes())
                    .expect("write");
                shadow[off..off + 8].copy_from_slice(&v.to_le_bytes());
                writes += 1;
            }
            (shadow, writes)
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let src = MigrationDevice::new(src_pf, 0).unwrap();
    let dst = MigrationDevice::new(dst_pf, 0).unwrap();
    let mut result = None;
    let (bytes, rounds, downtime) = migrate(&src, &dst, 4096, || {
        stop.store(true, Ordering::Release);
        result = Some(writer.join().expect("writer"));
    });
    let (shadow, writes) = result.expect("writer result");
    eprintln!(
        "busy writer: {writes} writes, {bytes} bytes, {rounds} rounds, downtime {downtime:?}"
    );
    let mut c = vfu::Client::connect(&b.vf_socket(0)).unwrap();
    let got = dev_mem(&mut c);
    let bad = got.iter().zip(&shadow).filter(|(a, b)| a != b).count();
    assert_eq!(
        bad, 0,
        "{bad} bytes of acknowledged writes missing on the destination"
    );
}

/// The full stop-copy stream of the source, which then runs on.
fn capture(src: &MigrationDevice) -> Vec<u8> {
    src.set_state(MigState::Stop).unwrap();
    let mut s = src.set_state(MigState::StopCopy).unwrap().expect("stream");
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read stream");
    src.set_state(MigState::Stop).unwrap();
    src.set_state(MigState::Running).unwrap();
    v
}

/// Offset of the first FW_DATA record's header.
fn first_fw_data(stream: &[u8]) -> usize {
    let mut at = 0;
    while at + RECORD_HEADER_LEN <= stream.len() {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h.copy_from_slice(&stream[at..at + RECORD_HEADER_LEN]);
        let h = RecordHeader::decode(&h);
        if h.tag == TAG_FW_DATA {
            return at;
        }
        at += RECORD_HEADER_LEN + h.record_size as usize;
    }
    panic!("no FW_DATA record");
}

#[test]
fn corrupted_streams_are_refused_and_leave_the_destination_unchanged() {
    init_tracing();
    let a = Testbed::start(1);
    let b = Testbed::start(1);
    let src_pf = pf_up(&a.pf_socket());
    let dst_pf = pf_up(&b.pf_socket());
    if !migration_ready(&src_pf, &a.vf_socket(0), "corrupted streams") {
        return;
    }
    let mut guest = guest_up(&a.vf_socket(0));
    let pattern = fill(guest.hca.cmd().client(), 3);
    let mut dst_guest = vfu::Client::connect(&b.vf_socket(0)).unwrap();
    let dst_pattern = fill(&mut dst_guest, 4);
    let dst_objects = b.adapter.vf(0).unwrap().object_counts();
    let src = MigrationDevice::new(src_pf, 0).unwrap();
    let dst = MigrationDevice::new(dst_pf, 0).unwrap();
    let good = capture(&src);
    // The source runs on after STOP_COPY -> STOP -> RUNNING.
    assert_eq!(src.state(), MigState::Running);
    let m = new_input(Opcode::QueryIssi, 0, 16);
    guest
        .hca
        .cmd()
        .exec(&m, 0x70)
        .expect("source keeps working");
    assert!(dev_mem(guest.hca.cmd().client()) == pattern);

    let fw = first_fw_data(&good);
    let mut flipped = good.clone();
    flipped[fw + RECORD_HEADER_LEN + 100] ^= 0x10;
    let truncated = good[..fw + RECORD_HEADER_LEN + 10].to_vec();
    let mut unknown = good[..fw].to_vec();
    unknown.extend(
        RecordHeader {
            record_size: 4,
            flags: 0,
            tag: 0x1234,
        }
        .encode(),
    );
    unknown.extend([0u8; 4]);
    unknown.extend(&good[fw..]);
    let mut oversized = good[..fw].to_vec();
    oversized.extend(RecordHeader::fw_data(1 << 32).encode());
    let mut optional_ok = good[..fw].to_vec();
    optional_ok.extend(
        RecordHeader {
            record_size: 3,
            flags: FLAGS_TAG_OPTIONAL,
            tag: 0x77,
        }
        .encode(),
    );
    optional_ok.extend(b"xyz");
    let _ = optional_ok;

    let cases: [(&str, &[u8], i32); 4] = [
        ("bit flip", &flipped, 0),
        ("truncation", &truncated, -libc::EINVAL),
        ("unknown mandatory tag", &unknown, -libc::EOPNOTSUPP),
        ("oversized record", &oversized, -libc::ENOMEM),
    ];
    for (name, stream, errno) in cases {
        let mut w = dst.set_state(MigState::Resuming).unwrap().expect("stream");
        let mut failure = None;
        for part in stream.chunks(4096) {
            if let Err(e) = w.write_data(part) {
                failure = Some(e);
                break;
            }
        }
        let failure = match failure {
            Some(e) => e,
            None => dst.set_state(MigState::Stop).expect_err(name),
        };
        eprintln!("{name}: refused: {failure} [{}]", failure.errno());
        assert!(failure.errno() < 0);
        if errno != 0 {
            assert_eq!(failure.errno(), errno, "{name}: {failure}");
        }
        assert_ne!(dst.state(), MigState::Running);
        dst.reset();
        assert_eq!(dst.state(), MigState::Running, "{name}");
        assert!(
            dev_mem(&mut dst_guest) == dst_pattern,
            "{name}: destination memory changed"
        );
        assert_eq!(
            b.adapter.vf(0).unwrap().object_counts(),
            dst_objects,
            "{name}"
        );
    }
    // After all that, the good stream still goes through.
    let mut w = dst.set_state(MigState::Resuming).unwrap().expect("stream");
    for b in good.chunks(1000) {
        w.write_data(b).expect("good stream");
    }
    dst.set_state(MigState::Running).expect("RUNNING");
    assert!(
        dev_mem(&mut dst_guest) == pattern,
        "good stream did not land"
    );
}

fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(mlx5_testbed::mlx5vf_binary())
        .args(args)
        .output()
        .expect("run mlx5vf");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn cli_migrate_round_trip_and_state() {
    init_tracing();
    let a = Testbed::start(1);
    let b = Testbed::start(1);
    {
        let pf = pf_up(&a.pf_socket());
        let ready = migration_ready(&pf, &a.vf_socket(0), "CLI");
        pf.lock().unwrap().down().unwrap();
        if !ready {
            return;
        }
    }
    let mut guest = vfu::Client::connect(&a.vf_socket(0)).unwrap();
    let pattern = fill(&mut guest, 21);
    let (ok, out, err) = run_cli(&["state", "--pf", &s(&a.pf_socket()), "--vf", "0"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("state: RUNNING"), "{out}");
    let (ok, out, err) = run_cli(&[
        "migrate",
        "--from",
        &s(a.dir()),
        "--to",
        &s(b.dir()),
        "--vf",
        "0",
    ]);
    assert!(ok, "{out}{err}");
    eprintln!("{out}");
    assert!(
        out.contains("migrated vf 0") && out.contains("downtime"),
        "{out}"
    );
    let mut c = vfu::Client::connect(&b.vf_socket(0)).unwrap();
    assert!(
        dev_mem(&mut c) == pattern,
        "device memory differs after the CLI migration"
    );
    // The source was left in STOP; the state command sees it and brings it back.
    let (ok, out, err) = run_cli(&[
        "state",
        "--pf",
        &s(&a.pf_socket()),
        "--vf",
        "0",
        "--set",
        "running",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("state: STOP (inferred") && out.contains("state: RUNNING (set)"),
        "{out}"
    );
    let _: PathBuf = a.dir().to_path_buf();
}
