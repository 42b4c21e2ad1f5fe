//! The PF's page-tracker reporter: sends the dirty pages a MODIFY to REPORTING took
//! out of a VF's log, as the firmware does — SEND messages from the tracker's
//! `reporting_qpn` into the host QP's posted receives ([`super::engine::fw_send`]),
//! at most `2^log_msg_size` bytes of 8-byte big-endian page addresses each, the
//! tracker state in the top 4 bits of every immediate: REPORTING while more follow,
//! TRACKING (or ERROR) on the last. The tracker is back in TRACKING before its last
//! message lands, so the driver's next MODIFY finds it ready; an OBJECT_CHANGE EQE
//! follows on an EQ that takes the event.
//!
//! The reporter runs on its own thread, after the MODIFY has completed: the driver
//! reposts receives while the report goes on, so a report may be larger than the
//! receive queue. A receive queue that stays empty ([`REPORT_RNR_TIMEOUT`]) or a
//! receive that fails puts the tracker in ERROR; nothing waits forever.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mlx5_prm::cmd::page_track::{
    report_imm, PageTrackState, OBJ_TYPE_PAGE_TRACK, REPORT_ENTRY_LEN,
};

use super::engine::{fw_send, FwSendError};
use super::Host;
use crate::firmware::ReportJob;

/// How long one report message waits for a receive WQE before the tracker goes to
/// ERROR (mlx5vf asks for infinite RNR retries; this bounds a driver that never
/// reposts).
pub const REPORT_RNR_TIMEOUT: Duration = Duration::from_secs(5);

/// The command side of a reporter: queues jobs, never blocks.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: Sender<ReportJob>,
}

impl Reporter {
    /// Queues `job`; false if the reporter thread is gone.
    pub fn submit(&self, job: ReportJob) -> bool {
        self.tx.send(job).is_ok()
    }
}

/// Starts the reporter thread of a function; it ends when the function is dropped.
/// Jobs are bounded by the trackers (one report in flight each).
pub fn spawn_reporter(host: Weak<dyn Host>, name: String) -> std::io::Result<Reporter> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(host, rx))?;
    Ok(Reporter { tx })
}

fn run(host: Weak<dyn Host>, rx: Receiver<ReportJob>) {
    while let Ok(job) = rx.recv() {
        let Some(h) = host.upgrade() else { return };
        report(&*h, &job);
    }
}

/// Sends one message, waiting (bounded) for a receive WQE, as long as tracker
/// `obj_id` exists.
fn send(h: &dyn Host, obj_id: u32, qpn: u32, data: &[u8], imm: u32) -> Result<(), FwSendError> {
    let deadline = Instant::now() + REPORT_RNR_TIMEOUT;
    let mut pause = Duration::from_micros(100);
    loop {
        match fw_send(h, qpn, data, imm) {
            Err(FwSendError::NoRecv)
                if Instant::now() < deadline
                    && h.firmware().lock().page_track(obj_id).is_some() =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Sends the report of `job` and returns the tracker to TRACKING (ERROR if pages were
/// lost or a message could not be delivered).
pub fn report(h: &dyn Host, job: &ReportJob) {
    let per_msg = (job.msg_size / REPORT_ENTRY_LEN).max(1);
    let mut chunks: Vec<&[u64]> = job.pages.chunks(per_msg).collect();
    if chunks.is_empty() || job.lost {
        chunks = vec![&[]];
    }
    let end = if job.lost {
        PageTrackState::Failed
    } else {
        PageTrackState::Tracking
    };
    let n = chunks.len();
    let mut failed = false;
    for (i, c) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        {
            let mut fw = h.firmware().lock();
            match fw.page_track(job.obj_id) {
                Some(t) if t.state == PageTrackState::Reporting => {}
                // Destroyed (or reset) meanwhile: the report has nobody to go to.
                _ => return,
            }
            if last {
                fw.set_page_track_state(job.obj_id, end);
            }
        }
        let msg: Vec<u8> = c.iter().flat_map(|p| p.to_be_bytes()).collect();
        let state = if last { end } else { PageTrackState::Reporting };
        if let Err(e) = send(h, job.obj_id, job.qpn, &msg, report_imm(state)) {
            tracing::warn!(
                vhca_id = h.env().id().vhca_id,
                obj_id = job.obj_id,
                qpn = job.qpn,
                error = %e,
                "page tracker report not delivered; tracker to ERROR"
            );
            h.firmware()
                .lock()
                .set_page_track_state(job.obj_id, PageTrackState::Failed);
            failed = true;
            break;
        }
    }
    tracing::debug!(
        obj_id = job.obj_id,
        pages = job.pages.len(),
        messages = n,
        failed,
        "page tracker report sent"
    );
    h.firmware()
        .post_obj_change_eqe(h.env(), OBJ_TYPE_PAGE_TRACK, job.obj_id);
}
