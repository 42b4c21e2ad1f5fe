//! Posting commands: the checks on a request, a slot and a token, the mailbox chains
//! and the entry (under the queue lock), then the doorbell (outside it).

use std::time::Instant;

use mlx5_prm::cmdq::{CMD_OWNER_HW, CMD_STATUS_OWN_OFFSET, INLINE_SIZE};
use mlx5_prm::iseg::CMD_DBELL_OFFSET;
use zerocopy::IntoBytes;

use super::entry::{build_chain, encode_entry, free_chain, in_header, ChainError};
use super::error::{opcode_name, CmdError};
use super::init::BAR0;
use super::slots::{InFlight, Queue, Slot, Ticket};
use super::{CmdIf, MAX_MSG_LEN, MIN_OUT_LEN};

impl CmdIf {
    /// Executes one command and returns its `out_len`-byte output.
    ///
    /// The doorbell is posted (a REGION_WRITE without reply, as a CPU's MMIO write
    /// is): the completion this waits for proves the device took it, so waiting for the
    /// server's reply first would only add a socket round trip to every command.
    pub fn exec(&self, input: &[u8], out_len: usize) -> Result<Vec<u8>, CmdError> {
        let t = self.post(input, out_len, Doorbell::Posted)?;
        self.wait(t)
    }

