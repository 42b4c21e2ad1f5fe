//! The slot table: which command each of the queue's slots carries, from posting to
//! the collection of its result (or to the late completion of a timed-out one), the
//! token and ticket counters and the interface's statistics. Pure bookkeeping under
//! the queue lock: nothing here does I/O or waits.

use std::time::{Duration, Instant};

use mlx5_prm::Opcode;
use vmm_sys_util::eventfd::EventFd;

use super::arena::DmaArena;
use super::entry::{free_chain, Chain};
use super::eq::EventQueue;
use super::error::{opcode_name, CmdError};

/// Counters of the command interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CmdStats {
    pub submitted: u64,
    pub completed_by_polling: u64,
    pub completed_by_eqe: u64,
    pub doorbells: u64,
    pub interrupts: u64,
    pub eqes: u64,
    pub timeouts: u64,
    pub late_completions: u64,
}

/// How long a waiter polls (the entries in polling mode, the command EQ in event mode)
/// before it sleeps (on the interrupt, in event mode), unless [`super::CmdIf::set_spin`] says
/// otherwise.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// The longest spin window [`super::CmdIf::set_spin`] accepts.
pub const MAX_SPIN: Duration = Duration::from_micros(100);

/// A posted command, redeemed with [`super::CmdIf::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub(super) slot: u8,
    pub(super) seq: u64,
}

impl Ticket {
    pub fn slot(&self) -> u8 {
        self.slot
    }
}

#[derive(Debug)]
pub(super) struct InFlight {
    pub seq: u64,
    pub token: u8,
    pub opcode: u16,
    pub op_mod: u16,
    pub out_len: usize,
    pub in_chain: Chain,
    pub out_chain: Chain,
    pub posted: Instant,
    pub deadline: Instant,
    /// The command's span: opened at posting, its status recorded at completion.
    pub span: tracing::Span,
}

impl InFlight {
    pub fn timeout_error(&self, slot: u8) -> CmdError {
        CmdError::Timeout {
            opcode: self.opcode,
            op_mod: self.op_mod,
            slot,
            elapsed: self.posted.elapsed(),
        }
    }

    /// Returns the mailboxes to the arena.
    pub fn release(mut self, arena: &DmaArena) {
        free_chain(arena, &mut self.in_chain);
        free_chain(arena, &mut self.out_chain);
    }
}

#[derive(Debug)]
pub(super) enum Slot {
    Free,
    /// Entry written, doorbell maybe not rung yet.
    Busy(InFlight),
    /// Completed; the result waits for its ticket.
    Done {
        seq: u64,
        result: Result<Vec<u8>, CmdError>,
    },
    /// Timed out; kept until the device hands the entry back.
    Stuck(InFlight),
}

/// The command EQ and the eventfd of its MSI-X vector (event mode).
///
/// The EQ is armed only when a waiter is about to block on the eventfd: a completion
/// taken off the ring while a waiter polls it needs no interrupt, so the device raises
/// none and the driver writes no arm doorbell for it (one vfio-user message less per
/// command). The consumer index is still reported every [`CI_UPDATE_EVERY`] EQEs, so
/// the device never sees the ring overrun.
pub(super) struct Events {
    pub eq: EventQueue,
    pub eventfd: EventFd,
    /// The EQ is armed as far as the driver knows: an arm doorbell was written and no
    /// EQE has been taken since (the device disarms when it posts one).
    pub armed: bool,
    /// The consumer index last written to the device (arming or not).
    pub told: u32,
}

/// EQEs taken before the consumer index is reported without arming (half the spare
/// EQEs, as `mlx5_eq_update_ci` is called by the kernel's EQ handler).
pub(super) const CI_UPDATE_EVERY: u32 = (mlx5_prm::cmd::eq::NUM_SPARE_EQE / 2) as u32;

impl Events {
    /// A command EQ armed (with its consumer index written) by the caller.
    pub fn armed(eq: EventQueue, eventfd: EventFd) -> Self {
        let told = eq.ci();
        Events {
            eq,
            eventfd,
            armed: true,
            told,
        }
    }
}

/// How commands complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Polling,
    Events,
}

/// Everything under the queue lock.
pub(super) struct Queue {
    pub slots: Vec<Slot>,
    next_token: u8,
    next_seq: u64,
    pub timeout: Duration,
    pub stats: CmdStats,
    pub mode: Mode,
    /// The command EQ in event mode; taken out by the thread driving completion for
    /// the time it reads the EQ outside the lock (`driving` is then set).
    pub events: Option<Events>,
    /// A thread is driving completion (scanning entries or the EQ, or blocked on the
    /// eventfd) without the lock; the others wait on the queue's condition variable.
    pub driving: bool,
    /// How long a waiter polls (entries or the command EQ) before it sleeps.
    pub spin: Duration,
    /// Threads waiting on the queue's condition variable (woken only if there are).
    pub waiters: usize,
}

