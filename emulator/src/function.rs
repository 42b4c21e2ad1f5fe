//! One PCI function of the adapter (the PF or a VF): its config space, BAR0 and
//! interrupt state, behind one short-held lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use vfu::uapi::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_REQ_IRQ_INDEX,
};
use vfu::{Dma, DmaError, IrqDesc, IrqIndexShape, IrqTable};
use vmm_sys_util::eventfd::EventFd;

use crate::bar0::{Bar0, BAR0_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};
use crate::cmdq::{self, Work};
use crate::devmem::{DevMem, DevMemError, DEFAULT_DEV_MEM_SIZE};
use crate::dma;
use crate::fabric::Fabric;
use crate::fault::{CmdFaults, CmdSite, DmaDir, Fatal, FaultTarget, Injector, StateFilter};
use crate::firmware::{
    comp_eqe, Cmd, CmdRecord, DirtyLog, Env, Firmware, FwCell, HcaState, MigCtl, MigState,
    ObjectCounts, P2pRefusal, P2pSource, Peer, UarAction, UarRefusal, Violation, ViolationKind,
    LOG_BF_REG_SIZE,
};
pub use crate::firmware::{FunctionId, SuspendError, DRAIN_TIMEOUT, MSIX_VECTORS};
use crate::pci::{ConfigParams, ConfigSpace, PciError, INTERRUPT_PIN_NONE};
use crate::state::IsegImage;
use mlx5_prm::iseg::{
    CMDQ_ADDR_H_OFFSET, CMDQ_ADDR_L_SZ_OFFSET, CMD_DBELL_OFFSET, NIC_INTERFACE_SHIFT,
};

/// The mutable state of a function.
pub struct FunctionState {
    pub config: ConfigSpace,
    pub bar0: Bar0,
    pub irqs: IrqTable,
}

/// Why a function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    #[error("bad PCI configuration: {0}")]
    Pci(#[from] PciError),
    #[error("cannot start the firmware worker: {0}")]
    Worker(std::io::Error),
    #[error("bad device memory: {0}")]
    DevMem(#[from] DevMemError),
}

/// Permission to change a function's state, granted by [`Function::admit`] while the
/// function is not responder-suspended. While one is alive, SUSPEND_VHCA(responder)
/// waits; dropping it ends the change.
#[must_use = "the change is admitted only while the admission lives"]
pub struct Admission<'a> {
    f: &'a Function,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.f.work_done();
    }
}

/// One function: identity, state, and the IOVA space its client mapped.
///
/// # Locks
///
/// None is held across socket I/O, a blocking wait or an eventfd write (interrupts are
/// decided under `state` and written after it is released). Outermost first:
///
/// 1. `firmware` ([`FwCell`]: its EQE order lock, then the firmware state; one short
///    command or one phase of a long one). A PF's may be held while a VF's is taken,
///    never the reverse.
/// 2. `state` (config space, BAR0, IRQ table; register-sized work). Never held while
///    `firmware` is taken.
/// 3. Leaves, under which nothing is taken: `mig` (migration control), the fault injector's rules, and
///    the device memory's own locks.
///
/// # Freezing (responder suspend)
///
/// Everything that changes the function's state from outside — a command doorbell (the
/// work it queues on the firmware worker, until that work has run), a UAR doorbell, a
/// write to device memory or to the queue-address registers — first asks
/// [`Function::admit`]. Admission and the suspend state live under the same lock, so
/// SUSPEND_VHCA(responder) ([`Function::freeze`]) sets the state, from which point
/// nothing more is admitted, and then waits until every admitted change has ended.
/// When it completes the function's state cannot change until RESUME_VHCA(responder).
/// What is refused is recorded as a [`Violation`]; see [`Function::command_doorbell`]
/// for what becomes of a refused command doorbell.
pub struct Function {
    pub id: FunctionId,
    state: Mutex<FunctionState>,
    dma: Dma,
    firmware: FwCell,
    fabric: Arc<Fabric>,
    /// The command queue's slot executors.
    cmdq: cmdq::Engine,
    /// Bumped by every FLR / DEVICE_RESET; queued command work from an older epoch is
    /// dropped.
    epoch: AtomicU64,
    /// BAR2.
    devmem: DevMem,
    /// Suspend state, admitted work, save session, violations (a leaf lock).
    mig: Mutex<MigCtl>,
    /// Signalled when the admitted work of `mig` drops to zero.
    mig_idle: Condvar,
    /// The process of the attached client (`SO_PEERCRED`), 0 when none is attached.
    client_pid: std::sync::atomic::AtomicI32,
    /// Commands fetched, DMAs made and initiator suspends asked of this function: the
    /// sequence numbers the fault plan and its log count in.
    cmd_seq: AtomicU64,
    dma_seq: AtomicU64,
    drain_seq: AtomicU64,
    /// Taken for writing by [`Function::reset`], for reading by a LOAD from its last
    /// check to the end of its apply ([`Peer::hold_reset`]): outermost of all.
    reset_gate: RwLock<()>,
    /// Wakes the DMA engine for a QP (a UAR send doorbell, a QP moved to ERR).
    engine: dma::Kicker,
    /// The DMA engine's initiator gate (closed by SUSPEND_VHCA(initiator); a leaf lock).
    gate: dma::Gate,
    /// The pages of this function's DMA writes a PF's page tracker watches (a leaf).
    dirty: DirtyLog,
    /// The PF's page-tracker reporter (`None` on a VF: only the PF tracks).
    reporter: std::sync::OnceLock<dma::Reporter>,
}

