use std::sync::Arc;

use mlx5_prm::ifc::get;

use super::super::test_support::{populated, FakeEnv, FakePeer};
use super::super::Reply;
use super::*;

/// IOVA of the PF's migration buffer.
const BUF_IOVA: u64 = 0x4000_0000;
/// Size of the PF's migration buffer (and of its mkey).
const BUF_LEN: u64 = 4 << 20;
/// Device memory of the test functions.
const DEV_MEM: u64 = 64 << 10;
/// The PF buffer's mkey.
const KEY: u32 = (1 << 8) | 0x33;

/// A PF's firmware on a fake environment with one fake VF peer. The PF holds a
/// DMA-mapped buffer behind mkey [`KEY`]. No threads, no sockets.
struct Rig {
    pf: FwCell,
    env: FakeEnv,
    vf: Arc<FakePeer>,
    buf: std::fs::File,
}

impl Rig {
    fn new() -> Rig {
        let mut env = FakeEnv::new(FunctionId::pf());
        let vf = FakePeer::new(FunctionId::vf(0), DEV_MEM);
        env.peers.push(Arc::clone(&vf));
        let buf = env.map(BUF_IOVA, BUF_LEN);
        let pf = FwCell::new(FunctionId::pf());
        {
            // Test shortcut: the PF's bring-up and its buffer mkey, set directly.
            let mut fw = pf.lock();
            fw.state = HcaState::Initialized;
            fw.pds.insert(1);
            fw.mkeys.insert(
                1,
                Mkey {
                    index: 1,
                    variant: 0x33,
                    pd: 1,
                    start: 0,
                    len: BUF_LEN,
                    log_page_size: 12,
                    mtt: (0..BUF_LEN / 4096).map(|i| BUF_IOVA + i * 4096).collect(),
                },
            );
        }
        Rig { pf, env, vf, buf }
    }

    /// Gives the VF an initialized HCA and some objects.
    fn populate_vf(&self) {
        self.vf.fw.install(populated(self.vf.id));
    }

    fn exec(&self, input: &[u8], outlen: usize) -> Reply {
        self.pf.execute(&self.env, &Cmd::new(input, outlen))
    }

    fn input(op: Opcode, op_mod: u16, len: usize, vhca_id: u16) -> Vec<u8> {
        let mut m = vec![0u8; len];
        set(&mut m, hdr::OPCODE, u64::from(u16::from(op)));
        set(&mut m, hdr::OP_MOD, u64::from(op_mod));
        set(&mut m, IN_VHCA_ID, u64::from(vhca_id));
        m
    }

    fn suspend(&self, op_mod: SuspendOpMod) -> Reply {
        let m = Self::input(Opcode::SuspendVhca, op_mod.into(), SUSPEND_VHCA_IN_LEN, 1);
        self.exec(&m, SUSPEND_VHCA_OUT_LEN)
    }

    fn resume(&self, op_mod: ResumeOpMod) -> Reply {
        let m = Self::input(Opcode::ResumeVhca, op_mod.into(), RESUME_VHCA_IN_LEN, 1);
        self.exec(&m, RESUME_VHCA_OUT_LEN)
    }

    fn freeze(&self) {
        ok(&self.suspend(SuspendOpMod::Initiator));
        ok(&self.suspend(SuspendOpMod::Responder));
    }

    /// QUERY: (required_umem_size, remaining_total_size).
    fn query(&self, incremental: bool, chunk: bool) -> (u64, u64) {
        let mut m = Self::input(Opcode::QueryVhcaMigrationState, 0, 16, 1);
        set(
            &mut m,
            QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL,
            incremental.into(),
        );
        set(&mut m, QUERY_VHCA_MIGRATION_STATE_IN_CHUNK, chunk.into());
        let r = self.exec(&m, QUERY_VHCA_MIGRATION_STATE_OUT_LEN);
        ok(&r);
        (
            get(&r.out, QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE),
            get(&r.out, QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE),
        )
    }

