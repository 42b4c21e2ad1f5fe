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
//! Guest kernels are named as in `fixtures/qemu/kernels.sh`, the one place their
//! versions are pinned ([`KERNELS`]: Debian trixie's 6.12 and trixie-backports' 7.3).
//!
//! `qemu_guest_sees_the_vf` checks the PCI function the guest finds;
//! `guest_mlx5_core_probes_the_vf_on_*` load each kernel's own mlx5_core, unbind and
//! bind it twice, and check the guest's kernel log and the emulator's command log;
//! `guest_vfio_selftests_pass_behind_a_viommu` runs Linux 7.3's VFIO selftests against
//! the VF behind QEMU's intel-iommu (fixtures/qemu/README.md says how), among them
//! `vfio_pci_driver_test` with our mlx5 driver (fixtures/qemu/selftest-driver).
//! `guest_mlx5_core_reports_a_firmware_fatal_injected_at_run_time` kills the VF's
//! firmware through the fault control socket and finds the guest's health report.
//!
//! `MLX5_EMU_BIN=/path/to/mlx5-emu` tests that binary instead of the workspace's.
//!
//! On failure the emulator's stderr, QEMU's stderr and the full serial console are
//! printed, and the directory holding them is kept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mlx5_testbed::child::Guard;

/// A cold prepare (debootstrap and packages) takes about a minute; leave room for a
/// slow mirror.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// From starting `mlx5-emu` to its `vf0.sock` appearing.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's own limit inside run-guest.sh; a TCG boot takes about 5 s here.
const GUEST_TIMEOUT_SECS: u64 = 240;

/// The VF as designed (ARCHITECTURE.md, mlx5-device.md section 1).
const VENDOR: &str = "0x15b3";
const DEVICE: &str = "0x101e";
const CLASS: &str = "0x020000";
const BAR0_SIZE: u64 = 32 << 20;
const MSIX_VECTORS: u64 = 16;

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

    /// A new log file in the directory, printed on failure under `title` (a name asked
    /// for again starts that file afresh).
    fn file(&mut self, name: &str, title: &'static str) -> (PathBuf, File) {
        let path = self.path().join(name);
        let file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        if !self.files.iter().any(|(_, p)| *p == path) {
            self.files.push((title, path.clone()));
        }
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

/// The guest kernels, by their names in `fixtures/qemu/kernels.sh` (which pins their
/// versions); the first is the default one.
const KERNELS: &[&str] = &["6.12", "7.3"];

/// A guest to prepare and boot: its kernel, what prepare.sh builds for it beyond the
/// kernel and initramfs, and the machine run-guest.sh gives it.
#[derive(Clone, Copy, Debug)]
struct Guest {
    /// A name from [`KERNELS`] (prepare.sh's and run-guest.sh's `MLX5_EMU_KERNEL`).
    kernel: &'static str,
    /// prepare.sh's `MLX5_EMU_WITH` extras: "source" (toolchain and unpacked
    /// linux-source in the root), "selftests" (the VFIO selftests in the initramfs),
    /// "mlx5vfio" (mlx5-vfio-pci.ko and mlx5emu_virtfn.ko in the initramfs).
    with: &'static [&'static str],
    /// intel-iommu (caching mode) in front of the device, `intel_iommu=on` in the guest
    /// (run-guest.sh's `MLX5_EMU_VIOMMU`).
    viommu: bool,
    /// Guest RAM, in QEMU's size syntax.
    mem: &'static str,
}

impl Guest {
    /// The plain guest on `kernel`: 512 MiB, no IOMMU, no extras.
    const fn on(kernel: &'static str) -> Guest {
        Guest {
            kernel,
            with: &[],
            viommu: false,
            mem: "512M",
        }
    }

    /// The plain guest on the default kernel.
    fn default_kernel() -> Guest {
        Guest::on(KERNELS[0])
    }

    /// The environment prepare.sh and run-guest.sh read.
    fn configure<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("MLX5_EMU_KERNEL", self.kernel)
            .env("MLX5_EMU_WITH", self.with.join(","))
            .env("MLX5_EMU_VIOMMU", if self.viommu { "1" } else { "0" })
            .env("MLX5_EMU_GUEST_MEM", self.mem)
    }
}

/// What prepare.sh reported on its `MLX5EMU-PREPARED` line.
#[derive(Debug)]
#[allow(dead_code)] // each test reads what it needs
struct Prepared {
    /// The kernel's release (its `uname -r`), as pinned.
    release: String,
    /// The unpacked linux-source tree, as a path inside the root (with "source").
    source: Option<String>,
    /// The directory of the built VFIO selftests on the host (with "selftests").
    selftests: Option<PathBuf>,
    /// The initramfs this run of prepare.sh stands for (run-guest.sh's
    /// `MLX5_EMU_INITRD`): another checkout sharing the cache may have built a newer
    /// one from other scripts.
    initrd: PathBuf,
}

/// Runs prepare.sh for the default kernel (cached; a no-op when the guest is ready).
/// [`boot`] and [`boot_guest`] prepare their guest themselves; this fails early, before
/// anything else starts, on a host that cannot.
fn prepare(logs: &mut Logs) -> Prepared {
    prepare_guest(logs, &Guest::default_kernel())
}

