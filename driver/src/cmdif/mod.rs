//! The firmware command interface client over vfio-user (mlx5-device.md §2–3).
//!
//! The queue page and the mailboxes live in a [`DmaArena`] this driver DMA-maps into the
//! function. A command is posted by filling its slot's 64-byte entry (plus input and
//! output mailbox chains), flipping ownership to the device and ringing the doorbell
//! (a big-endian REGION_WRITE of `1 << slot` to BAR0 0x18). It completes either by
//! polling `status_own` in our own mapping (the state after enabling the queue) or, once
//! a command EQ exists ([`CmdIf::use_events`]), by an EQE of type 0x0a whose vector names
//! the slot, signalled through the MSI-X eventfd.
//!
//! Slots follow mlx5_core: slots `0..n-1` carry regular commands, the last slot is kept
//! for MANAGE_PAGES. A command that times out leaves its slot (and its mailboxes) busy,
//! because the device may still write them; the slot is reclaimed when a late
//! completion shows up.
//!
//! # Sharing
//! A [`CmdIf`] is shared by reference between threads (`&self` everywhere): each
//! thread posts its commands and waits for its own tickets, so commands from several
//! threads are in flight on different slots together, as mlx5_core's are.
//!
//! # Locks, in order (a lock may only be taken while holding the ones above it)
//! 1. `CmdIf::queue` (the slot table, counters, the command EQ): held for slot
//!    allocation, writing an entry and its mailboxes, and recording completions. Never
//!    held across a socket round trip or a wait: the thread that drives completion
//!    marks `Queue::driving`, takes the EQ out, and releases the lock before it scans
//!    entries, rings the EQ doorbell or blocks on the eventfd; the other waiters sleep
//!    on `CmdIf::done` (which releases the lock) until it records what it found.
//! 2. The arena's allocator lock ([`DmaArena`]), a leaf.
//!
//! `CmdIf::client` (the vfio-user connection) is a leaf of its own: held for one
//! message round trip (a doorbell, an EQ doorbell, a register read) and never while
//! `queue` is held.
//!
//! Everything read from the device is untrusted: loops are bounded, lengths come from
//! the driver's own bookkeeping, never from device memory.

pub mod arena;
mod complete;
pub mod entry;
pub mod eq;
pub mod error;
pub mod health;
pub mod init;
mod slots;
mod submit;

use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vfu::uapi::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vfu::Client;
use vmm_sys_util::eventfd::EventFd;

pub use arena::{ArenaConfig, ArenaError, DmaArena};
pub use entry::new_input;
pub use eq::{EqError, EventQueue};
pub use error::{errno_name, opcode_name, CmdError};
pub use health::HealthFault;
pub use init::{FwRev, Geometry, BAR0};
pub use slots::{CmdStats, Mode, Ticket};
use slots::{Events, Queue, Slot};
pub use slots::{DEFAULT_SPIN, MAX_SPIN};

/// The kernel's default command timeout (`tout_def_sw_val` CMD).
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Wait for `initializing` to clear before the queue is programmed (FW_PRE_INIT_TIMEOUT).
pub const DEFAULT_PRE_INIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Wait for `initializing` to clear after the queue is programmed (FW_INIT).
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message (input or output) the driver builds: 16 MiB.
pub const MAX_MSG_LEN: usize = 16 << 20;
/// Smallest output: status, reserved, syndrome.
pub const MIN_OUT_LEN: usize = 8;

/// Interface settings.
#[derive(Debug, Clone, Copy)]
pub struct CmdIfConfig {
    pub arena: ArenaConfig,
    /// Per-command timeout.
    pub timeout: Duration,
    pub pre_init_timeout: Duration,
    pub init_timeout: Duration,
}

impl Default for CmdIfConfig {
    fn default() -> Self {
        CmdIfConfig {
            arena: ArenaConfig::default(),
            timeout: DEFAULT_CMD_TIMEOUT,
            pre_init_timeout: DEFAULT_PRE_INIT_TIMEOUT,
            init_timeout: DEFAULT_INIT_TIMEOUT,
        }
    }
}

/// What the command EQ looks like from outside (event mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EqState {
    eqn: Option<u8>,
    ci: u32,
}

