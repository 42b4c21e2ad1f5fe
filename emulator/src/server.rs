//! The vfio-user backend of one function: regions, IRQs, reset, and what register
//! writes set in motion.

use std::sync::Arc;

use vfu::uapi::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfu::{
    Backend, ClientInfo, DmaRoute, DmaWindow, Errno, IrqDesc, MapSource, RegionDesc, RegionMmap,
    SetIrqs,
};

use crate::bar0::iseg::{CMDQ_ADDR_H_OFFSET, CMD_DBELL_OFFSET};
use crate::bar0::{Bar0Effect, BAR0_SIZE};
use crate::firmware::ViolationKind;
use crate::function::Function;
use crate::p2p::P2pWindow;
use crate::pci::CONFIG_SPACE_SIZE;

/// The backend serving one function's socket.
pub struct FunctionBackend {
    func: Arc<Function>,
}

impl FunctionBackend {
    pub fn new(func: Arc<Function>) -> Self {
        FunctionBackend { func }
    }

    fn bar0_effects(&self, effects: Vec<Bar0Effect>) {
        for e in effects {
            match e {
                Bar0Effect::CommandDoorbell(mask) => self.func.command_doorbell(mask),
                Bar0Effect::UarWrite {
                    page,
                    offset,
                    value,
                } => self.func.uar_write(page, offset, value),
                Bar0Effect::CmdqAddress(addr) => {
                    tracing::debug!(
                        vhca_id = self.func.id.vhca_id,
                        addr = format_args!("{addr:#x}"),
                        "command queue address"
                    );
                }
                Bar0Effect::NicInterface(state) => {
                    tracing::info!(vhca_id = self.func.id.vhca_id, state, "nic_interface");
                }
                other => {
                    tracing::trace!(vhca_id = self.func.id.vhca_id, effect = ?other, "bar0 effect")
                }
            }
        }
    }
}

const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

/// Whether a BAR0 write of `len` bytes at `offset` reaches `cmdq_addr_h` or
/// `cmdq_addr_l_sz`, the init-segment registers that hold state.
fn touches_iseg_state(offset: u64, len: usize) -> bool {
    let start = CMDQ_ADDR_H_OFFSET;
    let end = CMD_DBELL_OFFSET;
    len > 0 && offset < end && offset.saturating_add(len as u64) > start
}

impl Backend for FunctionBackend {
    fn after_message(&mut self, seq: u64) -> bool {
        !self.func.faults().on_message(self.func.id.vhca_id, seq)
    }

    fn num_regions(&self) -> u32 {
        VFIO_PCI_NUM_REGIONS
    }

