//! Criterion benchmarks. Each figure sits beside a baseline measured in the same run:
//! a vfio-user round trip beside a bare unix-socket round trip of the same size, and
//! device DMA through the IOVA space beside a plain memcpy, and SAVE/LOAD_VHCA_STATE of
//! device memory beside a memcpy of the same size, and RDMA_WRITE between QPs on two
//! VFs beside a memcpy of the same size, and a whole migration between two adapters
//! beside a memcpy and a unix-socket stream of the device memory's size.
//!
//! `cargo test --benches` runs each bench once at its small sizes; `cargo bench`
//! measures the large ones too (`MLX5_BENCH_MIGRATE_MIB=64,256` picks the `migrate`
//! sizes, `MLX5_BENCH_SAVE_1GIB=1` adds 1 GiB to `save_restore`).

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mlx5_prm::cmd::migration::SuspendOpMod;
use mlx5_testbed::mem::GuestMem;
use mlx5_testbed::{bringup, devmem, AdapterConfig, Testbed};
use mlx5vf::cmdif::CmdIf;
use mlx5vf::hca::{Hca, HcaOptions};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::fw::{Fw, MigBuf};
use vfu::uapi::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};

/// A request/reply over a socketpair, with a thread echoing `reply` bytes for every
/// `request` bytes: the floor under any vfio-user round trip.
fn bare_round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_trip");
    for (name, req, reply) in [("4B_read", 32usize, 36usize), ("4KiB_read", 32, 4128)] {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut inb = vec![0u8; req];
            let out = vec![0u8; reply];
            while b.read_exact(&mut inb).is_ok() {
                if b.write_all(&out).is_err() {
                    break;
                }
            }
        });
        let out = vec![1u8; req];
        let mut inb = vec![0u8; reply];
        g.bench_function(BenchmarkId::new("bare_socket", name), |bch| {
            bch.iter(|| {
                a.write_all(&out).unwrap();
                a.read_exact(&mut inb).unwrap();
            })
        });
        drop(a);
        echo.join().unwrap();
    }

    let tb = Testbed::start(1);
    let mut client = tb.vf_client(0);
    let mut four = [0u8; 4];
    g.bench_function(
        BenchmarkId::new("vfio_user_region_read", "4B_read"),
        |bch| {
            bch.iter(|| {
                client
                    .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, black_box(&mut four))
                    .unwrap()
            })
        },
    );
    let mut page = vec![0u8; 4096];
    g.bench_function(
        BenchmarkId::new("vfio_user_region_read", "4KiB_read"),
        |bch| {
            bch.iter(|| {
                client
                    .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0, black_box(&mut page))
                    .unwrap()
            })
        },
    );
    g.finish();
}

/// Device DMA into guest memory (a DMA-mapped memfd) beside a memcpy of the same size.
fn dma_vs_memcpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("dma_write");
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut client = tb.vf_client(0);
    let _mem = GuestMem::mapped(&mut client, "bench", 0, 1 << 20);
    for len in [4096usize, 1 << 20] {
        let src = vec![0x5au8; len];
        let mut dst = vec![0u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("memcpy", len), |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        g.bench_function(BenchmarkId::new("device_dma", len), |b| {
            b.iter(|| vf.dma().write(0, black_box(&src)).unwrap())
        });
    }
    g.finish();
}