    /// SAVE into the buffer: the reply and the image bytes.
    fn save(&self, incremental: bool, track: bool, size: u64) -> (Reply, Vec<u8>) {
        let mut m = Self::input(Opcode::SaveVhcaState, 0, 32, 1);
        set(&mut m, SAVE_VHCA_STATE_IN_INCREMENTAL, incremental.into());
        set(&mut m, SAVE_VHCA_STATE_IN_SET_TRACK, track.into());
        set(&mut m, SAVE_VHCA_STATE_IN_MKEY, u64::from(KEY));
        set(&mut m, SAVE_VHCA_STATE_IN_SIZE, size);
        let r = self.exec(&m, 16);
        let n = get(&r.out, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE) as usize;
        let mut img = vec![0u8; n];
        self.env.dma.read(BUF_IOVA, &mut img).unwrap();
        (r, img)
    }

    /// Puts `image` in the buffer and LOADs it.
    fn load(&self, image: &[u8]) -> Reply {
        self.env.dma.write(BUF_IOVA, image).unwrap();
        let mut m = Self::input(Opcode::LoadVhcaState, 0, 32, 1);
        set(&mut m, LOAD_VHCA_STATE_IN_MKEY, u64::from(KEY));
        set(&mut m, LOAD_VHCA_STATE_IN_SIZE, image.len() as u64);
        self.exec(&m, 16)
    }

    /// Everything LOAD may change, for "unchanged" checks.
    fn vf_snapshot(&self) -> (HcaImage, ObjectsImage, Vec<u8>) {
        let fw = self.vf.firmware();
        let mut mem = vec![0u8; DEV_MEM as usize];
        self.vf.devmem().read(0, &mut mem).unwrap();
        (fw.image_hca(), fw.image_objects(), mem)
    }
}

fn ok(r: &Reply) {
    assert_eq!(r.status, CmdStatus::Ok, "syndrome {:#x}", r.syndrome);
}

fn fails(r: &Reply, status: CmdStatus, synd: u32) {
    assert_eq!((r.status, r.syndrome), (status, synd));
}

fn fill(f: &FakePeer, seed: u8) {
    let mut mem = vec![0u8; DEV_MEM as usize];
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8;
    }
    f.devmem().write(0, &mem).unwrap();
}

fn mem_of(f: &FakePeer) -> Vec<u8> {
    let mut mem = vec![0u8; f.devmem().size() as usize];
    f.devmem().read(0, &mut mem).unwrap();
    mem
}

#[test]
fn suspend_and_resume_go_in_order_else_bad_res_state() {
    let r = Rig::new();
    let wrong = |x: &Reply| fails(x, CmdStatus::BadResStateErr, mig_syndrome::WRONG_MIG_STATE);
    wrong(&r.suspend(SuspendOpMod::Responder));
    wrong(&r.resume(ResumeOpMod::Initiator));
    wrong(&r.resume(ResumeOpMod::Responder));
    ok(&r.suspend(SuspendOpMod::Initiator));
    assert_eq!(r.vf.migration_state(), MigState::InitiatorSuspended);
    wrong(&r.suspend(SuspendOpMod::Initiator));
    wrong(&r.resume(ResumeOpMod::Responder));
    ok(&r.suspend(SuspendOpMod::Responder));
    assert_eq!(r.vf.migration_state(), MigState::ResponderSuspended);
    wrong(&r.resume(ResumeOpMod::Initiator));
    ok(&r.resume(ResumeOpMod::Responder));
    assert_eq!(r.vf.migration_state(), MigState::InitiatorSuspended);
    ok(&r.resume(ResumeOpMod::Initiator));
    assert_eq!(r.vf.migration_state(), MigState::Running);
    fails(
        &r.exec(&Rig::input(Opcode::SuspendVhca, 2, 16, 1), 16),
        CmdStatus::BadParamErr,
        super::super::syndrome::BAD_OP_MOD,
    );
    // The PF naming itself or a missing function; a VF naming anyone.
    for vhca in [0, 9] {
        fails(
            &r.exec(&Rig::input(Opcode::SuspendVhca, 0, 16, vhca), 16),
            CmdStatus::BadParamErr,
            super::super::syndrome::BAD_FUNCTION,
        );
    }
    let env = FakeEnv::new(r.vf.id);
    let m = Rig::input(Opcode::SuspendVhca, 0, 16, 1);
    let rep = r.vf.fw.execute(&env, &Cmd::new(&m, 16));
    fails(
        &rep,
        CmdStatus::BadParamErr,
        super::super::syndrome::BAD_FUNCTION,
    );
    assert_eq!(r.vf.migration_state(), MigState::Running);
}