/// Runs prepare.sh for `guest` (cached; a no-op when it is ready). Fails loudly with
/// the script's reason when the host cannot prepare it.
fn prepare_guest(logs: &mut Logs, guest: &Guest) -> Prepared {
    let name = format!("prepare-{}.log", guest.kernel);
    let (path, out) = logs.file(&name, "prepare.sh output");
    let err = out.try_clone().expect("dup log fd");
    let start = Instant::now();
    let mut guard = Guard::spawn(
        "fixtures/qemu/prepare.sh",
        guest
            .configure(Command::new("bash").arg(qemu_dir().join("prepare.sh")))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err),
        true,
    );
    let status = guard.wait_or_kill(PREPARE_TIMEOUT);
    let log = fs::read_to_string(&path).unwrap_or_default();
    let reason: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    match status {
        None => panic!("QEMU guest harness: prepare.sh did not finish within {PREPARE_TIMEOUT:?}"),
        Some(s) if !s.success() => panic!(
            "QEMU guest harness: this host cannot prepare the guest {guest:?} (prepare.sh: {s}). \
             It needs root, apt-get (for debootstrap) and Debian's mirror.\n{}",
            reason.join("\n")
        ),
        Some(_) => eprintln!("prepare.sh ({}): {:.1?}", guest.kernel, start.elapsed()),
    }
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with("MLX5EMU-PREPARED "))
        .unwrap_or_else(|| panic!("prepare.sh printed no MLX5EMU-PREPARED line:\n{log}"));
    let fields = log_fields(line);
    let field = |k: &str| -> String {
        fields
            .get(k)
            .unwrap_or_else(|| panic!("no {k}= in {line:?}"))
            .to_string()
    };
    let optional = |k: &str| Some(field(k)).filter(|v| v != "none");
    assert_eq!(
        field("name"),
        guest.kernel,
        "prepare.sh prepared another kernel"
    );
    Prepared {
        release: field("release"),
        source: optional("source"),
        selftests: optional("selftests").map(PathBuf::from),
        initrd: PathBuf::from(field("initrd")),
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

/// The emulator and a finished guest run.
struct Booted {
    /// What prepare.sh made ready for the guest.
    prepared: Prepared,
    /// Still serving (the caller may connect to `socket` afterwards).
    emulator: Guard,
    socket: PathBuf,
    /// The markers the guest printed, in order.
    markers: Vec<Marker>,
    /// The whole serial console.
    serial: String,
    /// Where the emulator's stderr (its tracing log) goes.
    emu_log: PathBuf,
}

/// [`boot_guest`] on the default kernel's plain guest.
fn boot(
    logs: &mut Logs,
    emu_args: &[&str],
    kernel_args: &[&str],
    guest_timeout_secs: u64,
) -> Booted {
    boot_guest(
        logs,
        &Guest::default_kernel(),
        emu_args,
        &["vf0.sock"],
        kernel_args,
        guest_timeout_secs,
    )
}

/// Prepares `guest`, starts the emulator (with `emu_args` after `--dir DIR`), boots
/// `guest` with `kernel_args` and the emulator's `sockets` attached (several: functions
/// 0, 1, ... of guest slot 00:04, as run-guest.sh places them; `Booted::socket` is the
/// first), waits for it to power off (QEMU is killed after `guest_timeout_secs`), and
/// checks that it reached MLX5EMU-DONE with every step ok.
fn boot_guest(
    logs: &mut Logs,
    guest: &Guest,
    emu_args: &[&str],
    sockets: &[&str],
    kernel_args: &[&str],
    guest_timeout_secs: u64,
) -> Booted {
    let prepared = prepare_guest(logs, guest);
    let guest_wait = Duration::from_secs(guest_timeout_secs + 30);
    // The emulator, serving pf.sock and vf0.sock in the log directory.
    // MLX5_EMU_BIN runs another build (or a stand-in) taking the same `--dir DIR`.
    let emu = match std::env::var_os("MLX5_EMU_BIN") {
        Some(path) => PathBuf::from(path),
        None => mlx5_testbed::emu_binary(),
    };
    let dir = logs.path().to_path_buf();
    let (_, emu_out) = logs.file("emu.stdout", "mlx5-emu stdout");
    let (emu_log, emu_err) = logs.file("emu.stderr", "mlx5-emu stderr");
    let mut emulator = Guard::spawn(
        "mlx5-emu",
        Command::new(&emu)
            .arg("--dir")
            .arg(&dir)
            .args(emu_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(emu_out)
            .stderr(emu_err),
        false,
    );
    let paths: Vec<PathBuf> = sockets.iter().map(|s| dir.join(s)).collect();
    for p in &paths {
        emulator.wait_for_file(p, SOCKET_TIMEOUT);
    }
    let socket = paths[0].clone();
    let attach = paths
        .iter()
        .map(|p| p.to_str().expect("socket path is UTF-8"))
        .collect::<Vec<_>>()
        .join(",");

    // The guest, with vf0.sock attached; serial console to serial.log.
    let (serial_path, serial) = logs.file("serial.log", "guest serial console");
    let (_, qemu_err) = logs.file("qemu.stderr", "QEMU stderr");
    let boot = Instant::now();
    let mut vm = Guard::spawn(
        "fixtures/qemu/run-guest.sh",
        guest
            .configure(Command::new("bash").arg(qemu_dir().join("run-guest.sh")))
            .arg(&attach)
            .args(kernel_args)
            .env("MLX5_EMU_INITRD", &prepared.initrd)
            .env("MLX5_EMU_GUEST_TIMEOUT", guest_timeout_secs.to_string())
            .envs(initrd_extra(&dir).map(|p| ("MLX5_EMU_INITRD_EXTRA", p)))
            .stdin(Stdio::null())
            .stdout(serial)
            .stderr(qemu_err),
        true,
    );
    let status = vm.wait_or_kill(guest_wait);
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
    let status = status.unwrap_or_else(|| panic!("the guest did not finish within {guest_wait:?}"));
    assert!(
        markers.iter().any(|m| m.kind == "DONE"),
        "the guest did not reach MLX5EMU-DONE (run-guest.sh: {status})"
    );
    assert!(status.success(), "QEMU did not exit cleanly: {status}");
    for step in markers.iter().filter(|m| m.kind == "STEP") {
        assert_eq!(step.get("status"), "ok", "guest step failed: {step:?}");
    }

    drop(vm);
    Booted {
        prepared,
        emulator,
        socket,
        markers,
        serial,
        emu_log,
    }
}

/// The name of the archive a test leaves in its log directory (the sockets' directory)
/// before [`boot_guest`] for run-guest.sh to unpack before the cached initramfs
/// (`MLX5_EMU_INITRD_EXTRA`).
const INITRD_EXTRA: &str = "initrd-extra.cpio";

/// The extra archive of the guest whose sockets are in `dir`, if the test wrote one.
fn initrd_extra(dir: &Path) -> Option<PathBuf> {
    Some(dir.join(INITRD_EXTRA)).filter(|p| p.exists())
}

#[test]
fn qemu_guest_sees_the_vf() {
    let mut logs = Logs::new();
    prepare(&mut logs);
    let Booted {
        emulator,
        socket,
        markers,
        ..
    } = boot(&mut logs, &[], &[], GUEST_TIMEOUT_SECS);

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
    drop(emulator);
}

/// Guest limit for the probe test: a TCG boot, three probes and the idle step take
/// about 18 s here; the whole test must stay well under 3 minutes.
const PROBE_GUEST_TIMEOUT_SECS: u64 = 120;
/// How long the guest leaves the probed driver alone: long enough for three health
/// polls (2-3 s apart), after which a stuck health_counter would be reported.
const IDLE_SECS: u64 = 10;
/// Probes the guest runs: load-mlx5, then a bind in each of the two rebind rounds.
const PROBES: usize = 3;

/// mlx5_core warnings the minimal device provokes on purpose (mlx5-device.md §4.6;
/// issue 6: `eth_net_offloads` is clear while `port_type` stays ETH, so no netdev).
const EXPECTED_WARNINGS: &[&str] = &["Missing eth_net_offloads capability"];

/// Commands every probe sends, in this order (others may come between them), up to the
/// command EQ and the async EQ (mlx5-device.md §4; no pages EQ: page_request_disable).
const PROBE_SEQUENCE: &[(&str, Option<u16>)] = &[
    ("ENABLE_HCA", None),
    ("QUERY_ISSI", None),
    ("SET_ISSI", None),
    ("QUERY_PAGES", Some(1)),
    ("QUERY_HCA_CAP", Some(1)),
    ("QUERY_HCA_CAP", Some(0)),
    ("SET_HCA_CAP", Some(0)),
    ("QUERY_PAGES", Some(2)),
    ("INIT_HCA", None),
    ("QUERY_ADAPTER", None),
    ("ALLOC_UAR", None),
    ("CREATE_EQ", None),
    ("CREATE_EQ", None),
];

/// Commands every unbind sends, in this order, after the probe's last CREATE_EQ
/// (mlx5-device.md §4.6); MANAGE_PAGES op_mod 2 reclaims the boot and init pages.
const TEARDOWN_SEQUENCE: &[(&str, Option<u16>)] = &[
    ("DESTROY_EQ", None),
    ("DESTROY_EQ", None),
    ("DEALLOC_UAR", None),
    ("TEARDOWN_HCA", None),
    ("MANAGE_PAGES", Some(2)),
    ("DISABLE_HCA", None),
];

/// One kernel message from an `MLX5EMU-DMESG <N>[time] text` line.
#[derive(Debug)]
struct Kmsg {
    /// Log level (3 err, 4 warning, 6 info, 7 debug).
    level: u8,
    text: String,
}

/// The kernel messages the guest printed (fixtures/qemu/init.sh, raw `dmesg -r`).
fn parse_dmesg(serial: &str) -> Vec<Kmsg> {
    serial
        .lines()
        .filter_map(|line| {
            let at = line.find("MLX5EMU-DMESG ")?;
            let raw = &line[at + "MLX5EMU-DMESG ".len()..];
            let (prio, text) = raw.strip_prefix('<')?.split_once('>')?;
            let prio: u32 = prio
                .parse()
                .unwrap_or_else(|e| panic!("bad priority in {line:?}: {e}"));
            Some(Kmsg {
                level: (prio & 7) as u8,
                text: text.to_string(),
            })
        })
        .collect()
}

/// The guest's kernel messages in `serial`, after checking that none is a kernel splat
/// of any origin or an mlx5 error, timeout, failure or warning other than `expected`.
fn assert_no_mlx5_trouble(serial: &str, expected: &[&str]) -> Vec<Kmsg> {
    let kmsgs = parse_dmesg(serial);
    let bad = mlx5_trouble(&kmsgs, expected);
    assert!(
        bad.is_empty(),
        "mlx5 trouble in the guest:\n{}",
        bad.join("\n")
    );
    kmsgs
}

/// Kernel splats of any origin, and mlx5 messages that are errors, timeouts, failures
/// or warnings other than `expected`.
fn mlx5_trouble(kmsgs: &[Kmsg], expected: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for m in kmsgs {
        let lower = m.text.to_ascii_lowercase();
        if ["call trace", "warning: cpu", "bug:", "oops", "rcu: info"]
            .iter()
            .any(|w| lower.contains(w))
        {
            bad.push(format!("kernel splat: <{}>{}", m.level, m.text));
        }
        if !lower.contains("mlx5") {
            continue;
        }
        // A warning or notice provoked on purpose may use any word ("Failed to get ...").
        if m.level >= 4 && expected.iter().any(|w| m.text.contains(w)) {
            continue;
        }
        if m.level <= 3
            || ["timeout", "timed out", "failed", "error", "health"]
                .iter()
                .any(|w| lower.contains(w))
        {
            bad.push(format!("<{}>{}", m.level, m.text));
        } else if m.level == 4 {
            bad.push(format!("unexpected warning <{}>{}", m.level, m.text));
        }
    }
    bad
}

/// One firmware command from the emulator's tracing log (`firmware command` lines,
/// debug level for successes, info for failures).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FwCmd {
    opcode: String,
    op_mod: u16,
    vhca_id: u16,
    /// The function the command acts on (the span's `target_vhca_id`), when logged.
    target: Option<u16>,
    status: String,
    syndrome: String,
}

impl std::fmt::Display for FwCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(op_mod {}) {}", self.opcode, self.op_mod, self.status)?;
        if self.status != "OK" {
            write!(f, " syndrome {}", self.syndrome)?;
        }
        Ok(())
    }
}

