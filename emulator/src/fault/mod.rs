//! Fault injection: a seeded, replayable plan of rules the device consults at its
//! choke points.
//!
//! A [`Plan`] is a seed and rules, each a set of triggers and one [`Effect`]
//! ([`plan`]). The adapter holds one [`Injector`] (through its fabric), and every
//! function asks it at four places:
//!
//! | site | where | effects |
//! |---|---|---|
//! | command | the command queue engine, after an entry is fetched (`cmdq::run_slot`) | status, hang, delay, delivery, fatal, corrupt_save, truncate_save, load_fail, flr |
//! | DMA | `Env::dma_read` / `Env::dma_write` of the function: entries, mailboxes, EQEs, SAVE/LOAD buffers, and every DMA engine built on `Env` | dma_read_fault, dma_write_fault |
//! | drain | SUSPEND_VHCA(initiator) of the function | slow_drain |
//! | message | after each vfio-user message of the function's connection | drop_connection |
//!
//! and a `fatal` rule with no command trigger fires once, when it is installed.
//!
//! # Replay
//!
//! Whether a probabilistic rule fires, and where a corrupted SAVE gets its bit flips,
//! is drawn from ChaCha8 (a stable algorithm) keyed by the plan's seed, on the stream
//! of the rule's number and at the position of its match number: the k-th match of
//! rule r always draws the same numbers, whichever slot's thread gets there first.
//! The same seed and the same command sequence give the same [`FaultLog`], byte for
//! byte: it holds no wall-clock time and no address.
//!
//! # Lock
//!
//! The injector's lock is a leaf: taken with any other lock held, nothing taken under
//! it (an immediate `fatal` is applied after it is released).

pub mod control;
pub mod log;
pub mod plan;

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use mlx5_prm::cmdq::DeliveryStatus;
use mlx5_prm::{CmdStatus, Opcode};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

pub use log::{FaultLog, LogEntry};
pub use plan::{Checked, Effect, Plan, PlanError, Rule, Site, StateFilter};

/// A function as the injector acts on it outside a command: an immediate `fatal`
/// and its recovery when the rule is cleared.
pub trait FaultTarget: Send + Sync {
    fn vhca_id(&self) -> u16;
    /// Firmware fatal (`Some`), or recovered (`None`): health buffer back to power-on,
    /// health counter moving, BAR0 readable.
    fn set_fatal(&self, fatal: Option<Fatal>);
}

/// What a firmware fatal sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fatal {
    pub syndrome: u8,
    pub ext_syndrome: u16,
    pub all_ones: bool,
}

/// A command as the command site sees it.
#[derive(Debug, Clone, Copy)]
pub struct CmdSite {
    /// The function whose queue executes it.
    pub function: u16,
    /// The function it acts on.
    pub vhca_id: u16,
    pub opcode: u16,
    pub op_mod: u16,
    /// The function's command sequence number (1 for its first command).
    pub seq: u64,
    /// The migration state of the function it acts on.
    pub state: StateFilter,
}

/// What the command site must do with one command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CmdFaults {
    /// Hold it this long first.
    pub delay: Option<Duration>,
    /// Instead of executing it.
    pub instead: Option<Instead>,
    /// After executing it (SAVE/LOAD effects, FLR).
    pub after: Vec<After>,
}

/// What replaces the execution of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instead {
    Status { status: CmdStatus, syndrome: u32 },
    Hang,
    Delivery(DeliveryStatus),
    Fatal(Fatal),
}

/// What changes a command's outcome once it has executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Flip these bit offsets (each `< 8 × image length`, taken modulo it).
    Corrupt(Vec<u64>),
    /// Report at most this many image bytes (`None`: half of the image).
    Truncate(Option<u64>),
    /// LOAD applies part of the image, then fails.
    LoadFail,
    /// The executing function is reset before the command completes.
    Flr,
}

