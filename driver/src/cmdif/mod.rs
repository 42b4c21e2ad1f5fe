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
//! Everything read from the device is untrusted: loops are bounded, lengths come from
//! the driver's own bookkeeping, never from device memory.

pub mod arena;
pub mod entry;
pub mod eq;
pub mod health;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mlx5_prm::cmd::header::cmd_status_to_errno;
use mlx5_prm::cmdq::{
    delivery_status_to_errno, DeliveryStatus, CMD_ENTRY_SIZE, CMD_OWNER_HW, CMD_STATUS_OWN_OFFSET,
    DELIVERY_STATUS_SHIFT, INLINE_SIZE,
};
use mlx5_prm::iseg::{
    CMDIF_REV, CMDIF_REV_FW_SUB_OFFSET, CMDIF_REV_SHIFT, CMDQ_ADDR_H_OFFSET, CMDQ_ADDR_L_SZ_OFFSET,
    CMDQ_LOG_SIZE_MASK, CMDQ_LOG_SIZE_SHIFT, CMDQ_LOG_STRIDE_MASK, CMDQ_LOG_STRIDE_SHIFT,
    CMDQ_MAX_ENTRIES, CMDQ_MAX_LOG_BYTES, CMD_DBELL_OFFSET, FW_REV_MAJOR_MASK, FW_REV_MINOR_SHIFT,
    FW_REV_OFFSET, FW_SUB_MASK, INITIALIZING_BUSY_MASK, INITIALIZING_OFFSET,
};
use mlx5_prm::Opcode;
use vfu::uapi::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_PCI_BAR0_REGION_INDEX};
use vfu::Client;
use vmm_sys_util::eventfd::EventFd;

pub use arena::{ArenaConfig, ArenaError, DmaArena};
use entry::{build_chain, encode_entry, entry_out, free_chain, read_chain, Chain, ChainError};
pub use eq::{EqError, EventQueue};
pub use health::HealthFault;

/// BAR0 is region 0.
pub const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
/// The kernel's default command timeout (`tout_def_sw_val` CMD).
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Wait for `initializing` to clear before the queue is programmed (FW_PRE_INIT_TIMEOUT).
pub const DEFAULT_PRE_INIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Wait for `initializing` to clear after the queue is programmed (FW_INIT).
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll period of the `initializing` wait (FW_PRE_INIT_WAIT).
const INIT_POLL: Duration = Duration::from_millis(2);
/// Largest message (input or output) the driver builds: 16 MiB.
pub const MAX_MSG_LEN: usize = 16 << 20;
/// Smallest output: status, reserved, syndrome.
pub const MIN_OUT_LEN: usize = 8;
/// Longest single block on the interrupt eventfd before rescanning the EQ.
const EVENT_SLICE: Duration = Duration::from_millis(100);

/// Errno names for the values the status mappings produce (and a few more).
pub fn errno_name(errno: i32) -> &'static str {
    match errno.unsigned_abs() as i32 {
        0 => "OK",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOMSG => "ENOMSG",
        libc::EBADR => "EBADR",
        libc::ENOLINK => "ENOLINK",
        libc::EPROTO => "EPROTO",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EREMOTEIO => "EREMOTEIO",
        _ => "E?",
    }
}

/// `NAME(0xOPCODE)` for logs and errors; unknown opcodes are shown by number.
pub fn opcode_name(opcode: u16) -> String {
    match Opcode::try_from(opcode) {
        Ok(op) => format!("{}({opcode:#x})", op.name()),
        Err(_) => format!("UNKNOWN_OPCODE({opcode:#x})"),
    }
}

fn status_name(status: u8) -> &'static str {
    mlx5_prm::CmdStatus::try_from(status)
        .map(|s| s.name())
        .unwrap_or("UNKNOWN_STATUS")
}

fn delivery_name(status: u8) -> &'static str {
    DeliveryStatus::try_from(status)
        .map(|s| s.name())
        .unwrap_or("UNKNOWN_DELIVERY_STATUS")
}

/// A command input of `len` bytes with the header's opcode and op_mod set.
pub fn new_input(opcode: Opcode, op_mod: u16, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len.max(INLINE_SIZE)];
    m[0..2].copy_from_slice(&u16::from(opcode).to_be_bytes());
    m[6..8].copy_from_slice(&op_mod.to_be_bytes());
    m
}

