//! Fault injection on the command path (issue 12): an injected status, a command that
//! never completes, a late completion, a delivery error, an FLR while a command
//! executes, and DMA faults on the command entry and its output, each seen by
//! mlx5vf's command interface as a guest's mlx5_core would see it. Also: every ready
//! plan in fixtures/faults/ parses, and rules are added and cleared while the adapter
//! runs.

use std::time::{Duration, Instant};

use mlx5_emulator::fault::{Plan, Rule};
use mlx5_emulator::HcaState;
use mlx5_prm::cmdq::DeliveryStatus;
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::bringup::{cmdif, enable_hca_in, exec, query_issi_in, ARENA};
use mlx5_testbed::{init_tracing, workspace_root, Testbed};
use mlx5vf::cmdif::CmdError;

/// Commands expected never to complete.
const SHORT: Duration = Duration::from_millis(250);

fn testbed(rule: Rule) -> Testbed {
    Testbed::builder().faults(Plan::new(1).rule(rule)).start()
}

/// An injected status: the command completes with it (errno from the status) without
/// executing: the function stays disabled; the next ENABLE_HCA executes.
#[test]
fn an_injected_status_completes_the_command_without_executing_it() {
    init_tracing();
    let tb = testbed(
        Rule::new("refuse enable", "status")
            .opcode(Opcode::EnableHca)
            .function(1)
            .nth(1)
            .status(CmdStatus::BadSysStateErr, 0x1234),
    );
    let cmd = cmdif(tb.vf_client(0), ARENA);
    let e = exec(&cmd, enable_hca_in()).unwrap_err();
    assert!(
        matches!(
            e,
            CmdError::Status {
                status: CmdStatus::BadSysStateErr,
                syndrome: 0x1234,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), -libc::EIO, "{e}");
    assert_eq!(tb.vf(0).hca_state(), HcaState::Disabled, "it executed");
    exec(&cmd, enable_hca_in()).expect("the rule fired once");
    assert_eq!(tb.vf(0).hca_state(), HcaState::Enabled);
    let log = tb.faults().log().lines();
    assert_eq!(log.len(), 1);
    assert!(
        log[0].contains("\"opcode\":\"ENABLE_HCA\"") && log[0].contains("\"function\":1"),
        "{log:?}"
    );
}

/// A command that never completes: the driver's timeout fires (ETIMEDOUT), the slot
/// stays busy, and the next command takes another slot and completes.
#[test]
fn a_hung_command_times_out_and_the_next_one_completes() {
    init_tracing();
    let tb = testbed(
        Rule::new("hang", "hang")
            .opcode(Opcode::QueryIssi)
            .function(1)
            .nth(1),
    );
    let cmd = cmdif(tb.vf_client(0), ARENA);
    exec(&cmd, enable_hca_in()).unwrap();
    cmd.set_timeout(SHORT);
    let e = exec(&cmd, query_issi_in()).unwrap_err();
    assert!(matches!(e, CmdError::Timeout { .. }), "{e:?}");
    assert_eq!(e.errno(), -libc::ETIMEDOUT);
    assert_eq!(cmd.stuck_slots(), 1);
    exec(&cmd, query_issi_in()).expect("the next command");
}

/// A completion delayed by 300 ms: the command executes and completes with its
/// result, no earlier than the delay.
#[test]
fn a_delayed_command_completes_late_with_its_result() {
    init_tracing();
    let d = Duration::from_millis(300);
    let tb = testbed(
        Rule::new("late", "delay")
            .opcode(Opcode::EnableHca)
            .function(1)
            .delay(d),
    );
    let cmd = cmdif(tb.vf_client(0), ARENA);
    let t = Instant::now();
    exec(&cmd, enable_hca_in()).expect("a late completion is a completion");
    assert!(t.elapsed() >= d, "completed after {:?}", t.elapsed());
    assert_eq!(tb.vf(0).hca_state(), HcaState::Enabled);
}

/// A delivery error (SIGNAT_ERR in status_own): the driver reports the delivery
/// status and the command did not execute.
#[test]
fn a_delivery_error_is_reported_and_the_command_does_not_execute() {
    init_tracing();
    let tb = testbed(
        Rule::new("bad sig", "delivery")
            .opcode(Opcode::EnableHca)
            .nth(1)
            .delivery(DeliveryStatus::SignatureErr),
    );
    let cmd = cmdif(tb.vf_client(0), ARENA);
    let e = exec(&cmd, enable_hca_in()).unwrap_err();
    assert!(
        matches!(
            e,
            CmdError::Delivery {
                status: DeliveryStatus::SignatureErr,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(tb.vf(0).hca_state(), HcaState::Disabled);
    exec(&cmd, enable_hca_in()).unwrap();
}

/// An FLR arriving while ENABLE_HCA executes: nothing is written back (the driver
/// times out), the function is back in its power-on state, and a driver that
/// programs the queue again finds it working.
#[test]
fn an_flr_during_a_command_writes_nothing_back_and_resets_the_function() {
    init_tracing();
    let tb = testbed(
        Rule::new("flr", "flr")
            .opcode(Opcode::EnableHca)
            .function(1)
            .nth(1),
    );
    let epoch = tb.vf(0).epoch();
    {
        let cmd = cmdif(tb.vf_client(0), ARENA);
        cmd.set_timeout(SHORT);
        let e = exec(&cmd, enable_hca_in()).unwrap_err();
        assert!(matches!(e, CmdError::Timeout { .. }), "{e:?}");
    }
    assert_eq!(tb.vf(0).epoch(), epoch + 1, "no reset happened");
    assert_eq!(tb.vf(0).hca_state(), HcaState::Disabled);
    let cmd = cmdif(tb.vf_client(0), ARENA);
    exec(&cmd, enable_hca_in()).expect("after the reset");
    assert_eq!(tb.vf(0).hca_state(), HcaState::Enabled);
}

/// A DMA read fault on the command entry (the first DMA read the VF makes after the
/// rule is added: the doorbell's entry fetch): the slot cannot be served, the command
/// times out, and the next one completes.
#[test]
fn a_dma_read_fault_on_the_command_entry_leaves_the_command_uncompleted() {
    init_tracing();
    let tb = Testbed::start(1);
    let cmd = cmdif(tb.vf_client(0), ARENA);
    exec(&cmd, enable_hca_in()).unwrap();
    tb.faults()
        .add(&[Rule::new("entry", "dma_read_fault").vhca_id(1).nth(1)])
        .unwrap();
    cmd.set_timeout(SHORT);
    let e = exec(&cmd, query_issi_in()).unwrap_err();
    assert!(matches!(e, CmdError::Timeout { .. }), "{e:?}");
    let log = tb.faults().log().lines();
    assert!(
        log.len() == 1 && log[0].contains("\"effect\":\"dma_read_fault\""),
        "{log:?}"
    );
    exec(&cmd, query_issi_in()).expect("the next command");
}

/// A DMA write fault on the command's output (the first DMA write after it executed:
/// the inline output): the device completes it with delivery status FW_ERR.
#[test]
fn a_dma_write_fault_on_the_output_completes_with_a_delivery_error() {
    init_tracing();
    let tb = Testbed::start(1);
    let cmd = cmdif(tb.vf_client(0), ARENA);
    exec(&cmd, enable_hca_in()).unwrap();
    tb.faults()
        .add(&[Rule::new("output", "dma_write_fault").vhca_id(1).nth(1)])
        .unwrap();
    let e = exec(&cmd, query_issi_in()).unwrap_err();
    assert!(
        matches!(
            e,
            CmdError::Delivery {
                status: DeliveryStatus::FwErr,
                ..
            }
        ),
        "{e:?}"
    );
    exec(&cmd, query_issi_in()).expect("the next command");
}

/// Rules added and cleared while the adapter runs: a hang added for every QUERY_ISSI
/// holds until it is cleared, and list shows its counters.
#[test]
fn rules_are_added_and_cleared_while_the_adapter_runs() {
    init_tracing();
    let tb = Testbed::start(1);
    let cmd = cmdif(tb.vf_client(0), ARENA);
    exec(&cmd, enable_hca_in()).unwrap();
    exec(&cmd, query_issi_in()).unwrap();
    tb.faults()
        .add(&[Rule::new("issi", "hang").opcode(Opcode::QueryIssi)])
        .unwrap();
    cmd.set_timeout(SHORT);
    for _ in 0..2 {
        assert!(matches!(
            exec(&cmd, query_issi_in()),
            Err(CmdError::Timeout { .. })
        ));
    }
    let rules = tb.faults().rules();
    assert_eq!((rules.len(), rules[0].matches, rules[0].fired), (1, 2, 2));
    assert_eq!(tb.faults().clear(Some("issi")), 1);
    exec(&cmd, query_issi_in()).expect("cleared");
    assert!(tb.faults().rules().is_empty());
}

/// Every ready plan in fixtures/faults/ parses, and together they cover every effect.
#[test]
fn every_ready_plan_parses_and_the_plans_cover_every_effect() {
    let dir = workspace_root().join("fixtures/faults");
    let mut effects = std::collections::BTreeSet::new();
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let plan = Plan::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!plan.rules.is_empty(), "{}", p.display());
        effects.extend(plan.rules.iter().map(|r| r.effect.clone()));
        n += 1;
    }
    let all = [
        "status",
        "hang",
        "delay",
        "delivery",
        "fatal",
        "corrupt_save",
        "truncate_save",
        "load_fail",
        "dma_read_fault",
        "dma_write_fault",
        "slow_drain",
        "drop_connection",
        "flr",
    ];
    for e in all {
        assert!(effects.contains(e), "no ready plan for {e}");
    }
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    for e in all {
        assert!(
            readme.contains(&format!("`{e}`")),
            "README does not document {e}"
        );
    }
    assert!(n >= 13);
}