/// `key=value` fields of a tracing line (values unquoted).
fn log_fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect()
}

/// The firmware commands in the emulator's log, in order; also every line that says
/// a command was refused before it ran (a delivery error).
fn parse_command_log(log: &str) -> (Vec<FwCmd>, Vec<String>) {
    let mut cmds = Vec::new();
    let mut refused = Vec::new();
    for line in log.lines() {
        if line.contains("command refused at delivery") {
            refused.push(line.to_string());
            continue;
        }
        if !line.contains("firmware command") {
            continue;
        }
        let f = log_fields(line);
        let field = |k: &str| {
            *f.get(k)
                .unwrap_or_else(|| panic!("no {k}= in the command log line {line:?}"))
        };
        let num = |k: &str| -> u16 {
            field(k)
                .parse()
                .unwrap_or_else(|e| panic!("{k} in {line:?}: {e}"))
        };
        cmds.push(FwCmd {
            opcode: field("opcode").to_string(),
            op_mod: num("op_mod"),
            vhca_id: num("vhca_id"),
            target: f.get("target_vhca_id").and_then(|v| v.parse().ok()),
            status: field("status").to_string(),
            syndrome: field("syndrome").to_string(),
        });
    }
    (cmds, refused)
}

/// Index after the last command of `cmds` that completes `want` as an ordered
/// subsequence (op_mod checked where given), or which step was missing.
fn find_subsequence(cmds: &[FwCmd], want: &[(&str, Option<u16>)]) -> Result<usize, String> {
    let mut at = 0;
    for &(opcode, op_mod) in want {
        let hit = cmds[at..]
            .iter()
            .position(|c| c.opcode == opcode && op_mod.is_none_or(|m| c.op_mod == m));
        match hit {
            Some(i) => at += i + 1,
            None => {
                return Err(format!(
                    "{opcode}{} missing",
                    op_mod.map_or(String::new(), |m| format!("(op_mod {m})"))
                ))
            }
        }
    }
    Ok(at)
}

/// The firmware commands of the emulator's log at `path`, after checking that none
/// was refused at delivery or failed, that there is at least one, and that the
/// emulator logged no warning or error.
fn emulator_commands_all_ok(path: &Path) -> Vec<FwCmd> {
    let log = fs::read_to_string(path).expect("read the emulator log");
    let (cmds, refused) = parse_command_log(&log);
    assert!(
        refused.is_empty(),
        "commands refused:\n{}",
        refused.join("\n")
    );
    assert!(!cmds.is_empty(), "no firmware command in the emulator log");
    let failed: Vec<String> = cmds
        .iter()
        .filter(|c| c.status != "OK" || c.syndrome != "0x0")
        .map(|c| format!("vhca_id {}: {c}", c.vhca_id))
        .collect();
    assert!(failed.is_empty(), "failed commands: {failed:?}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        warnings.is_empty(),
        "emulator warnings:\n{}",
        warnings.join("\n")
    );
    cmds
}

/// Splits `cmds` (one function's) into one session per probe, from its ENABLE_HCA to
/// the next, and checks each: [`PROBE_SEQUENCE`], whatever `extra` asks of it, and,
/// but for the last session (ended by the guest's power-off, whose teardown is not
/// waited for), the unbind's [`TEARDOWN_SEQUENCE`] ending in DISABLE_HCA.
fn check_probe_sessions(cmds: &[FwCmd], who: &str, extra: &dyn Fn(&[FwCmd]) -> Result<(), String>) {
    let starts: Vec<usize> = cmds
        .iter()
        .enumerate()
        .filter(|(_, c)| c.opcode == "ENABLE_HCA")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        starts.len(),
        PROBES,
        "{who}: ENABLE_HCA count (one per probe)"
    );
    assert_eq!(starts[0], 0, "{who}: the first command is not ENABLE_HCA");
    for (n, &begin) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(cmds.len());
        let session = &cmds[begin..end];
        let listing = || {
            session
                .iter()
                .map(FwCmd::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        };
        let fail = |what: &str, e: String| -> ! {
            panic!("{who} {what} {}: {e}; commands:\n  {}", n + 1, listing())
        };
        let probed = find_subsequence(session, PROBE_SEQUENCE).unwrap_or_else(|e| fail("probe", e));
        extra(session).unwrap_or_else(|e| fail("probe", e));
        if n + 1 < PROBES {
            find_subsequence(&session[probed..], TEARDOWN_SEQUENCE)
                .unwrap_or_else(|e| fail("unbind", e));
            if session.last().map(|c| c.opcode.as_str()) != Some("DISABLE_HCA") {
                fail("unbind", "does not end in DISABLE_HCA".into());
            }
        }
        if n == 0 {
            eprintln!(
                "{who}: commands of the first probe and unbind:\n  {}",
                listing()
            );
        }
    }
}

/// The guest ran the kernel prepare.sh pinned for `guest` (its MLX5EMU-BEGIN line).
fn assert_guest_kernel(markers: &[Marker], prepared: &Prepared, guest: &Guest) {
    let begin = markers
        .iter()
        .find(|m| m.kind == "BEGIN")
        .expect("MLX5EMU-BEGIN");
    assert_eq!(
        begin.get("kernel"),
        prepared.release,
        "the guest runs another kernel than the one pinned for {}",
        guest.kernel
    );
}

/// The (`a`, `b`) fields of every `kind` marker, in order.
fn marker_pairs<'m>(
    markers: &'m [Marker],
    kind: &str,
    a: &str,
    b: &str,
) -> Vec<(&'m str, &'m str)> {
    markers
        .iter()
        .filter(|m| m.kind == kind)
        .map(|m| (m.get(a), m.get(b)))
        .collect()
}

/// The kernels named here are the ones fixtures/qemu/kernels.sh pins.
#[test]
fn kernels_match_the_pins() {
    let pins = fs::read_to_string(qemu_dir().join("kernels.sh")).expect("read kernels.sh");
    let line = pins
        .lines()
        .find_map(|l| l.strip_prefix("KERNELS="))
        .expect("KERNELS= in kernels.sh");
    let names: Vec<&str> = line.trim_matches('"').split_whitespace().collect();
    assert_eq!(names, KERNELS, "KERNELS in fixtures/qemu/kernels.sh");
    let default = pins
        .lines()
        .find_map(|l| l.strip_prefix("KERNEL_DEFAULT="))
        .expect("KERNEL_DEFAULT= in kernels.sh");
    assert_eq!(
        default, KERNELS[0],
        "KERNEL_DEFAULT in fixtures/qemu/kernels.sh"
    );
}

#[test]
fn guest_mlx5_core_probes_the_vf_on_6_12() {
    mlx5_core_probes_the_vf(Guest::on("6.12"));
}

#[test]
fn guest_mlx5_core_probes_the_vf_on_7_3() {
    mlx5_core_probes_the_vf(Guest::on("7.3"));
}

