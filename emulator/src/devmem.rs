//! Device memory: BAR2 of every function, backed by a memfd.
//!
//! The client may mmap it (the region info offers the memfd with a sparse-mmap area
//! covering the whole BAR) and may also reach it with REGION_READ/WRITE. The emulator
//! maps the same memfd, so every path sees the same bytes.
//!
//! # Dirty tracking
//!
//! Writes through the client's mmap are invisible to the device, so what changed since
//! a save is found by comparing a digest (xxh3-64) of each page with the digest of what
//! the last save carried. That is correct whatever the write path. Writes the device
//! does see (REGION_WRITE, DMA, LOAD) also set a bit in a bitmap, so they count even in
//! the (theoretical) case of a digest collision. A page is dirty when its bit is set or
//! its digest differs from the baseline.
//!
//! Races are resolved by copying first and hashing the copy: a write that lands after
//! (or during) the copy leaves memory different from the copy, so the page is found
//! dirty next time.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, RwLock};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};
use xxhash_rust::xxh3::xxh3_64;

/// Bytes of a device-memory page (the unit of tracking and of the state image).
pub const DEV_MEM_PAGE_SIZE: u64 = 4096;
/// `--dev-mem` default: 1 MiB.
pub const DEFAULT_DEV_MEM_SIZE: u64 = 1 << 20;
/// Smallest device memory: one page.
pub const MIN_DEV_MEM_SIZE: u64 = DEV_MEM_PAGE_SIZE;
/// Largest device memory a function may have (256 MiB): bounds images and scans.
pub const MAX_DEV_MEM_SIZE: u64 = 256 << 20;

/// Why device memory could not be built or accessed.
#[derive(Debug, thiserror::Error)]
pub enum DevMemError {
    #[error("device memory size {size:#x}: expected a power of two in {min:#x}..={max:#x}")]
    BadSize { size: u64, min: u64, max: u64 },
    #[error("cannot create the device memory memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map device memory: {0}")]
    Mmap(String),
    #[error("access {offset:#x}+{len:#x} is outside the {size:#x}-byte device memory")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// Checks a `--dev-mem` value.
pub fn check_size(size: u64) -> Result<(), DevMemError> {
    if !size.is_power_of_two() || !(MIN_DEV_MEM_SIZE..=MAX_DEV_MEM_SIZE).contains(&size) {
        return Err(DevMemError::BadSize {
            size,
            min: MIN_DEV_MEM_SIZE,
            max: MAX_DEV_MEM_SIZE,
        });
    }
    Ok(())
}

/// Digest of one page.
pub fn page_digest(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// Whether `page` is all zeros (word-wise, so it runs at memory speed).
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

struct Track {
    /// One bit per page: written by a path the device sees since the last save.
    written: Vec<u64>,
    /// Digest of each page as the destination has it after the last save, or `None`
    /// when no save session is open.
    baseline: Option<Vec<u64>>,
}

/// One memfd of device memory and the emulator's own mapping of it.
struct Backing {
    file: File,
    region: MmapRegion<()>,
}

impl Backing {
    fn new(name: &str, size: u64) -> Result<Arc<Self>, DevMemError> {
        let file = vfu::dma::memfd(name, size).map_err(DevMemError::Memfd)?;
        // The client gets this fd: a client that shrank it would make our own mapping
        // fault (SIGBUS), so its size is sealed.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(F_ADD_SEALS) on an fd we own with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(DevMemError::Memfd(std::io::Error::last_os_error()));
        }
        let clone = file.try_clone().map_err(DevMemError::Memfd)?;
        let len = usize::try_from(size).map_err(|_| DevMemError::Mmap("size".into()))?;
        let region = MmapRegion::<()>::from_file(FileOffset::new(clone, 0), len)
            .map_err(|e| DevMemError::Mmap(e.to_string()))?;
        Ok(Arc::new(Backing { file, region }))
    }

    fn ptr(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    /// Gives the pages back to the kernel (they read as zeros again).
    fn release(&self) {
        let len = self.region.len() as libc::off_t;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an fd we own; punching a hole keeps the size, so our
        // mapping stays valid (the pages read as zeros).
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, 0, len) } != 0 {
            // Only memory stays in use; the contents are overwritten at the next freeze.
            tracing::debug!(error = %std::io::Error::last_os_error(), "device memory copy kept");
        }
    }

