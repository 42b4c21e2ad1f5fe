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
/// Largest device memory a function may have (16 GiB, BAR2 a 64-bit prefetchable BAR).
/// The memfd is sparse: untouched pages hold no memory, and nothing here faults them
/// in (scans, digests, saves and copies walk only its data extents, SEEK_DATA /
/// SEEK_HOLE). An image of more than 4 GiB (the PRM's sizes are 32 bits) can only be
/// fetched in chunk mode.
pub const MAX_DEV_MEM_SIZE: u64 = 16 << 30;

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

/// Digest of a page of zeros.
fn zero_digest() -> u64 {
    static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| page_digest(&[0u8; DEV_MEM_PAGE_SIZE as usize]))
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
    /// A frozen function's chunked image: the pages still to carry (a list, and where
    /// in it the next chunk starts). Dropped by anything that changes device memory
    /// or its freeze.
    rest: Option<(Vec<u32>, usize)>,
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

    /// Gives the pages of `off..off + len` back to the kernel (they read as zeros
    /// again); false if the file cannot.
    fn punch(&self, off: usize, len: usize) -> bool {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // Offsets inside the mapping, at most MAX_DEV_MEM_SIZE (16 GiB): they fit an off_t.
        let (off, len) = (off as libc::off_t, len as libc::off_t);
        // SAFETY: fallocate on an fd we own; punching a hole keeps the size, so our
        // mapping stays valid (the pages read as zeros).
        unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) == 0 }
    }

    /// Writes zeros over every page in a data extent (holes read as zeros already).
    fn zero_data(&self) {
        let data = self.data_pages();
        for i in 0..self.pages() {
            if data[i / 64] & (1 << (i % 64)) != 0 {
                // SAFETY: page `i` lies inside our mapping (`page_ptr`).
                unsafe { std::ptr::write_bytes(self.page_ptr(i), 0, DEV_MEM_PAGE_SIZE as usize) };
            }
        }
    }

    /// Gives all the pages back to the kernel (they read as zeros again).
    fn release(&self) {
        if !self.punch(0, self.region.len()) {
            // Only memory stays in use; the contents are overwritten at the next freeze.
            tracing::debug!(error = %std::io::Error::last_os_error(), "device memory copy kept");
        }
    }

    fn pages(&self) -> usize {
        self.region.len() / DEV_MEM_PAGE_SIZE as usize
    }

    fn page_ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.pages(), "page {index} outside device memory");
        // SAFETY: checked just above, the offset lies inside our mapping of the
        // size-sealed memfd (pointer arithmetic only; callers document their access).
        unsafe { self.ptr().add(index * DEV_MEM_PAGE_SIZE as usize) }
    }

    /// One bit per page that lies in a data extent of the memfd (SEEK_DATA /
    /// SEEK_HOLE); every other page is a hole, which reads as zeros and holds no
    /// memory. Scans skip holes, so they never fault untouched memory in. Where the
    /// file cannot say, every page counts as data.
    fn data_pages(&self) -> Vec<u64> {
        let pages = self.pages();
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let fd = self.file.as_raw_fd();
        let size = self.region.len() as libc::off_t;
        let page = DEV_MEM_PAGE_SIZE as libc::off_t;
        let mut at: libc::off_t = 0;
        // Each step moves past one extent; there are at most `pages` of them.
        for _ in 0..=pages {
            if at >= size {
                break;
            }
            // SAFETY: lseek on an fd we own, integer arguments.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    bits.iter_mut().for_each(|w| *w = !0);
                }
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { size } else { hole.min(size) };
            let (first, last) = ((data / page) as usize, ((end + page - 1) / page) as usize);
            for i in first..last.min(pages) {
                bits[i / 64] |= 1 << (i % 64);
            }
            if end <= at {
                break;
            }
            at = end;
        }
        bits
    }

    /// Sets the bits of `bits` (one per page) of the pages of `first..first + count`
    /// that hold memory; the others are holes. Bounded by the range, whatever the rest
    /// of the file holds: residency from `mincore` (shared file pages: the page cache),
    /// a page not resident confirmed a hole by SEEK_DATA (a swapped-out page is data),
    /// which also skips a whole run of holes at once. Where the kernel cannot say,
    /// every page of the range counts as data.
    fn data_in(&self, first: usize, count: usize, bits: &mut [u64]) {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let count = count.min(self.pages().saturating_sub(first));
        let set = |bits: &mut [u64], i: usize| bits[i / 64] |= 1 << (i % 64);
        let mut resident = vec![0u8; count];
        // SAFETY: the range lies inside our mapping (page aligned, `count` clamped to
        // it); mincore writes one byte per page into `resident`, which has `count`.
        let r = unsafe {
            libc::mincore(
                self.ptr().add(first * page).cast(),
                count * page,
                resident.as_mut_ptr(),
            )
        };
        if r != 0 {
            (first..first + count).for_each(|i| set(bits, i));
            return;
        }
        let mut i = 0;
        // Each step moves `i` forward by at least one page.
        while i < count {
            if resident[i] & 1 != 0 {
                set(bits, first + i);
                i += 1;
                continue;
            }
            let off = ((first + i) * page) as libc::off_t;
            // SAFETY: lseek on an fd we own, integer arguments.
            let d = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
            if d < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    (first + i..first + count).for_each(|k| set(bits, k));
                }
                return;
            }
            let at = d as usize / page;
            if at <= first + i {
                set(bits, first + i);
                i += 1;
            } else {
                i = at - first;
            }
        }
    }

    /// Writes page `index` through the file rather than the mapping: a page that is a
    /// hole gets its memory allocated and filled in one step, without the fault (and
    /// the zeroing) a store through the mapping would take.
    fn write_page_through_file(&self, index: usize, data: &[u8]) -> bool {
        let off = (index as u64 * DEV_MEM_PAGE_SIZE) as libc::off_t;
        // SAFETY: pwrite from a live slice of exactly data.len() bytes to an fd we own.
        let n =
            unsafe { libc::pwrite(self.file.as_raw_fd(), data.as_ptr().cast(), data.len(), off) };
        n == data.len() as isize
    }

    /// Writes consecutive pages from `first` through the file in one call (see
    /// [`Backing::write_page_through_file`]): one system call for the lot, instead of a
    /// fault (allocation and zeroing) per page through the mapping. False if the file
    /// did not take them all.
    fn write_pages_through_file(&self, first: usize, pages: &[&[u8]]) -> bool {
        let iov: Vec<libc::iovec> = pages
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr().cast_mut().cast(),
                iov_len: p.len(),
            })
            .collect();
        let want: usize = pages.iter().map(|p| p.len()).sum();
        let off = (first as u64 * DEV_MEM_PAGE_SIZE) as libc::off_t;
        let Ok(count) = libc::c_int::try_from(iov.len()) else {
            return false;
        };
        // SAFETY: pwritev from live slices (the iovecs only read them) to an fd we
        // own; `count` iovecs at `iov`.
        let n = unsafe { libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), count, off) };
        n == want as isize
    }

    /// Writes `src` at byte `off` through the file, in as many calls as the kernel
    /// takes (each moves forward, at most `src.len()` of them): a hole gets its pages
    /// allocated and filled without a fault and a zeroing per page, which is what a
    /// store through the mapping into fresh memory costs (several times the copy).
    /// False if the file refused (the caller copies through the mapping instead).
    fn write_through_file(&self, off: usize, src: &[u8]) -> bool {
        let mut done = 0;
        while done < src.len() {
            let rest = &src[done..];
            // SAFETY: pwrite from a live slice of exactly `rest.len()` bytes to an fd
            // we own; the offset lies inside the size-sealed file.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (off + done) as libc::off_t,
                )
            };
            if n <= 0 {
                return false;
            }
            done += n as usize;
        }
        true
    }

    /// Copies all of `from` into `self` (same size), extent by extent: a hole of
    /// `from` becomes a hole of `self` (nothing read, nothing faulted in); a data
    /// extent goes through the file ([`Backing::write_through_file`]).
    fn copy_from(&self, from: &Backing) {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let data = from.data_pages();
        let pages = self.pages().min(from.pages());
        let mut i = 0;
        while i < pages {
            let is_data = data[i / 64] & (1 << (i % 64)) != 0;
            let mut j = i + 1;
            while j < pages && (data[j / 64] & (1 << (j % 64)) != 0) == is_data {
                j += 1;
            }
            let (off, len) = (i * page, (j - i) * page);
            // SAFETY: `off + len` is inside `from`'s mapping (whole pages), which
            // lives for this call and is only read.
            let src = unsafe { std::slice::from_raw_parts(from.ptr().add(off).cast_const(), len) };
            let through_file = is_data && self.write_through_file(off, src);
            if !through_file && (is_data || !self.punch(off, len)) {
                // SAFETY: `off + len` is inside both mappings (whole pages of each),
                // which live for this call; distinct memfds, so no overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(from.ptr().add(off), self.ptr().add(off), len)
                };
            }
            i = j;
        }
    }

    /// Copies the pages of `from` that differ from `self`'s into `self`; returns how
    /// many did. A page that is a hole in both is not read.
    fn sync_from(&self, from: &Backing) -> usize {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let (a_data, b_data) = (from.data_pages(), self.data_pages());
        let mut changed = 0;
        let pages = self.pages().min(from.pages());
        for (w, (&in_from, &in_self)) in a_data.iter().zip(&b_data).enumerate() {
            let mut either = (in_from | in_self) & page_mask(pages, w);
            while either != 0 {
                let i = w * 64 + either.trailing_zeros() as usize;
                either &= either - 1;
                let (src, dst) = (from.page_ptr(i), self.page_ptr(i));
                // SAFETY: page `i` is inside both mappings (`page_ptr`), which live for
                // this call; distinct memfds, so no overlap.
                unsafe {
                    let a = std::slice::from_raw_parts(src.cast_const(), page);
                    let b = std::slice::from_raw_parts(dst.cast_const(), page);
                    if a != b {
                        std::ptr::copy_nonoverlapping(src, dst, page);
                        changed += 1;
                    }
                }
            }
        }
        changed
    }
}

