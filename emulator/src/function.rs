//! One PCI function of the adapter (the PF or a VF): its config space, BAR0 and
//! interrupt state, behind one short-held lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfu::uapi::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_REQ_IRQ_INDEX,
};
use vfu::{Dma, IrqDesc, IrqIndexShape, IrqTable};

use crate::bar0::iseg::CMD_DBELL_OFFSET;
use crate::bar0::{Bar0, BAR0_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};
use crate::cmdq::{self, Work, WorkSender};
use crate::devmem::{DevMem, DevMemError, DEFAULT_DEV_MEM_SIZE};
use crate::fabric::Fabric;
use crate::firmware::{
    CmdRecord, Firmware, HcaState, MigCtl, MigState, ObjectCounts, Violation, ViolationKind,
};
use crate::pci::{ConfigParams, ConfigSpace, FunctionKind, PciError, INTERRUPT_PIN_NONE};

/// MSI-X vectors of every function.
pub const MSIX_VECTORS: u16 = 16;

/// Static description of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionId {
    pub kind: FunctionKind,
    /// VF number (0 for the PF).
    pub index: u16,
    /// The firmware's name for the function (`vhca_id`): 0 for the PF, 1 + n for VF n.
    pub vhca_id: u16,
}

impl FunctionId {
    pub fn pf() -> Self {
        FunctionId {
            kind: FunctionKind::Pf,
            index: 0,
            vhca_id: 0,
        }
    }

    pub fn vf(n: u16) -> Self {
        FunctionId {
            kind: FunctionKind::Vf,
            index: n,
            vhca_id: n + 1,
        }
    }

    /// Socket file name: `pf.sock` or `vfN.sock`.
    pub fn socket_name(&self) -> String {
        match self.kind {
            FunctionKind::Pf => "pf.sock".into(),
            FunctionKind::Vf => format!("vf{}.sock", self.index),
        }
    }
}

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

/// One function: identity, state, and the IOVA space its client mapped.
///
/// Two locks, never nested in either order by this type: `state` (config space, BAR0,
/// IRQs; register-sized work) and `firmware` (the firmware state; one command). Neither
/// is held across socket I/O.
pub struct Function {
    pub id: FunctionId,
    state: Mutex<FunctionState>,
    dma: Dma,
    firmware: Mutex<Firmware>,
    fabric: Arc<Fabric>,
    cmdq: WorkSender,
    /// Bumped by every FLR / DEVICE_RESET; queued command work from an older epoch is
    /// dropped.
    epoch: AtomicU64,
    /// BAR2.
    devmem: DevMem,
    /// Suspend state, save session, violations (a leaf lock).
    mig: Mutex<MigCtl>,
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
        let devmem = DevMem::new(&format!("mlx5-emu-bar2-{}", id.vhca_id), dev_mem)?;
        let config = ConfigSpace::new(
            id.kind,
            ConfigParams {
                msix_vectors: MSIX_VECTORS,
                bar0_size: BAR0_SIZE,
                bar2_size: Some(dev_mem),
                msix_table_offset: MSIX_TABLE_OFFSET as u32,
                msix_pba_offset: MSIX_PBA_OFFSET as u32,
            },
        )?;
        let irqs = IrqTable::new(&Self::irq_shapes(&config));
        let (tx, rx) = crossbeam_channel::unbounded();
        let f = Arc::new(Function {
            id,
            state: Mutex::new(FunctionState {
                config,
                bar0: Bar0::new(MSIX_VECTORS),
                irqs,
            }),
            dma: Dma::default(),
            firmware: Mutex::new(Firmware::new(id)),
            fabric,
            cmdq: tx,
            epoch: AtomicU64::new(0),
            devmem,
            mig: Mutex::new(MigCtl::default()),
        });
        let name = format!("fw-{}", id.socket_name().trim_end_matches(".sock"));
        cmdq::spawn_worker(Arc::downgrade(&f), rx, name).map_err(FunctionError::Worker)?;
        f.fabric.register(&f);
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

    /// The firmware lock. Held for one command or one doorbell update. A PF may take a
    /// VF's while holding its own (never the reverse).
    pub fn firmware(&self) -> MutexGuard<'_, Firmware> {
        self.firmware.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Records and refuses a state-changing write while responder-suspended.
    pub fn refuse_if_frozen(&self, kind: ViolationKind, address: u64) -> bool {
        let writer = format!("client of {}", self.id.socket_name());
        self.migration().refuse_if_frozen(kind, &writer, address)
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
    pub fn command_doorbell(&self, mask: u32) {
        if self.refuse_if_frozen(ViolationKind::CommandDoorbell, u64::from(CMD_DBELL_OFFSET)) {
            return;
        }
        let cmdq = self.lock().bar0.cmdq_address();
        let events = self.firmware().cmd_eq().is_some();
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
        if self.cmdq.send(work).is_err() {
            tracing::error!(
                vhca_id = self.id.vhca_id,
                "firmware worker is gone; doorbell dropped"
            );
        }
    }

    /// A 4-byte write to UAR page `page`: EQ arm / consumer-index doorbells.
    pub fn uar_write(&self, page: u32, offset: u32, value: u32) {
        let address = u64::from(page) * crate::bar0::UAR_PAGE_SIZE + u64::from(offset);
        if self.refuse_if_frozen(ViolationKind::UarDoorbell, address) {
            return;
        }
        let fire = {
            let mut fw = self.firmware();
            if !fw.has_uar(page) {
                tracing::trace!(
                    vhca_id = self.id.vhca_id,
                    page,
                    "write to an unallocated UAR page"
                );
                return;
            }
            fw.uar_write(page, offset, value)
        };
        if let Some(v) = fire {
            self.raise_msix(v);
        }
    }

    /// Raises MSI-X `vector`: delivered through its eventfd when MSI-X is enabled and
    /// not function-masked and the VMM gave an eventfd; otherwise its PBA bit is set.
    pub fn raise_msix(&self, vector: u16) -> bool {
        let mut s = self.lock();
        s.raise_msix(vector)
    }

    /// FLR or DEVICE_RESET: the function returns to its power-on state. The VMM's
    /// eventfds and DMA maps stay: they belong to the VMM, not to the function.
    pub fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.firmware().reset();
        self.migration().reset();
        self.devmem.reset();
        let mut s = self.lock();
        s.config.reset();
        s.bar0.reset();
        tracing::info!(
            vhca_id = self.id.vhca_id,
            "function reset to power-on state"
        );
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

    pub fn raise_msix(&mut self, vector: u16) -> bool {
        let delivered = self.msix_deliverable(vector)
            && self.irqs.trigger(VFIO_PCI_MSIX_IRQ_INDEX, vector as u32);
        // Undelivered interrupts wait in the PBA until the vector becomes deliverable.
        self.bar0.msix_mut().set_pending(vector, !delivered);
        delivered
    }

    /// Delivers pending vectors that became deliverable (MSI-X enabled, function
    /// unmasked, eventfd assigned), as the PCI spec has a device do on unmask.
    pub fn flush_pending(&mut self) {
        for v in 0..MSIX_VECTORS {
            if self.bar0.msix().pending(v) && self.msix_deliverable(v) {
                self.raise_msix(v);
            }
        }
    }
}