/// Stock mlx5_core of `guest`'s kernel probes the VF, and unbinds and rebinds it
/// twice, with no error, no failed command and no timeout, as both the guest and the
/// emulator's command log tell.
fn mlx5_core_probes_the_vf(guest: Guest) {
    let started = Instant::now();
    let mut logs = Logs::new();
    let idle = format!("mlx5emu.idle={IDLE_SECS}");
    let booted = boot_guest(
        &mut logs,
        &guest,
        &["--log", "mlx5_emulator=debug"],
        &["vf0.sock"],
        &["mlx5emu.step=load-mlx5,rebind,idle", &idle],
        PROBE_GUEST_TIMEOUT_SECS,
    );
    let markers = &booted.markers;
    let prepared = &booted.prepared;
    assert_guest_kernel(markers, prepared, &guest);

    // The guest: the driver bound to our function, and the two rebind rounds.
    let drivers: Vec<&Marker> = markers.iter().filter(|m| m.kind == "DRIVER").collect();
    assert_eq!(drivers.len(), 1, "one 15b3 function expected: {drivers:?}");
    let slot = drivers[0].get("slot").to_string();
    assert_eq!(
        drivers[0].get("driver"),
        "mlx5_core",
        "driver of {slot} after insmod"
    );
    let rebinds: Vec<(&str, &str, &str, &str)> = markers
        .iter()
        .filter(|m| m.kind == "REBIND")
        .map(|m| {
            assert_eq!(m.get("slot"), slot, "{m:?}");
            (m.get("round"), m.get("op"), m.get("rc"), m.get("driver"))
        })
        .collect();
    assert_eq!(
        rebinds,
        [
            ("1", "unbind", "0", "none"),
            ("1", "bind", "0", "mlx5_core"),
            ("2", "unbind", "0", "none"),
            ("2", "bind", "0", "mlx5_core"),
        ],
        "unbind/bind rounds of {slot}"
    );
    assert!(
        markers
            .iter()
            .any(|m| m.kind == "IDLE" && m.get("seconds") == IDLE_SECS.to_string()),
        "the guest did not idle"
    );

    // The guest's kernel log: no mlx5 error, timeout or failure; only the warnings the
    // minimal capabilities provoke on purpose; no kernel splat of any origin.
    let kmsgs = assert_no_mlx5_trouble(&booted.serial, EXPECTED_WARNINGS);
    let probes = kmsgs
        .iter()
        .filter(|m| m.text.contains("mlx5_core") && m.text.contains("firmware version"))
        .count();
    assert_eq!(probes, PROBES, "probes in the guest's dmesg");

    // The emulator's command log: every command succeeded, each probe ran
    // ENABLE_HCA .. CREATE_EQ, each unbind tore the function down.
    let cmds = emulator_commands_all_ok(&booted.emu_log);
    assert!(
        cmds.iter().all(|c| c.vhca_id == 1),
        "commands for a function other than VF 0 (vhca_id 1)"
    );
    check_probe_sessions(&cmds, "VF", &|_| Ok(()));
    eprintln!(
        "Linux {}: mlx5_core probed {slot} {PROBES} times, {} commands all OK, in {:.1?}",
        prepared.release,
        cmds.len(),
        started.elapsed()
    );
    drop(booted);
}

/// mlx5_core warnings the PF provokes on purpose: no netdev (as on the VF), and no
/// vendor-specific capability (the config-space gateway of crdump, which a software
/// adapter does not offer; mlx5-pf.md §2 row 1).
const PF_EXPECTED_WARNINGS: &[&str] = &[
    "Missing eth_net_offloads capability",
    "Failed to get valid vendor specific ID",
];

/// What the PF's probe adds to the VF's (mlx5-pf.md §2): `set_hca_ctrl`'s ACCESS_REG
/// HOST_ENDIANNESS (a write, op_mod 0) after the boot pages, before the capabilities.
const PF_SET_HCA_CTRL: &[(&str, Option<u16>)] = &[
    ("QUERY_PAGES", Some(1)),
    ("ACCESS_REG", Some(0)),
    ("QUERY_HCA_CAP", Some(1)),
];

/// How long the PF test's guest idles (health polls on both functions).
const PF_IDLE_SECS: u64 = 6;

#[test]
fn guest_mlx5_core_probes_the_pf_on_6_12() {
    mlx5_core_probes_the_pf(Guest::on("6.12"));
}

#[test]
fn guest_mlx5_core_probes_the_pf_on_7_3() {
    mlx5_core_probes_the_pf(Guest::on("7.3"));
}

/// Stock mlx5_core of `guest`'s kernel binds the PF (15b3:101d at 00:04.0) beside its
/// VF (00:04.1), unbinds and binds both twice, with no mlx5 error in the guest and
/// every command of both functions OK in the emulator's log; each PF probe writes
/// HOST_ENDIANNESS where `set_hca_ctrl` does.
fn mlx5_core_probes_the_pf(guest: Guest) {
    let started = Instant::now();
    let mut logs = Logs::new();
    let idle = format!("mlx5emu.idle={PF_IDLE_SECS}");
    let booted = boot_guest(
        &mut logs,
        &guest,
        &["--log", "mlx5_emulator=debug"],
        &["pf.sock", "vf0.sock"],
        &["mlx5emu.step=load-mlx5,rebind,idle", &idle],
        PROBE_GUEST_TIMEOUT_SECS,
    );
    let markers = &booted.markers;
    let prepared = &booted.prepared;
    assert_guest_kernel(markers, prepared, &guest);

    // The guest: PF and VF at 00:04.0 and 00:04.1, both bound to mlx5_core.
    let ids: Vec<(&str, &str)> = markers
        .iter()
        .filter(|m| m.kind == "PCI" && m.get("vendor") == VENDOR)
        .map(|m| (m.get("slot"), m.get("device")))
        .collect();
    assert_eq!(
        ids,
        [("0000:00:04.0", "0x101d"), ("0000:00:04.1", DEVICE)],
        "the guest's 15b3 functions"
    );
    let drivers = marker_pairs(markers, "DRIVER", "slot", "driver");
    assert_eq!(
        drivers,
        [("0000:00:04.0", "mlx5_core"), ("0000:00:04.1", "mlx5_core")],
        "drivers after insmod"
    );
    let rebinds = markers.iter().filter(|m| m.kind == "REBIND");
    let mut n = 0;
    for m in rebinds {
        assert_eq!(m.get("rc"), "0", "{m:?}");
        let want = if m.get("op") == "bind" {
            "mlx5_core"
        } else {
            "none"
        };
        assert_eq!(m.get("driver"), want, "{m:?}");
        n += 1;
    }
    assert_eq!(n, 8, "two unbind/bind rounds on each function");

    // The guest's kernel log.
    let kmsgs = assert_no_mlx5_trouble(&booted.serial, PF_EXPECTED_WARNINGS);
    let pf_probes = kmsgs
        .iter()
        .filter(|m| m.text.contains("0000:00:04.0: firmware version"))
        .count();
    assert_eq!(pf_probes, PROBES, "PF probes in the guest's dmesg");

    // The emulator's command log: everything OK, for both functions.
    let cmds = emulator_commands_all_ok(&booted.emu_log);
    let pf: Vec<FwCmd> = cmds.iter().filter(|c| c.vhca_id == 0).cloned().collect();
    assert!(
        cmds.iter().any(|c| c.vhca_id == 1),
        "no command of the VF (vhca_id 1)"
    );
    check_probe_sessions(&pf, "PF", &|session| {
        find_subsequence(session, PF_SET_HCA_CTRL)?;
        match session.iter().filter(|c| c.opcode == "ACCESS_REG").count() {
            1 => Ok(()),
            n => Err(format!("{n} ACCESS_REG, expected one")),
        }
    });
    eprintln!(
        "Linux {}: mlx5_core probed the PF {PROBES} times beside its VF, {} commands all OK, in {:.1?}",
        prepared.release,
        cmds.len(),
        started.elapsed()
    );
    drop(booted);
}

/// The VFIO selftests run, how prepare.sh builds them (fixtures/qemu/init.sh,
/// step_vfio_selftests, says how each picks its IOMMU mode): three choose the mode by
/// their fixture variants (the type1 variants are selected with the harness's `-v`);
/// `vfio_pci_device_test` has no option and opens libvfio's default mode (iommufd), so
/// prepare.sh builds it once more per type1 mode. `vfio_pci_driver_test` runs by
/// variant too, but its main() first opens the device in the default mode to find a
/// driver: `vfio_pci_driver_test-type1` is the same test opening it in type1v2 there.
const SELFTESTS: &[&str] = &[
    "vfio_dma_mapping_test",
    "vfio_dma_mapping_mmio_test",
    "vfio_pci_device_test",
    "vfio_pci_device_test-vfio_type1_iommu",
    "vfio_pci_device_test-vfio_type1v2_iommu",
    "vfio_pci_device_init_perf_test",
    "vfio_pci_driver_test",
    "vfio_pci_driver_test-type1",
];
/// `vfio_pci_driver_test`'s cases: each must pass in every type1 mode with our mlx5
/// driver (fixtures/qemu/selftest-driver) moving the data through the VF's DMA engine.
const DRIVER_TEST_CASES: &[&str] = &[
    "init_remove",
    "memcpy_success",
    "memcpy_from_unmapped_iova",
    "memcpy_to_unmapped_iova",
    "send_msi",
    "mix_and_match",
    "memcpy_storm",
];
/// The type1 IOMMU modes of libvfio; every selftest must pass in each.
const TYPE1_MODES: &[&str] = &["vfio_type1_iommu", "vfio_type1v2_iommu"];
/// Skips the device causes on purpose, by case name: a ConnectX VF has MSI-X only.
const EXPECTED_SKIPS: &[(&str, &str)] = &[("vfio_pci_irq_test.msi.", "MSI: not supported")];
/// The vIOMMU guest: TCG runs all the selftests in about 45 s here.
const SELFTEST_GUEST_TIMEOUT_SECS: u64 = 600;

/// One kselftest case result (TAP `ok N name`, `ok N name # SKIP reason`, `not ok`).
#[derive(Debug)]
struct KstCase {
    /// The binary that ran it (a SELFTESTS name).
    test: String,
    /// `fixture.variant.test` (or `fixture.test`).
    name: String,
    outcome: KstOutcome,
}

