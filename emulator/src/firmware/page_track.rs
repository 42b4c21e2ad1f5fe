//! The PAGE_TRACK general object: dirty page tracking of a VF's DMA writes, created
//! by the PF for the VF's `vhca_id` (as mlx5vf does on the PF's mdev), and its
//! general-object commands (CREATE / MODIFY / QUERY / DESTROY_GENERAL_OBJECT with
//! `obj_type` PAGE_TRACK); kernel-mlx5vf.md §5, `prm::cmd::page_track`.
//!
//! The object lives in the PF's firmware ([`PageTrack`]); the marks live beside the
//! tracked function, in its [`DirtyLog`] (a leaf lock), because every DMA write that
//! function's DMA path makes — its command queue's, its EQEs and CQEs, its engine's
//! data, and what a peer's engine writes into it — goes through
//! [`DirtyLog::mark`] after it has landed. Only device DMA is marked: a store the
//! client makes into its own memory, or into the device memory it mmaps, is not.
//!
//! MODIFY to REPORTING takes the marks of the range out of the log (clearing them)
//! and hands them to the PF's reporter ([`Env::page_report`]), which SENDs them from
//! the object's `reporting_qpn` into the host QP connected to it and returns the
//! object to TRACKING with the last message (then raises OBJECT_CHANGE on an EQ that
//! takes it). A log that overflowed ([`MAX_DIRTY_PAGES`]) puts the object in ERROR:
//! pages were lost, as mlx5vf expects a tracker to say.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use mlx5_prm::cmd::caps::HCA_CAP_SIZE;
use mlx5_prm::cmd::page_track::{
    adv_virt_cap, ctx, in_msg, range_length, range_start, PageTrackState, GENERAL_OBJ_IN_HDR_LEN,
    GENERAL_OBJ_IN_OBJ_ID, GENERAL_OBJ_IN_OBJ_TYPE, GENERAL_OBJ_OUT_HDR_LEN,
    GENERAL_OBJ_OUT_OBJ_ID, MODIFY_RANGE, MODIFY_STATE, OBJ_TYPE_PAGE_TRACK, PAGE_TRACK_IN_LEN,
    QUERY_PAGE_TRACK_OUT_LEN, TRACK_TYPE_DMA_WRITE,
};
use mlx5_prm::ifc::set;
use mlx5_prm::CmdStatus;

use super::{first_free, syndrome, Cmd, CmdFail, CmdResult, Env, Firmware};
use crate::pci::FunctionKind;

/// log2 of the trackers a PF holds (`pg_track_log_max_num`).
pub const LOG_MAX_PAGE_TRACKERS: u8 = 4;
/// Ranges one tracker takes (`pg_track_max_num_range`).
pub const MAX_TRACK_RANGES: u8 = 16;
/// `pg_track_log_min_addr_space` / `_max_addr_space`.
pub const LOG_MIN_ADDR_SPACE: u8 = 12;
pub const LOG_MAX_ADDR_SPACE: u8 = 48;
/// `pg_track_log_min_msg_size` / `_max_msg_size`: 4 KiB messages (512 entries).
pub const LOG_MIN_MSG_SIZE: u8 = 12;
pub const LOG_MAX_MSG_SIZE: u8 = 12;
/// `pg_track_log_min_page_size` / `_max_page_size`: 4 KiB to 1 GiB.
pub const LOG_MIN_PAGE_SIZE: u8 = 12;
pub const LOG_MAX_PAGE_SIZE: u8 = 30;
/// Dirty pages one log holds; a write past it puts the tracker in ERROR.
pub const MAX_DIRTY_PAGES: usize = 1 << 20;