impl Queue {
    pub fn new(slots: usize, timeout: Duration) -> Self {
        Queue {
            slots: (0..slots).map(|_| Slot::Free).collect(),
            next_token: 1,
            next_seq: 1,
            timeout,
            stats: CmdStats::default(),
            mode: Mode::Polling,
            events: None,
            driving: false,
            spin: DEFAULT_SPIN,
            waiters: 0,
        }
    }

    /// Tokens run 1..=255 (0 is never used).
    pub fn next_token(&mut self) -> u8 {
        let t = self.next_token;
        self.next_token = if t == u8::MAX { 1 } else { t + 1 };
        t
    }

    pub fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// A free slot for `opcode`: MANAGE_PAGES gets the last one, the rest the others.
    pub fn pick_slot(&self, opcode: u16, pages_slot: usize) -> Result<usize, CmdError> {
        if opcode == u16::from(Opcode::ManagePages) {
            return match self.slots[pages_slot] {
                Slot::Free => Ok(pages_slot),
                _ => Err(CmdError::NoSlot {
                    opcode,
                    why: "the MANAGE_PAGES slot is busy",
                }),
            };
        }
        self.slots[..pages_slot]
            .iter()
            .position(|s| matches!(s, Slot::Free))
            .ok_or(CmdError::NoSlot {
                opcode,
                why: "all regular slots are busy",
            })
    }

    /// The command `t` names, while it is posted and not complete.
    pub fn busy(&self, t: Ticket) -> Option<&InFlight> {
        match self.slots.get(t.slot as usize) {
            Some(Slot::Busy(f)) if f.seq == t.seq => Some(f),
            _ => None,
        }
    }

    pub fn is_done(&self, t: Ticket) -> bool {
        matches!(self.slots.get(t.slot as usize), Some(Slot::Done { seq, .. }) if *seq == t.seq)
    }

    /// Tickets of every posted command not yet complete.
    pub fn busy_tickets(&self) -> Vec<Ticket> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Busy(f) => Some(Ticket {
                    slot: i as u8,
                    seq: f.seq,
                }),
                _ => None,
            })
            .collect()
    }

    /// Slots whose entry may come back from the device (busy or stuck), as a mask.
    pub fn outstanding(&self) -> u32 {
        self.slots
            .iter()
            .take(32)
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Busy(_) | Slot::Stuck(_)))
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    pub fn count(&self, f: impl Fn(&Slot) -> bool) -> usize {
        self.slots.iter().filter(|s| f(s)).count()
    }

    /// Hands the result of `t` over, freeing its slot.
    pub fn collect(&mut self, t: Ticket) -> Result<Vec<u8>, CmdError> {
        let slot = t.slot as usize;
        match self.slots.get(slot) {
            Some(Slot::Done { seq, .. }) if *seq == t.seq => {
                match std::mem::replace(&mut self.slots[slot], Slot::Free) {
                    Slot::Done { result, .. } => result,
                    // Matched as Done just above.
                    _ => Err(CmdError::UnknownTicket { slot: t.slot }),
                }
            }
            Some(Slot::Busy(f)) if f.seq == t.seq => Err(self.expire(t)),
            Some(Slot::Stuck(f)) if f.seq == t.seq => Err(f.timeout_error(t.slot)),
            _ => Err(CmdError::UnknownTicket { slot: t.slot }),
        }
    }

    /// Turns a busy slot into a stuck one and returns its timeout error.
    pub fn expire(&mut self, t: Ticket) -> CmdError {
        let slot = t.slot as usize;
        match std::mem::replace(&mut self.slots[slot], Slot::Free) {
            Slot::Busy(f) if f.seq == t.seq => {
                let err = f.timeout_error(t.slot);
                f.span.in_scope(|| {
                    tracing::warn!(
                        opcode = %opcode_name(f.opcode),
                        op_mod = f.op_mod,
                        slot,
                        "command timeout; will leak the slot until the device completes it"
                    )
                });
                self.stats.timeouts += 1;
                self.slots[slot] = Slot::Stuck(f);
                err
            }
            other => {
                self.slots[slot] = other;
                CmdError::UnknownTicket { slot: t.slot }
            }
        }
    }

    /// A prepared command whose doorbell could not be rung: the device never saw it.
    pub fn abandon(&mut self, t: Ticket, arena: &DmaArena) {
        let slot = t.slot as usize;
        if self.busy(t).is_some() {
            if let Slot::Busy(f) = std::mem::replace(&mut self.slots[slot], Slot::Free) {
                f.release(arena);
            }
        }
    }

    /// Frees a stuck slot whose entry the device has handed back.
    pub fn reap(&mut self, slot: usize, arena: &DmaArena) {
        if !matches!(self.slots.get(slot), Some(Slot::Stuck(_))) {
            return;
        }
        if let Slot::Stuck(f) = std::mem::replace(&mut self.slots[slot], Slot::Free) {
            tracing::warn!(
                opcode = %opcode_name(f.opcode), slot,
                "command completion arrived after timeout"
            );
            f.release(arena);
            self.stats.late_completions += 1;
        }
    }
}
