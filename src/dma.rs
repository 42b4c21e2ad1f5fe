//! Functions with DMA queues: a guest-side VF brought up with a data buffer behind one
//! mkey, ready for `mlx5vf::dma::DmaQueues`, and QP pairs connected between two of them
//! (or on one).

use std::path::Path;
use std::time::Duration;

use mlx5vf::dma::{Completion, Cq, DmaQueues, Qp, QpAddr, QpSizes};
use mlx5vf::hca::Hca;

use crate::bringup;
use crate::mem::GuestMem;

/// IOVA of a node's data buffer (2 MiB aligned: its mkey has 2 MiB pages).
pub const DATA_IOVA: u64 = 0x40_0000_0000;
/// Page size of the data mkey.
pub const DATA_LOG_PAGE: u8 = 21;
/// How long a test waits for one CQE.
pub const CQE_WAIT: Duration = Duration::from_secs(10);

/// A guest-side function with its data buffer: `mem` is DMA-mapped at [`DATA_IOVA`] and
/// registered whole as `key`, whose virtual address 0 is the buffer's first byte.
pub struct DmaNode {
    pub hca: Hca,
    pub mem: GuestMem,
    pub key: u32,
    pub vhca_id: u16,
}

/// Brings up the VF behind `socket` (polling) with `data` bytes (a multiple of 2 MiB)
/// of data buffer.
pub fn node(socket: &Path, data: u64) -> DmaNode {
    let mut client = vfu::Client::connect(socket).expect("VF client");
    let mem = GuestMem::mapped(&mut client, "dma-data", DATA_IOVA, data);
    let hca = bringup::up(client, bringup::ARENA, false);
    let page = 1u64 << DATA_LOG_PAGE;
    let mtt: Vec<u64> = (0..data.div_ceil(page))
        .map(|i| DATA_IOVA + i * page)
        .collect();
    let key = hca
        .create_mkey(&mtt, DATA_LOG_PAGE, data, 0x5a)
        .expect("data mkey");
    let vhca_id = hca.info().expect("up").vhca_id;
    DmaNode {
        hca,
        mem,
        key,
        vhca_id,
    }
}

/// One side of a connection: its queues' CQ (send and receive) and QP.
pub struct End {
    pub cq: Cq,
    pub qp: Qp,
}

/// Creates a CQ of 2^`log_cq` entries and a QP on `q`.
pub fn end(q: &DmaQueues<'_>, log_cq: u8, sizes: QpSizes) -> End {
    let cq = q.create_cq(log_cq).expect("create CQ");
    let qp = q.create_qp(&cq, &cq, sizes).expect("create QP");
    End { cq, qp }
}

/// Two QPs on one function (CQs of 64 entries, default sizes) connected to each other
/// by force loopback.
pub fn loopback_pair(q: &DmaQueues<'_>) -> (End, End) {
    let a = end(q, 6, QpSizes::default());
    let b = end(q, 6, QpSizes::default());
    connect(q, &a, q, &b);
    (a, b)
}

/// Connects `a` (on `qa`) and `b` (on `qb`) to each other; on one function (`qa` and
/// `qb` the same) by force loopback.
pub fn connect(qa: &DmaQueues<'_>, a: &End, qb: &DmaQueues<'_>, b: &End) {
    let same = qa.vhca_id() == qb.vhca_id();
    qa.connect(
        &a.qp,
        QpAddr {
            vhca_id: qb.vhca_id(),
            qpn: b.qp.qpn,
            loopback: same,
        },
    )
    .expect("connect a");
    qb.connect(
        &b.qp,
        QpAddr {
            vhca_id: qa.vhca_id(),
            qpn: a.qp.qpn,
            loopback: same,
        },
    )
    .expect("connect b");
}

/// The next CQE of `e`, waited for at most [`CQE_WAIT`].
pub fn next(q: &DmaQueues<'_>, e: &mut End) -> Completion {
    q.poll_wait(&mut e.cq, Some(&mut e.qp), CQE_WAIT)
        .expect("a CQE")
}

/// A seeded byte pattern of `len` bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