impl Function {
    /// A function on its own fabric (tests; an adapter uses [`Function::with_fabric`]).
    pub fn new(id: FunctionId) -> Result<Arc<Self>, FunctionError> {
        Self::with_fabric(id, Arc::new(Fabric::new()))
    }

    /// A function of the adapter whose functions `fabric` lists; registers itself there
    /// and starts its firmware worker.
    pub fn with_fabric(id: FunctionId, fabric: Arc<Fabric>) -> Result<Arc<Self>, FunctionError> {
        Self::with_dev_mem(id, fabric, DEFAULT_DEV_MEM_SIZE)
    }

    /// [`Function::with_fabric`] with `dev_mem` bytes of device memory (BAR2).
    pub fn with_dev_mem(
        id: FunctionId,
        fabric: Arc<Fabric>,
        dev_mem: u64,
    ) -> Result<Arc<Self>, FunctionError> {
        Self::with_vfs(id, fabric, dev_mem, 0)
    }

    /// [`Function::with_dev_mem`] for a PF with `total_vfs` VFs: its config space
    /// carries the SR-IOV capability (TotalVFs, the VFs' BAR sizes). 0 for a VF.
    pub fn with_vfs(
        id: FunctionId,
        fabric: Arc<Fabric>,
        dev_mem: u64,
        total_vfs: u16,
    ) -> Result<Arc<Self>, FunctionError> {
        let devmem = DevMem::new(&format!("mlx5-emu-bar2-{}", id.vhca_id), dev_mem)?;
        let config = ConfigSpace::new(
            id.kind,
            ConfigParams {
                msix_vectors: MSIX_VECTORS,
                bar0_size: BAR0_SIZE,
                bar2_size: Some(dev_mem),
                msix_table_offset: MSIX_TABLE_OFFSET as u32,
                msix_pba_offset: MSIX_PBA_OFFSET as u32,
                total_vfs,
            },
        )?;
        let irqs = IrqTable::new(&Self::irq_shapes(&config));
        let (engine, engine_rx) = dma::channel();
        let short = id.socket_name().trim_end_matches(".sock").to_string();
        let f = Arc::new(Function {
            id,
            state: Mutex::new(FunctionState {
                config,
                bar0: Bar0::new(MSIX_VECTORS),
                irqs,
            }),
            dma: Dma::default(),
            firmware: FwCell::new(id),
            fabric,
            cmdq: cmdq::Engine::new(format!("fw-{short}")),
            epoch: AtomicU64::new(0),
            devmem,
            mig: Mutex::new(MigCtl::default()),
            mig_idle: Condvar::new(),
            client_pid: std::sync::atomic::AtomicI32::new(0),
            cmd_seq: AtomicU64::new(0),
            dma_seq: AtomicU64::new(0),
            drain_seq: AtomicU64::new(0),
            reset_gate: RwLock::new(()),
            engine,
            gate: dma::Gate::default(),
            dirty: DirtyLog::default(),
            reporter: std::sync::OnceLock::new(),
        });
        let host: std::sync::Weak<dyn cmdq::Host> = Arc::downgrade(&f) as _;
        f.cmdq.attach(host);
        let host: std::sync::Weak<dyn dma::Host> = Arc::downgrade(&f) as _;
        dma::spawn(host.clone(), engine_rx, format!("dma-{short}"))
            .map_err(FunctionError::Worker)?;
        if id.kind == crate::pci::FunctionKind::Pf {
            let r = dma::spawn_reporter(host, format!("pgtrack-{short}"))
                .map_err(FunctionError::Worker)?;
            let _ = f.reporter.set(r);
        }
        let peer: Arc<dyn Peer> = Arc::clone(&f) as _;
        f.fabric.register(&peer);
        let target: Arc<dyn FaultTarget> = Arc::clone(&f) as _;
        f.fabric.faults().register(&target);
        Ok(f)
    }

    fn irq_shapes(config: &ConfigSpace) -> Vec<IrqIndexShape> {
        (0..VFIO_PCI_NUM_IRQS)
            .map(|i| {
                let d = Self::irq_desc_for(config, i);
                IrqIndexShape {
                    count: d.count,
                    maskable: d.flags & VFIO_IRQ_INFO_MASKABLE != 0,
                }
            })
            .collect()
    }

    /// The IRQ index as DEVICE_GET_IRQ_INFO reports it.
    fn irq_desc_for(config: &ConfigSpace, index: u32) -> IrqDesc {
        match index {
            // A VF has no INTx pin (as SR-IOV VFs); the PF has INTA.
            VFIO_PCI_INTX_IRQ_INDEX if config.interrupt_pin() != INTERRUPT_PIN_NONE => IrqDesc {
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                count: 1,
            },
            VFIO_PCI_INTX_IRQ_INDEX | VFIO_PCI_MSI_IRQ_INDEX => IrqDesc {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 0,
            },
            VFIO_PCI_MSIX_IRQ_INDEX => IrqDesc {
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                count: MSIX_VECTORS as u32,
            },
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => IrqDesc {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 1,
            },
            _ => IrqDesc::default(),
        }
    }

    pub fn irq_desc(&self, index: u32) -> IrqDesc {
        Self::irq_desc_for(&self.lock().config, index)
    }

