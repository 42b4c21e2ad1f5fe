//! A small image of an initialized VF with something in every section: the known-good
//! input of the state image's own tests and the fuzz targets' seeds.

use mlx5_prm::cmd::caps::HCA_CAP_SIZE;
use mlx5_prm::cmd::qp::QpState;

use super::*;
use crate::firmware::{CqArm, QpPeer, Ring};

/// An image of a VF with 32 KiB of device memory (three pages written), two EQs (the
/// command EQ and a completion EQ, armed), a PD, two UARs, an mkey over two pages, a CQ and a connected
/// RTS QP, and eight firmware pages.
pub fn sample_image() -> Image {
    let mut caps = vec![0u8; HCA_CAP_SIZE];
    caps[0x10] = 0x42;
    Image {
        header: ImageHeader {
            function: ImageFunction::Vf,
            kind: ImageKind::Base,
            session: 0x1122_3344_5566_7788,
            seq: 1,
            base_seq: 0,
            dev_mem_size: 32 << 10,
        },
        hca: HcaImage {
            life_cycle: LifeCycle::Initialized,
            issi: 1,
            caps: caps.into(),
        },
        iseg: IsegImage {
            cmdq_address: 0x1_0000_1000,
            nic_interface: 0,
        },
        objects: ObjectsImage {
            uars: vec![3, 4],
            pds: vec![1],
            cmd_eq: Some(1),
            eqs: vec![
                EqImage {
                    eqn: 1,
                    uar: 3,
                    intr: 0,
                    log_size: 6,
                    page_size: 4096,
                    pas: vec![0x10_0000],
                    event_bitmask: [1 << 10, 0, 0, 0],
                    pi: 5,
                    written: 5,
                    ci: 4,
                    armed: true,
                },
                EqImage {
                    eqn: 2,
                    uar: 3,
                    intr: 1,
                    log_size: 6,
                    page_size: 4096,
                    pas: vec![0x11_0000],
                    event_bitmask: [0; 4],
                    pi: 0,
                    written: 0,
                    ci: 0,
                    armed: true,
                },
            ],
            mkeys: vec![MkeyImage {
                index: 1,
                variant: 0x5a,
                pd: 1,
                start: 0,
                len: 8192,
                log_page_size: 12,
                mtt: vec![0x20_0000, 0x30_0000],
            }],
            fw_pages: (1..=8).map(|i| i * 0x1000).collect(),
            cqs: vec![CqImage {
                cqn: 1,
                log_size: 6,
                ring: Ring {
                    log_page_size: 0,
                    pas: vec![0x40_0000],
                },
                uar: 4,
                eqn: 2,
                dbr: 0x41_0000,
                pi: 9,
                status: 0,
                arm: CqArm::Idle,
                arm_sn: 0,
                written: 9,
                last_solicited: None,
            }],
            qps: vec![QpImage {
                qpn: 2,
                state: QpState::Rts,
                pd: 1,
                uar: 4,
                log_msg_max: 20,
                has_rq: true,
                log_rq_size: 2,
                log_rq_stride: 1,
                has_sq: true,
                log_sq_size: 3,
                buf: Ring {
                    log_page_size: 0,
                    pas: vec![0x42_0000],
                },
                cqn_snd: 1,
                cqn_rcv: 1,
                dbr: 0x41_0040,
                rre: true,
                rwe: true,
                peer: Some(QpPeer { vhca_id: 2, qpn: 3 }),
                sq_ci: 5,
                rq_ci: 1,
            }],
        },
        pages: (0..3)
            .map(|i| PageImage {
                index: i * 2,
                data: vec![i as u8 + 1; 4096].into(),
            })
            .collect(),
    }
}
