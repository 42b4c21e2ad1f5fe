//! Seeded random vfio-user messages against a VF: random command numbers, flags and
//! payloads (mostly with a plausible fixed part, sometimes pure noise). Every request
//! that wants a reply gets one, with the same id; the server never panics or loses
//! sync, and the device still answers normally afterwards. `MLX5_EMU_SEED=N` replays.

use mlx5_testbed::{init_tracing, seed, Testbed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vfu::proto::*;
use vfu::uapi::VFIO_PCI_NUM_REGIONS;

const MESSAGES: usize = 3000;

/// A payload whose first fields look like the command's fixed part.
fn random_payload(rng: &mut impl Rng, cmd: u16) -> Vec<u8> {
    let mut p = vec![0u8; rng.gen_range(0..96)];
    rng.fill(&mut p[..]);
    if rng.gen_bool(0.7) {
        let mut w = Writer::new();
        match Command::from_u16(cmd) {
            Some(Command::RegionRead | Command::RegionWrite) => {
                let count = rng.gen_range(0..64u32);
                w.u64(rng.gen_range(0..0x2100))
                    .u32(rng.gen_range(0..10))
                    .u32(count);
                if cmd == Command::RegionWrite as u16 && rng.gen_bool(0.8) {
                    w.bytes(&vec![0x5a; count as usize]);
                }
                return w.finish();
            }
            Some(Command::DeviceGetRegionInfo) => {
                w.u32(rng.gen_range(0..64))
                    .u32(0)
                    .u32(rng.gen_range(0..12))
                    .u32(0)
                    .u64(0)
                    .u64(0);
                return w.finish();
            }
            Some(Command::DeviceGetIrqInfo | Command::DeviceGetInfo) => {
                w.u32(rng.gen_range(0..32))
                    .u32(0)
                    .u32(rng.gen_range(0..7))
                    .u32(0);
                return w.finish();
            }
            Some(Command::DeviceSetIrqs) => {
                w.u32(20)
                    .u32(rng.gen_range(0..0x40))
                    .u32(rng.gen_range(0..6))
                    .u32(rng.gen_range(0..20))
                    .u32(rng.gen_range(0..20));
                return w.finish();
            }
            _ => {}
        }
    }
    p
}

#[test]
fn random_messages_get_answers_and_never_desynchronise_the_server() {
    init_tracing();
    let seed = seed(0x7666_7521);
    let mut rng = StdRng::seed_from_u64(seed);
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    for i in 0..MESSAGES {
        // Never DEVICE_RESET or VERSION at random: both are valid and would only make
        // the later checks depend on order.
        let cmd = loop {
            let n: u16 = rng.gen_range(0..24);
            if n != Command::DeviceReset as u16 && n != Command::Version as u16 {
                break n;
            }
        };
        let flags = if rng.gen_range(0..8) == 0 {
            FLAGS_NO_REPLY
        } else {
            0
        };
        let p = random_payload(&mut rng, cmd);
        let r = c
            .send_raw(cmd, flags, &p, &[])
            .unwrap_or_else(|e| panic!("seed {seed} message {i} (command {cmd}): {e}"));
        assert_eq!(
            r.is_none(),
            flags != 0,
            "seed {seed} message {i}: reply iff wanted"
        );
    }
    let info = c.device_info().expect("the server still answers");
    assert_eq!(info.num_regions, VFIO_PCI_NUM_REGIONS);
    let mut id = [0u8; 4];
    c.region_read(vfu::uapi::VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(id, [0xb3, 0x15, 0x1e, 0x10]);
}