/// Whether criterion measures (`cargo bench`) rather than runs each bench once
/// (`cargo test --benches`): the large sizes only then.
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Mean time per iteration of what `iter_custom` measured into `acc`.
fn mean(acc: &Cell<(u64, Duration)>) -> Duration {
    let (n, t) = acc.get();
    t / u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

/// Times `iters` runs of `f`, adding them to `acc`.
fn timed(acc: &Cell<(u64, Duration)>, iters: u64, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let e = t.elapsed();
    let (n, sum) = acc.get();
    acc.set((n + iters, sum + e));
    e
}

/// The `save_restore` sizes: 1 MiB once-through; 1, 64 and 256 MiB when measuring, and
/// 1 GiB too with `MLX5_BENCH_SAVE_1GIB=1`.
fn save_restore_sizes() -> Vec<u64> {
    if !measuring() {
        return vec![1 << 20];
    }
    let mut v = vec![1 << 20, 64 << 20, 256 << 20];
    if std::env::var("MLX5_BENCH_SAVE_1GIB").is_ok_and(|v| v == "1") {
        v.push(1 << 30);
    }
    v
}

/// The ratio of `base` to `t` (how many times the baseline's speed), "-" unmeasured.
fn ratio(base: Duration, t: Duration) -> String {
    if base.is_zero() || t.is_zero() {
        "-".into()
    } else {
        format!("{:.2}x", base.as_secs_f64() / t.as_secs_f64())
    }
}

/// SAVE_VHCA_STATE and LOAD_VHCA_STATE of the stop-copy image of a VF whose device
/// memory is filled with seeded random data, beside a memcpy of the device memory's
/// size: in non-chunk mode (one base image in one buffer; up to 256 MiB, the largest
/// buffer the PF's 1 GiB arena holds beside the chunks) and in chunk mode (QUERY's
/// `chunk`: a base image and deltas of at most MAX_CHUNK_SIZE each, as mlx5vf fetches
/// a large image). LOAD goes into a destination whose device memory was never written,
/// as a migration's is, and is also given against a memcpy into freshly allocated
/// memory. A summary line per size gives each ratio to the memcpy.
fn save_restore(c: &mut Criterion) {
    let mut g = c.benchmark_group("save_restore");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mut summary = Vec::new();
    for size in save_restore_sizes() {
        let tb = Testbed::start_with(AdapterConfig {
            vfs: 1,
            dev_mem: size,
            ..AdapterConfig::default()
        });
        devmem::fill(&tb.vf(0), 0x5eed ^ size);
        // Non-chunk mode needs one buffer of the whole image; chunk mode one per chunk
        // (so LOAD can replay them), or one reused at 1 GiB (then no chunked LOAD).
        let whole = size <= 256 << 20;
        let arena = if whole {
            2 * (size + size / 16) + (32 << 20)
        } else {
            64 << 20
        };
        let mut cfg = bringup::config(arena.min(mlx5vf::cmdif::arena::MAX_ARENA_SIZE));
        // The MTT of a 256 MiB buffer takes ~1000 mailbox blocks.
        cfg.arena.mailbox_blocks = 4096;
        let pf = Hca::new(CmdIf::new(tb.pf_client(), cfg).expect("command interface"));
        pf.up(&HcaOptions {
            events: true,
            ..Default::default()
        })
        .expect("bring-up");
        let fw = Fw {
            hca: &pf,
            vhca_id: 1,
            chunk_mode: false,
        };
        let fw_chunk = Fw {
            chunk_mode: true,
            ..fw
        };
        fw.suspend(SuspendOpMod::Initiator)
            .expect("suspend initiator");
        fw.suspend(SuspendOpMod::Responder)
            .expect("suspend responder");
        let pd = fw.alloc_pd().expect("pd");

        let len = size as usize;
        let src = devmem::pattern(len, size);
        let mut dst = vec![1u8; len];
        let (copy, save, load) = (Cell::default(), Cell::default(), Cell::default());
        let (csave, cload) = (Cell::default(), Cell::default());
        let fresh_copy = Cell::default();
        let vf = tb.vf(0);
        g.throughput(Throughput::Bytes(size));
        let id = |what| BenchmarkId::new(what, format!("{}MiB", size >> 20));
        g.bench_function(id("memcpy"), |b| {
            b.iter_custom(|n| timed(&copy, n, || dst.copy_from_slice(black_box(&src))))
        });
        // A destination as a migration finds it: memory never written (the device's
        // pages holes of the memfd), beside a memcpy into memory just allocated.
        g.bench_function(id("memcpy_fresh"), |b| {
            b.iter_custom(|n| {
                let mut e = Duration::ZERO;
                for _ in 0..n {
                    let mut fresh = vec![0u8; len];
                    e += timed(&fresh_copy, 1, || fresh.copy_from_slice(black_box(&src)));
                    black_box(&fresh);
                }
                e
            })
        });
        drop(dst);
        let mut image = 0;
        if whole {
            let need = fw.query(false).expect("query").required_umem_size;
            let buf = MigBuf::alloc(&fw, pd, need).expect("buffer");
            image = fw.save(&buf, false, false).expect("save").actual_image_size;
            g.bench_function(id("save"), |b| {
                b.iter_custom(|n| {
                    timed(&save, n, || {
                        fw.save(&buf, false, false).expect("save");
                    })
                })
            });
            g.bench_function(id("load"), |b| {
                b.iter_custom(|n| {
                    let mut e = Duration::ZERO;
                    for _ in 0..n {
                        vf.devmem().zero().expect("zero device memory");
                        e += timed(&load, 1, || fw.load(&buf, image).expect("load"));
                    }
                    e
                })
            });
            buf.free(&fw);
        }
        // Chunk mode: the base image's first chunk, then deltas, each into its buffer.
        let per_chunk = fw_chunk.query(false).expect("query").required_umem_size;
        let nbufs = if whole {
            (size / per_chunk.saturating_sub(64 << 10).max(4096) + 2) as usize
        } else {
            1
        };
        let bufs: Vec<MigBuf> = (0..nbufs)
            .map(|_| MigBuf::alloc(&fw, pd, per_chunk).expect("chunk buffer"))
            .collect();
        let save_chunks = |sizes: &mut Vec<u64>| {
            sizes.clear();
            for k in 0.. {
                let buf = &bufs[k % bufs.len()];
                let r = fw_chunk.save(buf, k > 0, false).expect("chunk save");
                sizes.push(r.actual_image_size);
                if r.next_required_umem_size == 0 {
                    break;
                }
                assert!(k < 1 << 20, "chunked SAVE does not end");
            }
        };
        let mut chunks = Vec::new();
        save_chunks(&mut chunks);
        assert!(
            !whole || chunks.len() <= bufs.len(),
            "{} chunks, {} buffers",
            chunks.len(),
            bufs.len()
        );
        g.bench_function(id("save_chunked"), |b| {
            b.iter_custom(|n| timed(&csave, n, || save_chunks(&mut Vec::new())))
        });
        if whole {
            g.bench_function(id("load_chunked"), |b| {
                b.iter_custom(|n| {
                    let mut e = Duration::ZERO;
                    for _ in 0..n {
                        vf.devmem().zero().expect("zero device memory");
                        e += timed(&cload, 1, || {
                            for (buf, &len) in bufs.iter().zip(&chunks) {
                                fw.load(buf, len).expect("chunk load");
                            }
                        });
                    }
                    e
                })
            });
        }
        for b in bufs {
            b.free(&fw);
        }
        fw.dealloc_pd(pd);
        let (m, mf) = (mean(&copy), mean(&fresh_copy));
        let (s, l, cs, cl) = (mean(&save), mean(&load), mean(&csave), mean(&cload));
        // A filter (`-- save_restore/save`) leaves some unmeasured: "-" then, and no
        // line for a size it left out altogether.
        if [m, s, l, cs, cl].iter().all(Duration::is_zero) {
            continue;
        }
        summary.push(format!(
            "save_restore {:>4} MiB: memcpy {m:?} (into fresh memory {mf:?}); \
             non-chunk (image {image} B): save {s:?} = {} memcpy, load {l:?} = {} memcpy, \
             {} memcpy into fresh memory; chunk mode ({} chunks, {} B): save {cs:?} = {} \
             memcpy, load {cl:?} = {} memcpy, {} memcpy into fresh memory",
            size >> 20,
            ratio(m, s),
            ratio(m, l),
            ratio(mf, l),
            chunks.len(),
            chunks.iter().sum::<u64>(),
            ratio(m, cs),
            ratio(m, cl),
            ratio(mf, cl),
        ));
    }
    g.finish();
    for line in summary {
        println!("{line}");
    }
}

/// RDMA_WRITE of one WQE (posted, rung, its CQE polled) from a QP on VF 0 into a QP's
/// peer buffer on VF 1, beside a memcpy of the same size; a summary line per size gives
/// the ratio to the memcpy.
fn rdma_write(c: &mut Criterion) {
    use mlx5_testbed::dma::{self as tdma, connect, end, next};
    use mlx5vf::dma::{DmaQueues, QpSizes, SendWr, Sge};
    let sizes: &[usize] = if measuring() {
        &[4 << 10, 64 << 10, 1 << 20, 16 << 20]
    } else {
        &[4 << 10, 64 << 10]
    };
    let data = 32u64 << 20;
    let tb = Testbed::start(2);
    let a = tdma::node(&tb.vf_socket(0), data);
    let b = tdma::node(&tb.vf_socket(1), data);
    let qa = DmaQueues::new(&a.hca).expect("queues on VF 0");
    let qb = DmaQueues::new(&b.hca).expect("queues on VF 1");
    let mut ea = end(&qa, 8, QpSizes::default());
    let eb = end(&qb, 8, QpSizes::default());
    connect(&qa, &ea, &qb, &eb);
    let mut g = c.benchmark_group("rdma_write");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let mut summary = Vec::new();
    for &len in sizes {
        a.mem.write(0, &vec![0x5a; len]);
        let src = vec![0x5au8; len];
        let mut dst = vec![0u8; len];
        let (copy, rdma) = (Cell::default(), Cell::default());
        g.throughput(Throughput::Bytes(len as u64));
        let id = |what| BenchmarkId::new(what, format!("{}KiB", len >> 10));
        g.bench_function(id("memcpy"), |bch| {
            bch.iter_custom(|n| timed(&copy, n, || dst.copy_from_slice(black_box(&src))))
        });
        let wr = SendWr::RdmaWrite {
            sges: vec![Sge {
                lkey: a.key,
                addr: 0,
                len: len as u32,
            }],
            raddr: 16 << 20,
            rkey: b.key,
            imm: None,
        };
        g.bench_function(id("two_vfs"), |bch| {
            bch.iter_custom(|n| {
                timed(&rdma, n, || {
                    qa.post_send(&mut ea.qp, &wr, true).expect("post");
                    qa.ring(&mut ea.qp).expect("ring");
                    let c = next(&qa, &mut ea);
                    assert!(c.is_ok(), "{c:?}");
                })
            })
        });
        let (m, r) = (mean(&copy), mean(&rdma));
        if m.is_zero() || r.is_zero() {
            continue;
        }
        summary.push(format!(
            "rdma_write {:>6} KiB: memcpy {:?}, RDMA_WRITE VF0->VF1 {:?} = {:.3}x memcpy \
             ({:.0} MiB/s)",
            len >> 10,
            m,
            r,
            m.as_secs_f64() / r.as_secs_f64(),
            len as f64 / r.as_secs_f64() / f64::from(1u32 << 20),
        ));
    }
    g.finish();
    for line in summary {
        println!("{line}");
    }
}

/// One firmware command (QUERY_ISSI: a 16-byte input, a 0x70-byte output, no
/// mailbox) from doorbell to completion, beside a bare 64-byte unix-socket round trip:
/// completed by polling the entry (`polled`), by the command EQE with the driver's
/// default spin window (`eqe`: the EQ polled for a moment, armed and the MSI-X eventfd
/// waited on only past it), and by the EQE's interrupt alone (`eqe_irq`: no spin, every
/// completion through the eventfd). A summary line gives each ratio to the bare round
/// trip.
fn command(c: &mut Criterion) {
    let mut g = c.benchmark_group("command");
    let bare = Cell::default();
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut m = [0u8; 64];
        while b.read_exact(&mut m).is_ok() {
            if b.write_all(&m).is_err() {
                break;
            }
        }
    });
    let mut m = [7u8; 64];
    g.bench_function("bare_socket_64B", |bch| {
        bch.iter_custom(|n| {
            timed(&bare, n, || {
                a.write_all(&m).unwrap();
                a.read_exact(&mut m).unwrap();
            })
        })
    });
    drop(a);
    echo.join().unwrap();
    let mut results = Vec::new();
    let variants = [
        ("polled", false, None),
        ("eqe", true, None),
        ("eqe_irq", true, Some(Duration::ZERO)),
    ];
    for (name, events, spin) in variants {
        // A fresh adapter each: a brought-up function cannot be brought up again.
        let tb = Testbed::start(1);
        let hca = bringup::up(tb.vf_client(0), bringup::ARENA, events);
        if let Some(spin) = spin {
            hca.cmd().set_spin(spin);
        }
        let input = mlx5vf::cmdif::new_input(mlx5_prm::Opcode::QueryIssi, 0, 16);
        let before = hca.cmd().stats();
        let acc = Cell::default();
        g.bench_function(format!("query_issi_{name}"), |bch| {
            bch.iter_custom(|n| {
                timed(&acc, n, || {
                    hca.cmd().exec(black_box(&input), 0x70).expect("QUERY_ISSI");
                })
            })
        });
        let s = hca.cmd().stats();
        let (done, irqs) = (
            s.completed_by_polling + s.completed_by_eqe
                - before.completed_by_polling
                - before.completed_by_eqe,
            s.interrupts - before.interrupts,
        );
        results.push((name, mean(&acc), done, irqs));
    }
    g.finish();
    let base = mean(&bare);
    if base.is_zero() {
        return;
    }
    let figures: Vec<String> = results
        .iter()
        .filter(|(_, t, _, _)| !t.is_zero())
        .map(|(name, t, done, irqs)| {
            format!(
                "{name} {t:?} = {:.2}x ({irqs} interrupts for {done} commands)",
                t.as_secs_f64() / base.as_secs_f64()
            )
        })
        .collect();
    if !figures.is_empty() {
        println!(
            "command QUERY_ISSI round trip, to the bare 64-byte socket round trip ({base:?}): {}",
            figures.join(", ")
        );
    }
}

