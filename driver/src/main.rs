//! `mlx5vf`: the driver's command line.
//!
//! `mlx5vf info --socket DIR/vf0.sock` brings the function up, prints what it learned
//! and brings it down again; `--vf N` on the PF socket reads VF N's capabilities
//! through the PF (`other_function`).
//!
//! `mlx5vf migrate --from A --to B --vf 0` live-migrates VF 0 of the adapter serving
//! in directory A to VF 0 of the one in B, through each adapter's PF: pre-copy rounds
//! until the dirty bytes fall below `--threshold`, then STOP_COPY, the rest of the
//! stream into B's RESUMING, and B to RUNNING. It prints a summary line (bytes, rounds,
//! downtime: from the source leaving PRE_COPY to the destination reaching RUNNING);
//! the loop is the library's (`migration::live`). `--report FILE.svg` draws the
//! migration's timeline (`mlx5vf::report`); a progress bar shows on stderr while
//! stdout is a terminal.
//! `--vf 0,1` migrates several VFs as one group (`migration::group`): pre-copy on each,
//! then all to PRE_COPY_P2P before any stops (STOP_COPY), and on the destination all
//! loaded (STOP), then all to RUNNING_P2P, then all to RUNNING, so that no VF is stopped
//! while a peer may still DMA into it. One summary line per VF, then the group's.
//!
//! `mlx5vf state --pf A/pf.sock --vf 0 [--set STATE]`: the VFIO migration state lives
//! in the driver process that holds the data stream, so a separate process cannot see
//! it. This command reports what the firmware says instead: QUERY_VHCA_MIGRATION_STATE
//! (sizes, migration_state) and the suspend level, probed with SUSPEND_VHCA (a
//! suspend that succeeds is undone at once with the matching RESUME_VHCA; one refused
//! with BAD_RES_STATE means the VF is already suspended that far): RUNNING,
//! RUNNING_P2P or STOP. `--set` walks the kernel's path from that inferred state to
//! STOP, RUNNING_P2P or RUNNING (states with a data stream need `migrate`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mlx5_prm::cmd::migration::{ResumeOpMod, SuspendOpMod};
use mlx5_prm::CmdStatus;
use mlx5vf::cmdif::{errno_name, ArenaConfig, CmdIf, CmdIfConfig};
use mlx5vf::hca::{Hca, HcaError, HcaOptions, MigrationCaps};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::fw::Fw;
use mlx5vf::migration::live::{self, LiveError};
use mlx5vf::migration::{DataStream, GroupError, MigError, MigrationDevice, MigrationGroup};