    /// The state lock. Held only for register-sized work, never across I/O.
    pub fn lock(&self) -> MutexGuard<'_, FunctionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dma(&self) -> &Dma {
        &self.dma
    }

    /// The firmware lock. Held for one short command, one phase of a long one or one
    /// doorbell update. A PF may take a VF's while holding its own (never the reverse).
    pub fn firmware(&self) -> MutexGuard<'_, Firmware> {
        self.firmware.lock()
    }

    /// The adapter's functions.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// Device memory (BAR2).
    pub fn devmem(&self) -> &DevMem {
        &self.devmem
    }

    /// The migration control (a leaf lock: take nothing while holding it).
    pub fn migration(&self) -> MutexGuard<'_, MigCtl> {
        self.mig.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn migration_state(&self) -> MigState {
        self.migration().state()
    }

    /// Writes refused while the function was responder-suspended, oldest first.
    pub fn violations(&self) -> Vec<Violation> {
        self.migration().violations()
    }

    /// Violations ever recorded here (the log keeps the last
    /// [`crate::firmware::VIOLATION_LOG_CAPACITY`]).
    pub fn violations_total(&self) -> u64 {
        self.migration().violations_total()
    }

    /// Who is behind a write that reached this function's socket.
    fn writer(&self) -> String {
        format!("client of {}", self.id.socket_name())
    }

    /// Asks to change the function's state (a write at BAR `address`). Refused while the
    /// function is responder-suspended: the attempt is then recorded as a [`Violation`]
    /// and `None` is returned, and the caller must change nothing.
    pub fn admit(&self, kind: ViolationKind, address: u64, len: usize) -> Option<Admission<'_>> {
        let attempt =
            Violation::by_client(kind, self.writer(), self.id.vhca_id, address, len as u64);
        self.admit_attempt(attempt)
    }

    /// [`Function::admit`] for any attempt (a P2P write names its writer function).
    pub fn admit_attempt(&self, attempt: Violation) -> Option<Admission<'_>> {
        let admitted = self.migration().admit(attempt);
        // Built only when admitted: dropping one ends an admission.
        admitted.then(|| Admission { f: self })
    }

    /// Admitted work items not yet finished (queued or executing commands, writes in
    /// progress).
    pub fn work_in_flight(&self) -> usize {
        self.migration().inflight()
    }

    /// Ends one admitted work item.
    pub(crate) fn work_done(&self) {
        if self.migration().release() {
            self.mig_idle.notify_all();
        }
    }

    /// SUSPEND_VHCA(initiator): Running to InitiatorSuspended.
    ///
    /// The function must stop issuing new (P2P) DMA, and what it has in flight must
    /// finish first. Its command queue keeps running: the queue's DMA is the device
    /// fetching the guest's own commands from system memory, which is not P2P, and the
    /// uAPI says a RUNNING_P2P device "otherwise behaves as running" (a real ConnectX
    /// keeps its command interface up while initiator-suspended). Stopping it here would
    /// strand a command the guest rang just before the VMM paused it: its slot would stay
    /// hardware-owned in guest memory and migrate that way to a destination that never
    /// saw the doorbell. Instead, [`Function::freeze`] drains it.
    ///
    /// The DMA engine is what stops: its gate closes, so no new WQE starts (a P2P write
    /// included), and this waits (at most [`DRAIN_TIMEOUT`]) until the WQEs already
    /// started have completed, CQEs written. If they do not, the function goes back to
    /// Running and the suspend fails.
    pub fn suspend_initiator(&self) -> Result<(), SuspendError> {
        let seq = self.drain_seq.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(d) = self.faults().on_drain(self.id.vhca_id, seq) {
            // A slower drain of in-flight initiator work: the function keeps running
            // (and initiating) that much longer.
            tracing::info!(vhca_id = self.id.vhca_id, delay = ?d, "initiator suspend drain slowed by the fault plan");
            std::thread::sleep(d);
        }
        self.transition(MigState::Running, MigState::InitiatorSuspended)?;
        if let Err(inflight) = self.gate.stop(DRAIN_TIMEOUT) {
            tracing::warn!(
                vhca_id = self.id.vhca_id,
                inflight,
                "initiator suspend: WQEs did not drain; back to running"
            );
            let _ = self.transition(MigState::InitiatorSuspended, MigState::Running);
            return Err(SuspendError::DrainTimeout { inflight });
        }
        Ok(())
    }

    /// RESUME_VHCA(initiator): InitiatorSuspended to Running. The DMA engine starts
    /// again: every QP is looked at, so work posted while it was stopped, or loaded
    /// with a state image, runs now.
    pub fn resume_initiator(&self) -> Result<(), SuspendError> {
        self.transition(MigState::InitiatorSuspended, MigState::Running)?;
        self.gate.start();
        for qpn in self.firmware().qpns() {
            self.engine.kick(qpn);
        }
        Ok(())
    }

    /// The DMA engine's initiator gate.
    pub fn dma_gate(&self) -> &dma::Gate {
        &self.gate
    }

    fn transition(&self, from: MigState, to: MigState) -> Result<(), SuspendError> {
        self.migration().transition(from, to)
    }

    /// SUSPEND_VHCA(responder): InitiatorSuspended to ResponderSuspended, completing
    /// only when the function's state can no longer change. From the moment the state is
    /// set, nothing new is admitted; then this waits (at most `timeout`) until every
    /// change admitted before has ended — in particular until the command work already
    /// queued on the firmware worker has executed and completed. If that does not happen
    /// in time the function goes back to InitiatorSuspended (doorbells refused meanwhile
    /// are rung) and the suspend fails.
    pub fn freeze(&self, timeout: Duration) -> Result<(), SuspendError> {
        let deadline = Instant::now() + timeout;
        let mut m = self.migration();
        m.transition(MigState::InitiatorSuspended, MigState::ResponderSuspended)?;
        while m.inflight() > 0 {
            let now = Instant::now();
            if now >= deadline {
                let inflight = m.inflight();
                m.set_state(MigState::InitiatorSuspended);
                let parked = m.unpark();
                drop(m);
                self.send_work(parked);
                tracing::warn!(
                    vhca_id = self.id.vhca_id,
                    inflight,
                    "responder suspend: work did not drain; back to initiator-suspended"
                );
                return Err(SuspendError::DrainTimeout { inflight });
            }
            m = self
                .mig_idle
                .wait_timeout(m, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // An FLR during the wait puts the function back to Running.
        if m.state() != MigState::ResponderSuspended {
            return Err(SuspendError::Reset);
        }
        // Stores through a client's mapping of BAR2 must not change a frozen function
        // either: the device goes on with its own copy. Done under `mig`, so a reset
        // (which takes `mig` too) comes wholly before or after.
        self.devmem.freeze();
        Ok(())
    }

    /// RESUME_VHCA(responder): ResponderSuspended to InitiatorSuspended. Command
    /// doorbells refused while frozen are rung now (see [`Function::command_doorbell`]).
    pub fn thaw(&self) -> Result<(), SuspendError> {
        let parked = {
            let mut m = self.migration();
            let parked = m.thaw()?;
            let restored = self.devmem.thaw();
            if restored != 0 {
                tracing::debug!(
                    vhca_id = self.id.vhca_id,
                    pages = restored,
                    "device memory back in the client's mapping; pages that differed restored"
                );
            }
            parked
        };
        if parked != 0 {
            tracing::info!(
                vhca_id = self.id.vhca_id,
                mask = format_args!("{parked:#x}"),
                "ringing command doorbells refused while frozen"
            );
        }
        self.send_work(parked);
        Ok(())
    }

    /// The adapter's fault plan.
    pub fn faults(&self) -> &Arc<Injector> {
        self.fabric.faults()
    }

    /// What the fault plan does to `cmd`, the function's next command: (its sequence
    /// number, the faults).
    pub(crate) fn command_faults(&self, cmd: &Cmd<'_>) -> (u64, CmdFaults) {
        let seq = self.cmd_seq.fetch_add(1, Ordering::AcqRel) + 1;
        let vhca_id = cmd.target_vhca_id(self.id.vhca_id);
        let state = if vhca_id == self.id.vhca_id {
            self.migration_state()
        } else {
            self.fabric
                .by_vhca_id(vhca_id)
                .map_or(MigState::Running, |p| p.migration().state())
        };
        let faults = self.faults().on_command(&CmdSite {
            function: self.id.vhca_id,
            vhca_id,
            opcode: cmd.opcode,
            op_mod: cmd.op_mod,
            seq,
            state: state_filter(state),
        });
        (seq, faults)
    }

    /// Firmware fatal (`Some`) or recovered (`None`), as the fault plan sets it.
    pub fn set_fatal(&self, fatal: Option<Fatal>) {
        let mut s = self.lock();
        match fatal {
            Some(f) => {
                s.bar0.set_health_syndrome(f.syndrome, f.ext_syndrome);
                s.bar0.freeze_health_counter(true);
                s.bar0.set_all_ones(f.all_ones);
            }
            None => {
                s.bar0.clear_health();
                s.bar0.freeze_health_counter(false);
                s.bar0.set_all_ones(false);
            }
        }
        tracing::warn!(vhca_id = self.id.vhca_id, ?fatal, "firmware health");
    }

    /// The process of the attached client, if one is attached and the kernel said.
    pub fn client_pid(&self) -> Option<i32> {
        let pid = self.client_pid.load(Ordering::Acquire);
        (pid > 0).then_some(pid)
    }

    /// A client attached (`pid` from `SO_PEERCRED`) or detached (`None`).
    pub fn set_client_pid(&self, pid: Option<i32>) {
        self.client_pid.store(pid.unwrap_or(0), Ordering::Release);
    }

    /// The function whose device memory `file` is (a client mapping that memfd), if any
    /// of the adapter's.
    pub fn devmem_owner(&self, file: &std::fs::File) -> Option<Arc<dyn Peer>> {
        self.fabric.find(|p| p.devmem().is_backed_by(file))
    }

    /// The function whose BAR2, as the client programmed it, holds `iova..iova+size`
    /// entirely, if its client is the process that is our client (one VMM: one guest
    /// address space). `None` when the processes cannot be told apart.
    pub fn bar2_owner(&self, iova: u64, size: u64) -> Option<(Arc<dyn Peer>, u64)> {
        let pid = self.client_pid()?;
        let end = iova.checked_add(size)?;
        let owner = self.fabric.find(|p| {
            p.client_pid() == Some(pid)
                && p.bar2_address().is_some_and(|base| {
                    iova >= base && end <= base.saturating_add(p.devmem().size())
                })
        })?;
        let base = owner.bar2_address()?;
        Some((owner, iova - base))
    }

    /// The reset epoch (see [`crate::cmdq`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// How many EQs, UARs, PDs, mkeys and pages the firmware holds.
    pub fn object_counts(&self) -> ObjectCounts {
        self.firmware().object_counts()
    }

    /// The last commands executed or refused (at most
    /// [`crate::firmware::CMD_LOG_CAPACITY`]), oldest first.
    pub fn command_log(&self) -> Vec<CmdRecord> {
        self.firmware().command_log()
    }

    /// The HCA life-cycle state.
    pub fn hca_state(&self) -> HcaState {
        self.firmware().state()
    }

    /// `cmd_dbell` was written with `mask`: queue the slots for the firmware worker.
    /// Returns at once.
    ///
    /// While the function is responder-suspended the doorbell is refused: recorded as a
    /// [`Violation`], nothing fetched, executed or written, so the slots stay owned by
    /// hardware in guest memory. Completing them with an error instead would itself be a
    /// DMA write (status, and perhaps an EQE and an MSI-X) by a stopped device, which the
    /// uAPI forbids in STOP. The rung slots are remembered outside the function's state
    /// (not part of any image, cleared by reset) and rung at RESUME_VHCA(responder), as a
    /// frozen device that latched the doorbell would do: the guest then sees a late
    /// completion, not a lost one. A slot software took back meanwhile is skipped then
    /// (its ownership bit is 0).
    pub fn command_doorbell(&self, mask: u32) {
        let attempt = Violation::by_client(
            ViolationKind::CommandDoorbell,
            self.writer(),
            self.id.vhca_id,
            CMD_DBELL_OFFSET,
            4,
        );
        let admitted = self.migration().admit_doorbell(mask, attempt);
        if admitted {
            self.send_work(mask);
        }
    }

    /// Hands `mask` to the slot executors; the caller has admitted it (one work item,
    /// ended when the last slot it rang has finished). A zero mask queues nothing.
    fn send_work(&self, mask: u32) {
        if mask == 0 {
            return;
        }
        let cmdq = self.lock().bar0.cmdq_address();
        let events = self.firmware.cmd_events();
        let work = Work {
            mask,
            cmdq,
            events,
            epoch: self.epoch(),
        };
        tracing::debug!(
            vhca_id = self.id.vhca_id,
            mask = format_args!("{mask:#x}"),
            events,
            "command doorbell"
        );
        self.cmdq.ring(work);
    }

    /// A 4-byte write to UAR page `page`: EQ arm / consumer-index doorbells, the CQ arm
    /// doorbell, and the send doorbell of a QP (the second word of a doorbell /
    /// BlueFlame register, which carries `qpn << 8 | ds`): the QP is handed to the DMA
    /// engine, which reads how far to go from the QP's doorbell record. The other words
    /// of the doorbell / BlueFlame registers carry nothing the device needs.
    pub fn uar_write(&self, page: u32, offset: u32, value: u32) {
        let address = u64::from(page) * crate::bar0::UAR_PAGE_SIZE + u64::from(offset);
        let Some(_admitted) = self.admit(ViolationKind::UarDoorbell, address, 4) else {
            return;
        };
        let bf_size = 1u32 << LOG_BF_REG_SIZE;
        let bf = mlx5_prm::wqe::UAR_BF_OFFSET;
        if (bf..bf + 2 * bf_size).contains(&offset) {
            if (offset - bf) % bf_size != 4 {
                return;
            }
            let qpn = value >> 8;
            let mut fw = self.firmware();
            if fw.qp(qpn).is_some_and(|q| q.uar == page) {
                drop(fw);
                self.engine.kick(qpn);
            } else if !fw.has_uar(page) {
                fw.refuse_uar_write(page, offset, value, UarRefusal::NoUar { page });
            } else {
                fw.refuse_uar_write(page, offset, value, UarRefusal::NoQp { qpn, page });
            }
            return;
        }
        let action = self.firmware().uar_write(page, offset, value);
        match action {
            Some(UarAction::Raise(v)) => {
                self.raise_msix(v);
            }
            Some(UarAction::CqEvent { eqn, cqn }) => {
                self.firmware.post_eqe(self, eqn, comp_eqe(cqn));
            }
            None => {}
        }
    }

    /// Raises MSI-X `vector`: delivered through its eventfd when MSI-X is enabled and
    /// not function-masked and the VMM gave an eventfd; otherwise its PBA bit is set.
    /// Decided under the state lock, written after it.
    pub fn raise_msix(&self, vector: u16) -> bool {
        let fd = self.lock().msix_trigger(vector);
        fire(fd)
    }

    /// Delivers pending vectors that became deliverable (MSI-X enabled, function
    /// unmasked, eventfd assigned), as the PCI spec has a device do on unmask; the
    /// eventfds are written after the state lock is released.
    pub fn flush_pending(&self) {
        let fds = self.lock().flush_pending();
        for fd in fds {
            fire(Some(fd));
        }
    }

    /// The client went away: its interrupt fds are dropped, and device memory moves to
    /// a fresh memfd, so whatever the departed client still maps or holds of BAR2 is no
    /// longer this function's memory (see [`DevMem`]).
    pub fn detach_client(&self) {
        self.lock().irqs.clear();
        if let Err(e) = self.devmem.detach() {
            tracing::error!(
                vhca_id = self.id.vhca_id,
                error = %e,
                "cannot move device memory to a fresh memfd; the departed client can still reach it"
            );
        }
    }

    /// FLR or DEVICE_RESET: the function returns to its power-on state. The VMM's
    /// eventfds and DMA maps stay: they belong to the VMM, not to the function.
    pub fn reset(&self) {
        let _gate = self.reset_gate.write().unwrap_or_else(|p| p.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // A PF's trackers go with its firmware: their VFs stop marking.
        let tracked = self.firmware.lock().page_track_targets();
        self.firmware.reset();
        for (vhca_id, obj_id) in tracked {
            if let Some(log) = self.fabric.by_vhca_id(vhca_id) {
                if let Some(l) = log.dirty_log() {
                    l.stop(obj_id);
                }
            }
        }
        {
            // One step under `mig`: a freeze or thaw is wholly before or after.
            let mut m = self.migration();
            m.reset();
            self.devmem.reset();
        }
        let mut s = self.lock();
        s.config.reset();
        s.bar0.reset();
        tracing::info!(
            vhca_id = self.id.vhca_id,
            "function reset to power-on state"
        );
    }
}

impl Function {
    /// A DMA write by the function (by a work request of QP `qpn` if given): the fault
    /// plan first, then the IOVA space (a P2P window records the QP).
    fn write_dma(&self, iova: u64, data: &[u8], qpn: Option<u32>) -> Result<(), DmaError> {
        let seq = self.dma_seq.fetch_add(1, Ordering::AcqRel) + 1;
        if self.faults().on_dma(self.id.vhca_id, DmaDir::Write, seq) {
            return Err(injected_dma_fault(iova, data.len()));
        }
        self.dma.write_by(iova, data, qpn)?;
        self.dirty.mark(iova, data.len());
        self.faults().dma_written(iova, data.len());
        Ok(())
    }
}

impl Env for Function {
    fn id(&self) -> FunctionId {
        self.id
    }

    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let seq = self.dma_seq.fetch_add(1, Ordering::AcqRel) + 1;
        if self.faults().on_dma(self.id.vhca_id, DmaDir::Read, seq) {
            return Err(injected_dma_fault(iova, buf.len()));
        }
        self.dma.read(iova, buf)
    }

    fn dma_writable(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        self.dma.check_writable(iova, len)
    }

    fn dma_direct(
        &self,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<Option<vfu::Direct>, DmaError> {
        // A fault plan counts and hits DMAs one call at a time: keep its calls.
        if self.faults().armed() {
            return Ok(None);
        }
        self.dma.direct(iova, len, write)
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.write_dma(iova, data, None)
    }

    fn dma_write_by(&self, iova: u64, data: &[u8], qpn: u32) -> Result<(), DmaError> {
        self.write_dma(iova, data, Some(qpn))
    }

    fn raise_msix(&self, vector: u16) -> bool {
        Function::raise_msix(self, vector)
    }

    fn epoch(&self) -> u64 {
        Function::epoch(self)
    }

    fn dma_kick(&self, qpn: u32) {
        self.engine.kick(qpn);
    }

    fn peer(&self, vhca_id: u16) -> Option<Arc<dyn Peer>> {
        self.fabric.by_vhca_id(vhca_id)
    }

    fn page_report(&self, job: crate::firmware::ReportJob) -> bool {
        self.reporter.get().is_some_and(|r| r.submit(job))
    }
}

impl dma::Host for Function {
    fn env(&self) -> &dyn Env {
        self
    }

    fn firmware(&self) -> &FwCell {
        &self.firmware
    }

    fn gate(&self) -> &dma::Gate {
        &self.gate
    }
}

impl Peer for Function {
    fn id(&self) -> FunctionId {
        self.id
    }

    fn firmware(&self) -> MutexGuard<'_, Firmware> {
        self.firmware.lock()
    }

    fn post_eqe(&self, eqn: u8, eqe: [u8; mlx5_prm::cmd::eq::EQE_SIZE]) -> bool {
        self.firmware.post_eqe(self, eqn, eqe)
    }

    fn install_firmware(&self, fw: Firmware) {
        self.firmware.install(fw);
        // Loaded QPs may hold posted WQEs: the engine looks at each (it parks them while
        // the function is initiator-suspended; RESUME_VHCA(initiator) runs them).
        for qpn in self.firmware().qpns() {
            self.engine.kick(qpn);
        }
    }

    fn migration(&self) -> MutexGuard<'_, MigCtl> {
        Function::migration(self)
    }

    fn suspend_initiator(&self) -> Result<(), SuspendError> {
        Function::suspend_initiator(self)
    }

    fn resume_initiator(&self) -> Result<(), SuspendError> {
        Function::resume_initiator(self)
    }

    fn freeze(&self, timeout: Duration) -> Result<(), SuspendError> {
        Function::freeze(self, timeout)
    }

    fn thaw(&self) -> Result<(), SuspendError> {
        Function::thaw(self)
    }

    fn devmem(&self) -> &DevMem {
        &self.devmem
    }

    fn iseg(&self) -> IsegImage {
        let s = self.lock();
        IsegImage {
            cmdq_address: s.bar0.cmdq_address(),
            nic_interface: s.bar0.nic_interface(),
        }
    }

    fn load_iseg(&self, iseg: &IsegImage) {
        // The queue address and nic_interface as the source's driver programmed them
        // (register writes: big-endian words, as the driver writes them).
        let addr = iseg.cmdq_address;
        let low = (addr as u32) | (u32::from(iseg.nic_interface) << NIC_INTERFACE_SHIFT);
        let mut s = self.lock();
        let _ = s
            .bar0
            .write(CMDQ_ADDR_H_OFFSET, &((addr >> 32) as u32).to_be_bytes());
        let _ = s.bar0.write(CMDQ_ADDR_L_SZ_OFFSET, &low.to_be_bytes());
    }

    fn epoch(&self) -> u64 {
        Function::epoch(self)
    }

    fn p2p_write(&self, from: P2pSource, offset: u64, data: &[u8]) -> Result<(), P2pRefusal> {
        if dma_admission::held(self) {
            // Part of a request this function already admitted (an engine serving a
            // peer's QP writes through this function's own window onto its BAR2): the
            // admission was the decision, and a responder suspend that began since is
            // waiting for exactly this write to land. Refusing it here would cut the
            // admitted request in two.
            return self
                .devmem
                .write(offset, data)
                .map_err(|_| P2pRefusal::OutOfRange);
        }
        let attempt = Violation::p2p(
            from.vhca_id,
            from.qpn,
            self.id.vhca_id,
            offset,
            data.len() as u64,
        );
        let Some(_admitted) = self.admit_attempt(attempt) else {
            let seq = self.migration().last_violation_seq().unwrap_or(0);
            return Err(P2pRefusal::Frozen { seq });
        };
        self.devmem
            .write(offset, data)
            .map_err(|_| P2pRefusal::OutOfRange)
    }

    fn client_pid(&self) -> Option<i32> {
        Function::client_pid(self)
    }

    fn bar2_address(&self) -> Option<u64> {
        self.lock().config.bar2_address()
    }

    fn hold_reset(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.reset_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        Env::dma_read(self, iova, buf)
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        Env::dma_write(self, iova, data)
    }

    fn dma_kick(&self, qpn: u32) {
        self.engine.kick(qpn);
    }

    fn admit_dma(&self, writer: P2pSource, address: u64, len: u64) -> bool {
        let mut attempt = Violation::p2p(writer.vhca_id, writer.qpn, self.id.vhca_id, address, len);
        attempt.kind = ViolationKind::PeerDma;
        let who = attempt.writer.clone();
        let admitted = self.migration().admit(attempt);
        if admitted {
            dma_admission::enter(self);
        }
        if !admitted {
            tracing::warn!(
                vhca_id = self.id.vhca_id,
                writer = %who,
                address = format_args!("{address:#x}"),
                len,
                "DMA request into a responder-suspended function refused"
            );
        }
        admitted
    }

    fn dirty_log(&self) -> Option<&DirtyLog> {
        Some(&self.dirty)
    }

    fn end_dma(&self) {
        dma_admission::leave(self);
        self.work_done();
    }
}

