//! Device memory of 16 GiB (the largest a function may have), migrated from one adapter
//! to another through mlx5vf's streams: stop-copy, the image fetched in chunks (QUERY's
//! `chunk`: the PRM's sizes are 32 bits, so an image above 4 GiB can only come so).
//!
//! Long and memory-hungry, so run on request:
//!
//! ```sh
//! cargo test --release --test large_dev_mem -- --ignored --nocapture --test-threads=1
//! ```
//!
//! * `mostly_untouched_16_gib_migrates_without_faulting_holes_in`: a few MiB written;
//!   the memfds of the whole process (device memory of both adapters, their frozen
//!   copies, the PFs' DMA arenas) must stay within a bound far below 16 GiB: nothing
//!   (scan, freeze, SAVE, LOAD, thaw) may fault a hole in.
//! * `an_image_above_4_gib_migrates_in_chunks`: `MLX5_LARGE_WRITE_MIB` MiB written
//!   (default 4352, 4.25 GiB: the image passes 4 GiB); source and destination each
//!   hold it twice at their peak (the device's frozen copy beside the client's memfd),
//!   so about 4 × that much RAM is needed; the test says so and stops if
//!   `MemAvailable` is short.
//!
//! Both compare every written byte at the destination and print the figures (time,
//! downtime, stream bytes, chunks, RSS, memfd bytes).

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Instant;

use mlx5_prm::cmd::migration::MAX_CHUNK_SIZE;
use mlx5_testbed::bringup::shared_pf_up;
use mlx5_testbed::devmem::pattern;
use mlx5_testbed::{AdapterConfig, Function, Testbed};
use mlx5vf::migration::live::{self, LiveOptions, LiveReport};
use mlx5vf::migration::MigrationDevice;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * GIB;

/// A kernel figure of this process from /proc/self/status, in bytes (`VmRSS`, ...).
fn status_bytes(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("{key} missing from /proc/self/status"))
}

/// Memory the memfds this process holds open take (blocks allocated, mapped or not):
/// device memory, frozen copies, DMA arenas.
fn memfd_bytes() -> u64 {
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path()) {
            if seen.insert(m.ino()) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn mem_available() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("MemAvailable")
        * 1024
}

fn adapter() -> Testbed {
    Testbed::start_with(AdapterConfig {
        vfs: 1,
        dev_mem: SIZE,
        ..AdapterConfig::default()
    })
}

/// Migrates VF 0 of `a` into VF 0 of `b`: stop-copy, chunk mode (the emulator offers
/// it and mlx5vf uses it).
fn migrate(a: &Testbed, b: &Testbed) -> LiveReport {
    let src = MigrationDevice::new(shared_pf_up(&a.pf_socket()), 0).expect("source VF");
    let dst = MigrationDevice::new(shared_pf_up(&b.pf_socket()), 0).expect("destination VF");
    let opts = LiveOptions {
        pre_copy: false,
        ..LiveOptions::default()
    };
    live::migrate(&src, &dst, &opts, &mut ()).expect("migration")
}

/// Checks that `f` holds `data` at `off`, read in 64 MiB pieces.
fn assert_holds(f: &Function, off: u64, data: &[u8]) {
    let mut got = vec![0u8; data.len()];
    f.devmem().read(off, &mut got).expect("device memory read");
    assert!(
        got == data,
        "destination differs at {off:#x}+{:#x}",
        data.len()
    );
}

fn report(what: &str, r: &LiveReport, t: std::time::Duration, written: u64) {
    // Each stop-copy chunk is one SAVE of at most MAX_CHUNK_SIZE bytes.
    let chunks = r.stop_copy_bytes.div_ceil(MAX_CHUNK_SIZE);
    println!(
        "{what}: 16 GiB device memory, {} MiB written: migrated in {t:?} (downtime {:?}), \
         {} stream bytes ({} stop-copy, at least {chunks} chunks of at most {} MiB); \
         VmRSS {} MiB, VmHWM {} MiB, memfds {} MiB",
        written / MIB,
        r.downtime,
        r.bytes,
        r.stop_copy_bytes,
        MAX_CHUNK_SIZE / MIB,
        status_bytes("VmRSS") / MIB,
        status_bytes("VmHWM") / MIB,
        memfd_bytes() / MIB,
    );
}

