//! The DEV_MEM section: device-memory pages. The head, the page table (each page's
//! index), zeros up to a 4 KiB image offset, then the pages' bytes: every page on a
//! 4 KiB boundary of the image, one checksum block by itself.

use mlx5_prm::state_image::{DevMemHead, PageEntryHead, DEV_MEM_HEAD_LEN, PAGE_ENTRY_HEAD_LEN};
use zerocopy::FromZeros;

use super::codec::{bad, zeroed, R, W};
use super::{PageImage, StateError, PAGE_ENTRY_LEN};
use crate::devmem::DEV_MEM_PAGE_SIZE;

/// Where the parts of a DEV_MEM section of `count` pages starting at image offset
/// `start` lie: (end of the page table, start of the pages, end of the section), image
/// offsets. The pages start at the first multiple of 4 KiB at or after the table's end.
pub(crate) fn layout(start: usize, count: usize) -> (usize, usize, usize) {
    let page = DEV_MEM_PAGE_SIZE as usize;
    let table_end = start + DEV_MEM_HEAD_LEN + count * PAGE_ENTRY_HEAD_LEN;
    let data = table_end.div_ceil(page) * page;
    (table_end, data, data + count * page)
}

/// Appends the section's head, page table and padding for `indices` to `w`, which
/// holds the image from its start (so its length is the section's image offset).
pub(super) fn encode_head(w: &mut W, indices: impl ExactSizeIterator<Item = u32>) {
    let count = indices.len();
    let (_, data, _) = layout(w.0.len(), count);
    let mut head = DevMemHead::new_zeroed();
    head.page_size.set(DEV_MEM_PAGE_SIZE as u32);
    // At most MAX_DEV_MEM_SIZE / 4 KiB pages.
    head.count.set(count as u32);
    w.put(&head);
    for index in indices {
        w.bytes(&entry_head(index));
    }
    w.0.resize(data, 0);
}

/// The page-table entry of page `index`.
pub(super) fn entry_head(index: u32) -> [u8; PAGE_ENTRY_HEAD_LEN] {
    let mut e = PageEntryHead::new_zeroed();
    e.index.set(index);
    let mut b = [0u8; PAGE_ENTRY_HEAD_LEN];
    b.copy_from_slice(zerocopy::IntoBytes::as_bytes(&e));
    b
}

/// Decodes the section's head: the page size, and the page count, whose table,
/// padding and pages must fill the `len`-byte section at image offset `start` exactly.
/// Returns the count.
pub(super) fn head(b: &[u8], start: usize, len: usize) -> Result<usize, StateError> {
    let mut r = R::new(b, "DEV_MEM");
    let head: DevMemHead = r.get("DEV_MEM head")?;
    let page_size = head.page_size.get();
    if u64::from(page_size) != DEV_MEM_PAGE_SIZE {
        return Err(bad("device-memory page size", page_size.into(), "4096"));
    }
    let rest = len.saturating_sub(DEV_MEM_HEAD_LEN);
    let count = head.count.get();
    // Each page takes its table entry and its bytes; the padding is below 4 KiB.
    let per_page = PAGE_ENTRY_LEN as u64;
    if u64::from(count).saturating_mul(per_page) > rest as u64 {
        return Err(StateError::Truncated {
            section: "DEV_MEM",
            what: "page table and pages",
            need: u64::from(count).saturating_mul(per_page),
            have: rest,
        });
    }
    // count * 4104 <= len: no overflow below.
    let (_, _, end) = layout(start, count as usize);
    let need = (end - start) as u64;
    if need > len as u64 {
        return Err(StateError::Truncated {
            section: "DEV_MEM",
            what: "page table, padding and pages",
            need,
            have: len,
        });
    }
    if need < len as u64 {
        return Err(StateError::Trailing {
            section: "DEV_MEM",
            left: len - need as usize,
        });
    }
    Ok(count as usize)
}

/// Checks the padding between the page table and the pages: zeros.
pub(super) fn padding(b: &[u8]) -> Result<(), StateError> {
    zeroed(b, "DEV_MEM padding")
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

/// Decodes the section at image offset `start` of a function with `dev_mem_size`
/// bytes of device memory: each index below the page count and present once.
pub(super) fn decode(
    b: &[u8],
    start: usize,
    dev_mem_size: u64,
) -> Result<Vec<PageImage>, StateError> {
    let n = head(b, start, b.len())?;
    let (table_end, data, _) = layout(start, n);
    let (table_end, data) = (table_end - start, data - start);
    let mut r = R::new(&b[DEV_MEM_HEAD_LEN..table_end], "DEV_MEM");
    let mut seen = Seen::new(dev_mem_size);
    let mut pages = Vec::with_capacity(n);
    for k in 0..n {
        let e: PageEntryHead = r.get("page table entry")?;
        let index = seen.entry(&e)?;
        let at = data + k * DEV_MEM_PAGE_SIZE as usize;
        let data = b[at..at + DEV_MEM_PAGE_SIZE as usize].into();
        pages.push(PageImage { index, data });
    }
    r.end()?;
    padding(&b[table_end..data])?;
    Ok(pages)
}