/// The functions into which the current thread holds a [`Peer::admit_dma`] admission.
///
/// A DMA engine serving a peer QP's request is admitted by the target function once,
/// then writes through the target's DMA path; when that path is a window onto the
/// target's own BAR2 the write comes back to the target as a P2P write. It must not be
/// admitted a second time: a responder suspend that started meanwhile is draining this
/// very request. Admission and its end run on the same (engine) thread, so a
/// thread-local list is exact. Keyed by the function's address, not its vhca_id, which
/// repeats across adapters in one process.
mod dma_admission {
    use std::cell::RefCell;

    use super::Function;

    thread_local! {
        static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    fn key(f: &Function) -> usize {
        f as *const Function as usize
    }

    pub(super) fn enter(f: &Function) {
        HELD.with(|h| h.borrow_mut().push(key(f)));
    }

    pub(super) fn leave(f: &Function) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|k| *k == key(f)) {
                h.swap_remove(i);
            }
        });
    }

    pub(super) fn held(f: &Function) -> bool {
        HELD.with(|h| h.borrow().contains(&key(f)))
    }
}

impl cmdq::Host for Function {
    fn dma(&self) -> &Dma {
        &self.dma
    }

    fn env(&self) -> &dyn Env {
        self
    }

    fn firmware(&self) -> &FwCell {
        &self.firmware
    }