/// Syndromes of the page-tracker commands ("PT" in the high half).
pub mod pt_syndrome {
    /// `obj_type` is not one this firmware implements.
    pub const UNKNOWN_OBJ_TYPE: u32 = 0x5054_0001;
    /// `track_type` is not DMA writes (1).
    pub const BAD_TRACK_TYPE: u32 = 0x5054_0002;
    /// `log_page_size` outside the capability's range.
    pub const BAD_PAGE_SIZE: u32 = 0x5054_0003;
    /// `log_msg_size` outside the capability's range.
    pub const BAD_MSG_SIZE: u32 = 0x5054_0004;
    /// `num_ranges` is 0 or above `pg_track_max_num_range`.
    pub const BAD_NUM_RANGES: u32 = 0x5054_0005;
    /// A range is empty, not page-aligned, wraps, or overlaps another.
    pub const BAD_RANGE: u32 = 0x5054_0006;
    /// `log_addr_space_size` outside the capability, or smaller than the ranges.
    pub const BAD_ADDR_SPACE: u32 = 0x5054_0007;
    /// `reporting_qpn` is no QP of this function, or not ready to send.
    pub const BAD_REPORTING_QP: u32 = 0x5054_0008;
    /// The function already has a tracker.
    pub const ALREADY_TRACKED: u32 = 0x5054_0009;
    /// The MODIFY asks for a state change the tracker cannot make now.
    pub const BAD_STATE: u32 = 0x5054_000a;
    /// `modify_field_select` names no field this firmware changes, or not the state.
    pub const BAD_FIELD_SELECT: u32 = 0x5054_000b;
    /// The function cannot be tracked (not a VF of this adapter, or the PF itself).
    pub const NOT_TRACKABLE: u32 = 0x5054_000c;
}

fn refuse(status: CmdStatus, synd: u32, why: std::fmt::Arguments<'_>) -> CmdFail {
    tracing::info!(syndrome = format_args!("{synd:#x}"), "page tracker: {why}");
    CmdFail::new(status, synd)
}

/// The ADV_VIRTUALIZATION capability page of the PF (what mlx5vf sizes its tracker
/// from).
pub fn adv_virtualization_caps() -> Box<[u8]> {
    use adv_virt_cap as c;
    let mut p = vec![0u8; HCA_CAP_SIZE].into_boxed_slice();
    for (f, v) in [
        (c::PG_TRACK_LOG_MAX_NUM, LOG_MAX_PAGE_TRACKERS),
        (c::PG_TRACK_MAX_NUM_RANGE, MAX_TRACK_RANGES),
        (c::PG_TRACK_LOG_MIN_ADDR_SPACE, LOG_MIN_ADDR_SPACE),
        (c::PG_TRACK_LOG_MAX_ADDR_SPACE, LOG_MAX_ADDR_SPACE),
        (c::PG_TRACK_LOG_MIN_MSG_SIZE, LOG_MIN_MSG_SIZE),
        (c::PG_TRACK_LOG_MAX_MSG_SIZE, LOG_MAX_MSG_SIZE),
        (c::PG_TRACK_LOG_MIN_PAGE_SIZE, LOG_MIN_PAGE_SIZE),
        (c::PG_TRACK_LOG_MAX_PAGE_SIZE, LOG_MAX_PAGE_SIZE),
    ] {
        set(&mut p, f, u64::from(v));
    }
    p
}

/// A page tracker object of the PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTrack {
    pub id: u32,
    /// The tracked function.
    pub vhca_id: u16,
    pub state: PageTrackState,
    pub log_page_size: u8,
    pub log_msg_size: u8,
    pub log_addr_space_size: u8,
    /// The PF's QP the reports are sent from.
    pub reporting_qpn: u32,
    /// The tracked IOVA ranges, (start, length), sorted.
    pub ranges: Vec<(u64, u64)>,
}

/// What MODIFY to REPORTING hands the reporter: the pages to send, taken out of the
/// log (and so cleared), and where from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportJob {
    /// The tracker (an object of the PF's firmware).
    pub obj_id: u32,
    /// The PF's QP the messages are sent from.
    pub qpn: u32,
    /// Bytes of one message at most.
    pub msg_size: usize,
    /// Dirty page addresses, ascending.
    pub pages: Vec<u64>,
    /// The log overflowed: the report ends in ERROR.
    pub lost: bool,
}

