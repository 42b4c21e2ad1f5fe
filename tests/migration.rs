//! Issue 5 acceptance, driver half: live migration of a VF between two adapters through
//! mlx5vf's arcs, stream and pre-copy (kernel-mlx5vf.md §2–§3).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mlx5_prm::migration_stream::{RecordHeader, FLAGS_TAG_OPTIONAL, RECORD_HEADER_LEN};
use mlx5_testbed::bins::arg;
use mlx5_testbed::bringup::{exec, guest_up, query_issi_in, shared_pf_up};
use mlx5_testbed::child::ChildAdapter;
use mlx5_testbed::devmem::{fill_bar2, read_bar2, BAR2};
use mlx5_testbed::migrate::{
    capture, first_fw_data, keeps_working, load_in_chunks, migrate, write_in_chunks, Rig,
};
use mlx5_testbed::{init_tracing, run_cli, Sockets, Testbed};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::MigrationDevice;
use mlx5vf::report;
use rand::{Rng, SeedableRng};

#[test]
fn round_trip_moves_device_memory_and_every_object_to_a_second_adapter() {
    init_tracing();
    let a = Rig::start();
    let b = Rig::start();
    let guest = guest_up(&a.tb.vf_socket(0));
    let pattern = fill_bar2(&mut guest.hca.cmd().client(), 0x5eed);
    let src_fn = a.vf();
    let dst_fn = b.vf();
    let before = (
        src_fn.object_counts(),
        src_fn.hca_state(),
        src_fn.firmware().issi(),
    );

    let (src, dst) = (&a.dev, &b.dev);
    let (bytes, rounds, downtime) = migrate(src, dst, 64 << 10, || {});
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
    let mut dst_client = vfu::Client::connect(&b.tb.vf_socket(0)).expect("dst VF");
    assert!(
        read_bar2(&mut dst_client) == pattern,
        "device memory differs"
    );
    drop(dst_client);
    let (_client, arena) = guest.hca.into_cmdif().into_parts();
    keeps_working(arena, &b.tb.vf_socket(0));
}

/// An idle VF whose image is larger than a stop-copy chunk (chunk mode, as the
/// capabilities offer it): the first pre-copy SAVE carries the whole image and
/// PRECOPY_INFO counts it as initial bytes, as mlx5vf does (QEMU's switchover-ack waits
/// for them to reach 0); once it is read nothing is dirty, so pre-copy converges at
/// once and stop-copy carries only the small final delta.
#[test]
fn precopy_of_an_idle_vf_counts_its_image_as_initial_bytes_and_converges() {
    init_tracing();
    let size = 16u64 << 20;
    let config = || mlx5_testbed::AdapterConfig {
        vfs: 1,
        dev_mem: size,
        ..Default::default()
    };
    let a = Rig::on(Testbed::start_with(config()));
    let b = Rig::on(Testbed::start_with(config()));
    let pattern = mlx5_testbed::devmem::fill(&a.vf(), 0x1d1e);
    let mut out = b
        .dev
        .set_state(MigState::Resuming)
        .expect("RESUMING")
        .expect("resume stream");
    let mut input = a
        .dev
        .set_state(MigState::PreCopy)
        .expect("PRE_COPY")
        .expect("save stream");
    let first = input.precopy_info().expect("PRECOPY_INFO");
    // STOP_COPY_SIZE record, FW_DATA header, an image of every page.
    assert!(
        first.initial_bytes > 24 + 16 + size,
        "initial_bytes {} for {size} bytes of device memory",
        first.initial_bytes
    );
    assert_eq!(first.dirty_bytes, 0);
    let mut keep = Vec::new();
    let moved = mlx5_testbed::migrate::pump(&mut input, Some(&mut out), &mut keep);
    assert_eq!(
        moved, first.initial_bytes,
        "the first round drains the initial bytes"
    );
    let next = input.precopy_info().expect("PRECOPY_INFO");
    assert_eq!(
        (next.initial_bytes, next.dirty_bytes),
        (0, 0),
        "an idle VF has nothing left to send"
    );
    a.dev.set_state(MigState::StopCopy).expect("STOP_COPY");
    let last = mlx5_testbed::migrate::pump(&mut input, Some(&mut out), &mut keep);
    assert!(last < 64 << 10, "stop-copy carried {last} bytes");
    b.dev.set_state(MigState::Running).expect("RUNNING");
    assert!(
        mlx5_testbed::devmem::dev_mem(&b.vf()) == pattern,
        "device memory differs"
    );
}