impl EqState {
    /// The EQ number the firmware gave.
    pub fn eqn(&self) -> Option<u8> {
        self.eqn
    }

    /// The consumer index.
    pub fn ci(&self) -> u32 {
        self.ci
    }
}

/// The command interface of one function.
pub struct CmdIf {
    /// Lock order: after `queue` is released (see the module docs); one round trip at a time.
    client: Mutex<Client>,
    /// The connection's socket, polled for the server hanging up while a waiter sleeps
    /// (a posted doorbell gets no answer that could fail); valid while `client` lives.
    socket: std::os::fd::RawFd,
    arena: DmaArena,
    fw: FwRev,
    geometry: Geometry,
    /// Lock order 1 (see the module docs).
    queue: Mutex<Queue>,
    /// Signalled (with `queue`) whenever completions were recorded or the thread
    /// driving completion stepped back.
    done: Condvar,
}

impl std::fmt::Debug for CmdIf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmdIf")
            .field("fw", &self.fw)
            .field("geometry", &self.geometry)
            .field("mode", &self.mode())
            .field("stats", &self.stats())
            .finish()
    }
}

fn dma_map(client: &mut Client, arena: &DmaArena) -> Result<(), CmdError> {
    client.dma_map(
        arena.iova(),
        arena.size(),
        arena.file().as_raw_fd(),
        0,
        VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
    )?;
    Ok(())
}

impl CmdIf {
    /// Maps the arena into the function, checks the firmware, programs the queue
    /// address and waits for the firmware to leave `initializing` (`mlx5_cmd_enable`
    /// plus `wait_fw_init`). On failure the arena is unmapped again (best effort) and
    /// the connection is dropped.
    pub fn new(mut client: Client, cfg: CmdIfConfig) -> Result<Self, CmdError> {
        let arena = DmaArena::new(cfg.arena)?;
        dma_map(&mut client, &arena)?;
        let r = init::enable(
            &mut client,
            arena.queue_iova(),
            cfg.pre_init_timeout,
            cfg.init_timeout,
        );
        Self::finish_setup(client, arena, cfg.timeout, r)
    }

    /// Takes over a function whose command queue is already programmed (e.g. one that
    /// was live-migrated here with its queue in `arena`): DMA-maps the arena at its
    /// IOVA and reads the firmware revision and queue geometry, without touching the
    /// queue address or waiting for `initializing`. Completion is by polling.
    pub fn attach(
        mut client: Client,
        arena: DmaArena,
        timeout: Duration,
    ) -> Result<Self, CmdError> {
        dma_map(&mut client, &arena)?;
        let r = init::probe(&mut client);
        Self::finish_setup(client, arena, timeout, r)
    }

    fn finish_setup(
        mut client: Client,
        arena: DmaArena,
        timeout: Duration,
        probed: Result<(FwRev, Geometry), CmdError>,
    ) -> Result<Self, CmdError> {
        match probed {
            Ok((fw, geometry)) => {
                tracing::debug!(%fw, slots = geometry.slots(), "command interface up");
                Ok(CmdIf {
                    socket: client.as_raw_fd(),
                    client: Mutex::new(client),
                    arena,
                    fw,
                    geometry,
                    queue: Mutex::new(Queue::new(geometry.slots(), timeout)),
                    done: Condvar::new(),
                })
            }
            Err(e) => {
                let _ = client.dma_unmap(arena.iova(), arena.size());
                Err(e)
            }
        }
    }

    /// Hands back the connection and the arena without unmapping (the function keeps
    /// using the queue in the arena; see [`CmdIf::attach`]). Commands in flight are
    /// abandoned.
    pub fn into_parts(self) -> (Client, DmaArena) {
        let client = self.client.into_inner().unwrap_or_else(|e| e.into_inner());
        (client, self.arena)
    }

