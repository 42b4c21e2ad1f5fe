//! Fault injection on the DMA engine's DMA (issue 12): the engine reads WQEs and data
//! and writes data and CQEs through the function's `Env`, so the fault plan's DMA
//! rules reach it like every other DMA of the device. A faulted DMA completes the WQE
//! with the error CQE the PRM defines, moves only its QP to ERR, and changes no byte it
//! was not allowed to.

use mlx5_emulator::fault::Rule;
use mlx5_prm::cmd::qp::QpState;
use mlx5_prm::wqe::{vendor_synd as vs, CqeOpcode, CqeSyndrome};
use mlx5_testbed::dma::{self, loopback_pair, next, DmaNode, End};
use mlx5_testbed::{init_tracing, Testbed};
use mlx5vf::dma::{DmaQueues, SendWr, Sge};

/// Posts an RDMA_WRITE of `len` bytes from offset 0 to offset `to` of `n`'s buffer and
/// rings it.
fn rdma_write(n: &DmaNode, q: &DmaQueues<'_>, a: &mut End, to: u64, len: u32) {
    q.post_send(
        &mut a.qp,
        &SendWr::RdmaWrite {
            sges: vec![Sge {
                lkey: n.key,
                addr: 0,
                len,
            }],
            raddr: to,
            rkey: n.key,
            imm: None,
        },
        true,
    )
    .unwrap();
    q.ring(&mut a.qp).unwrap();
}

/// The first DMA write the engine makes for an RDMA_WRITE is the data into the
/// responder's buffer: faulted, the WQE completes with a remote access error, the
/// destination keeps its bytes, only that QP goes to ERR; another QP moves data.
#[test]
fn a_dma_write_fault_on_an_rdma_write_completes_with_a_remote_access_error() {
    init_tracing();
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    n.mem.write(0, b"payload!");
    n.mem.write(8192, b"original");
    tb.faults()
        .add(&[Rule::new("engine write", "dma_write_fault")
            .vhca_id(n.vhca_id)
            .nth(1)])
        .unwrap();
    rdma_write(&n, &q, &mut a, 8192, 8);
    let c = next(&q, &mut a);
    assert_eq!(c.opcode, CqeOpcode::ReqErr, "{c:?}");
    assert_eq!(
        (c.syndrome, c.vendor_err),
        (Some(CqeSyndrome::RemoteAccessErr), vs::UNMAPPED),
        "{c:?}"
    );
    assert_eq!(q.query_qp(a.qp.qpn).unwrap().0, QpState::Err);
    assert_eq!(n.mem.read(8192, 8), b"original", "the faulted write landed");
    let log = tb.faults().log().lines();
    assert!(
        log.len() == 1 && log[0].contains("\"site\":\"dma\"") && log[0].contains("\"opcode\":null"),
        "{log:?}"
    );
    // The rule fired once: a fresh pair moves the data.
    let (mut c2, _d2) = loopback_pair(&q);
    rdma_write(&n, &q, &mut c2, 8192, 8);
    assert!(next(&q, &mut c2).is_ok());
    assert_eq!(n.mem.read(8192, 8), b"payload!");
}

/// The engine's DMA reads for one RDMA_WRITE: the doorbell record, the WQE, then the
/// source data. The third faulted: a local access error, nothing written.
#[test]
fn a_dma_read_fault_on_the_source_completes_with_a_local_access_error() {
    init_tracing();
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    n.mem.write(0, b"payload!");
    n.mem.write(8192, b"original");
    tb.faults()
        .add(&[Rule::new("engine read", "dma_read_fault")
            .vhca_id(n.vhca_id)
            .dma(3)])
        .unwrap();
    rdma_write(&n, &q, &mut a, 8192, 8);
    let c = next(&q, &mut a);
    assert_eq!(c.opcode, CqeOpcode::ReqErr, "{c:?}");
    assert_eq!(
        (c.syndrome, c.vendor_err),
        (Some(CqeSyndrome::LocalAccessErr), vs::UNMAPPED),
        "{c:?}"
    );
    assert_eq!(q.query_qp(a.qp.qpn).unwrap().0, QpState::Err);
    assert_eq!(n.mem.read(8192, 8), b"original");
    assert_eq!(tb.faults().log().total(), 1);
}
