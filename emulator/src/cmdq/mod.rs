//! The command queue engine of one function (mlx5-device.md §3).
//!
//! The socket thread turns a `cmd_dbell` write into a [`Work`] item and returns at
//! once; a firmware worker thread per function does the rest, so a slow command never
//! blocks the vfio-user connection. For each bit of the doorbell, in slot order, the
//! worker fetches the entry at `cmdq_address + slot × 64` by DMA, checks it and gathers
//! the input ([`mailbox::prepare`]), executes it ([`crate::firmware`]), scatters the
//! output, writes `status_own` with ownership back to software, and, if the doorbell was
//! rung while a command EQ existed, posts a command-completion EQE (type 0x0a, vector =
//! the slot's bit) on that EQ and raises its MSI-X vector if the EQ is armed.
//!
//! Choices where the PRM leaves room:
//! * A doorbell for a slot whose ownership bit is 0 (never written, or already
//!   completed) is ignored with a trace: the entry belongs to software, and a device
//!   that executed it would run whatever stale bytes are there.
//! * A queue address that is not DMA-mapped cannot receive a status: the slot is
//!   dropped with a warning and nothing is written.
//! * Completion uses events only for doorbells rung after the command EQ exists (the
//!   driver does not listen for command EQEs before that; §3.7).
//! * After FLR / DEVICE_RESET, work queued before the reset is dropped and a command
//!   executing across it writes nothing back.
//! * Every doorbell is admitted by the function's migration control when it is rung,
//!   and the work counts as in flight until the worker has finished it, so
//!   SUSPEND_VHCA(responder) completes only after the work queued before it has run.
//!   A doorbell rung while responder-suspended is refused and recorded, its slots stay
//!   hardware-owned, and it is rung at RESUME_VHCA(responder)
//!   ([`Function::command_doorbell`]).
//! * Initiator suspend does not stop the queue (see [`Function::suspend_initiator`]).

pub mod mailbox;

use std::sync::Weak;

use crossbeam_channel::{Receiver, Sender};
use mlx5_prm::cmd::eq::EQE_SIZE;
use mlx5_prm::cmdq::{DeliveryStatus, CMD_ENTRY_SIZE};

use crate::firmware::{Cmd, CmdRecord, Env};
use crate::function::Function;
use mailbox::{Fetched, Prepared};
use mlx5_prm::iseg::{CMDQ_LOG_SIZE_DEFAULT, CMDQ_LOG_STRIDE_DEFAULT};

/// Slots of the queue (`1 << log_cmdq_size`).
pub const CMDQ_SLOTS: u32 = 1 << CMDQ_LOG_SIZE_DEFAULT;
/// Bytes between entries (`1 << log_cmdq_stride`).
pub const CMDQ_STRIDE: u64 = 1 << CMDQ_LOG_STRIDE_DEFAULT;

const _: () = assert!(CMDQ_STRIDE as usize >= CMD_ENTRY_SIZE);
const _: () = assert!(CMDQ_SLOTS <= 32);

/// One doorbell's worth of work for the firmware worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Slots rung (bits at or above [`CMDQ_SLOTS`] are ignored).
    pub mask: u32,
    /// The queue address when the doorbell was rung.
    pub cmdq: u64,
    /// A command EQ existed when the doorbell was rung: complete by EQE.
    pub events: bool,
    /// The function's reset epoch when the doorbell was rung.
    pub epoch: u64,
}

/// Doorbells queued for the firmware worker before the one ringing waits. A guest that
/// rings faster than the firmware executes is slowed down (as PCIe flow control would)
/// instead of growing the queue without bound. No worker ever rings its own queue (a
/// RESUME replaying a VF's doorbells runs on the PF's worker), so waiting cannot
/// deadlock.
pub const DOORBELL_BACKLOG: usize = 1024;

/// The worker's end of the channel; see [`spawn_worker`].
pub type WorkSender = Sender<Work>;

/// Starts the firmware worker of `func`. It runs until the function is dropped (its
/// sender goes away).
pub fn spawn_worker(
    func: Weak<Function>,
    rx: Receiver<Work>,
    name: String,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        while let Ok(work) = rx.recv() {
            let Some(f) = func.upgrade() else { break };
            run(&f, work);
            // The doorbell was admitted when it was rung (Function::command_doorbell);
            // a responder suspend waits for this.
            f.work_done();
        }
    })
}

