//! Criterion benchmarks. Each figure sits beside a baseline measured in the same run:
//! a vfio-user round trip beside a bare unix-socket round trip of the same size, and
//! device DMA through the IOVA space beside a plain memcpy, and SAVE/LOAD_VHCA_STATE of
//! device memory beside a memcpy of the same size, and RDMA_WRITE between QPs on two
//! VFs beside a memcpy of the same size.

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

/// SAVE_VHCA_STATE and LOAD_VHCA_STATE (stop-copy, one base image, non-chunk mode) of a
/// VF whose device memory is filled with seeded random data, beside a memcpy of the
/// device memory's size; a summary line per size gives each ratio to the memcpy.
fn save_restore(c: &mut Criterion) {
    let sizes: &[u64] = if measuring() {
        &[1 << 20, 64 << 20, 256 << 20]
    } else {
        &[1 << 20]
    };
    let mut g = c.benchmark_group("save_restore");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mut summary = Vec::new();
    for &size in sizes {
        let tb = Testbed::start_with(AdapterConfig {
            vfs: 1,
            dev_mem: size,
            ..AdapterConfig::default()
        });
        devmem::fill(&tb.vf(0), 0x5eed ^ size);
        // The MTT of a 256 MiB buffer takes ~1000 mailbox blocks.
        let mut cfg = bringup::config(size + size / 16 + (16 << 20));
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
        fw.suspend(SuspendOpMod::Initiator)
            .expect("suspend initiator");
        fw.suspend(SuspendOpMod::Responder)
            .expect("suspend responder");
        let need = fw.query(false).expect("query").required_umem_size;
        let pd = fw.alloc_pd().expect("pd");
        let buf = MigBuf::alloc(&fw, pd, need).expect("buffer");
        let image = fw.save(&buf, false, false).expect("save").actual_image_size;

        let len = size as usize;
        let src = devmem::pattern(len, size);
        let mut dst = vec![1u8; len];
        let (copy, save, load) = (Cell::default(), Cell::default(), Cell::default());
        let fresh_copy = Cell::default();
        let vf = tb.vf(0);
        g.throughput(Throughput::Bytes(size));
        let id = |what| BenchmarkId::new(what, format!("{}MiB", size >> 20));
        g.bench_function(id("memcpy"), |b| {
            b.iter_custom(|n| timed(&copy, n, || dst.copy_from_slice(black_box(&src))))
        });
        g.bench_function(id("save"), |b| {
            b.iter_custom(|n| {
                timed(&save, n, || {
                    fw.save(&buf, false, false).expect("save");
                })
            })
        });
        // A destination as a migration finds it: device memory never written (its
        // pages holes of the memfd, faulted in as the image lands), beside a memcpy
        // into memory just allocated (faulted in as the copy lands).
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
        let (m, s, l) = (mean(&copy), mean(&save), mean(&load));
        let mf = mean(&fresh_copy);
        // A filter (`-- save_restore/save`) leaves some unmeasured: no ratio then.
        if m.is_zero() || s.is_zero() || l.is_zero() || mf.is_zero() {
            buf.free(&fw);
            fw.dealloc_pd(pd);
            continue;
        }
        summary.push(format!(
            "save_restore {:>4} MiB (image {} B): memcpy {:?}, save {:?} = {:.2}x memcpy, \
             load into fresh memory {:?} = {:.2}x memcpy, {:.2}x memcpy into fresh memory ({:?})",
            size >> 20,
            image,
            m,
            s,
            m.as_secs_f64() / s.as_secs_f64(),
            l,
            m.as_secs_f64() / l.as_secs_f64(),
            mf.as_secs_f64() / l.as_secs_f64(),
            mf,
        ));
        buf.free(&fw);
        fw.dealloc_pd(pd);
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
/// mailbox) from doorbell to completion, completed by polling and by EQE + MSI-X
/// eventfd, beside a bare 64-byte unix-socket round trip; a summary line gives each
/// ratio to the bare round trip.
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
    for (name, events) in [("query_issi_polled", false), ("query_issi_eqe", true)] {
        // A fresh adapter each: a brought-up function cannot be brought up again.
        let tb = Testbed::start(1);
        let hca = bringup::up(tb.vf_client(0), bringup::ARENA, events);
        let input = mlx5vf::cmdif::new_input(mlx5_prm::Opcode::QueryIssi, 0, 16);
        let acc = Cell::default();
        g.bench_function(name, |bch| {
            bch.iter_custom(|n| {
                timed(&acc, n, || {
                    hca.cmd().exec(black_box(&input), 0x70).expect("QUERY_ISSI");
                })
            })
        });
        results.push((name, mean(&acc)));
    }
    g.finish();
    let base = mean(&bare);
    if base.is_zero() {
        return;
    }
    for (name, t) in results {
        if !t.is_zero() {
            println!(
                "command {name}: {t:?} = {:.2}x the bare 64-byte socket round trip ({base:?})",
                t.as_secs_f64() / base.as_secs_f64()
            );
        }
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

criterion_group!(
    benches,
    bare_round_trip,
    dma_vs_memcpy,
    save_restore,
    rdma_write,
    command,
    checksum
);
criterion_main!(benches);
