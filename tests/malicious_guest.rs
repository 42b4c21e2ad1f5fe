//! The malicious-guest suite: what a guest controls — its command queue's address, the
//! entries and mailboxes in its memory, command and UAR doorbells, resets — drawn at
//! random (seeded) against a live VF. Every register access is answered; the work a
//! doorbell sets off is bounded (at most one command per slot, each slot completing or
//! dropped); the other functions keep serving; the VF is still resettable and runs a
//! well-formed command at the end. `MLX5_EMU_SEED=N` replays a seed.

use std::time::{Duration, Instant};

use mlx5_emulator::bar0::{UAR_END, UAR_START};
use mlx5_emulator::limits::{CMDQ_SLOTS, VIOLATION_LOG_CAPACITY};
use mlx5_prm::cmd::hca::QUERY_ISSI_OUT_LEN;
use mlx5_prm::cmd::migration::ResumeOpMod;
use mlx5_prm::cmdq::*;
use mlx5_prm::iseg::{CMDQ_ADDR_H_OFFSET, CMDQ_ADDR_L_SZ_OFFSET, CMD_DBELL_OFFSET};
use mlx5_prm::Opcode;
use mlx5_testbed::bringup::{pf_up, resume_vhca, stop_vhca};
use mlx5_testbed::rawq::{input, status, RawQueue};
use mlx5_testbed::wait::wait_until;
use mlx5_testbed::{init_tracing, seed, Testbed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vfu::uapi::*;

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const IOVA: u64 = 0x3_0000_0000;
const MEM_SIZE: u64 = 0x10_0000;
const ROUNDS: usize = 600;

fn queue_address(rng: &mut StdRng) -> u64 {
    match rng.gen_range(0..6) {
        // Inside the guest memory, page aligned (the only kind a driver programs).
        0 | 1 => IOVA + (rng.gen_range(0..MEM_SIZE / 4096) << 12),
        // Unmapped, the top of the address space, or unaligned.
        2 => rng.gen::<u64>() & !0xfff,
        3 => !0xfff,
        4 => IOVA + MEM_SIZE - 0x800,
        _ => rng.gen(),
    }
}

#[test]
fn random_guest_traffic_leaves_the_function_resettable_and_serving() {
    init_tracing();
    let seed = seed(0x6775_6573);
    let mut rng = StdRng::seed_from_u64(seed);
    let tb = Testbed::start(2);
    let vf = tb.vf(0);
    let mut neighbour = tb.vf_client(1);
    let mut q = RawQueue::new(tb.vf_client(0), IOVA, MEM_SIZE);
    let mut noise = vec![0u8; MEM_SIZE as usize];
    let started = Instant::now();
    let (mut doorbells, mut resets, mut refused) = (0u64, 0u64, 0u64);
    // Where the queue is inside the guest memory, when it is.
    let mut queue = Some(0u64);
    for round in 0..ROUNDS {
        let what = format!("seed {seed} round {round}");
        match rng.gen_range(0..10) {
            // Guest memory rewritten at random: entries, chains, anything.
            0..=2 => {
                let at = rng.gen_range(0..MEM_SIZE as usize - 4096);
                let n = rng.gen_range(1..4096);
                rng.fill(&mut noise[at..at + n]);
                q.write(at as u64, &noise[at..at + n]);
                // Most times, hardware-owned entries with a plausible header at the
                // queue's current address: random lengths, tokens, mailbox pointers
                // into the guest memory (or anywhere), random opcodes.
                if let Some(base) = queue.filter(|_| rng.gen_bool(0.8)) {
                    let mut ring = vec![0u8; CMDQ_SLOTS as usize * 64];
                    rng.fill(&mut ring[..]);
                    for e in ring.chunks_mut(64) {
                        e[0] = MLX5_PCI_CMD_XPORT;
                        e[4..8].copy_from_slice(&rng.gen_range(0u32..4096).to_be_bytes());
                        let ptr = |rng: &mut StdRng| match rng.gen_range(0..3) {
                            0 => 0,
                            1 => IOVA + (rng.gen_range(0..MEM_SIZE / 1024) << 10),
                            _ => rng.gen::<u64>(),
                        };
                        e[8..16].copy_from_slice(&ptr(&mut rng).to_be_bytes());
                        e[0x30..0x38].copy_from_slice(&ptr(&mut rng).to_be_bytes());
                        e[0x38..0x3c].copy_from_slice(&rng.gen_range(0u32..4096).to_be_bytes());
                        e[0x3c] = rng.gen_range(1..=255);
                        e[CMD_STATUS_OWN_OFFSET] = CMD_OWNER_HW;
                    }
                    q.write(base, &ring);
                }
            }
            // The queue moved anywhere (written as the driver writes it, high first).
            3 => {
                let a = queue_address(&mut rng);
                queue =
                    (a >= IOVA && a + 0x800 <= IOVA + MEM_SIZE && a & 0xfff == 0).then(|| a - IOVA);
                let r = q.client.region_write(
                    BAR0,
                    CMDQ_ADDR_H_OFFSET,
                    &((a >> 32) as u32).to_be_bytes(),
                );
                let r2 =
                    q.client
                        .region_write(BAR0, CMDQ_ADDR_L_SZ_OFFSET, &(a as u32).to_be_bytes());
                refused += u64::from(r.is_err()) + u64::from(r2.is_err());
            }
            // Command doorbells: any mask, sometimes a burst.
            4..=6 => {
                for _ in 0..rng.gen_range(1..16) {
                    let mask: u32 = rng.gen();
                    q.client
                        .region_write(BAR0, CMD_DBELL_OFFSET, &mask.to_be_bytes())
                        .unwrap_or_else(|e| panic!("{what}: doorbell write unanswered: {e}"));
                    doorbells += 1;
                }
            }
            // UAR doorbells and stray register writes of any size.
            7 | 8 => {
                let off = rng.gen_range(0..UAR_END + 0x1000) & !3;
                let mut data = vec![0u8; 4 * rng.gen_range(1..256)];
                rng.fill(&mut data[..]);
                refused += u64::from(q.client.region_write(BAR0, off, &data).is_err());
            }
            // A reset, as the guest's FLR or the VMM's reset.
            _ => {
                q.client
                    .reset()
                    .unwrap_or_else(|e| panic!("{what}: reset: {e}"));
                queue = None;
                resets += 1;
                // The guest's driver programs its queue again after most resets.
                if rng.gen_bool(0.7) {
                    q.program(IOVA).unwrap();
                    queue = Some(0);
                }
            }
        }
        if round % 100 == 99 {
            neighbour
                .device_info()
                .unwrap_or_else(|e| panic!("{what}: the neighbour: {e}"));
        }
    }
    // Bounded work: with no more doorbells the queue goes quiet (each rung slot has
    // completed or been dropped) well within the slot timeout.
    let mut last = vf.command_log().len();
    wait_until("the doorbells' work ends", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = vf.command_log().len();
        let quiet = now == last;
        last = now;
        quiet
    });
    eprintln!(
        "seed {seed}: {ROUNDS} rounds in {:?}: {doorbells} doorbells, {resets} resets, \
         {refused} register writes refused, {} commands logged",
        started.elapsed(),
        vf.command_log().len()
    );

    // Still resettable, and a well-formed command works.
    q.client.reset().unwrap();
    q.write(0, &vec![0u8; 0x1000]);
    q.program(IOVA).unwrap();
    let out = q.exec(0, &input(Opcode::EnableHca, 0, 16), 16);
    assert_eq!(
        status(&out),
        (0, 0),
        "seed {seed}: ENABLE_HCA after the storm"
    );
    let out = q.exec(1, &input(Opcode::QueryIssi, 0, 16), QUERY_ISSI_OUT_LEN);
    assert_eq!(
        status(&out),
        (0, 0),
        "seed {seed}: QUERY_ISSI after the storm"
    );
    neighbour.device_info().unwrap();
}

