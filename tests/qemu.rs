//! A real VMM attaches the VF: QEMU 11.1's `vfio-user-pci` connects to `mlx5-emu`'s
//! `vf0.sock`, and a real Linux guest reports, from its own sysfs, the PCI function it
//! found.
//!
//! The guest (a Debian trixie kernel and a busybox initramfs) and QEMU (from
//! trixie-backports, run chrooted in a trixie root) are prepared once by
//! `fixtures/qemu/prepare.sh` in a cache outside the checkout
//! (`$MLX5_EMU_CACHE`, default `~/.cache/mlx5-emu`); `fixtures/qemu/run-guest.sh`
//! boots it. Both need root. When the host cannot prepare the guest, this test fails
//! and says why: it never passes without having booted the guest.
//!
//! `MLX5_EMU_BIN=/path/to/mlx5-emu` tests that binary instead of the workspace's.
//!
//! On failure the emulator's stderr, QEMU's stderr and the full serial console are
//! printed, and the directory holding them is kept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A cold prepare (debootstrap and packages) takes about a minute; leave room for a
/// slow mirror.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// From starting `mlx5-emu` to its `vf0.sock` appearing.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's own limit inside run-guest.sh; a TCG boot takes about 5 s here.
const GUEST_TIMEOUT_SECS: u64 = 240;
/// Our limit on run-guest.sh as a whole, beyond QEMU's.
const GUEST_WAIT: Duration = Duration::from_secs(GUEST_TIMEOUT_SECS + 30);

/// The VF as designed (ARCHITECTURE.md, mlx5-device.md section 1).
const VENDOR: &str = "0x15b3";
const DEVICE: &str = "0x101e";
const CLASS: &str = "0x020000";
const BAR0_SIZE: u64 = 32 << 20;
const MSIX_VECTORS: u64 = 16;

/// A child process (and, with `group`, its whole process group) that is killed and
/// reaped when dropped, on every path out of the test.
struct Guard {
    name: &'static str,
    child: Option<Child>,
    group: bool,
}

impl Guard {
    fn spawn(name: &'static str, cmd: &mut Command, group: bool) -> Guard {
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

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// Exit status if the child has ended.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let name = self.name;
        self.child()
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {name}: {e}"))
    }

