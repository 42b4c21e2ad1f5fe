//! Issue 5, emulator side: the VHCA migration commands driven through a real PF command
//! interface (mlx5vf's command client) over real sockets, from one adapter to another.
//!
//! A VF is brought up by its own driver, given objects and a seeded device-memory
//! pattern (through its mmap of BAR2 and REGION_WRITE), suspended, saved through the PF
//! into an mkey buffer, loaded into a VF of a second adapter, and compared.

use std::time::Instant;

use mlx5_prm::cmd::migration::*;
use mlx5_prm::ifc::{get, set};
use mlx5_prm::migration_stream::RecordHeader;
use mlx5_prm::Opcode;
use mlx5_testbed::bringup::{pf_up, run_vhca, stop_vhca, up, vhca_input, ARENA};
use mlx5_testbed::devmem::{dev_mem, pattern, Bar2Map, BAR2};
use mlx5_testbed::{init_tracing, Function, Testbed};
use mlx5vf::hca::Hca;
use mlx5vf::migration::fw::{Fw, MigBuf};

const PAGE: u64 = 4096;
const VF_VHCA: u16 = 1;

/// The PF's command interface aimed at the VF, as mlx5vf's arcs hold it.
fn fw(pf: &Hca) -> Fw<'_> {
    Fw {
        hca: pf,
        vhca_id: VF_VHCA,
        chunk_mode: false,
    }
}

/// A SAVE/LOAD buffer of `bytes` in `pd`: mlx5vf's own.
fn mig_buf(pf: &Hca, pd: u32, bytes: u64) -> MigBuf {
    MigBuf::alloc(&fw(pf), pd, bytes).expect("migration buffer")
}

fn cmd(op: Opcode, op_mod: u16, len: usize) -> Vec<u8> {
    vhca_input(op, op_mod, len, VF_VHCA)
}

fn exec(pf: &mut Hca, m: &[u8], out: usize) -> Result<Vec<u8>, i32> {
    pf.cmd().exec(m, out).map_err(|e| e.errno())
}

#[test]
fn vf_state_and_device_memory_move_to_a_second_adapter() {
    init_tracing();
    let a = Testbed::start(1);
    let b = Testbed::start(1);
    let (a_vf, b_vf) = (a.vf(0), b.vf(0));
    let size = a_vf.devmem().size() as usize;
    assert_eq!(size, 1 << 20, "--dev-mem default");

    // The source VF: its own driver, objects, and a pattern in device memory.
    let mut vf_client = a.vf_client(0);
    let want = pattern(size, 0x5eed);
    {
        let map = Bar2Map::new(&mut vf_client);
        map.write(0, &want[..size / 2]);
    }
    for (i, chunk) in want[size / 2..].chunks(64 << 10).enumerate() {
        vf_client
            .region_write(BAR2, (size / 2 + i * (64 << 10)) as u64, chunk)
            .unwrap();
    }
    let vf = up(vf_client, ARENA, true);
    let page = vf.cmd().arena().alloc_page().unwrap();
    let vf_mkey = vf.create_mkey(&[page], 12, PAGE, 0x77).expect("VF mkey");
    let extra_pd = vf.alloc_pd().unwrap();
    assert!(
        dev_mem(&a_vf) == want,
        "both write paths reach device memory"
    );

    // The PF of adapter A: suspend the VF (initiator, then responder), query, save.
    let mut pf = pf_up(&a.pf_socket());
    stop_vhca(&pf, VF_VHCA);
    // A write into the frozen VF's memory is refused and recorded.
    assert!(vf
        .cmd()
        .client()
        .region_write(BAR2, 0, &[1, 2, 3, 4])
        .is_err());
    let v = a_vf.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].address, 0);

    let q = exec(
        &mut pf,
        &cmd(Opcode::QueryVhcaMigrationState, 0, 16),
        QUERY_VHCA_MIGRATION_STATE_OUT_LEN,
    )
    .unwrap();
    let required = get(&q, QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE);
    let pd = pf.alloc_pd().unwrap();
    let buf = mig_buf(&pf, pd, required);
    let mut m = cmd(Opcode::SaveVhcaState, 0, SAVE_VHCA_STATE_IN_LEN);
    set(&mut m, SAVE_VHCA_STATE_IN_MKEY, buf.mkey().into());
    set(&mut m, SAVE_VHCA_STATE_IN_SIZE, buf.size());
    let t = Instant::now();
    let out = exec(&mut pf, &m, SAVE_VHCA_STATE_OUT_LEN).expect("save");
    let save_time = t.elapsed();
    let image_size = get(&out, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE);
    assert_eq!(image_size, required, "QUERY predicted the image");
    let mut image = vec![0u8; image_size as usize];
    buf.read(pf.cmd().arena(), 0, &mut image)
        .expect("read the image");
    // As mlx5vf streams it: a FW_DATA record around the image.
    let header = RecordHeader::fw_data(image_size).to_bytes();
    assert_eq!(
        RecordHeader::parse(&header).unwrap().record_size.get(),
        image_size
    );

    // The destination: adapter B's PF loads it into its VF 0.
    let mut pf_b = pf_up(&b.pf_socket());
    stop_vhca(&pf_b, VF_VHCA);
    let pd_b = pf_b.alloc_pd().unwrap();
    let buf_b = mig_buf(&pf_b, pd_b, image_size);
    // A corrupted copy first: refused, and B's VF is unchanged.
    let before = (b_vf.object_counts(), dev_mem(&b_vf));
    let mut bad = image.clone();
    bad[image.len() / 3] ^= 4;
    buf_b.write(pf_b.cmd().arena(), 0, &bad).expect("write");
    let mut m = cmd(Opcode::LoadVhcaState, 0, LOAD_VHCA_STATE_IN_LEN);
    set(&mut m, LOAD_VHCA_STATE_IN_MKEY, buf_b.mkey().into());
    set(&mut m, LOAD_VHCA_STATE_IN_SIZE, image_size);
    assert_eq!(exec(&mut pf_b, &m, 16), Err(-libc::EINVAL));
    assert!((b_vf.object_counts(), dev_mem(&b_vf)) == before);
    buf_b.write(pf_b.cmd().arena(), 0, &image).expect("write");
    let t = Instant::now();
    exec(&mut pf_b, &m, 16).expect("load");
    let load_time = t.elapsed();
    run_vhca(&pf_b, VF_VHCA);

    assert!(dev_mem(&b_vf) == want, "device memory arrived");
    assert_eq!(b_vf.object_counts(), a_vf.object_counts());
    assert_eq!(
        b_vf.firmware().image_objects(),
        a_vf.firmware().image_objects()
    );
    assert_eq!(b_vf.hca_state(), a_vf.hca_state());
    let queue = |f: &Function| f.lock().bar0.cmdq_address();
    assert_eq!(
        queue(&b_vf),
        queue(&a_vf),
        "the guest's command queue moved"
    );
    eprintln!(
        "1 MiB device memory: image {image_size} bytes, SAVE {save_time:?}, LOAD {load_time:?} (command round trips)"
    );

    // The source runs on after resume: its driver's commands work and tear it down.
    run_vhca(&pf, VF_VHCA);
    vf.destroy_mkey(vf_mkey).unwrap();
    vf.dealloc_pd(extra_pd).unwrap();
    vf.down().expect("source VF still answers its driver");
    for (hca, buf, pd) in [(&mut pf, buf, pd), (&mut pf_b, buf_b, pd_b)] {
        buf.free(&fw(hca));
        hca.dealloc_pd(pd).unwrap();
        hca.down().unwrap();
    }
}
