//! The command queue engine of one function (mlx5-device.md §3).
//!
//! The socket thread turns a `cmd_dbell` write into a [`Work`] item and hands each rung
//! slot to that slot's executor thread (started the first time the slot is rung), then
//! returns at once: a slow command never blocks the vfio-user connection, and commands
//! on different slots run concurrently, as on hardware: a short command is never queued
//! behind a long one on another slot. There is no thread between the two: every hop
//! from one thread to another is a wakeup, and a wakeup (a futex and, on another CPU,
//! an IPI) costs more than the whole of a short command. For
//! its slot, an executor fetches the entry at `cmdq_address + slot × 64` by DMA, checks it and gathers
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
//!   and the work counts as in flight until every slot it rang has finished, so
//!   SUSPEND_VHCA(responder) completes only after the work queued before it has run.
//!   A doorbell rung while responder-suspended is refused and recorded, its slots stay
//!   hardware-owned, and it is rung at RESUME_VHCA(responder)
//!   (`Function::command_doorbell`).
//! * Initiator suspend does not stop the queue (see `Function::suspend_initiator`).
//! * Two doorbells for one slot run in the order they were rung (one executor per
//!   slot); the second finds the slot software-owned unless the driver re-posted it.
//!
//! The engine reaches its function through [`Host`], so it knows nothing of the
//! function's other parts.
//!
//! Threads per function: at most [`CMDQ_SLOTS`] slot executors, each started the first
//! time its slot is rung and ended with the function ([`Engine`] holds their
//! queues). None holds a lock while it waits for work; an executor takes the
//! firmware's locks only as [`FwCell`] describes.

pub mod mailbox;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};

use mlx5_prm::cmd::migration::SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE;
use mlx5_prm::cmdq::{DeliveryStatus, CMD_ENTRY_SIZE};
use mlx5_prm::ifc;
use mlx5_prm::CmdStatus;
use mlx5_prm::Opcode;
use tracing::field;
use vfu::ratelimit::RateLimit;
use vfu::{warn_limited, Dma};

use crate::fault::{self, After, CmdContext, CmdFaults, Fatal, Instead};
use crate::firmware::{opcode_name, Cmd, CmdRecord, Env, FwCell};
use mailbox::{DmaPort, Fetched, Prepared};
use mlx5_prm::iseg::{CMDQ_LOG_SIZE_DEFAULT, CMDQ_LOG_STRIDE_DEFAULT};

/// Slots of the queue (`1 << log_cmdq_size`).
pub const CMDQ_SLOTS: u32 = 1 << CMDQ_LOG_SIZE_DEFAULT;
/// Bytes between entries (`1 << log_cmdq_stride`).
pub const CMDQ_STRIDE: u64 = 1 << CMDQ_LOG_STRIDE_DEFAULT;

const _: () = assert!(CMDQ_STRIDE as usize >= CMD_ENTRY_SIZE);
const _: () = assert!(CMDQ_SLOTS <= 32);

/// One doorbell's worth of work for the slot executors.
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

/// Doorbells queued for one slot's executor before the one ringing waits. A guest that
/// rings a busy slot faster than the firmware executes is slowed down (as PCIe flow
/// control would) instead of growing the queue without bound; a function queues at
/// most [`CMDQ_SLOTS`] × this many. No executor ever rings its own queue (a RESUME
/// replaying a VF's doorbells runs on the PF's), so waiting cannot deadlock.
pub const SLOT_BACKLOG: usize = 64;

/// What the engine needs of its function.
pub trait Host: Send + Sync + 'static {
    /// The function's IOVA space (entries, mailboxes).
    fn dma(&self) -> &Dma;
    /// The function as its firmware sees it.
    fn env(&self) -> &dyn Env;
    /// The function's firmware.
    fn firmware(&self) -> &FwCell;
    /// What the fault plan does to `cmd` (the command site of [`crate::fault`]);
    /// counts the function's commands.
    fn command_faults(&self, cmd: &Cmd<'_>) -> (u64, CmdFaults);
    /// Firmware fatal injected by a command that then never completes.
    fn fatal(&self, fatal: Fatal);
    /// An FLR of the function arriving while a command executes.
    fn flr(&self);
    /// Appends to the command log.
    fn record(&self, r: CmdRecord);
    /// Ends one admitted work item (a doorbell).
    fn work_done(&self);
}

/// One admitted doorbell, shared by the slots it rang: the admission ends when the
/// last of them has finished.
struct Admitted(Weak<dyn Host>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(h) = self.0.upgrade() {
            h.work_done();
        }
    }
}