    /// Unmaps the arena and hands the connection back. Commands still in flight are
    /// abandoned; after the unmap the device can no longer write our memory.
    pub fn into_client(self) -> (Client, Result<(), CmdError>) {
        let (mut client, arena) = self.into_parts();
        let r = client
            .dma_unmap(arena.iova(), arena.size())
            .map_err(CmdError::from);
        (client, r)
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // Every update of the slot table is complete before its lock is released, so
        // a panic elsewhere leaves it consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on `done` (releasing the queue lock) for at most `limit`.
    fn wait_done<'a>(
        &self,
        mut q: MutexGuard<'a, Queue>,
        limit: Duration,
    ) -> MutexGuard<'a, Queue> {
        q.waiters += 1;
        let mut q = match self.done.wait_timeout(q, limit) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
        q.waiters -= 1;
        q
    }

    /// Wakes the threads waiting on `done` (called with the queue lock held, after
    /// recording what changed), if there are any: no system call otherwise.
    fn wake_waiters(&self, q: &Queue) {
        if q.waiters > 0 {
            self.done.notify_all();
        }
    }

    /// The queue lock, once no thread is driving completion (the EQ is in place).
    fn lock_queue_idle(&self) -> MutexGuard<'_, Queue> {
        let mut q = self.lock_queue();
        while q.driving {
            q = self.wait_done(q, complete::EVENT_SLICE);
        }
        q
    }

    pub fn fw_rev(&self) -> FwRev {
        self.fw
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn mode(&self) -> Mode {
        self.lock_queue().mode
    }

    pub fn stats(&self) -> CmdStats {
        self.lock_queue().stats
    }

    pub fn timeout(&self) -> Duration {
        self.lock_queue().timeout
    }

    /// Sets the per-command timeout for commands posted from now on.
    pub fn set_timeout(&self, t: Duration) {
        self.lock_queue().timeout = t;
    }

    /// The vfio-user connection (config space, IRQs, UAR doorbells), for one or a few
    /// round trips: do not hold it across a command.
    pub fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn arena(&self) -> &DmaArena {
        &self.arena
    }

    /// How long a waiter polls before it sleeps: the entries' ownership in polling
    /// mode (then it sleeps in growing steps), the command EQ in event mode (then it
    /// arms the EQ and sleeps on the eventfd).
    pub fn spin(&self) -> Duration {
        self.lock_queue().spin
    }

    /// Sets that window, for waits from now on; at most [`MAX_SPIN`] (a longer one is
    /// cut to it). Zero: a wait in event mode always sleeps on the interrupt.
    pub fn set_spin(&self, spin: Duration) {
        self.lock_queue().spin = spin.min(MAX_SPIN);
    }

    /// The command EQ, in event mode.
    pub fn event_queue(&self) -> Option<EqState> {
        self.lock_queue_idle().events.as_ref().map(|e| EqState {
            eqn: e.eq.eqn(),
            ci: e.eq.ci(),
        })
    }

    /// Slots that timed out and are still owned by the device.
    pub fn stuck_slots(&self) -> usize {
        self.lock_queue().count(|s| matches!(s, Slot::Stuck(_)))
    }

    /// Commands posted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.lock_queue()
            .count(|s| matches!(s, Slot::Busy(_) | Slot::Done { .. }))
    }

    /// Completes commands through `eq` from now on (`mlx5_cmd_use_events`). The EQ must
    /// exist in the firmware and be armed at its current consumer index, and `eventfd`
    /// be its MSI-X vector's.
    pub fn use_events(&self, eq: EventQueue, eventfd: EventFd) -> Result<(), CmdError> {
        let mut q = self.lock_queue_idle();
        if q.mode == Mode::Events {
            return Err(CmdError::AlreadyEvents);
        }
        if eq.eqn().is_none() {
            return Err(CmdError::EqNotCreated);
        }
        let busy = q.count(|s| matches!(s, Slot::Busy(_)));
        if busy > 0 {
            return Err(CmdError::BusyModeSwitch { busy });
        }
        q.events = Some(Events::armed(eq, eventfd));
        q.mode = Mode::Events;
        Ok(())
    }

    /// Back to polling (`mlx5_cmd_use_polling`, before DESTROY_EQ of the command EQ);
    /// returns the EQ and its eventfd. Commands in flight are first waited for.
    pub fn use_polling(&self) -> Option<(EventQueue, EventFd)> {
        let busy = self.lock_queue().busy_tickets();
        if !busy.is_empty() {
            // Their results stay in the slots for their tickets.
            let _ = self.progress_until(&busy);
        }
        let mut q = self.lock_queue_idle();
        q.mode = Mode::Polling;
        q.events.take().map(|e| (e.eq, e.eventfd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_interface_is_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<CmdIf>();
    }
}
