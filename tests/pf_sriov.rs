//! The PF as stock `mlx5_core` and `mlx5_vfio_pci` drive it, over real sockets
//! (mlx5-pf.md §1, §3, §4): the SR-IOV capability of its config space, the
//! HOST_ENDIANNESS write of `set_hca_ctrl`, the ENABLE_HCA / DISABLE_HCA per VF that
//! `sriov_numvfs` sends, and the capabilities and vhca_ids mlx5_vfio_pci reads
//! through the PF before it offers migration. Every command's status is checked,
//! and the emulator's command log of the PF agrees.

use mlx5_emulator::firmware::syndrome;
use mlx5_prm::cmd::access_reg::{
    ACCESS_REG_DATA_OFFSET, ACCESS_REG_IN_REGISTER_ID, HOST_ENDIANNESS_IN_LEN,
    HOST_ENDIANNESS_OUT_LEN,
};
use mlx5_prm::cmd::caps::{cmd_hca_cap, cmd_hca_cap_2, CapMode, CapType, QUERY_HCA_CAP_OUT_LEN};
use mlx5_prm::cmd::hca::{
    DISABLE_HCA_IN_LEN, DISABLE_HCA_OUT_LEN, ENABLE_HCA_IN_FUNCTION_ID, ENABLE_HCA_IN_LEN,
    ENABLE_HCA_OUT_LEN,
};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::bringup::{pf_up, up, ARENA};
use mlx5_testbed::{init_tracing, Testbed};
use mlx5vf::cmdif::{new_input, CmdError};
use mlx5vf::hca::caps::query_hca_cap_in;
use mlx5vf::hca::Hca;

const VFS: u16 = 3;

fn status_of(r: Result<Vec<u8>, CmdError>) -> (CmdStatus, u32) {
    match r {
        Err(CmdError::Status {
            status, syndrome, ..
        }) => (status, syndrome),
        other => panic!("expected a command status, got {other:?}"),
    }
}

fn host_endianness(hca: &Hca, he: u8) -> Result<Vec<u8>, CmdError> {
    let mut m = new_input(Opcode::AccessReg, 0, HOST_ENDIANNESS_IN_LEN);
    set(&mut m, ACCESS_REG_IN_REGISTER_ID, 0x7004);
    m[ACCESS_REG_DATA_OFFSET] = he;
    hca.cmd().exec(&m, HOST_ENDIANNESS_OUT_LEN)
}

fn hca_by_function(hca: &Hca, op: Opcode, function_id: u16) -> Result<Vec<u8>, CmdError> {
    let (inlen, outlen) = match op {
        Opcode::EnableHca => (ENABLE_HCA_IN_LEN, ENABLE_HCA_OUT_LEN),
        _ => (DISABLE_HCA_IN_LEN, DISABLE_HCA_OUT_LEN),
    };
    let mut m = new_input(op, 0, inlen);
    set(&mut m, ENABLE_HCA_IN_FUNCTION_ID, function_id.into());
    hca.cmd().exec(&m, outlen)
}

fn other_caps(hca: &Hca, t: CapType, mode: CapMode, fid: u16) -> Vec<u8> {
    let out = hca
        .cmd()
        .exec(&query_hca_cap_in(t, mode, Some(fid)), QUERY_HCA_CAP_OUT_LEN)
        .unwrap_or_else(|e| panic!("QUERY_HCA_CAP {t:?} {mode:?} of function {fid}: {e}"));
    out[16..].to_vec()
}

#[test]
fn pf_config_space_carries_sriov_true_to_the_adapter() {
    use mlx5_emulator::pci::sriov::*;
    let tb = Testbed::start(VFS);
    let mut c = tb.pf_client();
    let mut cap = [0u8; SRIOV_CAP_LEN];
    c.region_read(
        vfu::uapi::VFIO_PCI_CONFIG_REGION_INDEX,
        SRIOV_EXT_CAP_OFFSET as u64,
        &mut cap,
    )
    .expect("config read");
    let r16 = |o: usize| u16::from_le_bytes([cap[o], cap[o + 1]]);
    assert_eq!(r16(0), EXT_CAP_ID_SRIOV);
    assert_eq!(r16(SRIOV_TOTAL_VF_OFFSET), VFS, "TotalVFs = --vfs");
    assert_eq!(r16(SRIOV_INITIAL_VF_OFFSET), VFS);
    assert_eq!(r16(SRIOV_VF_OFFSET_OFFSET), 1);
    assert_eq!(r16(SRIOV_VF_STRIDE_OFFSET), 1);
    assert_eq!(r16(SRIOV_VF_DID_OFFSET), 0x101e);
    // The VFs themselves have none.
    let mut vf = tb.vf_client(0);
    let mut hdr = [0u8; 4];
    vf.region_read(
        vfu::uapi::VFIO_PCI_CONFIG_REGION_INDEX,
        SRIOV_EXT_CAP_OFFSET as u64,
        &mut hdr,
    )
    .expect("config read");
    assert_eq!(hdr, [0; 4]);
}