#[test]
fn save_is_refused_in_the_wrong_state_with_bad_res_state() {
    let r = Rig::new();
    let wrong = |x: &Reply| fails(x, CmdStatus::BadResStateErr, mig_syndrome::WRONG_MIG_STATE);
    // Running: an incremental without a session, a full untracked image.
    wrong(&r.save(true, true, BUF_LEN).0);
    wrong(&r.save(true, false, BUF_LEN).0);
    wrong(&r.save(false, false, BUF_LEN).0);
    // LOAD needs the function frozen.
    wrong(&r.load(&[0u8; 64]));
    r.freeze();
    // Frozen: no tracking.
    wrong(&r.save(false, true, BUF_LEN).0);
    wrong(&r.save(true, false, BUF_LEN).0);
    let (rep, img) = r.save(false, false, BUF_LEN);
    ok(&rep);
    assert!(!img.is_empty());
    // Bad buffers change nothing and say why.
    let mut m = Rig::input(Opcode::SaveVhcaState, 0, 32, 1);
    set(&mut m, SAVE_VHCA_STATE_IN_MKEY, u64::from(KEY + 1));
    set(&mut m, SAVE_VHCA_STATE_IN_SIZE, 4096);
    fails(
        &r.exec(&m, 16),
        CmdStatus::BadParamErr,
        mig_syndrome::BAD_MKEY,
    );
    set(&mut m, SAVE_VHCA_STATE_IN_MKEY, u64::from(KEY));
    set(&mut m, SAVE_VHCA_STATE_IN_VA, BUF_LEN - 100);
    fails(
        &r.exec(&m, 16),
        CmdStatus::BadParamErr,
        mig_syndrome::BAD_MKEY,
    );
    let (rep, _) = r.save(false, false, 64);
    fails(&rep, CmdStatus::BadParamErr, mig_syndrome::BUFFER_TOO_SMALL);
}

#[test]
fn full_image_round_trips_into_another_adapter() {
    let src = Rig::new();
    src.populate_vf();
    fill(&src.vf, 7);
    src.freeze();
    let (req, total) = src.query(false, false);
    assert_eq!(req, total);
    let (rep, img) = src.save(false, false, BUF_LEN);
    ok(&rep);
    assert_eq!(img.len() as u64, req, "QUERY predicted the image size");
    assert_eq!(
        get(&rep.out, SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE),
        0
    );
    assert!(!src.vf.devmem().tracking(), "untracked session closed");

    let dst = Rig::new();
    fill(&dst.vf, 99);
    dst.freeze();
    ok(&dst.load(&img));
    let (s_hca, s_obj, s_mem) = src.vf_snapshot();
    let (d_hca, d_obj, d_mem) = dst.vf_snapshot();
    assert_eq!(s_hca, d_hca);
    assert_eq!(s_obj, d_obj);
    assert!(s_mem == d_mem, "device memory differs");
    assert_eq!(src.vf.object_counts(), dst.vf.object_counts());
    // A zeroed page survives the round trip too (base images skip zero pages).
    src.vf.devmem().reset();
    let (rep, img2) = src.save(false, false, BUF_LEN);
    ok(&rep);
    assert!(img2.len() < img.len());
    ok(&dst.load(&img2));
    assert!(mem_of(&dst.vf).iter().all(|&b| b == 0));
}

#[test]
fn load_refuses_objects_the_live_commands_refuse_with_the_same_reason() {
    use super::super::checks::{check_eqc, check_mkey_range, check_mtt_len};
    let src = Rig::new();
    src.populate_vf();
    src.freeze();
    let (rep, img) = src.save(false, false, BUF_LEN);
    ok(&rep);
    let dst = Rig::new();
    dst.freeze();
    let before = dst.vf_snapshot();
    // An EQ with a log_size CREATE_EQ refuses.
    let mut eq = state::validate(&img).unwrap();
    eq.objects.eqs[0].log_size = 17;
    let eq_reason = StateError::Eq {
        eqn: eq.objects.eqs[0].eqn,
        source: check_eqc(17, 0, 0, 0).unwrap_err(),
    };
    // An mkey whose length runs one page beyond its MTT (CREATE_MKEY refuses it).
    let mut mkey = state::validate(&img).unwrap();
    let m = &mut mkey.objects.mkeys[0];
    m.len += 1 << m.log_page_size;
    let lps = u64::from(m.log_page_size);
    let needed = check_mkey_range(lps, m.start, m.len).unwrap();
    let mkey_reason = StateError::Mkey {
        index: m.index,
        source: check_mtt_len(m.mtt.len() as u64, needed).unwrap_err(),
    };
    for (what, image, reason) in [("EQ", eq, eq_reason), ("mkey", mkey, mkey_reason)] {
        let bytes = image.to_bytes();
        assert_eq!(state::validate(&bytes), Err(reason), "{what}");
        fails(
            &dst.load(&bytes),
            CmdStatus::BadParamErr,
            mig_syndrome::BAD_IMAGE,
        );
        assert!(dst.vf_snapshot() == before, "{what}: function changed");
    }
    ok(&dst.load(&img));
}