#[test]
#[ignore = "16 GiB device memory: run on request (see the module docs)"]
fn mostly_untouched_16_gib_migrates_without_faulting_holes_in() {
    let (a, b) = (adapter(), adapter());
    let (src, dst) = (a.vf(0), b.vf(0));
    let before = memfd_bytes();
    // 256 pages spread over the whole 16 GiB, and 4 MiB at the very end.
    let mut written = Vec::new();
    for k in 0..256u64 {
        let off = k * (SIZE / 256) + (k % 7) * 4096;
        let d = pattern(4096, 0x1a4e ^ k);
        src.devmem().write(off, &d).expect("write");
        written.push((off, d));
    }
    let tail = pattern(4 << 20, 0x7a11);
    let tail_off = SIZE - tail.len() as u64;
    src.devmem().write(tail_off, &tail).expect("write");
    written.push((tail_off, tail));
    let data: u64 = written.iter().map(|w| w.1.len() as u64).sum();

    let t = Instant::now();
    let r = migrate(&a, &b);
    let took = t.elapsed();
    report("untouched", &r, took, data);
    for (off, d) in &written {
        assert_holds(&dst, *off, d);
    }
    // Untouched pages next to written ones read as zeros (one page each: a read of a
    // hole allocates it, so only a few are looked at).
    for k in [0u64, 100, 255] {
        let off = k * (SIZE / 256) + (k % 7) * 4096 + 4096;
        assert_holds(&dst, off, &[0u8; 4096]);
    }
    // The image is the written pages, not the device memory.
    assert!(
        r.bytes < data + 64 * MIB,
        "{} stream bytes for {data} bytes written",
        r.bytes
    );
    // Nothing faulted the holes in: the memfds of both adapters (device memory, the
    // frozen copies, the PFs' arenas) grew by little more than what was written.
    let grown = memfd_bytes().saturating_sub(before);
    assert!(
        grown < 512 * MIB,
        "memfds grew by {} MiB migrating {} MiB of data: holes were faulted in",
        grown / MIB,
        data / MIB
    );
    assert!(
        status_bytes("VmHWM") < 2 * GIB,
        "peak RSS {} MiB",
        status_bytes("VmHWM") / MIB
    );
}

#[test]
#[ignore = "16 GiB device memory with more than 4 GiB written: run on request (see the module docs)"]
fn an_image_above_4_gib_migrates_in_chunks() {
    let mib: u64 = std::env::var("MLX5_LARGE_WRITE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4352);
    let write = mib * MIB;
    assert!(
        write > 4 * GIB && write <= SIZE,
        "MLX5_LARGE_WRITE_MIB={mib}: expected above 4096 (an image above 4 GiB) and at most 16384"
    );
    let need = 4 * write + 2 * GIB;
    let avail = mem_available();
    assert!(
        avail >= need,
        "{} MiB written needs about {} MiB of RAM, {} MiB available: set \
         MLX5_LARGE_WRITE_MIB lower (above 4096) or free memory",
        mib,
        need / MIB,
        avail / MIB
    );
    let (a, b) = (adapter(), adapter());
    let (src, dst): (Arc<Function>, Arc<Function>) = (a.vf(0), b.vf(0));
    // 64 MiB pieces, each its own seed, from offset 0; the rest untouched.
    let piece = 64 * MIB;
    let pieces = write.div_ceil(piece);
    for k in 0..pieces {
        let len = piece.min(write - k * piece) as usize;
        src.devmem()
            .write(k * piece, &pattern(len, 0xb16 ^ k))
            .expect("write");
    }
    let t = Instant::now();
    let r = migrate(&a, &b);
    let took = t.elapsed();
    report("above 4 GiB", &r, took, write);
    assert!(
        r.stop_copy_bytes > 4 * GIB,
        "the image ({} bytes) should pass 4 GiB",
        r.stop_copy_bytes
    );
    for k in 0..pieces {
        let len = piece.min(write - k * piece) as usize;
        assert_holds(&dst, k * piece, &pattern(len, 0xb16 ^ k));
    }
    assert_holds(&dst, write.next_multiple_of(4096), &[0u8; 4096]);
}