    /// Copies all of `from` into `self` (same size).
    fn copy_from(&self, from: &Backing) {
        let len = self.region.len().min(from.region.len());
        // SAFETY: both mappings are at least `len` bytes, live for this call and are
        // distinct memfds, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(from.ptr(), self.ptr(), len) };
    }

    /// Copies the pages of `from` that differ from `self`'s into `self`; returns how
    /// many did.
    fn sync_from(&self, from: &Backing) -> usize {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let len = self.region.len().min(from.region.len());
        let mut changed = 0;
        for off in (0..len).step_by(page) {
            // SAFETY: `off + page <= len`, inside both mappings (their sizes are whole
            // pages), which live for this call; distinct memfds, so no overlap.
            unsafe {
                let (src, dst) = (from.ptr().add(off), self.ptr().add(off));
                let a = std::slice::from_raw_parts(src.cast_const(), page);
                let b = std::slice::from_raw_parts(dst.cast_const(), page);
                if a != b {
                    std::ptr::copy_nonoverlapping(src, dst, page);
                    changed += 1;
                }
            }
        }
        changed
    }
}

/// Which memfds hold device memory.
///
/// `shared` is the one the current attachment was offered (its mmap). While the
/// function runs, the device uses it too, so the client's stores are the device's
/// memory. While the function is frozen (responder-suspended) the device uses its own
/// copy, `frozen`, that no client holds: stores through a mapping cannot change a frozen
/// function, and at thaw the device's copy goes back into `shared` (a store made while
/// frozen is dropped, as a quiesced device drops it).
struct Maps {
    shared: Arc<Backing>,
    /// The device's own copy, made at start-up so a freeze cannot fail; its pages are
    /// given back to the kernel at thaw.
    copy: Arc<Backing>,
    frozen: bool,
    /// Bumped each time `shared` is replaced (a client left).
    attachment: u64,
}

impl Maps {
    fn device(&self) -> &Arc<Backing> {
        if self.frozen {
            &self.copy
        } else {
            &self.shared
        }
    }
}

/// One function's device memory.
///
/// # Attachments
///
/// A client reaches device memory through the memfd of its region info, and keeps any
/// mapping it made (or the fd itself) after it disconnects. So each attachment gets its
/// own memfd: when a client goes away ([`DevMem::detach`]) the contents move, under the
/// maps lock, into a fresh memfd that only the next client is offered; what the departed
/// client still maps is no longer device memory. A reset keeps the attachment (the
/// client that reset the function is still its owner, as a VFIO user keeps its BAR
/// mappings across an FLR) and zeroes the contents.
pub struct DevMem {
    name: String,
    size: u64,
    /// The memfds (see [`Maps`]). Writers hold it shared for the length of their store,
    /// so a swap (freeze, thaw, detach) never loses a store; readers only clone the
    /// device's backing. Taken before `track`; nothing else is taken under it.
    maps: RwLock<Maps>,
    /// Written bits and the save baseline. A leaf lock: held for a bit update or a
    /// copy of the bitmap, never across a page copy; nothing is taken under it.
    track: Mutex<Track>,
}

impl std::fmt::Debug for DevMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevMem").field("size", &self.size).finish()
    }
}

/// A page copied out of device memory: its index, bytes and digest.
#[derive(Clone, PartialEq, Eq)]
pub struct PageCopy {
    pub index: u32,
    pub data: Box<[u8]>,
    pub digest: u64,
}

impl std::fmt::Debug for PageCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageCopy({}, {:#x})", self.index, self.digest)
    }
}

