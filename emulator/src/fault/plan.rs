//! A fault plan as a user writes it (TOML, or built in Rust), and its checked form.
//!
//! ```toml
//! seed = 1
//! [[rule]]
//! name = "save fails once"
//! opcode = "SAVE_VHCA_STATE"
//! nth = 1
//! effect = "status"
//! status = "BAD_PARAM"
//! syndrome = 0x5a5a
//! ```
//!
//! Field names may grow, never change: a plan written for one version works on the
//! next. Unknown fields are refused (a misspelt trigger must not silently match
//! everything).

use std::time::Duration;

use mlx5_prm::cmdq::DeliveryStatus;
use mlx5_prm::iseg::HEALTH_SYND_FW_INTERNAL_ERR;
use mlx5_prm::{CmdStatus, Opcode};
use serde::{Deserialize, Serialize};

/// Most rules one plan (or one adapter) holds.
pub const MAX_RULES: usize = 256;
/// Longest delay a rule may ask for (a completion delay, a slower drain).
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Most bit flips one corrupted SAVE gets.
pub const MAX_FLIPS: u32 = 64;
/// Longest rule name.
pub const MAX_NAME: usize = 128;

/// A seed and the rules it decides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Decides every probabilistic trigger and every seeded offset: one seed, one run.
    #[serde(default)]
    pub seed: u64,
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// One rule: triggers (all that are given must hold) and one effect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the rule in the log, the trace and `clear`.
    pub name: String,

    // ---- triggers ----
    /// The command's opcode, by its PRM name (`SAVE_VHCA_STATE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opcode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_mod: Option<u16>,
    /// The function the command acts on (its `vhca_id` / `function_id` /
    /// `other_function` field, else the function executing it); for DMA, message and
    /// drain rules and for an immediate `fatal`, the function itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhca_id: Option<u16>,
    /// The function whose queue executes the command (0: the PF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u16>,
    /// Fire on the n-th match only (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth: Option<u64>,
    /// Fire on every k-th match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<u64>,
    /// Fire at most this many times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// Fire with this probability (0..=1) per match, drawn from (seed, rule, match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// Only once the function has executed this many commands (its command sequence
    /// number is above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Only while the function the command acts on is in this migration state
    /// (`running`, `initiator_suspended`, `responder_suspended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// DMA rules: the n-th DMA (read or write, as the effect says) of the function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dma: Option<u64>,
    /// Message rules: the M-th vfio-user message of a connection (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<u64>,

    // ---- the effect and its parameters ----
    /// `status`, `hang`, `delay`, `delivery`, `fatal`, `corrupt_save`,
    /// `truncate_save`, `load_fail`, `dma_read_fault`, `dma_write_fault`,
    /// `slow_drain`, `drop_connection`, `flr`.
    pub effect: String,
    /// `status`: the command status (PRM name, `_ERR` optional: `BAD_PARAM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `status`: the syndrome (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syndrome: Option<u32>,
    /// `delay`, `slow_drain`: milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// `delivery`: the delivery status (PRM name, default `FW_ERR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// `fatal`: health.synd (default 1, FW internal error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_syndrome: Option<u8>,
    /// `fatal`: health.ext_synd (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_syndrome: Option<u16>,
    /// `fatal`: every BAR0 read returns all-ones too (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_ones: Option<bool>,
    /// `corrupt_save`: bits flipped at seeded offsets of the image (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flips: Option<u32>,
    /// `truncate_save`: bytes of the image kept (default: half of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u64>,
}

impl Rule {
    /// A rule named `name` with effect `effect` and no trigger (matches everything its
    /// effect applies to); set the triggers with the builder methods.
    pub fn new(name: &str, effect: &str) -> Rule {
        Rule {
            name: name.into(),
            effect: effect.into(),
            ..Rule::default()
        }
    }

    pub fn opcode(mut self, op: Opcode) -> Rule {
        self.opcode = Some(op.name().into());
        self
    }

    pub fn op_mod(mut self, m: u16) -> Rule {
        self.op_mod = Some(m);
        self
    }

    pub fn vhca_id(mut self, v: u16) -> Rule {
        self.vhca_id = Some(v);
        self
    }

    pub fn function(mut self, v: u16) -> Rule {
        self.function = Some(v);
        self
    }

    pub fn nth(mut self, n: u64) -> Rule {
        self.nth = Some(n);
        self
    }

