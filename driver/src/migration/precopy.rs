//! The saving migration file (`kernel-mlx5vf.md` §3.3, §3.5): the queue of stream
//! bytes the reader drains, the stop-copy buffers (one, or two 8 MiB-class chunks in
//! chunk mode), pre-copy's initial and dirty bytes, and the incremental SAVE that
//! PRECOPY_INFO starts once the reader has drained everything.
//!
//! States follow `enum mlx5_vf_migf_state`: PRE_COPY after the first tracked SAVE,
//! PRE_COPY_ERROR after a pre-copy SAVE refused with BAD_RES_STATE (recoverable: the
//! final SAVE is then a full image), SAVE_STOP_COPY_CHUNK while stop-copy chunks are
//! coming, COMPLETE after the last one, ERROR after any other failure (reads ENODEV).
//!
//! Buffers are owned by whatever holds them: a chunk slot, the avail list, the read
//! queue (a queued buffer remembers where it goes back once read), or the SAVE in
//! flight.
//!
//! # Reads and chunk mode
//! A read is a series of steps ([`SaveFile::read_step`]), each decided under the VF's
//! state lock: the file's own small segments (record headers) are copied there, but
//! image bytes are only *planned* (the arena runs to copy); the caller copies them
//! straight from the arena into the reader's buffer with no lock held, then commits
//! ([`SaveFile::commit`]), which finds the same segment at the same offset or fails
//! with ENODEV (the file was closed meanwhile).
//!
//! Stop-copy chunks after the first are saved as mlx5vf's callback queues them, on a
//! thread of their own (`InFlight`): the next chunk's SAVE runs while the reader
//! drains the previous one, at most one SAVE in flight and `MAX_NUM_CHUNKS` (2) chunks
//! unread. A reader that finds nothing queued while that SAVE runs waits for it
//! (outside the lock); a failure of the SAVE is returned by the read that finds it,
//! bytes still queued or not (mlx5vf's ERROR state drops them: the stream is broken),
//! and every later read gets ENODEV.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use mlx5_prm::cmd::migration::MAX_CHUNK_SIZE;
use mlx5_prm::migration_stream::{RecordHeader, RECORD_HEADER_LEN};
use mlx5_prm::CmdStatus;

use super::fw::{Fw, MigBuf, SaveOut};
use super::stream::stop_copy_size_record;
use super::{lock, MigError};
use crate::hca::Hca;

/// mlx5vf's `MAX_NUM_CHUNKS`: stop-copy chunks in flight (double buffering).
const MAX_NUM_CHUNKS: usize = 2;

/// Buffers kept on the avail list at most (the rest are freed).
const MAX_AVAIL: usize = 4;
/// Bound on the steps one read takes (each step consumes a segment, fills the
/// caller's buffer or waits for a SAVE; a released chunk may queue two more).
pub(crate) const MAX_READ_STEPS: usize = 4096;

/// `enum mlx5_vf_migf_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveState {
    /// Opened, no SAVE finished yet.
    Init,
    Error,
    PreCopyError,
    PreCopy,
    StopCopyChunk,
    Complete,
}

/// `struct vfio_precopy_info` results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    pub initial_bytes: u64,
    pub dirty_bytes: u64,
}

/// What kind of SAVE `mlx5vf_cmd_save_vhca_state` found it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SaveKind {
    /// The incremental bit sent (cleared after PRE_COPY_ERROR).
    inc: bool,
    /// Only ends tracking (PRE_COPY → RUNNING).
    pre_copy_cleanup: bool,
    stop_copy_chunk: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    Avail,
    Chunk(usize),
}

#[derive(Debug)]
enum Seg {
    Bytes(Vec<u8>),
    Buf { buf: MigBuf, len: u64, home: Home },
}

impl Seg {
    fn len(&self) -> u64 {
        match self {
            Seg::Bytes(v) => v.len() as u64,
            Seg::Buf { len, .. } => *len,
        }
    }
}

#[derive(Debug)]
struct Queued {
    seg: Seg,
    off: u64,
    /// Which segment this is (a commit checks it is still the front one).
    seq: u64,
}

