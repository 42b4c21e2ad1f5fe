//! QUERY_HCA_CAP and SET_HCA_CAP, and the capability pages this device advertises
//! (mlx5-device.md §4.1–4.4, kernel-mlx5vf.md §4.2).
//!
//! The GENERAL page carries the values that keep stock mlx5_core on its minimal path
//! (every optional feature bit 0, port type ETH, no pages EQ) plus the migration
//! capability; GENERAL_2 carries the migration extensions. With these values the
//! Debian 6.12 mlx5_core probes the VF with one warning only ("Missing
//! eth_net_offloads capability": no netdev), see tests/qemu.rs. Every other known page type
//! reads as zeros (its feature bit is 0, so a driver that follows the caps never asks).

use super::FunctionId;
use super::{Cmd, CmdFail, CmdResult, Env, Firmware};
use crate::pci::FunctionKind;
use mlx5_prm::cmd::caps::*;
use mlx5_prm::ifc::{get, set, Field};

/// `log_max_eq_sz`: EQs of up to 2^16 entries (the async EQ needs 2^13).
pub const LOG_MAX_EQ_SZ: u64 = 16;
/// `max_num_eqs`: EQs per function.
pub const MAX_NUM_EQS: u64 = 8;
/// `log_max_eq` matching [`MAX_NUM_EQS`].
pub const LOG_MAX_EQ: u64 = 3;
/// `log_max_qp`.
pub const LOG_MAX_QP: u64 = 10;
/// `log_max_qp_sz`: send and receive queues of up to 2^15 entries.
pub const LOG_MAX_QP_SZ: u64 = 15;
/// `log_max_cq`: 2^10 CQs.
pub const LOG_MAX_CQ: u64 = 10;
/// `log_max_cq_sz`: CQs of up to 2^16 CQEs.
pub const LOG_MAX_CQ_SZ: u64 = 16;
/// `log_max_msg`: messages of up to 1 GiB.
pub const LOG_MAX_MSG: u64 = 30;
/// `log_max_pd`: 2^10 PDs.
pub const LOG_MAX_PD: u64 = 10;
/// `log_max_mkey`: 2^12 mkeys.
pub const LOG_MAX_MKEY: u64 = 12;
/// `log_bf_reg_size`.
pub const LOG_BF_REG_SIZE: u64 = 9;
/// `device_frequency_khz`: the rate of `internal_timer`, which counts nanoseconds
/// (1 GHz). mlx5_core sets up its clock (and PTP) from it; 0 makes it warn
/// "invalid device_frequency_khz" and skip the clock.
pub const DEVICE_FREQUENCY_KHZ: u64 = 1_000_000;

/// The GENERAL capability page, MAX limits (also the power-on CUR values).
pub fn general_max(id: FunctionId) -> Box<[u8]> {
    let mut p = general_limits();
    set(&mut p, cmd_hca_cap::VHCA_ID, u64::from(id.vhca_id));
    // The PF tracks its VFs' DMA writes (PAGE_TRACK objects): what mlx5vf checks on
    // the PF's mdev before it offers DMA logging. A VF does not advertise it, so the
    // guest's mlx5_core never asks for the page.
    if id.kind == FunctionKind::Pf {
        set(&mut p, cmd_hca_cap::ADV_VIRTUALIZATION, 1);
    }
    p
}

