//! The DMA engine of one function: the worker that executes the send queues of its RC
//! QPs (RDMA_WRITE, RDMA_READ, SEND, NOP) and writes their CQEs.
//!
//! A UAR doorbell naming a QP, or the firmware moving a QP to ERR, marks the QP ready
//! and wakes the function's engine thread; the doorbell returns at once. The engine
//! takes the ready QPs in turn and runs at most [`WQE_BUDGET`] WQEs of each before it
//! looks at the others again, so a long ring never starves a short one, and what a
//! doorbell sets off is bounded by the ring the QP was created with.
//!
//! Every CQE goes through the CQ's arm state: a CQ armed through its UAR doorbell
//! fires one completion EQE on its EQ and the EQ's MSI-X vector (see
//! `crate::firmware::Cq::cqe_written` and `FwCell::post_eqe`).
//!
//! Every byte the engine moves goes through a function's DMA path ([`Env::dma_read`] /
//! [`Env::dma_write`] for its own function, [`Peer::dma_read`] / [`Peer::dma_write`]
//! for the function the QP's peer is on), never straight into memory, so routing,
//! dirty tracking and fault injection see it. A request into another function is
//! admitted by that function first ([`Peer::admit_dma`]): a responder-suspended
//! function refuses it (a P2P race violation), and the writer's WQE completes with
//! an error CQE.
//!
//! # Initiator suspend
//!
//! [`Gate`] is what SUSPEND_VHCA(initiator) closes: every WQE is started only through
//! [`Gate::enter`], and [`Gate::stop`] waits until the WQEs already started have
//! completed (CQE written). QPs that had work while the gate was closed are
//! remembered and run again when it opens. Posted-but-unstarted WQEs stay in guest
//! memory, their QP's counters in the firmware state, so a state image carries them.

mod engine;
mod report;

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

#[cfg(doc)]
use crate::firmware::Peer;
use crate::firmware::{Env, FwCell};

pub use engine::{fw_send, FwSendError, COPY_CHUNK};
pub use report::{spawn_reporter, Reporter, REPORT_RNR_TIMEOUT};

/// WQEs one QP runs before the engine turns to the next ready QP.
pub const WQE_BUDGET: u32 = 16;

/// What the engine needs of its function.
pub trait Host: Send + Sync {
    /// The function (its DMA path, its peers).
    fn env(&self) -> &dyn Env;
    /// Its firmware (the QP, CQ and mkey tables).
    fn firmware(&self) -> &FwCell;
    /// Its initiator gate.
    fn gate(&self) -> &Gate;
}

#[derive(Debug, Default)]
struct GateState {
    stopped: bool,
    /// WQEs started and not yet completed.
    active: usize,
    /// QPs that had work while the gate was closed.
    parked: BTreeSet<u32>,
}

/// Whether the engine may start WQEs (closed by SUSPEND_VHCA(initiator)), and how many
/// it has in flight. A leaf lock.
#[derive(Debug, Default)]
pub struct Gate {
    s: Mutex<GateState>,
    idle: Condvar,
}

/// One WQE in flight: while it lives, [`Gate::stop`] waits.
#[must_use = "the WQE counts as in flight only while the guard lives"]
pub struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.active = s.active.saturating_sub(1);
        if s.active == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.s.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts one WQE of `qpn`, or, while the gate is closed, remembers the QP and
    /// returns `None`.
    pub fn enter(&self, qpn: u32) -> Option<InFlight<'_>> {
        let mut s = self.lock();
        if s.stopped {
            s.parked.insert(qpn);
            return None;
        }
        s.active += 1;
        Some(InFlight(self))
    }

    /// Closes the gate and waits (at most `timeout`) until no WQE is in flight. On a
    /// timeout the gate is opened again and the number still in flight returned.
    pub fn stop(&self, timeout: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        s.stopped = true;
        while s.active > 0 {
            let now = Instant::now();
            if now >= deadline {
                s.stopped = false;
                return Err(s.active);
            }
            s = self
                .idle
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Opens the gate; returns the QPs to run again.
    pub fn start(&self) -> Vec<u32> {
        let mut s = self.lock();
        s.stopped = false;
        std::mem::take(&mut s.parked).into_iter().collect()
    }

    /// Whether the gate is closed.
    pub fn stopped(&self) -> bool {
        self.lock().stopped
    }

    /// WQEs in flight.
    pub fn active(&self) -> usize {
        self.lock().active
    }

    /// Power-on: open, nothing parked (a reset forgets every QP).
    pub fn reset(&self) {
        let mut s = self.lock();
        s.stopped = false;
        s.parked.clear();
    }
}

/// The doorbell side of an engine: marks QPs ready and wakes the worker.
#[derive(Debug, Clone)]
pub struct Kicker {
    ready: Arc<Mutex<BTreeSet<u32>>>,
    wake: Sender<()>,
}

impl Kicker {
    /// Marks `qpn` ready and wakes the engine. Never blocks.
    pub fn kick(&self, qpn: u32) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(qpn);
        match self.wake.try_send(()) {
            // A wake-up already pending covers this QP too.
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                tracing::error!(qpn, "DMA engine is gone; doorbell dropped");
            }
        }
    }
}

/// A kicker and the worker end it wakes.
pub fn channel() -> (Kicker, Worker) {
    let (wake, rx) = crossbeam_channel::bounded(1);
    let ready = Arc::new(Mutex::new(BTreeSet::new()));
    (
        Kicker {
            ready: Arc::clone(&ready),
            wake,
        },
        Worker { ready, rx },
    )
}

/// The worker end of an engine.
pub struct Worker {
    ready: Arc<Mutex<BTreeSet<u32>>>,
    rx: Receiver<()>,
}

impl Worker {
    fn take_ready(&self) -> Vec<u32> {
        std::mem::take(&mut *self.ready.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }

    fn mark_ready(&self, qpn: u32) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(qpn);
    }
}

/// Starts the engine thread of a function; it ends when the function is dropped.
pub fn spawn(host: Weak<dyn Host>, worker: Worker, name: String) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(host, worker))
        .map(|_| ())
}

fn run(host: Weak<dyn Host>, worker: Worker) {
    while worker.rx.recv().is_ok() {
        loop {
            let ready = worker.take_ready();
            if ready.is_empty() {
                break;
            }
            let Some(h) = host.upgrade() else { return };
            for qpn in ready {
                if engine::run_qp(&*h, qpn, WQE_BUDGET) {
                    worker.mark_ready(qpn);
                }
            }
        }
    }
}