    /// Executes several commands with as many in flight at once as there are free
    /// slots: each wave's entries are written first and posted with a single doorbell
    /// write. Returns one result per command, in order.
    pub fn exec_many(&self, cmds: &[(&[u8], usize)]) -> Vec<Result<Vec<u8>, CmdError>> {
        let mut results: Vec<Option<Result<Vec<u8>, CmdError>>> =
            (0..cmds.len()).map(|_| None).collect();
        let mut next = 0;
        while next < cmds.len() {
            let mut wave: Vec<(usize, Ticket)> = Vec::new();
            let mut mask = 0u32;
            {
                let mut q = self.lock_queue();
                while next < cmds.len() {
                    let (input, out_len) = cmds[next];
                    match self.prepare(&mut q, input, out_len) {
                        Ok(t) => {
                            mask |= 1 << t.slot;
                            wave.push((next, t));
                        }
                        Err(CmdError::NoSlot { .. }) if !wave.is_empty() => break,
                        Err(e) => results[next] = Some(Err(e)),
                    }
                    next += 1;
                }
            }
            if let Err(e) = self.ring(mask, Doorbell::Posted) {
                let e = std::sync::Arc::new(e);
                let mut q = self.lock_queue();
                for (i, t) in &wave {
                    let (opcode, op_mod) = q.busy(*t).map_or((0, 0), |f| (f.opcode, f.op_mod));
                    q.abandon(*t, &self.arena);
                    results[*i] = Some(Err(CmdError::Aborted {
                        opcode,
                        op_mod,
                        slot: t.slot,
                        cause: e.clone(),
                    }));
                }
                continue;
            }
            let tickets: Vec<Ticket> = wave.iter().map(|(_, t)| *t).collect();
            let waited = self.wait_all(&tickets);
            for ((i, _), r) in wave.into_iter().zip(waited) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .enumerate()
            // Every index got a result: an error at preparation or a wave's result.
            .map(|(i, r)| r.unwrap_or(Err(CmdError::UnknownTicket { slot: i as u8 })))
            .collect()
    }

    /// Posts one command (entry, mailboxes, doorbell) and returns its ticket once the
    /// device has taken the doorbell (the server answered the REGION_WRITE), so a
    /// command submitted before another function's command is seen first.
    pub fn submit(&self, input: &[u8], out_len: usize) -> Result<Ticket, CmdError> {
        self.post(input, out_len, Doorbell::Answered)
    }

    fn post(&self, input: &[u8], out_len: usize, how: Doorbell) -> Result<Ticket, CmdError> {
        let t = self.prepare(&mut self.lock_queue(), input, out_len)?;
        if let Err(e) = self.ring(1 << t.slot, how) {
            self.lock_queue().abandon(t, &self.arena);
            return Err(e);
        }
        Ok(t)
    }

    /// Writes the entry and mailboxes of a command into a free slot without ringing.
    fn prepare(&self, q: &mut Queue, input: &[u8], out_len: usize) -> Result<Ticket, CmdError> {
        let header = in_header(input);
        let opcode = header.opcode.get();
        let bad = |why| CmdError::BadRequest {
            opcode,
            in_len: input.len(),
            out_len,
            why,
        };
        if input.len() < INLINE_SIZE {
            return Err(bad("input shorter than the 16-byte header"));
        }
        if out_len < MIN_OUT_LEN {
            return Err(bad("output shorter than status and syndrome"));
        }
        if input.len() > MAX_MSG_LEN || out_len > MAX_MSG_LEN {
            return Err(bad("message longer than the driver's limit"));
        }
        let op_mod = header.op_mod.get();
        self.reap_stuck(q);
        let slot = q.pick_slot(opcode, self.geometry.pages_slot())?;
        let token = q.next_token();
        let chain_err = |e: ChainError| match e {
            ChainError::NoBlocks { need, free } => CmdError::NoMailbox { opcode, need, free },
            ChainError::Arena(a) => CmdError::Arena(a),
        };
        let mut in_chain =
            build_chain(&self.arena, input.len(), token, Some(&input[INLINE_SIZE..]))
                .map_err(chain_err)?;
        let mut out_chain = match build_chain(&self.arena, out_len, token, None) {
            Ok(c) => c,
            Err(e) => {
                free_chain(&self.arena, &mut in_chain);
                return Err(chain_err(e));
            }
        };
        // Lengths were capped at MAX_MSG_LEN above, so they fit u32.
        let e = encode_entry(
            input,
            in_chain.head(),
            out_chain.head(),
            out_len as u32,
            token,
        );
        if let Err(err) = self.arena.write(self.entry_iova(slot), e.as_bytes()) {
            free_chain(&self.arena, &mut in_chain);
            free_chain(&self.arena, &mut out_chain);
            return Err(err.into());
        }
        let now = Instant::now();
        let seq = q.next_seq();
        let span = tracing::debug_span!(
            "cmd",
            opcode = %opcode_name(opcode),
            op_mod,
            slot,
            token,
            status = tracing::field::Empty,
            syndrome = tracing::field::Empty,
        );
        q.slots[slot] = Slot::Busy(InFlight {
            seq,
            token,
            opcode,
            op_mod,
            out_len,
            in_chain,
            out_chain,
            posted: now,
            deadline: now + q.timeout,
            span,
        });
        q.stats.submitted += 1;
        Ok(Ticket {
            slot: slot as u8,
            seq,
        })
    }

    pub(super) fn entry_iova(&self, slot: usize) -> u64 {
        self.arena.queue_iova() + ((slot as u64) << self.geometry.log_stride)
    }

    /// Whether `slot`'s entry is back in software hands.
    pub(super) fn owned_by_sw(&self, slot: usize) -> Result<bool, CmdError> {
        let so = self
            .arena
            .load_acquire(self.entry_iova(slot) + CMD_STATUS_OWN_OFFSET as u64)?;
        Ok(so & CMD_OWNER_HW == 0)
    }

    /// Frees stuck slots the device has handed back.
    fn reap_stuck(&self, q: &mut Queue) {
        for slot in 0..q.slots.len() {
            if matches!(q.slots[slot], Slot::Stuck(_)) && self.owned_by_sw(slot).unwrap_or(false) {
                q.reap(slot, &self.arena);
            }
        }
    }

    /// The doorbell: one register write, without the queue lock.
    fn ring(&self, mask: u32, how: Doorbell) -> Result<(), CmdError> {
        if mask == 0 {
            return Ok(());
        }
        {
            let mut client = self.client();
            let v = mask.to_be_bytes();
            match how {
                Doorbell::Answered => client.region_write(BAR0, CMD_DBELL_OFFSET, &v)?,
                Doorbell::Posted => client.region_write_posted(BAR0, CMD_DBELL_OFFSET, &v)?,
            }
        }
        self.lock_queue().stats.doorbells += 1;
        Ok(())
    }
}

/// How a command doorbell is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doorbell {
    /// REGION_WRITE without reply: the caller waits for the completion anyway.
    Posted,
    /// REGION_WRITE answered by the server: the device has the doorbell on return.
    Answered,
}
