//! The driver's DMA memory: one memfd, mapped into our process and DMA-mapped into the
//! function at a fixed IOVA, carved into the command queue page, 1024-aligned mailbox
//! blocks and 4 KiB pages (EQ buffers, pages given to the firmware).
//!
//! Layout of an arena of `size` bytes at `iova`:
//!
//! | offset                      | contents                                        |
//! |-----------------------------|-------------------------------------------------|
//! | 0 .. 0x1000                 | the command queue (one 4 KiB page, §3.1)        |
//! | 0x1000 .. 0x1000 + 1024·B   | B mailbox blocks, 1024-aligned (`dma_pool`)      |
//! | .. size                     | 4 KiB pages                                     |
//!
//! The device writes this memory concurrently (command outputs, status_own, EQEs), so
//! every access goes through vm-memory's volatile slices; the ownership bytes are read
//! with acquire ordering, so what the device wrote before flipping them is visible.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use mlx5_prm::cmdq::{MAILBOX_BLOCK_ALIGN, MAILBOX_BLOCK_SIZE};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// Size of the command queue page and of every page handed out.
pub const PAGE_SIZE: u64 = 4096;
/// Default arena size.
pub const DEFAULT_ARENA_SIZE: u64 = 8 << 20;
/// Default IOVA of the arena in the function's address space.
pub const DEFAULT_ARENA_IOVA: u64 = 0x1_0000_0000;
/// Default number of mailbox blocks (1 MiB of the arena).
pub const DEFAULT_MAILBOX_BLOCKS: u32 = 1024;
/// Largest arena we create (keeps offsets in `usize` and the memfd reasonable).
pub const MAX_ARENA_SIZE: u64 = 1 << 30;

/// What can go wrong with the arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("arena geometry: {0}")]
    Geometry(String),
    #[error("creating the arena memfd or mapping: {0}")]
    Io(#[from] std::io::Error),
    #[error("mapping the arena into our process: {0}")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("access of {len} bytes at IOVA {iova:#x} is outside the arena {base:#x}+{size:#x}")]
    OutOfRange {
        iova: u64,
        len: usize,
        base: u64,
        size: u64,
    },
    #[error("IOVA {iova:#x} is not a {what} this arena handed out")]
    NotAllocated { iova: u64, what: &'static str },
    #[error("volatile access failed: {0}")]
    Access(#[from] vm_memory::volatile_memory::Error),
}

/// A fixed-size-unit allocator over `count` units: a free stack plus an in-use map so
/// a double free or a foreign index is an error, not corruption.
#[derive(Debug)]
struct UnitPool {
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl UnitPool {
    fn new(count: u32) -> Self {
        UnitPool {
            // Pop from the end: hand out low indices first.
            free: (0..count).rev().collect(),
            in_use: vec![false; count as usize],
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        let i = self.free.pop()?;
        self.in_use[i as usize] = true;
        Some(i)
    }

    fn release(&mut self, i: u32) -> bool {
        match self.in_use.get_mut(i as usize) {
            Some(used) if *used => {
                *used = false;
                self.free.push(i);
                true
            }
            _ => false,
        }
    }

    fn is_used(&self, i: u32) -> bool {
        self.in_use.get(i as usize).copied().unwrap_or(false)
    }

    fn available(&self) -> usize {
        self.free.len()
    }

    fn capacity(&self) -> usize {
        self.in_use.len()
    }
}

/// Arena geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaConfig {
    /// Total bytes (a multiple of 4 KiB).
    pub size: u64,
    /// IOVA of the first byte (4 KiB aligned).
    pub iova: u64,
    /// Mailbox blocks to reserve.
    pub mailbox_blocks: u32,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        ArenaConfig {
            size: DEFAULT_ARENA_SIZE,
            iova: DEFAULT_ARENA_IOVA,
            mailbox_blocks: DEFAULT_MAILBOX_BLOCKS,
        }
    }
}

/// The driver's DMA memory.
pub struct DmaArena {
    file: File,
    region: MmapRegion<()>,
    cfg: ArenaConfig,
    mailbox_base: u64,
    page_base: u64,
    /// The allocators. A leaf lock: taken for one allocation or release at a time,
    /// never across I/O. Reads and writes of the memory itself take no lock (the
    /// device writes it concurrently anyway; every access is volatile).
    pools: Mutex<Pools>,
}

#[derive(Debug)]
struct Pools {
    blocks: UnitPool,
    pages: UnitPool,
}

impl std::fmt::Debug for DmaArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaArena")
            .field("cfg", &self.cfg)
            .field("free_blocks", &self.free_blocks())
            .field("free_pages", &self.free_pages())
            .finish()
    }
}