/// The bits of word `word` (pages `64 * word..`) that are pages of a `pages`-page
/// device memory.
fn page_mask(pages: usize, word: usize) -> u64 {
    match pages.saturating_sub(word * 64) {
        0 => 0,
        n if n >= 64 => !0,
        n => (1u64 << n) - 1,
    }
}

/// Drops `spent` (a device-memory copy nobody maps for the client) on a short-lived
/// thread, so that munmap and the freeing of its pages happen off the caller's path;
/// inline if no thread can be started.
fn drop_elsewhere(spent: Arc<Backing>) {
    // A thread that cannot start drops its closure, and with it `spent`, here.
    if let Err(e) = std::thread::Builder::new()
        .name("devmem-free".into())
        .spawn(move || drop(spent))
    {
        tracing::debug!(error = %e, "freed a device memory copy inline");
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
    /// The device's own copy, made at start-up so a freeze cannot fail; at thaw a fresh
    /// one replaces it and the spent one's pages are freed off the resume's path.
    copy: Arc<Backing>,
    frozen: bool,
    /// Bumped each time `shared` is replaced (a client left).
    attachment: u64,
    /// Bumped at each freeze and thaw.
    freezes: u64,
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
                freezes: 0,
            }),
            track: Mutex::new(Track {
                written: vec![0; pages.div_ceil(64)],
                baseline: None,
                rest: None,
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
        m.freezes += 1;
        self.track().rest = None;
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
        m.freezes += 1;
        self.track().rest = None;
        let changed = m.shared.sync_from(&m.copy);
        // The next freeze gets a fresh (empty) copy made now, and the spent one's pages
        // go back to the kernel on a thread of their own: freeing a whole device
        // memory's pages takes longer than the copy back, and sits on the resume's path
        // otherwise. If no memfd can be made now, the spent copy is emptied in place.
        match Backing::new(&format!("{}-frozen", self.name), self.size) {
            Ok(fresh) => {
                let spent = std::mem::replace(&mut m.copy, fresh);
                drop(m);
                drop_elsewhere(spent);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no fresh device memory copy; emptying the spent one");
                m.copy.release();
            }
        }
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
            t.rest = None;
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

    /// The pages a SAVE carries now, as indices in page order, and where in the list
    /// it starts: a base image's (the pages not all zeros) or a delta's (the dirty
    /// pages, [`DevMem::dirty_pages`]). For a delta of a `frozen` function (the
    /// caller knows: the function's migration state), what the last chunk left
    /// ([`DevMem::keep_rest`]) as it is: nothing changed since (any change, freeze or
    /// thaw drops it), so no pass over device memory is made per chunk.
    pub fn save_list(&self, base: bool, frozen: bool) -> (Vec<u32>, usize) {
        let rest = self.track().rest.take();
        if let Some(r) = rest.filter(|_| !base && frozen) {
            return r;
        }
        let b = self.device();
        let list = if base {
            Self::nonzero(&b).map(|i| i as u32).collect()
        } else {
            self.dirty_indices(&b)
        };
        (list, 0)
    }

    /// A chunk of a frozen function's image carried `list[..from]`: the next chunk's
    /// [`DevMem::save_list`] takes the rest.
    pub fn keep_rest(&self, list: Vec<u32>, from: usize) {
        if from < list.len() {
            self.track().rest = Some((list, from));
        }
    }

    /// Runs `f` on pages `indices`, in place, as (index, bytes) pairs: nothing copied.
    /// As with `with_page`, the bytes may change under `f` (the client's mapping, while
    /// the function runs); whoever copies them must digest its copy. An index past the
    /// end is left out.
    pub fn with_pages<T>(&self, indices: &[u32], f: impl FnOnce(&[(u32, &[u8])]) -> T) -> T {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let b = self.device();
        let pages: Vec<(u32, &[u8])> = indices
            .iter()
            .filter(|&&i| (i as usize) < b.pages())
            .map(|&i| {
                // SAFETY: as in `with_page`: page `i` lies inside the mapping `b`
                // holds (checked by the filter), which outlives the slices (they live
                // only for this call).
                let p = unsafe {
                    std::slice::from_raw_parts(b.page_ptr(i as usize).cast_const(), page)
                };
                (i, p)
            })
            .collect();
        f(&pages)
    }

    /// Runs `f` on the pages that are not all zeros (what a base image carries), in
    /// place, as (index, bytes) pairs: nothing copied, holes not read. As with
    /// `with_page`, the bytes may change under `f`; whoever copies them must digest
    /// its copy.
    pub fn with_nonzero<T>(&self, f: impl FnOnce(&[(u32, &[u8])]) -> T) -> T {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let b = self.device();
        let pages: Vec<(u32, &[u8])> = Self::nonzero(&b)
            .map(|i| {
                // SAFETY: as in `with_page`: page `i` lies inside the mapping `b`
                // holds, which outlives the slices (they live only for this call).
                let p = unsafe { std::slice::from_raw_parts(b.page_ptr(i).cast_const(), page) };
                (i as u32, p)
            })
            .collect();
        f(&pages)
    }

    /// Indices of the pages of `b` that are not all zeros; holes are not read.
    fn nonzero(b: &Backing) -> impl Iterator<Item = usize> + '_ {
        let data = b.data_pages();
        (0..b.pages())
            .filter(move |&i| data[i / 64] & (1 << (i % 64)) != 0)
            .filter(move |&i| Self::with_page(b, i, |p| !is_zero(p)))
    }

    /// Pages that are not all zeros (what a base image carries), counted in place.
    pub fn count_nonzero(&self) -> usize {
        Self::nonzero(&self.device()).count()
    }

    /// Pages a delta would carry now (see [`DevMem::dirty_pages`]), counted in place:
    /// one hashing pass, nothing copied. Without a session, every page.
    ///
    /// Of a frozen function the list found is kept for the SAVE that follows (mlx5vf
    /// sends QUERY just before its final SAVE), so stop-copy hashes device memory once,
    /// not twice: kept only if the function is still frozen and nothing the device saw
    /// was written meanwhile (a write, a LOAD, a reset, a freeze or a thaw drops it,
    /// as they drop a chunked image's rest).
    pub fn count_dirty(&self) -> usize {
        let (frozen, freezes) = {
            let m = self.maps();
            (m.frozen, m.freezes)
        };
        if !frozen {
            return self.dirty_indices(&self.device()).len();
        }
        if let Some((list, from)) = &self.track().rest {
            return list.len() - from;
        }
        let (written, baseline) = {
            let t = self.track();
            (t.written.clone(), t.baseline.clone())
        };
        let list = self.dirty_indices(&self.device());
        let n = list.len();
        let m = self.maps();
        let mut t = self.track();
        let unchanged = t.written == written && t.baseline == baseline;
        if m.frozen && m.freezes == freezes && t.rest.is_none() && unchanged {
            t.rest = Some((list, 0));
        }
        n
    }

    /// The pages [`DevMem::dirty_pages`] would copy, found in place (one hashing pass
    /// over the pages with data; a hole is zeros, its digest known without reading).
    fn dirty_indices(&self, b: &Backing) -> Vec<u32> {
        let (written, baseline) = {
            let t = self.track();
            (t.written.clone(), t.baseline.clone())
        };
        let Some(baseline) = baseline else {
            return (0..self.pages() as u32).collect();
        };
        let data = b.data_pages();
        let zero = zero_digest();
        let bit = |v: &[u64], i: usize| v.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
        (0..self.pages())
            .filter(|&i| {
                let digest = || {
                    if bit(&data, i) {
                        Self::with_page(b, i, page_digest)
                    } else {
                        zero
                    }
                };
                bit(&written, i) || baseline.get(i).is_none_or(|&d| digest() != d)
            })
            .map(|i| i as u32)
            .collect()
    }

    /// Whether a save session (a baseline) is open.
    pub fn tracking(&self) -> bool {
        self.track().baseline.is_some()
    }

    /// Pages that differ from the baseline (or were written by a path the device sees),
    /// copied, in page order. Without a baseline, every page.
    pub fn dirty_pages(&self) -> Result<Vec<PageCopy>, DevMemError> {
        self.dirty_indices(&self.device())
            .into_iter()
            .map(|i| self.copy_page(i))
            .collect()
    }

    /// Opens a new save session whose destination has nothing but zeros yet: the
    /// baseline becomes the zero-page digest everywhere, and the written bits clear.
    /// Pages then count as dirty exactly when they are not all zeros.
    pub fn begin_session(&self) {
        let zero = zero_digest();
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
        let Track {
            written, baseline, ..
        } = &mut *t;
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

    /// Applies a LOAD at once: [`DevMem::stage`], every page of `pages` put, committed.
    pub fn apply(&self, zero_rest: bool, pages: &[(u32, &[u8])]) {
        let mut s = self.stage();
        for &(index, data) in pages {
            s.put(index, data);
        }
        s.commit(zero_rest);
    }

    /// Starts writing a LOAD's pages as its image streams in (see [`Staging`]), into
    /// the memory the device uses now (its own copy while frozen, as during a LOAD).
    pub fn stage(&self) -> Staging<'_> {
        let b = self.device();
        let words = self.pages().div_ceil(64);
        Staging {
            mem: self,
            carried: vec![0; words],
            changed: vec![0; words],
            data: vec![0; words],
            probed: vec![0; words.div_ceil(64)],
            b,
            saved_index: Vec::new(),
            saved: Vec::new(),
            done: false,
        }
    }

    /// Fills device memory with zeros (marking every page written): the pages are
    /// given back to the kernel (a hole reads as zeros and costs no memory), or, where
    /// the file cannot punch holes, written with zeros.
    pub fn zero(&self) -> Result<(), DevMemError> {
        let b = self.device();
        if !b.punch(0, b.region.len()) {
            b.zero_data();
        }
        let mut t = self.track();
        t.rest = None;
        t.written.iter_mut().for_each(|w| *w = !0);
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
            // Holes again (nothing faulted in: device memory may be 16 GiB, mostly
            // holes); where the file cannot punch, zeros written over the data extents.
            if !b.punch(0, b.region.len()) {
                b.zero_data();
            }
        }
        let mut t = self.track();
        t.baseline = None;
        t.rest = None;
        t.written.iter_mut().for_each(|w| *w = 0);
    }
}