/// The GENERAL page every function reports, before its `vhca_id` is filled in.
fn general_limits() -> Box<[u8]> {
    use cmd_hca_cap as c;
    let mut p = vec![0u8; HCA_CAP_SIZE].into_boxed_slice();
    let values: &[(Field, u64)] = &[
        // No run-time page requests: no pages EQ (boot/init pages are still asked for).
        (c::PAGE_REQUEST_DISABLE, 1),
        // GENERAL_2 exists (it carries the migration extensions).
        (c::HCA_CAP_2, 1),
        (c::LOG_MAX_QP, LOG_MAX_QP),
        // RC QPs and CQs (the DMA engine). No ROCE / IB capability page is advertised:
        // the port stays ETH, and mlx5_core's probe path does not change.
        (c::LOG_MAX_QP_SZ, LOG_MAX_QP_SZ),
        (c::LOG_MAX_CQ, LOG_MAX_CQ),
        (c::LOG_MAX_CQ_SZ, LOG_MAX_CQ_SZ),
        (c::LOG_MAX_MSG, LOG_MAX_MSG),
        (c::LOG_MAX_EQ_SZ, LOG_MAX_EQ_SZ),
        (c::LOG_MAX_MKEY, LOG_MAX_MKEY),
        (c::LOG_MAX_EQ, LOG_MAX_EQ),
        (c::MAX_NUM_EQS, MAX_NUM_EQS),
        (c::LOG_MAX_PD, LOG_MAX_PD),
        (c::PORT_TYPE, PORT_TYPE_ETH),
        (c::NUM_PORTS, 1),
        // SET_DRIVER_VERSION is implemented; let the driver send it.
        (c::DRIVER_VERSION, 1),
        (c::LOG_BF_REG_SIZE, LOG_BF_REG_SIZE),
        (c::NUM_OF_UARS_PER_PAGE, 1),
        (c::DEVICE_FREQUENCY_KHZ, DEVICE_FREQUENCY_KHZ),
        (c::MIGRATION, 1),
    ];
    for &(f, v) in values {
        set(&mut p, f, v);
    }
    p
}

/// The GENERAL_2 page of function `id` (CUR = MAX). Every function carries the
/// migration extensions (the PF's are what mlx5_vfio_pci checks before it offers
/// migration); a VF is also `migratable`, which mlx5_vfio_pci reads from the VF's page
/// through the PF (mlx5-pf.md §4.2). The PF itself is not migratable.
pub fn general2(id: FunctionId) -> Box<[u8]> {
    use cmd_hca_cap_2 as c;
    let mut p = vec![0u8; HCA_CAP_SIZE].into_boxed_slice();
    for f in [
        c::MIGRATION_MULTI_LOAD,
        c::MIGRATION_TRACKING_STATE,
        c::MIGRATION_IN_CHUNKS,
    ] {
        set(&mut p, f, 1);
    }
    set(
        &mut p,
        c::MIGRATABLE,
        u64::from(id.kind == FunctionKind::Vf),
    );
    p
}

/// GENERAL fields SET_HCA_CAP may change, and whether the new value must not exceed the
/// MAX value. Everything else in the written page is ignored (the driver writes back a
/// modified copy of CUR, so the rest is what we reported).
const SETTABLE: &[(Field, bool)] = &[
    (cmd_hca_cap::PKEY_TABLE_SIZE, false),
    (cmd_hca_cap::CMDIF_CHECKSUM, false),
    (cmd_hca_cap::CACHE_LINE_128BYTE, false),
    (cmd_hca_cap::LOG_UAR_PAGE_SZ, false),
    (cmd_hca_cap::RELEASE_ALL_PAGES, true),
    (cmd_hca_cap::NUM_VHCA_PORTS, true),
    (cmd_hca_cap::LOG_MAX_QP, true),
    (cmd_hca_cap::SW_OWNER_ID, true),
    (cmd_hca_cap::DRIVER_VERSION, true),
    (cmd_hca_cap::UAR_4K, true),
];

/// Why a written GENERAL page is refused: by SET_HCA_CAP, and by LOAD_VHCA_STATE for
/// the page in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    #[error("capability page of {len} bytes: expected {HCA_CAP_SIZE}")]
    Length { len: usize },
    #[error("{field:?} = {value} is above its MAX value {max}")]
    AboveMax { field: Field, value: u64, max: u64 },
}

impl CapsError {
    /// The status and syndrome SET_HCA_CAP completes with.
    pub fn fail(&self) -> CmdFail {
        CmdFail::bad_param()
    }
}