impl CmdFaults {
    pub fn is_empty(&self) -> bool {
        self.delay.is_none() && self.instead.is_none() && self.after.is_empty()
    }
}

/// The direction of a DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaDir {
    Read,
    Write,
}

/// A rule as the injector keeps it.
struct Live {
    /// Its number: the RNG stream, stable for the adapter's life (never reused).
    id: u64,
    c: Checked,
    matches: u64,
    fired: u64,
}

struct Inner {
    seed: u64,
    next_id: u64,
    rules: Vec<Live>,
}

/// The plan of one adapter, consulted at every injection point.
pub struct Injector {
    inner: Mutex<Inner>,
    /// Rules installed (a fast path: with none, the sites cost one atomic load).
    armed: AtomicUsize,
    log: FaultLog,
    targets: RwLock<Vec<Weak<dyn FaultTarget>>>,
}

impl Default for Injector {
    fn default() -> Self {
        Injector::new(0, FaultLog::memory())
    }
}

/// The per-thread context of the command being executed: which DMAs belong to it.
#[derive(Debug, Clone, Default)]
pub struct CmdContext {
    pub opcode: u16,
    pub op_mod: u16,
    pub vhca_id: u16,
    pub seq: u64,
    /// LOAD must fail part-way.
    pub load_fail: bool,
    /// Record the IOVA ranges the command DMA-writes (for a SAVE to corrupt).
    pub record_writes: bool,
    pub writes: Vec<(u64, usize)>,
}

thread_local! {
    static CURRENT: RefCell<Option<CmdContext>> = const { RefCell::new(None) };
}

/// Runs `f` with `ctx` as this thread's command context; returns its result and the
/// context as `f` left it.
pub fn with_context<R>(ctx: CmdContext, f: impl FnOnce() -> R) -> (R, CmdContext) {
    CURRENT.with(|c| *c.borrow_mut() = Some(ctx));
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            let _ = CURRENT.try_with(|c| c.borrow_mut().take());
        }
    }
    let guard = Clear;
    let r = f();
    let ctx = CURRENT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    drop(guard);
    (r, ctx)
}

/// Whether the command executing on this thread must fail its LOAD part-way.
pub fn load_must_fail() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|c| c.load_fail))
}

fn current_command() -> Option<(u16, u16, u16, u64)> {
    CURRENT
        .try_with(|c| {
            c.borrow()
                .as_ref()
                .map(|c| (c.opcode, c.op_mod, c.vhca_id, c.seq))
        })
        .ok()
        .flatten()
}

fn record_write(iova: u64, len: usize) {
    let _ = CURRENT.try_with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            if c.record_writes && c.writes.len() < 1 << 20 {
                c.writes.push((iova, len));
            }
        }
    });
}

/// The RNG of match `m` of rule `rule` under `seed`.
fn rng(seed: u64, rule: u64, m: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(rule);
    // 2^32 words of its own per match.
    r.set_word_pos(u128::from(m) << 32);
    r
}

/// A uniform draw in [0, 1).
fn unit(r: &mut ChaCha8Rng) -> f64 {
    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// What the site tells the rule matcher.
struct Probe<'a> {
    site: Site,
    opcode: Option<u16>,
    op_mod: Option<u16>,
    vhca_id: u16,
    function: Option<u16>,
    seq: u64,
    state: Option<StateFilter>,
    dma: Option<DmaDir>,
    message: Option<u64>,
    _p: std::marker::PhantomData<&'a ()>,
}

/// One rule that fired, with what the log needs.
struct Fired {
    c: Checked,
    id: u64,
    matches: u64,
}