/// The outcome of a SAVE running on another thread, and its waiters.
#[derive(Debug, Default)]
pub struct SaveDone {
    result: Mutex<Option<Result<SaveOut, MigError>>>,
    cv: Condvar,
}

impl SaveDone {
    fn set(&self, r: Result<SaveOut, MigError>) {
        *lock(&self.result) = Some(r);
        self.cv.notify_all();
    }

    /// Blocks until the SAVE has completed (the command interface's timeout bounds it).
    pub fn wait(&self) {
        let mut g = lock(&self.result);
        while g.is_none() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn take(&self) -> Option<Result<SaveOut, MigError>> {
        lock(&self.result).take()
    }
}

/// A stop-copy chunk SAVE running on its own thread; the buffer stays here (the
/// thread holds only its mkey and size) and goes back to its slot on failure.
#[derive(Debug)]
struct InFlight {
    buf: MigBuf,
    slot: usize,
    done: Arc<SaveDone>,
}

/// What one step of a read does (decided under the state lock).
#[derive(Debug)]
pub enum ReadStep {
    /// `n` bytes the file holds itself were copied into the reader's buffer.
    Copied(usize),
    /// Copy these arena runs `(iova, position in the reader's buffer, length)` (from
    /// the reader's current position), `len` bytes in all, with no lock held, then
    /// [`SaveFile::commit`] segment `seq`.
    Arena {
        seq: u64,
        runs: Vec<(u64, usize, usize)>,
        len: usize,
    },
    /// Nothing queued; a chunk SAVE is running: wait for it with no lock held.
    Wait(Arc<SaveDone>),
    /// The read ends here: [`SaveFile::end_of_data`] says how, if it read nothing.
    End,
}

/// Counters for the CLI summary and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveStats {
    pub saves: u64,
    pub image_bytes: u64,
    pub incremental_saves: u64,
    pub chunks: u64,
}

/// A saving migration file (`struct mlx5_vf_migration_file`, saving side).
#[derive(Debug)]
pub struct SaveFile {
    pd: u32,
    state: SaveState,
    queue: VecDeque<Queued>,
    f_pos: u64,
    max_pos: u64,
    pre_copy_initial_bytes: u64,
    chunks: [Option<MigBuf>; MAX_NUM_CHUNKS],
    /// The chunk slot the last stop-copy SAVE used.
    last_chunk: usize,
    deferred_chunk: Option<u64>,
    avail: Vec<MigBuf>,
    stats: SaveStats,
    /// The PF, for SAVEs run on their own thread.
    pf: Arc<Hca>,
    inflight: Option<InFlight>,
    /// A failure met after a read had already copied bytes: the next read returns it.
    failure: Option<MigError>,
    next_seq: u64,
}

impl SaveFile {
    /// `mlx5vf_pci_save_device_data`: PD, QUERY, stop-copy buffers and the
    /// STOP_COPY_SIZE record, then the first SAVE (tracked for pre-copy).
    pub fn open(fw: &Fw<'_>, pf: Arc<Hca>, track: bool) -> Result<SaveFile, MigError> {
        let pd = fw.alloc_pd()?;
        let mut f = SaveFile {
            pd,
            state: SaveState::Init,
            queue: VecDeque::new(),
            f_pos: 0,
            max_pos: 0,
            pre_copy_initial_bytes: 0,
            chunks: [None, None],
            last_chunk: 0,
            deferred_chunk: None,
            avail: Vec::new(),
            stats: SaveStats::default(),
            pf,
            inflight: None,
            failure: None,
            next_seq: 0,
        };
        match f.start(fw, track) {
            Ok(()) => Ok(f),
            Err(e) if e.unreachable() => {
                // Closing would issue commands to a firmware that does not answer; the
                // buffers' pages are leaked (a late SAVE may still write them).
                tracing::warn!(error = %e, "saving file abandoned without firmware cleanup");
                Err(e)
            }
            Err(e) => {
                f.close(fw);
                Err(e)
            }
        }
    }

