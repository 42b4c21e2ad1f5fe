//! One PF command interface shared by four threads, each driving its own VF: while
//! one thread's command is held in the firmware (Function::delay_commands, 200 ms),
//! the other three threads' commands complete inside that window. Both completion
//! modes (EQE + MSI-X, polling).
//!
//! "Inside the window" is checked by order, not by wall clock: the firmware's command
//! log shows the other VFs' commands finishing before the held one, and each thread
//! counts the commands it got back before VF 0's thread got its result. The only
//! timed check is a lower bound (the hook did hold the command for 200 ms). The
//! commands finished before posting + 200 ms are reported as a figure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mlx5_prm::cmd::migration::QUERY_VHCA_MIGRATION_STATE_OUT_LEN;
use mlx5_prm::Opcode;
use mlx5_testbed::bringup::{up, vhca_input, MIG_ARENA};
use mlx5_testbed::{faults, init_tracing, Testbed};
use mlx5vf::hca::Hca;
use mlx5vf::migration::MigrationDevice;

const VFS: u16 = 4;
const HOLD: Duration = Duration::from_millis(200);

/// Most commands one of the other threads issues (keeps the firmware's command log,
/// 4096 entries, from wrapping).
const MAX_PER_THREAD: usize = 500;

/// What the threads of the three VFs saw.
struct Others {
    /// Commands each thread got back before VF 0's thread had its held result.
    before_held: Vec<u64>,
    /// Of those, the ones back before posting + HOLD (a figure, not asserted).
    in_window: Vec<u64>,
}

fn held_command_does_not_stall_the_other_vfs(events: bool) -> Others {
    init_tracing();
    let tb = Testbed::start(VFS);
    let client = vfu::Client::connect(&tb.pf_socket()).expect("connect PF");
    let pf: Arc<Hca> = Arc::new(up(client, MIG_ARENA, events));
    let devs: Vec<MigrationDevice> = (0..VFS)
        .map(|vf| MigrationDevice::new(pf.clone(), vf).expect("migration device"))
        .collect();
    let held_vhca = devs[0].info().vhca_id;
    faults::delay_commands(
        &tb.pf(),
        Opcode::QueryVhcaMigrationState,
        Some(held_vhca),
        HOLD,
        1,
    );

    let start = Arc::new(Barrier::new(VFS as usize));
    let held_done = Arc::new(AtomicBool::new(false));
    let mut others = Vec::new();
    for dev in &devs[1..] {
        let dev = dev.clone();
        let start = start.clone();
        let held_done = held_done.clone();
        others.push(thread::spawn(move || {
            // Released once VF 0's command is posted.
            start.wait();
            let mut done = Vec::new();
            for _ in 0..MAX_PER_THREAD {
                dev.data_size().expect("MIG_DATA_SIZE of another VF");
                if held_done.load(Ordering::Acquire) {
                    break;
                }
                done.push(Instant::now());
            }
            done
        }));
    }

    let fw_log_before = tb.adapter.pf().command_log().len();
    // This thread is VF 0's: its QUERY is held in the firmware.
    let input = vhca_input(Opcode::QueryVhcaMigrationState, 0, 16, held_vhca);
    let t0 = Instant::now();
    let ticket = pf
        .cmd()
        .submit(&input, QUERY_VHCA_MIGRATION_STATE_OUT_LEN)
        .expect("post the held command");
    start.wait();
    pf.cmd().wait(ticket).expect("the held command completes");
    let held_for = t0.elapsed();
    held_done.store(true, Ordering::Release);
    // The held command cannot have completed before this instant.
    let window_end = t0 + HOLD;

    let mut r = Others {
        before_held: Vec::new(),
        in_window: Vec::new(),
    };
    for h in others {
        let done = h.join().expect("a VF thread");
        r.before_held.push(done.len() as u64);
        r.in_window
            .push(done.iter().filter(|&&at| at < window_end).count() as u64);
    }
    // The firmware's view: commands that finished executing while the held one
    // (on its own slot) had not.
    let log = tb.adapter.pf().command_log();
    let query = u16::from(Opcode::QueryVhcaMigrationState);
    let batch = &log[fw_log_before..];
    let held_at = batch
        .iter()
        .position(|c| c.opcode == query && c.slot == ticket.slot())
        .expect("the held command in the firmware's log");
    let fw_before_held = batch[..held_at]
        .iter()
        .filter(|c| c.opcode == query && c.slot != ticket.slot())
        .count();
    eprintln!(
        "events={events}: held command {held_for:?}; the other threads got back {:?} commands before it ({:?} inside the first {HOLD:?}); the firmware finished {fw_before_held} of theirs before it",
        r.before_held, r.in_window
    );
    assert!(held_for >= HOLD, "the hook held the command ({held_for:?})");
    assert!(
        fw_before_held >= r.before_held.len(),
        "the firmware finished only {fw_before_held} other commands before the held one"
    );
    for (i, n) in r.before_held.iter().enumerate() {
        assert!(
            *n >= 1,
            "VF {}'s thread got no command back while VF 0's was held ({:?})",
            i + 1,
            r.before_held
        );
    }
    drop(devs);
    pf.down().expect("PF teardown");
    r
}

#[test]
fn three_vfs_complete_commands_while_a_fourth_is_held_in_the_firmware_by_eqe() {
    held_command_does_not_stall_the_other_vfs(true);
}

#[test]
fn three_vfs_complete_commands_while_a_fourth_is_held_in_the_firmware_by_polling() {
    held_command_does_not_stall_the_other_vfs(false);
}