/// The settable fields of a written GENERAL page stay within the MAX values.
pub fn check_general_caps(page: &[u8]) -> Result<(), CapsError> {
    if page.len() != HCA_CAP_SIZE {
        return Err(CapsError::Length { len: page.len() });
    }
    let max = general_limits();
    for &(field, bounded) in SETTABLE {
        let (value, max) = (get(page, field), get(&max, field));
        if bounded && value > max {
            return Err(CapsError::AboveMax { field, value, max });
        }
    }
    Ok(())
}

fn cap_type(op_mod: u16) -> Result<(CapType, CapMode), CmdFail> {
    let (raw, mode) = split_op_mod(op_mod);
    let t = CapType::try_from(raw).map_err(|_| CmdFail::bad_op_mod())?;
    Ok((t, mode))
}

impl Firmware {
    /// The capability page of `t` in `mode`, as this function reports it.
    pub fn cap_page(&self, t: CapType, mode: CapMode) -> Box<[u8]> {
        match (t, mode) {
            (CapType::General, CapMode::Cur) => self.general_cur.clone(),
            (CapType::General, CapMode::Max) => general_max(self.id),
            (CapType::General2, _) => general2(self.id),
            (CapType::AdvVirtualization, _) if self.id.kind == FunctionKind::Pf => {
                super::page_track::adv_virtualization_caps()
            }
            _ => vec![0u8; HCA_CAP_SIZE].into_boxed_slice(),
        }
    }

    /// Current value of a GENERAL capability field.
    pub fn general_cap(&self, f: Field) -> u64 {
        get(&self.general_cur, f)
    }

    pub(super) fn query_hca_cap(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(QUERY_HCA_CAP_IN_LEN, QUERY_HCA_CAP_OUT_LEN)?;
        let (t, mode) = cap_type(cmd.op_mod)?;
        if cmd.get(HCA_CAP_IN_EC_VF_FUNCTION) != 0 {
            return Err(CmdFail::bad_param());
        }
        let page = match self.other_function(env, cmd)? {
            None => self.cap_page(t, mode),
            // Lock order PF → VF (only a PF gets here; see the module docs).
            Some(peer) => peer.firmware().cap_page(t, mode),
        };
        out[HCA_CAP_MSG_OFFSET..].copy_from_slice(&page);
        Ok(out)
    }

    pub(super) fn set_hca_cap(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(SET_HCA_CAP_IN_LEN, SET_HCA_CAP_OUT_LEN)?;
        let (t, _) = cap_type(cmd.op_mod)?;
        if cmd.op_mod & HCA_CAP_OPMOD_MODE_MASK != 0 || cmd.get(HCA_CAP_IN_EC_VF_FUNCTION) != 0 {
            return Err(CmdFail::bad_param());
        }
        let page = &cmd.input[HCA_CAP_MSG_OFFSET..SET_HCA_CAP_IN_LEN];
        match self.other_function(env, cmd)? {
            None => self.apply_caps(t, page)?,
            Some(peer) => peer.firmware().apply_caps(t, page)?,
        }
        Ok(out)
    }

    /// Applies a written capability page: GENERAL updates the settable fields (all or
    /// nothing), other types are accepted and ignored (nothing in them is settable here).
    fn apply_caps(&mut self, t: CapType, page: &[u8]) -> Result<(), CmdFail> {
        if t != CapType::General {
            return Ok(());
        }
        check_general_caps(page).map_err(|e| {
            tracing::info!(error = %e, "SET_HCA_CAP refused");
            e.fail()
        })?;
        for &(f, _) in SETTABLE {
            set(&mut self.general_cur, f, get(page, f));
        }
        Ok(())
    }

