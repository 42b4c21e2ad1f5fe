//! Every bound the adapter keeps on what a client, a guest or a migration stream can
//! make it hold or do, in one place (the vfio-user ones are [`vfu::limits`]). Past each
//! one the request gets a clear refusal — a PRM status and syndrome, a delivery status,
//! a vfio-user errno — and the function goes on serving; nothing grows without bound.
//!
//! | limit | value | past it |
//! |---|---|---|
//! | EQs per function | [`MAX_NUM_EQS`] | CREATE_EQ: NO_RESOURCES (`syndrome::NO_RESOURCES`); an image with more is refused before decoding them |
//! | UARs per function | [`MAX_UARS`] | ALLOC_UAR: NO_RESOURCES |
//! | PDs per function | [`MAX_PDS`] | ALLOC_PD: NO_RESOURCES |
//! | mkeys per function | [`MAX_MKEYS`] | CREATE_MKEY: NO_RESOURCES; an image with more is refused before decoding them |
//! | CQs / QPs per function | [`MAX_CQS`] / [`MAX_QPS`] | CREATE_CQ / CREATE_QP: NO_RESOURCES |
//! | firmware pages per function | [`MAX_FW_PAGES`] | MANAGE_PAGES(GIVE): refused with the page-count syndrome |
//! | commands in flight per function | [`CMDQ_SLOTS`] slots, one command each | a slot already hardware-owned is not fetched twice |
//! | doorbells queued per function | [`SLOT_BACKLOG`] per slot ([`CMDQ_SLOTS`] slots) | the ringing thread waits (flow control), nothing is dropped |
//! | command input / output | [`MAX_CMD_IN_LEN`] / [`MAX_CMD_OUT_LEN`] | delivery status IN/OUT_LENGTH_ERR, the command does not run |
//! | BAR0 access | [`MAX_ACCESS_LEN`] | `EINVAL` |
//! | command log | [`CMD_LOG_CAPACITY`] records | the oldest are dropped |
//! | refused-UAR-write log | [`UAR_LOG_CAPACITY`] records per function | the oldest are dropped; the total keeps counting; the warning is rate-limited |
//! | violation log | [`VIOLATION_LOG_CAPACITY`] records | the oldest are dropped; the total keeps counting; the warning is rate-limited ([`vfu::ratelimit`]) |
//! | device memory | [`MAX_DEV_MEM_SIZE`] | `--dev-mem` refused at start-up |
//! | state image | [`MAX_IMAGE_LEN`] (objects section [`MAX_OBJECTS_LEN`]) | LOAD: BAD_PARAM, `mig_syndrome::BAD_SIZE` |
//! | drain at responder suspend | [`DRAIN_TIMEOUT`] | SUSPEND_VHCA: INT_ERR, back to initiator-suspended |
//! | VFs per adapter | [`MAX_VFS`] | refused at start-up |
//! | page trackers per PF, ranges per tracker | 2^[`LOG_MAX_PAGE_TRACKERS`], [`MAX_TRACK_RANGES`] | CREATE_GENERAL_OBJECT: NO_RESOURCES / BAD_PARAM |
//! | dirty pages a tracked function's log holds | [`MAX_DIRTY_PAGES`] | the tracker goes to ERROR (pages lost) at its next report |
//! | a report message waiting for a receive WQE | [`REPORT_RNR_TIMEOUT`] | the tracker goes to ERROR |

pub use crate::adapter::MAX_VFS;
pub use crate::bar0::MAX_ACCESS_LEN;
pub use crate::cmdq::mailbox::{MAX_CMD_IN_LEN, MAX_CMD_OUT_LEN};
pub use crate::cmdq::{CMDQ_SLOTS, SLOT_BACKLOG};
pub use crate::devmem::MAX_DEV_MEM_SIZE;
pub use crate::dma::REPORT_RNR_TIMEOUT;
pub use crate::firmware::page_track::{LOG_MAX_PAGE_TRACKERS, MAX_DIRTY_PAGES, MAX_TRACK_RANGES};
pub use crate::firmware::tables::*;
pub use crate::firmware::{
    CMD_LOG_CAPACITY, DRAIN_TIMEOUT, UAR_LOG_CAPACITY, VIOLATION_LOG_CAPACITY,
};
pub use crate::state::{MAX_IMAGE_LEN, MAX_OBJECTS_LEN};