/// One slot of one doorbell, for that slot's executor.
struct SlotJob {
    work: Work,
    slot: u8,
    _admitted: Arc<Admitted>,
}

/// The command queue engine of one function: the queues of its slot executors.
/// Dropping it ends them (each finishes the command it is running first).
pub struct Engine {
    host: OnceLock<Weak<dyn Host>>,
    /// Thread name prefix; the executors are `name-sN`.
    name: String,
    /// Set the first time the slot is rung (and its executor started).
    slots: [OnceLock<Arc<SlotQueue>>; CMDQ_SLOTS as usize],
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.slots.iter().filter(|s| s.get().is_some()).count();
        f.debug_struct("Engine")
            .field("name", &self.name)
            .field("executors", &started)
            .finish()
    }
}

impl Engine {
    /// An engine whose executor threads will be called `name-sN`; it runs nothing
    /// until [`Engine::attach`] names its function.
    pub fn new(name: String) -> Self {
        Engine {
            host: OnceLock::new(),
            name,
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The function whose queue this is (once; later calls change nothing).
    pub fn attach(&self, host: Weak<dyn Host>) {
        let _ = self.host.set(host);
    }

    /// Hands each slot `work` rang to its executor, on the ringing thread. The doorbell
    /// was admitted when it was rung (`Function::command_doorbell`): the admission ends
    /// when every slot it rang has finished, so a responder suspend waits for them.
    /// Waits only while a slot already has [`SLOT_BACKLOG`] doorbells queued.
    pub fn ring(&self, work: Work) {
        let Some(host) = self.host.get() else {
            tracing::error!(
                mask = work.mask,
                "command queue without a function; doorbell dropped"
            );
            return;
        };
        let admitted = Arc::new(Admitted(host.clone()));
        let Some(h) = host.upgrade() else { return };
        let vhca_id = h.env().id().vhca_id;
        let valid = if CMDQ_SLOTS >= 32 {
            u32::MAX
        } else {
            (1u32 << CMDQ_SLOTS) - 1
        };
        if work.mask & !valid != 0 {
            tracing::debug!(
                vhca_id,
                mask = work.mask,
                "doorbell bits past the queue ignored"
            );
        }
        if h.env().epoch() != work.epoch {
            tracing::debug!(vhca_id, "doorbell from before a reset dropped");
            return;
        }
        let mut mask = work.mask & valid;
        while mask != 0 {
            let slot = mask.trailing_zeros() as u8;
            mask &= mask - 1;
            let job = SlotJob {
                work,
                slot,
                _admitted: Arc::clone(&admitted),
            };
            let sent = match self.executor(host, slot) {
                Some(q) => q.push(job),
                None => Err(job),
            };
            if let Err(job) = sent {
                // No executor (the thread could not start): run it here.
                run_slot(&*h, &job.work, job.slot);
            }
        }
    }

    /// The queue of `slot`'s executor, started now if it is not running yet; `None` if
    /// the thread cannot start (tried again at the next doorbell).
    fn executor(&self, host: &Weak<dyn Host>, slot: u8) -> Option<&SlotQueue> {
        let cell = &self.slots[usize::from(slot)];
        if let Some(tx) = cell.get() {
            return Some(tx);
        }
        let q = spawn_slot(host.clone(), format!("{}-s{slot}", self.name))?;
        // Two threads ringing at once (a RESUME's replay and the guest) may both start
        // one: the first kept, the other's executor ended.
        if let Err(q) = cell.set(q) {
            q.close();
        }
        cell.get().map(|q| &**q)
    }
}

impl Drop for Engine {
    /// Ends the executors: each runs what is queued (finding its function gone, it
    /// stops) and returns.
    fn drop(&mut self) {
        for q in self.slots.iter().filter_map(OnceLock::get) {
            q.close();
        }
    }
}

/// The doorbells queued for one slot's executor, at most [`SLOT_BACKLOG`]. A mutex and
/// two condition variables rather than a channel: the executor goes to sleep as soon as
/// its queue is empty (a channel's receiver spins first, burning CPU the client and the
/// socket thread need on a busy host, for a doorbell that is rarely that close behind),
/// and a ringer makes the wake-up system call only when the executor sleeps.
#[derive(Default)]
struct SlotQueue {
    state: Mutex<SlotState>,
    /// The executor waits here for a doorbell.
    ready: Condvar,
    /// A ringer waits here for room.
    room: Condvar,
}

#[derive(Default)]
struct SlotState {
    jobs: VecDeque<SlotJob>,
    /// The engine is gone: no more doorbells; the executor ends once the queue is empty.
    closed: bool,
    /// The executor is waiting on `ready`.
    sleeping: bool,
    /// Ringers waiting on `room`.
    waiting_for_room: usize,
}

impl SlotQueue {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // Every update is complete before the lock is released.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, waiting (the lock released) while the queue is full; gives it
    /// back if the queue is closed.
    fn push(&self, job: SlotJob) -> Result<(), SlotJob> {
        let mut st = self.lock();
        while st.jobs.len() >= SLOT_BACKLOG && !st.closed {
            st.waiting_for_room += 1;
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiting_for_room -= 1;
        }
        if st.closed {
            return Err(job);
        }
        st.jobs.push_back(job);
        let wake = st.sleeping;
        drop(st);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next job, waiting (the lock released) while there is none; `None` once the
    /// queue is closed and empty.
    fn pop(&self) -> Option<SlotJob> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                let wake = st.waiting_for_room > 0;
                drop(st);
                if wake {
                    self.room.notify_one();
                }
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.sleeping = true;
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.sleeping = false;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }
}

/// Starts the executor of one slot; `None` if the thread cannot start.
fn spawn_slot(host: Weak<dyn Host>, name: String) -> Option<Arc<SlotQueue>> {
    let queue = Arc::new(SlotQueue::default());
    let rx = Arc::clone(&queue);
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        while let Some(job) = rx.pop() {
            let Some(h) = host.upgrade() else { break };
            if h.env().epoch() == job.work.epoch {
                run_slot(&*h, &job.work, job.slot);
            } else {
                tracing::debug!(
                    vhca_id = h.env().id().vhca_id,
                    slot = job.slot,
                    "doorbell from before a reset dropped"
                );
            }
        }
    });
    match spawned {
        Ok(_) => Some(queue),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a slot executor; running slots inline");
            None
        }
    }
}