    pub fn every(mut self, k: u64) -> Rule {
        self.every = Some(k);
        self
    }

    pub fn times(mut self, n: u64) -> Rule {
        self.times = Some(n);
        self
    }

    pub fn probability(mut self, p: f64) -> Rule {
        self.probability = Some(p);
        self
    }

    pub fn after(mut self, n: u64) -> Rule {
        self.after = Some(n);
        self
    }

    pub fn state(mut self, s: &str) -> Rule {
        self.state = Some(s.into());
        self
    }

    pub fn dma(mut self, n: u64) -> Rule {
        self.dma = Some(n);
        self
    }

    pub fn message(mut self, m: u64) -> Rule {
        self.message = Some(m);
        self
    }

    pub fn status(mut self, s: CmdStatus, syndrome: u32) -> Rule {
        self.status = Some(s.name().into());
        self.syndrome = Some(syndrome);
        self
    }

    pub fn delay(mut self, d: Duration) -> Rule {
        self.delay_ms = Some(d.as_millis() as u64);
        self
    }

    pub fn delivery(mut self, d: DeliveryStatus) -> Rule {
        self.delivery = Some(d.name().into());
        self
    }

    pub fn health(mut self, synd: u8, ext: u16) -> Rule {
        self.health_syndrome = Some(synd);
        self.ext_syndrome = Some(ext);
        self
    }

    pub fn all_ones(mut self, on: bool) -> Rule {
        self.all_ones = Some(on);
        self
    }

    pub fn flips(mut self, n: u32) -> Rule {
        self.flips = Some(n);
        self
    }

    pub fn keep(mut self, bytes: u64) -> Rule {
        self.keep = Some(bytes);
        self
    }
}

impl Plan {
    pub fn new(seed: u64) -> Plan {
        Plan {
            seed,
            rules: Vec::new(),
        }
    }

    pub fn rule(mut self, r: Rule) -> Plan {
        self.rules.push(r);
        self
    }

    /// Parses a TOML plan and checks every rule.
    pub fn from_toml(text: &str) -> Result<Plan, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError::Toml(e.to_string()))?;
        plan.check()?;
        Ok(plan)
    }

    /// Reads and parses a TOML plan file.
    pub fn from_file(path: &std::path::Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::Read {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Plan::from_toml(&text)
    }

    /// The plan as TOML (what `from_toml` reads back).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every rule (see [`Checked::from_rule`]).
    pub fn check(&self) -> Result<Vec<Checked>, PlanError> {
        if self.rules.len() > MAX_RULES {
            return Err(PlanError::TooManyRules {
                got: self.rules.len(),
            });
        }
        self.rules.iter().map(Checked::from_rule).collect()
    }
}

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read fault plan {path}: {error}")]
    Read { path: String, error: String },
    #[error("fault plan is not valid TOML for a plan: {0}")]
    Toml(String),
    #[error("fault plan has {got} rules; at most {MAX_RULES}")]
    TooManyRules { got: usize },
    #[error("rule {rule:?}: {field} = {got:?}: expected {want}")]
    Field {
        rule: String,
        field: &'static str,
        got: String,
        want: String,
    },
    #[error("rule {rule:?}: effect {effect:?} needs {field}")]
    Missing {
        rule: String,
        effect: &'static str,
        field: &'static str,
    },
    #[error("rule {rule:?}: {field} does not apply to effect {effect:?} ({why})")]
    NotApplicable {
        rule: String,
        effect: &'static str,
        field: &'static str,
        why: &'static str,
    },
}

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The command completes with this status and syndrome without executing.
    Status { status: CmdStatus, syndrome: u32 },
    /// The command never completes (its slot stays hardware-owned).
    Hang,
    /// The command executes and completes `Duration` late.
    Delay(Duration),
    /// The command is refused at delivery (`status_own`) without executing.
    Delivery(DeliveryStatus),
    /// The firmware dies: health syndrome set, health counter frozen, optionally BAR0
    /// all-ones. A command that triggers it never completes.
    Fatal {
        syndrome: u8,
        ext_syndrome: u16,
        all_ones: bool,
    },
    /// A successful SAVE's image gets `flips` bit flips at seeded offsets.
    CorruptSave { flips: u32 },
    /// A successful SAVE reports an image of `keep` bytes (default: half).
    TruncateSave { keep: Option<u64> },
    /// LOAD applies the firmware state and part of device memory, then fails.
    LoadFail,
    /// A DMA read of the device faults.
    DmaRead,
    /// A DMA write of the device faults.
    DmaWrite,
    /// SUSPEND_VHCA(initiator) of the function takes this much longer.
    SlowDrain(Duration),
    /// The vfio-user connection is closed after the message.
    DropConnection,
    /// The function is reset (FLR) while the command executes: it completes nothing.
    Flr,
}

