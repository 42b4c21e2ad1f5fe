//! `mlx5-emu` as a user runs it: a child process in a fresh directory, found through
//! its sockets and its stdout, stopped with a signal.
//!
//! Every child sits in a guard that kills and reaps it on any way out of a test, and
//! every wait is bounded.

use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use mlx5_testbed::child::{emu_command, Emu, Guard, START_TIMEOUT, STOP_TIMEOUT};
use mlx5_testbed::wait::eventually;

fn temp_dir() -> tempfile::TempDir {
    mlx5_testbed::child::temp_dir("mlx5-emu-cli")
}

/// Socket files left in `dir` (none when it does not exist).
fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect()
}

fn assert_clean_exit(status: ExitStatus, emu: &mut Emu, what: &str) {
    assert!(
        status.success(),
        "{what}: expected exit status 0, got {status} (signal {:?}); stderr: {}",
        status.signal(),
        emu.stderr_text()
    );
}

/// The default layout: `./mlx5-emu/{pf,vf0}.sock`.
fn default_sockets(cwd: &Path) -> Vec<PathBuf> {
    let d = cwd.join("mlx5-emu");
    vec![d.join("pf.sock"), d.join("vf0.sock")]
}

#[test]
fn no_arguments_serves_pf_and_vf0_in_cwd_and_sigterm_exits_cleanly() {
    let cwd = temp_dir();
    let mut emu = Emu::spawn(cwd.path(), &[]);
    let socks = default_sockets(cwd.path());
    emu.wait_for_sockets(&socks);

    let lines = emu.wait_serving();
    let vf = lines
        .iter()
        .find(|l| l.contains("vf0.sock"))
        .unwrap_or_else(|| panic!("no stdout line names vf0.sock: {lines:?}"));
    assert!(vf.contains("15b3:101e"), "VF line lacks 15b3:101e: {vf:?}");
    assert!(
        lines.iter().any(|l| l.contains("pf.sock")),
        "no stdout line names pf.sock: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("vf1.sock")),
        "one VF by default: {lines:?}"
    );

    let status = emu.stop_with(libc::SIGTERM);
    assert_clean_exit(status, &mut emu, "SIGTERM");
    let left = sockets_in(&cwd.path().join("mlx5-emu"));
    assert!(left.is_empty(), "socket files left after SIGTERM: {left:?}");
}

#[test]
fn sigint_stops_like_sigterm() {
    let cwd = temp_dir();
    let mut emu = Emu::spawn(cwd.path(), &[]);
    emu.wait_for_sockets(&default_sockets(cwd.path()));
    emu.wait_serving();

    let status = emu.stop_with(libc::SIGINT);
    assert_clean_exit(status, &mut emu, "SIGINT");
    let left = sockets_in(&cwd.path().join("mlx5-emu"));
    assert!(left.is_empty(), "socket files left after SIGINT: {left:?}");
}

#[test]
fn sigterm_while_a_client_is_connected_still_exits_cleanly() {
    let cwd = temp_dir();
    let mut emu = Emu::spawn(cwd.path(), &[]);
    let socks = default_sockets(cwd.path());
    emu.wait_for_sockets(&socks);
    emu.wait_serving();

    // A client that connects and then says nothing: the server is blocked reading it.
    let idle = UnixStream::connect(&socks[1]).expect("connect vf0.sock");
    let status = emu.stop_with(libc::SIGTERM);
    assert_clean_exit(status, &mut emu, "SIGTERM with a client connected");
    drop(idle);
    let left = sockets_in(&cwd.path().join("mlx5-emu"));
    assert!(left.is_empty(), "socket files left: {left:?}");
}

#[test]
fn second_instance_on_live_sockets_fails_and_leaves_the_first_serving() {
    let cwd = temp_dir();
    let mut first = Emu::spawn(cwd.path(), &[]);
    let socks = default_sockets(cwd.path());
    first.wait_for_sockets(&socks);
    first.wait_serving();

    let mut second = Emu::spawn(cwd.path(), &[]);
    let status = match second.wait_exit(START_TIMEOUT) {
        Some(s) => s,
        None => panic!(
            "second mlx5-emu on live sockets still running after {START_TIMEOUT:?}; stderr: {}",
            second.kill_and_stderr()
        ),
    };
    let err = second.stderr_text();
    assert!(
        !status.success(),
        "second instance must fail, got {status}; stderr: {err}"
    );
    assert!(
        status.code().is_some(),
        "second instance must exit, not die of a signal: {status}"
    );
    assert!(
        err.contains(".sock"),
        "the error names the socket in use: {err:?}"
    );

    // The failed start took nothing away from the first instance.
    assert!(first.try_wait().is_none(), "first instance died");
    for p in &socks {
        assert!(
            UnixStream::connect(p).is_ok(),
            "{} no longer served after the failed second start",
            p.display()
        );
    }
    let status = first.stop_with(libc::SIGTERM);
    assert_clean_exit(status, &mut first, "first instance SIGTERM");
}

