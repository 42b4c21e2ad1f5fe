//! Device memory (BAR2): seeded patterns written and read either through vfio-user
//! (as a guest or VMM does) or on the emulator's side, and BAR2 mmapped through the
//! region's fd as a VMM maps it.

use std::os::fd::AsRawFd;

use mlx5_emulator::Function;
use vfu::uapi::VFIO_PCI_BAR2_REGION_INDEX;

/// BAR2: device memory.
pub const BAR2: u32 = VFIO_PCI_BAR2_REGION_INDEX;

/// `len` seeded bytes (xorshift64; a zero seed is replaced, it would give zeros):
/// the pattern the guest-side migration tool writes too.
pub use mlx5_kmig::codec::pattern;

/// The size of BAR2 as the client sees it.
pub fn bar2_size(c: &mut vfu::Client) -> usize {
    let size = c.region_info(BAR2).expect("BAR2 info").size;
    assert!(size > 0, "the function has no device memory in BAR2");
    size as usize
}

/// Fills all of BAR2 with [`pattern`]`(seed)` through REGION_WRITE; returns it.
pub fn fill_bar2(c: &mut vfu::Client, seed: u64) -> Vec<u8> {
    let data = pattern(bar2_size(c), seed);
    c.region_write(BAR2, 0, &data).expect("BAR2 write");
    data
}

/// All of BAR2 through REGION_READ.
pub fn read_bar2(c: &mut vfu::Client) -> Vec<u8> {
    let mut v = vec![0u8; bar2_size(c)];
    c.region_read(BAR2, 0, &mut v).expect("BAR2 read");
    v
}

/// Fills `f`'s device memory with [`pattern`]`(seed)` on the emulator's side.
pub fn fill(f: &Function, seed: u64) -> Vec<u8> {
    let d = pattern(f.devmem().size() as usize, seed);
    f.devmem().write(0, &d).expect("device memory write");
    d
}

/// Writes `data` at `off` of `f`'s device memory on the emulator's side.
pub fn write(f: &Function, off: u64, data: &[u8]) {
    f.devmem().write(off, data).expect("device memory write");
}

/// `f`'s whole device memory, read on the emulator's side.
pub fn dev_mem(f: &Function) -> Vec<u8> {
    let mut m = vec![0u8; f.devmem().size() as usize];
    f.devmem().read(0, &mut m).expect("device memory read");
    m
}

/// BAR2 mapped through the region info's fd and sparse area, as a VMM maps it.
pub struct Bar2Map {
    ptr: *mut u8,
    len: usize,
}

impl Bar2Map {
    pub fn new(client: &mut vfu::Client) -> Bar2Map {
        let info = client.region_info(BAR2).expect("BAR2 info");
        assert_eq!(
            info.sparse_areas,
            vec![(0, info.size)],
            "one area over all of BAR2"
        );
        let fd = info.fd.expect("BAR2 offers an fd");
        let len = info.size as usize;
        // SAFETY: a fresh shared mapping of the memfd the server sent; nothing else
        // owns the address range, and it is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                info.offset as libc::off_t,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of BAR2");
        Bar2Map {
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len, "read past BAR2");
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of our own mapping; plain shared memory, only copied.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), len) };
        out
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len, "write past BAR2");
        // SAFETY: in bounds of our own mapping; the bytes are plain memory shared with
        // the device, which only copies them.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }
}

impl Drop for Bar2Map {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn patterns_are_seeded_and_never_all_zero() {
        assert_eq!(pattern(100, 7), pattern(100, 7));
        assert_ne!(pattern(100, 7), pattern(100, 8));
        assert_eq!(pattern(13, 7), pattern(100, 7)[..13]);
        assert!(pattern(64, 0).iter().any(|&b| b != 0));
    }
}