/// The image checksum's options, each over a copy in 256 KiB runs as SAVE and LOAD
/// make it (copy a run, then sum the copy while it is in cache), beside a memcpy of the
/// same size: xxh3-64 streamed on the same thread (format version 1), xxh3-64 on the
/// other core while this one copies (a two-stage pipeline), and the block CRC32C of
/// format version 2 (`state::sum`).
fn checksum(c: &mut Criterion) {
    use mlx5_emulator::state::sum::Sum;
    use xxhash_rust::xxh3::Xxh3Default;
    const RUN: usize = 256 << 10;
    let len: usize = if measuring() { 256 << 20 } else { 1 << 20 };
    let src = devmem::pattern(len, 0xc5c);
    let mut dst = vec![1u8; len];
    let mut g = c.benchmark_group("checksum");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes(len as u64));
    let accs: [Cell<(u64, Duration)>; 4] = Default::default();
    let id = |what| BenchmarkId::new(what, format!("{}MiB", len >> 20));
    g.bench_function(id("memcpy"), |b| {
        b.iter_custom(|n| timed(&accs[0], n, || dst.copy_from_slice(black_box(&src))))
    });
    g.bench_function(id("copy_xxh3"), |b| {
        b.iter_custom(|n| {
            timed(&accs[1], n, || {
                let mut h = Xxh3Default::new();
                for (d, s) in dst.chunks_mut(RUN).zip(src.chunks(RUN)) {
                    d.copy_from_slice(s);
                    h.update(d);
                }
                black_box(h.digest());
            })
        })
    });
    g.bench_function(id("copy_xxh3_other_core"), |b| {
        b.iter_custom(|n| {
            timed(&accs[2], n, || {
                let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(2);
                std::thread::scope(|sc| {
                    let hasher = sc.spawn(move || {
                        let mut h = Xxh3Default::new();
                        for run in rx {
                            h.update(run);
                        }
                        h.digest()
                    });
                    for (d, s) in dst.chunks_mut(RUN).zip(src.chunks(RUN)) {
                        d.copy_from_slice(s);
                        let d: &[u8] = d;
                        tx.send(d).expect("hasher");
                    }
                    drop(tx);
                    black_box(hasher.join().expect("hasher"));
                });
            })
        })
    });
    g.bench_function(id("copy_crc32c_blocks"), |b| {
        b.iter_custom(|n| {
            timed(&accs[3], n, || {
                let mut sum = Sum::new();
                for (d, s) in dst.chunks_mut(RUN).zip(src.chunks(RUN)) {
                    d.copy_from_slice(s);
                    sum.update(d);
                }
                black_box(sum.finish());
            })
        })
    });
    g.finish();
    let m = mean(&accs[0]);
    let names = ["copy_xxh3", "copy_xxh3_other_core", "copy_crc32c_blocks"];
    for (name, acc) in names.iter().zip(&accs[1..]) {
        let t = mean(acc);
        if !m.is_zero() && !t.is_zero() {
            println!(
                "checksum {name} {} MiB: {t:?} = {:.2}x memcpy ({m:?})",
                len >> 20,
                m.as_secs_f64() / t.as_secs_f64()
            );
        }
    }
}