impl Effect {
    /// The name a plan and the log use.
    pub fn name(&self) -> &'static str {
        match self {
            Effect::Status { .. } => "status",
            Effect::Hang => "hang",
            Effect::Delay(_) => "delay",
            Effect::Delivery(_) => "delivery",
            Effect::Fatal { .. } => "fatal",
            Effect::CorruptSave { .. } => "corrupt_save",
            Effect::TruncateSave { .. } => "truncate_save",
            Effect::LoadFail => "load_fail",
            Effect::DmaRead => "dma_read_fault",
            Effect::DmaWrite => "dma_write_fault",
            Effect::SlowDrain(_) => "slow_drain",
            Effect::DropConnection => "drop_connection",
            Effect::Flr => "flr",
        }
    }
}

/// Where a rule is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Each command a function's queue fetches.
    Command,
    /// Each DMA a function makes.
    Dma,
    /// Each SUSPEND_VHCA(initiator) of a function.
    Drain,
    /// Each vfio-user message a function's connection handles.
    Message,
    /// Once, when the rule is installed (a `fatal` with no command trigger).
    Now,
}

impl Site {
    pub fn name(self) -> &'static str {
        match self {
            Site::Command => "command",
            Site::Dma => "dma",
            Site::Drain => "drain",
            Site::Message => "message",
            Site::Now => "now",
        }
    }
}

/// A migration state as a `state` trigger names it (the firmware's suspend states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    Running,
    InitiatorSuspended,
    ResponderSuspended,
}

/// A rule, checked: parsed names, its site and effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub rule: Rule,
    pub site: Site,
    pub effect: Effect,
    pub opcode: Option<u16>,
    pub state: Option<StateFilter>,
}

fn by_name<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str, want: &str) -> Option<T> {
    let norm = |s: &str| {
        let u = s.trim().to_ascii_uppercase();
        u.strip_suffix("_ERR").map(str::to_string).unwrap_or(u)
    };
    let w = norm(want);
    all.iter().copied().find(|&v| norm(name(v)) == w)
}

fn names<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> String {
    all.iter().map(|&v| name(v)).collect::<Vec<_>>().join(", ")
}