/// Errors of the command interface.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("vfio-user: {0}")]
    Vfu(#[from] vfu::VfuError),
    #[error("DMA arena: {0}")]
    Arena(#[from] ArenaError),
    #[error("firmware cmdif revision is {found}, this driver speaks {expected}")]
    CmdifRev { found: u16, expected: u16 },
    #[error("command queue geometry log_sz {log_sz}, log_stride {log_stride}: {why}")]
    Geometry {
        log_sz: u32,
        log_stride: u32,
        why: &'static str,
    },
    #[error("firmware over {waited:?} in initializing state (register {value:#010x}), aborting")]
    FwInit { waited: Duration, value: u32 },
    #[error("{}: {why} (input {in_len} bytes, output {out_len} bytes)", opcode_name(*.opcode))]
    BadRequest {
        opcode: u16,
        in_len: usize,
        out_len: usize,
        why: &'static str,
    },
    #[error("{}: no free command slot ({why})", opcode_name(*.opcode))]
    NoSlot { opcode: u16, why: &'static str },
    #[error("{}: out of mailbox blocks ({need} needed, {free} free)", opcode_name(*.opcode))]
    NoMailbox {
        opcode: u16,
        need: usize,
        free: usize,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) delivery failed: {}({status:#x}), err({errno}) {}",
        opcode_name(*.opcode), delivery_name(*.status), errno_name(*.errno)
    )]
    Delivery {
        opcode: u16,
        op_mod: u16,
        status: u8,
        errno: i32,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) failed, status {}({status:#x}), syndrome ({syndrome:#x}), err({errno}) {}",
        opcode_name(*.opcode), status_name(*.status), errno_name(*.errno)
    )]
    Status {
        opcode: u16,
        op_mod: u16,
        status: u8,
        syndrome: u32,
        errno: i32,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) timeout after {elapsed:?}; slot {slot} stays busy until the device completes it",
        opcode_name(*.opcode)
    )]
    Timeout {
        opcode: u16,
        op_mod: u16,
        slot: u8,
        elapsed: Duration,
    },
    #[error("waiting for the command interrupt: {0}")]
    Irq(std::io::Error),
    #[error("event queue: {0}")]
    Eq(#[from] EqError),
    #[error("{0}")]
    State(&'static str),
    #[error("command interface failed earlier: {0}")]
    Aborted(String),
}

impl CmdError {
    /// The negative errno the kernel would return for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            CmdError::Status { errno, .. } | CmdError::Delivery { errno, .. } => *errno,
            CmdError::Timeout { .. } | CmdError::FwInit { .. } => -libc::ETIMEDOUT,
            CmdError::CmdifRev { .. } | CmdError::Geometry { .. } => -libc::EINVAL,
            CmdError::BadRequest { .. } => -libc::EINVAL,
            CmdError::NoSlot { .. } => -libc::EBUSY,
            CmdError::NoMailbox { .. } | CmdError::Eq(EqError::NoPages { .. }) => -libc::ENOMEM,
            CmdError::Vfu(vfu::VfuError::Remote { errno, .. }) => -errno.raw(),
            _ => -libc::EIO,
        }
    }

    /// The command status byte, for `Status` errors.
    pub fn status(&self) -> Option<u8> {
        match self {
            CmdError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn abort_copy(&self) -> CmdError {
        CmdError::Aborted(self.to_string())
    }
}

/// Firmware revision from the init segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwRev {
    pub major: u16,
    pub minor: u16,
    pub sub: u16,
    pub cmdif_rev: u16,
}

impl std::fmt::Display for FwRev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{:04}", self.major, self.minor, self.sub)
    }
}

/// Queue geometry read from `cmdq_addr_l_sz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub log_sz: u32,
    pub log_stride: u32,
}

impl Geometry {
    /// Number of slots.
    pub fn slots(&self) -> usize {
        1 << self.log_sz
    }

    /// Slot reserved for MANAGE_PAGES (the last one); regular commands use the others.
    pub fn pages_slot(&self) -> usize {
        self.slots() - 1
    }

    /// Validates like `mlx5_cmd_enable`; additionally refuses a queue with no regular
    /// slot, on which the kernel would block forever.
    pub fn from_register(reg: u32) -> Result<Self, CmdError> {
        let g = Geometry {
            log_sz: (reg & CMDQ_LOG_SIZE_MASK) >> CMDQ_LOG_SIZE_SHIFT,
            log_stride: (reg & CMDQ_LOG_STRIDE_MASK) >> CMDQ_LOG_STRIDE_SHIFT,
        };
        let bad = |why| CmdError::Geometry {
            log_sz: g.log_sz,
            log_stride: g.log_stride,
            why,
        };
        if (1u32 << g.log_sz) > CMDQ_MAX_ENTRIES {
            return Err(bad("firmware reports too many outstanding commands"));
        }
        if g.log_sz + g.log_stride > CMDQ_MAX_LOG_BYTES {
            return Err(bad("command queue size overflow"));
        }
        if (1usize << g.log_stride) < CMD_ENTRY_SIZE {
            return Err(bad("entry stride smaller than an entry"));
        }
        if g.log_sz == 0 {
            return Err(bad("a single slot leaves no regular command slot"));
        }
        Ok(g)
    }
}