#[test]
fn round_trip_to_a_second_emulator_process() {
    init_tracing();
    let a = Testbed::start(1);
    let emu = ChildAdapter::start(1);
    let src_pf = shared_pf_up(&a.pf_socket());
    let dst_pf = shared_pf_up(&emu.pf_socket());
    let guest = guest_up(&a.vf_socket(0));
    let pattern = fill_bar2(&mut guest.hca.cmd().client(), 7);
    let src = MigrationDevice::new(src_pf, 0).unwrap();
    let dst = MigrationDevice::new(dst_pf, 0).unwrap();
    migrate(&src, &dst, 64 << 10, || {});
    let vf = emu.vf_socket(0);
    let mut c = vfu::Client::connect(&vf).unwrap();
    assert!(read_bar2(&mut c) == pattern, "device memory differs");
    drop(c);
    let (_client, arena) = guest.hca.into_cmdif().into_parts();
    keeps_working(arena, &vf);
}

#[test]
fn precopy_with_a_busy_writer_keeps_every_acknowledged_write() {
    init_tracing();
    let a = Rig::start();
    let b = Rig::start();
    let mut guest = vfu::Client::connect(&a.tb.vf_socket(0)).unwrap();
    let mut shadow = fill_bar2(&mut guest, 11);
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
    let (src, dst) = (&a.dev, &b.dev);
    let mut result = None;
    let (bytes, rounds, downtime) = migrate(src, dst, 4096, || {
        stop.store(true, Ordering::Release);
        result = Some(writer.join().expect("writer"));
    });
    let (shadow, writes) = result.expect("writer result");
    eprintln!(
        "busy writer: {writes} writes, {bytes} bytes, {rounds} rounds, downtime {downtime:?}"
    );
    let mut c = vfu::Client::connect(&b.tb.vf_socket(0)).unwrap();
    let got = read_bar2(&mut c);
    let bad = got.iter().zip(&shadow).filter(|(a, b)| a != b).count();
    assert_eq!(
        bad, 0,
        "{bad} bytes of acknowledged writes missing on the destination"
    );
}

