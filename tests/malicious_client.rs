//! The malicious-client suite: seeded random and structure-aware vfio-user traffic
//! against a live adapter — plausible fixed parts with hostile values, pure noise, fds
//! of every kind on any message, replies posing as requests, half-sent messages and
//! connections dropped mid-message, reconnects. Every request that wants a reply gets
//! one within a second; the process's fds stay bounded; the other functions' clients
//! never notice; a legitimate client of the attacked function works afterwards.
//! `MLX5_EMU_SEED=N` replays a seed; `MLX5_HOSTILE_MESSAGES=N` sets the count (CI
//! runs the default; the acceptance run used 100,000).

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mlx5_testbed::fuzzing::{hostile_fds, vfu_msg, words};
use mlx5_testbed::{init_tracing, seed, Testbed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vfu::proto::{Command, FLAGS_NO_REPLY, FLAGS_TYPE_REPLY, HEADER_SIZE};
use vfu::uapi::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_REGIONS};
use vfu::Client;

/// Messages of the default run: enough to cross every command many times, quick in CI.
const MESSAGES: usize = 20_000;
/// How long a request may go unanswered.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

fn messages() -> usize {
    std::env::var("MLX5_HOSTILE_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MESSAGES)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A payload shaped like `cmd`'s fixed part, with values drawn to hit the edges, or
/// (sometimes) noise.
fn hostile_payload(rng: &mut StdRng, cmd: u16) -> Vec<u8> {
    let edge = |rng: &mut StdRng| -> u64 {
        match rng.gen_range(0..6) {
            0 => 0,
            1 => u64::MAX,
            2 => rng.gen_range(0..16) << 12,
            3 => (rng.gen::<u32>() as u64) << 12,
            4 => rng.gen::<u64>(),
            _ => rng.gen_range(0..0x2_0000),
        }
    };
    if rng.gen_bool(0.15) {
        let mut p = vec![0u8; rng.gen_range(0..200)];
        rng.fill(&mut p[..]);
        return p;
    }
    let argsz = |rng: &mut StdRng, n: u32| if rng.gen_bool(0.8) { n } else { rng.gen() };
    let Some(c) = Command::from_u16(cmd) else {
        let mut p = vec![0u8; rng.gen_range(0..64)];
        rng.fill(&mut p[..]);
        return p;
    };
    let mut p = match c {
        Command::Version => {
            let mut p = vec![0, 0, 0, 0];
            p.extend_from_slice(match rng.gen_range(0..4) {
                0 => &b"{\"capabilities\":{\"max_msg_fds\":99999999}}\0"[..],
                1 => &b"{\"capabilities\":{\"migration\":{\"pgsize\":0}}}\0"[..],
                2 => &b"{\0"[..],
                _ => &b"{}\0"[..],
            });
            p
        }
        Command::DmaMap | Command::DmaUnmap => {
            let mut p = words(&[argsz(rng, 32), rng.gen_range(0..8)]);
            for _ in 0..3 {
                p.extend_from_slice(&edge(rng).to_le_bytes());
            }
            p
        }
        Command::DeviceGetInfo => words(&[argsz(rng, 16), 0, 0, 0]),
        Command::DeviceGetRegionInfo | Command::DeviceGetRegionIoFds => {
            let mut p = words(&[argsz(rng, 32), 0, rng.gen_range(0..12), 0]);
            p.resize(32, 0);
            p
        }
        Command::DeviceGetIrqInfo => words(&[argsz(rng, 16), 0, rng.gen_range(0..8), 0]),
        Command::DeviceSetIrqs => {
            let count = rng.gen_range(0..4);
            let mut p = words(&[
                argsz(rng, 20 + 4 * count),
                rng.gen_range(0..0x40),
                rng.gen_range(0..6),
                rng.gen_range(0..40),
                count,
            ]);
            for _ in 0..count {
                p.extend_from_slice(&rng.gen::<u32>().to_le_bytes());
            }
            p
        }
        Command::RegionRead | Command::RegionWrite | Command::DmaRead | Command::DmaWrite => {
            let count: u32 = match rng.gen_range(0..4) {
                0 => rng.gen(),
                1 => 4,
                _ => rng.gen_range(0..4096),
            };
            let mut p = edge(rng).to_le_bytes().to_vec();
            p.extend_from_slice(&words(&[rng.gen_range(0..10), count]));
            if matches!(c, Command::RegionWrite | Command::DmaWrite) {
                let n = if rng.gen_bool(0.8) {
                    count.min(4096) as usize
                } else {
                    rng.gen_range(0..64)
                };
                let mut data = vec![0u8; n];
                rng.fill(&mut data[..]);
                p.extend_from_slice(&data);
            }
            p
        }
        Command::RegionWriteMulti => {
            let n = rng.gen_range(0..4);
            let mut p = Vec::new();
            for _ in 0..n {
                p.extend_from_slice(&edge(rng).to_le_bytes());
                p.extend_from_slice(&words(&[rng.gen_range(0..10), rng.gen_range(0..9)]));
                p.extend_from_slice(&rng.gen::<u64>().to_le_bytes());
            }
            p
        }
        Command::DeviceFeature => {
            let mut p = words(&[argsz(rng, 16), rng.gen()]);
            p.resize(rng.gen_range(8..40), 0);
            p
        }
        Command::MigDataRead | Command::MigDataWrite => {
            let mut p = words(&[argsz(rng, 8), rng.gen()]);
            p.resize(rng.gen_range(8..64), 0x5a);
            p
        }
        Command::DeviceReset => Vec::new(),
    };
    if rng.gen_bool(0.05) {
        p.truncate(rng.gen_range(0..=p.len()));
    }
    p
}

/// One half-sent message, then the connection dropped: the server must let go.
fn half_sent(path: &std::path::Path, rng: &mut StdRng) {
    let mut s = UnixStream::connect(path).unwrap();
    let size: u32 = HEADER_SIZE as u32 + rng.gen_range(1..4096);
    let mut m = vfu_msg(1, Command::DeviceGetInfo, &[]);
    m[4..8].copy_from_slice(&size.to_le_bytes());
    let cut = rng.gen_range(1..m.len() + 8);
    m.resize(cut.max(1), 0);
    let _ = s.write_all(&m);
}

#[test]
fn seeded_hostile_messages_are_answered_and_leave_every_function_serving() {
    init_tracing();
    let seed = seed(0x6d61_6c63);
    let mut rng = StdRng::seed_from_u64(seed);
    let tb = Testbed::start(2);
    let victim = tb.vf_socket(0);
    // Clients of the other functions, attached throughout.
    let mut pf = tb.pf_client();
    let mut neighbour = tb.vf_client(1);
    let fds_at_start = open_fds();
    let n = messages();
    let started = Instant::now();
    let mut c = tb.vf_client(0);
    c.set_timeout(ANSWER_WITHIN).unwrap();
    let (mut answered, mut closed, mut reconnects) = (0u64, 0u64, 0u64);
    for i in 0..n {
        let what = format!("seed {seed} message {i}");
        match rng.gen_range(0..100) {
            // A half-sent message on a second connection (refused: the function is
            // attached) or, after a drop, on the function itself.
            0 => {
                half_sent(&victim, &mut rng);
                continue;
            }
            // Drop the connection mid-message and come back.
            1 => {
                // A size that claims more than is sent (posted, so nothing waits).
                let p = hostile_payload(&mut rng, 9);
                let size = (HEADER_SIZE + p.len()) as u32 + rng.gen_range(1..4096);
                let _ = c.send_with_size(9, FLAGS_NO_REPLY, size, &p, &[]);
                drop(c);
                c = reconnect(&victim, &what);
                reconnects += 1;
                continue;
            }
            // Noise on a fresh, unnegotiated connection (refused while attached).
            2 => {
                if let Ok(mut s) = UnixStream::connect(&victim) {
                    let mut noise = vec![0u8; rng.gen_range(1..512)];
                    rng.fill(&mut noise[..]);
                    let _ = s.write_all(&noise);
                }
                continue;
            }
            _ => {}
        }
        let cmd: u16 = if rng.gen_bool(0.95) {
            rng.gen_range(1..19)
        } else {
            rng.gen_range(0..64)
        };
        // VERSION again and DEVICE_RESET are legal; keep them rare.
        if (cmd == Command::Version as u16 || cmd == Command::DeviceReset as u16)
            && rng.gen_bool(0.9)
        {
            continue;
        }
        let mut flags = 0;
        if rng.gen_range(0..10) == 0 {
            flags |= FLAGS_NO_REPLY;
        }
        if rng.gen_range(0..50) == 0 {
            // A reply posing as a message: nobody asked, so nobody answers (a reply to
            // a DMA request the server never made is dropped). Sent posted, so the
            // client does not wait for what no peer owes it.
            flags |= FLAGS_TYPE_REPLY | FLAGS_NO_REPLY;
        }
        let p = hostile_payload(&mut rng, cmd);
        let keep = if rng.gen_range(0..6) == 0 {
            hostile_fds(rng.gen())
        } else {
            Vec::new()
        };
        let fds: Vec<RawFd> = keep.iter().map(|f| f.as_raw_fd()).collect();
        match c.send_raw(cmd, flags, &p, &fds) {
            Ok(r) => {
                assert_eq!(
                    r.is_none(),
                    flags & FLAGS_NO_REPLY != 0,
                    "{what}: reply iff wanted"
                );
                answered += 1;
            }
            Err(vfu::VfuError::Timeout(_)) => {
                panic!("{what} (command {cmd}): unanswered within {ANSWER_WITHIN:?}")
            }
            // The server may close a connection it cannot resynchronise.
            Err(e) => {
                tracing::info!(%what, cmd, error = %e, "the server closed the connection");
                closed += 1;
                drop(c);
                c = reconnect(&victim, &what);
                reconnects += 1;
            }
        }
        if i % 5000 == 4999 {
            assert_eq!(pf.device_info().unwrap().num_regions, VFIO_PCI_NUM_REGIONS);
            assert_eq!(
                neighbour.device_info().unwrap().num_regions,
                VFIO_PCI_NUM_REGIONS
            );
        }
    }
    drop(c);
    eprintln!(
        "seed {seed}: {n} messages in {:?}: {answered} answered, {closed} connections closed by \
         the server, {reconnects} reconnects",
        started.elapsed()
    );
    // The function serves a legitimate client; the neighbours never noticed.
    let mut legit = reconnect(&victim, "the legitimate client");
    assert_eq!(
        legit.device_info().unwrap().num_regions,
        VFIO_PCI_NUM_REGIONS
    );
    let mut id = [0u8; 4];
    legit
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(id, [0xb3, 0x15, 0x1e, 0x10]);
    assert_eq!(pf.device_info().unwrap().num_regions, VFIO_PCI_NUM_REGIONS);
    assert_eq!(
        neighbour.device_info().unwrap().num_regions,
        VFIO_PCI_NUM_REGIONS
    );
    drop(legit);
    // Nothing the attacker sent is still held: refusals and connections all let go.
    mlx5_testbed::wait::wait_until(
        "the attacker's fds released",
        Duration::from_secs(20),
        || open_fds() <= fds_at_start + 8,
    );
}

/// Connects to `path` again once the server has let the last client go.
fn reconnect(path: &std::path::Path, what: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(path) {
            Ok(c) => {
                c.set_timeout(ANSWER_WITHIN).unwrap();
                return c;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "reconnect refused, retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{what}: the function does not take a client again: {e}"),
        }
    }
}