    fn command_faults(&self, cmd: &Cmd<'_>) -> (u64, CmdFaults) {
        Function::command_faults(self, cmd)
    }

    fn fatal(&self, fatal: Fatal) {
        self.set_fatal(Some(fatal));
    }

    fn flr(&self) {
        self.reset();
    }

    fn record(&self, r: CmdRecord) {
        self.firmware.lock().record(r);
    }

    fn work_done(&self) {
        Function::work_done(self);
    }
}

impl FunctionState {
    fn msix_deliverable(&self, vector: u16) -> bool {
        self.config.msix_enabled()
            && !self.config.msix_function_masked()
            && self
                .irqs
                .has_eventfd(VFIO_PCI_MSIX_IRQ_INDEX, vector as u32)
    }

    /// Decides MSI-X `vector`: the eventfd to write (after this lock is released; see
    /// [`Function::raise_msix`]) if it is deliverable, else `None` with its PBA bit set.
    pub fn msix_trigger(&mut self, vector: u16) -> Option<Arc<EventFd>> {
        let fd = if self.msix_deliverable(vector) {
            self.irqs
                .prepare_trigger(VFIO_PCI_MSIX_IRQ_INDEX, vector as u32)
        } else {
            None
        };
        // Undelivered interrupts wait in the PBA until the vector becomes deliverable.
        self.bar0.msix_mut().set_pending(vector, fd.is_none());
        fd
    }