/// A LOAD's pages written into device memory as the image streams in, so the image is
/// read once (and never copied whole), yet nothing stays changed unless the whole image
/// checks out: each page put saves what it overwrites (only when that is not zeros,
/// which a fresh destination is), and dropping the staging without [`Staging::commit`]
/// puts every such page back and turns the others to zeros again, leaving device
/// memory byte for byte as it was. Dirty-tracking bits are set only at commit.
///
/// The function is responder-suspended while a LOAD runs, so device-visible writes are
/// refused meanwhile; none of device memory's locks is held between the calls (the
/// image is read by DMA between them).
pub struct Staging<'a> {
    mem: &'a DevMem,
    /// The backing written (the device's when the staging began).
    b: Arc<Backing>,
    /// One bit per page put.
    carried: Vec<u64>,
    /// One bit per page put whose bytes changed (what undoing touches).
    changed: Vec<u64>,
    /// One bit per page that held memory before it was put (the others are holes:
    /// zeros, nothing to save, written through the file), known for the words of 64
    /// pages `probed` says: each looked up once, just before its first page is put, so
    /// a LOAD costs in proportion to its own pages, not to all the device memory
    /// already written (a 16 GiB function takes thousands of chunk LOADs).
    data: Vec<u64>,
    /// One bit per word of `data` looked up.
    probed: Vec<u64>,
    /// Pages overwritten that were not zeros, and their bytes (4 KiB each, in order).
    saved_index: Vec<u32>,
    saved: Vec<u8>,
    done: bool,
}

