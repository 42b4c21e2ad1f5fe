//! Replays every committed fuzz corpus input (`fuzz/corpus/<target>/`) through the
//! target's body, so CI checks on the stable toolchain that no input once found (nor
//! any seed) crashes, hangs or breaks an invariant. The fuzzing itself runs outside CI
//! (docs/SECURITY.md).

use std::path::PathBuf;
use std::time::Duration;

use mlx5_testbed::fuzzing;
use mlx5_testbed::wait::bounded;
use mlx5_testbed::workspace_root;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = workspace_root().join("fuzz/corpus").join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).expect("corpus input");
            (p, data)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "{} holds no input", dir.display());
    v
}

/// The seeds as the code builds them now (`fuzzing::seeds`), replayed too, so a change
/// of a format the committed seeds predate is still covered; `MLX5_WRITE_SEEDS=1`
/// rewrites the committed `seed-<name>` files from them.
fn code_seeds(target: &'static str, body: fn(&[u8])) {
    let dir = workspace_root().join("fuzz/corpus").join(target);
    for (name, data) in fuzzing::seeds(target) {
        if std::env::var_os("MLX5_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), &data).unwrap();
        }
        body(&data);
    }
}

fn replay(target: &'static str, body: fn(&[u8])) {
    mlx5_testbed::init_tracing();
    code_seeds(target, body);
    let n = bounded(Duration::from_secs(120), move || {
        let all = inputs(target);
        for (path, data) in &all {
            tracing::debug!(input = %path.display(), "replaying");
            body(data);
        }
        all.len()
    });
    eprintln!("{target}: {n} corpus inputs replayed");
}

#[test]
fn vfu_message_corpus() {
    replay("vfu_message", fuzzing::vfu_message);
}

#[test]
fn cmdq_entry_corpus() {
    replay("cmdq_entry", fuzzing::cmdq_entry);
}

#[test]
fn fw_dispatch_corpus() {
    replay("fw_dispatch", fuzzing::fw_dispatch);
}

#[test]
fn state_image_corpus() {
    replay("state_image", fuzzing::state_image);
}

#[test]
fn resume_stream_corpus() {
    replay("resume_stream", fuzzing::resume_stream);
}

#[test]
fn wqe_ring_corpus() {
    replay("wqe_ring", fuzzing::wqe_ring);
}
