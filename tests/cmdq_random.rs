//! Seeded random command traffic against a VF's command queue: random entries, random
//! mailbox chains (well formed, broken, or pointing anywhere), random opcodes and
//! payloads, random doorbells. The device must never panic or wedge: every rung slot
//! that software handed over completes, the vfio-user connection stays in sync, and a
//! well-formed command still works at the end. A failing seed is printed so the run
//! can be replayed (`MLX5_EMU_SEED=N`).

use mlx5_prm::cmdq::*;
use mlx5_prm::ifc::{get, hdr, set};
use mlx5_prm::Opcode;
use mlx5_testbed::rawq::{encode_block, Entry, RawQueue, SLOT_TIMEOUT};
use mlx5_testbed::{init_tracing, seed, Testbed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vfu::uapi::*;

const IOVA: u64 = 0x2_0000_0000;
const MEM_SIZE: u64 = 0x20_0000;
/// The queue page and the area mailboxes and pages are drawn from.
const CMDQ: u64 = 0;
const SCRATCH: u64 = 0x1000;
const ROUNDS: usize = 400;
/// Longest chain we build.
const MAX_BLOCKS: usize = 16;

/// Waits for `slot` to complete; a slot that never does fails with the seed.
fn wait(q: &RawQueue, slot: u32, seed: u64) {
    assert!(
        q.try_wait(slot as u8, SLOT_TIMEOUT).is_some(),
        "seed {seed}: slot {slot} never completed"
    );
}

const OPCODES: &[Opcode] = &[
    Opcode::EnableHca,
    Opcode::DisableHca,
    Opcode::QueryIssi,
    Opcode::SetIssi,
    Opcode::QueryPages,
    Opcode::ManagePages,
    Opcode::QueryHcaCap,
    Opcode::SetHcaCap,
    Opcode::InitHca,
    Opcode::TeardownHca,
    Opcode::SetDriverVersion,
    Opcode::QueryAdapter,
    Opcode::AllocUar,
    Opcode::DeallocUar,
    Opcode::CreateEq,
    Opcode::DestroyEq,
    Opcode::AllocPd,
    Opcode::DeallocPd,
    Opcode::CreateMkey,
    Opcode::DestroyMkey,
];

/// A pointer into the scratch area, sometimes misaligned, unmapped or wild.
fn pointer(rng: &mut impl Rng) -> u64 {
    match rng.gen_range(0..10) {
        0 => 0,
        1 => rng.gen(),
        2 => IOVA + MEM_SIZE + rng.gen_range(0..0x10000),
        3 => IOVA + SCRATCH + rng.gen_range(0..MEM_SIZE - SCRATCH),
        _ => IOVA + SCRATCH + rng.gen_range(0..(MEM_SIZE - SCRATCH - 0x1000) / 0x400) * 0x400,
    }
}

/// Writes a chain of `n` blocks starting at a random place; mostly well formed,
/// sometimes with a wrong number, token, an early end or a loop.
fn chain(q: &RawQueue, rng: &mut impl Rng, n: usize, token: u8) -> u64 {
    // A declared length may be huge; the chain we build stays short (the device must
    // find it too short, not walk it).
    let n = n.min(MAX_BLOCKS);
    if n == 0 {
        return if rng.gen_bool(0.9) { 0 } else { pointer(rng) };
    }
    let slots = (MEM_SIZE - SCRATCH) / 0x400;
    let blocks: Vec<u64> = (0..n)
        .map(|_| IOVA + SCRATCH + rng.gen_range(0..slots) * 0x400)
        .collect();
    for (i, &at) in blocks.iter().enumerate() {
        let mut data = [0u8; MAILBOX_DATA_SIZE];
        rng.fill(&mut data[..]);
        let next = match (i + 1 < n, rng.gen_range(0..40)) {
            (_, 0) => pointer(rng),
            (_, 1) => blocks[0],
            (true, _) => blocks[i + 1],
            (false, _) => 0,
        };
        let num = if rng.gen_range(0..40) == 0 {
            rng.gen()
        } else {
            i as u32
        };
        let tok = if rng.gen_range(0..40) == 0 {
            rng.gen()
        } else {
            token
        };
        q.write(at - IOVA, &encode_block(&data, num, tok, next));
    }
    blocks[0]
}

#[test]
fn random_command_traffic_never_wedges_the_device() {
    init_tracing();
    let seed = seed(0x6d6c_7835);
    let mut rng = StdRng::seed_from_u64(seed);
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = RawQueue::new(tb.vf_client(0), IOVA, MEM_SIZE);

    for round in 0..ROUNDS {
        let mut mask = 0u32;
        for _ in 0..rng.gen_range(1..4) {
            let slot = rng.gen_range(0..32u32);
            if mask & (1 << slot) != 0 {
                continue;
            }
            let mut input = vec![0u8; rng.gen_range(0..3000)];
            rng.fill(&mut input[..]);
            if input.len() >= 8 && rng.gen_bool(0.9) {
                let op = OPCODES[rng.gen_range(0..OPCODES.len())];
                set(&mut input, hdr::OPCODE, u64::from(u16::from(op)));
                set(&mut input, hdr::OP_MOD, rng.gen_range(0..4));
            }
            let token: u8 = if rng.gen_range(0..30) == 0 {
                0
            } else {
                rng.gen_range(1..=255)
            };
            let inlen = if rng.gen_range(0..20) == 0 {
                rng.gen()
            } else {
                input.len() as u32
            };
            let outlen: u32 = if rng.gen_range(0..20) == 0 {
                rng.gen()
            } else {
                rng.gen_range(0..5000)
            };
            let in_ptr = chain(&q, &mut rng, block_count(input.len()), token);
            let out_ptr = chain(&q, &mut rng, block_count(outlen as usize), token);
            let ty = if rng.gen_range(0..20) == 0 {
                rng.gen()
            } else {
                MLX5_PCI_CMD_XPORT
            };
            let e = Entry {
                ty,
                input: &input,
                inlen,
                in_ptr,
                outlen,
                out_ptr,
                token,
                signed: false,
            };
            q.entry(slot as u8, &e);
            mask |= 1 << slot;
        }
        // Now and then a doorbell for slots software still owns.
        let stray = if round % 17 == 0 {
            rng.gen::<u32>() & !mask
        } else {
            0
        };
        for slot in 0..32u32 {
            if stray & (1 << slot) != 0 {
                q.write(
                    CMDQ + u64::from(slot) * 64 + CMD_STATUS_OWN_OFFSET as u64,
                    &[0],
                );
            }
        }
        q.ring(mask | stray);
        for slot in 0..32u32 {
            if mask & (1 << slot) != 0 {
                wait(&q, slot, seed);
            }
        }
        // The connection is still in sync.
        let mut id = [0u8; 2];
        q.client
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
            .unwrap();
        assert_eq!(u16::from_le_bytes(id), 0x15b3, "seed {seed} round {round}");
    }

    // A well-formed command still completes (in whatever life-cycle state the random
    // traffic left the function).
    let mut input = vec![0u8; 16];
    set(
        &mut input,
        hdr::OPCODE,
        u64::from(u16::from(Opcode::QueryAdapter)),
    );
    let e = Entry {
        token: 1,
        signed: false,
        ..Entry::new(&input, 16)
    };
    q.entry(0, &e);
    q.ring(1);
    wait(&q, 0, seed);
    let status_own = q.read(CMD_STATUS_OWN_OFFSET as u64, 1)[0];
    assert_eq!(
        DeliveryStatus::from_status_own(status_own).unwrap(),
        DeliveryStatus::Ok
    );
    let out = q.read(CMD_OUT_OFFSET as u64, 16);
    let log = vf.command_log();
    assert_eq!(
        get(&out, hdr::STATUS) as u8,
        u8::from(log.last().unwrap().status),
        "the output carries the status the firmware logged"
    );
    assert!(
        log.len() > ROUNDS / 2,
        "seed {seed}: only {} commands logged",
        log.len()
    );
    assert_eq!(log.last().unwrap().opcode, u16::from(Opcode::QueryAdapter));
}
