//! The bounded fault soak (issue 12): 200 seeded stop-copy migrations between two
//! adapters, each running the ready plan `fixtures/faults/random-soak.toml` (faults
//! drawn at random from the seed: SAVE refused, corrupted or truncated, LOAD refused or
//! failing part-way, SUSPEND busy, QUERY delayed). It prints a summary (migrations
//! attempted, faults fired by kind, outcomes by errno and state) and asserts that no
//! state was lost and nothing hung: every command has a 2 s timeout, and a migration
//! that ran into one counts as a hang.
//!
//! `MLX5_EMU_SEED=N cargo test --test fault_soak -- --nocapture` replays another seed;
//! `MLX5_EMU_SOAK=N` runs N migrations instead of 200.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mlx5_emulator::fault::Plan;
use mlx5_testbed::devmem;
use mlx5_testbed::migrate::{try_capture, write_in_chunks, Rig};
use mlx5_testbed::{init_tracing, seed, workspace_root, Testbed};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::MigError;
use rand::{Rng, SeedableRng};

/// Every command's timeout: a fault that left a command hanging shows up as a hang.
const CMD_TIMEOUT: Duration = Duration::from_secs(2);

fn outcome(side: &str, e: &MigError, state: MigState) -> String {
    format!("{side} errno {} -> {state}", e.errno())
}

/// The source's stop-copy stream, or the failure; the source ends in RUNNING either
/// way (it runs on after a failed save).
fn save(src: &Rig) -> Result<Vec<u8>, String> {
    let r = try_capture(&src.dev);
    r.map_err(|e| {
        let o = outcome("save", &e, src.dev.state());
        if src.dev.set_state(MigState::Running).is_err() {
            src.dev.reset();
        }
        o
    })
}

/// Loads `stream` into `dst`; on failure the VMM resets the destination (FLR, then
/// reset_done). A refusal that left the device out of ERROR must have changed nothing.
fn load(dst: &Rig, stream: &[u8]) -> Result<(), String> {
    let before = dst.dev_mem();
    let r = (|| -> Result<(), MigError> {
        let mut w = dst
            .dev
            .set_state(MigState::Resuming)?
            .ok_or(MigError::NoDev)?;
        write_in_chunks(&mut w, stream, 64 << 10)?;
        dst.dev.set_state(MigState::Running)?;
        Ok(())
    })();
    r.map_err(|e| {
        let state = dst.dev.state();
        if state != MigState::Error {
            assert!(
                dst.dev_mem() == before,
                "a destination that refused an image ({e}) changed"
            );
        }
        let o = outcome("load", &e, state);
        dst.vf().reset();
        dst.dev.reset();
        o
    })
}

#[test]
fn soak_seeded_migrations_under_random_faults_lose_nothing_and_never_hang() {
    init_tracing();
    let base = seed(2026);
    let n: usize = std::env::var("MLX5_EMU_SOAK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let plan = Plan::from_file(&workspace_root().join("fixtures/faults/random-soak.toml"))
        .expect("the soak plan");
    let start = |seed| {
        let r = Rig::on(
            Testbed::builder()
                .faults(Plan {
                    seed,
                    ..plan.clone()
                })
                .dev_mem(256 << 10)
                .start(),
        );
        r.set_timeout(CMD_TIMEOUT);
        r
    };
    let src = start(base);
    let dst = start(base ^ 0x5eed);
    let size = src.vf().devmem().size() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(base);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let (mut lost, mut hangs, mut ok) = (0usize, 0usize, 0usize);
    let t0 = Instant::now();
    for i in 0..n {
        // The guest writes a few pages between migrations.
        for _ in 0..4 {
            let page = rng.gen_range(0..size / 4096);
            devmem::write(
                &src.vf(),
                (page * 4096) as u64,
                &devmem::pattern(4096, i as u64),
            );
        }
        let expected = src.dev_mem();
        let t = Instant::now();
        let r = save(&src).and_then(|stream| load(&dst, &stream));
        if t.elapsed() >= CMD_TIMEOUT {
            hangs += 1;
        }
        if src.dev_mem() != expected {
            lost += 1;
            eprintln!("migration {i}: the source lost state");
        }
        match r {
            Ok(()) => {
                ok += 1;
                *outcomes.entry("migrated".into()).or_default() += 1;
                if dst.dev_mem() != expected {
                    lost += 1;
                    eprintln!("migration {i}: the destination differs from the source");
                }
            }
            Err(o) => *outcomes.entry(o).or_default() += 1,
        }
        assert_eq!(
            src.dev.state(),
            MigState::Running,
            "migration {i}: source state"
        );
    }
    let mut fired: BTreeMap<String, usize> = BTreeMap::new();
    for line in src
        .tb
        .faults()
        .log()
        .lines()
        .into_iter()
        .chain(dst.tb.faults().log().lines())
    {
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        let key = format!(
            "{} ({})",
            v["effect"].as_str().unwrap_or("?"),
            v["rule"].as_str().unwrap_or("?")
        );
        *fired.entry(key).or_default() += 1;
    }
    println!(
        "fault soak, seed {base}: {n} migrations attempted, {ok} migrated, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("  faults fired by kind:");
    for (k, v) in &fired {
        println!("    {v:5}  {k}");
    }
    println!("  outcomes:");
    for (k, v) in &outcomes {
        println!("    {v:5}  {k}");
    }
    println!("  lost state: {lost}, hangs: {hangs}");
    assert_eq!(lost, 0, "state was lost");
    assert_eq!(hangs, 0, "a migration ran into a command timeout");
    assert!(!fired.is_empty(), "the plan fired nothing");
    assert!(ok > 0, "no migration succeeded");
    assert!(ok < n, "no fault failed a migration");
}
