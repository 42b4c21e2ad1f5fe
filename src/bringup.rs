//! mlx5vf's side of a test: its command interface on a function's socket, and the
//! bring-up mlx5_core runs, for a PF (the management channel) or a VF brought up by
//! its own driver as a guest would.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mlx5_prm::cmd::hca::{
    DISABLE_HCA_IN_LEN, DISABLE_HCA_OUT_LEN, ENABLE_HCA_IN_LEN, ENABLE_HCA_OUT_LEN,
    QUERY_ISSI_IN_LEN, QUERY_ISSI_OUT_LEN,
};
use mlx5_prm::cmd::migration::{
    ResumeOpMod, SuspendOpMod, IN_VHCA_ID, SUSPEND_VHCA_IN_LEN, SUSPEND_VHCA_OUT_LEN,
};
use mlx5_prm::ifc::set;
use mlx5_prm::Opcode;
use mlx5vf::cmdif::{new_input, ArenaConfig, CmdError, CmdIf, CmdIfConfig};
use mlx5vf::hca::{Hca, HcaOptions};

/// The command timeout of commands a test expects to complete.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// The timeout of the bring-up's first command (firmware "initializing").
pub const PRE_INIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A migrating PF's DMA arena: room for SAVE and LOAD buffers of a VF's whole state.
pub const MIG_ARENA: u64 = 64 << 20;
/// The DMA arena of every other function (mlx5vf's default).
pub const ARENA: u64 = 8 << 20;

/// The command interface configuration tests use: [`CMD_TIMEOUT`],
/// [`PRE_INIT_TIMEOUT`] and an arena of `arena` bytes.
pub fn config(arena: u64) -> CmdIfConfig {
    CmdIfConfig {
        timeout: CMD_TIMEOUT,
        pre_init_timeout: PRE_INIT_TIMEOUT,
        arena: ArenaConfig {
            size: arena,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// mlx5vf's command interface on `client` (the queue programmed, nothing enabled).
pub fn cmdif(client: vfu::Client, arena: u64) -> CmdIf {
    CmdIf::new(client, config(arena)).expect("command interface")
}

/// Brings the function behind `client` up as mlx5_core does; `events` chooses
/// completion by command EQ and MSI-X (else polling).
pub fn up(client: vfu::Client, arena: u64, events: bool) -> Hca {
    let hca = Hca::new(cmdif(client, arena));
    hca.up(&HcaOptions {
        events,
        ..Default::default()
    })
    .expect("bring-up");
    hca
}

/// The PF behind `socket`, brought up (event mode).
pub fn pf_up(socket: &Path) -> Hca {
    let client = vfu::Client::connect(socket).expect("connect PF");
    up(client, MIG_ARENA, true)
}

/// The PF behind `socket`, brought up and shared, as mlx5vf's migration devices
/// take it.
pub fn shared_pf_up(socket: &Path) -> Arc<Hca> {
    Arc::new(pf_up(socket))
}

/// A VF brought up by its own driver (polling), as a guest would, with some objects.
pub struct Guest {
    pub hca: Hca,
    pub pds: Vec<u32>,
    pub mkeys: Vec<u32>,
}

/// The VF behind `socket` brought up by its guest driver, with three PDs and three
/// one-page mkeys.
pub fn guest_up(socket: &Path) -> Guest {
    let client = vfu::Client::connect(socket).expect("VF client");
    let hca = up(client, ARENA, false);
    let mut pds = Vec::new();
    let mut mkeys = Vec::new();
    for i in 0..3u8 {
        pds.push(hca.alloc_pd().expect("alloc pd"));
        let page = hca.cmd().arena().alloc_page().expect("page");
        mkeys.push(hca.create_mkey(&[page], 12, 4096, i).expect("mkey"));
    }
    Guest { hca, pds, mkeys }
}

/// The input of a command a PF sends about another function (SUSPEND, RESUME, QUERY,
/// SAVE or LOAD_VHCA...), naming it by `vhca_id`.
pub fn vhca_input(op: Opcode, op_mod: u16, len: usize, vhca_id: u16) -> Vec<u8> {
    let mut m = new_input(op, op_mod, len);
    set(&mut m, IN_VHCA_ID, vhca_id.into());
    m
}

/// SUSPEND_VHCA or RESUME_VHCA (`op`, `op_mod`) of `vhca_id` through `pf`.
pub fn suspend_resume(pf: &Hca, op: Opcode, op_mod: u16, vhca_id: u16) -> Result<(), CmdError> {
    let m = vhca_input(op, op_mod, SUSPEND_VHCA_IN_LEN, vhca_id);
    pf.cmd().exec(&m, SUSPEND_VHCA_OUT_LEN).map(drop)
}

/// SUSPEND_VHCA(`op_mod`) of `vhca_id` through `pf`.
pub fn suspend_vhca(pf: &Hca, op_mod: SuspendOpMod, vhca_id: u16) -> Result<(), CmdError> {
    suspend_resume(pf, Opcode::SuspendVhca, op_mod.into(), vhca_id)
}

/// RESUME_VHCA(`op_mod`) of `vhca_id` through `pf`.
pub fn resume_vhca(pf: &Hca, op_mod: ResumeOpMod, vhca_id: u16) -> Result<(), CmdError> {
    suspend_resume(pf, Opcode::ResumeVhca, op_mod.into(), vhca_id)
}

/// `vhca_id` suspended as VFIO's RUNNING -> RUNNING_P2P -> STOP does it: initiator,
/// then responder. Panics if the firmware refuses either.
pub fn stop_vhca(pf: &Hca, vhca_id: u16) {
    for op_mod in [SuspendOpMod::Initiator, SuspendOpMod::Responder] {
        suspend_vhca(pf, op_mod, vhca_id).unwrap_or_else(|e| panic!("suspend {op_mod:?}: {e}"));
    }
}

/// `vhca_id` resumed as VFIO's STOP -> RUNNING_P2P -> RUNNING does it: responder,
/// then initiator. Panics if the firmware refuses either.
pub fn run_vhca(pf: &Hca, vhca_id: u16) {
    for op_mod in [ResumeOpMod::Responder, ResumeOpMod::Initiator] {
        resume_vhca(pf, op_mod, vhca_id).unwrap_or_else(|e| panic!("resume {op_mod:?}: {e}"));
    }
}

/// The input of ENABLE_HCA of the function itself (function_id 0) and its output length.
pub fn enable_hca_in() -> (Vec<u8>, usize) {
    (
        new_input(Opcode::EnableHca, 0, ENABLE_HCA_IN_LEN),
        ENABLE_HCA_OUT_LEN,
    )
}

/// The input of DISABLE_HCA of the function itself and its output length.
pub fn disable_hca_in() -> (Vec<u8>, usize) {
    (
        new_input(Opcode::DisableHca, 0, DISABLE_HCA_IN_LEN),
        DISABLE_HCA_OUT_LEN,
    )
}

/// The input of QUERY_ISSI and its output length.
pub fn query_issi_in() -> (Vec<u8>, usize) {
    (
        new_input(Opcode::QueryIssi, 0, QUERY_ISSI_IN_LEN),
        QUERY_ISSI_OUT_LEN,
    )
}

/// Runs a command given as (input, output length) on `cmd`, as the `*_in` builders
/// above give it.
pub fn exec(cmd: &CmdIf, (input, out_len): (Vec<u8>, usize)) -> Result<Vec<u8>, CmdError> {
    cmd.exec(&input, out_len)
}