    /// `other_function` / `function_id` of QUERY/SET_HCA_CAP: `None` for this function,
    /// the peer otherwise (PF only).
    fn other_function(
        &self,
        env: &dyn Env,
        cmd: &Cmd<'_>,
    ) -> Result<Option<std::sync::Arc<dyn super::Peer>>, CmdFail> {
        if cmd.get(HCA_CAP_IN_OTHER_FUNCTION) == 0 {
            return Ok(None);
        }
        let fid = cmd.get(HCA_CAP_IN_FUNCTION_ID) as u16;
        if self.id.kind == FunctionKind::Pf && fid == self.id.vhca_id {
            return Ok(None);
        }
        self.check_other_function(env, fid)?;
        env.peer(fid).map(Some).ok_or_else(CmdFail::bad_function)
    }
}

#[cfg(test)]
mod tests {
    use super::super::syndrome;
    use super::super::test_support::*;
    use super::*;
    use mlx5_prm::CmdStatus;
    use mlx5_prm::Opcode;

    fn query(b: &mut Bench, op_mod: u16) -> Vec<u8> {
        let r = b.run(
            Opcode::QueryHcaCap,
            op_mod,
            16,
            QUERY_HCA_CAP_OUT_LEN,
            |_| {},
        );
        ok(&r);
        assert_eq!(r.out.len(), QUERY_HCA_CAP_OUT_LEN);
        r.out[HCA_CAP_MSG_OFFSET..].to_vec()
    }