    fn start(&mut self, fw: &Fw<'_>, track: bool) -> Result<(), MigError> {
        let q = fw.query(false)?;
        self.prep_stop_copy(fw, q.required_umem_size, q.total, track)?;
        if track {
            let size = self.chunks[0].as_ref().map_or(0, MigBuf::size);
            let buf = MigBuf::alloc(fw, self.pd, size)?;
            self.save(fw, buf, Home::Avail, false, true)
        } else {
            let buf = self.take_chunk(fw, 0, q.required_umem_size)?;
            self.save(fw, buf, Home::Chunk(0), false, false)
        }
    }

    /// `mlx5vf_prep_stop_copy`.
    fn prep_stop_copy(
        &mut self,
        fw: &Fw<'_>,
        state_size: u64,
        full_size: u64,
        track: bool,
    ) -> Result<(), MigError> {
        let (inc, num) = if fw.chunk_mode {
            (
                state_size.max(MAX_CHUNK_SIZE.min(full_size)),
                MAX_NUM_CHUNKS,
            )
        } else if track {
            let extra = state_size / 10;
            let inc = state_size
                .checked_add(extra)
                .ok_or(MigError::StopCopySizeOverflow { state_size })?;
            (inc, 1)
        } else {
            (state_size, 1)
        };
        for i in 0..num {
            self.chunks[i] = Some(MigBuf::alloc(fw, self.pd, inc)?);
        }
        let size = self.chunks[0].as_ref().map_or(0, MigBuf::size);
        self.push(Seg::Bytes(stop_copy_size_record(size)));
        if track {
            self.pre_copy_initial_bytes = self.max_pos;
        }
        Ok(())
    }

    fn push(&mut self, seg: Seg) {
        self.max_pos += seg.len();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back(Queued { seg, off: 0, seq });
    }

    /// Chunk slot `i`'s buffer, grown to `min_size` if needed.
    fn take_chunk(&mut self, fw: &Fw<'_>, i: usize, min_size: u64) -> Result<MigBuf, MigError> {
        match self.chunks.get_mut(i).and_then(Option::take) {
            Some(b) if b.size() >= min_size => Ok(b),
            Some(b) => {
                b.free(fw);
                MigBuf::alloc(fw, self.pd, min_size)
            }
            None => MigBuf::alloc(fw, self.pd, min_size),
        }
    }

    /// `mlx5vf_get_data_buffer`: a buffer from the avail list or a new one.
    fn data_buffer(&mut self, fw: &Fw<'_>, size: u64) -> Result<MigBuf, MigError> {
        if let Some(i) = self.avail.iter().position(|b| b.size() >= size.max(1)) {
            return Ok(self.avail.swap_remove(i));
        }
        MigBuf::alloc(fw, self.pd, size)
    }

    fn put_home(&mut self, fw: &Fw<'_>, buf: MigBuf, home: Home) {
        match home {
            Home::Chunk(i) if i < MAX_NUM_CHUNKS && self.chunks[i].is_none() => {
                self.chunks[i] = Some(buf)
            }
            _ if self.avail.len() < MAX_AVAIL => self.avail.push(buf),
            _ => buf.free(fw),
        }
    }

    /// `mlx5vf_cmd_save_vhca_state` and its completion callback, synchronously.
    fn save(
        &mut self,
        fw: &Fw<'_>,
        buf: MigBuf,
        home: Home,
        inc: bool,
        track: bool,
    ) -> Result<(), MigError> {
        let kind = self.begin_save(inc, track);
        let r = fw.save(&buf, kind.inc, track);
        self.saved(fw, buf, home, kind, r)
    }

    /// The first half of `mlx5vf_cmd_save_vhca_state`: what kind of SAVE this is.
    fn begin_save(&mut self, inc: bool, track: bool) -> SaveKind {
        let pre_copy_cleanup =
            matches!(self.state, SaveState::PreCopy | SaveState::PreCopyError) && !track && !inc;
        let inc = inc && self.state != SaveState::PreCopyError;
        let stop_copy_chunk = !track && !pre_copy_cleanup;
        if stop_copy_chunk {
            self.state = SaveState::StopCopyChunk;
        }
        SaveKind {
            inc,
            pre_copy_cleanup,
            stop_copy_chunk,
        }
    }

