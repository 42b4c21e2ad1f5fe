//! Completing commands: waiting for tickets, the one thread at a time that drives
//! completion (scanning `status_own` in polling mode, consuming the command EQ and
//! blocking on its eventfd in event mode) without the queue lock, and reading each
//! completed entry's delivery status, output and command status.

use std::os::fd::AsRawFd;

use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

use mlx5_prm::cmdq::{DELIVERY_STATUS_SHIFT, INLINE_SIZE};
use mlx5_prm::{CmdStatus, DeliveryStatus};

use super::entry::{out_header, read_chain, read_entry};
use super::error::{opcode_name, CmdError};
use super::init::BAR0;
use super::slots::{Events, InFlight, Mode, Queue, Slot, Ticket, CI_UPDATE_EVERY};
use super::CmdIf;

/// Longest single block on the interrupt eventfd (or on the queue's condition
/// variable) before deadlines are looked at again.
pub(super) const EVENT_SLICE: Duration = Duration::from_millis(100);
/// The consumer index is 24 bits wide.
const EQ_CI_MASK: u32 = 0x00ff_ffff;

/// What one round of driving completion found, outside the lock.
#[derive(Debug, Default)]
struct Found {
    /// Slots whose entry came back (polling) or that an EQE named (events).
    slots: u32,
    interrupts: u64,
    eqes: u64,
}

impl CmdIf {
    /// Waits for one posted command.
    pub fn wait(&self, t: Ticket) -> Result<Vec<u8>, CmdError> {
        self.wait_all(&[t])
            .pop()
            .unwrap_or(Err(CmdError::UnknownTicket { slot: t.slot }))
    }

    /// Waits for several posted commands; each has its own deadline.
    pub fn wait_all(&self, tickets: &[Ticket]) -> Vec<Result<Vec<u8>, CmdError>> {
        let failure = self.progress_until(tickets).err();
        let mut q = self.lock_queue();
        tickets
            .iter()
            .map(|t| match &failure {
                Some(cause) if !q.is_done(*t) => {
                    // The transport failed; the command may or may not have run.
                    let (opcode, op_mod) = q.busy(*t).map_or((0, 0), |f| (f.opcode, f.op_mod));
                    q.expire(*t);
                    Err(CmdError::Aborted {
                        opcode,
                        op_mod,
                        slot: t.slot,
                        cause: cause.clone(),
                    })
                }
                _ => q.collect(*t),
            })
            .collect()
    }

    /// Drives completion until every ticket is done or past its deadline. One waiter
    /// at a time drives (without the queue lock); the others sleep on `done`.
    pub(super) fn progress_until(&self, tickets: &[Ticket]) -> Result<(), Arc<CmdError>> {
        let mut idle: u32 = 0;
        let mut q = self.lock_queue();
        loop {
            let now = Instant::now();
            let mut deadline: Option<Instant> = None;
            for t in tickets {
                let Some(d) = q.busy(*t).map(|f| f.deadline) else {
                    continue;
                };
                if now >= d {
                    q.expire(*t);
                } else {
                    deadline = Some(deadline.map_or(d, |m| m.min(d)));
                }
            }
            let Some(deadline) = deadline else {
                return Ok(());
            };
            let left = deadline.saturating_duration_since(now);
            if q.driving {
                q = self.wait_done(q, left.min(EVENT_SLICE));
                continue;
            }
            q.driving = true;
            let mut events = q.events.take();
            let polling = q.mode == Mode::Polling;
            // Spin only until the first round that found nothing: a command still
            // running after it is waited for by sleeping.
            let spin = if idle == 0 { q.spin } else { Duration::ZERO };
            let scan = if polling { q.outstanding() } else { 0 };
            drop(q);
            let r = match events.as_mut() {
                Some(ev) => self.drive_events(ev, left, spin),
                None => self.drive_polling(scan, spin.min(left)),
            };
            q = self.lock_queue();
            q.events = events;
            q.driving = false;
            let found = match r {
                Ok(f) => {
                    q.stats.interrupts += f.interrupts;
                    q.stats.eqes += f.eqes;
                    self.apply(&mut q, f.slots, polling)
                }
                Err(e) => {
                    self.wake_waiters(&q);
                    return Err(Arc::new(e));
                }
            };
            self.wake_waiters(&q);
            if found > 0 {
                idle = 0;
            } else {
                if polling {
                    drop(q);
                    if let Err(e) = self.sleep(None, backoff(idle)) {
                        return Err(Arc::new(e));
                    }
                    q = self.lock_queue();
                }
                idle = idle.saturating_add(1);
            }
        }
    }

    /// Polling mode: the slots of `scan` whose entry is back in software hands, looked
    /// at again (yielding the CPU in between) for at most `spin` until one is.
    fn drive_polling(&self, scan: u32, spin: Duration) -> Result<Found, CmdError> {
        let mut found = Found::default();
        let spin_until = (!spin.is_zero()).then(|| Instant::now() + spin);
        loop {
            let mut left = scan;
            while left != 0 {
                let slot = left.trailing_zeros() as usize;
                left &= left - 1;
                if self.owned_by_sw(slot)? {
                    found.slots |= 1 << slot;
                }
            }
            if found.slots != 0 || spin_until.is_none_or(|u| Instant::now() >= u) {
                return Ok(found);
            }
            std::thread::yield_now();
        }
    }

