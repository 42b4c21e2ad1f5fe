//! Guest memory: a memfd, DMA-mapped into a function over vfio-user, read and written
//! by the test as the guest's RAM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vfu::uapi::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};

/// A fresh memfd of `size` bytes (not mapped anywhere).
pub fn memfd(name: &str, size: u64) -> File {
    vfu::dma::memfd(name, size).expect("memfd")
}

/// `size` bytes of guest memory at `iova`, backed by a memfd.
pub struct GuestMem {
    file: File,
    iova: u64,
    size: u64,
}

impl GuestMem {
    /// A memfd of `size` bytes meant for `iova` (not mapped yet).
    pub fn new(name: &str, iova: u64, size: u64) -> GuestMem {
        GuestMem {
            file: memfd(name, size),
            iova,
            size,
        }
    }

    /// A memfd DMA-mapped read-write at `iova` into `client`'s function.
    pub fn mapped(client: &mut vfu::Client, name: &str, iova: u64, size: u64) -> GuestMem {
        let m = GuestMem::new(name, iova, size);
        m.map(client);
        m
    }

    /// DMA_MAP of the whole memfd at its IOVA, read-write.
    pub fn map(&self, client: &mut vfu::Client) {
        client
            .dma_map(
                self.iova,
                self.size,
                self.file.as_raw_fd(),
                0,
                VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            )
            .expect("DMA_MAP of guest memory");
    }

    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The IOVA of byte `off` of the memfd.
    pub fn iova_of(&self, off: u64) -> u64 {
        self.iova + off
    }

    /// The memfd offset of `iova` (which must lie inside it).
    pub fn offset_of(&self, iova: u64) -> u64 {
        assert!(
            (self.iova..self.iova + self.size).contains(&iova),
            "IOVA {iova:#x} outside guest memory"
        );
        iova - self.iova
    }

    /// Writes `data` at memfd offset `off`.
    pub fn write(&self, off: u64, data: &[u8]) {
        self.file
            .write_all_at(data, off)
            .expect("guest memory write");
    }

    /// Reads `len` bytes at memfd offset `off`.
    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.file
            .read_exact_at(&mut v, off)
            .expect("guest memory read");
        v
    }

    /// A second handle on the same memory (for another thread).
    pub fn try_clone(&self) -> GuestMem {
        GuestMem {
            file: self.file.try_clone().expect("dup memfd"),
            iova: self.iova,
            size: self.size,
        }
    }
}
