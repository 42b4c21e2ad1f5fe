//! `mlx5-emu`: serve an emulated mlx5 adapter over vfio-user sockets.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mlx5_emulator::{Adapter, AdapterConfig};

/// A software mlx5 (ConnectX) adapter: one PF and N VFs, each a vfio-user socket.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory for the sockets (pf.sock, vf0.sock, ...).
    #[arg(long, default_value = "mlx5-emu")]
    dir: PathBuf,
    /// Number of VFs.
    #[arg(long, default_value_t = 1)]
    vfs: u16,
    /// Device memory (BAR2) per function in bytes: a power of two from 4096 up to
    /// 16 GiB (16G: a sparse memfd, untouched pages hold no memory); a K, M or G suffix
    /// is accepted (e.g. 1M).
    #[arg(long, default_value = "1M", value_parser = parse_dev_mem)]
    dev_mem: u64,
    /// Accept DMA maps of files that cannot be sealed against shrinking, such as
    /// QEMU's memory-backend-file guest RAM (refused by default: a client that
    /// truncated such a file would crash the emulator). Only for a trusted VMM.
    #[arg(long)]
    allow_unsealed_dma: bool,
    /// Log level or filter (error, warn, info, debug, trace, or an env-filter string).
    #[arg(long, default_value = "info")]
    log: String,
    /// A fault plan (TOML: a seed and `[[rule]]` tables) the adapter starts with; see
    /// the README's "Fault injection" and fixtures/faults/.
    #[arg(long, value_name = "PLAN.toml")]
    faults: Option<PathBuf>,
    /// Write one JSON line per injected fault here (created or truncated).
    #[arg(long, value_name = "LOG.jsonl")]
    fault_log: Option<PathBuf>,
    /// Serve the fault control socket here: `mlx5-emu fault --control PATH ...` adds,
    /// lists and clears rules and reads the log while the adapter runs.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Control the fault plan of a running mlx5-emu (started with --control PATH).
    Fault {
        /// The control socket of the running mlx5-emu.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        #[command(subcommand)]
        op: FaultOp,
    },
}

#[derive(clap::Subcommand, Debug)]
enum FaultOp {
    /// Adds the `[[rule]]` tables of a TOML file (`-` reads stdin); the seed stays.
    Add { plan: PathBuf },
    /// Lists the rules with how often each matched and fired.
    List,
    /// Removes the rule named NAME, or every rule; a fatal a removed rule set is lifted.
    Clear { name: Option<String> },
    /// Prints the fault log (JSON lines).
    Log,
    /// Prints the writes the functions refused while responder-suspended (P2P race
    /// violations among them), oldest first, and how many there were in all.
    Violations,
}

/// `mlx5-emu fault ...`: one request to the control socket, its answer on stdout.
fn fault_command(control: &std::path::Path, op: FaultOp) -> ExitCode {
    use mlx5_emulator::fault::control::{request, Request};
    use std::io::Read;
    let req = match op {
        FaultOp::Add { plan } => {
            let text = if plan.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t).map(|_| t)
            } else {
                std::fs::read_to_string(&plan)
            };
            match text {
                Ok(plan) => Request::Add { plan },
                Err(e) => {
                    eprintln!("mlx5-emu fault add: cannot read {}: {e}", plan.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        FaultOp::List => Request::List,
        FaultOp::Clear { name } => Request::Clear { name },
        FaultOp::Log => Request::Log,
        FaultOp::Violations => Request::Violations,
    };
    match request(control, &req) {
        Err(e) => {
            eprintln!("mlx5-emu fault: {e}");
            ExitCode::FAILURE
        }
        Ok(r) => {
            let mut out = std::io::stdout().lock();
            if let Some(n) = r.added {
                let _ = writeln!(out, "added {n} rule(s)");
            }
            if let Some(n) = r.removed {
                let _ = writeln!(out, "removed {n} rule(s)");
            }
            if let Some(rules) = r.rules {
                let _ = writeln!(out, "seed {}", r.seed.unwrap_or(0));
                for s in rules {
                    let _ = writeln!(
                        out,
                        "{:?}: effect {}, matched {}, fired {}",
                        s.rule.name, s.rule.effect, s.matches, s.fired
                    );
                    let plan = mlx5_emulator::fault::Plan {
                        seed: 0,
                        rules: vec![s.rule],
                    };
                    for l in plan.to_toml().lines().filter(|l| !l.starts_with("seed")) {
                        let _ = writeln!(out, "    {l}");
                    }
                }
            }
            if let Some(log) = r.log {
                let _ = write!(out, "{log}");
            }
            if let Some(v) = r.violations {
                for x in &v {
                    let _ = writeln!(out, "{x}");
                }
                let _ = writeln!(
                    out,
                    "{} violation(s) recorded ({} shown)",
                    r.violations_total.unwrap_or(v.len() as u64),
                    v.len()
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// `--dev-mem`: bytes, or a number with a K/M/G suffix (binary units).
fn parse_dev_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or with a K/M/G suffix)"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} overflows"))?;
    mlx5_emulator::devmem::check_size(bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread spawned after)
/// and returns the set, for `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Fault { control, op }) = args.command {
        return fault_command(&control, op);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| {
        eprintln!("mlx5-emu: bad --log {:?}, using info", args.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .init();

    // Every client's DMA files and eventfds are fds: use all the operator allows.
    match vfu::limits::raise_fd_limit() {
        Ok(n) => tracing::debug!(fd_limit = n, "fd soft limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the fd soft limit"),
    }
    let faults = match args
        .faults
        .as_deref()
        .map(mlx5_emulator::fault::Plan::from_file)
    {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            eprintln!("mlx5-emu: --faults: {e}");
            return ExitCode::FAILURE;
        }
    };
    let set = block_signals();
    let adapter = match Adapter::start(&AdapterConfig {
        dir: args.dir.clone(),
        vfs: args.vfs,
        dev_mem: args.dev_mem,
        allow_unsealed_dma: args.allow_unsealed_dma,
        faults,
        fault_log: args.fault_log.clone(),
        control: args.control.clone(),
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mlx5-emu: {e}");
            return ExitCode::FAILURE;
        }
    };
    // What we serve, on stdout. A closed stdout (e.g. `| head -1`) must not stop the
    // server, so write errors are ignored rather than panicking as println! would.
    let mut out = std::io::stdout().lock();
    for f in adapter.functions() {
        let s = f.lock();
        let kind = match f.id.kind {
            mlx5_emulator::pci::FunctionKind::Pf => "PF",
            mlx5_emulator::pci::FunctionKind::Vf => "VF",
        };
        let _ = writeln!(
            out,
            "{kind} {:04x}:{:04x} vhca_id {} at {}",
            s.config.vendor_id(),
            s.config.device_id(),
            f.id.vhca_id,
            adapter.dir().join(f.id.socket_name()).display()
        );
    }
    if let Some(c) = adapter.control_socket() {
        let _ = writeln!(out, "fault control at {}", c.display());
    }
    let _ = writeln!(out, "serving; SIGTERM or Ctrl-C stops");
    let _ = out.flush();
    drop(out);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` was initialised by block_signals; sigwait writes the signal number.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        eprintln!("mlx5-emu: sigwait failed: {rc}");
    }
    tracing::info!(signal = sig, "stopping");
    adapter.stop();
    ExitCode::SUCCESS
}