#[test]
fn corrupted_images_are_refused_and_leave_the_function_unchanged() {
    let src = Rig::new();
    src.populate_vf();
    fill(&src.vf, 1);
    src.freeze();
    let (rep, img) = src.save(false, false, BUF_LEN);
    ok(&rep);
    let dst = Rig::new();
    fill(&dst.vf, 50);
    dst.freeze();
    let before = dst.vf_snapshot();
    let mut cases: Vec<(&str, Vec<u8>, u32)> = Vec::new();
    let mut flip = img.clone();
    flip[img.len() / 2] ^= 0x10;
    cases.push(("bit flip", flip, mig_syndrome::BAD_CHECKSUM));
    cases.push((
        "truncation",
        img[..img.len() - 1].to_vec(),
        mig_syndrome::BAD_IMAGE,
    ));
    let mut magic = img.clone();
    magic[0] = b'N';
    cases.push(("magic", magic, mig_syndrome::BAD_IMAGE));
    let mut version = img.clone();
    version[8] = 9;
    cases.push(("version", version, mig_syndrome::BAD_IMAGE));
    // A semantically bad object behind a valid checksum: an mkey in a PD that is not
    // in the image.
    let mut parsed = state::validate(&img).unwrap();
    parsed.objects.mkeys[0].pd = 77;
    cases.push(("dangling PD", parsed.to_bytes(), mig_syndrome::BAD_IMAGE));
    let mut parsed = state::validate(&img).unwrap();
    parsed.header.dev_mem_size = DEV_MEM * 2;
    cases.push(("devmem size", parsed.to_bytes(), mig_syndrome::INCOMPATIBLE));
    let mut parsed = state::validate(&img).unwrap();
    parsed.hca.issi = 7;
    cases.push(("issi", parsed.to_bytes(), mig_syndrome::BAD_IMAGE));
    for (what, bytes, synd) in cases {
        let rep = dst.load(&bytes);
        assert_eq!(rep.status, CmdStatus::BadParamErr, "{what}");
        assert_eq!(rep.syndrome, synd, "{what}");
        assert!(dst.vf_snapshot() == before, "{what}: function changed");
    }
    // A LOAD size above the cap is refused before any read.
    let mut m = Rig::input(Opcode::LoadVhcaState, 0, 32, 1);
    set(&mut m, LOAD_VHCA_STATE_IN_MKEY, u64::from(KEY));
    set(&mut m, LOAD_VHCA_STATE_IN_SIZE, 0);
    fails(
        &dst.exec(&m, 16),
        CmdStatus::BadParamErr,
        mig_syndrome::BAD_SIZE,
    );
    ok(&dst.load(&img));
}