/// Executes one rung slot: fetch, gather, execute, scatter, status, EQE. Runs in a
/// `firmware_command` span whose `status` and `syndrome` are recorded when the command
/// completes.
pub fn run_slot(h: &dyn Host, work: &Work, slot: u8) {
    let env = h.env();
    let vhca_id = env.id().vhca_id;
    // Every access of the queue goes through the function's DMA (and its fault site).
    let dma = env;
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
            static NOT_READABLE: RateLimit = RateLimit::per_second();
            warn_limited!(NOT_READABLE, vhca_id, slot, error = %e, "command queue not readable; slot dropped");
            return;
        }
    };
    // The entry takes the inline output and the status: a command whose entry cannot
    // be written back would run and never report, so it does not run.
    if let Err(e) = dma.check_writable(entry_addr, CMD_ENTRY_SIZE) {
        static NOT_WRITABLE: RateLimit = RateLimit::per_second();
        warn_limited!(NOT_WRITABLE, vhca_id, slot, error = %e, "command entry not writable; slot dropped");
        return;
    }
    let header = Cmd::new(&entry.in_, 0);
    let span = tracing::info_span!(
        "firmware_command",
        opcode = opcode_name(header.opcode),
        op_mod = header.op_mod,
        vhca_id,
        target_vhca_id = header.target_vhca_id(vhca_id),
        slot,
        status = field::Empty,
        syndrome = field::Empty,
    );
    let _entered = span.enter();
    let mut record = CmdRecord {
        slot,
        opcode: header.opcode,
        op_mod: header.op_mod,
        vhca_id,
        delivery: DeliveryStatus::Ok,
        status: CmdStatus::Ok,
        syndrome: 0,
    };
    let delivery = match mailbox::prepare(dma, &entry) {
        Err(d) => {
            tracing::info!(delivery = d.name(), "command refused at delivery");
            span.record("status", d.name());
            d
        }
        Ok(p) => {
            let cmd = Cmd::new(&p.input, p.outlen);
            let (seq, faults) = h.command_faults(&cmd);
            if let Some(delay) = faults.delay {
                tracing::debug!(?delay, "command held by the fault plan");
                std::thread::sleep(delay);
            }
            let d = match faults.instead {
                None => execute(h, entry_addr, work, &p, &mut record, seq, &faults.after),
                Some(Instead::Hang) => {
                    tracing::info!("command left uncompleted by the fault plan");
                    return;
                }
                Some(Instead::Fatal(f)) => {
                    tracing::info!("firmware fatal injected: command left uncompleted");
                    h.fatal(f);
                    return;
                }
                Some(Instead::Delivery(d)) => {
                    tracing::info!(delivery = d.name(), "delivery error injected");
                    Some(d)
                }
                Some(Instead::Status { status, syndrome }) => {
                    record.status = status;
                    record.syndrome = syndrome;
                    let out = crate::firmware::failed_output(status, syndrome, p.outlen);
                    scatter_out(h, entry_addr, &out, &p)
                }
            };
            span.record("status", record.status.name());
            span.record("syndrome", format_args!("{:#x}", record.syndrome));
            match d {
                Some(d) => d,
                None => return,
            }
        }
    };
    record.delivery = delivery;
    h.record(record);
    if env.epoch() != work.epoch {
        return;
    }
    if let Err(e) = mailbox::complete(dma, entry_addr, delivery) {
        static NO_STATUS: RateLimit = RateLimit::per_second();
        warn_limited!(NO_STATUS, error = %e, "cannot write status_own");
        return;
    }
    if work.events {
        h.firmware().post_cmd_eqe(env, 1u32 << slot);
    }
}

