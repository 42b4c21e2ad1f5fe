//! The workspace's binaries as tests run them.

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

/// The `mlx5-emu` binary, built at most once per test process.
pub fn emu_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| workspace_binary("mlx5-emulator", "mlx5-emu"))
        .clone()
}

/// The `mlx5vf` binary, built at most once per test process.
pub fn mlx5vf_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| workspace_binary("mlx5vf", "mlx5vf"))
        .clone()
}

/// The workspace root (where the root `Cargo.toml` lives).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `mlx5vf args...` to its end: (success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    run(&mlx5vf_binary(), args)
}

/// Runs `mlx5-emu args...` to its end (`mlx5-emu fault ...`): (success, stdout,
/// stderr).
pub fn run_emu(args: &[&str]) -> (bool, String, String) {
    run(&emu_binary(), args)
}

fn run(bin: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A path as a CLI argument.
pub fn arg(p: &Path) -> String {
    p.display().to_string()
}
