//! `mlx5-emu` as a user runs it: a child process in a fresh directory, found through
//! its sockets and its stdout, stopped with a signal.
//!
//! Every child sits in a guard that kills and reaps it on any way out of a test, and
//! every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// From spawning the emulator to its sockets (or its exit, when it must fail).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// From a signal to the process having exited.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary, built at most once per test process.
fn emu() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(mlx5_testbed::emu_binary)
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mlx5-emu-cli")
        .tempdir()
        .expect("temp dir")
}

/// A running `mlx5-emu`, killed and reaped when dropped.
struct Emu {
    child: Option<Child>,
    pid: libc::pid_t,
    stdout: Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Emu {
    /// Starts `mlx5-emu args...` with `dir` as its working directory.
    fn spawn(dir: &Path, args: &[&str]) -> Emu {
        let mut child = Command::new(emu())
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", emu().display()));
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // Readers on their own threads, so a chatty child never blocks on a full pipe
        // and reading never blocks the test.
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Emu {
            child: Some(child),
            pid,
            stdout: rx,
            stdout_seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// Waits up to `limit` for stdout lines until one satisfies `pred`; returns it.
    fn stdout_line(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.stdout_seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.stdout_seen.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until the "serving" line is out (printed after every socket is bound and
    /// every function listed) and returns every line printed so far.
    fn wait_serving(&mut self) -> Vec<String> {
        if self
            .stdout_line(START_TIMEOUT, |l| l.starts_with("serving"))
            .is_none()
        {
            let status = self.child().try_wait().ok().flatten();
            let stderr = self.kill_and_stderr();
            panic!(
                "mlx5-emu did not report serving within {START_TIMEOUT:?} (exit: {status:?}); stdout so far: {:?}; stderr: {stderr}",
                self.stdout_seen
            );
        }
        self.stdout_seen.clone()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped (the guard holds the
        // Child until it is waited for), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid,
            std::io::Error::last_os_error()
        );
    }

    /// Waits at most `limit` for the child to exit; `None` if it is still running.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child().try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The child's stderr after it exited (the pipe closes at exit).
    fn stderr_text(&mut self) -> String {
        match self.stderr.take() {
            Some(h) => h.join().unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Kills the child (if still running), reaps it, and returns its stderr.
    fn kill_and_stderr(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stderr_text()
    }

    /// Sends `sig` and expects a clean exit (status 0) within STOP_TIMEOUT.
    fn stop_with(&mut self, sig: libc::c_int) -> ExitStatus {
        self.signal(sig);
        match self.wait_exit(STOP_TIMEOUT) {
            Some(s) => s,
            None => panic!(
                "mlx5-emu still running {STOP_TIMEOUT:?} after signal {sig}; stderr: {}",
                self.kill_and_stderr()
            ),
        }
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (bounded) until every path exists as a socket that accepts connections.
fn wait_for_sockets(emu: &mut Emu, paths: &[PathBuf]) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if paths.iter().all(|p| UnixStream::connect(p).is_ok()) {
            return;
        }
        if let Some(status) = emu.child().try_wait().expect("try_wait") {
            panic!(
                "mlx5-emu exited ({status}) before serving {paths:?}; stderr: {}",
                emu.stderr_text()
            );
        }
        if Instant::now() >= deadline {
            let missing: Vec<_> = paths.iter().filter(|p| !p.exists()).collect();
            panic!(
                "sockets not served within {START_TIMEOUT:?}; missing files {missing:?}; stderr: {}",
                emu.kill_and_stderr()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
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
    wait_for_sockets(&mut emu, &socks);

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
    wait_for_sockets(&mut emu, &default_sockets(cwd.path()));
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
    wait_for_sockets(&mut emu, &socks);
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
    wait_for_sockets(&mut first, &socks);
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
    assert!(
        first.child().try_wait().expect("try_wait").is_none(),
        "first instance died"
    );
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
    wait_for_sockets(&mut emu, &socks);
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
    wait_for_sockets(&mut emu, &socks);
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
    let mut child = Command::new(emu())
        .current_dir(cwd.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Close the read end before the emulator prints what it serves.
    drop(child.stdout.take());
    let vf0 = cwd.path().join("mlx5-emu/vf0.sock");
    let deadline = Instant::now() + STOP_TIMEOUT;
    while !vf0.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    let alive = child.try_wait().unwrap().is_none();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(alive, "mlx5-emu exited when its stdout closed: {status}");
    assert!(status.success(), "{status}");
}