/// Executes a prepared command, applies the plan's after-effects (`after`: a SAVE
/// image corrupted or truncated, a LOAD failing part-way, an FLR arriving meanwhile)
/// and scatters its output. Returns the delivery status to write, or `None` if a reset
/// happened meanwhile (nothing may be written).
fn execute(
    h: &dyn Host,
    entry_addr: u64,
    work: &Work,
    p: &Prepared,
    record: &mut CmdRecord,
    seq: u64,
    after: &[After],
) -> Option<DeliveryStatus> {
    let cmd = Cmd::new(&p.input, p.outlen);
    let env = h.env();
    let corrupt: Vec<u64> = after
        .iter()
        .filter_map(|a| match a {
            After::Corrupt(bits) => Some(bits.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    let ctx = CmdContext {
        opcode: cmd.opcode,
        op_mod: cmd.op_mod,
        vhca_id: cmd.target_vhca_id(env.id().vhca_id),
        seq,
        load_fail: after.contains(&After::LoadFail),
        record_writes: !corrupt.is_empty(),
        writes: Vec::new(),
    };
    let (mut reply, ctx) = fault::with_context(ctx, || h.firmware().execute(env, &cmd));
    record.status = reply.status;
    record.syndrome = reply.syndrome;
    let saved = reply.status == CmdStatus::Ok && cmd.opcode == u16::from(Opcode::SaveVhcaState);
    if saved {
        let image = ifc::get(&reply.out, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE);
        for a in after {
            if let After::Truncate(keep) = a {
                let keep = keep.unwrap_or(image / 2).min(image);
                tracing::info!(image, keep, "SAVE image truncated by the fault plan");
                ifc::set(&mut reply.out, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE, keep);
            }
        }
        if !corrupt.is_empty() {
            corrupt_image(env, &ctx.writes, image, &corrupt);
        }
    }
    if after.contains(&After::Flr) {
        tracing::info!("FLR injected while the command executed");
        h.flr();
    }
    if env.epoch() != work.epoch {
        return None;
    }
    scatter_out(h, entry_addr, &reply.out, p)
}

/// Flips `bits` of the first `image` bytes the command wrote (`writes`, in order).
fn corrupt_image(env: &dyn Env, writes: &[(u64, usize)], image: u64, bits: &[u64]) {
    for &bit in bits {
        let Some((iova, mask)) = fault::flip_target(writes, image, bit) else {
            continue;
        };
        let mut b = [0u8];
        let flipped = env.dma_read(iova, &mut b).and_then(|()| {
            b[0] ^= mask;
            env.dma_write(iova, &b)
        });
        match flipped {
            Ok(()) => tracing::info!(
                offset = bit % (image * 8) / 8,
                mask,
                "SAVE image bit flipped by the fault plan"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot corrupt the SAVE image"),
        }
    }
}

/// Scatters `out` (cut to `outlen`) into the output mailboxes.
fn scatter_out(h: &dyn Host, entry_addr: u64, out: &[u8], p: &Prepared) -> Option<DeliveryStatus> {
    let n = out.len().min(p.outlen);
    match mailbox::scatter(h.env(), entry_addr, &out[..n], &p.out_blocks) {
        Ok(()) => Some(DeliveryStatus::Ok),
        Err(e) => {
            // The chain was mapped a moment ago; the driver unmapped it under us.
            static NO_SCATTER: RateLimit = RateLimit::per_second();
            warn_limited!(NO_SCATTER, error = %e, "output scatter failed");
            Some(DeliveryStatus::FwErr)
        }
    }
}

#[cfg(test)]
mod tests;