/// Executes every slot of one doorbell.
pub fn run(f: &Function, work: Work) {
    let valid = if CMDQ_SLOTS >= 32 {
        u32::MAX
    } else {
        (1u32 << CMDQ_SLOTS) - 1
    };
    if work.mask & !valid != 0 {
        tracing::debug!(
            vhca_id = f.id.vhca_id,
            mask = work.mask,
            "doorbell bits past the queue ignored"
        );
    }
    let mut mask = work.mask & valid;
    while mask != 0 {
        let slot = mask.trailing_zeros();
        mask &= mask - 1;
        if f.epoch() != work.epoch {
            tracing::debug!(
                vhca_id = f.id.vhca_id,
                slot,
                "doorbell from before a reset dropped"
            );
            return;
        }
        run_slot(f, &work, slot as u8);
    }
}

fn run_slot(f: &Function, work: &Work, slot: u8) {
    let vhca_id = f.id.vhca_id;
    let dma = f.dma();
    let Some(entry_addr) = work.cmdq.checked_add(u64::from(slot) * CMDQ_STRIDE) else {
        tracing::warn!(
            vhca_id,
            slot,
            cmdq = work.cmdq,
            "command entry address overflows"
        );
        return;
    };
    let entry = match mailbox::fetch_entry(dma, entry_addr) {
        Ok(Fetched::Entry(e)) => e,
        Ok(Fetched::NotOwned) => {
            tracing::debug!(vhca_id, slot, "doorbell for a software-owned slot ignored");
            return;
        }
        Err(e) => {
            tracing::warn!(vhca_id, slot, error = %e, "command queue not readable; slot dropped");
            return;
        }
    };
    let header = Cmd::new(&entry.in_, 0);
    let mut record = CmdRecord {
        slot,
        opcode: header.opcode,
        op_mod: header.op_mod,
        vhca_id,
        delivery: DeliveryStatus::Ok,
        status: 0,
        syndrome: 0,
    };
    let delivery = match mailbox::prepare(dma, &entry) {
        Err(d) => {
            tracing::info!(
                vhca_id,
                slot,
                opcode = crate::firmware::opcode_name(header.opcode),
                op_mod = header.op_mod,
                delivery = d.name(),
                "command refused at delivery"
            );
            d
        }
        Ok(p) => match execute(f, entry_addr, work, &p, &mut record) {
            Some(d) => d,
            None => return,
        },
    };
    record.delivery = delivery;
    f.firmware().record(record);
    if f.epoch() != work.epoch {
        return;
    }
    if let Err(e) = mailbox::complete(dma, entry_addr, delivery) {
        tracing::warn!(vhca_id, slot, error = %e, "cannot write status_own");
        return;
    }
    if work.events {
        post_cmd_eqe(f, 1u32 << slot);
    }
}

/// Executes a prepared command and scatters its output. Returns the delivery status to
/// write, or `None` if a reset happened meanwhile (nothing may be written).
fn execute(
    f: &Function,
    entry_addr: u64,
    work: &Work,
    p: &Prepared,
    record: &mut CmdRecord,
) -> Option<DeliveryStatus> {
    let cmd = Cmd::new(&p.input, p.outlen);
    if let Some(delay) = f.command_delay(&cmd) {
        tracing::debug!(
            vhca_id = f.id.vhca_id,
            opcode = crate::firmware::opcode_name(cmd.opcode),
            ?delay,
            "command held by the delay hook"
        );
        std::thread::sleep(delay);
    }
    let reply = {
        let env = Env {
            id: f.id,
            dma: f.dma(),
            fabric: f.fabric(),
        };
        let mut fw = f.firmware();
        let reply = fw.execute(&env, &cmd);
        f.set_cmd_events(fw.cmd_eq().is_some());
        reply
    };
    record.status = reply.status.into();
    record.syndrome = reply.syndrome;
    if f.epoch() != work.epoch {
        return None;
    }
    let n = reply.out.len().min(p.outlen);
    match mailbox::scatter(f.dma(), entry_addr, &reply.out[..n], &p.out_blocks) {
        Ok(()) => Some(DeliveryStatus::Ok),
        Err(e) => {
            // The chain was mapped a moment ago; the driver unmapped it under us.
            tracing::warn!(vhca_id = f.id.vhca_id, error = %e, "output scatter failed");
            Some(DeliveryStatus::FwErr)
        }
    }
}

/// Posts a command-completion EQE for `vector` on the command EQ, then raises its
/// MSI-X vector if the EQ was armed. The EQE is written outside the firmware lock and
/// committed after, so an interrupt never announces an EQE not yet in memory.
fn post_cmd_eqe(f: &Function, vector: u32) {
    let Some(slot) = f.firmware().reserve_cmd_eqe() else {
        return;
    };
    let eqe: [u8; EQE_SIZE] = slot.cmd_eqe(vector);
    if let Err(e) = f.dma().write(slot.addr, &eqe) {
        tracing::warn!(vhca_id = f.id.vhca_id, eqn = slot.eqn, error = %e, "cannot write EQE");
    }
    let fire = f.firmware().commit_eqe(&slot);
    if let Some(v) = fire {
        f.raise_msix(v);
    }
}