/// The `migrate` sizes: `MLX5_BENCH_MIGRATE_MIB` (comma-separated MiB, up to 256),
/// else 256 MiB when measuring and 1 MiB once-through.
fn migrate_sizes() -> Vec<u64> {
    if let Ok(v) = std::env::var("MLX5_BENCH_MIGRATE_MIB") {
        let sizes: Vec<u64> = v
            .split(',')
            .filter_map(|s| s.trim().parse::<u64>().ok())
            .filter(|m| m.is_power_of_two() && *m <= 256)
            .map(|m| m << 20)
            .collect();
        if !sizes.is_empty() {
            return sizes;
        }
        eprintln!("MLX5_BENCH_MIGRATE_MIB={v:?}: expected powers of two up to 256 (MiB); using the defaults");
    }
    if measuring() {
        vec![256 << 20]
    } else {
        vec![1 << 20]
    }
}

/// Dirties `pct` % of a function's device-memory pages each time the pre-copy loop
/// drains a round (between the drain and PRECOPY_INFO), on a writer thread of its own;
/// the loop waits for the round's writes to land.
struct Dirtier {
    go: std::sync::mpsc::Sender<u32>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Dirtier {
    fn start(
        vf: std::sync::Arc<mlx5_emulator::Function>,
        pct: u64,
    ) -> (Dirtier, std::thread::JoinHandle<()>) {
        use rand::{Rng, SeedableRng};
        let (go, rx) = std::sync::mpsc::channel::<u32>();
        let (tx, done) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let pages = vf.devmem().size() / 4096;
            let per_round = pages * pct / 100;
            let mut rng = rand::rngs::StdRng::seed_from_u64(0xd1e7 ^ pct);
            let mut page = [0u8; 4096];
            for round in rx {
                for i in 0..per_round {
                    rng.fill(&mut page[..]);
                    page[..8].copy_from_slice(&(u64::from(round) << 32 | i).to_le_bytes());
                    let at = rng.gen_range(0..pages) * 4096;
                    devmem::write(&vf, at, &page);
                }
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
        (Dirtier { go, done }, writer)
    }
}

impl mlx5vf::migration::live::Observer for Dirtier {
    fn round_drained(&mut self, round: u32) {
        self.go.send(round).expect("writer thread");
        self.done.recv().expect("writer thread");
    }
}

/// A PF with a DMA arena large enough for the SAVE and LOAD buffers of a whole
/// `size`-byte image in chunk mode (pre-copy's buffer plus two stop-copy chunks).
fn migration_pf(tb: &Testbed, size: u64) -> std::sync::Arc<Hca> {
    let arena = (3 * size + size / 4 + (32 << 20)).min(mlx5vf::cmdif::arena::MAX_ARENA_SIZE);
    let mut cfg = bringup::config(arena);
    cfg.arena.mailbox_blocks = 4096;
    let pf = Hca::new(CmdIf::new(tb.pf_client(), cfg).expect("command interface"));
    pf.up(&HcaOptions {
        events: true,
        ..Default::default()
    })
    .expect("bring-up");
    std::sync::Arc::new(pf)
}

/// A whole migration of a VF with `size` bytes of random device memory from one
/// adapter to another (each its own vfio-user server, the driver on both PFs), through
/// the driver's streams (`migration::live`): stop-copy alone, and pre-copy with 0, 1
/// and 10 % of the pages dirtied per round by a writer thread (at most 3 rounds, then
/// stop-copy); and stop-copy of a VF whose device memory was never written, as a
/// share of the written one's time. Beside a memcpy of `size` bytes and a unix-socket stream of `size`
/// bytes between two threads. A summary line per size gives the migration's ratio to
/// the memcpy and to the socket stream, and each pre-copy downtime's ratio to the
/// downtime without pre-copy.
fn migrate(c: &mut Criterion) {
    use mlx5vf::migration::live::{self, LiveOptions};
    use mlx5vf::migration::MigrationDevice;
    let mut g = c.benchmark_group("migrate");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(5));
    let mut summary = Vec::new();
    for size in migrate_sizes() {
        let cfg = || AdapterConfig {
            vfs: 1,
            dev_mem: size,
            ..AdapterConfig::default()
        };
        let (a, b) = (Testbed::start_with(cfg()), Testbed::start_with(cfg()));
        devmem::fill(&a.vf(0), 0x319 ^ size);
        let src = MigrationDevice::new(migration_pf(&a, size), 0).expect("source VF");
        let dst = MigrationDevice::new(migration_pf(&b, size), 0).expect("destination VF");
        let len = size as usize;
        let from = devmem::pattern(len, size);
        let mut to = vec![1u8; len];
        let id = |what: &str| BenchmarkId::new(what, format!("{}MiB", size >> 20));
        g.throughput(Throughput::Bytes(size));
        let copy = Cell::default();
        g.bench_function(id("memcpy"), |bch| {
            bch.iter_custom(|n| timed(&copy, n, || to.copy_from_slice(black_box(&from))))
        });
        let sock = Cell::default();
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        let (go, went) = std::sync::mpsc::channel::<()>();
        let sender = std::thread::spawn(move || {
            let piece = vec![0x5au8; 1 << 20];
            for () in went {
                let mut left = len;
                while left > 0 {
                    let n = left.min(piece.len());
                    tx.write_all(&piece[..n]).expect("socket stream");
                    left -= n;
                }
            }
        });
        let mut piece = vec![0u8; 1 << 20];
        g.bench_function(id("unix_socket_stream"), |bch| {
            bch.iter_custom(|n| {
                timed(&sock, n, || {
                    go.send(()).expect("sender");
                    let mut left = len;
                    while left > 0 {
                        let k = left.min(piece.len());
                        rx.read_exact(&mut piece[..k]).expect("socket stream");
                        left -= k;
                    }
                })
            })
        });
        drop(go);
        sender.join().expect("sender");
        // (name, pre-copy, % dirtied per round): total and downtime per iteration.
        let runs: [(&str, bool, u64); 4] = [
            ("stop_copy", false, 0),
            ("pre_copy_0pct", true, 0),
            ("pre_copy_1pct", true, 1),
            ("pre_copy_10pct", true, 10),
        ];
        let mut figures = Vec::new();
        for (name, pre_copy, pct) in runs {
            let opts = LiveOptions {
                pre_copy,
                threshold: 64 << 10,
                max_rounds: 3,
                ..LiveOptions::default()
            };
            let (mut dirtier, writer) = Dirtier::start(a.vf(0), pct);
            let (total, down) = (Cell::default(), Cell::default());
            let rounds = Cell::new(0usize);
            let bytes = Cell::new(0u64);
            g.bench_function(id(name), |bch| {
                bch.iter_custom(|n| {
                    let mut e = Duration::ZERO;
                    for _ in 0..n {
                        let r = live::migrate(&src, &dst, &opts, &mut dirtier).expect("migration");
                        e += r.total;
                        let (k, d) = down.get();
                        down.set((k + 1, d + r.downtime));
                        rounds.set(r.rounds.len());
                        bytes.set(r.bytes);
                        src.set_state(MigState::Running)
                            .expect("source back to RUNNING");
                    }
                    let (k, t) = total.get();
                    total.set((k + n, t + e));
                    e
                })
            });
            drop(dirtier);
            writer.join().expect("writer");
            figures.push((
                name,
                pct,
                mean(&total),
                mean(&down),
                rounds.get(),
                bytes.get(),
            ));
        }
        // The same stop-copy migration of a VF whose device memory was never written:
        // its cost should not grow with the memory's size.
        let untouched = {
            let (c, d) = (Testbed::start_with(cfg()), Testbed::start_with(cfg()));
            let src = MigrationDevice::new(migration_pf(&c, size), 0).expect("source VF");
            let dst = MigrationDevice::new(migration_pf(&d, size), 0).expect("destination VF");
            let opts = LiveOptions {
                pre_copy: false,
                ..LiveOptions::default()
            };
            let t = Cell::default();
            g.bench_function(id("stop_copy_untouched"), |bch| {
                bch.iter_custom(|n| {
                    let mut e = Duration::ZERO;
                    for _ in 0..n {
                        let r = live::migrate(&src, &dst, &opts, &mut ()).expect("migration");
                        e += r.total;
                        src.set_state(MigState::Running)
                            .expect("source back to RUNNING");
                    }
                    let (k, sum) = t.get();
                    t.set((k + n, sum + e));
                    e
                })
            });
            mean(&t)
        };
        let (m, s) = (mean(&copy), mean(&sock));
        let Some(&(_, _, whole, base_down, _, whole_bytes)) = figures.first() else {
            continue;
        };
        if m.is_zero() || s.is_zero() || whole.is_zero() {
            continue;
        }
        summary.push(format!(
            "migrate {:>4} MiB: memcpy {m:?}, unix-socket stream {s:?} ({:.2}x memcpy); \
             stop-copy migration {whole:?} ({} stream bytes, {:.0} MiB/s) = {:.3}x memcpy, \
             {:.3}x the socket stream; downtime {base_down:?}",
            size >> 20,
            m.as_secs_f64() / s.as_secs_f64(),
            whole_bytes,
            size as f64 / whole.as_secs_f64() / f64::from(1u32 << 20),
            m.as_secs_f64() / whole.as_secs_f64(),
            s.as_secs_f64() / whole.as_secs_f64(),
        ));
        if !untouched.is_zero() {
            summary.push(format!(
                "migrate {:>4} MiB stop_copy_untouched (device memory never written): \
                 {untouched:?} = {:.1}% of the written one's {whole:?}",
                size >> 20,
                100.0 * untouched.as_secs_f64() / whole.as_secs_f64(),
            ));
        }
        for &(name, pct, t, d, rounds, bytes) in &figures[1..] {
            if t.is_zero() || base_down.is_zero() {
                continue;
            }
            summary.push(format!(
                "migrate {:>4} MiB {name} ({pct}% of pages dirtied per round): total {t:?} \
                 ({rounds} rounds, {bytes} stream bytes) = {:.3}x memcpy; downtime {d:?} = \
                 {:.3}x the downtime without pre-copy ({base_down:?})",
                size >> 20,
                m.as_secs_f64() / t.as_secs_f64(),
                d.as_secs_f64() / base_down.as_secs_f64(),
            ));
        }
    }
    g.finish();
    for line in summary {
        println!("{line}");
    }
}

criterion_group!(
    benches,
    bare_round_trip,
    dma_vs_memcpy,
    save_restore,
    rdma_write,
    command,
    checksum,
    migrate
);
criterion_main!(benches);
