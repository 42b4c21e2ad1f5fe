//! The DEV_MEM section: device-memory pages, each an index and 4 KiB.

use mlx5_prm::state_image::{DevMemHead, PageEntryHead, DEV_MEM_HEAD_LEN, PAGE_ENTRY_HEAD_LEN};
use zerocopy::FromZeros;

use super::codec::{bad, zeroed, R, W};
use super::{PageImage, StateError, PAGE_ENTRY_LEN};
use crate::devmem::DEV_MEM_PAGE_SIZE;

/// Appends the section's head for `count` pages to `w`.
pub(super) fn encode_head(w: &mut W, count: usize) {
    let mut head = DevMemHead::new_zeroed();
    head.page_size.set(DEV_MEM_PAGE_SIZE as u32);
    // At most MAX_DEV_MEM_SIZE / 4 KiB pages.
    head.count.set(count as u32);
    w.put(&head);
}

/// The head of page `index`'s entry (its 4 KiB follow it).
pub(super) fn entry_head(index: u32) -> [u8; PAGE_ENTRY_HEAD_LEN] {
    let mut e = PageEntryHead::new_zeroed();
    e.index.set(index);
    let mut b = [0u8; PAGE_ENTRY_HEAD_LEN];
    b.copy_from_slice(zerocopy::IntoBytes::as_bytes(&e));
    b
}

/// Decodes the section's head: the page size, and the page count, which must fill the
/// `len`-byte section exactly. Returns the count.
pub(super) fn head(b: &[u8], len: usize) -> Result<usize, StateError> {
    let mut r = R::new(b, "DEV_MEM");
    let head: DevMemHead = r.get("DEV_MEM head")?;
    let page_size = head.page_size.get();
    if u64::from(page_size) != DEV_MEM_PAGE_SIZE {
        return Err(bad("device-memory page size", page_size.into(), "4096"));
    }
    let rest = len.saturating_sub(DEV_MEM_HEAD_LEN);
    let count = head.count.get();
    let need = u64::from(count).saturating_mul(PAGE_ENTRY_LEN as u64);
    if need > rest as u64 {
        return Err(StateError::Truncated {
            section: "DEV_MEM",
            what: "page list",
            need,
            have: rest,
        });
    }
    if need < rest as u64 {
        return Err(StateError::Trailing {
            section: "DEV_MEM",
            left: rest - need as usize,
        });
    }
    Ok(count as usize)
}

/// The pages seen so far, one bit per page of a function with `dev_mem_size` bytes.
pub(super) struct Seen {
    bits: Vec<u64>,
    npages: u64,
}

impl Seen {
    pub(super) fn new(dev_mem_size: u64) -> Self {
        let npages = dev_mem_size / DEV_MEM_PAGE_SIZE;
        // npages <= MAX_DEV_MEM_SIZE / 4 KiB.
        Seen {
            bits: vec![0u64; (npages as usize).div_ceil(64)],
            npages,
        }
    }

    /// Checks one page entry's head (index below the page count and new, reserved
    /// zero) and returns its index.
    pub(super) fn entry(&mut self, e: &PageEntryHead) -> Result<u32, StateError> {
        let index = e.index.get();
        zeroed(&e.rsvd.get().to_le_bytes(), "page reserved")?;
        if u64::from(index) >= self.npages {
            return Err(bad("page index", index.into(), "below the page count"));
        }
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if self.bits[word] & bit != 0 {
            return Err(bad("page index", index.into(), "each page once"));
        }
        self.bits[word] |= bit;
        Ok(index)
    }
}

/// Decodes the pages of a function with `dev_mem_size` bytes of device memory: each
/// index below the page count and present once.
pub(super) fn decode(b: &[u8], dev_mem_size: u64) -> Result<Vec<PageImage>, StateError> {
    let n = head(b, b.len())?;
    let mut r = R::new(&b[DEV_MEM_HEAD_LEN..], "DEV_MEM");
    let mut seen = Seen::new(dev_mem_size);
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let e: PageEntryHead = r.get("page entry")?;
        let index = seen.entry(&e)?;
        let data = r.take(DEV_MEM_PAGE_SIZE, "page")?.into();
        pages.push(PageImage { index, data });
    }
    r.end()?;
    Ok(pages)
}
