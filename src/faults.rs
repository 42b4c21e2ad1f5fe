//! Every way a test makes the device misbehave, in one place, each through the
//! adapter's seeded fault plan ([`mlx5_emulator::fault`]) where one fits: tests never
//! write into the emulator's internals themselves. A test that wants a plan of its own
//! starts its adapter with [`crate::testbed::TestbedBuilder::faults`] or adds rules
//! with [`plan`] while it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use mlx5_emulator::fault::{Injector, Rule};
use mlx5_emulator::firmware::Firmware;
use mlx5_emulator::Function;
use mlx5_prm::Opcode;

/// The fault plan `f`'s adapter consults (add, clear, read the log).
pub fn plan(f: &Function) -> &Arc<Injector> {
    f.faults()
}

/// A rule name no other helper call uses.
fn unique(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("faults::{what}#{}", N.fetch_add(1, Ordering::Relaxed))
}

fn add(f: &Function, r: Rule) -> String {
    let name = r.name.clone();
    f.faults().add(&[r]).expect("a valid fault rule");
    name
}

/// A firmware fatal of `f` lasting until [`Fault::clear`]: health syndrome
/// `synd`/`ext_synd` in its BAR0 health buffer (what mlx5_core's health poll reads),
/// the health counter frozen.
pub fn set_health_syndrome(f: &Function, synd: u8, ext_synd: u16) -> Fault {
    let name = add(
        f,
        Rule::new(&unique("health"), "fatal")
            .vhca_id(f.id.vhca_id)
            .health(synd, ext_synd),
    );
    Fault {
        inj: f.faults().clone(),
        name: Some(name),
    }
}

/// `f`'s BAR0 reads all-ones (the device fell off the bus) until [`Fault::clear`].
pub fn set_all_ones(f: &Function) -> Fault {
    let name = add(
        f,
        Rule::new(&unique("all_ones"), "fatal")
            .vhca_id(f.id.vhca_id)
            .all_ones(true),
    );
    Fault {
        inj: f.faults().clone(),
        name: Some(name),
    }
}

/// A rule of the plan, removed (and a fatal it set lifted) by [`Fault::clear`] or
/// when dropped.
pub struct Fault {
    inj: Arc<Injector>,
    name: Option<String>,
}

impl Fault {
    /// Removes the rule: the firmware recovers, later commands are served again.
    pub fn clear(mut self) {
        self.take();
    }

    /// [`Fault::clear`], for a queue made unreachable: it is served again.
    pub fn restore(self) {
        self.clear();
    }

    /// The rule's name in the plan and the log.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    fn take(&mut self) {
        if let Some(n) = self.name.take() {
            self.inj.clear(Some(&n));
        }
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        self.take();
    }
}

/// Every command `f`'s queue fetches from now on never completes (its entry stays
/// hardware-owned), until [`Fault::clear`]: commands posted meanwhile stay lost, later
/// ones are served again. The driver's own state is untouched.
pub fn unreachable_cmdq(f: &Arc<Function>) -> Fault {
    let name = add(f, Rule::new(&unique("hang"), "hang").function(f.id.vhca_id));
    Fault {
        inj: f.faults().clone(),
        name: Some(name),
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
    let mut r = Rule::new(&unique("delay"), "delay")
        .opcode(opcode)
        .function(f.id.vhca_id)
        .times(u64::from(count.max(1)))
        .delay(delay);
    if let Some(t) = target_vhca_id {
        r = r.vhca_id(t);
    }
    if count > 0 {
        add(f, r);
    }
}

/// Holds `f`'s firmware while the guard lives: commands of `f` taken by its worker
/// wait to execute (work in flight that has not completed). Not a plan rule: the test
/// decides when the hold ends.
pub fn hold_firmware(f: &Function) -> MutexGuard<'_, Firmware> {
    f.firmware()
}