impl DevMem {
    /// Zeroed device memory of `size` bytes (see [`check_size`]).
    pub fn new(name: &str, size: u64) -> Result<Self, DevMemError> {
        check_size(size)?;
        let shared = Backing::new(name, size)?;
        let copy = Backing::new(&format!("{name}-frozen"), size)?;
        let pages = Self::pages_of(size);
        Ok(DevMem {
            name: name.to_string(),
            size,
            maps: RwLock::new(Maps {
                shared,
                copy,
                frozen: false,
                attachment: 0,
            }),
            track: Mutex::new(Track {
                written: vec![0; pages.div_ceil(64)],
                baseline: None,
            }),
        })
    }

    fn maps(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|p| p.into_inner())
    }

    fn maps_mut(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The backing the device reads now. A reader may go on with it after a swap: the
    /// swap copied it, so what it reads is what device memory held at that moment.
    fn device(&self) -> Arc<Backing> {
        Arc::clone(self.maps().device())
    }

    /// The current attachment's memfd, for the region info's mmap offer. Stays open
    /// as long as the attachment lasts (the `DevMem` keeps it).
    pub fn fd(&self) -> RawFd {
        self.maps().shared.file.as_raw_fd()
    }

    /// How many clients have left since power-on (each got its own memfd).
    pub fn attachment(&self) -> u64 {
        self.maps().attachment
    }

    /// Whether the device is using its own frozen copy.
    pub fn is_frozen(&self) -> bool {
        self.maps().frozen
    }

    /// The client left: the next one gets a fresh memfd, the contents moved into it
    /// (or, while frozen, moved at thaw), so nothing the departed client kept maps
    /// device memory any more.
    pub fn detach(&self) -> Result<(), DevMemError> {
        let fresh = Backing::new(&self.name, self.size)?;
        let mut m = self.maps_mut();
        if !m.frozen {
            fresh.copy_from(&m.shared);
        }
        m.shared = fresh;
        m.attachment += 1;
        Ok(())
    }

    /// The function froze (SUSPEND_VHCA(responder) completed): the device goes on with
    /// a private copy, so stores through a client's mapping no longer reach it.
    pub fn freeze(&self) {
        let mut m = self.maps_mut();
        if m.frozen {
            return;
        }
        m.copy.copy_from(&m.shared);
        m.frozen = true;
    }

    /// The function thawed: the device's copy goes back into the client's memfd and
    /// the device uses that again. Returns the pages whose bytes the client had
    /// changed while frozen (now restored) or the device had (a LOAD).
    pub fn thaw(&self) -> usize {
        let mut m = self.maps_mut();
        if !m.frozen {
            return 0;
        }
        m.frozen = false;
        let changed = m.shared.sync_from(&m.copy);
        m.copy.release();
        changed
    }

    fn pages_of(size: u64) -> usize {
        // size <= MAX_DEV_MEM_SIZE, so the page count fits any usize.
        (size / DEV_MEM_PAGE_SIZE) as usize
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        Self::pages_of(self.size)
    }

    /// Whether `file` is the current attachment's memfd (the same inode: a client's
    /// DMA_MAP brings its own fd for it, so fds are not compared). A departed client's
    /// memfd is not device memory any more.
    pub fn is_backed_by(&self, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ours = self.maps().shared.file.metadata();
        match (ours, file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    fn track(&self) -> std::sync::MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, offset: u64, len: usize) -> Result<(usize, usize), DevMemError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok((offset as usize, len)),
            _ => Err(DevMemError::OutOfRange {
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevMemError> {
        let (off, len) = self.check(offset, buf.len())?;
        let b = self.device();
        let s = b
            .region
            .get_slice(off, len)
            .map_err(|e| DevMemError::Mmap(e.to_string()))?;
        s.copy_to(buf);
        Ok(())
    }

    /// Writes `data` at `offset` and marks the pages it touches as written.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevMemError> {
        let (off, len) = self.check(offset, data.len())?;
        // Held across the store, so a swap of the backing cannot lose it.
        let m = self.maps();
        let s = m
            .device()
            .region
            .get_slice(off, len)
            .map_err(|e| DevMemError::Mmap(e.to_string()))?;
        s.copy_from(data);
        if len > 0 {
            let first = off / DEV_MEM_PAGE_SIZE as usize;
            let last = (off + len - 1) / DEV_MEM_PAGE_SIZE as usize;
            let mut t = self.track();
            for p in first..=last {
                if let Some(w) = t.written.get_mut(p / 64) {
                    *w |= 1 << (p % 64);
                }
            }
        }
        Ok(())
    }

    /// Copies page `index` and hashes the copy.
    pub fn copy_page(&self, index: u32) -> Result<PageCopy, DevMemError> {
        let i = index as usize;
        if i >= self.pages() {
            return Err(DevMemError::OutOfRange {
                offset: u64::from(index) * DEV_MEM_PAGE_SIZE,
                len: DEV_MEM_PAGE_SIZE,
                size: self.size,
            });
        }
        let b = self.device();
        let data: Box<[u8]> = Self::with_page(&b, i, |p| Box::from(p));
        let digest = page_digest(&data);
        Ok(PageCopy {
            index,
            data,
            digest,
        })
    }

    /// Runs `f` on page `index` in place, nothing copied. The bytes may change under
    /// `f` (the client writes through its own mapping): callers only count or hash,
    /// and a count or digest taken while a page changes is as stale as one taken just
    /// before, which the digest comparison of the next round finds anyway.
    fn with_page<T>(b: &Backing, index: usize, f: impl FnOnce(&[u8]) -> T) -> T {
        let page = DEV_MEM_PAGE_SIZE as usize;
        assert!(
            (index + 1) * page <= b.region.len(),
            "page {index} outside device memory"
        );
        // SAFETY: checked just above, the page lies inside the mapping of the
        // (size-sealed) memfd, which lives as long as `b`; the slice is only read for
        // the duration of `f` and never outlives the borrow.
        let bytes = unsafe { std::slice::from_raw_parts(b.ptr().add(index * page), page) };
        f(bytes)
    }

    /// Runs `f` on the pages that are not all zeros (what a base image carries), in
    /// place, as (index, bytes) pairs: nothing copied. As with `with_page`, the bytes
    /// may change under `f`; whoever copies them must digest its copy.
    pub fn with_nonzero<T>(&self, f: impl FnOnce(&[(u32, &[u8])]) -> T) -> T {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let b = self.device();
        let base = b.ptr();
        let pages: Vec<(u32, &[u8])> = (0..self.pages())
            .filter(|&i| Self::with_page(&b, i, |p| !is_zero(p)))
            .map(|i| {
                // SAFETY: as in `with_page`: page `i` lies inside the mapping `b`
                // holds, which outlives the slices (they live only for this call).
                let p = unsafe { std::slice::from_raw_parts(base.add(i * page), page) };
                (i as u32, p)
            })
            .collect();
        f(&pages)
    }

    /// Pages that are not all zeros (what a base image carries), counted in place.
    pub fn count_nonzero(&self) -> usize {
        let b = self.device();
        (0..self.pages())
            .filter(|&i| Self::with_page(&b, i, |p| !is_zero(p)))
            .count()
    }

    /// Pages a delta would carry now (see [`DevMem::dirty_pages`]), counted in place:
    /// one hashing pass, nothing copied. Without a session, every page.
    pub fn count_dirty(&self) -> usize {
        let (written, baseline) = {
            let t = self.track();
            (t.written.clone(), t.baseline.clone())
        };
        let Some(baseline) = baseline else {
            return self.pages();
        };
        let b = self.device();
        (0..self.pages())
            .filter(|&i| {
                let bit = written
                    .get(i / 64)
                    .is_some_and(|w| w & (1 << (i % 64)) != 0);
                bit || baseline
                    .get(i)
                    .is_none_or(|&d| Self::with_page(&b, i, |p| page_digest(p) != d))
            })
            .count()
    }

    /// Whether a save session (a baseline) is open.
    pub fn tracking(&self) -> bool {
        self.track().baseline.is_some()
    }

    /// Pages that differ from the baseline (or were written by a path the device sees),
    /// copied, in page order. Without a baseline, every page.
    pub fn dirty_pages(&self) -> Result<Vec<PageCopy>, DevMemError> {
        let (written, baseline) = {
            let t = self.track();
            (t.written.clone(), t.baseline.clone())
        };
        let mut out = Vec::new();
        for i in 0..self.pages() {
            let c = self.copy_page(i as u32)?;
            let bit = written
                .get(i / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0);
            let differs = baseline
                .as_ref()
                .and_then(|b| b.get(i))
                .is_none_or(|&d| d != c.digest);
            if bit || differs {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Opens a new save session whose destination has nothing but zeros yet: the
    /// baseline becomes the zero-page digest everywhere, and the written bits clear.
    /// Pages then count as dirty exactly when they are not all zeros.
    pub fn begin_session(&self) {
        let zero = page_digest(&[0u8; DEV_MEM_PAGE_SIZE as usize]);
        let mut t = self.track();
        t.baseline = Some(vec![zero; self.pages()]);
        t.written.iter_mut().for_each(|w| *w = 0);
    }

    /// Records that the destination now has `pages` (their digests become the
    /// baseline; their written bits clear). Bits of pages written after the copy may be
    /// cleared here too; the digest comparison still finds those pages dirty.
    /// `pages` are (index, digest) pairs.
    pub fn commit(&self, pages: impl IntoIterator<Item = (u32, u64)>) {
        let mut t = self.track();
        let Track { written, baseline } = &mut *t;
        for (index, digest) in pages {
            let i = index as usize;
            if let Some(w) = written.get_mut(i / 64) {
                *w &= !(1 << (i % 64));
            }
            if let Some(d) = baseline.as_mut().and_then(|b| b.get_mut(i)) {
                *d = digest;
            }
        }
    }

    /// Closes the save session.
    pub fn end_session(&self) {
        self.track().baseline = None;
    }

    /// Applies a LOAD: writes `pages` ((index, 4 KiB of bytes) pairs; indices below
    /// [`DevMem::pages`], bytes one page long, else skipped) and, when `zero_rest`, turns
    /// every other page to zeros (a base image replaces all of device memory). A page
    /// already zero is only read, never written, and a carried page is written once;
    /// every page touched is marked written. One pass, one lock.
    pub fn apply(&self, zero_rest: bool, pages: &[(u32, &[u8])]) {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let mut carried = vec![0u64; self.pages().div_ceil(64)];
        let m = self.maps();
        let b = m.device();
        let mut t = self.track();
        for &(index, data) in pages {
            let i = index as usize;
            if i >= self.pages() || data.len() != page {
                continue;
            }
            // SAFETY: `i < self.pages()`, so the page lies inside the mapping of the
            // size-sealed memfd, which `b` keeps alive; `data` is one page of other
            // memory (the image), so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr().add(i * page), page) };
            carried[i / 64] |= 1 << (i % 64);
            t.written[i / 64] |= 1 << (i % 64);
        }
        if zero_rest {
            for i in 0..self.pages() {
                if carried[i / 64] & (1 << (i % 64)) != 0 {
                    continue;
                }
                if !Self::with_page(b, i, is_zero) {
                    // SAFETY: as above, page `i` lies inside the mapping `b` keeps.
                    unsafe { std::ptr::write_bytes(b.ptr().add(i * page), 0, page) };
                }
                t.written[i / 64] |= 1 << (i % 64);
            }
        }
    }

    /// Fills device memory with zeros (marking every page written).
    pub fn zero(&self) -> Result<(), DevMemError> {
        let zero = vec![0u8; DEV_MEM_PAGE_SIZE as usize];
        for i in 0..self.pages() as u64 {
            self.write(i * DEV_MEM_PAGE_SIZE, &zero)?;
        }
        Ok(())
    }

    /// Back to power-on: zeros, not frozen, no session. The attachment stays.
    pub fn reset(&self) {
        {
            let mut m = self.maps_mut();
            if m.frozen {
                m.frozen = false;
                m.copy.release();
            }
            let b = &m.shared;
            // SAFETY: the whole mapping of the shared memfd, alive while `m` is held.
            unsafe { std::ptr::write_bytes(b.ptr(), 0, b.region.len()) };
        }
        let mut t = self.track();
        t.baseline = None;
        t.written.iter_mut().for_each(|w| *w = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(check_size(4096).is_ok());
        assert!(check_size(1 << 20).is_ok());
        for bad in [0, 2048, 4096 + 1, 3 << 20, MAX_DEV_MEM_SIZE * 2] {
            assert!(check_size(bad).is_err(), "{bad:#x}");
        }
    }

    #[test]
    fn reads_writes_and_bounds() {
        let m = DevMem::new("t", 16 << 10).unwrap();
        m.write(4090, b"0123456789").unwrap();
        let mut b = [0u8; 10];
        m.read(4090, &mut b).unwrap();
        assert_eq!(&b, b"0123456789");
        assert!(m.write(16 << 10, b"x").is_err());
        assert!(m.read(u64::MAX, &mut b).is_err());
        assert!(m.write((16 << 10) - 1, b"xy").is_err());
    }

    #[test]
    fn dirty_pages_follow_writes_by_any_path() {
        let m = DevMem::new("t", 64 << 10).unwrap();
        // Without a session every page is dirty.
        assert_eq!(m.dirty_pages().unwrap().len(), 16);
        assert_eq!(m.count_dirty(), 16);
        assert_eq!(m.count_nonzero(), 0);
        m.begin_session();
        assert_eq!(m.count_dirty(), 0);
        assert!(
            m.dirty_pages().unwrap().is_empty(),
            "zeros match the baseline"
        );
        m.write(5 * 4096 + 7, &[1]).unwrap();
        let d = m.dirty_pages().unwrap();
        assert_eq!(d.iter().map(|p| p.index).collect::<Vec<_>>(), vec![5]);
        assert_eq!((m.count_dirty(), m.count_nonzero()), (1, 1));
        m.commit(d.iter().map(|p| (p.index, p.digest)));
        assert_eq!(m.count_dirty(), 0);
        assert!(m.dirty_pages().unwrap().is_empty());
        // A write the device does not see (a second mapping of the memfd, as the client's
        // mmap) is found by its digest.
        let file = m.maps().shared.file.try_clone().unwrap();
        let other = MmapRegion::<()>::from_file(FileOffset::new(file, 0), 64 << 10).unwrap();
        other.get_slice(9 * 4096, 1).unwrap().copy_from(&[0xaau8]);
        let d = m.dirty_pages().unwrap();
        assert_eq!(d.iter().map(|p| p.index).collect::<Vec<_>>(), vec![9]);
        assert_eq!((m.count_dirty(), m.count_nonzero()), (1, 2));
        m.end_session();
        assert!(!m.tracking());
        // LOAD: a base replaces everything, a delta only what it carries.
        let one = [7u8; 4096];
        m.apply(true, &[(3, &one), (99, &one), (4, &one[..10])]);
        let mut all = vec![0u8; 64 << 10];
        m.read(0, &mut all).unwrap();
        assert!(all
            .chunks(4096)
            .enumerate()
            .all(|(i, p)| p == if i == 3 { &one[..] } else { &[0u8; 4096][..] }));
        m.apply(false, &[(1, &one)]);
        assert_eq!(m.count_nonzero(), 2);
    }
}