/// How commands complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Polling,
    Events,
}

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

/// A posted command, redeemed with [`CmdIf::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: u8,
    seq: u64,
}

impl Ticket {
    pub fn slot(&self) -> u8 {
        self.slot
    }
}

#[derive(Debug)]
struct InFlight {
    seq: u64,
    token: u8,
    opcode: u16,
    op_mod: u16,
    out_len: usize,
    in_chain: Chain,
    out_chain: Chain,
    posted: Instant,
    deadline: Instant,
}

#[derive(Debug)]
enum Slot {
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

struct Events {
    eq: EventQueue,
    eventfd: EventFd,
}

/// The command interface of one function.
pub struct CmdIf {
    client: Client,
    arena: DmaArena,
    fw: FwRev,
    geometry: Geometry,
    slots: Vec<Slot>,
    next_token: u8,
    next_seq: u64,
    events: Option<Events>,
    timeout: Duration,
    stats: CmdStats,
}

impl std::fmt::Debug for CmdIf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmdIf")
            .field("fw", &self.fw)
            .field("geometry", &self.geometry)
            .field("mode", &self.mode())
            .field("stats", &self.stats)
            .finish()
    }
}

fn read32(client: &mut Client, off: u64) -> Result<u32, CmdError> {
    let mut b = [0u8; 4];
    client.region_read(BAR0, off, &mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn write32(client: &mut Client, off: u64, v: u32) -> Result<(), CmdError> {
    client.region_write(BAR0, off, &v.to_be_bytes())?;
    Ok(())
}

fn wait_initializing(client: &mut Client, limit: Duration) -> Result<(), CmdError> {
    let start = Instant::now();
    loop {
        let v = read32(client, INITIALIZING_OFFSET)?;
        if v & INITIALIZING_BUSY_MASK == 0 {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(CmdError::FwInit {
                waited: start.elapsed(),
                value: v,
            });
        }
        std::thread::sleep(INIT_POLL);
    }
}

impl CmdIf {
    /// Maps the arena into the function, checks the firmware, programs the queue
    /// address and waits for the firmware to leave `initializing` (`mlx5_cmd_enable`
    /// plus `wait_fw_init`). On failure the arena is unmapped again (best effort) and
    /// the connection is dropped.
    pub fn new(mut client: Client, cfg: CmdIfConfig) -> Result<Self, CmdError> {
        let arena = DmaArena::new(cfg.arena)?;
        client.dma_map(
            arena.iova(),
            arena.size(),
            arena.file().as_raw_fd(),
            0,
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        )?;
        match Self::enable(&mut client, &arena, &cfg) {
            Ok((fw, geometry)) => {
                let slots = (0..geometry.slots()).map(|_| Slot::Free).collect();
                tracing::debug!(%fw, ?geometry, queue = format_args!("{:#x}", arena.queue_iova()), "command interface up");
                Ok(CmdIf {
                    client,
                    arena,
                    fw,
                    geometry,
                    slots,
                    next_token: 1,
                    next_seq: 1,
                    events: None,
                    timeout: cfg.timeout,
                    stats: CmdStats::default(),
                })
            }
            Err(e) => {
                let _ = client.dma_unmap(arena.iova(), arena.size());
                Err(e)
            }
        }
    }

    fn enable(
        client: &mut Client,
        arena: &DmaArena,
        cfg: &CmdIfConfig,
    ) -> Result<(FwRev, Geometry), CmdError> {
        let fw_rev = read32(client, FW_REV_OFFSET)?;
        let cmdif = read32(client, CMDIF_REV_FW_SUB_OFFSET)?;
        let fw = FwRev {
            major: (fw_rev & FW_REV_MAJOR_MASK) as u16,
            minor: (fw_rev >> FW_REV_MINOR_SHIFT) as u16,
            sub: (cmdif & FW_SUB_MASK) as u16,
            cmdif_rev: (cmdif >> CMDIF_REV_SHIFT) as u16,
        };
        if fw.cmdif_rev != CMDIF_REV {
            return Err(CmdError::CmdifRev {
                found: fw.cmdif_rev,
                expected: CMDIF_REV,
            });
        }
        wait_initializing(client, cfg.pre_init_timeout)?;
        let geometry = Geometry::from_register(read32(client, CMDQ_ADDR_L_SZ_OFFSET)?)?;
        let q = arena.queue_iova();
        // The queue page is 4 KiB aligned by construction; low bits 0 also request
        // nic_interface FULL_DRIVER.
        write32(client, CMDQ_ADDR_H_OFFSET, (q >> 32) as u32)?;
        write32(client, CMDQ_ADDR_L_SZ_OFFSET, q as u32)?;
        wait_initializing(client, cfg.init_timeout)?;
        Ok((fw, geometry))
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
        client.dma_map(
            arena.iova(),
            arena.size(),
            arena.file().as_raw_fd(),
            0,
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        )?;
        let probe = (|| {
            let fw_rev = read32(&mut client, FW_REV_OFFSET)?;
            let cmdif = read32(&mut client, CMDIF_REV_FW_SUB_OFFSET)?;
            let fw = FwRev {
                major: (fw_rev & FW_REV_MAJOR_MASK) as u16,
                minor: (fw_rev >> FW_REV_MINOR_SHIFT) as u16,
                sub: (cmdif & FW_SUB_MASK) as u16,
                cmdif_rev: (cmdif >> CMDIF_REV_SHIFT) as u16,
            };
            let geometry = Geometry::from_register(read32(&mut client, CMDQ_ADDR_L_SZ_OFFSET)?)?;
            Ok::<_, CmdError>((fw, geometry))
        })();
        match probe {
            Ok((fw, geometry)) => Ok(CmdIf {
                client,
                arena,
                fw,
                geometry,
                slots: (0..geometry.slots()).map(|_| Slot::Free).collect(),
                next_token: 1,
                next_seq: 1,
                events: None,
                timeout,
                stats: CmdStats::default(),
            }),
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
        (self.client, self.arena)
    }

    /// Unmaps the arena and hands the connection back. Commands still in flight are
    /// abandoned; after the unmap the device can no longer write our memory.
    pub fn into_client(mut self) -> (Client, Result<(), CmdError>) {
        let r = self
            .client
            .dma_unmap(self.arena.iova(), self.arena.size())
            .map_err(CmdError::from);
        (self.client, r)
    }

    pub fn fw_rev(&self) -> FwRev {
        self.fw
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn mode(&self) -> Mode {
        if self.events.is_some() {
            Mode::Events
        } else {
            Mode::Polling
        }
    }

    pub fn stats(&self) -> CmdStats {
        self.stats
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the per-command timeout for commands posted from now on.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The vfio-user connection (config space, IRQs, UAR doorbells).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    pub fn arena(&self) -> &DmaArena {
        &self.arena
    }

    pub fn arena_mut(&mut self) -> &mut DmaArena {
        &mut self.arena
    }

    /// The command EQ, in event mode.
    pub fn event_queue(&self) -> Option<&EventQueue> {
        self.events.as_ref().map(|e| &e.eq)
    }

    /// Slots that timed out and are still owned by the device.
    pub fn stuck_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Stuck(_)))
            .count()
    }

    /// Commands posted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Busy(_) | Slot::Done { .. }))
            .count()
    }

    /// Completes commands through `eq` from now on (`mlx5_cmd_use_events`). The EQ must
    /// exist in the firmware and be armed, and `eventfd` be its MSI-X vector's.
    pub fn use_events(&mut self, eq: EventQueue, eventfd: EventFd) -> Result<(), CmdError> {
        if self.events.is_some() {
            return Err(CmdError::State("already in event mode"));
        }
        if eq.eqn().is_none() {
            return Err(CmdError::State("the command EQ was not created"));
        }
        if self.slots.iter().any(|s| matches!(s, Slot::Busy(_))) {
            return Err(CmdError::State(
                "commands in flight while switching to event mode",
            ));
        }
        self.events = Some(Events { eq, eventfd });
        Ok(())
    }

    /// Back to polling (`mlx5_cmd_use_polling`, before DESTROY_EQ of the command EQ);
    /// returns the EQ and its eventfd. Commands in flight are first waited for.
    pub fn use_polling(&mut self) -> Option<(EventQueue, EventFd)> {
        let busy: Vec<Ticket> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Busy(f) => Some(Ticket {
                    slot: i as u8,
                    seq: f.seq,
                }),
                _ => None,
            })
            .collect();
        if !busy.is_empty() {
            // Their results stay in the slots for their tickets.
            let _ = self.progress_until(&busy);
        }
        self.events.take().map(|e| (e.eq, e.eventfd))
    }

    /// Executes one command and returns its `out_len`-byte output.
    pub fn exec(&mut self, input: &[u8], out_len: usize) -> Result<Vec<u8>, CmdError> {
        let t = self.submit(input, out_len)?;
        self.wait(t)
    }

    /// Executes several commands with as many in flight at once as there are slots:
    /// each wave's entries are written first and posted with a single doorbell write.
    /// Returns one result per command, in order.
    pub fn exec_many(&mut self, cmds: &[(&[u8], usize)]) -> Vec<Result<Vec<u8>, CmdError>> {
        let mut results: Vec<Option<Result<Vec<u8>, CmdError>>> =
            (0..cmds.len()).map(|_| None).collect();
        let mut next = 0;
        while next < cmds.len() {
            let mut wave: Vec<(usize, Ticket)> = Vec::new();
            let mut mask = 0u32;
            while next < cmds.len() {
                let (input, out_len) = cmds[next];
                match self.prepare(input, out_len) {
                    Ok(t) => {
                        mask |= 1 << t.slot;
                        wave.push((next, t));
                    }
                    Err(CmdError::NoSlot { .. }) if !wave.is_empty() => break,
                    Err(e) => results[next] = Some(Err(e)),
                }
                next += 1;
            }
            if let Err(e) = self.ring(mask) {
                for (i, t) in &wave {
                    self.abandon(*t);
                    results[*i] = Some(Err(e.abort_copy()));
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
            .map(|r| r.unwrap_or(Err(CmdError::State("command was not executed"))))
            .collect()
    }

    /// Posts one command (entry, mailboxes, doorbell) and returns its ticket.
    pub fn submit(&mut self, input: &[u8], out_len: usize) -> Result<Ticket, CmdError> {
        let t = self.prepare(input, out_len)?;
        if let Err(e) = self.ring(1 << t.slot) {
            self.abandon(t);
            return Err(e);
        }
        Ok(t)
    }

    /// Writes the entry and mailboxes of a command into a free slot without ringing.
    fn prepare(&mut self, input: &[u8], out_len: usize) -> Result<Ticket, CmdError> {
        let opcode = input
            .get(0..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0);
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
        let op_mod = u16::from_be_bytes([input[6], input[7]]);
        self.reap_stuck();
        let slot = self.pick_slot(opcode)?;
        let token = self.next_token;
        self.next_token = if self.next_token == u8::MAX {
            1
        } else {
            self.next_token + 1
        };
        let chain_err = |e: ChainError| match e {
            ChainError::NoBlocks { need, free } => CmdError::NoMailbox { opcode, need, free },
            ChainError::Arena(a) => CmdError::Arena(a),
        };
        let mut in_chain = build_chain(
            &mut self.arena,
            input.len(),
            token,
            Some(&input[INLINE_SIZE..]),
        )
        .map_err(chain_err)?;
        let mut out_chain = match build_chain(&mut self.arena, out_len, token, None) {
            Ok(c) => c,
            Err(e) => {
                free_chain(&mut self.arena, &mut in_chain);
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
        if let Err(err) = self.arena.write(self.entry_iova(slot), &e) {
            free_chain(&mut self.arena, &mut in_chain);
            free_chain(&mut self.arena, &mut out_chain);
            return Err(err.into());
        }
        let now = Instant::now();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots[slot] = Slot::Busy(InFlight {
            seq,
            token,
            opcode,
            op_mod,
            out_len,
            in_chain,
            out_chain,
            posted: now,
            deadline: now + self.timeout,
        });
        self.stats.submitted += 1;
        Ok(Ticket {
            slot: slot as u8,
            seq,
        })
    }

    fn pick_slot(&self, opcode: u16) -> Result<usize, CmdError> {
        let pages = self.geometry.pages_slot();
        if opcode == u16::from(Opcode::ManagePages) {
            return match self.slots[pages] {
                Slot::Free => Ok(pages),
                _ => Err(CmdError::NoSlot {
                    opcode,
                    why: "the MANAGE_PAGES slot is busy",
                }),
            };
        }
        self.slots[..pages]
            .iter()
            .position(|s| matches!(s, Slot::Free))
            .ok_or(CmdError::NoSlot {
                opcode,
                why: "all regular slots are busy",
            })
    }

    fn entry_iova(&self, slot: usize) -> u64 {
        self.arena.queue_iova() + ((slot as u64) << self.geometry.log_stride)
    }

    fn ring(&mut self, mask: u32) -> Result<(), CmdError> {
        if mask == 0 {
            return Ok(());
        }
        write32(&mut self.client, CMD_DBELL_OFFSET, mask)?;
        self.stats.doorbells += 1;
        Ok(())
    }

    /// A prepared command whose doorbell could not be rung: the device never saw it.
    fn abandon(&mut self, t: Ticket) {
        let slot = t.slot as usize;
        if let Slot::Busy(f) = &self.slots[slot] {
            if f.seq == t.seq {
                if let Slot::Busy(mut f) = std::mem::replace(&mut self.slots[slot], Slot::Free) {
                    free_chain(&mut self.arena, &mut f.in_chain);
                    free_chain(&mut self.arena, &mut f.out_chain);
                }
            }
        }
    }

    /// Waits for one posted command.
    pub fn wait(&mut self, t: Ticket) -> Result<Vec<u8>, CmdError> {
        self.wait_all(&[t])
            .pop()
            .unwrap_or(Err(CmdError::State("no result")))
    }

    /// Waits for several posted commands; each has its own deadline.
    pub fn wait_all(&mut self, tickets: &[Ticket]) -> Vec<Result<Vec<u8>, CmdError>> {
        let failure = self.progress_until(tickets).err();
        tickets
            .iter()
            .map(|t| match &failure {
                Some(e) if !self.is_done(*t) => {
                    // The transport failed; the command may or may not have run.
                    self.expire(*t);
                    Err(e.abort_copy())
                }
                _ => self.collect(*t),
            })
            .collect()
    }

    fn is_done(&self, t: Ticket) -> bool {
        matches!(self.slots.get(t.slot as usize), Some(Slot::Done { seq, .. }) if *seq == t.seq)
    }

    fn collect(&mut self, t: Ticket) -> Result<Vec<u8>, CmdError> {
        let slot = t.slot as usize;
        match self.slots.get(slot) {
            Some(Slot::Done { seq, .. }) if *seq == t.seq => {
                match std::mem::replace(&mut self.slots[slot], Slot::Free) {
                    Slot::Done { result, .. } => result,
                    _ => Err(CmdError::State("slot changed under its ticket")),
                }
            }
            Some(Slot::Busy(f)) if f.seq == t.seq => Err(self.expire(t)),
            Some(Slot::Stuck(f)) if f.seq == t.seq => Err(CmdError::Timeout {
                opcode: f.opcode,
                op_mod: f.op_mod,
                slot: t.slot,
                elapsed: f.posted.elapsed(),
            }),
            _ => Err(CmdError::State(
                "ticket does not name a command in flight (already collected?)",
            )),
        }
    }

    /// Turns a busy slot into a stuck one and returns its timeout error.
    fn expire(&mut self, t: Ticket) -> CmdError {
        let slot = t.slot as usize;
        match std::mem::replace(&mut self.slots[slot], Slot::Free) {
            Slot::Busy(f) if f.seq == t.seq => {
                let err = CmdError::Timeout {
                    opcode: f.opcode,
                    op_mod: f.op_mod,
                    slot: t.slot,
                    elapsed: f.posted.elapsed(),
                };
                tracing::warn!(
                    opcode = %opcode_name(f.opcode),
                    op_mod = f.op_mod,
                    slot,
                    "command timeout; will leak the slot until the device completes it"
                );
                self.stats.timeouts += 1;
                self.slots[slot] = Slot::Stuck(f);
                err
            }
            other => {
                self.slots[slot] = other;
                CmdError::State("ticket does not name a command in flight")
            }
        }
    }

    /// Drives completion until every ticket is done or past its deadline.
    fn progress_until(&mut self, tickets: &[Ticket]) -> Result<(), CmdError> {
        let mut idle: u32 = 0;
        loop {
            let mut pending_deadline: Option<Instant> = None;
            let now = Instant::now();
            for t in tickets {
                if let Some(Slot::Busy(f)) = self.slots.get(t.slot as usize) {
                    if f.seq == t.seq {
                        if now >= f.deadline {
                            self.expire(*t);
                        } else {
                            pending_deadline =
                                Some(pending_deadline.map_or(f.deadline, |d| d.min(f.deadline)));
                        }
                    }
                }
            }
            let Some(deadline) = pending_deadline else {
                return Ok(());
            };
            let found = if self.events.is_some() {
                self.progress_events(deadline.saturating_duration_since(now))?
            } else {
                self.progress_polling()?
            };
            if found > 0 {
                idle = 0;
            } else if self.events.is_none() {
                backoff(idle);
                idle = idle.saturating_add(1);
            }
        }
    }

    /// Polling mode: completes every busy slot whose entry is back in software hands.
    fn progress_polling(&mut self) -> Result<usize, CmdError> {
        let mut found = 0;
        for slot in 0..self.slots.len() {
            if matches!(self.slots[slot], Slot::Busy(_)) && self.owned_by_sw(slot)? {
                self.finish(slot);
                self.stats.completed_by_polling += 1;
                found += 1;
            }
        }
        Ok(found)
    }

    fn owned_by_sw(&self, slot: usize) -> Result<bool, CmdError> {
        let so = self
            .arena
            .load_acquire(self.entry_iova(slot) + CMD_STATUS_OWN_OFFSET as u64)?;
        Ok(so & CMD_OWNER_HW == 0)
    }

    /// Event mode: takes EQEs, completes the slots they name, re-arms, and blocks on
    /// the eventfd (at most `max_wait`, in slices) when nothing arrived.
    fn progress_events(&mut self, max_wait: Duration) -> Result<usize, CmdError> {
        let mut found = self.drain_eq()?;
        if found > 0 {
            return Ok(found);
        }
        let fd = match &self.events {
            Some(ev) => ev.eventfd.as_raw_fd(),
            None => return Ok(0),
        };
        let wait = max_wait.min(EVENT_SLICE);
        let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1;
        // the fd belongs to the eventfd we own, which outlives the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(CmdError::Irq(e));
            }
        } else if rc > 0 {
            if let Some(ev) = &self.events {
                match ev.eventfd.read() {
                    Ok(n) => self.stats.interrupts += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(CmdError::Irq(e)),
                }
            }
            found = self.drain_eq()?;
        }
        Ok(found)
    }

    /// Consumes the command EQ, completes the slots named, then updates CI and re-arms;
    /// scans once more after arming so an EQE written before the arm is not missed.
    fn drain_eq(&mut self) -> Result<usize, CmdError> {
        let mut found = 0;
        // Pass 0 takes what is there; pass 1 runs after the arm, for an EQE the device
        // wrote while the EQ was not armed (it raised no interrupt for it).
        for _pass in 0..2 {
            let Some(ev) = self.events.as_mut() else {
                return Ok(found);
            };
            let mut bells: Vec<(u64, [u8; 4])> = Vec::new();
            let eqes = ev.eq.drain(&self.arena, |off, v| bells.push((off, v)))?;
            if eqes.is_empty() {
                break;
            }
            bells.push(ev.eq.doorbell(true));
            self.stats.eqes += eqes.len() as u64;
            for (off, v) in bells {
                self.client.region_write(BAR0, off, &v)?;
            }
            for e in &eqes {
                match e.cmd_vector() {
                    Some(vector) => found += self.complete_vector(vector)?,
                    None => tracing::debug!(
                        event_type = e.event_type(),
                        "ignoring a non-command event on the command EQ"
                    ),
                }
            }
        }
        Ok(found)
    }

    fn complete_vector(&mut self, vector: u32) -> Result<usize, CmdError> {
        let mut found = 0;
        for slot in 0..self.slots.len().min(32) {
            if vector & (1 << slot) == 0 {
                continue;
            }
            match &self.slots[slot] {
                Slot::Busy(_) => {
                    if self.owned_by_sw(slot)? {
                        self.finish(slot);
                        self.stats.completed_by_eqe += 1;
                        found += 1;
                    } else {
                        tracing::warn!(slot, "EQE names a slot the device still owns; ignored");
                    }
                }
                Slot::Stuck(_) => self.reap(slot),
                _ => tracing::warn!(slot, "EQE names a slot with no command; ignored"),
            }
        }
        Ok(found)
    }

    /// Reads the completed entry and output of `slot`, frees its mailboxes and stores
    /// the result for the ticket.
    fn finish(&mut self, slot: usize) {
        let Slot::Busy(mut f) = std::mem::replace(&mut self.slots[slot], Slot::Free) else {
            return;
        };
        let result = self.read_result(slot, &f);
        free_chain(&mut self.arena, &mut f.in_chain);
        free_chain(&mut self.arena, &mut f.out_chain);
        let elapsed = f.posted.elapsed();
        match &result {
            Ok(_) => tracing::debug!(
                opcode = %opcode_name(f.opcode), op_mod = f.op_mod, slot, token = f.token,
                status = 0, syndrome = 0, elapsed_us = elapsed.as_micros() as u64,
                "command completed"
            ),
            Err(CmdError::Status {
                status,
                syndrome,
                errno,
                ..
            }) => tracing::info!(
                opcode = %opcode_name(f.opcode), op_mod = f.op_mod, slot, token = f.token,
                status = format_args!("{}({status:#x})", status_name(*status)),
                syndrome = format_args!("{syndrome:#x}"), errno,
                elapsed_us = elapsed.as_micros() as u64, "command failed"
            ),
            Err(e) => tracing::warn!(
                opcode = %opcode_name(f.opcode), op_mod = f.op_mod, slot, token = f.token,
                error = %e, elapsed_us = elapsed.as_micros() as u64, "command not delivered"
            ),
        }
        self.slots[slot] = Slot::Done { seq: f.seq, result };
    }

    fn read_result(&self, slot: usize, f: &InFlight) -> Result<Vec<u8>, CmdError> {
        let mut e = [0u8; CMD_ENTRY_SIZE];
        self.arena.read(self.entry_iova(slot), &mut e)?;
        let delivery = e[CMD_STATUS_OWN_OFFSET] >> DELIVERY_STATUS_SHIFT;
        if delivery != 0 {
            return Err(CmdError::Delivery {
                opcode: f.opcode,
                op_mod: f.op_mod,
                status: delivery,
                errno: delivery_status_to_errno(delivery),
            });
        }
        let mut out = vec![0u8; f.out_len];
        let inline = entry_out(&e);
        let n = f.out_len.min(INLINE_SIZE);
        out[..n].copy_from_slice(&inline[..n]);
        if f.out_len > INLINE_SIZE {
            read_chain(&self.arena, &f.out_chain, &mut out[INLINE_SIZE..])?;
        }
        let status = out[0];
        if status != 0 {
            return Err(CmdError::Status {
                opcode: f.opcode,
                op_mod: f.op_mod,
                status,
                syndrome: u32::from_be_bytes([out[4], out[5], out[6], out[7]]),
                errno: cmd_status_to_errno(status),
            });
        }
        Ok(out)
    }

    /// Frees stuck slots the device has handed back.
    fn reap_stuck(&mut self) {
        for slot in 0..self.slots.len() {
            if matches!(self.slots[slot], Slot::Stuck(_)) && self.owned_by_sw(slot).unwrap_or(false)
            {
                self.reap(slot);
            }
        }
    }

    fn reap(&mut self, slot: usize) {
        if let Slot::Stuck(mut f) = std::mem::replace(&mut self.slots[slot], Slot::Free) {
            tracing::warn!(
                opcode = %opcode_name(f.opcode), slot,
                "command completion arrived after timeout"
            );
            free_chain(&mut self.arena, &mut f.in_chain);
            free_chain(&mut self.arena, &mut f.out_chain);
            self.stats.late_completions += 1;
        }
    }
}

/// Polling back-off: yield first (the device answers within microseconds), then sleep
/// in growing steps up to 1 ms.
fn backoff(idle: u32) {
    match idle {
        0..=63 => std::thread::yield_now(),
        64..=255 => std::thread::sleep(Duration::from_micros(20)),
        256..=1023 => std::thread::sleep(Duration::from_micros(200)),
        _ => std::thread::sleep(Duration::from_millis(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_validated_like_mlx5_cmd_enable() {
        let g = Geometry::from_register(0x56).unwrap();
        assert_eq!((g.slots(), g.pages_slot(), g.log_stride), (32, 31, 6));
        // nic_interface and address bits do not matter.
        assert_eq!(Geometry::from_register(0xdead_f756).unwrap(), g);
        assert!(Geometry::from_register(0x66).is_err()); // 64 slots
        assert!(Geometry::from_register(0x58).is_err()); // 5 + 8 > 12
        assert!(Geometry::from_register(0x55).is_err()); // 32-byte stride
        assert!(Geometry::from_register(0x06).is_err()); // one slot
        assert!(Geometry::from_register(0x16).is_ok());
    }

    #[test]
    fn errors_carry_the_kernel_errno_and_read_like_its_log() {
        let e = CmdError::Status {
            opcode: 0x100,
            op_mod: 1,
            status: 0x3,
            syndrome: 0x1234,
            errno: cmd_status_to_errno(3),
        };
        assert_eq!(e.errno(), -libc::EINVAL);
        assert_eq!(
            e.to_string(),
            "QUERY_HCA_CAP(0x100)(op_mod 0x1) failed, status BAD_PARAM_ERR(0x3), syndrome (0x1234), err(-22) EINVAL"
        );
        let d = CmdError::Delivery {
            opcode: 0x104,
            op_mod: 0,
            status: 2,
            errno: delivery_status_to_errno(2),
        };
        assert_eq!(d.errno(), -libc::EBADR);
        assert!(d.to_string().contains("TOK_ERR"));
        assert_eq!(opcode_name(0x9999), "UNKNOWN_OPCODE(0x9999)");
    }

    #[test]
    fn new_input_sets_opcode_and_op_mod_big_endian() {
        let m = new_input(Opcode::QueryHcaCap, 0x41, 16);
        assert_eq!(&m[..8], &[0x01, 0x00, 0, 0, 0, 0, 0, 0x41]);
    }
}