    /// The pending vectors that became deliverable, their PBA bits cleared: the
    /// eventfds to write once this lock is released ([`Function::flush_pending`]).
    #[must_use = "the interrupts are delivered only when the eventfds are written"]
    pub fn flush_pending(&mut self) -> Vec<Arc<EventFd>> {
        let ready: Vec<u16> = (0..MSIX_VECTORS)
            .filter(|&v| self.bar0.msix().pending(v) && self.msix_deliverable(v))
            .collect();
        ready
            .into_iter()
            .filter_map(|v| self.msix_trigger(v))
            .collect()
    }
}

impl FaultTarget for Function {
    fn vhca_id(&self) -> u16 {
        self.id.vhca_id
    }

    fn set_fatal(&self, fatal: Option<Fatal>) {
        Function::set_fatal(self, fatal);
    }
}

/// The fault plan's name for a migration state.
fn state_filter(s: MigState) -> StateFilter {
    match s {
        MigState::Running => StateFilter::Running,
        MigState::InitiatorSuspended => StateFilter::InitiatorSuspended,
        MigState::ResponderSuspended => StateFilter::ResponderSuspended,
    }
}

/// The error of a DMA the fault plan made fail: the IOMMU refused it.
fn injected_dma_fault(iova: u64, len: usize) -> DmaError {
    DmaError::NotMapped {
        iova,
        len: len as u64,
    }
}

