//! Every way a test makes the device misbehave, in one place. Tests never write into
//! the emulator's internals themselves; they call these, so the seeded fault plan can
//! later replace each body with an injection point without touching a test.

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use mlx5_emulator::firmware::Firmware;
use mlx5_emulator::Function;
use mlx5_prm::iseg::CMDQ_ADDR_L_SZ_OFFSET;
use mlx5_prm::Opcode;

/// Where nothing is DMA-mapped: a command queue moved there is never served.
pub const UNMAPPED_QUEUE: u32 = 0x7000_0000;

/// A firmware health syndrome in `f`'s BAR0 health buffer (what mlx5_core's health
/// poll reads).
pub fn set_health_syndrome(f: &Function, synd: u8, ext_synd: u16) {
    f.lock().bar0.set_health_syndrome(synd, ext_synd);
}

/// Clears the health buffer again.
pub fn clear_health(f: &Function) {
    f.lock().bar0.clear_health();
}

/// `f`'s BAR0 reads all-ones (the device fell off the bus) while `on`.
pub fn set_all_ones(f: &Function, on: bool) {
    f.lock().bar0.set_all_ones(on);
}

/// `f`'s command queue moved, from the device side, to an IOVA nothing is mapped at:
/// a doorbell cannot be served and its entry stays hardware-owned (a command that
/// never completes). The driver's own state is untouched. Commands posted meanwhile
/// stay lost (their doorbells were consumed); after [`UnreachableQueue::restore`] later
/// ones are served again. Dropping it restores too.
pub struct UnreachableQueue {
    f: Arc<Function>,
    real: Option<u32>,
}

/// See [`UnreachableQueue`].
pub fn unreachable_cmdq(f: &Arc<Function>) -> UnreachableQueue {
    let mut s = f.lock();
    let real = s.bar0.cmdq_address() as u32;
    s.bar0
        .write(CMDQ_ADDR_L_SZ_OFFSET, &UNMAPPED_QUEUE.to_be_bytes())
        .expect("cmdq address write");
    UnreachableQueue {
        f: f.clone(),
        real: Some(real),
    }
}

impl UnreachableQueue {
    /// Puts the queue back where the driver has it.
    pub fn restore(mut self) {
        self.put_back();
    }

    fn put_back(&mut self) {
        if let Some(real) = self.real.take() {
            self.f
                .lock()
                .bar0
                .write(CMDQ_ADDR_L_SZ_OFFSET, &real.to_be_bytes())
                .expect("cmdq address write");
        }
    }
}

impl Drop for UnreachableQueue {
    fn drop(&mut self) {
        self.put_back();
    }
}

/// The next `count` commands `f` executes with `opcode` (naming `target_vhca_id` as
/// the function they act on, when given) are held `delay` before they execute, with
/// no lock held: other slots keep running.
pub fn delay_commands(
    f: &Function,
    opcode: Opcode,
    target_vhca_id: Option<u16>,
    delay: Duration,
    count: u32,
) {
    f.delay_commands(opcode, target_vhca_id, delay, count);
}

/// Holds `f`'s firmware while the guard lives: commands of `f` taken by its worker
/// wait to execute (work in flight that has not completed).
pub fn hold_firmware(f: &Function) -> MutexGuard<'_, Firmware> {
    f.firmware()
}