#[test]
fn precopy_rounds_carry_only_changed_pages_and_multi_load_applies_them_in_order() {
    let src = Rig::new();
    src.populate_vf();
    fill(&src.vf, 3);
    let pages = (DEV_MEM / 4096) as usize;
    // Initial pre-copy image while running.
    let (req, _) = src.query(false, false);
    let (rep, base) = src.save(false, true, req + req / 10);
    ok(&rep);
    assert!(src.vf.devmem().tracking());
    // Nothing changed since: nothing to send (an idle function converges).
    assert_eq!(src.query(true, false).0, 0);
    let objects_len = state::objects_len(&src.vf.firmware().image_objects());
    // The guest writes two pages: one through REGION_WRITE, one through its mmap.
    src.vf.devmem().write(3 * 4096 + 5, &[0xee; 10]).unwrap();
    let other = vm_memory::mmap::MmapRegion::<()>::from_file(
        vm_memory::FileOffset::new(
            {
                use std::os::fd::BorrowedFd;
                // SAFETY: the fd is the VF's device memory, open for the whole test.
                let fd = unsafe { BorrowedFd::borrow_raw(src.vf.devmem().fd()) };
                let owned = fd.try_clone_to_owned().unwrap();
                std::fs::File::from(owned)
            },
            0,
        ),
        DEV_MEM as usize,
    )
    .unwrap();
    use vm_memory::VolatileMemory;
    other
        .get_slice(9 * 4096, 4)
        .unwrap()
        .copy_from(&[1u8, 2, 3, 4]);
    let (inc1, _) = src.query(true, false);
    assert_eq!(inc1 as usize, state::image_len(objects_len, 2));
    let (rep, d1) = src.save(true, true, inc1);
    ok(&rep);
    let parsed = state::validate(&d1).unwrap();
    assert_eq!(parsed.header.kind, ImageKind::Delta);
    assert_eq!(
        parsed.pages.iter().map(|p| p.index).collect::<Vec<_>>(),
        vec![3, 9]
    );
    // Stop: responder suspend, then the final delta (nothing changed since).
    src.vf.devmem().write(15 * 4096, &[0x55]).unwrap();
    src.freeze();
    let (rep, d2) = src.save(true, false, BUF_LEN);
    ok(&rep);
    assert_eq!(state::validate(&d2).unwrap().pages.len(), 1);
    assert!(!src.vf.devmem().tracking());

    let dst = Rig::new();
    dst.freeze();
    // Deltas before their base, or twice, are refused with BAD_RES_STATE.
    fails(
        &dst.load(&d1),
        CmdStatus::BadResStateErr,
        mig_syndrome::OUT_OF_ORDER,
    );
    ok(&dst.load(&base));
    fails(
        &dst.load(&d2),
        CmdStatus::BadResStateErr,
        mig_syndrome::OUT_OF_ORDER,
    );
    ok(&dst.load(&d1));
    ok(&dst.load(&d2));
    assert!(mem_of(&src.vf) == mem_of(&dst.vf));
    assert_eq!(src.vf_snapshot().1, dst.vf_snapshot().1);
    assert!(pages > 0);
}

#[test]
fn precopy_cleanup_save_ends_tracking_and_writes_nothing() {
    let r = Rig::new();
    fill(&r.vf, 5);
    ok(&r.save(false, true, BUF_LEN).0);
    ok(&r.suspend(SuspendOpMod::Initiator));
    let (rep, img) = r.save(false, false, BUF_LEN);
    ok(&rep);
    assert!(img.is_empty());
    assert!(!r.vf.devmem().tracking());
    fails(
        &r.save(true, true, BUF_LEN).0,
        CmdStatus::BadResStateErr,
        mig_syndrome::WRONG_MIG_STATE,
    );
}

#[test]
fn chunk_mode_saves_until_next_required_umem_size_is_zero() {
    let src = Rig::new();
    src.populate_vf();
    fill(&src.vf, 9);
    src.freeze();
    let (req, total) = src.query(false, true);
    assert_eq!(req, total, "fits one 8 MiB chunk");
    // A buffer of 5 pages' worth forces chunks.
    let objects = state::objects_len(&src.vf.firmware().image_objects());
    let size = state::image_len(objects, 5) as u64;
    let mut chunks = Vec::new();
    let (rep, img) = src.save(false, false, size);
    ok(&rep);
    chunks.push(img);
    let mut next = get(&rep.out, SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE);
    while next != 0 {
        assert!(chunks.len() < 10, "chunks never end");
        let (rep, img) = src.save(true, false, next.max(size));
        ok(&rep);
        assert!(img.len() as u64 <= size);
        chunks.push(img);
        next = get(&rep.out, SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE);
    }
    assert_eq!(chunks.len(), 4, "16 pages in chunks of 5");
    // Without chunk mode, the same small buffer is refused.
    src.query(false, false);
    fails(
        &src.save(false, false, size).0,
        CmdStatus::BadParamErr,
        mig_syndrome::BUFFER_TOO_SMALL,
    );
    let dst = Rig::new();
    dst.freeze();
    for c in &chunks {
        ok(&dst.load(c));
    }
    assert!(mem_of(&src.vf) == mem_of(&dst.vf));
    assert_eq!(src.vf_snapshot().1, dst.vf_snapshot().1);
    let _ = &src.buf;
}