    /// `mlx5vf_save_callback`: the SAVE's outcome queued for the reader.
    fn saved(
        &mut self,
        fw: &Fw<'_>,
        buf: MigBuf,
        home: Home,
        kind: SaveKind,
        r: Result<SaveOut, MigError>,
    ) -> Result<(), MigError> {
        let SaveKind {
            inc,
            pre_copy_cleanup,
            stop_copy_chunk,
        } = kind;
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                self.put_home(fw, buf, home);
                let bad_res_state = matches!(&e, MigError::Cmd { source, .. }
                    if source.status() == Some(CmdStatus::BadResStateErr));
                self.state = if !stop_copy_chunk && bad_res_state {
                    SaveState::PreCopyError
                } else {
                    SaveState::Error
                };
                tracing::info!(error = %e, state = ?self.state, "SAVE_VHCA_STATE failed");
                return Err(e);
            }
        };
        self.stats.saves += 1;
        if inc {
            self.stats.incremental_saves += 1;
        }
        if pre_copy_cleanup {
            // Only tells the firmware that tracking ends; the file closes next.
            self.put_home(fw, buf, home);
            return Ok(());
        }
        let image = out.actual_image_size;
        let initial_pre_copy = self.state != SaveState::PreCopy && !stop_copy_chunk;
        self.stats.image_bytes += image;
        if image > 0 {
            self.push(Seg::Bytes(RecordHeader::fw_data(image).to_bytes().to_vec()));
            self.push(Seg::Buf {
                buf,
                len: image,
                home,
            });
        } else {
            // An empty image adds no record (the resume side refuses empty ones).
            self.put_home(fw, buf, home);
        }
        if initial_pre_copy {
            self.pre_copy_initial_bytes += RECORD_HEADER_LEN as u64 + image;
            self.state = SaveState::PreCopy;
        }
        if stop_copy_chunk {
            self.stats.chunks += 1;
            if let Home::Chunk(i) = home {
                self.last_chunk = i;
            }
            let next = out.next_required_umem_size;
            if !fw.chunk_mode || next == 0 {
                self.state = SaveState::Complete;
            } else {
                self.next_chunk(fw, next)?;
            }
        }
        Ok(())
    }

    /// Starts a stop-copy chunk SAVE (incremental, untracked) into chunk slot `slot`
    /// on a thread of its own (mlx5vf's chunk work on `cb_wq`); a thread that cannot
    /// be started leaves the SAVE to this one.
    fn save_chunk_async(&mut self, fw: &Fw<'_>, buf: MigBuf, slot: usize) -> Result<(), MigError> {
        let kind = self.begin_save(true, false);
        let done = Arc::new(SaveDone::default());
        let (pf, target, vhca_id, chunk_mode) =
            (self.pf.clone(), buf.target(), fw.vhca_id, fw.chunk_mode);
        let d = done.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mlx5vf-save-{vhca_id}"))
            .spawn(move || {
                let fw = Fw {
                    hca: &pf,
                    vhca_id,
                    chunk_mode,
                };
                d.set(fw.save_into(target, kind.inc, false));
            });
        match spawned {
            Ok(_) => {
                tracing::debug!(slot, "stop-copy chunk SAVE started");
                self.inflight = Some(InFlight { buf, slot, done });
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "no thread for the chunk SAVE; saving in line");
                let r = fw.save(&buf, kind.inc, false);
                self.saved(fw, buf, Home::Chunk(slot), kind, r)
            }
        }
    }

    /// Takes the outcome of the SAVE in flight if it has completed, and queues it as
    /// the callback does.
    fn reap(&mut self, fw: &Fw<'_>) -> Result<(), MigError> {
        let Some(f) = self.inflight.as_ref() else {
            return Ok(());
        };
        let Some(r) = f.done.take() else {
            return Ok(());
        };
        let Some(InFlight { buf, slot, .. }) = self.inflight.take() else {
            return Ok(());
        };
        let kind = SaveKind {
            inc: true,
            pre_copy_cleanup: false,
            stop_copy_chunk: true,
        };
        self.saved(fw, buf, Home::Chunk(slot), kind, r)
    }

    /// Queues the next stop-copy chunk into the other slot, or defers it while both
    /// chunks are unread (MAX_NUM_CHUNKS).
    fn next_chunk(&mut self, fw: &Fw<'_>, size: u64) -> Result<(), MigError> {
        let slot = (self.last_chunk + 1) % MAX_NUM_CHUNKS;
        if self.chunks[slot].is_none() || self.inflight.is_some() {
            self.deferred_chunk = Some(size);
            return Ok(());
        }
        let buf = self.take_chunk(fw, slot, size)?;
        self.save_chunk_async(fw, buf, slot)
    }

    /// PRE_COPY_P2P → STOP_COPY after SUSPEND responder
    /// (`mlx5vf_pci_save_device_inc_data`).
    pub fn save_final(&mut self, fw: &Fw<'_>) -> Result<(), MigError> {
        if self.state == SaveState::Error {
            return Err(MigError::NoDev);
        }
        let r = (|| {
            let length = if self.state == SaveState::PreCopyError {
                fw.query(false)?.required_umem_size
            } else {
                fw.query(true)?.required_umem_size
            };
            let buf = self.take_chunk(fw, 0, length)?;
            self.save(fw, buf, Home::Chunk(0), true, false)
        })();
        if r.is_err() {
            self.state = SaveState::Error;
        }
        r
    }

    /// PRE_COPY → RUNNING: QUERY(inc) and the cleanup SAVE (incremental 0, track 0)
    /// that tells the firmware tracking ends.
    pub fn pre_copy_cleanup(&mut self, fw: &Fw<'_>) -> Result<(), MigError> {
        if self.state == SaveState::Error {
            return Ok(()); // the arc reports EIO
        }
        let size = fw.query(true)?.required_umem_size;
        let buf = self.data_buffer(fw, size)?;
        self.save(fw, buf, Home::Avail, false, false)
    }

    /// VFIO_MIG_GET_PRECOPY_INFO (`mlx5vf_precopy_ioctl`); `device_pre_copy` is true in
    /// PRE_COPY (not PRE_COPY_P2P, where the device is quiesced and not queried).
    pub fn precopy_info(
        &mut self,
        fw: &Fw<'_>,
        device_pre_copy: bool,
    ) -> Result<PrecopyInfo, MigError> {
        let inc_length = if device_pre_copy {
            match self.state {
                SaveState::Error => return Err(MigError::NoDev),
                SaveState::PreCopyError => 0,
                _ => fw.query(true)?.required_umem_size,
            }
        } else {
            0
        };
        if self.state == SaveState::Error {
            return Err(MigError::NoDev);
        }
        let mut info = PrecopyInfo::default();
        let mut end_of_data = false;
        if self.pre_copy_initial_bytes > self.f_pos {
            info.initial_bytes = self.pre_copy_initial_bytes - self.f_pos;
        } else {
            info.dirty_bytes = self.max_pos - self.f_pos;
            end_of_data = info.dirty_bytes == 0;
            info.dirty_bytes += inc_length;
        }
        if end_of_data && inc_length > 0 {
            // Drained, and the device has dirty state: save it for the next read.
            let buf = self.data_buffer(fw, inc_length)?;
            match self.save(fw, buf, Home::Avail, true, true) {
                Ok(()) => {}
                Err(_) if self.state == SaveState::PreCopyError => {}
                Err(e) => return Err(e),
            }
        }
        Ok(info)
    }

    /// One step of `mlx5vf_save_read` (sequential) into `out`, the part of the reader's
    /// buffer not filled yet; `have` bytes of this read are in already. ENODEV after
    /// an error; a failure met once `have > 0` is kept for the next read.
    pub fn read_step(
        &mut self,
        fw: &Fw<'_>,
        out: &mut [u8],
        have: usize,
    ) -> Result<ReadStep, MigError> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if self.state == SaveState::Error {
            return Err(MigError::NoDev);
        }
        if let Err(e) = self.reap(fw) {
            return self.fail(e, have);
        }
        if out.is_empty() {
            return Ok(ReadStep::End);
        }
        let Some(q) = self.queue.front_mut() else {
            return Ok(match &self.inflight {
                Some(f) if have == 0 => ReadStep::Wait(f.done.clone()),
                _ => ReadStep::End,
            });
        };
        let n = (q.seg.len() - q.off).min(out.len() as u64) as usize;
        match &q.seg {
            Seg::Bytes(v) => {
                let o = q.off as usize;
                out[..n].copy_from_slice(&v[o..o + n]);
                let seq = q.seq;
                match self.commit(fw, seq, n) {
                    Ok(()) => Ok(ReadStep::Copied(n)),
                    // The bytes are in the reader's buffer and counted: report them.
                    Err(e) => self.fail(e, have + n).map(|_| ReadStep::Copied(n)),
                }
            }
            Seg::Buf { buf, .. } => match buf.runs(q.off, n) {
                Ok(runs) => Ok(ReadStep::Arena {
                    seq: q.seq,
                    runs,
                    len: n,
                }),
                Err(e) => {
                    self.state = SaveState::Error;
                    self.fail(e, have)
                }
            },
        }
    }

    /// A failure during a read: returned now if the read has nothing, else kept for
    /// the next read (this one returns its bytes).
    fn fail(&mut self, e: MigError, have: usize) -> Result<ReadStep, MigError> {
        if have == 0 {
            return Err(e);
        }
        self.failure = Some(e);
        Ok(ReadStep::End)
    }

    /// `n` bytes of segment `seq` (the front one, at its current offset) reached the
    /// reader; a segment read whole goes home (which may start the next chunk SAVE).
    pub fn commit(&mut self, fw: &Fw<'_>, seq: u64, n: usize) -> Result<(), MigError> {
        let Some(q) = self.queue.front_mut().filter(|q| q.seq == seq) else {
            // Only the reader takes segments off the queue: a different front means
            // the file was reopened under it.
            return Err(MigError::NoDev);
        };
        q.off += n as u64;
        self.f_pos += n as u64;
        if q.off == q.seg.len() {
            if let Some(q) = self.queue.pop_front() {
                self.release(fw, q.seg)?;
            }
        }
        Ok(())
    }

    /// What a read that found nothing returns: ENOMSG at the pre-copy temporary end,
    /// 0 at the stop-copy end, ENODEV after an error.
    pub fn end_of_data(&self) -> Result<usize, MigError> {
        match self.state {
            SaveState::PreCopy | SaveState::PreCopyError => Err(MigError::NoMsg),
            SaveState::Complete => Ok(0),
            SaveState::Error => Err(MigError::NoDev),
            SaveState::Init | SaveState::StopCopyChunk => Err(MigError::NoDataYet),
        }
    }

    /// A segment was read whole: its buffer goes home; a freed chunk slot starts a
    /// deferred chunk SAVE.
    fn release(&mut self, fw: &Fw<'_>, seg: Seg) -> Result<(), MigError> {
        if let Seg::Buf { buf, home, .. } = seg {
            self.put_home(fw, buf, home);
            if matches!(home, Home::Chunk(_)) {
                if let Some(size) = self.deferred_chunk.take() {
                    return self.next_chunk(fw, size);
                }
            }
        }
        Ok(())
    }

    pub fn is_error(&self) -> bool {
        self.state == SaveState::Error
    }

    pub fn state(&self) -> SaveState {
        self.state
    }

    pub fn stats(&self) -> SaveStats {
        self.stats
    }

    /// Bytes read so far and bytes queued in total.
    pub fn positions(&self) -> (u64, u64) {
        (self.f_pos, self.max_pos)
    }

    /// Frees every buffer and the PD (`mlx5vf_disable_fd` + cleanup).
    pub fn close(mut self, fw: &Fw<'_>) {
        if let Some(f) = self.inflight.take() {
            // The device may still write the buffer until its SAVE completes.
            f.done.wait();
            f.buf.free(fw);
        }
        for q in std::mem::take(&mut self.queue) {
            if let Seg::Buf { buf, .. } = q.seg {
                buf.free(fw);
            }
        }
        for b in self.chunks.iter_mut().filter_map(Option::take) {
            b.free(fw);
        }
        for b in std::mem::take(&mut self.avail) {
            b.free(fw);
        }
        fw.dealloc_pd(self.pd);
    }
}