    /// Waits at most `limit`; on timeout kills the child (group) and returns `None`.
    fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= limit {
                self.kill();
                return None;
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
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

/// The directory of sockets and logs. When the test panics, it prints every log and
/// keeps the directory.
struct Logs {
    dir: Option<tempfile::TempDir>,
    files: Vec<(&'static str, PathBuf)>,
}

impl Logs {
    fn new() -> Logs {
        let dir = tempfile::Builder::new()
            .prefix("mlx5-emu-qemu-")
            .tempdir()
            .expect("create a temporary directory");
        Logs {
            dir: Some(dir),
            files: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("log dir").path()
    }

    /// A new log file in the directory, printed on failure under `title`.
    fn file(&mut self, name: &str, title: &'static str) -> (PathBuf, File) {
        let path = self.path().join(name);
        let file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        self.files.push((title, path.clone()));
        (path, file)
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (title, path) in &self.files {
            let text = fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("<cannot read: {e}>"));
            eprintln!(
                "\n===== {title} ({}) =====\n{text}\n===== end of {title} =====",
                path.display()
            );
        }
        if let Some(dir) = self.dir.take() {
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

fn qemu_dir() -> PathBuf {
    mlx5_testbed::workspace_root().join("fixtures/qemu")
}

/// Runs prepare.sh (cached; a no-op when the guest is ready). Fails loudly with the
/// script's reason when the host cannot prepare the guest.
fn prepare(logs: &mut Logs) {
    let (_, out) = logs.file("prepare.log", "prepare.sh output");
    let err = out.try_clone().expect("dup log fd");
    let start = Instant::now();
    let mut guard = Guard::spawn(
        "fixtures/qemu/prepare.sh",
        Command::new("bash")
            .arg(qemu_dir().join("prepare.sh"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err),
        true,
    );
    let status = guard.wait_timeout(PREPARE_TIMEOUT);
    let log = fs::read_to_string(logs.path().join("prepare.log")).unwrap_or_default();
    let reason: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    match status {
        None => panic!("QEMU guest harness: prepare.sh did not finish within {PREPARE_TIMEOUT:?}"),
        Some(s) if !s.success() => panic!(
            "QEMU guest harness: this host cannot prepare the guest (prepare.sh: {s}). \
             It needs root, apt-get (for debootstrap) and Debian's mirror.\n{}",
            reason.join("\n")
        ),
        Some(_) => eprintln!("prepare.sh: {:.1?}", start.elapsed()),
    }
}

/// One `MLX5EMU-<KIND> key=value ...` line.
#[derive(Debug)]
struct Marker {
    kind: String,
    fields: BTreeMap<String, String>,
}

impl Marker {
    fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("marker {} has no {key}: {self:?}", self.kind))
    }

    fn hex(&self, key: &str) -> u64 {
        let v = self.get(key);
        u64::from_str_radix(v.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("{key}={v} is not hex: {e}"))
    }
}

/// The markers the guest's /init printed (fixtures/qemu/init.sh), in order. Kernel
/// messages may precede a marker on its line, so markers are found anywhere in a line.
fn parse_markers(serial: &str) -> Vec<Marker> {
    serial
        .lines()
        .filter_map(|line| {
            let at = line.find("MLX5EMU-")?;
            let mut words = line[at + "MLX5EMU-".len()..].split_whitespace();
            let kind = words.next()?.to_string();
            let fields = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some(Marker { kind, fields })
        })
        .collect()
}

fn decode_hex(s: &str) -> Vec<u8> {
    let pairs = s.as_bytes().chunks_exact(2);
    assert!(pairs.remainder().is_empty(), "odd-length hex dump {s:?}");
    pairs
        .map(|p| {
            let p = std::str::from_utf8(p).expect("ascii hex");
            u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("hex byte {p:?}: {e}"))
        })
        .collect()
}

/// Config-space offsets QEMU passes through to the guest unchanged: IDs, revision and
/// class code, header type, subsystem IDs, capability pointer. QEMU virtualizes command,
/// status, BARs and interrupt line, so those are not compared.
const PASSED_THROUGH: &[usize] = &[
    0x00, 0x01, 0x02, 0x03, 0x08, 0x09, 0x0a, 0x0b, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f, 0x34,
];

/// The first 64 bytes of the VF's config space as our own vfio-user client reads them.
fn config_from_our_client(socket: &Path) -> Vec<u8> {
    let mut c = vfu::Client::connect(socket).expect("our client connects after the guest");
    let mut b = vec![0u8; 64];
    c.region_read(vfu::uapi::VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut b)
        .expect("config read");
    b
}

#[test]
fn qemu_guest_sees_the_vf() {
    let mut logs = Logs::new();
    prepare(&mut logs);

    // The emulator, serving pf.sock and vf0.sock in the log directory.
    // MLX5_EMU_BIN runs another build (or a stand-in) taking the same `--dir DIR`.
    let emu = match std::env::var_os("MLX5_EMU_BIN") {
        Some(path) => PathBuf::from(path),
        None => mlx5_testbed::emu_binary(),
    };
    let dir = logs.path().to_path_buf();
    let (_, emu_out) = logs.file("emu.stdout", "mlx5-emu stdout");
    let (_, emu_err) = logs.file("emu.stderr", "mlx5-emu stderr");
    let mut emulator = Guard::spawn(
        "mlx5-emu",
        Command::new(&emu)
            .arg("--dir")
            .arg(&dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(emu_out)
            .stderr(emu_err),
        false,
    );
    let socket = dir.join("vf0.sock");
    let start = Instant::now();
    while !socket.exists() {
        if let Some(status) = emulator.try_wait() {
            panic!(
                "mlx5-emu exited ({status}) before creating {}",
                socket.display()
            );
        }
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "mlx5-emu did not create {} within {SOCKET_TIMEOUT:?}",
            socket.display()
        );
        sleep(Duration::from_millis(20));
    }

    // The guest, with vf0.sock attached; serial console to serial.log.
    let (serial_path, serial) = logs.file("serial.log", "guest serial console");
    let (_, qemu_err) = logs.file("qemu.stderr", "QEMU stderr");
    let boot = Instant::now();
    let mut guest = Guard::spawn(
        "fixtures/qemu/run-guest.sh",
        Command::new("bash")
            .arg(qemu_dir().join("run-guest.sh"))
            .arg(&socket)
            .env("MLX5_EMU_GUEST_TIMEOUT", GUEST_TIMEOUT_SECS.to_string())
            .stdin(Stdio::null())
            .stdout(serial)
            .stderr(qemu_err),
        true,
    );
    let status = guest.wait_timeout(GUEST_WAIT);
    let boot_time = boot.elapsed();
    let serial =
        String::from_utf8_lossy(&fs::read(&serial_path).expect("read serial log")).into_owned();
    let markers = parse_markers(&serial);
    eprintln!(
        "guest: {boot_time:.1?}, status {status:?}, {} markers; emulator {}",
        markers.len(),
        match emulator.try_wait() {
            Some(s) => format!("exited: {s}"),
            None => "still running".into(),
        }
    );

    if let Some(s) = emulator.try_wait() {
        assert!(s.success(), "mlx5-emu died while the guest ran: {s}");
    }
    let status = status.unwrap_or_else(|| panic!("the guest did not finish within {GUEST_WAIT:?}"));
    assert!(
        markers.iter().any(|m| m.kind == "DONE"),
        "the guest did not reach MLX5EMU-DONE (run-guest.sh: {status})"
    );
    assert!(status.success(), "QEMU did not exit cleanly: {status}");
    for step in markers.iter().filter(|m| m.kind == "STEP") {
        assert_eq!(step.get("status"), "ok", "guest step failed: {step:?}");
    }

    // The device, as the guest's sysfs reports it.
    let ours: Vec<&Marker> = markers
        .iter()
        .filter(|m| m.kind == "PCI" && m.get("vendor") == VENDOR)
        .collect();
    let seen: Vec<String> = markers
        .iter()
        .filter(|m| m.kind == "PCI")
        .map(|m| format!("{} {}:{}", m.get("slot"), m.get("vendor"), m.get("device")))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "expected exactly one {VENDOR} function in the guest; its PCI functions: {seen:?}"
    );
    let vf = ours[0];
    let slot = vf.get("slot");
    assert_eq!(vf.get("device"), DEVICE, "device id of {slot}");
    assert_eq!(vf.get("class"), CLASS, "class code of {slot}");
    assert_eq!(vf.hex("bar0"), BAR0_SIZE, "BAR0 size of {slot}: {vf:?}");
    let msix: u64 = vf
        .get("msix")
        .parse()
        .unwrap_or_else(|e| panic!("msix of {slot}: {e}"));
    assert!(
        msix >= 8,
        "{slot} has {msix} MSI-X vectors, mlx5_core wants >= 8"
    );
    assert_eq!(msix, MSIX_VECTORS, "MSI-X vector count of {slot}: {vf:?}");

    // The config space the guest read through QEMU against what our client reads.
    let cfg = markers
        .iter()
        .find(|m| m.kind == "CFG" && m.get("slot") == slot)
        .unwrap_or_else(|| panic!("no config dump of {slot}"));
    let bytes = decode_hex(cfg.get("hex"));
    assert_eq!(bytes.len(), 64, "config dump of {slot} is not 64 bytes");
    let ours_cfg = config_from_our_client(&socket);
    for &offset in PASSED_THROUGH {
        assert_eq!(
            bytes[offset], ours_cfg[offset],
            "config byte {offset:#04x} of {slot}: guest read {:#04x}, our client reads {:#04x}",
            bytes[offset], ours_cfg[offset]
        );
    }
    assert_eq!(&ours_cfg[0..4], &[0xb3, 0x15, 0x1e, 0x10], "15b3:101e");
    // The dump agrees with the sysfs fields it was reported beside.
    assert_eq!(
        u64::from(u16::from_le_bytes([bytes[0], bytes[1]])),
        vf.hex("vendor")
    );
    assert_eq!(
        u64::from(u16::from_le_bytes([bytes[2], bytes[3]])),
        vf.hex("device")
    );

    eprintln!(
        "guest saw {slot}: {VENDOR}:{DEVICE} class {CLASS}, BAR0 {:#x}, {msix} MSI-X vectors",
        vf.hex("bar0")
    );
    drop(guest);
    drop(emulator);
}