#[test]
fn responder_suspend_whose_work_does_not_drain_fails_with_int_err_and_stays_initiator_suspended() {
    let r = Rig::new();
    ok(&r.suspend(SuspendOpMod::Initiator));
    // The VF has admitted work that does not drain.
    r.vf.stuck.store(2, std::sync::atomic::Ordering::Release);
    fails(
        &r.suspend(SuspendOpMod::Responder),
        CmdStatus::IntErr,
        mig_syndrome::DRAIN_TIMEOUT,
    );
    assert_eq!(r.vf.migration_state(), MigState::InitiatorSuspended);
    assert!(
        !r.vf.migration().busy,
        "a failed command leaves the VF free"
    );
    // The PF's firmware is not held by the failed suspend: it answers at once.
    use mlx5_prm::cmd::hca::{QUERY_ISSI_IN_LEN, QUERY_ISSI_OUT_LEN};
    let issi = r.exec(
        &Rig::input(Opcode::QueryIssi, 0, QUERY_ISSI_IN_LEN, 0),
        QUERY_ISSI_OUT_LEN,
    );
    ok(&issi);
    // Once the work drains the same command completes.
    r.vf.stuck.store(0, std::sync::atomic::Ordering::Release);
    ok(&r.suspend(SuspendOpMod::Responder));
    assert_eq!(r.vf.migration_state(), MigState::ResponderSuspended);
}

#[test]
fn resume_responder_rings_the_doorbells_refused_while_frozen() {
    let r = Rig::new();
    r.freeze();
    assert!(!r.vf.migration().admit_doorbell(
        0b110,
        super::Violation::by_client(
            super::ViolationKind::CommandDoorbell,
            "test".into(),
            1,
            0x18,
            4
        )
    ));
    assert!(r.vf.rung.lock().unwrap().is_empty());
    ok(&r.resume(ResumeOpMod::Responder));
    assert_eq!(*r.vf.rung.lock().unwrap(), vec![0b110]);
    assert_eq!(r.vf.migration_state(), MigState::InitiatorSuspended);
}

#[test]
fn migration_command_on_a_function_busy_with_another_is_res_busy() {
    let r = Rig::new();
    r.vf.migration().busy = true;
    let busy = |x: &Reply| fails(x, CmdStatus::ResBusy, mig_syndrome::BUSY);
    busy(&r.suspend(SuspendOpMod::Initiator));
    busy(&r.save(false, true, BUF_LEN).0);
    busy(&r.load(&[0u8; 64]));
    assert_eq!(r.vf.migration_state(), MigState::Running);
    r.vf.migration().busy = false;
    ok(&r.suspend(SuspendOpMod::Initiator));
}

#[test]
fn save_of_a_function_reset_while_it_copied_commits_no_session() {
    let r = Rig::new();
    fill(&r.vf, 4);
    // The reset lands between the snapshot and the commit.
    r.vf.reset_on_snapshot
        .store(true, std::sync::atomic::Ordering::Release);
    fails(
        &r.save(false, true, BUF_LEN).0,
        CmdStatus::BadResStateErr,
        mig_syndrome::WRONG_MIG_STATE,
    );
    assert!(r.vf.migration().session.is_none());
    assert!(!r.vf.devmem().tracking(), "no session was opened");
    r.vf.reset_on_snapshot
        .store(false, std::sync::atomic::Ordering::Release);
    ok(&r.save(false, true, BUF_LEN).0);
    assert!(r.vf.devmem().tracking());
}

#[test]
fn unknown_suspend_or_resume_op_mod_is_bad_op_mod_and_changes_nothing() {
    let r = Rig::new();
    for op in [Opcode::SuspendVhca, Opcode::ResumeVhca] {
        fails(
            &r.exec(&Rig::input(op, 7, 16, 1), 16),
            CmdStatus::BadParamErr,
            super::super::syndrome::BAD_OP_MOD,
        );
    }
    assert_eq!(r.vf.migration_state(), MigState::Running);
}