impl DmaArena {
    /// Creates the memfd and maps it into our process. DMA-mapping it into a function
    /// is the caller's business ([`DmaArena::file`], [`DmaArena::iova`]).
    pub fn new(cfg: ArenaConfig) -> Result<Self, ArenaError> {
        if cfg.size == 0 || cfg.size > MAX_ARENA_SIZE || !cfg.size.is_multiple_of(PAGE_SIZE) {
            return Err(ArenaError::Geometry(format!(
                "size {:#x} must be a non-zero multiple of 4 KiB up to {MAX_ARENA_SIZE:#x}",
                cfg.size
            )));
        }
        if !cfg.iova.is_multiple_of(PAGE_SIZE) || cfg.iova.checked_add(cfg.size).is_none() {
            return Err(ArenaError::Geometry(format!(
                "IOVA {:#x} must be 4 KiB aligned and leave room for {:#x} bytes",
                cfg.iova, cfg.size
            )));
        }
        let mailbox_base = PAGE_SIZE;
        let mailbox_bytes = u64::from(cfg.mailbox_blocks) * MAILBOX_BLOCK_ALIGN;
        let page_base = (mailbox_base + mailbox_bytes).next_multiple_of(PAGE_SIZE);
        if page_base > cfg.size {
            return Err(ArenaError::Geometry(format!(
                "{} mailbox blocks do not fit a {:#x}-byte arena",
                cfg.mailbox_blocks, cfg.size
            )));
        }
        let npages = u32::try_from((cfg.size - page_base) / PAGE_SIZE)
            .map_err(|_| ArenaError::Geometry("too many pages".into()))?;
        let file = vfu::dma::memfd("mlx5vf-dma", cfg.size)?;
        let region =
            MmapRegion::<()>::from_file(FileOffset::new(file.try_clone()?, 0), cfg.size as usize)
                .map_err(ArenaError::Mmap)?;
        Ok(DmaArena {
            file,
            region,
            cfg,
            mailbox_base,
            page_base,
            pools: Mutex::new(Pools {
                blocks: UnitPool::new(cfg.mailbox_blocks),
                pages: UnitPool::new(npages),
            }),
        })
    }

    /// The memfd backing the arena (to pass with DMA_MAP).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.cfg.iova
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.cfg.size
    }

    /// IOVA of the 4 KiB command queue page.
    pub fn queue_iova(&self) -> u64 {
        self.cfg.iova
    }

    fn pools(&self) -> MutexGuard<'_, Pools> {
        // The pools stay consistent under a panic (each operation is one push or pop).
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Free mailbox blocks.
    pub fn free_blocks(&self) -> usize {
        self.pools().blocks.available()
    }

    /// Free pages.
    pub fn free_pages(&self) -> usize {
        self.pools().pages.available()
    }

    /// Total pages of the page pool.
    pub fn page_capacity(&self) -> usize {
        self.pools().pages.capacity()
    }

    fn offset(&self, iova: u64, len: usize) -> Result<usize, ArenaError> {
        let err = || ArenaError::OutOfRange {
            iova,
            len,
            base: self.cfg.iova,
            size: self.cfg.size,
        };
        let off = iova.checked_sub(self.cfg.iova).ok_or_else(err)?;
        let end = off.checked_add(len as u64).ok_or_else(err)?;
        if end > self.cfg.size {
            return Err(err());
        }
        Ok(off as usize)
    }

    /// Reads `buf.len()` bytes at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), ArenaError> {
        let off = self.offset(iova, buf.len())?;
        self.region
            .as_volatile_slice()
            .read_slice(buf, off)
            .map_err(ArenaError::Access)
    }

    /// Writes `buf` at `iova`.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), ArenaError> {
        let off = self.offset(iova, buf.len())?;
        self.region
            .as_volatile_slice()
            .write_slice(buf, off)
            .map_err(ArenaError::Access)
    }

    /// Fills `len` bytes at `iova` with `byte`.
    pub fn fill(&self, iova: u64, len: usize, byte: u8) -> Result<(), ArenaError> {
        let off = self.offset(iova, len)?;
        let s = self
            .region
            .as_volatile_slice()
            .subslice(off, len)
            .map_err(ArenaError::Access)?;
        // Bounded by `len`, which was validated against the arena.
        let chunk = [byte; 512];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            s.write_slice(&chunk[..n], done)
                .map_err(ArenaError::Access)?;
            done += n;
        }
        Ok(())
    }

    /// Reads one byte with acquire ordering (ownership bytes: status_own, EQE owner).
    pub fn load_acquire(&self, iova: u64) -> Result<u8, ArenaError> {
        let off = self.offset(iova, 1)?;
        self.region
            .as_volatile_slice()
            .load::<u8>(off, Ordering::Acquire)
            .map_err(ArenaError::Access)
    }

    /// Writes one byte with release ordering (status_own hand-over to the device).
    pub fn store_release(&self, iova: u64, v: u8) -> Result<(), ArenaError> {
        let off = self.offset(iova, 1)?;
        self.region
            .as_volatile_slice()
            .store::<u8>(v, off, Ordering::Release)
            .map_err(ArenaError::Access)
    }

    /// A mailbox block (576 bytes used, 1024-aligned), or `None` if the pool is empty.
    pub fn alloc_block(&self) -> Option<u64> {
        let i = self.pools().blocks.alloc()?;
        Some(self.cfg.iova + self.mailbox_base + u64::from(i) * MAILBOX_BLOCK_ALIGN)
    }

    /// Returns a mailbox block to the pool.
    pub fn free_block(&self, iova: u64) -> Result<(), ArenaError> {
        let idx = self.block_index(iova).ok_or(ArenaError::NotAllocated {
            iova,
            what: "mailbox block",
        })?;
        if self.pools().blocks.release(idx) {
            Ok(())
        } else {
            Err(ArenaError::NotAllocated {
                iova,
                what: "mailbox block",
            })
        }
    }

    fn block_index(&self, iova: u64) -> Option<u32> {
        let rel = iova.checked_sub(self.cfg.iova + self.mailbox_base)?;
        if rel % MAILBOX_BLOCK_ALIGN != 0 {
            return None;
        }
        let i = u32::try_from(rel / MAILBOX_BLOCK_ALIGN).ok()?;
        (i < self.cfg.mailbox_blocks).then_some(i)
    }

    /// A zeroed 4 KiB page, or `None` if the pool is empty.
    pub fn alloc_page(&self) -> Option<u64> {
        let i = self.pools().pages.alloc()?;
        let iova = self.cfg.iova + self.page_base + u64::from(i) * PAGE_SIZE;
        if self.fill(iova, PAGE_SIZE as usize, 0).is_err() {
            self.pools().pages.release(i);
            return None;
        }
        Some(iova)
    }

    fn page_index(&self, iova: u64) -> Option<u32> {
        let rel = iova.checked_sub(self.cfg.iova + self.page_base)?;
        if rel % PAGE_SIZE != 0 {
            return None;
        }
        let i = u32::try_from(rel / PAGE_SIZE).ok()?;
        ((i as usize) < self.page_capacity()).then_some(i)
    }

    /// Whether `iova` is a page this arena handed out and has not got back.
    pub fn owns_page(&self, iova: u64) -> bool {
        self.page_index(iova)
            .is_some_and(|i| self.pools().pages.is_used(i))
    }

    /// Returns a page to the pool; an address that is not an outstanding page (e.g. one
    /// the device made up) is refused.
    pub fn free_page(&self, iova: u64) -> Result<(), ArenaError> {
        match self.page_index(iova) {
            Some(i) if self.pools().pages.release(i) => Ok(()),
            _ => Err(ArenaError::NotAllocated { iova, what: "page" }),
        }
    }
}

