//! Peer-to-peer DMA: a window of one function's IOVA space that is another function's
//! device memory (BAR2).
//!
//! A VMM that gives a guest two assigned devices maps each device's BARs into the other's
//! IOVA space, so that one can DMA into the other (QEMU does this for every mmapped BAR).
//! Over vfio-user a BAR2 mapping arrives as a DMA_MAP either with the memfd the function
//! handed out in its REGION_INFO, or, as QEMU sends it, without an fd at the address the
//! guest gave the BAR. The function's backend recognises both ([`crate::server`]) and
//! maps the window as a [`P2pWindow`]: every access goes through the target function
//! ([`Peer::p2p_write`]), so the target's suspend state applies. A write into a
//! responder-suspended target is a *P2P race violation*: refused (the writer's access
//! fails with [`DmaError::Refused`], which a command turns into a failure and an engine
//! into an error CQE), counted and recorded in the target's violation log.
//!
//! The window holds its target weakly (a function may map its own BAR2, and the fabric
//! never keeps a function alive).

use std::sync::{Arc, Weak};

use vfu::{DmaError, DmaRoute, Initiator};

use crate::firmware::{P2pRefusal, P2pSource, Peer};

/// A window onto another function's device memory.
pub struct P2pWindow {
    /// The function whose IOVA space holds the window (the writer).
    pub writer_vhca_id: u16,
    pub target: Weak<dyn Peer>,
    pub target_vhca_id: u16,
    /// BAR2 offset of the window's first byte.
    pub bar_offset: u64,
}

impl P2pWindow {
    pub fn new(writer_vhca_id: u16, target: &Arc<dyn Peer>, bar_offset: u64) -> Self {
        P2pWindow {
            writer_vhca_id,
            target: Arc::downgrade(target),
            target_vhca_id: target.id().vhca_id,
            bar_offset,
        }
    }

    fn target(&self, iova: u64, len: usize) -> Result<Arc<dyn Peer>, DmaError> {
        self.target.upgrade().ok_or(DmaError::Refused {
            iova,
            len: len as u64,
            why: "the target function is gone",
        })
    }

    fn refused(e: P2pRefusal, iova: u64, len: usize) -> DmaError {
        DmaError::Refused {
            iova,
            len: len as u64,
            why: match e {
                P2pRefusal::Frozen { .. } => {
                    "the target is responder-suspended: P2P race violation"
                }
                P2pRefusal::OutOfRange => "outside the target's device memory",
            },
        }
    }
}

impl DmaRoute for P2pWindow {
    fn read(&self, iova: u64, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let t = self.target(iova, buf.len())?;
        t.p2p_read(self.bar_offset + offset, buf)
            .map_err(|e| Self::refused(e, iova, buf.len()))
    }

    fn write(
        &self,
        iova: u64,
        offset: u64,
        data: &[u8],
        initiator: Initiator,
    ) -> Result<(), DmaError> {
        let t = self.target(iova, data.len())?;
        let from = P2pSource {
            vhca_id: self.writer_vhca_id,
            qpn: initiator,
        };
        t.p2p_write(from, self.bar_offset + offset, data)
            .map_err(|e| Self::refused(e, iova, data.len()))
    }

    fn describe(&self) -> String {
        format!(
            "P2P: BAR2 of vhca {} from offset {:#x}",
            self.target_vhca_id, self.bar_offset
        )
    }
}
