//! The IOVA space a client hands the device with DMA_MAP: memfds mapped with vm-memory.
//!
//! `Dma` is a cheap, cloneable handle: the connection thread maps and unmaps, device
//! workers read and write. Each access takes the table lock only to find the mapping
//! and copies outside it.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::error::Errno;

/// DMA page size we accept (the `pgsizes` capability).
pub const DMA_PAGE_SIZE: u64 = 4096;
/// DMA windows valid at once (the `max_dma_maps` capability).
pub const MAX_DMA_MAPS: usize = 16384;
/// Distinct backing files one IOVA space holds open (one fd each, however many windows
/// map a file). A VMM maps its guest RAM from a handful of memfds; past this a DMA_MAP
/// of yet another file is `EMFILE`.
pub const MAX_BACKING_FILES: usize = 1024;
/// How long an unmap waits for in-flight device accesses to let go of the mapping.
const UNMAP_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `flags` of DMA_MAP (`VFIO_DMA_MAP_FLAG_*`).
pub use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};

/// Why a device access to the IOVA space failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    #[error("IOVA {iova:#x}+{len:#x} is not mapped")]
    NotMapped { iova: u64, len: u64 },
    #[error("IOVA {iova:#x} is mapped without {access} permission")]
    Permission { iova: u64, access: &'static str },
    #[error("IOVA {iova:#x} is a window the client mapped without memory (no fd)")]
    NoBacking { iova: u64 },
    #[error("IOVA {iova:#x}+{len:#x} overflows the address space")]
    Overflow { iova: u64, len: u64 },
    /// The window is routed (a peer function's memory) and its target refused the
    /// access: a write to a function that can no longer change state.
    #[error("IOVA {iova:#x}+{len:#x}: the window's target refused the write ({why})")]
    Refused {
        iova: u64,
        len: u64,
        why: &'static str,
    },
    /// The window is served by the client (DMA_READ/DMA_WRITE messages) and the client
    /// answered with an error, did not answer in time, or is gone.
    #[error("IOVA {iova:#x}+{len:#x}: the client's {op} failed ({why})")]
    Client {
        iova: u64,
        len: u64,
        op: &'static str,
        why: String,
    },
}

/// Who issued a device access, as the device names its initiators (for mlx5: the QP
/// number of the work request; `None` for the device's own firmware, such as the
/// command queue or an EQ).
pub type Initiator = Option<u32>;

/// A window whose accesses are not served from a mapping in this process but by
/// someone else: another function's device memory (peer-to-peer) or the client itself
/// (DMA_READ/DMA_WRITE messages for a window mapped without an fd).
///
/// Called outside every lock of the IOVA space, with the mapping held (an unmap waits
/// for the call to return). `iova` is where the piece starts, `offset` its offset inside
/// the window; the piece never crosses the window's end.
pub trait DmaRoute: Send + Sync {
    fn read(&self, iova: u64, offset: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(
        &self,
        iova: u64,
        offset: u64,
        data: &[u8],
        initiator: Initiator,
    ) -> Result<(), DmaError>;
    /// For logs: what serves the window.
    fn describe(&self) -> String;
}

/// Told of every device write that landed, window by window (dirty-page logging).
pub type WriteObserver = Arc<dyn Fn(u64, u64) + Send + Sync>;

enum Backing {
    /// The client's memory, mapped here.
    Mem(MmapRegion<()>),
    /// Served by a route (see [`DmaRoute`]).
    Routed(Arc<dyn DmaRoute>),
    /// A read-only window mapped without an fd and without a route (see
    /// `map_unbacked`): the device cannot reach it.
    None,
}

struct Mapping {
    iova: u64,
    size: u64,
    flags: u32,
    backing: Backing,
}

/// Description of one DMA window, for backends and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaWindow {
    pub iova: u64,
    pub size: u64,
    pub flags: u32,
}

#[derive(Default)]
struct Table {
    maps: BTreeMap<u64, Arc<Mapping>>,
}

impl Table {
    /// The mapping containing `iova`, if any.
    fn find(&self, iova: u64) -> Option<&Arc<Mapping>> {
        let (_, m) = self.maps.range(..=iova).next_back()?;
        (iova - m.iova < m.size).then_some(m)
    }

    fn overlaps(&self, iova: u64, end: u64) -> bool {
        if let Some((_, m)) = self.maps.range(..end).next_back() {
            return m.iova + m.size > iova;
        }
        false
    }
}

/// The backing files the windows hold, by (st_dev, st_ino, access mode).
type BackingFiles = HashMap<(u64, u64, i32), Weak<File>>;

/// Handle to a function's IOVA space.
#[derive(Clone)]
pub struct Dma {
    table: Arc<RwLock<Table>>,
    max_maps: usize,
    max_files: usize,
    /// The backing files the windows hold, by (st_dev, st_ino, access mode).
    files: Arc<Mutex<BackingFiles>>,
    /// Told of every write that landed (a leaf: taken only to clone the observer).
    observer: Arc<RwLock<Option<WriteObserver>>>,
}

