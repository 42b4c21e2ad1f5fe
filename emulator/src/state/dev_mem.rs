//! The DEV_MEM section: device-memory pages, each an index and 4 KiB.

use mlx5_prm::state_image::{DevMemHead, PageEntryHead};
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

/// Appends one page entry to `w`.
pub(super) fn encode_page(w: &mut W, index: u32, data: &[u8]) {
    let mut e = PageEntryHead::new_zeroed();
    e.index.set(index);
    w.put(&e).bytes(data);
}

/// Decodes the pages of a function with `dev_mem_size` bytes of device memory: each
/// index below the page count and present once.
pub(super) fn decode(b: &[u8], dev_mem_size: u64) -> Result<Vec<PageImage>, StateError> {
    let mut r = R::new(b, "DEV_MEM");
    let head: DevMemHead = r.get("DEV_MEM head")?;
    let page_size = head.page_size.get();
    if u64::from(page_size) != DEV_MEM_PAGE_SIZE {
        return Err(bad("device-memory page size", page_size.into(), "4096"));
    }
    let n = r.fits(head.count.get(), PAGE_ENTRY_LEN, "page list")?;
    let npages = dev_mem_size / DEV_MEM_PAGE_SIZE;
    // One bit per page of the function (npages <= MAX_DEV_MEM_SIZE / 4 KiB).
    let mut seen = vec![0u64; (npages as usize).div_ceil(64)];
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let e: PageEntryHead = r.get("page entry")?;
        let index = e.index.get();
        zeroed(&e.rsvd.get().to_le_bytes(), "page reserved")?;
        if u64::from(index) >= npages {
            return Err(bad("page index", index.into(), "below the page count"));
        }
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if seen[word] & bit != 0 {
            return Err(bad("page index", index.into(), "each page once"));
        }
        seen[word] |= bit;
        let data = r.take(DEV_MEM_PAGE_SIZE, "page")?.into();
        pages.push(PageImage { index, data });
    }
    r.end()?;
    Ok(pages)
}