impl Staging<'_> {
    /// Looks up which pages of word `w` (pages `64 w .. 64 w + 64`) hold memory, once.
    fn probe(&mut self, w: usize) {
        let Some(p) = self.probed.get_mut(w / 64) else {
            return;
        };
        if *p & (1 << (w % 64)) != 0 {
            return;
        }
        *p |= 1 << (w % 64);
        self.b.data_in(w * 64, 64, &mut self.data);
    }

    /// Writes page `index`. An index past the end, a page of the wrong length or a
    /// page already put is ignored (the image decoder refuses those first). A page
    /// that already holds these bytes is only compared, not written (a LOAD over the
    /// same contents, such as a delta page whose change was undone, saves nothing).
    pub fn put(&mut self, index: u32, data: &[u8]) {
        let page = DEV_MEM_PAGE_SIZE as usize;
        let i = index as usize;
        if i >= self.mem.pages() || data.len() != page {
            return;
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.carried[word] & bit != 0 {
            return;
        }
        self.probe(word);
        self.carried[word] |= bit;
        if self.data[word] & bit == 0 && self.b.write_page_through_file(i, data) {
            self.changed[word] |= bit;
            return;
        }
        let keep = DevMem::with_page(&self.b, i, |p| {
            if is_zero(p) {
                Some(false)
            } else if p == data {
                None
            } else {
                self.saved_index.push(index);
                self.saved.extend_from_slice(p);
                Some(true)
            }
        });
        if keep.is_none() {
            return;
        }
        self.changed[word] |= bit;
        // SAFETY: page `i` lies inside our mapping of the size-sealed memfd, which
        // lives as long as `self.mem`; `data` is other memory (the image), so the
        // ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.b.page_ptr(i), page) };
    }

    /// [`Staging::put`] of every page of `pages`, in order; runs of consecutive pages
    /// that land in holes are written through the file together (one `pwritev` each:
    /// the kernel allocates their memory without faulting or zeroing it).
    pub fn put_all(&mut self, pages: &[(u32, &[u8])]) {
        let page = DEV_MEM_PAGE_SIZE as usize;
        for &(index, _) in pages {
            if (index as usize) < self.mem.pages() {
                self.probe(index as usize / 64);
            }
        }
        let mut i = 0;
        while i < pages.len() {
            let hole = |&(index, data): &(u32, &[u8])| {
                let x = index as usize;
                x < self.mem.pages()
                    && data.len() == page
                    && (self.carried[x / 64] | self.data[x / 64]) & (1 << (x % 64)) == 0
            };
            let mut j = i;
            while j < pages.len() && hole(&pages[j]) && (j == i || pages[j].0 == pages[j - 1].0 + 1)
            {
                j += 1;
            }
            if j - i < 2 {
                self.put(pages[i].0, pages[i].1);
                i += 1;
                continue;
            }
            let run: Vec<&[u8]> = pages[i..j].iter().map(|p| p.1).collect();
            let through_file = self.b.write_pages_through_file(pages[i].0 as usize, &run);
            for &(index, data) in &pages[i..j] {
                let x = index as usize;
                self.carried[x / 64] |= 1 << (x % 64);
                // Holes before: undoing turns them to zeros again, whatever landed.
                self.changed[x / 64] |= 1 << (x % 64);
                if !through_file {
                    // SAFETY: page `x` lies inside our mapping of the size-sealed
                    // memfd (checked by `hole`); `data` is the image, other memory.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr(), self.b.page_ptr(x), page)
                    };
                }
            }
            i = j;
        }
    }

    /// Drops what was put without restoring what it overwrote: the pages put turn to
    /// zeros (a reset came meanwhile and zeroed the rest; the old bytes must not come
    /// back).
    pub fn discard(mut self) {
        self.saved_index.clear();
        self.saved.clear();
        // Drop now zeros the pages it changed and restores nothing.
    }

    /// Pages put so far.
    pub fn count(&self) -> usize {
        self.carried.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Keeps what was put and, when `zero_rest` (a base image replaces all of device
    /// memory), turns every page not put to zeros (a page already zero is only read).
    /// Every page touched is marked written.
    pub fn commit(mut self, zero_rest: bool) {
        self.done = true;
        let page = DEV_MEM_PAGE_SIZE as usize;
        let mem = self.mem;
        let mut t = mem.track();
        t.rest = None;
        for (w, c) in t.written.iter_mut().zip(&self.carried) {
            *w |= c;
        }
        if zero_rest {
            // One walk of the data extents (a base image comes once per migration).
            self.data = self.b.data_pages();
            let pages = mem.pages();
            // A word (64 pages) at a time: an untouched device memory's words are all
            // holes, and cost a test each.
            for (word, (&carried, &data)) in self.carried.iter().zip(&self.data).enumerate() {
                let mask = page_mask(pages, word);
                let rest = !carried & mask;
                let mut read = data & rest;
                while read != 0 {
                    let i = word * 64 + read.trailing_zeros() as usize;
                    read &= read - 1;
                    // A hole is zeros already, and is not read (reading would fault it in).
                    if !DevMem::with_page(&self.b, i, is_zero) {
                        // SAFETY: page `i` lies inside our mapping (`page_ptr`).
                        unsafe { std::ptr::write_bytes(self.b.page_ptr(i), 0, page) };
                    }
                }
                t.written[word] |= rest;
            }
        }
    }
}

impl Drop for Staging<'_> {
    /// Undoes every page put: zeros first, then the saved pages back over them (rare:
    /// only a refused image gets here).
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let page = DEV_MEM_PAGE_SIZE as usize;
        for (word, &bits) in self.changed.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let i = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                // SAFETY: a changed page lies inside our mapping (`page_ptr`).
                unsafe { std::ptr::write_bytes(self.b.page_ptr(i), 0, page) };
            }
        }
        for (&i, old) in self.saved_index.iter().zip(self.saved.chunks_exact(page)) {
            // SAFETY: as above; `old` is our own saved copy, other memory.
            unsafe {
                std::ptr::copy_nonoverlapping(old.as_ptr(), self.b.page_ptr(i as usize), page)
            };
        }
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
    fn a_frozen_query_s_dirty_list_serves_the_next_save_unless_something_was_written() {
        let m = DevMem::new("t", 64 << 10).unwrap();
        m.begin_session();
        m.write(3 * 4096, &[1]).unwrap();
        m.freeze();
        assert_eq!(m.count_dirty(), 1);
        // Kept: the SAVE takes the QUERY's list (and a second QUERY counts it again).
        assert_eq!(m.count_dirty(), 1);
        assert_eq!(m.save_list(false, true), (vec![3], 0));
        // A write the device sees between the QUERY and the SAVE drops the list.
        assert_eq!(m.count_dirty(), 1);
        m.write(7 * 4096, &[2]).unwrap();
        assert_eq!(m.save_list(false, true), (vec![3, 7], 0));
        // A thaw drops it too, and a running function keeps nothing.
        assert_eq!(m.count_dirty(), 2);
        m.thaw();
        assert_eq!(m.save_list(false, false).0, vec![3, 7]);
        m.write(9 * 4096, &[3]).unwrap();
        assert_eq!(m.count_dirty(), 3);
        assert_eq!(m.save_list(false, false).0, vec![3, 7, 9]);
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
    #[test]
    fn a_staged_load_not_committed_leaves_device_memory_as_it_was() {
        let m = DevMem::new("t", 64 << 10).unwrap();
        m.write(2 * 4096, &[9u8; 4096]).unwrap();
        m.write(5 * 4096 + 100, &[4u8; 10]).unwrap();
        let one = [7u8; 4096];
        m.write(3 * 4096, &one).unwrap();
        let mut before = vec![0u8; 64 << 10];
        m.read(0, &mut before).unwrap();
        // Out of order, over zeros, over data and over the same bytes, one twice.
        let mut s = m.stage();
        for i in [5, 1, 2, 9, 5, 3] {
            s.put(i, &one);
        }
        assert_eq!(s.count(), 5);
        let mut mid = vec![0u8; 64 << 10];
        m.read(0, &mut mid).unwrap();
        assert_eq!(&mid[5 * 4096..6 * 4096], &one[..]);
        drop(s);
        let mut after = vec![0u8; 64 << 10];
        m.read(0, &mut after).unwrap();
        assert!(after == before, "device memory changed");
        // Discarded (a reset came meanwhile): what was put is zeros, nothing restored.
        let mut s = m.stage();
        s.put(2, &one);
        s.discard();
        m.read(0, &mut after).unwrap();
        assert!(after[2 * 4096..3 * 4096].iter().all(|&b| b == 0));
        // Committed: the pages stay, and a base turns the rest to zeros.
        let mut s = m.stage();
        s.put(1, &one);
        s.commit(true);
        m.read(0, &mut after).unwrap();
        assert!(after
            .chunks(4096)
            .enumerate()
            .all(|(i, p)| p == if i == 1 { &one[..] } else { &[0u8; 4096][..] }));
    }

    /// Bytes of memory the memfd holds.
    fn resident(m: &DevMem) -> u64 {
        use std::os::unix::fs::MetadataExt;
        m.device().file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn scans_and_loads_leave_untouched_pages_holes() {
        let size = 64u64 << 20;
        let m = DevMem::new("t", size).unwrap();
        m.write(7 * 4096, &[1u8; 4096]).unwrap();
        assert!(resident(&m) <= 64 << 10, "{}", resident(&m));
        assert_eq!(m.count_nonzero(), 1);
        assert_eq!(
            m.with_nonzero(|p| p.iter().map(|p| p.0).collect::<Vec<_>>()),
            [7]
        );
        assert_eq!(m.count_dirty(), (size / 4096) as usize);
        m.begin_session();
        assert_eq!(m.count_dirty(), 1);
        // A base LOAD of two pages over it: one through the file into a hole.
        let one = [5u8; 4096];
        let mut s = m.stage();
        s.put(9, &one);
        s.put(7, &one);
        s.commit(true);
        let mut b = [0u8; 4096];
        m.read(9 * 4096, &mut b).unwrap();
        assert_eq!(b, one);
        m.read(7 * 4096, &mut b).unwrap();
        assert_eq!(b, one);
        assert_eq!(m.count_nonzero(), 2);
        assert!(resident(&m) <= 64 << 10, "{}", resident(&m));
        // Undone, the page written through the file is zeros again.
        let mut s = m.stage();
        s.put(11, &one);
        drop(s);
        m.read(11 * 4096, &mut b).unwrap();
        assert_eq!(b, [0u8; 4096]);
        m.zero().unwrap();
        assert_eq!(resident(&m), 0);
        assert_eq!(m.count_nonzero(), 0);
    }
}