#[derive(Debug, PartialEq, Eq)]
enum KstOutcome {
    Passed,
    Failed,
    Skipped(String),
}

/// The cases of the selftest output on the serial console (`MLX5EMU-KST test=T LINE`),
/// and each binary's `# Totals:` line.
fn parse_kselftest(serial: &str) -> (Vec<KstCase>, BTreeMap<String, String>) {
    let mut cases = Vec::new();
    let mut totals = BTreeMap::new();
    for line in serial.lines() {
        let Some(at) = line.find("MLX5EMU-KST test=") else {
            continue;
        };
        let rest = &line[at + "MLX5EMU-KST test=".len()..];
        let (test, tap) = rest.split_once(' ').unwrap_or((rest, ""));
        let tap = tap.trim_end();
        if let Some(t) = tap.strip_prefix("# Totals: ") {
            totals.insert(test.to_string(), t.to_string());
            continue;
        }
        let (failed, result) = if let Some(r) = tap.strip_prefix("not ok ") {
            (true, r)
        } else if let Some(r) = tap.strip_prefix("ok ") {
            (false, r)
        } else {
            continue;
        };
        // "N name" or "N name # SKIP reason"
        let Some((_, named)) = result.split_once(' ') else {
            continue;
        };
        let (name, directive) = match named.split_once(" # ") {
            Some((n, d)) => (n, Some(d)),
            None => (named, None),
        };
        let outcome = match (failed, directive.and_then(|d| d.strip_prefix("SKIP"))) {
            (true, _) => KstOutcome::Failed,
            (false, Some(reason)) => KstOutcome::Skipped(reason.trim().to_string()),
            (false, None) => KstOutcome::Passed,
        };
        cases.push(KstCase {
            test: test.to_string(),
            name: name.to_string(),
            outcome,
        });
    }
    (cases, totals)
}

/// The IOMMU mode of a case: the selftest binary's own (`vfio_pci_device_test-MODE`), or
/// the one its variant starts with (libvfio names each variant after its mode).
fn kst_mode(test: &str, case: &str) -> Option<&'static str> {
    const MODES: &[&str] = &[
        "vfio_type1v2_iommu",
        "vfio_type1_iommu",
        "iommufd_compat_type1v2",
        "iommufd_compat_type1",
        "iommufd",
    ];
    if let Some(m) = test.strip_prefix("vfio_pci_device_test-") {
        return MODES.iter().copied().find(|&x| x == m);
    }
    let variant = case.split('.').nth(1)?;
    MODES
        .iter()
        .copied()
        .find(|m| variant == *m || variant.starts_with(&format!("{m}_")))
}

/// Linux 7.3's own VFIO selftests, built from its linux-source, run in the guest
/// against the VF bound to vfio-pci behind QEMU's intel-iommu, in every type1 mode the
/// kernel offers, with 2 MiB and 1 GiB hugepages so that the hugetlb variants run. No
/// case fails; the only skip is MSI (the VF has MSI-X only); the iommufd variants are
/// unavailable on Debian's kernel (no IOMMUFD). The emulator serves every DMA_MAP and
/// DMA_UNMAP the guest's IOMMU mappings cause, with no warning.
#[test]
fn guest_vfio_selftests_pass_behind_a_viommu() {
    let started = Instant::now();
    let guest = Guest {
        kernel: "7.3",
        with: &["selftests"],
        viommu: true,
        mem: "4G",
    };
    let mut logs = Logs::new();
    let list = format!("mlx5emu.selftests={}", SELFTESTS.join(","));
    let booted = boot_guest(
        &mut logs,
        &guest,
        &["--log", "vfu=debug,mlx5_emulator=info"],
        &["vf0.sock"],
        &[
            "mlx5emu.step=vfio-bind,vfio-selftests",
            &list,
            "hugepagesz=1G",
            "hugepages=1",
            "hugepagesz=2M",
            "hugepages=4",
            // vfio_pci_driver_test maps 1 GiB of shared anonymous memory: in 2 MiB
            // pages the guest's IOMMU maps it (and QEMU forwards it) as 512 DMA_MAPs
            // instead of 262144.
            "transparent_hugepage_shmem=always",
        ],
        SELFTEST_GUEST_TIMEOUT_SECS,
    );
    let markers = &booted.markers;
    let prepared = &booted.prepared;
    assert!(
        prepared.selftests.is_some(),
        "prepare.sh built no selftests: {prepared:?}"
    );

    let vfio: Vec<&Marker> = markers.iter().filter(|m| m.kind == "VFIO").collect();
    assert_eq!(
        vfio.len(),
        1,
        "one 15b3 function bound to vfio-pci: {vfio:?}"
    );
    assert_eq!(vfio[0].get("driver"), "vfio-pci", "{:?}", vfio[0]);
    assert_ne!(
        vfio[0].get("iommu_group"),
        "none",
        "the VF has no IOMMU group: is the vIOMMU on?"
    );
    let env = markers
        .iter()
        .find(|m| m.kind == "KST-ENV")
        .expect("MLX5EMU-KST-ENV");
    for pool in ["hugepages_1g", "hugepages_2m"] {
        let n: u64 = env.get(pool).parse().expect("hugepage count");
        assert!(n >= 1, "the guest has no {pool} pages: {env:?}");
    }
    let iommufd = env.get("iommufd") == "1";

    // Every binary ran to its end with status 0.
    let runs: BTreeMap<&str, &str> = markers
        .iter()
        .filter(|m| m.kind == "KST-EXIT")
        .map(|m| (m.get("test"), m.get("rc")))
        .collect();
    let unavailable: Vec<&Marker> = markers
        .iter()
        .filter(|m| m.kind == "KST-UNAVAILABLE")
        .collect();
    for &t in SELFTESTS {
        let ran = runs.get(t);
        let out_of_reach = unavailable.iter().any(|m| m.get("test") == t);
        assert!(
            ran.is_some() || out_of_reach,
            "{t} neither ran nor was reported unavailable"
        );
        if let Some(rc) = ran {
            assert_eq!(*rc, "0", "{t} exited with {rc}");
        }
    }

    let (cases, totals) = parse_kselftest(&booted.serial);
    assert!(!cases.is_empty(), "no kselftest result on the console");
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c.outcome == KstOutcome::Failed)
        .map(|c| format!("{}: {}", c.test, c.name))
        .collect();
    assert!(
        failed.is_empty(),
        "VFIO selftests failed:\n{}",
        failed.join("\n")
    );
    // "pass:12 fail:0 xfail:0 xpass:0 skip:0 error:0"
    for (t, line) in &totals {
        let fields: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once(':'))
            .collect();
        for k in ["fail", "error"] {
            assert_eq!(fields.get(k), Some(&"0"), "{t}: {line}");
        }
        let of = |o: fn(&KstOutcome) -> bool| {
            cases
                .iter()
                .filter(|c| c.test == *t && o(&c.outcome))
                .count()
                .to_string()
        };
        assert_eq!(
            fields.get("pass").copied(),
            Some(of(|o| *o == KstOutcome::Passed).as_str()),
            "{t}: the passes listed do not add up to its totals ({line})"
        );
    }
    assert_eq!(
        totals.len(),
        runs.len(),
        "a selftest run printed no totals: {runs:?}"
    );

    // Each run binary passes in every type1 mode; no case runs outside a known mode.
    for &t in SELFTESTS.iter().filter(|t| runs.contains_key(*t)) {
        let mine: Vec<&KstCase> = cases.iter().filter(|c| c.test == t).collect();
        for c in &mine {
            let mode = kst_mode(t, &c.name)
                .unwrap_or_else(|| panic!("{t}: case {} has no IOMMU mode", c.name));
            assert!(
                TYPE1_MODES.contains(&mode) || iommufd,
                "{t}: {} ran in {mode} on a kernel without iommufd",
                c.name
            );
        }
        for &mode in TYPE1_MODES {
            if t.starts_with("vfio_pci_device_test-") && !t.ends_with(mode) {
                continue;
            }
            assert!(
                mine.iter()
                    .any(|c| c.outcome == KstOutcome::Passed && kst_mode(t, &c.name) == Some(mode)),
                "{t}: nothing passed in {mode}"
            );
        }
    }
    // The hugetlb variants ran (a skip there means the guest lacked the pages).
    for size in ["hugetlb_2mb", "hugetlb_1gb"] {
        for &mode in TYPE1_MODES {
            let name = format!("vfio_dma_mapping_test.{mode}_anonymous_{size}.dma_map_unmap");
            assert!(
                cases
                    .iter()
                    .any(|c| c.name == name && c.outcome == KstOutcome::Passed),
                "{name} did not pass"
            );
        }
    }
    // Our mlx5 selftest driver: every case of vfio_pci_driver_test passed in every
    // type1 mode (memcpy by RDMA_WRITE on the VF's DMA engine, the MSI-X of a
    // completion event).
    for &mode in TYPE1_MODES {
        for case in DRIVER_TEST_CASES {
            let name = format!("vfio_pci_driver_test.{mode}.{case}");
            assert!(
                cases.iter().any(|c| c.test == "vfio_pci_driver_test-type1"
                    && c.name == name
                    && c.outcome == KstOutcome::Passed),
                "{name} did not pass with the mlx5 selftest driver"
            );
        }
    }
    // Skips: only those the device causes on purpose.
    let skips: Vec<(&KstCase, &str)> = cases
        .iter()
        .filter_map(|c| match &c.outcome {
            KstOutcome::Skipped(r) => Some((c, r.as_str())),
            _ => None,
        })
        .collect();
    for (c, reason) in &skips {
        assert!(
            EXPECTED_SKIPS
                .iter()
                .any(|(case, why)| c.name.starts_with(case) && reason.starts_with(why)),
            "unexpected skip of {}: {} ({reason})",
            c.test,
            c.name
        );
    }
    // Unavailable: iommufd cases only, on a kernel without it.
    for m in &unavailable {
        assert!(
            m.get("mode").starts_with("iommufd") && !iommufd,
            "a case reported unavailable that should run: {m:?}"
        );
    }

    // The emulator served every DMA_MAP and DMA_UNMAP the guest's IOMMU caused.
    let log = fs::read_to_string(&booted.emu_log).expect("read the emulator log");
    let count = |cmd: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("cmd=\"{cmd}\"")) && l.contains(what))
            .count()
    };
    let (maps, unmaps) = (
        count("DMA_MAP", "reply=0}"),
        count("DMA_UNMAP", "reply=24}"),
    );
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| {
            (l.contains("cmd=\"DMA_MAP\"") || l.contains("cmd=\"DMA_UNMAP\""))
                && l.contains("error reply")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "DMA_MAPs or DMA_UNMAPs refused:\n{}",
        refused.join("\n")
    );
    assert!(
        maps > 0 && unmaps > 0,
        "{maps} DMA_MAPs, {unmaps} DMA_UNMAPs"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("dma mapped") && l.contains("size=1073741824")),
        "the 1 GiB hugepage never reached the emulator as one DMA_MAP"
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        warnings.is_empty(),
        "emulator warnings:\n{}",
        warnings.join("\n")
    );

    // The report: per binary, passed / failed / skipped / unavailable, then each skip.
    eprintln!(
        "VFIO selftests of Linux {} behind intel-iommu:",
        prepared.release
    );
    eprintln!(
        "  {:<42} {:>6} {:>6} {:>7} {:>11}",
        "test", "passed", "failed", "skipped", "unavailable"
    );
    let mut sums = [0usize; 4];
    for &t in SELFTESTS {
        let of = |o: fn(&KstOutcome) -> bool| {
            cases
                .iter()
                .filter(|c| c.test == t && o(&c.outcome))
                .count()
        };
        let row = [
            of(|o| *o == KstOutcome::Passed),
            of(|o| *o == KstOutcome::Failed),
            of(|o| matches!(o, KstOutcome::Skipped(_))),
            unavailable.iter().filter(|m| m.get("test") == t).count(),
        ];
        for (s, r) in sums.iter_mut().zip(row) {
            *s += r;
        }
        eprintln!(
            "  {t:<42} {:>6} {:>6} {:>7} {:>11}",
            row[0], row[1], row[2], row[3]
        );
    }
    eprintln!(
        "  {:<42} {:>6} {:>6} {:>7} {:>11}",
        "total", sums[0], sums[1], sums[2], sums[3]
    );
    for (c, reason) in &skips {
        eprintln!("  skipped: {} {}: {reason}", c.test, c.name);
    }
    if !unavailable.is_empty() {
        eprintln!(
            "  unavailable: {} iommufd cases (the kernel has no IOMMUFD: no /dev/iommu)",
            unavailable.len()
        );
    }
    eprintln!(
        "  emulator: {maps} DMA_MAP and {unmaps} DMA_UNMAP served; {:.1?}",
        started.elapsed()
    );
    drop(booted);
}

