//! Child processes of a test: `mlx5-emu` run as a user runs it, and scripts. Every
//! child sits in a guard that kills and reaps it (and, if asked, its process group) on
//! any way out of a test, and every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::testbed::Sockets;

/// From spawning the emulator to its sockets (or its exit, when it must fail).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// From a signal to the process having exited.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process (and, with `group`, its whole process group) that is killed and
/// reaped when dropped.
pub struct Guard {
    name: &'static str,
    child: Option<Child>,
    group: bool,
}

impl Guard {
    /// Spawns `cmd`; with `group` in a process group of its own, killed as a whole.
    pub fn spawn(name: &'static str, cmd: &mut Command, group: bool) -> Guard {
        if group {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Guard {
            name,
            child: Some(child),
            group,
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    pub fn pid(&self) -> libc::pid_t {
        let c = self.child.as_ref().expect("child already reaped");
        libc::pid_t::try_from(c.id()).expect("pid fits pid_t")
    }

    /// Exit status if the child has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let name = self.name;
        self.child()
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {name}: {e}"))
    }

    /// Waits at most `limit` for the child to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `limit`; on timeout kills the child (group) and returns `None`.
    pub fn wait_or_kill(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = self.wait_exit(limit);
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// Waits (bounded) until `path` exists; fails if the child exits first.
    pub fn wait_for_file(&mut self, path: &Path, limit: Duration) {
        let start = Instant::now();
        while !path.exists() {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before creating {}",
                    self.name,
                    path.display()
                );
            }
            assert!(
                start.elapsed() < limit,
                "{} did not create {} within {limit:?}",
                self.name,
                path.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid();
        // SAFETY: kill(2) with a pid we spawned and have not reaped (the guard holds the
        // Child until it is waited for), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Kills the child (and its group) if it still runs, and reaps it.
    pub fn kill(&mut self) {
        let group = self.group;
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                if group {
                    let pgid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
                    // SAFETY: kill(2) with a negative pid signals the process group that
                    // this guard created for the child (process_group(0)); no memory is
                    // involved.
                    unsafe {
                        libc::kill(-pgid, libc::SIGKILL);
                    }
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command running the workspace's `mlx5-emu`.
pub fn emu_command() -> Command {
    Command::new(crate::bins::emu_binary())
}

/// A running `mlx5-emu`, killed and reaped when dropped. Piped stdout and stderr are
/// read on threads of their own, so a chatty child never blocks on a full pipe and
/// reading never blocks the test.
pub struct Emu {
    proc: Guard,
    stdout: Option<Receiver<String>>,
    stdout_seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Emu {
    /// Starts `mlx5-emu args...` in `cwd`, stdout and stderr piped, no `RUST_LOG`.
    pub fn spawn(cwd: &Path, args: &[&str]) -> Emu {
        Emu::spawn_command(
            emu_command()
                .args(args)
                .current_dir(cwd)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
    }

    /// Starts `cmd` (an [`emu_command`] the caller configured).
    pub fn spawn_command(cmd: &mut Command) -> Emu {
        let mut proc = Guard::spawn("mlx5-emu", cmd, false);
        let stdout = proc.child().stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        let stderr = proc.child().stderr.take().map(|mut err| {
            thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                s
            })
        });
        Emu {
            proc,
            stdout,
            stdout_seen: Vec::new(),
            stderr,
        }
    }

    pub fn guard(&mut self) -> &mut Guard {
        &mut self.proc
    }

    /// Waits up to `limit` for stdout lines until one satisfies `pred`; returns it.
    pub fn stdout_line(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.stdout_seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let rx = self.stdout.as_ref().expect("stdout is piped");
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
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
    pub fn wait_serving(&mut self) -> Vec<String> {
        if self
            .stdout_line(START_TIMEOUT, |l| l.starts_with("serving"))
            .is_none()
        {
            let status = self.proc.try_wait();
            let stderr = self.kill_and_stderr();
            panic!(
                "mlx5-emu did not report serving within {START_TIMEOUT:?} (exit: {status:?}); stdout so far: {:?}; stderr: {stderr}",
                self.stdout_seen
            );
        }
        self.stdout_seen.clone()
    }

    /// Waits (bounded) until every path exists as a socket that accepts connections.
    pub fn wait_for_sockets(&mut self, paths: &[PathBuf]) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if paths.iter().all(|p| UnixStream::connect(p).is_ok()) {
                return;
            }
            if let Some(status) = self.proc.try_wait() {
                panic!(
                    "mlx5-emu exited ({status}) before serving {paths:?}; stderr: {}",
                    self.stderr_text()
                );
            }
            if Instant::now() >= deadline {
                let missing: Vec<_> = paths.iter().filter(|p| !p.exists()).collect();
                panic!(
                    "sockets not served within {START_TIMEOUT:?}; missing files {missing:?}; stderr: {}",
                    self.kill_and_stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.proc.try_wait()
    }

    /// Waits at most `limit` for the child to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(limit)
    }

    pub fn signal(&self, sig: libc::c_int) {
        self.proc.signal(sig);
    }

    /// The child's stderr after it exited (the pipe closes at exit).
    pub fn stderr_text(&mut self) -> String {
        match self.stderr.take() {
            Some(h) => h.join().unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Kills the child (if still running), reaps it, and returns its stderr.
    pub fn kill_and_stderr(&mut self) -> String {
        self.proc.kill();
        self.stderr_text()
    }

    /// Sends `sig` and waits up to [`STOP_TIMEOUT`] for the exit.
    pub fn stop_with(&mut self, sig: libc::c_int) -> ExitStatus {
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

/// An adapter in a second `mlx5-emu` process serving in a fresh temporary directory:
/// the same sockets as a [`crate::Testbed`], in another process.
pub struct ChildAdapter {
    pub emu: Emu,
    dir: tempfile::TempDir,
}

impl ChildAdapter {
    /// `mlx5-emu --vfs <vfs> --log warn --dir <temp>`, once its sockets accept.
    pub fn start(vfs: u16) -> ChildAdapter {
        let dir = temp_dir("mlx5-emu-child");
        let vfs_arg = vfs.to_string();
        let dir_arg = dir.path().to_str().expect("utf-8 temp path").to_string();
        let emu = Emu::spawn(
            dir.path(),
            &["--vfs", &vfs_arg, "--log", "warn", "--dir", &dir_arg],
        );
        let mut a = ChildAdapter { emu, dir };
        let mut socks = vec![a.pf_socket()];
        socks.extend((0..vfs).map(|n| a.vf_socket(n)));
        a.emu.wait_for_sockets(&socks);
        a
    }
}

impl Sockets for ChildAdapter {
    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A fresh temporary directory named `prefix...`, removed on drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}