#[derive(Debug)]
struct Tracking {
    obj_id: u32,
    log_page: u8,
    /// (start, end) exclusive, sorted, page-aligned.
    ranges: Vec<(u64, u64)>,
    dirty: BTreeSet<u64>,
    overflow: bool,
}

/// The dirty pages of one tracked function: marked by its DMA path, taken by its
/// tracker's reports. A leaf lock; a function no tracker watches pays one atomic load
/// per DMA write.
#[derive(Debug)]
pub struct DirtyLog {
    active: AtomicBool,
    inner: Mutex<Option<Tracking>>,
    /// Pages the log holds before it overflows ([`MAX_DIRTY_PAGES`]).
    cap: usize,
}

impl Default for DirtyLog {
    fn default() -> Self {
        DirtyLog::with_capacity(MAX_DIRTY_PAGES)
    }
}

impl DirtyLog {
    /// A log that overflows past `cap` pages (tests; functions use
    /// [`MAX_DIRTY_PAGES`]).
    pub fn with_capacity(cap: usize) -> Self {
        DirtyLog {
            active: AtomicBool::new(false),
            inner: Mutex::new(None),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Tracking>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking for tracker `obj_id` (replacing any earlier log).
    pub fn start(&self, obj_id: u32, log_page: u8, ranges: &[(u64, u64)]) {
        let ranges = ranges.iter().map(|&(s, l)| (s, s + l)).collect();
        *self.lock() = Some(Tracking {
            obj_id,
            log_page,
            ranges,
            dirty: BTreeSet::new(),
            overflow: false,
        });
        self.active.store(true, Ordering::Release);
    }

    /// Stops the tracking of tracker `obj_id` (another tracker's is left alone).
    pub fn stop(&self, obj_id: u32) {
        let mut g = self.lock();
        if g.as_ref().is_some_and(|t| t.obj_id == obj_id) {
            *g = None;
            self.active.store(false, Ordering::Release);
        }
    }

    /// Whether a tracker watches this function.
    pub fn is_tracking(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Marks the tracked pages `iova..iova+len` touches (a DMA write that landed).
    pub fn mark(&self, iova: u64, len: usize) {
        if len == 0 || !self.is_tracking() {
            return;
        }
        let end = iova.saturating_add(len as u64);
        let mut g = self.lock();
        let Some(t) = g.as_mut() else { return };
        let cap = self.cap;
        let page = 1u64 << t.log_page;
        for &(s, e) in &t.ranges {
            let lo = s.max(iova);
            let hi = e.min(end);
            let mut p = lo & !(page - 1);
            while p < hi {
                if t.dirty.len() >= cap && !t.dirty.contains(&p) {
                    if !t.overflow {
                        tracing::warn!(
                            obj_id = t.obj_id,
                            max = cap,
                            "dirty log full; tracker goes to ERROR at its next report"
                        );
                    }
                    t.overflow = true;
                    return;
                }
                t.dirty.insert(p);
                p += page;
            }
        }
    }

    /// Takes (and clears) the dirty pages of tracker `obj_id` that overlap
    /// `start..start+len`; `Err` if the log overflowed (pages were lost).
    pub fn take(&self, obj_id: u32, start: u64, len: u64) -> Result<Vec<u64>, LogOverflow> {
        let mut g = self.lock();
        let Some(t) = g.as_mut().filter(|t| t.obj_id == obj_id) else {
            return Ok(Vec::new());
        };
        if t.overflow {
            return Err(LogOverflow);
        }
        let lo = start & !((1u64 << t.log_page) - 1);
        let hi = start.saturating_add(len);
        let mut mid = t.dirty.split_off(&lo);
        let mut tail = mid.split_off(&hi);
        t.dirty.append(&mut tail);
        Ok(mid.into_iter().collect())
    }

    /// Pages marked and not yet reported (tests, tracing).
    pub fn pending(&self) -> usize {
        self.lock().as_ref().map_or(0, |t| t.dirty.len())
    }
}

/// The log overflowed ([`MAX_DIRTY_PAGES`]): dirty pages were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the dirty log overflowed ({MAX_DIRTY_PAGES} pages); pages were lost")]
pub struct LogOverflow;

/// The tracked ranges of a CREATE: each non-empty, aligned to 2^`log_page`, not
/// wrapping, none overlapping another; returns them sorted, and their total length.
pub fn check_ranges(
    ranges: &[(u64, u64)],
    log_page: u8,
) -> Result<(Vec<(u64, u64)>, u64), CmdFail> {
    let page = 1u64 << log_page;
    let bad = |i: usize, why: &str| {
        refuse(
            CmdStatus::BadParamErr,
            pt_syndrome::BAD_RANGE,
            format_args!("range {i}: {why}"),
        )
    };
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for (i, &(s, l)) in sorted.iter().enumerate() {
        if l == 0 {
            return Err(bad(i, "empty"));
        }
        if !s.is_multiple_of(page) || !l.is_multiple_of(page) {
            return Err(bad(i, "not aligned to the tracker's page size"));
        }
        let end = s.checked_add(l).ok_or_else(|| bad(i, "wraps"))?;
        if i > 0 && s < prev_end {
            return Err(bad(i, "overlaps another range"));
        }
        prev_end = end;
        total = total.checked_add(l).ok_or_else(|| bad(i, "total wraps"))?;
    }
    Ok((sorted, total))
}

impl Firmware {
    /// The page tracker `obj_id`, for the reporter and tests.
    pub fn page_track(&self, obj_id: u32) -> Option<&PageTrack> {
        self.page_tracks.get(&obj_id)
    }

    /// Sets the state of tracker `obj_id`; false if it is gone.
    pub fn set_page_track_state(&mut self, obj_id: u32, state: PageTrackState) -> bool {
        match self.page_tracks.get_mut(&obj_id) {
            Some(t) => {
                t.state = state;
                true
            }
            None => false,
        }
    }

    /// (tracked `vhca_id`, object id) of every tracker (a reset stops their logs).
    pub fn page_track_targets(&self) -> Vec<(u16, u32)> {
        self.page_tracks
            .values()
            .map(|t| (t.vhca_id, t.id))
            .collect()
    }

    fn obj_type(cmd: &Cmd<'_>) -> Result<(), CmdFail> {
        let t = cmd.get(GENERAL_OBJ_IN_OBJ_TYPE) as u16;
        if t != OBJ_TYPE_PAGE_TRACK {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::UNKNOWN_OBJ_TYPE,
                format_args!("obj_type {t:#x} is not PAGE_TRACK ({OBJ_TYPE_PAGE_TRACK:#x})"),
            ));
        }
        Ok(())
    }

    /// CREATE_GENERAL_OBJECT(PAGE_TRACK).
    pub(super) fn create_general_object(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        Self::obj_type(cmd)?;
        let mut out = cmd.lengths(PAGE_TRACK_IN_LEN, GENERAL_OBJ_OUT_HDR_LEN)?;
        let g = |f| cmd.get(in_msg(f));
        let vhca_id = g(ctx::VHCA_ID) as u16;
        if self.id.kind != FunctionKind::Pf {
            return Err(refuse(
                CmdStatus::BadParamErr,
                syndrome::BAD_FUNCTION,
                format_args!("only the PF tracks a function"),
            ));
        }
        if g(ctx::TRACK_TYPE) != u64::from(TRACK_TYPE_DMA_WRITE) {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_TRACK_TYPE,
                format_args!("track_type {} (expected 1)", g(ctx::TRACK_TYPE)),
            ));
        }
        if g(ctx::STATE) != PageTrackState::Tracking as u64 {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_STATE,
                format_args!("created in state {} (expected TRACKING)", g(ctx::STATE)),
            ));
        }
        let log_page = g(ctx::LOG_PAGE_SIZE) as u8;
        if !(LOG_MIN_PAGE_SIZE..=LOG_MAX_PAGE_SIZE).contains(&log_page) {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_PAGE_SIZE,
                format_args!(
                    "log_page_size {log_page} outside {LOG_MIN_PAGE_SIZE}..={LOG_MAX_PAGE_SIZE}"
                ),
            ));
        }
        let log_msg = g(ctx::LOG_MSG_SIZE) as u8;
        if !(LOG_MIN_MSG_SIZE..=LOG_MAX_MSG_SIZE).contains(&log_msg) {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_MSG_SIZE,
                format_args!(
                    "log_msg_size {log_msg} outside {LOG_MIN_MSG_SIZE}..={LOG_MAX_MSG_SIZE}"
                ),
            ));
        }
        let n = g(ctx::NUM_RANGES) as usize;
        if n == 0 || n > usize::from(MAX_TRACK_RANGES) {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_NUM_RANGES,
                format_args!("num_ranges {n} outside 1..={MAX_TRACK_RANGES}"),
            ));
        }
        cmd.need_in(mlx5_prm::cmd::page_track::create_in_len(n))?;
        let raw: Vec<(u64, u64)> = (0..n)
            .map(|i| {
                let s = range_start(i).map_or(0, |f| cmd.get(f));
                let l = range_length(i).map_or(0, |f| cmd.get(f));
                (s, l)
            })
            .collect();
        let (ranges, total) = check_ranges(&raw, log_page)?;
        let log_space = g(ctx::LOG_ADDR_SPACE_SIZE) as u8;
        let need = 64 - (total - 1).leading_zeros() as u8;
        if !(LOG_MIN_ADDR_SPACE..=LOG_MAX_ADDR_SPACE).contains(&log_space) || log_space < need {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_ADDR_SPACE,
                format_args!(
                    "log_addr_space_size {log_space}: must be in {LOG_MIN_ADDR_SPACE}..={LOG_MAX_ADDR_SPACE} and at least {need} for the ranges"
                ),
            ));
        }
        let qpn = g(ctx::REPORTING_QPN) as u32;
        if !self.qps.contains_key(&qpn) {
            return Err(refuse(
                CmdStatus::BadResErr,
                pt_syndrome::BAD_REPORTING_QP,
                format_args!("reporting_qpn {qpn:#x} is no QP of this function"),
            ));
        }
        if vhca_id == self.id.vhca_id {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::NOT_TRACKABLE,
                format_args!("vhca_id {vhca_id} is the PF itself"),
            ));
        }
        let peer = env.peer(vhca_id).ok_or_else(|| {
            refuse(
                CmdStatus::BadParamErr,
                syndrome::BAD_FUNCTION,
                format_args!("no function with vhca_id {vhca_id}"),
            )
        })?;
        if self.page_tracks.values().any(|t| t.vhca_id == vhca_id) {
            return Err(refuse(
                CmdStatus::ResBusy,
                pt_syndrome::ALREADY_TRACKED,
                format_args!("vhca_id {vhca_id} already has a tracker"),
            ));
        }
        let max = 1u32 << LOG_MAX_PAGE_TRACKERS;
        let id = first_free(self.page_tracks.keys(), 1, max).ok_or_else(CmdFail::no_resources)?;
        let Some(log) = peer.dirty_log() else {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::NOT_TRACKABLE,
                format_args!("vhca_id {vhca_id} keeps no dirty log"),
            ));
        };
        log.start(id, log_page, &ranges);
        self.page_tracks.insert(
            id,
            PageTrack {
                id,
                vhca_id,
                state: PageTrackState::Tracking,
                log_page_size: log_page,
                log_msg_size: log_msg,
                log_addr_space_size: log_space,
                reporting_qpn: qpn,
                ranges,
            },
        );
        tracing::info!(
            obj_id = id,
            vhca_id,
            log_page,
            ranges = n,
            "page tracker created"
        );
        set(&mut out, GENERAL_OBJ_OUT_OBJ_ID, u64::from(id));
        Ok(out)
    }

    fn tracker_id(&self, cmd: &Cmd<'_>) -> Result<u32, CmdFail> {
        Self::obj_type(cmd)?;
        let id = cmd.get(GENERAL_OBJ_IN_OBJ_ID) as u32;
        if !self.page_tracks.contains_key(&id) {
            return Err(CmdFail::no_such_object());
        }
        Ok(id)
    }

    /// MODIFY_GENERAL_OBJECT(PAGE_TRACK): TRACKING to REPORTING over a range, which
    /// hands the range's dirty pages to the reporter.
    pub(super) fn modify_general_object(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        Self::obj_type(cmd)?;
        let out = cmd.lengths(PAGE_TRACK_IN_LEN, GENERAL_OBJ_OUT_HDR_LEN)?;
        let id = self.tracker_id(cmd)?;
        let g = |f| cmd.get(in_msg(f));
        let select = g(ctx::MODIFY_FIELD_SELECT);
        if select & MODIFY_STATE == 0 || select & !(MODIFY_STATE | MODIFY_RANGE) != 0 {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_FIELD_SELECT,
                format_args!("modify_field_select {select:#x} (expected state and range, 0x3)"),
            ));
        }
        let want = PageTrackState::try_from(g(ctx::STATE) as u8).map_err(|_| {
            refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_STATE,
                format_args!("unknown state {}", g(ctx::STATE)),
            )
        })?;
        let t = self
            .page_tracks
            .get(&id)
            .cloned()
            .ok_or_else(CmdFail::no_such_object)?;
        if want != PageTrackState::Reporting || t.state != PageTrackState::Tracking {
            return Err(refuse(
                CmdStatus::BadResStateErr,
                pt_syndrome::BAD_STATE,
                format_args!("{} to {} (only TRACKING to REPORTING)", t.state, want),
            ));
        }
        let (start, len) = if select & MODIFY_RANGE != 0 {
            (g(ctx::RANGE_START_ADDRESS), g(ctx::LENGTH))
        } else {
            (0, u64::MAX)
        };
        if len == 0 || start.checked_add(len).is_none() {
            return Err(refuse(
                CmdStatus::BadParamErr,
                pt_syndrome::BAD_RANGE,
                format_args!("report range {start:#x}+{len:#x} is empty or wraps"),
            ));
        }
        let ready = self
            .qps
            .get(&t.reporting_qpn)
            .is_some_and(|q| q.can_send() && q.peer.is_some());
        if !ready {
            return Err(refuse(
                CmdStatus::BadResStateErr,
                pt_syndrome::BAD_REPORTING_QP,
                format_args!(
                    "reporting QP {:#x} is not connected in RTS",
                    t.reporting_qpn
                ),
            ));
        }
        let taken = env
            .peer(t.vhca_id)
            .and_then(|p| p.dirty_log().map(|l| l.take(id, start, len)))
            .unwrap_or(Ok(Vec::new()));
        let (pages, lost) = match taken {
            Ok(p) => (p, false),
            Err(LogOverflow) => (Vec::new(), true),
        };
        let job = ReportJob {
            obj_id: id,
            qpn: t.reporting_qpn,
            msg_size: 1usize << t.log_msg_size,
            pages,
            lost,
        };
        tracing::debug!(
            obj_id = id,
            pages = job.pages.len(),
            lost,
            "page tracker reporting"
        );
        if !env.page_report(job) {
            self.set_page_track_state(id, PageTrackState::Failed);
            return Err(refuse(
                CmdStatus::IntErr,
                pt_syndrome::BAD_REPORTING_QP,
                format_args!("no reporter on this function"),
            ));
        }
        self.set_page_track_state(id, PageTrackState::Reporting);
        Ok(out)
    }

    /// QUERY_GENERAL_OBJECT(PAGE_TRACK): the object's context.
    pub(super) fn query_general_object(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        Self::obj_type(cmd)?;
        let mut out = cmd.lengths(GENERAL_OBJ_IN_HDR_LEN, QUERY_PAGE_TRACK_OUT_LEN)?;
        let id = self.tracker_id(cmd)?;
        let t = &self.page_tracks[&id];
        let mut s = |f, v: u64| set(&mut out, in_msg(f), v);
        s(ctx::VHCA_ID, t.vhca_id.into());
        s(ctx::STATE, (t.state as u8).into());
        s(ctx::TRACK_TYPE, TRACK_TYPE_DMA_WRITE.into());
        s(ctx::LOG_ADDR_SPACE_SIZE, t.log_addr_space_size.into());
        s(ctx::LOG_PAGE_SIZE, t.log_page_size.into());
        s(ctx::LOG_MSG_SIZE, t.log_msg_size.into());
        s(ctx::REPORTING_QPN, t.reporting_qpn.into());
        s(ctx::NUM_RANGES, t.ranges.len() as u64);
        Ok(out)
    }

    /// DESTROY_GENERAL_OBJECT(PAGE_TRACK): the tracked function's log stops.
    pub(super) fn destroy_general_object(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        Self::obj_type(cmd)?;
        let out = cmd.lengths(GENERAL_OBJ_IN_HDR_LEN, GENERAL_OBJ_OUT_HDR_LEN)?;
        let id = self.tracker_id(cmd)?;
        if let Some(t) = self.page_tracks.remove(&id) {
            if let Some(p) = env.peer(t.vhca_id) {
                if let Some(l) = p.dirty_log() {
                    l.stop(id);
                }
            }
            tracing::info!(obj_id = id, vhca_id = t.vhca_id, "page tracker destroyed");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_marks_pages_in_range_only_and_take_clears() {
        let l = DirtyLog::default();
        l.mark(0, 4096);
        assert_eq!(l.pending(), 0, "not tracking");
        l.start(1, 12, &[(0x10000, 0x4000), (0x40000, 0x1000)]);
        l.mark(0x10ffe, 4); // straddles two pages
        l.mark(0x20000, 4096); // outside
        l.mark(0x3ffff, 2); // last byte before, first of the second range
        assert_eq!(l.pending(), 3);
        assert_eq!(l.take(1, 0x10000, 0x1000).unwrap(), vec![0x10000]);
        assert_eq!(l.take(1, 0, u64::MAX).unwrap(), vec![0x11000, 0x40000]);
        assert!(l.take(1, 0, u64::MAX).unwrap().is_empty());
        assert!(
            l.take(2, 0, u64::MAX).unwrap().is_empty(),
            "another tracker"
        );
        l.stop(2);
        assert!(l.is_tracking());
        l.stop(1);
        assert!(!l.is_tracking());
    }

    #[test]
    fn a_full_log_overflows_and_says_so_until_restarted() {
        let l = DirtyLog::with_capacity(2);
        l.start(1, 12, &[(0, 1 << 20)]);
        l.mark(0, 2 * 4096);
        l.mark(0, 1); // already marked: no overflow
        assert!(l.take(1, 0, 4096).is_ok());
        l.mark(0, 3 * 4096);
        assert_eq!(l.take(1, 0, 1 << 20), Err(LogOverflow));
        assert_eq!(l.take(1, 0, 1 << 20), Err(LogOverflow), "stays lost");
        l.start(2, 12, &[(0, 1 << 20)]);
        assert_eq!(l.take(2, 0, 1 << 20), Ok(vec![]));
    }

    #[test]
    fn take_reports_a_large_page_a_small_range_touches() {
        let l = DirtyLog::default();
        l.start(1, 21, &[(0, 1 << 22)]);
        l.mark(0x20_0010, 1);
        assert_eq!(l.take(1, 0x30_0000, 0x1000).unwrap(), vec![0x20_0000]);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_ranges(&[(0x2000, 0x1000), (0, 0x2000)], 12).is_ok());
        for bad in [
            vec![(0, 0)],
            vec![(0x800, 0x1000)],
            vec![(0, 0x1800)],
            vec![(0, 0x2000), (0x1000, 0x1000)],
            vec![(u64::MAX - 0xfff, 0x2000)],
        ] {
            let e = check_ranges(&bad, 12).unwrap_err();
            assert_eq!(e.syndrome, pt_syndrome::BAD_RANGE, "{bad:?}");
        }
    }
}