impl Default for Dma {
    fn default() -> Self {
        Dma::new(MAX_DMA_MAPS)
    }
}

impl Dma {
    pub fn new(max_maps: usize) -> Self {
        Self::with_limits(max_maps, MAX_BACKING_FILES)
    }

    /// An IOVA space of at most `max_maps` windows backed by at most `max_files`
    /// distinct files.
    pub fn with_limits(max_maps: usize, max_files: usize) -> Self {
        Dma {
            table: Arc::default(),
            max_maps,
            max_files,
            files: Arc::default(),
            observer: Arc::default(),
        }
    }

    /// Installs (or with `None` removes) the observer told of every device write that
    /// landed: `(iova, len)` per window written.
    pub fn set_write_observer(&self, observer: Option<WriteObserver>) {
        *self
            .observer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = observer;
    }

    fn observer(&self) -> Option<WriteObserver> {
        self.observer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    // The table is only ever changed by one insert or one remove, so a thread that
    // panicked holding the lock left it consistent: recover it rather than spread the
    // panic to every later access.
    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Maps `size` bytes of `file` from `offset` at `iova`, refusing a file that cannot
    /// be sealed against shrinking (see [`Dma::map_with`]).
    pub fn map(
        &self,
        iova: u64,
        size: u64,
        file: File,
        offset: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        self.map_with(iova, size, file, offset, flags, UnsealedFiles::Refuse)
    }

    /// Maps `size` bytes of `file` from `offset` at `iova`. Everything is checked first:
    /// alignment, overflow, the seal against shrinking (added before the size is read,
    /// so the client cannot truncate the file between the check and the map and make
    /// a later device access raise SIGBUS; a file that cannot be sealed is `EPERM`
    /// unless `unsealed` allows it), the file's size, overlap (`EEXIST`) and the
    /// window count (`ENOSPC`).
    pub fn map_with(
        &self,
        iova: u64,
        size: u64,
        file: File,
        offset: u64,
        flags: u32,
        unsealed: UnsealedFiles,
    ) -> Result<(), Errno> {
        Self::check_window(iova, size, offset, flags)?;
        let file_end = offset.checked_add(size).ok_or(Errno::EINVAL)?;
        seal_against_shrinking(&file, iova, unsealed)?;
        let file_len = file.metadata().map_err(|e| Errno::from_io(&e))?.len();
        if file_end > file_len {
            return Err(Errno::EINVAL);
        }
        let len = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
        self.check_free(iova, size)?;
        let mut prot = 0;
        if flags & VFIO_DMA_MAP_FLAG_READ != 0 {
            prot |= libc::PROT_READ;
        }
        if flags & VFIO_DMA_MAP_FLAG_WRITE != 0 {
            prot |= libc::PROT_READ | libc::PROT_WRITE;
        }
        let file = self.shared_file(file)?;
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file, offset)),
            len,
            prot,
            libc::MAP_SHARED,
        )
        .map_err(|_| Errno::ENOMEM)?;
        self.insert(iova, size, flags, Backing::Mem(region))
    }

    /// Adds a window whose accesses `route` serves (a peer function's memory, or the
    /// client through DMA_READ/DMA_WRITE). The same checks as [`Dma::map`] apply to
    /// the window itself.
    pub fn map_routed(
        &self,
        iova: u64,
        size: u64,
        flags: u32,
        route: Arc<dyn DmaRoute>,
    ) -> Result<(), Errno> {
        Self::check_window(iova, size, 0, flags)?;
        self.check_free(iova, size)?;
        self.insert(iova, size, flags, Backing::Routed(route))
    }

    /// What serves the window at `iova`, for logs and tests: `None` if unmapped,
    /// `"memory"`, `"unbacked"` or the route's description.
    pub fn describe(&self, iova: u64) -> Option<String> {
        let t = self.read_table();
        let m = t.find(iova)?;
        Some(match &m.backing {
            Backing::Mem(_) => "memory".into(),
            Backing::Routed(r) => r.describe(),
            Backing::None => "unbacked".into(),
        })
    }

    /// One open file per backing file (same device, inode and access mode) however many
    /// windows map it: behind a vIOMMU every guest map arrives with its own fd, and
    /// keeping each would let the windows exhaust our fds. A later fd for a file
    /// already held is closed here.
    fn shared_file(&self, file: File) -> Result<Arc<File>, Errno> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(|e| Errno::from_io(&e))?;
        // SAFETY: fcntl(F_GETFL) on an fd we own; it takes no pointer.
        let mode = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
        let key = (meta.dev(), meta.ino(), mode);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|_, w| w.strong_count() > 0);
        if let Some(held) = files.get(&key).and_then(Weak::upgrade) {
            return Ok(held);
        }
        if files.len() >= self.max_files {
            static WARN: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
            crate::warn_limited!(
                WARN,
                held = files.len(),
                max = self.max_files,
                "DMA_MAP refused (EMFILE): the windows already hold the most distinct backing \
                 files allowed; map further windows from a file already mapped"
            );
            return Err(Errno::EMFILE);
        }
        let file = Arc::new(file);
        files.insert(key, Arc::downgrade(&file));
        Ok(file)
    }

    /// How many backing files the windows hold open (one fd each).
    pub fn backing_files(&self) -> usize {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Records a read-only window the client mapped without an fd (QEMU does this for
    /// ROM and BIOS shadow ranges). The device cannot reach its memory: an access fails
    /// with `DmaError::NoBacking`. A writable window without an fd is guest RAM the
    /// device could never reach, so it is refused with `ENOTSUP`.
    pub fn map_unbacked(&self, iova: u64, size: u64, flags: u32) -> Result<(), Errno> {
        Self::check_window(iova, size, 0, flags)?;
        if flags & VFIO_DMA_MAP_FLAG_WRITE != 0 {
            return Err(Errno::ENOTSUP);
        }
        self.check_free(iova, size)?;
        self.insert(iova, size, flags, Backing::None)
    }

    fn check_window(iova: u64, size: u64, offset: u64, flags: u32) -> Result<(), Errno> {
        let known = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
        if flags & !known != 0
            || flags & VFIO_DMA_MAP_FLAG_READ == 0 && flags & VFIO_DMA_MAP_FLAG_WRITE == 0
        {
            return Err(Errno::EINVAL);
        }
        if size == 0
            || !iova.is_multiple_of(DMA_PAGE_SIZE)
            || !size.is_multiple_of(DMA_PAGE_SIZE)
            || !offset.is_multiple_of(DMA_PAGE_SIZE)
        {
            return Err(Errno::EINVAL);
        }
        iova.checked_add(size).ok_or(Errno::EINVAL)?;
        Ok(())
    }

    fn check_free(&self, iova: u64, size: u64) -> Result<(), Errno> {
        let t = self.read_table();
        if t.overlaps(iova, iova + size) {
            return Err(Errno::EEXIST);
        }
        if t.maps.len() >= self.max_maps {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    fn insert(&self, iova: u64, size: u64, flags: u32, backing: Backing) -> Result<(), Errno> {
        let mut t = self.write_table();
        // Re-check under the write lock: the table may have changed meanwhile.
        if t.overlaps(iova, iova + size) {
            return Err(Errno::EEXIST);
        }
        if t.maps.len() >= self.max_maps {
            return Err(Errno::ENOSPC);
        }
        t.maps.insert(
            iova,
            Arc::new(Mapping {
                iova,
                size,
                flags,
                backing,
            }),
        );
        Ok(())
    }

    /// The windows lying whole inside `iova..iova+size`, as Linux's type1 IOMMU
    /// decides an unmap: a zero, unaligned or overflowing range is `EINVAL`, and so is a
    /// range that cuts a window in part (that window, and every other, stays); a range
    /// covering no window is empty, which is not an error.
    pub fn covered(&self, iova: u64, size: u64) -> Result<Vec<DmaWindow>, Errno> {
        let last = Self::check_unmap_range(iova, size)?;
        let t = self.read_table();
        Self::check_not_cut(&t, iova, last)?;
        Ok(t.maps
            .range(iova..=last)
            .map(|(_, m)| DmaWindow {
                iova: m.iova,
                size: m.size,
                flags: m.flags,
            })
            .collect())
    }

    /// The last IOVA of the range (inclusive). As Linux type1 decides, a range may end
    /// at the very top of the 64-bit space (QEMU's IOMMU address spaces reach 2^64 and
    /// are unmapped up to there); only one past it overflows.
    fn check_unmap_range(iova: u64, size: u64) -> Result<u64, Errno> {
        if size == 0 || !iova.is_multiple_of(DMA_PAGE_SIZE) || !size.is_multiple_of(DMA_PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        iova.checked_add(size - 1).ok_or(Errno::EINVAL)
    }

    /// `EINVAL` if a window starts before `iova` and reaches into the range, or starts
    /// inside it and reaches past `last` (inclusive).
    fn check_not_cut(t: &Table, iova: u64, last: u64) -> Result<(), Errno> {
        if t.find(iova).is_some_and(|m| m.iova != iova) {
            return Err(Errno::EINVAL);
        }
        // A window never reaches past 2^64 - 1 (DMA_MAP refuses that), so its last byte
        // is representable.
        if t.find(last).is_some_and(|m| m.iova + (m.size - 1) != last) {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// Unmaps every window lying whole inside `iova..iova+size` (Linux type1
    /// semantics, see [`Dma::covered`]) and returns them; a range that cuts a window in
    /// part changes nothing and is `EINVAL`. Returns once no device access holds the
    /// removed mappings any more.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<Vec<DmaWindow>, Errno> {
        let last = Self::check_unmap_range(iova, size)?;
        let removed: Vec<Arc<Mapping>> = {
            let mut t = self.write_table();
            Self::check_not_cut(&t, iova, last)?;
            let keys: Vec<u64> = t.maps.range(iova..=last).map(|(&k, _)| k).collect();
            keys.into_iter().filter_map(|k| t.maps.remove(&k)).collect()
        };
        let windows = removed
            .iter()
            .map(|m| DmaWindow {
                iova: m.iova,
                size: m.size,
                flags: m.flags,
            })
            .collect();
        for m in removed {
            Self::wait_unused(m);
        }
        Ok(windows)
    }

    /// Unmaps every window; returns how many there were.
    pub fn unmap_all(&self) -> usize {
        let maps = std::mem::take(&mut self.write_table().maps);
        let n = maps.len();
        for m in maps.into_values() {
            Self::wait_unused(m);
        }
        n
    }

    fn wait_unused(m: Arc<Mapping>) {
        let start = Instant::now();
        while Arc::strong_count(&m) > 1 && start.elapsed() < UNMAP_DRAIN_TIMEOUT {
            std::thread::sleep(Duration::from_micros(100));
        }
        if Arc::strong_count(&m) > 1 {
            tracing::warn!(
                iova = m.iova,
                size = m.size,
                "unmapped while a device access still held it"
            );
        }
    }

    /// The current windows, sorted by IOVA.
    pub fn windows(&self) -> Vec<DmaWindow> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .maps
            .values()
            .map(|m| DmaWindow {
                iova: m.iova,
                size: m.size,
                flags: m.flags,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read_table().maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits `iova..iova+len` window by window into (mapping, offset in mapping,
    /// offset in buffer, length). Fails before touching anything if any byte is
    /// unmapped, unbacked or lacks the permission.
    fn pieces(&self, iova: u64, len: usize, need: u32) -> Result<Vec<Piece>, DmaError> {
        let len64 = len as u64;
        iova.checked_add(len64)
            .ok_or(DmaError::Overflow { iova, len: len64 })?;
        let mut pieces = Vec::new();
        let t = self.read_table();
        let mut done = 0u64;
        while done < len64 {
            let at = iova + done;
            let m = t.find(at).ok_or(DmaError::NotMapped {
                iova: at,
                len: len64 - done,
            })?;
            if matches!(m.backing, Backing::None) {
                return Err(DmaError::NoBacking { iova: at });
            }
            if m.flags & need == 0 {
                let access = if need == VFIO_DMA_MAP_FLAG_WRITE {
                    "write"
                } else {
                    "read"
                };
                return Err(DmaError::Permission { iova: at, access });
            }
            let off = at - m.iova;
            let n = (m.size - off).min(len64 - done);
            pieces.push(Piece {
                m: Arc::clone(m),
                off,
                buf: done as usize,
                len: n as usize,
            });
            done += n;
        }
        Ok(pieces)
    }

    /// Whether the device may write all of `iova..iova+len` now (mapped, backed,
    /// writable), touching nothing: what a device checks before it starts work whose
    /// result it must be able to report.
    pub fn check_writable(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        self.pieces(iova, len, VFIO_DMA_MAP_FLAG_WRITE).map(drop)
    }

    /// Device read of guest memory (the device reads what the driver wrote).
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        for p in self.pieces(iova, buf.len(), VFIO_DMA_MAP_FLAG_READ)? {
            let dst = &mut buf[p.buf..p.buf + p.len];
            match &p.m.backing {
                Backing::Mem(r) => {
                    let s = r
                        .get_slice(p.off as usize, p.len)
                        .expect("bounds checked by pieces");
                    s.copy_to(dst);
                }
                Backing::Routed(route) => route.read(p.m.iova + p.off, p.off, dst)?,
                Backing::None => unreachable!("refused by pieces"),
            }
        }
        Ok(())
    }

    /// The piece of `iova..iova + len` up to the end of the window holding `iova`,
    /// for the device to access in place (see [`Direct`]), when that window is memory
    /// the client shared with `write` (or read) permission; `Ok(None)` when it is a
    /// routed window (a peer's memory or the client's own: those take
    /// [`Dma::read`] / [`Dma::write`]). Errors as those do for an unmapped or
    /// unpermitted IOVA.
    pub fn direct(&self, iova: u64, len: usize, write: bool) -> Result<Option<Direct>, DmaError> {
        let need = if write {
            VFIO_DMA_MAP_FLAG_WRITE
        } else {
            VFIO_DMA_MAP_FLAG_READ
        };
        let first = self.pieces(iova, len.min(1), need)?;
        let Some(p) = first.into_iter().next() else {
            return Ok(None);
        };
        if !matches!(p.m.backing, Backing::Mem(_)) {
            return Ok(None);
        }
        // The window's mapping is `m.size` bytes (a usize: it was mapped).
        let n = ((p.m.size - p.off) as usize).min(len);
        Ok(Some(Direct {
            off: p.off as usize,
            len: n,
            written: false,
            observer: if write { self.observer() } else { None },
            m: p.m,
        }))
    }

    /// Device write into guest memory, by the device's firmware.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.write_by(iova, buf, None)
    }

    /// Device write into guest memory on behalf of `initiator`. The windows are written
    /// in address order; a routed window that refuses its piece ends the write there
    /// (the pieces before it have landed) with the route's error.
    pub fn write_by(&self, iova: u64, buf: &[u8], initiator: Initiator) -> Result<(), DmaError> {
        let observer = self.observer();
        for p in self.pieces(iova, buf.len(), VFIO_DMA_MAP_FLAG_WRITE)? {
            let src = &buf[p.buf..p.buf + p.len];
            let at = p.m.iova + p.off;
            match &p.m.backing {
                Backing::Mem(r) => {
                    let s = r
                        .get_slice(p.off as usize, p.len)
                        .expect("bounds checked by pieces");
                    s.copy_from(src);
                }
                Backing::Routed(route) => route.write(at, p.off, src, initiator)?,
                Backing::None => unreachable!("refused by pieces"),
            }
            if let Some(o) = &observer {
                o(at, p.len as u64);
            }
        }
        Ok(())
    }
}

/// A piece of one window the client shared, held for the device to access in place
/// (SAVE encodes its image straight into it, LOAD sums and applies its image from it):
/// no bounce buffer, no copy but the one the device makes. Held, it keeps the window
/// mapped here (an unmap waits for it to be dropped, as for any access in flight), so
/// hold one for a bounded piece at a time. Dropping it after writes orders them
/// (`sfence` after the non-temporal stores) and tells the write observer.
///
/// The memory is shared with the client, which may change it at any time: it is only
/// ever copied into or out of, or summed, never taken for Rust data.
pub struct Direct {
    m: Arc<Mapping>,
    /// Offset of the piece inside the window.
    off: usize,
    len: usize,
    written: bool,
    observer: Option<WriteObserver>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Direct({:#x}+{:#x})",
            self.m.iova + self.off as u64,
            self.len
        )
    }
}

impl Direct {
    /// Bytes of the piece (from the IOVA asked for to the window's end, at most the
    /// length asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> *mut u8 {
        let Backing::Mem(r) = &self.m.backing else {
            unreachable!("a Direct is made of memory windows only")
        };
        // SAFETY: `off + len` lies inside the window's mapping (checked by
        // `Dma::direct`), which lives as long as `self.m`.
        unsafe { r.as_ptr().add(self.off) }
    }

    /// Copies `src` to offset `at` of the piece with stores that bypass the cache (the
    /// consumer is the client, and a cache full of image would only evict the next
    /// source bytes). Panics if it does not fit.
    pub fn write(&mut self, at: usize, src: &[u8]) {
        assert!(
            at.checked_add(src.len()).is_some_and(|e| e <= self.len),
            "write {at:#x}+{:#x} outside a {:#x}-byte piece",
            src.len(),
            self.len
        );
        self.written = true;
        // SAFETY: checked just above: `at..at + src.len()` lies inside the piece;
        // `src` is our own memory, the piece the client's, so they do not overlap.
        unsafe { stream_copy(self.ptr().add(at), src) };
    }

    /// The address of bytes `at..at + n` of the piece, for a writer that stores into
    /// them itself (a copy fused with a checksum); counts as a write (the store fence
    /// and the observer at drop). Writing through it is the caller's `unsafe`: only
    /// those `n` bytes, only while the piece is held, and with nothing else borrowed
    /// over them. Panics if out of the piece.
    pub fn dst_ptr(&mut self, at: usize, n: usize) -> *mut u8 {
        assert!(
            at.checked_add(n).is_some_and(|e| e <= self.len),
            "write {at:#x}+{n:#x} outside a {:#x}-byte piece",
            self.len
        );
        self.written = true;
        // SAFETY: in bounds (checked above) of a live mapping (pointer arithmetic only).
        unsafe { self.ptr().add(at) }
    }

    /// Runs `f` on bytes `at..at + n` of the piece, in place. The client may change
    /// them meanwhile: `f` must only copy or sum them, and take nothing it uses for a
    /// decision from them without checking its own copy. Panics if out of the piece.
    pub fn with<T>(&self, at: usize, n: usize, f: impl FnOnce(&[u8]) -> T) -> T {
        assert!(
            at.checked_add(n).is_some_and(|e| e <= self.len),
            "read {at:#x}+{n:#x} outside a {:#x}-byte piece",
            self.len
        );
        // SAFETY: in bounds (checked above) of a live mapping; the slice does not
        // outlive `f`. The bytes are shared memory another process may store into;
        // they are only read as plain bytes (any value is valid).
        let b = unsafe { std::slice::from_raw_parts(self.ptr().add(at).cast_const(), n) };
        f(b)
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        if !self.written {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE2 is part of x86_64; a store fence has no other effect.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
        if let Some(o) = &self.observer {
            o(self.m.iova + self.off as u64, self.len as u64);
        }
    }
}

/// Copies `src` to `dst` with non-temporal stores where the CPU has them (x86_64:
/// 16-byte `movntdq` once `dst` is aligned), a plain copy otherwise.
///
/// # Safety
/// `dst..dst + src.len()` must be writable and must not overlap `src`.
unsafe fn stream_copy(dst: *mut u8, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let n = src.len();
        let head = dst.align_offset(16).min(n);
        // SAFETY: the caller's contract (writable, not overlapping); every offset
        // stays below `n`, and the streaming stores are to 16-byte aligned addresses.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head);
            let mut i = head;
            while i + 64 <= n {
                let s = src.as_ptr().add(i).cast::<__m128i>();
                let d = dst.add(i).cast::<__m128i>();
                let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
                i += 64;
            }
            while i + 16 <= n {
                let s = src.as_ptr().add(i).cast::<__m128i>();
                _mm_stream_si128(dst.add(i).cast::<__m128i>(), _mm_loadu_si128(s));
                i += 16;
            }
            std::ptr::copy_nonoverlapping(src.as_ptr().add(i), dst.add(i), n - i);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len())
    };
}

/// One window's share of an access.
struct Piece {
    m: Arc<Mapping>,
    /// Offset inside the window.
    off: u64,
    /// Offset inside the buffer.
    buf: usize,
    len: usize,
}

/// What DMA_MAP does with a file that cannot be sealed against shrinking (a plain
/// file, such as QEMU's `memory-backend-file`, or a memfd created without
/// `MFD_ALLOW_SEALING`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnsealedFiles {
    /// Refuse the map with `EPERM` (the default): a client that truncates the file
    /// would make the next device access raise SIGBUS and take the process down.
    #[default]
    Refuse,
    /// Map it with a warning: the operator trusts the client not to shrink it.
    Allow,
}

/// Makes sure the client can no longer shrink the file under our mapping, before its
/// size is read. A file carrying `F_SEAL_SHRINK` already is fine (QEMU seals its memfd
/// backend); a sealable memfd gets it; any other file is `EPERM`, or is mapped with a
/// warning under [`UnsealedFiles::Allow`].
fn seal_against_shrinking(file: &File, iova: u64, unsealed: UnsealedFiles) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(F_GET_SEALS) on an fd we own; it takes no pointer.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    // SAFETY: fcntl(F_ADD_SEALS) on an fd we own with an integer argument.
    if seals >= 0 && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0 {
        tracing::debug!(iova, "sealed the DMA fd against shrinking");
        return Ok(());
    }
    match unsealed {
        UnsealedFiles::Allow => {
            tracing::warn!(
                iova,
                "DMA fd cannot be sealed against shrinking, mapped as allowed \
                 (--allow-unsealed-dma): a client that truncates it can crash the device"
            );
            Ok(())
        }
        UnsealedFiles::Refuse => {
            tracing::warn!(
                iova,
                "DMA_MAP refused (EPERM): its fd cannot be sealed against shrinking, and a \
                 client that truncated it would crash the device; use a sealable memfd \
                 (memory-backend-memfd) or start mlx5-emu with --allow-unsealed-dma"
            );
            Err(Errno::EPERM)
        }
    }
}

/// A memfd of `size` bytes, for tests and for drivers that DMA-map their own memory.
pub fn memfd(name: &str, size: u64) -> std::io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> u32 {
        VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
    }

    #[test]
    fn map_read_write_unmap() {
        let dma = Dma::default();
        let f = memfd("t", 0x4000).unwrap();
        dma.map(0x10000, 0x2000, f.try_clone().unwrap(), 0x1000, rw())
            .unwrap();
        dma.write(0x10ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        dma.read(0x10ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        // The bytes landed in the file at offset 0x1000 + 0xffe.
        let mut fb = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut fb, 0x1ffe).unwrap();
        assert_eq!(fb, [1, 2, 3, 4]);
        assert_eq!(dma.unmap(0x10000, 0x1000), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x10000, 0x2000).unwrap().len(), 1);
        assert!(matches!(
            dma.read(0x10000, &mut b),
            Err(DmaError::NotMapped { .. })
        ));
    }

    #[test]
    fn direct_pieces_end_at_their_window_and_tell_the_observer() {
        let dma = Dma::default();
        let f = memfd("t", 0x4000).unwrap();
        dma.map(0x10000, 0x2000, f.try_clone().unwrap(), 0, rw())
            .unwrap();
        dma.map(
            0x12000,
            0x1000,
            f.try_clone().unwrap(),
            0x3000,
            VFIO_DMA_MAP_FLAG_READ,
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        dma.set_write_observer(Some(Arc::new(move |iova, len| {
            s2.lock().unwrap().push((iova, len))
        })));
        let mut d = dma.direct(0x10ff0, 0x4000, true).unwrap().unwrap();
        assert_eq!(d.len(), 0x1010, "to the window's end");
        let data: Vec<u8> = (0..0x1010u32).map(|i| (i * 7) as u8).collect();
        d.write(3, &data[..0x1000]);
        d.write(0x1003, &data[..13]);
        assert_eq!(d.with(3, 4, |b| b.to_vec()), data[..4]);
        drop(d);
        assert_eq!(*seen.lock().unwrap(), [(0x10ff0, 0x1010)]);
        let mut back = vec![0u8; 0x1000];
        dma.read(0x10ff3, &mut back).unwrap();
        assert_eq!(back, data[..0x1000]);
        // Read-only: no piece to write, one to read; unmapped: the access's error.
        assert!(matches!(
            dma.direct(0x12000, 16, true),
            Err(DmaError::Permission { .. })
        ));
        assert_eq!(dma.direct(0x12000, 16, false).unwrap().unwrap().len(), 16);
        assert!(matches!(
            dma.direct(0x20000, 16, false),
            Err(DmaError::NotMapped { .. })
        ));
    }

    #[test]
    fn a_mapped_memfd_can_no_longer_shrink() {
        let dma = Dma::default();
        let f = memfd("t", 0x4000).unwrap();
        dma.map(0x0, 0x4000, f.try_clone().unwrap(), 0, rw())
            .unwrap();
        assert!(
            f.set_len(0x1000).is_err(),
            "shrinking would SIGBUS the device"
        );
        f.set_len(0x8000).unwrap();
        let mut b = [0u8; 8];
        dma.read(0x3ff8, &mut b).unwrap();
    }

    #[test]
    fn overlap_is_eexist_and_bad_maps_einval() {
        let dma = Dma::default();
        let f = memfd("t", 0x10000).unwrap();
        dma.map(0x2000, 0x2000, f.try_clone().unwrap(), 0, rw())
            .unwrap();
        assert_eq!(
            dma.map(0x3000, 0x2000, f.try_clone().unwrap(), 0, rw()),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            dma.map(0x1000, 0x2000, f.try_clone().unwrap(), 0, rw()),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            dma.map(0x0, 0x1000, f.try_clone().unwrap(), 0x10000, rw()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.map(0x0, 0x1001, f.try_clone().unwrap(), 0, rw()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.map(u64::MAX - 0xfff, 0x2000, f.try_clone().unwrap(), 0, rw()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.map(0x0, 0x1000, f.try_clone().unwrap(), 0, 0),
            Err(Errno::EINVAL)
        );
        dma.map(0x0, 0x2000, f, 0, rw()).unwrap();
        assert_eq!(dma.len(), 2);
    }

    #[test]
    fn fdless_windows_are_read_only_and_unbacked() {
        let dma = Dma::default();
        assert_eq!(
            dma.map_unbacked(0xc0000, 0x20000, rw()),
            Err(Errno::ENOTSUP)
        );
        dma.map_unbacked(0xc0000, 0x20000, VFIO_DMA_MAP_FLAG_READ)
            .unwrap();
        let mut b = [0u8; 4];
        assert_eq!(
            dma.read(0xc0000, &mut b),
            Err(DmaError::NoBacking { iova: 0xc0000 })
        );
        assert_eq!(
            dma.map_unbacked(0xd0000, 0x1000, VFIO_DMA_MAP_FLAG_READ),
            Err(Errno::EEXIST)
        );
        dma.unmap(0xc0000, 0x20000).unwrap();
    }

    #[test]
    fn access_spans_adjacent_windows_and_checks_permission() {
        let dma = Dma::default();
        let f = memfd("t", 0x2000).unwrap();
        dma.map(0x0, 0x1000, f.try_clone().unwrap(), 0, rw())
            .unwrap();
        dma.map(
            0x1000,
            0x1000,
            f.try_clone().unwrap(),
            0x1000,
            VFIO_DMA_MAP_FLAG_READ,
        )
        .unwrap();
        let mut b = [0u8; 16];
        dma.read(0xff8, &mut b).unwrap();
        assert!(matches!(
            dma.write(0xff8, &b),
            Err(DmaError::Permission { .. })
        ));
        assert!(matches!(
            dma.read(0x1ff8, &mut b),
            Err(DmaError::NotMapped { .. })
        ));
        assert_eq!(dma.unmap_all(), 2);
    }

    #[test]
    fn unmap_removes_every_window_it_covers_and_refuses_a_cut() {
        let dma = Dma::default();
        let f = memfd("t", 0x10000).unwrap();
        for iova in [0x10000, 0x20000, 0x30000] {
            dma.map(iova, 0x2000, f.try_clone().unwrap(), 0, rw())
                .unwrap();
        }
        // An empty range succeeds and removes nothing.
        assert_eq!(dma.unmap(0x100000, 0x1000), Ok(vec![]));
        assert_eq!(dma.unmap(0x12000, 0xe000), Ok(vec![]));
        // A range that cuts a window (at its start or its end) is refused; nothing goes.
        assert_eq!(dma.unmap(0x11000, 0x10000), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x0, 0x21000), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x10000, 0), Err(Errno::EINVAL));
        assert_eq!(dma.len(), 3);
        // A block covering two windows whole removes both (QEMU behind a vIOMMU).
        let gone = dma.unmap(0x0, 0x30000).unwrap();
        assert_eq!(
            gone.iter().map(|w| w.iova).collect::<Vec<_>>(),
            vec![0x10000, 0x20000]
        );
        let mut b = [0u8; 4];
        assert!(matches!(
            dma.read(0x20000, &mut b),
            Err(DmaError::NotMapped { .. })
        ));
        assert_eq!(dma.windows().len(), 1);
        dma.read(0x30000, &mut b).unwrap();
    }

    #[test]
    fn unmap_reaches_the_top_of_the_address_space() {
        // QEMU behind intel-iommu unmaps up to 2^64 when the guest resets its IOMMU:
        // iova + size is 2^64 exactly, which Linux type1 accepts.
        let dma = Dma::default();
        let f = memfd("t", 0x10000).unwrap();
        let high = 0xffff_ffff_fff0_0000;
        dma.map(high, 0x2000, f.try_clone().unwrap(), 0, rw())
            .unwrap();
        dma.map(0x10000, 0x2000, f, 0, rw()).unwrap();
        let top = 0u64.wrapping_sub(0xfef0_0000);
        assert_eq!(
            dma.covered(0xfef0_0000, top).unwrap().len(),
            1,
            "the window below 2^64"
        );
        let gone = dma.unmap(0xfef0_0000, top).unwrap();
        assert_eq!(gone.iter().map(|w| w.iova).collect::<Vec<_>>(), vec![high]);
        assert_eq!(dma.windows().len(), 1);
        // One page past 2^64 overflows.
        assert_eq!(dma.unmap(high, 0x10_1000), Err(Errno::EINVAL));
        // A range ending at 2^64 that cuts a window at its start is still refused.
        dma.map(high, 0x2000, memfd("u", 0x2000).unwrap(), 0, rw())
            .unwrap();
        assert_eq!(
            dma.unmap(high + 0x1000, 0x10_0000 - 0x1000),
            Err(Errno::EINVAL)
        );
        assert_eq!(dma.windows().len(), 2);
    }

    #[test]
    fn a_file_that_cannot_be_sealed_is_refused_unless_allowed() {
        let dma = Dma::default();
        let name = std::ffi::CString::new("unsealable").unwrap();
        // SAFETY: `name` is NUL-terminated; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(0x4000).unwrap();
        assert_eq!(
            dma.map(0x0, 0x4000, f.try_clone().unwrap(), 0, rw()),
            Err(Errno::EPERM)
        );
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(0x4000).unwrap();
        assert_eq!(
            dma.map(0x10000, 0x4000, plain.try_clone().unwrap(), 0, rw()),
            Err(Errno::EPERM)
        );
        assert!(dma.is_empty());
        dma.map_with(0x0, 0x4000, f, 0, rw(), UnsealedFiles::Allow)
            .unwrap();
        dma.map_with(0x10000, 0x4000, plain, 0, rw(), UnsealedFiles::Allow)
            .unwrap();
        // A memfd sealed by its owner already is fine.
        let sealed = memfd("sealed", 0x4000).unwrap();
        // SAFETY: fcntl(F_ADD_SEALS) on an fd we own with an integer argument.
        let rc = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&sealed),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        assert_eq!(rc, 0);
        dma.map(0x20000, 0x4000, sealed, 0, rw()).unwrap();
    }

    #[test]
    fn windows_of_one_file_hold_one_fd() {
        let dma = Dma::default();
        let f = memfd("t", 0x40000).unwrap();
        for i in 0..32u64 {
            // Each map brings its own fd, as QEMU's do behind a vIOMMU.
            dma.map(i * 0x2000, 0x2000, f.try_clone().unwrap(), i * 0x2000, rw())
                .unwrap();
        }
        let other = memfd("u", 0x1000).unwrap();
        dma.map(0x100000, 0x1000, other, 0, rw()).unwrap();
        assert_eq!(dma.len(), 33);
        assert_eq!(dma.backing_files(), 2);
        dma.unmap(0x100000, 0x1000).unwrap();
        assert_eq!(dma.backing_files(), 1);
        dma.unmap_all();
        assert_eq!(dma.backing_files(), 0);
    }

    #[test]
    fn distinct_backing_files_are_capped_and_a_held_one_still_maps() {
        let dma = Dma::with_limits(64, 2);
        let (a, b, c) = (
            memfd("a", 0x4000).unwrap(),
            memfd("b", 0x1000).unwrap(),
            memfd("c", 0x1000).unwrap(),
        );
        dma.map(0, 0x1000, a.try_clone().unwrap(), 0, rw()).unwrap();
        dma.map(0x10000, 0x1000, b, 0, rw()).unwrap();
        assert_eq!(
            dma.map(0x20000, 0x1000, c.try_clone().unwrap(), 0, rw()),
            Err(Errno::EMFILE)
        );
        assert_eq!(dma.len(), 2, "the refused map added nothing");
        // Another window of a file already held costs no fd and is accepted.
        dma.map(0x1000, 0x1000, a.try_clone().unwrap(), 0x1000, rw())
            .unwrap();
        assert_eq!(dma.backing_files(), 2);
        // Once a file's windows are gone, its place is free again.
        dma.unmap(0x10000, 0x1000).unwrap();
        dma.map(0x20000, 0x1000, c, 0, rw()).unwrap();
    }
}
