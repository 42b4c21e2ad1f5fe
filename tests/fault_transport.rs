//! Fault injection on the transport (issue 12): the vfio-user connection dropped
//! after message M, seen by a client and by the migration driver (ERROR: the command
//! may or may not have run), and the run-time control socket of a running `mlx5-emu`
//! with its CLI (add, list, clear, log).

use mlx5_emulator::fault::{Plan, Rule};
use mlx5_testbed::bins::arg;
use mlx5_testbed::child::{temp_dir, Emu};
use mlx5_testbed::migrate::Rig;
use mlx5_testbed::{init_tracing, run_emu, workspace_root, Testbed};
use mlx5vf::migration::fsm::MigState;
use vfu::uapi::VFIO_PCI_CONFIG_REGION_INDEX;

fn read_config(c: &mut vfu::Client) -> Result<(), vfu::VfuError> {
    let mut b = [0u8; 4];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut b)
}

/// `message = 3` on VF 0: the connection answers its first three messages (VERSION
/// and two reads) and closes; the client's fourth request fails. A new connection
/// counts from 1 again.
#[test]
fn a_connection_is_dropped_after_message_m() {
    init_tracing();
    let tb = Testbed::builder()
        .faults(Plan::new(1).rule(Rule::new("drop", "drop_connection").vhca_id(1).message(3)))
        .start();
    for round in 0..2 {
        let mut c = tb.vf_client(0);
        read_config(&mut c).expect("message 2");
        read_config(&mut c).expect("message 3");
        let e = read_config(&mut c).expect_err("message 4 was answered");
        eprintln!("round {round}: {e}");
    }
    let log = tb.faults().log().lines();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].contains("\"site\":\"message\"") && log[0].contains("\"seq\":3"),
        "{log:?}"
    );
    // The PF's connection is not touched.
    read_config(&mut tb.pf_client()).unwrap();
}

/// The PF's connection dropped under the migration driver (after the next message
/// it sends): the arc's command cannot complete and may or may not have run, so the
/// device reports ERROR (a deliberate difference from mlx5vf, whose PCIe does not fail
/// that way).
#[test]
fn a_pf_connection_dropped_mid_arc_puts_the_device_in_error() {
    init_tracing();
    let r = Rig::start();
    r.tb.faults()
        .add(&[Rule::new("drop pf", "drop_connection").vhca_id(0).nth(1)])
        .unwrap();
    let e = r.dev.set_state(MigState::Stop).unwrap_err();
    eprintln!(
        "RUNNING -> STOP, PF connection dropped: {e} [{}]",
        e.errno()
    );
    assert!(e.is_fatal(), "{e:?}");
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(r.tb.faults().log().total(), 1);
}

fn fault_cli(control: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let control = arg(control);
    let mut all = vec!["fault", "--control", &control];
    all.extend_from_slice(args);
    run_emu(&all)
}

/// A running `mlx5-emu --control PATH`: `mlx5-emu fault add` installs a ready plan's
/// rule (a fatal on the PF, at once: its health syndrome reads as set), `list` shows
/// it with its counters, `log` prints its JSON line, `clear` removes it (the firmware
/// recovers), and a bad plan is refused naming the field.
#[test]
fn the_control_socket_adds_lists_clears_and_logs_rules_of_a_running_emulator() {
    init_tracing();
    let dir = temp_dir("fault-control");
    let control = dir.path().join("control.sock");
    let mut emu = Emu::spawn(
        dir.path(),
        &[
            "--dir",
            &arg(dir.path()),
            "--log",
            "warn",
            "--control",
            &arg(&control),
        ],
    );
    emu.wait_for_sockets(&[dir.path().join("pf.sock"), control.clone()]);
    let synd = |c: &mut vfu::Client| {
        let mut b = [0u8; 4];
        c.region_read(vfu::uapi::VFIO_PCI_BAR0_REGION_INDEX, 0x23c, &mut b)
            .unwrap();
        b[1]
    };
    let mut pf = vfu::Client::connect(&dir.path().join("pf.sock")).unwrap();
    assert_eq!(synd(&mut pf), 0);

    let plan = workspace_root().join("fixtures/faults/firmware-fatal.toml");
    let (ok, out, err) = fault_cli(&control, &["add", &arg(&plan)]);
    assert!(ok && out.contains("added 1 rule"), "{out}{err}");
    assert_eq!(synd(&mut pf), 1, "the fatal did not land");

    let (ok, out, err) = fault_cli(&control, &["list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("\"firmware fatal\": effect fatal, matched 1, fired 1")
            && out.contains("ext_syndrome = 48879"),
        "{out}"
    );
    let (ok, out, _) = fault_cli(&control, &["log"]);
    assert!(
        ok && out.lines().count() == 1 && out.contains("\"rule\":\"firmware fatal\""),
        "{out}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nname = \"x\"\neffect = \"status\"\nstatus = \"MAYBE\"\n",
    )
    .unwrap();
    let (ok, _, err) = fault_cli(&control, &["add", &arg(&bad)]);
    assert!(
        !ok && err.contains("MAYBE") && err.contains("status"),
        "{err}"
    );

    let (ok, out, err) = fault_cli(&control, &["clear", "firmware fatal"]);
    assert!(ok && out.contains("removed 1 rule"), "{out}{err}");
    assert_eq!(synd(&mut pf), 0, "clearing did not recover the firmware");
    let (ok, out, _) = fault_cli(&control, &["list"]);
    assert!(ok && !out.contains("firmware fatal"), "{out}");
    drop(pf);
    let status = emu.stop_with(libc::SIGTERM);
    assert!(status.success(), "{}", emu.stderr_text());
    assert!(!control.exists(), "the control socket was left behind");

    // Without a running emulator the CLI says where it looked.
    let (ok, _, err) = fault_cli(&control, &["list"]);
    assert!(!ok && err.contains("--control"), "{err}");
}