/// A frozen function written to in bulk: one 1 MiB write across its UAR pages is
/// 262,144 refused doorbells. The write is answered, every refusal is counted, the log
/// of them stays bounded, and the function thaws and serves.
#[test]
fn a_bulk_write_into_a_frozen_function_is_counted_and_bounded() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = RawQueue::new(tb.vf_client(0), IOVA, MEM_SIZE);
    let pf = pf_up(&tb.pf_socket());
    let vhca = vf.id.vhca_id;
    stop_vhca(&pf, vhca);
    let before = vf.migration().violations_total();
    let len = 1usize << 20;
    assert!(UAR_START + len as u64 <= UAR_END);
    let _ = q.client.region_write(BAR0, UAR_START, &vec![0x11u8; len]);
    let counted = vf.migration().violations_total() - before;
    assert!(counted >= 1, "the refused doorbells are counted");
    assert!(
        vf.violations().len() <= VIOLATION_LOG_CAPACITY,
        "the log stays bounded"
    );
    resume_vhca(&pf, ResumeOpMod::Responder, vhca).unwrap();
    let out = q.exec(0, &input(Opcode::EnableHca, 0, 16), 16);
    assert_eq!(status(&out), (0, 0));
    eprintln!("one 1 MiB write into a frozen function: {counted} refusals counted");
}
