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
//! Buffers are owned by whatever holds them: a chunk slot, the avail list, or the read
//! queue (a queued buffer remembers where it goes back once read).

use std::collections::VecDeque;

use mlx5_prm::cmd::migration::MAX_CHUNK_SIZE;
use mlx5_prm::migration_stream::{RecordHeader, RECORD_HEADER_LEN};
use mlx5_prm::CmdStatus;

use super::fw::{Fw, MigBuf};
use super::stream::stop_copy_size_record;
use super::MigError;

/// mlx5vf's `MAX_NUM_CHUNKS`: stop-copy chunks in flight (double buffering).
const MAX_NUM_CHUNKS: usize = 2;

/// Buffers kept on the avail list at most (the rest are freed).
const MAX_AVAIL: usize = 4;
/// Bound on the segments one read walks (each step consumes a segment or fills the
/// caller's buffer; a released chunk may queue two more).
const MAX_READ_STEPS: usize = 4096;

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
}

impl SaveFile {
    /// `mlx5vf_pci_save_device_data`: PD, QUERY, stop-copy buffers and the
    /// STOP_COPY_SIZE record, then the first SAVE (tracked for pre-copy).
    pub fn open(fw: &Fw<'_>, track: bool) -> Result<SaveFile, MigError> {
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
        self.queue.push_back(Queued { seg, off: 0 });
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
        let pre_copy_cleanup =
            matches!(self.state, SaveState::PreCopy | SaveState::PreCopyError) && !track && !inc;
        let inc = inc && self.state != SaveState::PreCopyError;
        let stop_copy_chunk = !track && !pre_copy_cleanup;
        if stop_copy_chunk {
            self.state = SaveState::StopCopyChunk;
        }
        let out = match fw.save(&buf, inc, track) {
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

    /// Queues the next stop-copy chunk into the other slot, or defers it while both
    /// chunks are unread (MAX_NUM_CHUNKS).
    fn next_chunk(&mut self, fw: &Fw<'_>, size: u64) -> Result<(), MigError> {
        let slot = (self.last_chunk + 1) % MAX_NUM_CHUNKS;
        if self.chunks[slot].is_none() {
            self.deferred_chunk = Some(size);
            return Ok(());
        }
        let buf = self.take_chunk(fw, slot, size)?;
        self.save(fw, buf, Home::Chunk(slot), true, false)
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

    /// `mlx5vf_save_read`: sequential; ENOMSG at the pre-copy temporary end, 0 at the
    /// stop-copy end, ENODEV after an error.
    pub fn read(&mut self, fw: &Fw<'_>, out: &mut [u8]) -> Result<usize, MigError> {
        if self.state == SaveState::Error {
            return Err(MigError::NoDev);
        }
        let mut done = 0usize;
        for _ in 0..MAX_READ_STEPS {
            if done == out.len() {
                break;
            }
            let Some(q) = self.queue.front_mut() else {
                break;
            };
            let left = q.seg.len() - q.off;
            let n = (left.min((out.len() - done) as u64)) as usize;
            match &q.seg {
                Seg::Bytes(v) => {
                    let o = q.off as usize;
                    out[done..done + n].copy_from_slice(&v[o..o + n]);
                }
                Seg::Buf { buf, .. } => {
                    if let Err(e) = buf.read(fw.hca.cmd().arena(), q.off, &mut out[done..done + n])
                    {
                        self.state = SaveState::Error;
                        return Err(e);
                    }
                }
            }
            q.off += n as u64;
            done += n;
            self.f_pos += n as u64;
            if q.off == q.seg.len() {
                if let Some(q) = self.queue.pop_front() {
                    if let Err(e) = self.release(fw, q.seg) {
                        if done > 0 {
                            return Ok(done);
                        }
                        return Err(e);
                    }
                }
            }
        }
        if done == 0 && !out.is_empty() {
            return match self.state {
                SaveState::PreCopy | SaveState::PreCopyError => Err(MigError::NoMsg),
                SaveState::Complete => Ok(0),
                SaveState::Error => Err(MigError::NoDev),
                SaveState::Init | SaveState::StopCopyChunk => Err(MigError::NoDataYet),
            };
        }
        Ok(done)
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
