//! The test harness that joins the mlx5 emulator and the mlx5vf driver.
//!
//! Tests and benches start adapters on sockets in a temporary directory, connect
//! clients to them, and find the workspace's binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's target directory as seen from a running test or bench binary
/// (`target/<profile>/deps/<test>` -> `target/<profile>`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary, built with `cargo build` if it is missing or older
/// than the test binary calling this (so `cargo test` alone is enough).
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let dir = target_profile_dir();
    let path = dir.join(bin);
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile == "release" {
        cmd.arg("--release");
    }
    cmd.current_dir(workspace_root());
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// The `mlx5-emu` binary.
pub fn emu_binary() -> PathBuf {
    workspace_binary("mlx5-emulator", "mlx5-emu")
}

/// The `mlx5vf` binary.
pub fn mlx5vf_binary() -> PathBuf {
    workspace_binary("mlx5vf", "mlx5vf")
}

/// The workspace root (where the root `Cargo.toml` lives).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub use mlx5_emulator::{Adapter, AdapterConfig, Function, FunctionId};

/// An adapter serving on sockets in a fresh temporary directory, removed on drop.
pub struct Testbed {
    pub adapter: Adapter,
    dir: tempfile::TempDir,
}

impl Testbed {
    /// Starts an adapter with `vfs` VFs.
    pub fn start(vfs: u16) -> Testbed {
        let dir = tempfile::Builder::new()
            .prefix("mlx5-emu-test")
            .tempdir()
            .expect("temp dir");
        let adapter = Adapter::start(&AdapterConfig {
            dir: dir.path().to_path_buf(),
            vfs,
            ..AdapterConfig::default()
        })
        .expect("start adapter");
        Testbed { adapter, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pf_socket(&self) -> PathBuf {
        self.dir.path().join("pf.sock")
    }

    pub fn vf_socket(&self, n: u16) -> PathBuf {
        self.dir.path().join(format!("vf{n}.sock"))
    }

    /// A negotiated client of VF `n`.
    pub fn vf_client(&self, n: u16) -> vfu::Client {
        vfu::Client::connect(&self.vf_socket(n)).expect("connect to VF")
    }
}

/// Starts `tracing` output for a test once (level from `RUST_LOG`, default warn).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}