#[test]
fn corrupted_streams_are_refused_and_leave_the_destination_unchanged() {
    init_tracing();
    let a = Rig::start();
    let b = Rig::start();
    let guest = guest_up(&a.tb.vf_socket(0));
    let pattern = fill_bar2(&mut guest.hca.cmd().client(), 3);
    let mut dst_guest = vfu::Client::connect(&b.tb.vf_socket(0)).unwrap();
    let dst_pattern = fill_bar2(&mut dst_guest, 4);
    let dst_objects = b.vf().object_counts();
    let (src, dst) = (&a.dev, &b.dev);
    let good = capture(src);
    // The source runs on after STOP_COPY -> STOP -> RUNNING.
    assert_eq!(src.state(), MigState::Running);
    exec(guest.hca.cmd(), query_issi_in()).expect("source keeps working");
    assert!(read_bar2(&mut guest.hca.cmd().client()) == pattern);

    let fw = first_fw_data(&good);
    let mut flipped = good.clone();
    flipped[fw + RECORD_HEADER_LEN + 100] ^= 0x10;
    let truncated = good[..fw + RECORD_HEADER_LEN + 10].to_vec();
    let mut unknown = good[..fw].to_vec();
    unknown.extend(RecordHeader::new(4, 0, 0x1234).to_bytes());
    unknown.extend([0u8; 4]);
    unknown.extend(&good[fw..]);
    let mut oversized = good[..fw].to_vec();
    oversized.extend(RecordHeader::fw_data(1 << 32).to_bytes());
    let mut optional_ok = good[..fw].to_vec();
    optional_ok.extend(RecordHeader::new(3, FLAGS_TAG_OPTIONAL, 0x77).to_bytes());
    optional_ok.extend(b"xyz");
    optional_ok.extend(&good[fw..]);

    let cases: [(&str, &[u8], i32); 4] = [
        ("bit flip", &flipped, 0),
        ("truncation", &truncated, -libc::EINVAL),
        ("unknown mandatory tag", &unknown, -libc::EOPNOTSUPP),
        ("oversized record", &oversized, -libc::ENOMEM),
    ];
    for (name, stream, errno) in cases {
        let mut w = dst.set_state(MigState::Resuming).unwrap().expect("stream");
        let failure = match write_in_chunks(&mut w, stream, 4096) {
            Err(e) => e,
            Ok(()) => dst.set_state(MigState::Stop).expect_err(name),
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
            read_bar2(&mut dst_guest) == dst_pattern,
            "{name}: destination memory changed"
        );
        assert_eq!(b.vf().object_counts(), dst_objects, "{name}");
    }
    // After all that, the good stream still goes through, with a record of an unknown
    // optional tag in it (skipped, as mlx5vf skips optional records it does not know).
    load_in_chunks(dst, &optional_ok, 1000);
    assert!(
        read_bar2(&mut dst_guest) == pattern,
        "good stream did not land"
    );
}

#[test]
fn cli_migrate_round_trip_and_state() {
    init_tracing();
    let a = Testbed::start(1);
    let b = Testbed::start(1);
    let mut guest = vfu::Client::connect(&a.vf_socket(0)).unwrap();
    let pattern = fill_bar2(&mut guest, 21);
    let (ok, out, err) = run_cli(&["state", "--pf", &arg(&a.pf_socket()), "--vf", "0"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("state: RUNNING"), "{out}");
    let svg_path = a.dir().join("timeline.svg");
    let (ok, out, err) = run_cli(&[
        "migrate",
        "--from",
        &arg(a.dir()),
        "--to",
        &arg(b.dir()),
        "--vf",
        "0",
        "--report",
        &arg(&svg_path),
    ]);
    assert!(ok, "{out}{err}");
    eprintln!("{out}");
    assert!(
        out.contains("migrated vf 0") && out.contains("downtime"),
        "{out}"
    );
    // stdout is a pipe here: no progress bar anywhere.
    assert!(!err.contains("pre-copy ["), "{err}");
    let rounds: usize = out
        .split(" pre-copy rounds")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no round count in {out}"));
    assert!(rounds >= 1, "{out}");
    let svg = std::fs::read_to_string(&svg_path).expect("the timeline was written");
    let doc = roxmltree::Document::parse(&svg).expect("the timeline parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let marks = |tag: &str, c| {
        let fill = report::fill(c);
        doc.descendants()
            .filter(|n| n.has_tag_name(tag) && n.attribute("fill") == Some(&fill[..]))
            .count()
    };
    // One bar and one dirty dot per round, and one of each in the legend.
    assert_eq!(marks("rect", report::ROUND_COLOR), rounds + 1, "{svg}");
    assert_eq!(marks("circle", report::DIRTY_COLOR), rounds + 1, "{svg}");
    assert_eq!(marks("rect", report::STOP_COPY_COLOR), 2, "{svg}");
    let mut c = vfu::Client::connect(&b.vf_socket(0)).unwrap();
    assert!(
        read_bar2(&mut c) == pattern,
        "device memory differs after the CLI migration"
    );
    // The source was left in STOP; the state command sees it and brings it back.
    let (ok, out, err) = run_cli(&[
        "state",
        "--pf",
        &arg(&a.pf_socket()),
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
}