/// Writes an interrupt decided under a lock; true if there was one to write.
fn fire(fd: Option<Arc<EventFd>>) -> bool {
    match fd {
        Some(fd) => {
            vfu::irq::write_eventfd(&fd);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{Instead, Rule};
    use crate::firmware::Cmd;
    use mlx5_prm::cmd::migration::IN_VHCA_ID;
    use mlx5_prm::ifc::{hdr, set};
    use mlx5_prm::Opcode;

    fn input(op: Opcode, vhca_id: u16) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        set(&mut m, hdr::OPCODE, u64::from(u16::from(op)));
        set(&mut m, IN_VHCA_ID, u64::from(vhca_id));
        m
    }

    #[test]
    fn command_rules_match_the_target_function_and_its_migration_state() {
        let pf = Function::new(FunctionId::pf()).unwrap();
        let d = Duration::from_millis(7);
        pf.faults()
            .add(&[
                Rule::new("hold", "delay")
                    .opcode(Opcode::SuspendVhca)
                    .vhca_id(2)
                    .times(2)
                    .delay(d),
                Rule::new("stopped", "hang").state("responder_suspended"),
            ])
            .unwrap();
        let to1 = input(Opcode::SuspendVhca, 1);
        let to2 = input(Opcode::SuspendVhca, 2);
        let f = |m: &[u8]| pf.command_faults(&Cmd::new(m, 16));
        assert_eq!(f(&to1).1.delay, None, "other target");
        assert_eq!(f(&to2).1.delay, Some(d));
        assert_eq!(f(&to2).1.delay, Some(d));
        let (seq, last) = f(&to2);
        assert_eq!((seq, last.delay), (4, None), "times used up");
        pf.suspend_initiator().unwrap();
        pf.freeze(DRAIN_TIMEOUT).unwrap();
        // The PF itself is now responder-suspended: its own commands match.
        let issi = input(Opcode::QueryIssi, 0);
        assert_eq!(f(&issi).1.instead, Some(Instead::Hang));
        assert_eq!(pf.faults().log().total(), 3);
    }
}

/// The suspend, freeze and admission behaviour of a real function (the firmware's
/// view of it is tested with fakes in `firmware/`).
#[cfg(test)]
mod freeze_tests {
    use super::*;
    use crate::firmware::test_support::populated;

    fn frozen(f: &Function) {
        f.suspend_initiator().unwrap();
        f.freeze(DRAIN_TIMEOUT).unwrap();
    }

    #[test]
    fn responder_suspended_function_refuses_and_records_doorbells() {
        let vf = Function::new(FunctionId::vf(0)).unwrap();
        vf.firmware.install(populated(vf.id));
        vf.command_doorbell(1);
        vf.uar_write(3, 0x40, 3 | 1 << 24);
        assert!(vf.violations().is_empty(), "running: nothing refused");
        frozen(&vf);
        vf.command_doorbell(1);
        vf.uar_write(3, 0x48, 4 | 1 << 24);
        let v = vf.violations();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].kind, ViolationKind::CommandDoorbell);
        assert_eq!(v[0].address, 0x18);
        assert_eq!(v[1].kind, ViolationKind::UarDoorbell);
        assert_eq!(v[1].address, 3 * 0x1000 + 0x48);
        assert_eq!(v[1].writer, "client of vf0.sock");
        assert_eq!(
            vf.firmware().eq(1).unwrap().ci,
            3,
            "refused doorbell changed nothing"
        );
        vf.reset();
        assert_eq!(vf.migration_state(), MigState::Running);
    }

    #[test]
    fn responder_suspend_completes_only_after_admitted_changes_end() {
        let vf = Function::new(FunctionId::vf(0)).unwrap();
        vf.suspend_initiator().unwrap();
        let f = Arc::clone(&vf);
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let admitted = f.admit(ViolationKind::DevMemWrite, 0, 1).unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            f.devmem().write(0, &[7]).unwrap();
            drop(admitted);
        });
        rx.recv().unwrap();
        let t = Instant::now();
        vf.freeze(DRAIN_TIMEOUT).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        let mut b = [0u8];
        vf.devmem().read(0, &mut b).unwrap();
        assert_eq!(
            b[0], 7,
            "the admitted write landed before the freeze completed"
        );
        assert!(vf.admit(ViolationKind::DevMemWrite, 0, 1).is_none());
        assert_eq!(vf.violations().len(), 1);
        writer.join().unwrap();
    }

    #[test]
    fn responder_suspend_that_cannot_drain_fails_and_stays_initiator_suspended() {
        let vf = Function::new(FunctionId::vf(0)).unwrap();
        vf.suspend_initiator().unwrap();
        let admitted = vf.admit(ViolationKind::UarDoorbell, 0x3000, 4).unwrap();
        assert_eq!(vf.work_in_flight(), 1);
        assert_eq!(
            vf.freeze(Duration::from_millis(30)),
            Err(SuspendError::DrainTimeout { inflight: 1 })
        );
        assert_eq!(vf.migration_state(), MigState::InitiatorSuspended);
        drop(admitted);
        assert_eq!(vf.work_in_flight(), 0);
        vf.freeze(DRAIN_TIMEOUT).unwrap();
        // Doorbells refused while frozen are parked, not queued; a reset forgets them.
        vf.command_doorbell(0b101);
        assert_eq!(vf.work_in_flight(), 0);
        vf.reset();
        assert_eq!(vf.migration_state(), MigState::Running);
        assert_eq!(vf.violations().len(), 1);
    }
}