#[test]
fn pf_probe_sriov_enable_and_mlx5_vfio_pci_checks_all_succeed() {
    init_tracing();
    let tb = Testbed::start(VFS);
    let pf = pf_up(&tb.pf_socket());
    // set_hca_ctrl of a PF (its result data is never read back by the driver).
    let out = host_endianness(&pf, 0x00).expect("HOST_ENDIANNESS write");
    assert_eq!(out.len(), HOST_ENDIANNESS_OUT_LEN);
    assert_eq!(
        status_of(host_endianness(&pf, 0x42)),
        (CmdStatus::BadParamErr, syndrome::BAD_PARAM)
    );

    // echo N > sriov_numvfs: ENABLE_HCA function_id = vf + 1 for each VF.
    for vf in 0..VFS {
        hca_by_function(&pf, Opcode::EnableHca, vf + 1).expect("ENABLE_HCA of a VF");
    }
    assert_eq!(
        status_of(hca_by_function(&pf, Opcode::EnableHca, VFS + 1)),
        (CmdStatus::BadParamErr, syndrome::BAD_FUNCTION),
        "no such VF"
    );
    // Each VF's own driver then probes it; its own ENABLE_HCA succeeds after the PF's.
    let guest = up(tb.vf_client(0), ARENA, false);

    // mlx5vf_cmd_set_migratable: the PF's own caps, then each VF's through the PF.
    let info = pf.info().expect("PF info");
    assert_eq!(get(&info.caps, cmd_hca_cap::MIGRATION), 1);
    let caps2 = info.caps2.as_deref().expect("PF GENERAL_2");
    assert_eq!(get(caps2, cmd_hca_cap_2::MIGRATION_MULTI_LOAD), 1);
    assert_eq!(get(caps2, cmd_hca_cap_2::MIGRATION_TRACKING_STATE), 1);
    let mut ids = vec![info.vhca_id];
    for vf in 0..VFS {
        let gen2 = other_caps(&pf, CapType::General2, CapMode::Max, vf + 1);
        assert_eq!(
            get(&gen2, cmd_hca_cap_2::MIGRATABLE),
            1,
            "VF {vf} migratable"
        );
        let gen = other_caps(&pf, CapType::General, CapMode::Cur, vf + 1);
        ids.push(get(&gen, cmd_hca_cap::VHCA_ID) as u16);
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "vhca_ids not unique: {ids:?}");

    // echo 0 > sriov_numvfs: DISABLE_HCA in reverse; the VF's driver unbound first.
    guest.down().expect("VF down");
    for vf in (0..VFS).rev() {
        hca_by_function(&pf, Opcode::DisableHca, vf + 1).expect("DISABLE_HCA of a VF");
    }

    // A VF may not write the PF's register, nor name another function.
    let vf1 = up(tb.vf_client(1), ARENA, false);
    assert_eq!(
        status_of(host_endianness(&vf1, 0)),
        (CmdStatus::BadParamErr, syndrome::BAD_FUNCTION)
    );
    assert_eq!(
        status_of(hca_by_function(&vf1, Opcode::EnableHca, 3)),
        (CmdStatus::BadParamErr, syndrome::BAD_FUNCTION)
    );

    // The PF's command log: the good commands all OK, the refused ones as above.
    let log = tb.pf().command_log();
    let access: Vec<_> = log
        .iter()
        .filter(|r| r.opcode == u16::from(Opcode::AccessReg))
        .map(|r| (r.op_mod, r.status, r.syndrome))
        .collect();
    assert_eq!(
        access,
        [
            (0, CmdStatus::Ok, 0),
            (0, CmdStatus::BadParamErr, syndrome::BAD_PARAM)
        ]
    );
    let by_fn: Vec<_> = log
        .iter()
        .filter(|r| {
            [Opcode::EnableHca, Opcode::DisableHca]
                .iter()
                .any(|&o| r.opcode == u16::from(o))
        })
        .map(|r| (r.opcode, r.status))
        .collect();
    let en = u16::from(Opcode::EnableHca);
    let dis = u16::from(Opcode::DisableHca);
    assert_eq!(
        by_fn,
        [
            (en, CmdStatus::Ok), // the PF's own
            (en, CmdStatus::Ok),
            (en, CmdStatus::Ok),
            (en, CmdStatus::Ok),
            (en, CmdStatus::BadParamErr),
            (dis, CmdStatus::Ok),
            (dis, CmdStatus::Ok),
            (dis, CmdStatus::Ok),
        ]
    );
}