    fn region(&self, index: u32) -> Option<RegionDesc> {
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => Some(RegionDesc {
                flags: RW,
                size: BAR0_SIZE,
                ..Default::default()
            }),
            VFIO_PCI_CONFIG_REGION_INDEX => Some(RegionDesc {
                flags: RW,
                size: CONFIG_SPACE_SIZE as u64,
                ..Default::default()
            }),
            // Device memory: mmappable in full (one sparse area over the memfd), and
            // reachable by REGION_READ/WRITE.
            VFIO_PCI_BAR2_REGION_INDEX => {
                let dm = self.func.devmem();
                Some(RegionDesc {
                    flags: RW,
                    size: dm.size(),
                    mmap: Some(RegionMmap {
                        fd: dm.fd(),
                        offset: 0,
                        sparse_areas: vec![(0, dm.size())],
                    }),
                    ..Default::default()
                })
            }
            i if i < VFIO_PCI_NUM_REGIONS => Some(RegionDesc::default()),
            _ => None,
        }
    }

    fn num_irqs(&self) -> u32 {
        VFIO_PCI_NUM_IRQS
    }

    fn irq(&self, index: u32) -> Option<IrqDesc> {
        (index < VFIO_PCI_NUM_IRQS).then(|| self.func.irq_desc(index))
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if index == VFIO_PCI_BAR2_REGION_INDEX {
            return self
                .func
                .devmem()
                .read(offset, data)
                .map_err(|_| Errno::EINVAL);
        }
        let s = self.func.lock();
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => s.bar0.read(offset, data).map_err(|_| Errno::EINVAL),
            VFIO_PCI_CONFIG_REGION_INDEX => s.config.read(offset, data).map_err(|_| Errno::EINVAL),
            _ => Err(Errno::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            VFIO_PCI_BAR2_REGION_INDEX => {
                // A write into a responder-suspended function's memory is refused and
                // recorded, never silently dropped. Admitted writes hold off
                // SUSPEND_VHCA(responder) until they have landed.
                let Some(_admitted) =
                    self.func
                        .admit(ViolationKind::DevMemWrite, offset, data.len())
                else {
                    return Err(Errno::EPERM);
                };
                self.func
                    .devmem()
                    .write(offset, data)
                    .map_err(|_| Errno::EINVAL)
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                // The queue-address registers are state (they are in the image): a write
                // to them is gated like a BAR2 write, until it has landed. The command
                // doorbell and UAR doorbells are gated where their effects land, after
                // this admission ended (ringing may wait for queue room).
                let effects = {
                    let _admitted = if touches_iseg_state(offset, data.len()) {
                        let a = self
                            .func
                            .admit(ViolationKind::RegisterWrite, offset, data.len());
                        Some(a.ok_or(Errno::EPERM)?)
                    } else {
                        None
                    };
                    let written = self.func.lock().bar0.write(offset, data);
                    written.map_err(|_| Errno::EINVAL)?
                };
                self.bar0_effects(effects);
                Ok(())
            }
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let fx = self
                    .func
                    .lock()
                    .config
                    .write(offset, data)
                    .map_err(|_| Errno::EINVAL)?;
                if fx.msix_enable.is_some() || fx.msix_function_mask.is_some() {
                    self.func.flush_pending();
                }
                if let Some(c) = fx.sriov {
                    tracing::info!(
                        vhca_id = self.func.id.vhca_id,
                        vf_enable = c.vf_enable,
                        vf_memory = c.vf_memory,
                        num_vfs = c.num_vfs,
                        "SR-IOV control written"
                    );
                }
                if fx.flr {
                    tracing::info!(vhca_id = self.func.id.vhca_id, "function level reset");
                    self.func.reset();
                }
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let index = req.index;
        // Interrupts the request fires are written after the state lock is released.
        let fired = self.func.lock().irqs.apply_deferred(req)?;
        for fd in fired {
            vfu::irq::write_eventfd(&fd);
        }
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            self.func.flush_pending();
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.func.reset();
        Ok(())
    }

    fn connected(&mut self, client: ClientInfo) {
        self.func.set_client_pid(client.pid);
    }

    /// A window that is a function's device memory — its memfd, or, without an fd, an
    /// address range inside a BAR2 that the same VMM programmed — is routed through
    /// that function (see [`crate::p2p`]); anything else is left to the server.
    fn dma_route(&mut self, w: DmaWindow, source: MapSource<'_>) -> Option<Arc<dyn DmaRoute>> {
        let (target, bar_offset) = match source {
            MapSource::File { file, offset } => {
                let target = self.func.devmem_owner(file)?;
                let end = offset.checked_add(w.size)?;
                if end > target.devmem().size() {
                    // Left to the map, which refuses a window past the file's end.
                    return None;
                }
                (target, offset)
            }
            MapSource::NoFd => self.func.bar2_owner(w.iova, w.size)?,
        };
        tracing::info!(
            vhca_id = self.func.id.vhca_id,
            target_vhca_id = target.id().vhca_id,
            iova = format_args!("{:#x}", w.iova),
            size = format_args!("{:#x}", w.size),
            bar_offset = format_args!("{bar_offset:#x}"),
            "P2P window onto a function's device memory"
        );
        Some(Arc::new(P2pWindow::new(
            self.func.id.vhca_id,
            &target,
            bar_offset,
        )))
    }

    fn disconnected(&mut self) {
        self.func.detach_client();
        self.func.set_client_pid(None);
    }
}
