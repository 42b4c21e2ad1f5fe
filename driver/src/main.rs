//! `mlx5vf`: the driver's command line.
//!
//! `mlx5vf info --socket DIR/vf0.sock` brings the function up, prints what it learned
//! and brings it down again; `--vf N` on the PF socket reads VF N's capabilities
//! through the PF (`other_function`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mlx5vf::cmdif::{errno_name, CmdIf, CmdIfConfig};
use mlx5vf::hca::{Hca, HcaError, HcaOptions, MigrationCaps};

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
}

impl CliError {
    fn errno(&self) -> i32 {
        match self {
            CliError::Connect { .. } => -libc::ECONNREFUSED,
            CliError::Cmd(e) => e.errno(),
            CliError::Hca(e) => e.errno(),
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
    let mut hca = Hca::new(cmd);
    let opts = HcaOptions {
        events: !polling,
        ..Default::default()
    };
    let info = hca.up(&opts)?.clone();
    // Query everything first, print only when it all worked.
    let other = match vf {
        Some(n) => match n.checked_add(1) {
            Some(function_id) => hca.query_other_caps(function_id).map(|o| Some((n, o))),
            None => Err(HcaError::State("VF number too large")),
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