#[derive(Parser, Debug)]
#[command(
    name = "mlx5vf",
    version,
    about = "mlx5 VFIO migration driver over vfio-user"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bring a function up and print its firmware version, ISSI, vhca_id and migration caps.
    Info {
        /// The function's vfio-user socket.
        #[arg(long)]
        socket: PathBuf,
        /// On the PF: read VF N's capabilities through the PF.
        #[arg(long)]
        vf: Option<u16>,
        /// Per-command timeout in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
        /// Complete commands by polling only (no command EQ / MSI-X).
        #[arg(long)]
        polling: bool,
    },
    /// Live-migrate a VF from the adapter in one directory to the one in another.
    Migrate {
        /// Source adapter directory (holds pf.sock and vfN.sock).
        #[arg(long)]
        from: PathBuf,
        /// Destination adapter directory.
        #[arg(long)]
        to: PathBuf,
        /// The VF to migrate (the same number on both sides); several, comma-separated
        /// (`0,1`), move together as a group through RUNNING_P2P.
        #[arg(long, value_delimiter = ',', default_value = "0", num_args = 1..)]
        vf: Vec<u16>,
        /// Stop pre-copy once the dirty bytes are at most this many.
        #[arg(long, default_value_t = 64 * 1024)]
        threshold: u64,
        /// Most pre-copy rounds before STOP_COPY regardless.
        #[arg(long, default_value_t = 16)]
        max_rounds: u32,
        /// Size of each PF's DMA arena in MiB (SAVE/LOAD buffers live there).
        #[arg(long, default_value_t = 64)]
        arena_mib: u64,
        /// Per-command timeout in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
        /// Draw the migration's timeline into this SVG file: bytes and dirty bytes per
        /// pre-copy round, stop-copy bytes, downtime (one VF only).
        #[arg(long, value_name = "FILE.svg")]
        report: Option<PathBuf>,
    },
    /// Report (or set) a VF's migration state as the firmware sees it, through the PF.
    State {
        /// The PF's vfio-user socket.
        #[arg(long)]
        pf: PathBuf,
        #[arg(long, default_value_t = 0)]
        vf: u16,
        /// Walk to STOP, RUNNING_P2P or RUNNING.
        #[arg(long)]
        set: Option<MigState>,
        /// Per-command timeout in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: vfu::VfuError,
    },
    #[error("command interface: {0}")]
    Cmd(#[from] mlx5vf::cmdif::CmdError),
    #[error("{0}")]
    Hca(#[from] HcaError),
    #[error("{what}: {source}")]
    Mig {
        what: String,
        #[source]
        source: Box<MigError>,
    },
    #[error("{what}: {source}")]
    Group {
        what: String,
        #[source]
        source: Box<GroupError>,
    },
    #[error("{0}")]
    Usage(String),
}

fn group(what: impl Into<String>) -> impl FnOnce(GroupError) -> CliError {
    let what = what.into();
    move |source| CliError::Group {
        what,
        source: Box::new(source),
    }
}

fn mig(what: impl Into<String>) -> impl FnOnce(MigError) -> CliError {
    let what = what.into();
    move |source| CliError::Mig {
        what,
        source: Box::new(source),
    }
}

impl CliError {
    fn errno(&self) -> i32 {
        match self {
            CliError::Connect { .. } => -libc::ECONNREFUSED,
            CliError::Cmd(e) => e.errno(),
            CliError::Hca(e) => e.errno(),
            CliError::Mig { source, .. } => source.errno(),
            CliError::Group { source, .. } => source.errno(),
            CliError::Usage(_) => -libc::EINVAL,
        }
    }
}

fn yes(b: bool) -> u8 {
    u8::from(b)
}

fn print_migration(prefix: &str, m: &MigrationCaps) {
    println!("{prefix}migration: {}", yes(m.migration));
    println!("{prefix}migration_multi_load: {}", yes(m.multi_load));
    println!(
        "{prefix}migration_tracking_state: {}",
        yes(m.tracking_state)
    );
    println!("{prefix}migration_in_chunks: {}", yes(m.in_chunks));
}

fn info(
    socket: PathBuf,
    vf: Option<u16>,
    timeout: Duration,
    polling: bool,
) -> Result<(), CliError> {
    let client = vfu::Client::connect(&socket).map_err(|source| CliError::Connect {
        path: socket.clone(),
        source,
    })?;
    let cmd = CmdIf::new(
        client,
        CmdIfConfig {
            timeout,
            ..Default::default()
        },
    )?;
    let hca = Hca::new(cmd);
    let opts = HcaOptions {
        events: !polling,
        ..Default::default()
    };
    let info = hca.up(&opts)?;
    // Query everything first, print only when it all worked.
    let other = match vf {
        Some(n) => match n.checked_add(1) {
            Some(function_id) => hca.query_other_caps(function_id).map(|o| Some((n, o))),
            None => Err(HcaError::BadVf { vf: n }),
        },
        None => Ok(None),
    };
    let result = other.map(|other| {
        println!("socket: {}", socket.display());
        println!("firmware version: {}", info.fw);
        println!("cmdif revision: {}", info.fw.cmdif_rev);
        println!("board_id: {}", info.board_id);
        println!("issi: {}", info.issi);
        println!("vhca_id: {}", info.vhca_id);
        print_migration("", &info.migration);
        if let Some((n, other)) = other {
            println!("vf {n} function_id: {}", other.function_id);
            println!("vf {n} vhca_id: {}", other.vhca_id);
            print_migration(&format!("vf {n} "), &other.migration);
        }
    });
    let down = hca.down();
    result?;
    down?;
    Ok(())
}

/// Connects to a PF socket and brings the PF up with an arena of `arena_mib` MiB.
fn pf_up(socket: &Path, arena_mib: u64, timeout: Duration) -> Result<Arc<Hca>, CliError> {
    let client = vfu::Client::connect(socket).map_err(|source| CliError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let cmd = CmdIf::new(
        client,
        CmdIfConfig {
            timeout,
            arena: ArenaConfig {
                size: arena_mib.max(8) << 20,
                ..Default::default()
            },
            ..Default::default()
        },
    )?;
    let hca = Hca::new(cmd);
    hca.up(&HcaOptions::default())?;
    Ok(Arc::new(hca))
}

fn pf_down(pf: Arc<Hca>) {
    if let Err(e) = pf.down() {
        tracing::warn!(error = %e, "PF teardown");
    }
}

struct MigrateArgs {
    from: PathBuf,
    to: PathBuf,
    vf: Vec<u16>,
    threshold: u64,
    max_rounds: u32,
    arena_mib: u64,
    timeout: Duration,
    report: Option<PathBuf>,
}

/// Feeds a migration's progress to a bar.
struct Bar(indicatif::ProgressBar);

impl live::Observer for Bar {
    fn moved(&mut self, n: u64) {
        self.0.inc(n);
    }

    fn round(&mut self, r: &live::Round) {
        let want = self.0.position() + r.initial_bytes + r.dirty_bytes;
        if self.0.length().is_some_and(|l| l < want) {
            self.0.set_length(want);
        }
    }

    fn stop_copy(&mut self) {
        self.0.set_message("stop-copy");
    }
}

/// A progress bar (on stderr) when stdout is a terminal, for a long migration; none
/// otherwise (a script reading the summary line sees only that).
fn progress_bar(estimate: u64) -> indicatif::ProgressBar {
    if !std::io::stdout().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(estimate);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message("pre-copy");
    b
}

fn live_err(e: LiveError) -> CliError {
    match e {
        LiveError::Mig { what, source } => CliError::Mig {
            what: what.to_string(),
            source: Box::new(source),
        },
        other => CliError::Usage(other.to_string()),
    }
}

fn migrate(a: &MigrateArgs) -> Result<(), CliError> {
    let src_pf = pf_up(&a.from.join("pf.sock"), a.arena_mib, a.timeout)?;
    let dst_pf = match pf_up(&a.to.join("pf.sock"), a.arena_mib, a.timeout) {
        Ok(p) => p,
        Err(e) => {
            pf_down(src_pf);
            return Err(e);
        }
    };
    let r = migrate_between(a, &src_pf, &dst_pf);
    pf_down(src_pf);
    pf_down(dst_pf);
    r
}

fn migrate_between(a: &MigrateArgs, src_pf: &Arc<Hca>, dst_pf: &Arc<Hca>) -> Result<(), CliError> {
    let mut vfs = a.vf.clone();
    vfs.sort_unstable();
    vfs.dedup();
    if vfs.len() != a.vf.len() || vfs.is_empty() {
        return Err(CliError::Usage(format!(
            "--vf {:?}: expected distinct VF numbers",
            a.vf
        )));
    }
    if a.vf.len() > 1 {
        if let Some(path) = &a.report {
            return Err(CliError::Usage(format!(
                "--report {} draws one VF's migration; --vf {:?} migrates a group (drop --report or pass one VF)",
                path.display(),
                a.vf
            )));
        }
        return migrate_group(a, src_pf, dst_pf);
    }
    let vf = a.vf[0];
    let src = MigrationDevice::new(src_pf.clone(), vf).map_err(mig("source VF"))?;
    let dst = MigrationDevice::new(dst_pf.clone(), vf).map_err(mig("destination VF"))?;
    let r = run_migration(a, &src, &dst);
    if r.is_err() {
        // Abort: the source runs on, the destination is reset.
        if src.state() != MigState::Running {
            if let Err(e) = src.set_state(MigState::Running) {
                tracing::warn!(error = %e, "source back to RUNNING");
                src.reset();
            }
        }
        dst.reset();
    }
    r
}

fn run_migration(
    a: &MigrateArgs,
    src: &MigrationDevice,
    dst: &MigrationDevice,
) -> Result<(), CliError> {
    let estimate = src.data_size().map_err(mig("MIG_DATA_SIZE"))?;
    let mut bar = Bar(progress_bar(estimate));
    let opts = live::LiveOptions {
        threshold: a.threshold,
        max_rounds: a.max_rounds,
        ..Default::default()
    };
    let r = live::migrate(src, dst, &opts, &mut bar).map_err(live_err);
    bar.0.finish_and_clear();
    let r = r?;
    println!(
        "migrated vf {} (vhca_id {} -> {}): {} bytes, {} pre-copy rounds, downtime {:.3} ms, total {:.3} ms",
        src.info().vf,
        src.info().vhca_id,
        dst.info().vhca_id,
        r.bytes,
        r.rounds.len(),
        r.downtime.as_secs_f64() * 1e3,
        r.total.as_secs_f64() * 1e3
    );
    if let Some(path) = &a.report {
        mlx5vf::report::write_timeline(path, &r)
            .map_err(|e| CliError::Usage(format!("{e} (the migration itself succeeded)")))?;
        println!("timeline written to {}", path.display());
    }
    Ok(())
}

/// `--vf 0,1`: the VFs move as one [`MigrationGroup`] on each side.
fn migrate_group(a: &MigrateArgs, src_pf: &Arc<Hca>, dst_pf: &Arc<Hca>) -> Result<(), CliError> {
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for &vf in &a.vf {
        src.push(MigrationDevice::new(src_pf.clone(), vf).map_err(mig(format!("source VF {vf}")))?);
        dst.push(
            MigrationDevice::new(dst_pf.clone(), vf)
                .map_err(mig(format!("destination VF {vf}")))?,
        );
    }
    let (src, dst) = (MigrationGroup::new(src), MigrationGroup::new(dst));
    let r = run_group_migration(a, &src, &dst);
    if r.is_err() {
        // Abort: the sources run on (resumed in the group's order), the destinations
        // are reset.
        if src.states().iter().any(|&s| s != MigState::Running) {
            let back = [MigState::Stop, MigState::RunningP2p, MigState::Running];
            let from_running = src.states().iter().all(|&s| {
                matches!(
                    s,
                    MigState::Running | MigState::PreCopy | MigState::PreCopyP2p
                )
            });
            let walk = if from_running {
                &[MigState::Running][..]
            } else {
                &back[..]
            };
            if let Err(e) = src.walk(walk) {
                tracing::warn!(error = %e, "sources back to RUNNING");
                for m in src.members() {
                    if m.state() != MigState::Running {
                        m.reset();
                    }
                }
            }
        }
        for m in dst.members() {
            m.reset();
        }
    }
    r
}

fn run_group_migration(
    a: &MigrateArgs,
    src: &MigrationGroup,
    dst: &MigrationGroup,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut buf = vec![0u8; live::LiveOptions::default().chunk];
    let mut outs = dst.resuming().map_err(group("destinations to RESUMING"))?;
    let mut ins: Vec<DataStream> = src
        .walk(&[MigState::PreCopy])
        .map_err(group("sources to PRE_COPY"))?
        .into_iter()
        .flatten()
        .collect();
    if ins.len() != outs.len() || ins.len() != src.members().len() {
        return Err(CliError::Usage("a member opened no stream".into()));
    }
    let mut bytes = vec![0u64; ins.len()];
    let mut rounds = 0u32;
    loop {
        rounds += 1;
        let mut converged = true;
        for (i, (input, out)) in ins.iter_mut().zip(outs.iter_mut()).enumerate() {
            bytes[i] += live::pump(input, out, &mut buf, &mut ()).map_err(live_err)?;
            let info = input.precopy_info().map_err(mig("PRECOPY_INFO"))?;
            converged &= info.initial_bytes == 0 && info.dirty_bytes <= a.threshold;
        }
        if converged || rounds >= a.max_rounds {
            break;
        }
    }
    let stop = Instant::now();
    src.stop_copy().map_err(group("sources to STOP_COPY"))?;
    for (i, (input, out)) in ins.iter_mut().zip(outs.iter_mut()).enumerate() {
        bytes[i] += live::pump(input, out, &mut buf, &mut ()).map_err(live_err)?;
    }
    dst.start().map_err(group("destinations to RUNNING"))?;
    let downtime = stop.elapsed();
    src.walk(&[MigState::Stop])
        .map_err(group("sources to STOP"))?;
    for (i, (s, d)) in src.members().iter().zip(dst.members()).enumerate() {
        println!(
            "migrated vf {} (vhca_id {} -> {}): {} bytes",
            s.info().vf,
            s.info().vhca_id,
            d.info().vhca_id,
            bytes[i]
        );
    }
    println!(
        "migrated group of {} VFs: {} bytes, {} pre-copy rounds, downtime {:.3} ms, total {:.3} ms",
        ins.len(),
        bytes.iter().sum::<u64>(),
        rounds,
        downtime.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn is_bad_res_state(e: &MigError) -> bool {
    matches!(e, MigError::Cmd { source, .. } if source.status() == Some(CmdStatus::BadResStateErr))
}

/// The suspend level of the VF, probed with SUSPEND_VHCA and undone at once.
fn probe_state(fw: &Fw<'_>) -> Result<MigState, MigError> {
    match fw.suspend(SuspendOpMod::Initiator) {
        Ok(()) => {
            fw.resume(ResumeOpMod::Initiator)?;
            Ok(MigState::Running)
        }
        Err(e) if is_bad_res_state(&e) => match fw.suspend(SuspendOpMod::Responder) {
            Ok(()) => {
                fw.resume(ResumeOpMod::Responder)?;
                Ok(MigState::RunningP2p)
            }
            Err(e) if is_bad_res_state(&e) => Ok(MigState::Stop),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

fn state(
    pf_socket: &Path,
    vf: u16,
    set: Option<MigState>,
    timeout: Duration,
) -> Result<(), CliError> {
    if let Some(t) = set {
        if !matches!(t, MigState::Stop | MigState::RunningP2p | MigState::Running) {
            return Err(CliError::Usage(format!(
                "--set {t}: only STOP, RUNNING_P2P and RUNNING can be set from here; states with a data stream need `mlx5vf migrate`"
            )));
        }
    }
    let pf = pf_up(pf_socket, 8, timeout)?;
    let r = state_on(&pf, vf, set);
    pf_down(pf);
    r
}

fn state_on(pf: &Arc<Hca>, vf: u16, set: Option<MigState>) -> Result<(), CliError> {
    // Probe with a device in RUNNING first to learn vhca_id and chunk mode.
    let probe_dev = MigrationDevice::new(pf.clone(), vf).map_err(mig("VF"))?;
    let info = probe_dev.info();
    let (cur, q) = {
        let fw = Fw {
            hca: pf,
            vhca_id: info.vhca_id,
            chunk_mode: info.chunk_mode,
        };
        let cur = probe_state(&fw).map_err(mig("probing the suspend state"))?;
        let q = fw.query(false).map_err(mig("QUERY_VHCA_MIGRATION_STATE"))?;
        (cur, q)
    };
    println!("vf {vf} vhca_id: {}", info.vhca_id);
    println!("chunk mode: {}", u8::from(info.chunk_mode));
    println!("firmware migration_state: {}", q.migration_state);
    println!("required_umem_size: {}", q.required_umem_size);
    println!("data size: {}", q.total);
    println!("state: {cur} (inferred from the firmware)");
    if let Some(target) = set {
        let dev = MigrationDevice::with_state(pf.clone(), vf, cur).map_err(mig("VF"))?;
        dev.set_state(target)
            .map_err(mig(format!("{cur} -> {target}")))?;
        println!("state: {} (set)", dev.state());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Info {
            socket,
            vf,
            timeout_ms,
            polling,
        } => info(socket, vf, Duration::from_millis(timeout_ms), polling),
        Cmd::Migrate {
            from,
            to,
            vf,
            threshold,
            max_rounds,
            arena_mib,
            timeout_ms,
            report,
        } => migrate(&MigrateArgs {
            from,
            to,
            vf,
            threshold,
            max_rounds,
            arena_mib,
            timeout: Duration::from_millis(timeout_ms),
            report,
        }),
        Cmd::State {
            pf,
            vf,
            set,
            timeout_ms,
        } => state(&pf, vf, set, Duration::from_millis(timeout_ms)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let errno = e.errno();
            eprintln!("mlx5vf: error: {e} [{}, {errno}]", errno_name(errno));
            ExitCode::FAILURE
        }
    }
}