impl Checked {
    /// Checks one rule: known effect and names, parameters in range, and no trigger
    /// its effect's site cannot honour.
    pub fn from_rule(r: &Rule) -> Result<Checked, PlanError> {
        let field = |field: &'static str, got: String, want: String| PlanError::Field {
            rule: r.name.clone(),
            field,
            got,
            want,
        };
        if r.name.is_empty() || r.name.len() > MAX_NAME || r.name.chars().any(char::is_control) {
            return Err(field(
                "name",
                r.name.clone(),
                format!("1..={MAX_NAME} printable characters"),
            ));
        }
        let opcode = r
            .opcode
            .as_deref()
            .map(|o| {
                by_name(Opcode::ALL, Opcode::name, o)
                    .map(u16::from)
                    .ok_or_else(|| {
                        field(
                            "opcode",
                            o.into(),
                            format!("a PRM opcode name ({})", names(Opcode::ALL, Opcode::name)),
                        )
                    })
            })
            .transpose()?;
        let state = r
            .state
            .as_deref()
            .map(|s| match s.trim().to_ascii_lowercase().as_str() {
                "running" => Ok(StateFilter::Running),
                "initiator_suspended" | "running_p2p" => Ok(StateFilter::InitiatorSuspended),
                "responder_suspended" | "stop" => Ok(StateFilter::ResponderSuspended),
                _ => Err(field(
                    "state",
                    s.into(),
                    "running, initiator_suspended or responder_suspended".into(),
                )),
            })
            .transpose()?;
        for (name, v) in [("nth", r.nth), ("every", r.every), ("times", r.times)] {
            if v == Some(0) {
                return Err(field(name, "0".into(), "1 or more".into()));
            }
        }
        if let Some(p) = r.probability {
            if !(0.0..=1.0).contains(&p) {
                return Err(field("probability", p.to_string(), "0.0..=1.0".into()));
            }
        }
        let delay = |what: &'static str| -> Result<Duration, PlanError> {
            let ms = r.delay_ms.ok_or(PlanError::Missing {
                rule: r.name.clone(),
                effect: what,
                field: "delay_ms",
            })?;
            let d = Duration::from_millis(ms);
            if d > MAX_DELAY {
                return Err(field(
                    "delay_ms",
                    ms.to_string(),
                    format!("at most {}", MAX_DELAY.as_millis()),
                ));
            }
            Ok(d)
        };
        let effect = match r.effect.trim() {
            "status" => {
                let s = r.status.as_deref().ok_or(PlanError::Missing {
                    rule: r.name.clone(),
                    effect: "status",
                    field: "status",
                })?;
                let status = by_name(CmdStatus::ALL, CmdStatus::name, s)
                    .filter(|&s| s != CmdStatus::Ok)
                    .ok_or_else(|| {
                        field(
                            "status",
                            s.into(),
                            format!(
                                "a failing PRM status ({})",
                                names(&CmdStatus::ALL[1..], CmdStatus::name)
                            ),
                        )
                    })?;
                Effect::Status {
                    status,
                    syndrome: r.syndrome.unwrap_or(0),
                }
            }
            "hang" => Effect::Hang,
            "delay" => Effect::Delay(delay("delay")?),
            "delivery" => {
                let d = match r.delivery.as_deref() {
                    None => DeliveryStatus::FwErr,
                    Some(s) => by_name(DeliveryStatus::ALL, DeliveryStatus::name, s)
                        .filter(|&d| d != DeliveryStatus::Ok)
                        .ok_or_else(|| {
                            field(
                                "delivery",
                                s.into(),
                                format!(
                                    "a failing delivery status ({})",
                                    names(&DeliveryStatus::ALL[1..], DeliveryStatus::name)
                                ),
                            )
                        })?,
                };
                Effect::Delivery(d)
            }
            "fatal" => Effect::Fatal {
                syndrome: r.health_syndrome.unwrap_or(HEALTH_SYND_FW_INTERNAL_ERR),
                ext_syndrome: r.ext_syndrome.unwrap_or(0),
                all_ones: r.all_ones.unwrap_or(false),
            },
            "corrupt_save" => {
                let flips = r.flips.unwrap_or(1);
                if flips == 0 || flips > MAX_FLIPS {
                    return Err(field(
                        "flips",
                        flips.to_string(),
                        format!("1..={MAX_FLIPS}"),
                    ));
                }
                Effect::CorruptSave { flips }
            }
            "truncate_save" => Effect::TruncateSave { keep: r.keep },
            "load_fail" => Effect::LoadFail,
            "dma_read_fault" => Effect::DmaRead,
            "dma_write_fault" => Effect::DmaWrite,
            "slow_drain" => Effect::SlowDrain(delay("slow_drain")?),
            "drop_connection" => Effect::DropConnection,
            "flr" => Effect::Flr,
            other => {
                return Err(field(
                    "effect",
                    other.into(),
                    "status, hang, delay, delivery, fatal, corrupt_save, truncate_save, \
                     load_fail, dma_read_fault, dma_write_fault, slow_drain, \
                     drop_connection or flr"
                        .into(),
                ))
            }
        };
        let command_triggers = opcode.is_some()
            || r.op_mod.is_some()
            || r.function.is_some()
            || r.nth.is_some()
            || r.every.is_some()
            || r.times.is_some()
            || r.probability.is_some()
            || r.after.is_some()
            || r.state.is_some();
        let site = match effect {
            Effect::DmaRead | Effect::DmaWrite => Site::Dma,
            Effect::SlowDrain(_) => Site::Drain,
            Effect::DropConnection => Site::Message,
            Effect::Fatal { .. } if !command_triggers => Site::Now,
            _ => Site::Command,
        };
        let name = effect.name();
        let not = |field: &'static str, why: &'static str| PlanError::NotApplicable {
            rule: r.name.clone(),
            effect: name,
            field,
            why,
        };
        if site != Site::Dma && r.dma.is_some() {
            return Err(not("dma", "only DMA faults count DMAs"));
        }
        if site != Site::Message && r.message.is_some() {
            return Err(not("message", "only drop_connection counts messages"));
        }
        if matches!(site, Site::Drain | Site::Message | Site::Dma)
            && (r.function.is_some() || r.after.is_some())
        {
            return Err(not(
                "function/after",
                "they select commands; use vhca_id for the function",
            ));
        }
        if matches!(site, Site::Drain | Site::Message) && (opcode.is_some() || r.op_mod.is_some()) {
            return Err(not("opcode/op_mod", "no command is executing there"));
        }
        match effect {
            Effect::CorruptSave { .. } | Effect::TruncateSave { .. }
                if opcode.is_some_and(|o| o != u16::from(Opcode::SaveVhcaState)) =>
            {
                return Err(not("opcode", "it changes SAVE_VHCA_STATE images only"));
            }
            Effect::LoadFail if opcode.is_some_and(|o| o != u16::from(Opcode::LoadVhcaState)) => {
                return Err(not("opcode", "it fails LOAD_VHCA_STATE only"));
            }
            _ => {}
        }
        Ok(Checked {
            rule: r.clone(),
            site,
            effect,
            opcode: match effect {
                Effect::CorruptSave { .. } | Effect::TruncateSave { .. } => {
                    Some(u16::from(Opcode::SaveVhcaState))
                }
                Effect::LoadFail => Some(u16::from(Opcode::LoadVhcaState)),
                _ => opcode,
            },
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
seed = 1
[[rule]]
name = "save fails once"
opcode = "SAVE_VHCA_STATE"
nth = 1
effect = "status"
status = "BAD_PARAM"
syndrome = 0x5a5a
"#;

    #[test]
    fn the_issue_example_parses_as_written() {
        let p = Plan::from_toml(ISSUE_EXAMPLE).unwrap();
        assert_eq!(p.seed, 1);
        let c = p.check().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].site, Site::Command);
        assert_eq!(c[0].opcode, Some(u16::from(Opcode::SaveVhcaState)));
        assert_eq!(
            c[0].effect,
            Effect::Status {
                status: CmdStatus::BadParamErr,
                syndrome: 0x5a5a
            }
        );
        // And back.
        assert_eq!(Plan::from_toml(&p.to_toml()).unwrap(), p);
    }

    #[test]
    fn bad_rules_are_refused_naming_rule_field_and_value() {
        let e = Plan::from_toml("[[rule]]\nname='x'\neffect='status'\nstatus='NOPE'\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"x\"") && e.contains("NOPE") && e.contains("BAD_PARAM"),
            "{e}"
        );
        let e = Plan::from_toml("[[rule]]\nname='x'\neffect='status'\nopcde='X'\n").unwrap_err();
        assert!(
            matches!(e, PlanError::Toml(ref m) if m.contains("opcde")),
            "{e}"
        );
        let e = Plan::from_toml("[[rule]]\nname='x'\neffect='delay'\n").unwrap_err();
        assert!(e.to_string().contains("delay_ms"), "{e}");
        let e = Plan::from_toml("[[rule]]\nname='x'\neffect='fly'\n").unwrap_err();
        assert!(e.to_string().contains("fly"), "{e}");
        let e = Plan::from_toml("[[rule]]\nname='x'\neffect='hang'\nnth=0\n").unwrap_err();
        assert!(e.to_string().contains("nth"), "{e}");
        let e =
            Plan::from_toml("[[rule]]\nname='x'\neffect='hang'\nprobability=2.0\n").unwrap_err();
        assert!(e.to_string().contains("probability"), "{e}");
        let e = Plan::from_toml(
            "[[rule]]\nname='x'\neffect='corrupt_save'\nopcode='LOAD_VHCA_STATE'\n",
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::NotApplicable { .. }), "{e}");
        let e = Plan::from_toml("[[rule]]\nname='x'\neffect='hang'\ndma=3\n").unwrap_err();
        assert!(matches!(e, PlanError::NotApplicable { .. }), "{e}");
    }

    #[test]
    fn a_fatal_without_command_triggers_fires_at_once() {
        let p = Plan::new(0).rule(Rule::new("dead", "fatal").vhca_id(1));
        assert_eq!(p.check().unwrap()[0].site, Site::Now);
        let p = Plan::new(0).rule(Rule::new("dead", "fatal").opcode(Opcode::QueryIssi));
        assert_eq!(p.check().unwrap()[0].site, Site::Command);
    }
}