    #[test]
    fn general_caps_keep_mlx5_core_minimal_and_advertise_migration() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        for mode in [CapMode::Cur, CapMode::Max] {
            let p = query(&mut b, query_op_mod(CapType::General, mode));
            assert_eq!(get(&p, cmd_hca_cap::VHCA_ID), 1);
            assert_eq!(get(&p, cmd_hca_cap::MIGRATION), 1);
            assert_eq!(get(&p, cmd_hca_cap::PORT_TYPE), PORT_TYPE_ETH);
            assert_eq!(get(&p, cmd_hca_cap::HCA_CAP_2), 1);
            // The rate of internal_timer (nanoseconds): mlx5_core's clock needs it.
            assert_eq!(get(&p, cmd_hca_cap::DEVICE_FREQUENCY_KHZ), 1_000_000);
            for f in [
                cmd_hca_cap::ETH_NET_OFFLOADS,
                cmd_hca_cap::ROCE,
                cmd_hca_cap::NIC_FLOW_TABLE,
                cmd_hca_cap::ESWITCH_MANAGER,
                cmd_hca_cap::EVENT_CAP,
                cmd_hca_cap::PG,
                cmd_hca_cap::ATOMIC,
                cmd_hca_cap::UCTX_CAP,
                cmd_hca_cap::CMDIF_CHECKSUM,
                cmd_hca_cap::DISABLE_LOCAL_LB_MC,
                cmd_hca_cap::DISABLE_LOCAL_LB_UC,
            ] {
                assert_eq!(get(&p, f), 0, "{f:?}");
            }
        }
        let p2 = query(&mut b, query_op_mod(CapType::General2, CapMode::Cur));
        assert_eq!(get(&p2, cmd_hca_cap_2::MIGRATION_MULTI_LOAD), 1);
        assert_eq!(get(&p2, cmd_hca_cap_2::MIGRATION_TRACKING_STATE), 1);
        assert_eq!(get(&p2, cmd_hca_cap_2::MIGRATION_IN_CHUNKS), 1);
        let roce = query(&mut b, query_op_mod(CapType::Roce, CapMode::Max));
        assert!(roce.iter().all(|&x| x == 0));
        let r = b.run(Opcode::QueryHcaCap, 0x7e, 16, QUERY_HCA_CAP_OUT_LEN, |_| {});
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_OP_MOD);
        let r = b.run(Opcode::QueryHcaCap, 1, 16, 0x100, |_| {});
        fails(&r, CmdStatus::BadOutpLenErr, syndrome::SHORT_OUTPUT);
    }

    #[test]
    fn set_hca_cap_changes_settable_fields_only_and_checks_max() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        let mut page = query(&mut b, 1);
        set(&mut page, cmd_hca_cap::PKEY_TABLE_SIZE, 0);
        set(&mut page, cmd_hca_cap::LOG_MAX_QP, 5);
        set(&mut page, cmd_hca_cap::VHCA_ID, 77);
        let r = b.run(Opcode::SetHcaCap, 0, SET_HCA_CAP_IN_LEN, 16, |m| {
            m[HCA_CAP_MSG_OFFSET..].copy_from_slice(&page)
        });
        ok(&r);
        let cur = query(&mut b, 1);
        assert_eq!(get(&cur, cmd_hca_cap::LOG_MAX_QP), 5);
        assert_eq!(get(&cur, cmd_hca_cap::VHCA_ID), 1, "read-only");
        set(&mut page, cmd_hca_cap::LOG_MAX_QP, LOG_MAX_QP + 1);
        let r = b.run(Opcode::SetHcaCap, 0, SET_HCA_CAP_IN_LEN, 16, |m| {
            m[HCA_CAP_MSG_OFFSET..].copy_from_slice(&page)
        });
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_PARAM);
        let r = b.run(Opcode::SetHcaCap, 0, 16, 16, |_| {});
        fails(&r, CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT);
        // A VF may not name another function.
        let r = b.run(Opcode::QueryHcaCap, 1, 16, QUERY_HCA_CAP_OUT_LEN, |m| {
            set(m, HCA_CAP_IN_OTHER_FUNCTION, 1);
            set(m, HCA_CAP_IN_FUNCTION_ID, 2);
        });
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_FUNCTION);
    }

    #[test]
    fn pf_queries_a_vf_by_function_id_and_sees_its_vhca_id() {
        use mlx5_prm::ifc::hdr;
        let mut env = FakeEnv::new(FunctionId::pf());
        env.peers.push(FakePeer::new(FunctionId::vf(0), 4096));
        let pf = super::super::FwCell::new(FunctionId::pf());
        let run = |op: Opcode, other: bool, fid: u64| {
            let mut m = vec![0u8; QUERY_HCA_CAP_OUT_LEN];
            set(&mut m, hdr::OPCODE, u64::from(u16::from(op)));
            set(&mut m, hdr::OP_MOD, 1);
            set(&mut m, HCA_CAP_IN_OTHER_FUNCTION, u64::from(other));
            set(&mut m, HCA_CAP_IN_FUNCTION_ID, fid);
            let len = if op == Opcode::QueryHcaCap {
                16
            } else {
                0x1010
            };
            pf.execute(&env, &Cmd::new(&m[..len], QUERY_HCA_CAP_OUT_LEN))
        };
        ok(&run(Opcode::EnableHca, false, 0));
        let r = run(Opcode::QueryHcaCap, true, 1);
        ok(&r);
        assert_eq!(get(&r.out[HCA_CAP_MSG_OFFSET..], cmd_hca_cap::VHCA_ID), 1);
        let r = run(Opcode::QueryHcaCap, true, 0);
        ok(&r);
        assert_eq!(get(&r.out[HCA_CAP_MSG_OFFSET..], cmd_hca_cap::VHCA_ID), 0);
        let r = run(Opcode::QueryHcaCap, false, 1);
        assert_eq!(get(&r.out[HCA_CAP_MSG_OFFSET..], cmd_hca_cap::VHCA_ID), 0);
        let r = run(Opcode::QueryHcaCap, true, 2);
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_FUNCTION);
    }

    /// What mlx5_vfio_pci's `mlx5vf_cmd_set_migratable` reads through the PF
    /// (mlx5-pf.md §4.2): the PF's own GENERAL `migration` and GENERAL_2
    /// multi_load + tracking_state (CUR), then the VF's GENERAL_2 MAX `migratable`
    /// and GENERAL CUR `vhca_id` with other_function.
    #[test]
    fn pf_answers_what_mlx5_vfio_pci_checks_before_offering_migration() {
        use mlx5_prm::ifc::hdr;
        let mut env = FakeEnv::new(FunctionId::pf());
        env.peers.push(FakePeer::new(FunctionId::vf(0), 4096));
        env.peers.push(FakePeer::new(FunctionId::vf(1), 4096));
        let pf = super::super::FwCell::new(FunctionId::pf());
        let query = |op_mod: u16, fid: Option<u16>| {
            let mut m = vec![0u8; 16];
            set(
                &mut m,
                hdr::OPCODE,
                u64::from(u16::from(Opcode::QueryHcaCap)),
            );
            set(&mut m, hdr::OP_MOD, u64::from(op_mod));
            if let Some(fid) = fid {
                set(&mut m, HCA_CAP_IN_OTHER_FUNCTION, 1);
                set(&mut m, HCA_CAP_IN_FUNCTION_ID, u64::from(fid));
            }
            let r = pf.execute(&env, &Cmd::new(&m, QUERY_HCA_CAP_OUT_LEN));
            ok(&r);
            r.out[HCA_CAP_MSG_OFFSET..].to_vec()
        };
        let mut enable = vec![0u8; 16];
        set(
            &mut enable,
            hdr::OPCODE,
            u64::from(u16::from(Opcode::EnableHca)),
        );
        ok(&pf.execute(&env, &Cmd::new(&enable, 16)));
        let gen = |m| query_op_mod(CapType::General, m);
        let gen2 = |m| query_op_mod(CapType::General2, m);
        assert_eq!(
            get(&query(gen(CapMode::Cur), None), cmd_hca_cap::MIGRATION),
            1
        );
        for mode in [CapMode::Cur, CapMode::Max] {
            assert_eq!(get(&query(gen(mode), None), cmd_hca_cap::HCA_CAP_2), 1);
        }
        let own2 = query(gen2(CapMode::Cur), None);
        assert_eq!(get(&own2, cmd_hca_cap_2::MIGRATION_MULTI_LOAD), 1);
        assert_eq!(get(&own2, cmd_hca_cap_2::MIGRATION_TRACKING_STATE), 1);
        assert_eq!(get(&own2, cmd_hca_cap_2::MIGRATABLE), 0, "the PF is not");
        let mut ids = Vec::new();
        for fid in [1u16, 2] {
            let vf2 = query(gen2(CapMode::Max), Some(fid));
            assert_eq!(get(&vf2, cmd_hca_cap_2::MIGRATABLE), 1, "function {fid}");
            ids.push(get(
                &query(gen(CapMode::Cur), Some(fid)),
                cmd_hca_cap::VHCA_ID,
            ));
        }
        assert_eq!(ids, [1, 2], "unique vhca_ids, distinct from the PF's 0");
        // The PF keeps to the minimal path: no eswitch or vport manager, no Ethernet
        // offloads, no flow tables, no dynamic VF MSI-X, no register caps.
        let own = query(gen(CapMode::Max), None);
        for f in [
            cmd_hca_cap::VPORT_GROUP_MANAGER,
            cmd_hca_cap::ESWITCH_MANAGER,
            cmd_hca_cap::NIC_FLOW_TABLE,
            cmd_hca_cap::ETH_NET_OFFLOADS,
            cmd_hca_cap::MCAM_REG,
            cmd_hca_cap::PCAM_REG,
            cmd_hca_cap::QCAM_REG,
            cmd_hca_cap::VHCA_STATE,
        ] {
            assert_eq!(get(&own, f), 0, "{f:?}");
        }
        assert_eq!(
            get(&own, cmd_hca_cap::ADV_VIRTUALIZATION),
            1,
            "the page tracker"
        );
        let vf = query(gen(CapMode::Max), Some(1));
        assert_eq!(
            get(&vf, cmd_hca_cap::ADV_VIRTUALIZATION),
            0,
            "a VF has none"
        );
    }
}
