//! Criterion benchmarks. Each figure sits beside a baseline measured in the same run:
//! a vfio-user round trip beside a bare unix-socket round trip of the same size, and
//! device DMA through the IOVA space beside a plain memcpy.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mlx5_testbed::mem::GuestMem;
use mlx5_testbed::Testbed;
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

criterion_group!(benches, bare_round_trip, dma_vs_memcpy);
criterion_main!(benches);