#[test]
fn stale_socket_files_are_replaced() {
    let cwd = temp_dir();
    let socks = default_sockets(cwd.path());
    std::fs::create_dir_all(cwd.path().join("mlx5-emu")).expect("mkdir");
    for p in &socks {
        // std's UnixListener leaves its file behind on drop: a stale socket.
        drop(UnixListener::bind(p).expect("bind stale socket"));
        assert!(p.exists(), "stale socket file {} exists", p.display());
        assert!(UnixStream::connect(p).is_err(), "and nobody listens on it");
    }

    let mut emu = Emu::spawn(cwd.path(), &[]);
    emu.wait_for_sockets(&socks);
    let lines = emu.wait_serving();
    assert!(
        lines.iter().any(|l| l.contains("vf0.sock")),
        "serving vf0 over the stale file: {lines:?}"
    );
    let status = emu.stop_with(libc::SIGTERM);
    assert_clean_exit(status, &mut emu, "SIGTERM");
    let left = sockets_in(&cwd.path().join("mlx5-emu"));
    assert!(left.is_empty(), "socket files left: {left:?}");
}

#[test]
fn dir_and_vfs_options_serve_pf_and_three_vfs() {
    let cwd = temp_dir();
    let sock_dir = cwd.path().join("sockets").join("nested");
    let dir_arg = sock_dir.to_str().expect("utf-8 temp path");
    let mut emu = Emu::spawn(cwd.path(), &["--dir", dir_arg, "--vfs", "3"]);
    let socks: Vec<PathBuf> = ["pf.sock", "vf0.sock", "vf1.sock", "vf2.sock"]
        .iter()
        .map(|n| sock_dir.join(n))
        .collect();
    emu.wait_for_sockets(&socks);
    let lines = emu.wait_serving();

    let mut found = sockets_in(&sock_dir);
    found.sort();
    let mut want = socks.clone();
    want.sort();
    assert_eq!(found, want, "exactly pf.sock and vf0..vf2.sock");
    assert!(
        !cwd.path().join("mlx5-emu").exists(),
        "--dir replaces the default directory"
    );
    for n in 0..3 {
        let name = format!("vf{n}.sock");
        let line = lines
            .iter()
            .find(|l| l.contains(&name))
            .unwrap_or_else(|| panic!("no stdout line for {name}: {lines:?}"));
        assert!(line.contains("15b3:101e"), "{name} line: {line:?}");
    }

    let status = emu.stop_with(libc::SIGTERM);
    assert_clean_exit(status, &mut emu, "SIGTERM");
    let left = sockets_in(&sock_dir);
    assert!(left.is_empty(), "socket files left: {left:?}");
}

#[test]
fn a_file_that_is_not_a_socket_is_never_removed() {
    let cwd = temp_dir();
    let dir = cwd.path().join("mlx5-emu");
    std::fs::create_dir_all(&dir).unwrap();
    let precious = dir.join("pf.sock");
    std::fs::write(&precious, b"precious").unwrap();
    let mut emu = Emu::spawn(cwd.path(), &[]);
    let status = emu
        .wait_exit(STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("mlx5-emu kept running: {}", emu.kill_and_stderr()));
    assert!(!status.success(), "expected a failure, got {status}");
    let err = emu.stderr_text();
    assert!(err.contains("not a socket"), "stderr: {err}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
}

#[test]
fn a_closed_stdout_does_not_stop_the_server() {
    let cwd = temp_dir();
    let mut child = Guard::spawn(
        "mlx5-emu",
        emu_command()
            .current_dir(cwd.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        false,
    );
    // Close the read end before the emulator prints what it serves.
    drop(child.child().stdout.take());
    let vf0 = cwd.path().join("mlx5-emu/vf0.sock");
    eventually(STOP_TIMEOUT, || vf0.exists());
    thread::sleep(Duration::from_millis(300));
    let alive = child.try_wait().is_none();
    child.signal(libc::SIGTERM);
    let status = child
        .wait_exit(STOP_TIMEOUT)
        .expect("mlx5-emu exits after SIGTERM");
    assert!(alive, "mlx5-emu exited when its stdout closed: {status}");
    assert!(status.success(), "{status}");
}