    /// Event mode: takes EQEs; when none came, polls the ring for at most `spin` (the
    /// window of [`CmdIf::set_spin`]), then arms the EQ and blocks on the eventfd
    /// (at most `max_wait`, in slices) and takes them again.
    fn drive_events(
        &self,
        ev: &mut Events,
        max_wait: Duration,
        spin: Duration,
    ) -> Result<Found, CmdError> {
        let mut found = Found::default();
        self.take_eqes(ev, &mut found)?;
        if found.slots != 0 {
            return Ok(found);
        }
        // Poll the EQ (memory) for a moment before sleeping on the eventfd: a command
        // such as QUERY_ISSI completes within tens of microseconds, while a thread woken
        // by the eventfd waits for a CPU. The EQ is not armed meanwhile, so a completion
        // found here cost the device no interrupt and the driver no arm doorbell.
        let spin = spin.min(max_wait);
        if !spin.is_zero() {
            let spin_until = Instant::now() + spin;
            while Instant::now() < spin_until {
                std::thread::yield_now();
                self.take_eqes(ev, &mut found)?;
                if found.slots != 0 {
                    return Ok(found);
                }
            }
        }
        if !ev.armed {
            // An interrupt of an earlier arm, already handled through its EQE, would
            // end the wait at once: take it off the eventfd before arming.
            found.interrupts += read_eventfd(ev)?;
            let (off, v) = ev.eq.doorbell(true);
            self.post_eq_doorbell(off, v)?;
            ev.armed = true;
            ev.told = ev.eq.ci();
            // An EQE the device wrote before the arm: the arm fires for it at once, and
            // it is taken now rather than after a wakeup.
            self.take_eqes(ev, &mut found)?;
            if found.slots != 0 {
                return Ok(found);
            }
        }
        let wait = max_wait.min(EVENT_SLICE);
        if self.sleep(Some(&ev.eventfd), wait)? {
            found.interrupts += read_eventfd(ev)?;
            self.take_eqes(ev, &mut found)?;
        }
        Ok(found)
    }