/// Size of a mailbox block as the device reads it.
pub const BLOCK_BYTES: usize = MAILBOX_BLOCK_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DmaArena {
        DmaArena::new(ArenaConfig {
            size: 64 << 10,
            iova: 0x10_0000,
            mailbox_blocks: 8,
        })
        .unwrap()
    }

    #[test]
    fn blocks_are_1024_aligned_and_pages_4k_aligned_after_the_queue() {
        let a = small();
        let b0 = a.alloc_block().unwrap();
        let b1 = a.alloc_block().unwrap();
        assert_eq!(b0, 0x10_1000);
        assert_eq!(b1 - b0, 1024);
        let p = a.alloc_page().unwrap();
        assert_eq!(p % PAGE_SIZE, 0);
        assert!(p >= 0x10_1000 + 8 * 1024);
        assert_eq!(a.page_capacity(), (64 * 1024 - 0x1000 - 0x2000) / 4096);
    }

    #[test]
    fn pools_run_dry_and_refuse_foreign_or_double_frees() {
        let a = small();
        let blocks: Vec<_> = (0..8).map(|_| a.alloc_block().unwrap()).collect();
        assert!(a.alloc_block().is_none());
        a.free_block(blocks[3]).unwrap();
        assert!(a.free_block(blocks[3]).is_err());
        assert!(a.free_block(blocks[0] + 8).is_err());
        let p = a.alloc_page().unwrap();
        assert!(a.owns_page(p));
        assert!(a.free_page(p + 0x1000 * 100).is_err());
        assert!(a.free_page(0xdead_0000).is_err());
        a.free_page(p).unwrap();
        assert!(!a.owns_page(p));
        assert!(a.free_page(p).is_err());
    }

    #[test]
    fn accesses_are_bounds_checked() {
        let a = small();
        a.write(0x10_0000, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        a.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(a.read(0xf_ffff, &mut b).is_err());
        assert!(a.read(0x10_0000 + (64 << 10) - 2, &mut b).is_err());
        assert!(a.write(u64::MAX, &[0]).is_err());
        a.store_release(0x10_0010, 0x5a).unwrap();
        assert_eq!(a.load_acquire(0x10_0010).unwrap(), 0x5a);
    }

    #[test]
    fn bad_geometry_is_refused() {
        for cfg in [
            ArenaConfig {
                size: 1000,
                ..Default::default()
            },
            ArenaConfig {
                iova: 0x1001,
                ..Default::default()
            },
            ArenaConfig {
                size: 8192,
                mailbox_blocks: 100,
                ..Default::default()
            },
        ] {
            assert!(matches!(DmaArena::new(cfg), Err(ArenaError::Geometry(_))));
        }
    }
}