impl Injector {
    /// An injector with no rule, logging to `log`.
    pub fn new(seed: u64, log: FaultLog) -> Self {
        Injector {
            inner: Mutex::new(Inner {
                seed,
                next_id: 0,
                rules: Vec::new(),
            }),
            armed: AtomicUsize::new(0),
            log,
            targets: RwLock::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault log.
    pub fn log(&self) -> &FaultLog {
        &self.log
    }

    /// The seed draws are made from.
    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    /// Registers a function for immediate effects (the adapter does it per function).
    pub fn register(&self, t: &Arc<dyn FaultTarget>) {
        let mut v = self.targets.write().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(t));
    }

    fn target(&self, vhca_id: u16) -> Option<Arc<dyn FaultTarget>> {
        let v = self.targets.read().unwrap_or_else(|p| p.into_inner());
        v.iter()
            .filter_map(Weak::upgrade)
            .find(|t| t.vhca_id() == vhca_id)
    }

    /// Replaces the seed and every rule with `plan`'s (the log is kept).
    pub fn set_plan(&self, plan: &Plan) -> Result<(), PlanError> {
        let checked = plan.check()?;
        self.clear(None);
        self.lock().seed = plan.seed;
        self.install(checked)
    }

    /// Adds `rules` after the installed ones (the seed stays). All or none: a bad rule
    /// refuses the whole set.
    pub fn add(&self, rules: &[Rule]) -> Result<(), PlanError> {
        let checked = rules
            .iter()
            .map(Checked::from_rule)
            .collect::<Result<Vec<_>, _>>()?;
        self.install(checked)
    }

    fn install(&self, checked: Vec<Checked>) -> Result<(), PlanError> {
        let mut now = Vec::new();
        {
            let mut g = self.lock();
            if g.rules.len() + checked.len() > plan::MAX_RULES {
                return Err(PlanError::TooManyRules {
                    got: g.rules.len() + checked.len(),
                });
            }
            for c in checked {
                let id = g.next_id;
                g.next_id += 1;
                tracing::info!(rule = %c.rule.name, effect = c.effect.name(), site = c.site.name(), "fault rule added");
                if c.site == Site::Now {
                    now.push(Fired {
                        c: c.clone(),
                        id,
                        matches: 1,
                    });
                }
                g.rules.push(Live {
                    id,
                    c,
                    matches: 0,
                    fired: 0,
                });
                self.armed.store(g.rules.len(), Ordering::Release);
            }
            for f in &now {
                if let Some(l) = g.rules.iter_mut().find(|l| l.id == f.id) {
                    l.matches = 1;
                    l.fired = 1;
                }
            }
        }
        for f in now {
            let vhca_id = f.c.rule.vhca_id.unwrap_or(0);
            self.note(&f, Site::Now, vhca_id, vhca_id, None, 0, 0);
            if let (
                Effect::Fatal {
                    syndrome,
                    ext_syndrome,
                    all_ones,
                },
                Some(t),
            ) = (f.c.effect, self.target(vhca_id))
            {
                t.set_fatal(Some(Fatal {
                    syndrome,
                    ext_syndrome,
                    all_ones,
                }));
            }
        }
        Ok(())
    }

    /// Removes the rule named `name`, or every rule. A fatal that a removed rule set is
    /// lifted (the firmware recovered). Returns how many were removed.
    pub fn clear(&self, name: Option<&str>) -> usize {
        let removed: Vec<Live> = {
            let mut g = self.lock();
            let (gone, kept): (Vec<Live>, Vec<Live>) = std::mem::take(&mut g.rules)
                .into_iter()
                .partition(|l| name.is_none_or(|n| l.c.rule.name == n));
            g.rules = kept;
            self.armed.store(g.rules.len(), Ordering::Release);
            gone
        };
        for l in &removed {
            tracing::info!(rule = %l.c.rule.name, fired = l.fired, "fault rule cleared");
            if matches!(l.c.effect, Effect::Fatal { .. }) && l.fired > 0 {
                let ids: Vec<u16> = match (l.c.site, l.c.rule.vhca_id) {
                    (Site::Now, v) => vec![v.unwrap_or(0)],
                    // A command-triggered fatal hit the function executing it: lift it
                    // wherever it may have landed.
                    _ => {
                        let v = self.targets.read().unwrap_or_else(|p| p.into_inner());
                        v.iter()
                            .filter_map(Weak::upgrade)
                            .map(|t| t.vhca_id())
                            .collect()
                    }
                };
                for id in ids {
                    if let Some(t) = self.target(id) {
                        t.set_fatal(None);
                    }
                }
            }
        }
        removed.len()
    }

    /// The installed rules, in order, with how often each matched and fired.
    pub fn rules(&self) -> Vec<RuleStatus> {
        self.lock()
            .rules
            .iter()
            .map(|l| RuleStatus {
                rule: l.c.rule.clone(),
                matches: l.matches,
                fired: l.fired,
            })
            .collect()
    }

    /// Whether any rule is in the plan (every site asks this first).
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire) != 0
    }

    /// Matches `p` against every rule of its site; returns those that fire.
    fn decide(&self, p: &Probe<'_>) -> Vec<Fired> {
        let mut g = self.lock();
        let seed = g.seed;
        let mut out = Vec::new();
        for l in g.rules.iter_mut().filter(|l| l.c.site == p.site) {
            let r = &l.c.rule;
            let ok = l.c.opcode.is_none_or(|o| p.opcode == Some(o))
                && r.op_mod.is_none_or(|m| p.op_mod == Some(m))
                && r.vhca_id.is_none_or(|v| v == p.vhca_id)
                && r.function.is_none_or(|f| p.function == Some(f))
                && r.after.is_none_or(|a| p.seq > a)
                && l.c.state.is_none_or(|s| p.state == Some(s))
                && match (l.c.effect, p.dma) {
                    (Effect::DmaRead, Some(d)) => d == DmaDir::Read,
                    (Effect::DmaWrite, Some(d)) => d == DmaDir::Write,
                    (_, None) => true,
                    _ => false,
                }
                && r.message.is_none_or(|m| p.message == Some(m));
            if !ok {
                continue;
            }
            l.matches += 1;
            let m = l.matches;
            let fires = r.nth.is_none_or(|n| m == n)
                && r.dma.is_none_or(|n| m == n)
                && r.every.is_none_or(|k| m % k == 0)
                && r.times.is_none_or(|t| l.fired < t)
                && r.probability
                    .is_none_or(|prob| unit(&mut rng(seed, l.id, m)) < prob);
            if fires {
                l.fired += 1;
                out.push(Fired {
                    c: l.c.clone(),
                    id: l.id,
                    matches: m,
                });
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn note(
        &self,
        f: &Fired,
        site: Site,
        function: u16,
        vhca_id: u16,
        opcode: Option<u16>,
        op_mod: u16,
        seq: u64,
    ) {
        let seed = self.seed();
        let opcode_name = opcode.map(crate::fault::opcode_name);
        tracing::warn!(
            rule = %f.c.rule.name,
            seed,
            effect = f.c.effect.name(),
            site = site.name(),
            function,
            vhca_id,
            opcode = opcode_name.unwrap_or("-"),
            op_mod,
            seq,
            matched = f.matches,
            "fault injected"
        );
        self.log.push(LogEntry {
            rule: f.c.rule.name.clone(),
            seed,
            effect: f.c.effect.name(),
            site: site.name(),
            function,
            vhca_id,
            opcode: opcode_name,
            op_mod,
            seq,
            matched: f.matches,
        });
    }

    /// The command site: what to do with the command `s`.
    pub fn on_command(&self, s: &CmdSite) -> CmdFaults {
        let mut out = CmdFaults::default();
        if !self.armed() {
            return out;
        }
        let fired = self.decide(&Probe {
            site: Site::Command,
            opcode: Some(s.opcode),
            op_mod: Some(s.op_mod),
            vhca_id: s.vhca_id,
            function: Some(s.function),
            seq: s.seq,
            state: Some(s.state),
            dma: None,
            message: None,
            _p: Default::default(),
        });
        let seed = self.seed();
        for f in fired {
            self.note(
                &f,
                Site::Command,
                s.function,
                s.vhca_id,
                Some(s.opcode),
                s.op_mod,
                s.seq,
            );
            let instead = |i: Instead, out: &mut CmdFaults| {
                out.instead.get_or_insert(i);
            };
            match f.c.effect {
                Effect::Status { status, syndrome } => {
                    instead(Instead::Status { status, syndrome }, &mut out)
                }
                Effect::Hang => instead(Instead::Hang, &mut out),
                Effect::Delivery(d) => instead(Instead::Delivery(d), &mut out),
                Effect::Fatal {
                    syndrome,
                    ext_syndrome,
                    all_ones,
                } => instead(
                    Instead::Fatal(Fatal {
                        syndrome,
                        ext_syndrome,
                        all_ones,
                    }),
                    &mut out,
                ),
                Effect::Delay(d) => out.delay = Some(out.delay.unwrap_or_default() + d),
                Effect::CorruptSave { flips } => {
                    let mut r = rng(seed, f.id, f.matches);
                    let bits = (0..flips).map(|_| r.next_u64()).collect();
                    out.after.push(After::Corrupt(bits));
                }
                Effect::TruncateSave { keep } => out.after.push(After::Truncate(keep)),
                Effect::LoadFail => out.after.push(After::LoadFail),
                Effect::Flr => out.after.push(After::Flr),
                Effect::DmaRead | Effect::DmaWrite | Effect::SlowDrain(_) => {}
                Effect::DropConnection => {}
            }
        }
        out
    }

    /// The DMA site: whether this DMA of function `vhca_id` (its `seq`-th) faults.
    pub fn on_dma(&self, vhca_id: u16, dir: DmaDir, seq: u64) -> bool {
        if !self.armed() {
            return false;
        }
        let cur = current_command();
        let fired = self.decide(&Probe {
            site: Site::Dma,
            opcode: cur.map(|c| c.0),
            op_mod: cur.map(|c| c.1),
            vhca_id,
            function: None,
            seq,
            state: None,
            dma: Some(dir),
            message: None,
            _p: Default::default(),
        });
        for f in &fired {
            self.note(
                f,
                Site::Dma,
                vhca_id,
                cur.map_or(vhca_id, |c| c.2),
                cur.map(|c| c.0),
                cur.map_or(0, |c| c.1),
                seq,
            );
        }
        !fired.is_empty()
    }

    /// Records a DMA write of the command executing on this thread (see
    /// [`CmdContext::record_writes`]).
    pub fn dma_written(&self, iova: u64, len: usize) {
        if self.armed() {
            record_write(iova, len);
        }
    }

    /// The drain site: how much longer SUSPEND_VHCA(initiator) of `vhca_id` takes.
    pub fn on_drain(&self, vhca_id: u16, seq: u64) -> Option<Duration> {
        if !self.armed() {
            return None;
        }
        let fired = self.decide(&Probe {
            site: Site::Drain,
            opcode: None,
            op_mod: None,
            vhca_id,
            function: None,
            seq,
            state: None,
            dma: None,
            message: None,
            _p: Default::default(),
        });
        let mut total = None;
        for f in &fired {
            let op = current_command();
            self.note(
                f,
                Site::Drain,
                vhca_id,
                vhca_id,
                op.map(|c| c.0),
                op.map_or(0, |c| c.1),
                seq,
            );
            if let Effect::SlowDrain(d) = f.c.effect {
                total = Some(total.unwrap_or(Duration::ZERO) + d);
            }
        }
        total
    }

    /// The message site: whether the connection to `vhca_id` closes after its
    /// `message`-th message.
    pub fn on_message(&self, vhca_id: u16, message: u64) -> bool {
        if !self.armed() {
            return false;
        }
        let fired = self.decide(&Probe {
            site: Site::Message,
            opcode: None,
            op_mod: None,
            vhca_id,
            function: None,
            seq: message,
            state: None,
            dma: None,
            message: Some(message),
            _p: Default::default(),
        });
        for f in &fired {
            self.note(f, Site::Message, vhca_id, vhca_id, None, 0, message);
        }
        !fired.is_empty()
    }
}

/// A rule with its counters, as `list` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleStatus {
    pub rule: Rule,
    pub matches: u64,
    pub fired: u64,
}

/// The PRM name of a raw opcode, or "UNKNOWN".
pub fn opcode_name(opcode: u16) -> &'static str {
    Opcode::try_from(opcode).map_or("UNKNOWN", Opcode::name)
}