/// How long the guest idles after mlx5_core probed: the fatal is injected at its
/// start, and three health polls (2-3 s apart) without a health_counter change make
/// the poller report it.
const FATAL_IDLE_SECS: u64 = 20;

/// Issue 12: a firmware fatal injected at run time (through the emulator's fault
/// control socket, once the guest's mlx5_core has probed the VF) is reported by the
/// guest's mlx5_core health poller: the frozen health_counter and the syndrome show
/// in the guest's dmesg.
#[test]
fn guest_mlx5_core_reports_a_firmware_fatal_injected_at_run_time() {
    use mlx5_emulator::fault::control::{request, Request};

    let mut logs = Logs::new();
    prepare(&mut logs);
    let control = logs.path().join("control.sock");
    let serial = logs.path().join("serial.log");
    let idle = format!("mlx5emu.idle={FATAL_IDLE_SECS}");
    let injector = {
        let control = control.clone();
        std::thread::spawn(move || -> Result<(), String> {
            // Wait for the probe's marker on the serial console, then kill the firmware.
            let deadline = Instant::now() + Duration::from_secs(PROBE_GUEST_TIMEOUT_SECS);
            loop {
                let text = fs::read(&serial)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                if parse_markers(&text)
                    .iter()
                    .any(|m| m.kind == "DRIVER" && m.get("driver") == "mlx5_core")
                {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err("mlx5_core never bound in the guest".into());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let plan = "[[rule]]\nname = \"guest fatal\"\nvhca_id = 1\neffect = \"fatal\"\nhealth_syndrome = 0x1\n";
            request(&control, &Request::Add { plan: plan.into() })
                .map(drop)
                .map_err(|e| e.to_string())
        })
    };
    let booted = boot(
        &mut logs,
        &[
            "--log",
            "info",
            "--control",
            control.to_str().expect("utf-8 path"),
        ],
        &["mlx5emu.step=load-mlx5,idle", &idle],
        PROBE_GUEST_TIMEOUT_SECS,
    );
    injector
        .join()
        .expect("the injector thread")
        .expect("the fatal was injected");
    let kmsgs = parse_dmesg(&booted.serial);
    let health: Vec<String> = kmsgs
        .iter()
        .filter(|m| {
            let l = m.text.to_ascii_lowercase();
            l.contains("mlx5") && (l.contains("health compromised") || l.contains("health issue"))
        })
        .map(|m| format!("<{}>{}", m.level, m.text))
        .collect();
    assert!(
        !health.is_empty(),
        "the guest's health poller reported nothing after the fatal; mlx5 messages:\n{}",
        kmsgs
            .iter()
            .filter(|m| m.text.contains("mlx5"))
            .map(|m| format!("<{}>{}", m.level, m.text))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "the guest reported the injected fatal:\n{}",
        health.join("\n")
    );
    let log = fs::read_to_string(&booted.emu_log).expect("read the emulator log");
    assert!(
        log.contains("fault injected") && log.contains("guest fatal"),
        "the emulator did not trace the fault"
    );
    drop(booted);
}

/// What loading our own module (mlx5emu_virtfn, unsigned, out of tree) makes the
/// kernel say, on top of the PF's expected warnings.
const MLX5VFIO_EXPECTED_WARNINGS: &[&str] = &[
    "Missing eth_net_offloads capability",
    "Failed to get valid vendor specific ID",
    "loading out-of-tree module taints kernel",
    "module verification failed: signature and/or required key missing",
];

/// The commands the PF's driver sends about VF 0 (function 1), in order: ENABLE_HCA
/// when mlx5_core's probe enables the PF's VFs (`mlx5_sriov_attach`, pci_num_vf = 1),
/// then what `mlx5vf_cmd_set_migratable` reads when mlx5_vfio_pci binds the VF: its
/// GENERAL_2 MAX (`migratable`) and GENERAL CUR (`vhca_id`).
const MLX5VFIO_PF_ABOUT_VF: &[(&str, Option<u16>)] = &[
    ("ENABLE_HCA", None),
    ("QUERY_HCA_CAP", Some(0x40)),
    ("QUERY_HCA_CAP", Some(0x01)),
];

/// Linux's own mlx5_vfio_pci, built from the guest kernel's linux-source (prepare.sh's
/// extra mlx5vfio), binds the emulated VF in a vIOMMU guest: our mlx5emu_virtfn makes
/// the VF at 00:04.1 the virtual function of the PF at 00:04.0 (QEMU hides the PF's
/// SR-IOV capability), mlx5_core binds the PF and enables its VF, and mlx5_vfio_pci's
/// migration checks all pass through the PF, every command OK.
#[test]
fn guest_mlx5_vfio_pci_binds_the_vf_on_7_3() {
    let guest = Guest {
        with: &["mlx5vfio"],
        viommu: true,
        ..Guest::on("7.3")
    };
    let started = Instant::now();
    let mut logs = Logs::new();
    let booted = boot_guest(
        &mut logs,
        &guest,
        &["--log", "mlx5_emulator=debug"],
        &["pf.sock", "vf0.sock"],
        &["mlx5emu.step=mlx5vfio"],
        PROBE_GUEST_TIMEOUT_SECS,
    );
    let markers = &booted.markers;
    let prepared = &booted.prepared;
    assert_guest_kernel(markers, prepared, &guest);

    let virtfn = marker_pairs(markers, "VIRTFN", "slot", "physfn");
    assert_eq!(
        virtfn,
        [("0000:00:04.1", "0000:00:04.0")],
        "the VF as the PF's virtual function"
    );
    let drivers = marker_pairs(markers, "DRIVER", "slot", "driver");
    assert_eq!(
        drivers,
        [
            ("0000:00:04.0", "mlx5_core"),
            ("0000:00:04.1", "mlx5_vfio_pci")
        ],
        "drivers after loading mlx5_core and mlx5-vfio-pci"
    );
    assert_no_mlx5_trouble(&booted.serial, MLX5VFIO_EXPECTED_WARNINGS);

    let cmds = emulator_commands_all_ok(&booted.emu_log);
    let pf: Vec<FwCmd> = cmds.iter().filter(|c| c.vhca_id == 0).cloned().collect();
    find_subsequence(&pf, PROBE_SEQUENCE).unwrap_or_else(|e| panic!("PF probe: {e}"));
    let about_vf: Vec<FwCmd> = pf.iter().filter(|c| c.target == Some(1)).cloned().collect();
    find_subsequence(&about_vf, MLX5VFIO_PF_ABOUT_VF).unwrap_or_else(|e| {
        panic!(
            "the PF's commands about VF 0: {e}; they were:\n  {}",
            about_vf
                .iter()
                .map(FwCmd::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    });
    eprintln!(
        "Linux {}: mlx5_vfio_pci bound the VF beside mlx5_core on the PF, {} commands all OK, in {:.1?}",
        prepared.release,
        cmds.len(),
        started.elapsed()
    );
    drop(booted);
}

// ---- Linux's mlx5_vfio_pci migrates VF 0 into VF 1 (issue 16) -------------------------

/// The pattern seed the guest tool writes into VF 0's BAR2 (`mlx5emu.seed`).
const KMIG_SEED: u64 = 0x6b6d_6967;
/// The pattern seed of the stream mlx5vf makes on the host for the guest to load.
const KMIG_HOST_SEED: u64 = 0x686f_7374;
/// The device memory of every function (the emulator's default, and the testbed's).
const KMIG_DEV_MEM: usize = 1 << 20;
/// What the kernel says beyond [`MLX5VFIO_EXPECTED_WARNINGS`]: vfio-pci resets a VF
/// each time it is opened and closed, and on VFIO_DEVICE_RESET.
const KMIG_EXPECTED_WARNING: &str = "resetting";

/// The arcs the tool takes (`MLX5EMU-KMIG-ARC bdf from to fd`): on VF 0, RUNNING_P2P
/// both ways, then pre-copy to stop-copy; on VF 1 the resume; VF 0 back to RUNNING;
/// then the host stream's resume on VF 1. Multi-step requests (RUNNING -> STOP) are
/// walked by the kernel.
const KMIG_ARCS: &[(&str, &str, &str, &str)] = &[
    ("0000:00:04.1", "RUNNING", "RUNNING_P2P", "0"),
    ("0000:00:04.1", "RUNNING_P2P", "RUNNING", "0"),
    ("0000:00:04.1", "RUNNING", "PRE_COPY", "1"),
    ("0000:00:04.1", "PRE_COPY", "PRE_COPY_P2P", "0"),
    ("0000:00:04.1", "PRE_COPY_P2P", "STOP_COPY", "0"),
    ("0000:00:04.1", "STOP_COPY", "STOP", "0"),
    ("0000:00:04.2", "RUNNING", "STOP", "0"),
    ("0000:00:04.2", "STOP", "RESUMING", "1"),
    ("0000:00:04.2", "RESUMING", "STOP", "0"),
    ("0000:00:04.2", "STOP", "RUNNING", "0"),
    ("0000:00:04.1", "STOP", "RUNNING", "0"),
    ("0000:00:04.2", "RUNNING", "STOP", "0"),
    ("0000:00:04.2", "STOP", "RESUMING", "1"),
    ("0000:00:04.2", "RESUMING", "STOP", "0"),
    ("0000:00:04.2", "STOP", "RUNNING", "0"),
];

/// What mlx5_vfio_pci sends through the PF about VF 0 (target vhca_id 1), in order:
/// SUSPEND initiator / RESUME initiator (RUNNING_P2P both ways), QUERY and the tracked
/// SAVE (RUNNING -> PRE_COPY), SUSPEND initiator and responder (-> PRE_COPY_P2P ->
/// STOP_COPY), QUERY and the final SAVE, then RESUME responder and initiator
/// (STOP -> RUNNING).
const KMIG_VF0_COMMANDS: &[(&str, Option<u16>)] = &[
    ("SUSPEND_VHCA", Some(0)),
    ("RESUME_VHCA", Some(1)),
    ("QUERY_VHCA_MIGRATION_STATE", Some(0)),
    ("SAVE_VHCA_STATE", Some(0)),
    ("SUSPEND_VHCA", Some(0)),
    ("SUSPEND_VHCA", Some(1)),
    ("QUERY_VHCA_MIGRATION_STATE", Some(0)),
    ("SAVE_VHCA_STATE", Some(0)),
    ("RESUME_VHCA", Some(0)),
    ("RESUME_VHCA", Some(1)),
];

/// ... and about VF 1 (target vhca_id 2), twice (the kernel's stream, then the host's):
/// SUSPEND initiator and responder (RUNNING -> STOP), LOAD per FW_DATA record (written
/// in RESUMING), RESUME responder and initiator (STOP -> RUNNING).
const KMIG_VF1_COMMANDS: &[(&str, Option<u16>)] = &[
    ("SUSPEND_VHCA", Some(0)),
    ("SUSPEND_VHCA", Some(1)),
    ("LOAD_VHCA_STATE", Some(0)),
    ("RESUME_VHCA", Some(0)),
    ("RESUME_VHCA", Some(1)),
    ("SUSPEND_VHCA", Some(0)),
    ("SUSPEND_VHCA", Some(1)),
    ("LOAD_VHCA_STATE", Some(0)),
    ("RESUME_VHCA", Some(0)),
    ("RESUME_VHCA", Some(1)),
];

/// The fields of the one `kind` marker with `key` = `value`.
fn kmig_marker<'m>(markers: &'m [Marker], kind: &str, key: &str, value: &str) -> &'m Marker {
    let found: Vec<&Marker> = markers
        .iter()
        .filter(|m| m.kind == kind && m.fields.get(key).map(String::as_str) == Some(value))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one MLX5EMU-{kind} {key}={value}: {found:?}"
    );
    found[0]
}

/// Linux's own mlx5_vfio_pci migrates VF 0's state into VF 1 inside a 7.3 vIOMMU
/// guest, driven by our guest tool (mlx5-kmig): each function in an IOMMU group of its
/// own (the ACS capability), both VFs offering STOP_COPY | P2P | PRE_COPY, VF 1's BAR2
/// equal to the pattern written into VF 0's, and the kernel driver's SUSPEND / QUERY /
/// SAVE / LOAD / RESUME_VHCA in the emulator's log, all OK. Cross-checks with our twin
/// mlx5vf: the kernel's stream loads through mlx5vf on the host with device memory
/// identical; mlx5vf's stream loads through the kernel driver in the guest with device
/// memory identical; PRECOPY_INFO of the kernel (v1 semantics: the tool does not opt
/// into PRECOPY_INFOv2) and of mlx5vf agree for the same device memory.
#[test]
fn guest_mlx5_vfio_pci_migrates_vf0_into_vf1_on_7_3() {
    mlx5_vfio_pci_migrates_vf0_into_vf1("7.3");
}

/// The same on Debian's 6.12: its mlx5_vfio_pci (from linux-source-6.12) has no
/// PRECOPY_INFOv2 and no migration_state capability.
#[test]
fn guest_mlx5_vfio_pci_migrates_vf0_into_vf1_on_6_12() {
    mlx5_vfio_pci_migrates_vf0_into_vf1("6.12");
}

/// [`guest_mlx5_vfio_pci_migrates_vf0_into_vf1_on_7_3`] on the guest kernel `kernel`.
fn mlx5_vfio_pci_migrates_vf0_into_vf1(kernel: &'static str) {
    use mlx5_kmig::codec;
    use mlx5_testbed::guest::{cpio_newc, kmig_static_binary, GuestFile, KMIG_GUEST_PATH};
    use mlx5_testbed::migrate::Rig;
    use mlx5vf::migration::fsm::MigState;

    let guest = Guest {
        with: &["mlx5vfio"],
        viommu: true,
        ..Guest::on(kernel)
    };
    let started = Instant::now();
    let want = mlx5_testbed::devmem::pattern(KMIG_DEV_MEM, KMIG_SEED);
    let host_want = mlx5_testbed::devmem::pattern(KMIG_DEV_MEM, KMIG_HOST_SEED);

    // On the host, our twin on an adapter of its own: PRECOPY_INFO for VF 0 holding the
    // pattern the guest writes, and a stop-copy stream of the host pattern.
    let rig = Rig::start();
    rig.fill(KMIG_SEED);
    let twin_info = {
        let s = rig
            .dev
            .set_state(MigState::PreCopy)
            .expect("twin PRE_COPY")
            .expect("saving stream");
        let info = s.precopy_info().expect("twin PRECOPY_INFO");
        rig.dev.set_state(MigState::Running).expect("twin RUNNING");
        info
    };
    rig.fill(KMIG_HOST_SEED);
    let host_stream = rig.capture();

    let mut logs = Logs::new();
    let extra = cpio_newc(&[
        GuestFile {
            path: KMIG_GUEST_PATH.into(),
            data: fs::read(kmig_static_binary()).expect("read mlx5-kmig"),
            mode: 0o755,
        },
        GuestFile {
            path: "opt/mlx5emu/host-stream".into(),
            data: host_stream.clone(),
            mode: 0o644,
        },
    ]);
    fs::write(logs.path().join(INITRD_EXTRA), extra).expect("write the extra archive");
    let seed_arg = format!("mlx5emu.seed={KMIG_SEED}");
    let booted = boot_guest(
        &mut logs,
        &guest,
        &["--vfs", "2", "--log", "mlx5_emulator=debug"],
        &["pf.sock", "vf0.sock", "vf1.sock"],
        &["mlx5emu.step=mlx5vfio,kmig", "mlx5emu.vfs=2", &seed_arg],
        GUEST_TIMEOUT_SECS,
    );
    let markers = &booted.markers;
    assert_guest_kernel(markers, &booted.prepared, &guest);

    // Item 1: each function its own IOMMU group, both VFs migratable with all flags.
    let drivers: Vec<(&str, &str, &str)> = markers
        .iter()
        .filter(|m| m.kind == "DRIVER")
        .map(|m| (m.get("slot"), m.get("driver"), m.get("iommu_group")))
        .collect();
    assert_eq!(
        drivers.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [
            ("0000:00:04.0", "mlx5_core"),
            ("0000:00:04.1", "mlx5_vfio_pci"),
            ("0000:00:04.2", "mlx5_vfio_pci")
        ]
    );
    let mut groups: Vec<&str> = drivers.iter().map(|d| d.2).collect();
    groups.sort();
    groups.dedup();
    assert!(
        groups.len() == 3 && !groups.contains(&"none"),
        "each function in an IOMMU group of its own: {drivers:?}"
    );
    for m in markers.iter().filter(|m| m.kind == "KMIG-DEVICE") {
        assert_eq!(
            (m.get("flags"), m.get("names")),
            ("0x7", "STOP_COPY|P2P|PRE_COPY"),
            "VFIO_DEVICE_FEATURE MIGRATION of {}",
            m.get("bdf")
        );
        assert_eq!(m.get("state"), "RUNNING");
    }
    assert_eq!(
        markers.iter().filter(|m| m.kind == "KMIG-DEVICE").count(),
        3,
        "both VFs opened by migrate, VF 1 again by load"
    );

    // Item 3: the arcs, the pattern and the comparison.
    let arcs: Vec<(&str, &str, &str, &str)> = markers
        .iter()
        .filter(|m| m.kind == "KMIG-ARC")
        .map(|m| (m.get("bdf"), m.get("from"), m.get("to"), m.get("fd")))
        .collect();
    assert_eq!(arcs, KMIG_ARCS, "the arcs the tool took");
    let hex = |d: &[u8]| format!("{:016x}", codec::digest(d));
    assert_eq!(
        kmig_marker(markers, "KMIG-BAR2", "what", "pattern").get("digest"),
        hex(&want),
        "VF 0's BAR2 holds the pattern"
    );
    assert_eq!(
        kmig_marker(markers, "KMIG-BAR2", "what", "destination").get("digest"),
        hex(&want),
        "VF 1's BAR2 after the kernel's migration"
    );
    assert_eq!(
        kmig_marker(markers, "KMIG-COMPARE", "equal", "1").kind,
        "KMIG-COMPARE"
    );
    assert_eq!(
        markers
            .iter()
            .filter(|m| m.kind == "KMIG-RESET")
            .map(|m| m.get("state"))
            .collect::<Vec<_>>(),
        ["RUNNING", "RUNNING"]
    );
    assert_eq!(markers.iter().filter(|m| m.kind == "KMIG-OK").count(), 2);
    let mut expected = MLX5VFIO_EXPECTED_WARNINGS.to_vec();
    expected.push(KMIG_EXPECTED_WARNING);
    assert_no_mlx5_trouble(&booted.serial, &expected);

    let cmds = emulator_commands_all_ok(&booted.emu_log);
    let from_pf: Vec<&FwCmd> = cmds.iter().filter(|c| c.vhca_id == 0).collect();
    for (vhca, want_cmds) in [(1u16, KMIG_VF0_COMMANDS), (2, KMIG_VF1_COMMANDS)] {
        let about: Vec<FwCmd> = from_pf
            .iter()
            .filter(|c| c.target == Some(vhca) && c.opcode.contains("VHCA"))
            .map(|c| (*c).clone())
            .collect();
        find_subsequence(&about, want_cmds).unwrap_or_else(|e| {
            panic!(
                "the PF's migration commands about vhca_id {vhca}: {e}; they were:\n  {}",
                about
                    .iter()
                    .map(FwCmd::to_string)
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )
        });
    }

    // Item 4: the kernel's stream through our twin; the twin's stream through the
    // kernel; PRECOPY_INFO.
    let kernel_stream = codec::from_console(&booted.serial, "kernel-stream")
        .expect("the kernel's stream on the console")
        .expect("no kernel-stream on the console");
    let stream_marker = kmig_marker(markers, "KMIG-STREAM", "name", "kernel-stream");
    assert_eq!(stream_marker.get("bytes"), kernel_stream.len().to_string());
    assert_eq!(stream_marker.get("digest"), hex(&kernel_stream));
    let kernel_records = codec::records(&kernel_stream).expect("the kernel's stream parses");
    let host_records = codec::records(&host_stream).expect("mlx5vf's stream parses");
    rig.load(&kernel_stream);
    assert!(
        rig.dev_mem() == want,
        "the kernel's stream loaded through mlx5vf: device memory differs from the pattern"
    );
    assert_eq!(
        kmig_marker(markers, "KMIG-BAR2", "what", "loaded").get("digest"),
        hex(&host_want),
        "mlx5vf's stream loaded through the kernel driver: VF 1's BAR2"
    );
    let kernel_initial: u64 = kmig_marker(markers, "KMIG-PRECOPY", "when", "start")
        .get("initial")
        .parse()
        .expect("initial bytes");
    let kernel_dirty: u64 = kmig_marker(markers, "KMIG-PRECOPY", "when", "start")
        .get("dirty")
        .parse()
        .expect("dirty bytes");
    assert_eq!(
        (kernel_initial, kernel_dirty),
        (twin_info.initial_bytes, twin_info.dirty_bytes),
        "PRECOPY_INFO after RUNNING -> PRE_COPY: the kernel's (left) and mlx5vf's (right)"
    );
    eprintln!(
        "Linux {}: mlx5_vfio_pci migrated VF 0 into VF 1, {} commands all OK; kernel stream \
         {} bytes ({}), mlx5vf stream {} bytes ({}); PRECOPY_INFO initial {kernel_initial} \
         on both; in {:.1?}",
        booted.prepared.release,
        cmds.len(),
        kernel_stream.len(),
        kernel_records
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        host_stream.len(),
        host_records
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed()
    );
    drop(booted);
}