    /// Sleeps for at most `limit` or until `eventfd` (if any) is readable; true if it
    /// is. Fails if the server hung up meanwhile: a posted doorbell gets no answer that
    /// could tell, and a command it carried will never complete.
    fn sleep(&self, eventfd: Option<&EventFd>, limit: Duration) -> Result<bool, CmdError> {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(limit.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: limit.subsec_nanos().into(),
        };
        let mut pfds = [
            libc::pollfd {
                fd: self.socket,
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: eventfd.map_or(-1, |e| e.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n: libc::nfds_t = if eventfd.is_some() { 2 } else { 1 };
        // SAFETY: `pfds` and `ts` are valid for the duration of the call and `pfds`
        // holds `n` entries; the socket belongs to our client and the eventfd to the
        // caller, both alive across the call; no signal mask is passed.
        let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), n, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(CmdError::Irq(e));
            }
            return Ok(false);
        }
        if pfds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(CmdError::Vfu(vfu::VfuError::Disconnected));
        }
        Ok(eventfd.is_some() && pfds[1].revents & libc::POLLIN != 0)
    }

    /// Consumes the command EQ (at most one ring's worth) and notes the slots named,
    /// without arming; reports the consumer index once [`CI_UPDATE_EVERY`] EQEs were
    /// taken since it was last written.
    fn take_eqes(&self, ev: &mut Events, found: &mut Found) -> Result<(), CmdError> {
        let mut bells: Vec<(u64, [u8; 4])> = Vec::new();
        let eqes = ev.eq.drain(&self.arena, |off, v| bells.push((off, v)))?;
        if eqes.is_empty() {
            return Ok(());
        }
        // The device disarms the EQ when it posts an EQE.
        ev.armed = false;
        found.eqes += eqes.len() as u64;
        if !bells.is_empty() || ev.eq.ci().wrapping_sub(ev.told) & EQ_CI_MASK >= CI_UPDATE_EVERY {
            bells.clear();
            bells.push(ev.eq.doorbell(false));
            ev.told = ev.eq.ci();
        }
        for (off, v) in bells {
            self.post_eq_doorbell(off, v)?;
        }
        for e in &eqes {
            match e.cmd_vector() {
                Some(vector) => found.slots |= vector,
                None => tracing::debug!(
                    event_type = e.event_type(),
                    "ignoring a non-command event on the command EQ"
                ),
            }
        }
        Ok(())
    }

    /// An EQ doorbell, posted (No_reply) as a CPU's MMIO write is: the server handles
    /// a connection's messages in order, so it lands before the next doorbell, and
    /// waiting for a reply would cost a round trip.
    fn post_eq_doorbell(&self, off: u64, v: [u8; 4]) -> Result<(), CmdError> {
        self.client().region_write_posted(BAR0, off, &v)?;
        Ok(())
    }

    /// Records the completions of `slots` (under the queue lock). Returns how many
    /// commands completed.
    fn apply(&self, q: &mut Queue, slots: u32, polling: bool) -> usize {
        let mut completed = 0;
        for slot in 0..q.slots.len().min(32) {
            if slots & (1 << slot) == 0 {
                continue;
            }
            match &q.slots[slot] {
                Slot::Busy(_) => {
                    if self.owned_by_sw(slot).unwrap_or(false) {
                        self.finish(q, slot);
                        if polling {
                            q.stats.completed_by_polling += 1;
                        } else {
                            q.stats.completed_by_eqe += 1;
                        }
                        completed += 1;
                    } else {
                        tracing::warn!(slot, "EQE names a slot the device still owns; ignored");
                    }
                }
                Slot::Stuck(_) => {
                    if self.owned_by_sw(slot).unwrap_or(false) {
                        q.reap(slot, &self.arena);
                    }
                }
                _ if polling => {}
                _ => tracing::warn!(slot, "EQE names a slot with no command; ignored"),
            }
        }
        completed
    }

    /// Reads the completed entry and output of `slot`, frees its mailboxes and stores
    /// the result for the ticket.
    fn finish(&self, q: &mut Queue, slot: usize) {
        let Slot::Busy(f) = std::mem::replace(&mut q.slots[slot], Slot::Free) else {
            return;
        };
        let result = self.read_result(slot, &f);
        let elapsed_us = f.posted.elapsed().as_micros() as u64;
        let _enter = f.span.enter();
        match &result {
            Ok(_) => {
                f.span.record("status", 0);
                f.span.record("syndrome", 0);
                tracing::debug!(
                    opcode = %opcode_name(f.opcode), op_mod = f.op_mod, slot, token = f.token,
                    status = 0, syndrome = 0, elapsed_us, "command completed"
                );
            }
            Err(e @ (CmdError::Status { .. } | CmdError::UnknownStatus { .. })) => {
                let syndrome = e.syndrome().unwrap_or(0);
                f.span.record(
                    "status",
                    tracing::field::display(e.status().map_or("UNKNOWN", CmdStatus::name)),
                );
                f.span.record(
                    "syndrome",
                    tracing::field::display(format_args!("{syndrome:#x}")),
                );
                tracing::info!(
                    opcode = %opcode_name(f.opcode), op_mod = f.op_mod, slot, token = f.token,
                    status = ?e.status(), syndrome = format_args!("{syndrome:#x}"),
                    errno = e.errno(), elapsed_us, "command failed"
                );
            }
            Err(e) => tracing::warn!(
                opcode = %opcode_name(f.opcode), op_mod = f.op_mod, slot, token = f.token,
                error = %e, elapsed_us, "command not delivered"
            ),
        }
        drop(_enter);
        let seq = f.seq;
        f.release(&self.arena);
        q.slots[slot] = Slot::Done { seq, result };
    }

    fn read_result(&self, slot: usize, f: &InFlight) -> Result<Vec<u8>, CmdError> {
        let e = read_entry(&self.arena, self.entry_iova(slot))?;
        let delivery = e.status_own >> DELIVERY_STATUS_SHIFT;
        match DeliveryStatus::try_from(delivery) {
            Ok(DeliveryStatus::Ok) => {}
            Ok(status) => {
                return Err(CmdError::Delivery {
                    opcode: f.opcode,
                    op_mod: f.op_mod,
                    status,
                })
            }
            Err(_) => {
                return Err(CmdError::UnknownDelivery {
                    opcode: f.opcode,
                    op_mod: f.op_mod,
                    raw: delivery,
                })
            }
        }
        let mut out = vec![0u8; f.out_len];
        let n = f.out_len.min(INLINE_SIZE);
        out[..n].copy_from_slice(&e.out[..n]);
        if f.out_len > INLINE_SIZE {
            read_chain(&self.arena, &f.out_chain, &mut out[INLINE_SIZE..])?;
        }
        let h = out_header(&out);
        let syndrome = h.syndrome.get();
        Err(match h.status() {
            Ok(CmdStatus::Ok) => return Ok(out),
            Ok(status) => CmdError::Status {
                opcode: f.opcode,
                op_mod: f.op_mod,
                status,
                syndrome,
            },
            Err(_) => CmdError::UnknownStatus {
                opcode: f.opcode,
                op_mod: f.op_mod,
                raw: h.status,
                syndrome,
            },
        })
    }
}

/// Interrupts counted on the eventfd (0 if none), which is left at zero.
fn read_eventfd(ev: &Events) -> Result<u64, CmdError> {
    match ev.eventfd.read() {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(CmdError::Irq(e)),
    }
}

/// Polling back-off once the spin window found nothing: sleeps in growing steps up to
/// 1 ms.
fn backoff(idle: u32) -> Duration {
    match idle {
        0..=191 => Duration::from_micros(20),
        192..=959 => Duration::from_micros(200),
        _ => Duration::from_millis(1),
    }
}