/// Flips bit `bit % (8 × len)` of an image of `len` bytes spread over `writes` (IOVA
/// ranges in image order): the IOVA of the byte and the mask.
pub fn flip_target(writes: &[(u64, usize)], len: u64, bit: u64) -> Option<(u64, u8)> {
    if len == 0 {
        return None;
    }
    let bit = bit % (len * 8);
    let mut byte = bit / 8;
    for &(iova, n) in writes {
        if byte < n as u64 {
            return Some((iova + byte, 1 << (bit % 8)));
        }
        byte -= n as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(opcode: Opcode, seq: u64) -> CmdSite {
        CmdSite {
            function: 0,
            vhca_id: 1,
            opcode: u16::from(opcode),
            op_mod: 0,
            seq,
            state: StateFilter::Running,
        }
    }

    #[test]
    fn nth_every_times_and_after_count_matches() {
        let inj = Injector::default();
        inj.add(&[
            Rule::new("second", "hang").opcode(Opcode::QueryIssi).nth(2),
            Rule::new("every3", "delay")
                .opcode(Opcode::AllocPd)
                .every(3)
                .times(2)
                .delay(Duration::from_millis(1)),
            Rule::new("late", "hang").opcode(Opcode::SetIssi).after(5),
        ])
        .unwrap();
        let issi: Vec<bool> = (1..=4)
            .map(|i| inj.on_command(&site(Opcode::QueryIssi, i)).instead == Some(Instead::Hang))
            .collect();
        assert_eq!(issi, [false, true, false, false]);
        let pd: Vec<bool> = (1..=12)
            .map(|i| inj.on_command(&site(Opcode::AllocPd, i)).delay.is_some())
            .collect();
        assert_eq!(
            pd,
            [false, false, true, false, false, true, false, false, false, false, false, false]
        );
        assert!(inj.on_command(&site(Opcode::SetIssi, 5)).is_empty());
        assert!(!inj.on_command(&site(Opcode::SetIssi, 6)).is_empty());
        assert_eq!(inj.log().lines().len(), 4);
    }

    #[test]
    fn probabilistic_rules_replay_from_the_seed() {
        let run = |seed| {
            let inj = Injector::default();
            inj.set_plan(
                &Plan::new(seed).rule(
                    Rule::new("coin", "hang")
                        .opcode(Opcode::QueryIssi)
                        .probability(0.5),
                ),
            )
            .unwrap();
            (1..=64)
                .map(|i| !inj.on_command(&site(Opcode::QueryIssi, i)).is_empty())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let n = run(7).iter().filter(|&&b| b).count();
        assert!((16..=48).contains(&n), "{n} of 64");
    }

    #[test]
    fn flip_targets_walk_the_write_ranges() {
        let w = [(0x1000, 4), (0x9000, 4)];
        assert_eq!(flip_target(&w, 8, 0), Some((0x1000, 1)));
        assert_eq!(flip_target(&w, 8, 8 * 5 + 3), Some((0x9001, 8)));
        assert_eq!(flip_target(&w, 8, 64), Some((0x1000, 1)));
        assert_eq!(flip_target(&w, 0, 1), None);
    }
}
