//! The image header and section table (`mlx5_prm::state_image::{ImageHeader,
//! SectionEntry}`): checked completely — length, magic, version, checksum, every
//! enumerated field, the table's bounds and overlaps — before any section is read.

use mlx5_prm::state_image::{
    self as wire, SectionEntry, CHECKSUM_LEN, HEADER_LEN, MAGIC, MAX_SECTIONS, SECTION_ENTRY_LEN,
    SECTION_MANDATORY, VERSION,
};
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::{FromBytes, FromZeros};

use super::{ImageHeader, ImageKind, StateError, MAX_IMAGE_LEN};
use crate::devmem::MAX_DEV_MEM_SIZE;

/// One entry of the section table, checked to lie inside the payload.
#[derive(Debug, Clone, Copy)]
pub(super) struct Section<'a> {
    /// Position in the table.
    pub index: usize,
    /// The raw tag (an unknown optional tag is legal).
    pub tag: u16,
    pub mandatory: bool,
    pub start: usize,
    pub bytes: &'a [u8],
}

fn bad_header(field: &'static str, got: u64, want: &'static str) -> StateError {
    StateError::BadHeader { field, got, want }
}

/// Checks the framing of `bytes` and returns the decoded header and the section table.
pub(super) fn check(bytes: &[u8]) -> Result<(ImageHeader, Vec<Section<'_>>), StateError> {
    let min = HEADER_LEN + CHECKSUM_LEN;
    if bytes.len() < min || bytes.len() > MAX_IMAGE_LEN {
        return Err(StateError::BadLength {
            len: bytes.len(),
            min,
            max: MAX_IMAGE_LEN,
        });
    }
    let (h, _) = wire::ImageHeader::read_from_prefix(bytes).map_err(|_| StateError::BadLength {
        len: bytes.len(),
        min,
        max: MAX_IMAGE_LEN,
    })?;
    if h.magic != MAGIC {
        return Err(StateError::BadMagic { got: h.magic });
    }
    if h.version.get() != VERSION {
        return Err(StateError::BadVersion {
            got: h.version.get(),
            want: VERSION,
        });
    }
    if usize::from(h.header_len.get()) != HEADER_LEN {
        return Err(bad_header("header_len", h.header_len.get().into(), "64"));
    }
    if h.total_len.get() != bytes.len() as u64 {
        return Err(StateError::LengthMismatch {
            claimed: h.total_len.get(),
            got: bytes.len(),
        });
    }
    let body_end = bytes.len() - CHECKSUM_LEN;
    let want = xxh3_64(&bytes[..body_end]);
    let mut sum = [0u8; CHECKSUM_LEN];
    sum.copy_from_slice(&bytes[body_end..]);
    let got = u64::from_le_bytes(sum);
    if got != want {
        return Err(StateError::Checksum { got, want });
    }
    let header = decode(&h)?;
    let sections = table(bytes, &h, body_end)?;
    Ok((header, sections))
}

/// The header's values, typed and checked against each other.
fn decode(h: &wire::ImageHeader) -> Result<ImageHeader, StateError> {
    let function = h
        .function()
        .map_err(|_| bad_header("function_kind", h.function_kind.into(), "0 (PF) or 1 (VF)"))?;
    let kind = h
        .kind()
        .map_err(|_| bad_header("image_kind", h.image_kind.into(), "0 (base) or 1 (delta)"))?;
    if let Some(&x) = h.reserved.iter().find(|&&x| x != 0) {
        return Err(bad_header("flags/reserved", x.into(), "0"));
    }
    let header = ImageHeader {
        function,
        kind,
        session: h.session.get(),
        seq: h.seq.get(),
        base_seq: h.base_seq.get(),
        dev_mem_size: h.dev_mem_size.get(),
    };
    if header.seq == 0 {
        return Err(bad_header("seq", 0, "1 or more"));
    }
    match kind {
        ImageKind::Base if header.base_seq != 0 => {
            return Err(bad_header(
                "base_seq",
                header.base_seq.into(),
                "0 in a base image",
            ))
        }
        ImageKind::Delta if header.base_seq == 0 || header.base_seq >= header.seq => {
            return Err(bad_header(
                "base_seq",
                header.base_seq.into(),
                "1..seq in a delta image",
            ))
        }
        _ => {}
    }
    if !header.dev_mem_size.is_power_of_two() || header.dev_mem_size > MAX_DEV_MEM_SIZE {
        return Err(bad_header(
            "dev_mem_size",
            header.dev_mem_size,
            "a power of two up to MAX_DEV_MEM_SIZE",
        ));
    }
    Ok(header)
}

/// The section table: every entry inside the payload, no two overlapping.
fn table<'a>(
    bytes: &'a [u8],
    h: &wire::ImageHeader,
    body_end: usize,
) -> Result<Vec<Section<'a>>, StateError> {
    let count = usize::from(h.section_count.get());
    if count > MAX_SECTIONS {
        return Err(bad_header(
            "section_count",
            count as u64,
            "at most MAX_SECTIONS",
        ));
    }
    let payload_start = HEADER_LEN + count * SECTION_ENTRY_LEN;
    if payload_start > body_end {
        return Err(StateError::Truncated {
            section: "header",
            what: "section table",
            need: payload_start as u64,
            have: body_end,
        });
    }
    let raw = &bytes[HEADER_LEN..payload_start];
    let mut sections = Vec::with_capacity(count);
    for (index, chunk) in raw.chunks_exact(SECTION_ENTRY_LEN).enumerate() {
        // chunks_exact hands out exactly SECTION_ENTRY_LEN bytes.
        let Ok(e) = SectionEntry::read_from_bytes(chunk) else {
            return Err(bad_header("section table", index as u64, "24-byte entries"));
        };
        let (tag, flags, rsvd) = (e.tag.get(), e.flags.get(), e.rsvd.get());
        let (offset, len) = (e.offset.get(), e.length.get());
        if flags & !SECTION_MANDATORY != 0 || rsvd != 0 {
            return Err(bad_header(
                "section flags/reserved",
                u64::from(flags) << 32 | u64::from(rsvd),
                "only the MANDATORY flag",
            ));
        }
        let end = offset.checked_add(len);
        let inside = offset >= payload_start as u64 && end.is_some_and(|e| e <= body_end as u64);
        if !inside {
            return Err(StateError::SectionBounds {
                index,
                tag,
                offset,
                len,
                start: payload_start,
                end: body_end,
            });
        }
        // Both fit in body_end, a usize.
        let (start, end) = (offset as usize, (offset + len) as usize);
        sections.push(Section {
            index,
            tag,
            mandatory: e.is_mandatory(),
            start,
            bytes: &bytes[start..end],
        });
    }
    let mut by_offset = sections.clone();
    by_offset.sort_by_key(|s| (s.start, s.start + s.bytes.len()));
    for w in by_offset.windows(2) {
        if w[1].start < w[0].start + w[0].bytes.len() {
            return Err(StateError::SectionOverlap {
                a: w[0].index,
                b: w[1].index,
            });
        }
    }
    Ok(sections)
}

/// The wire header of an image of `total` bytes with `sections` table entries.
pub(super) fn encode(h: &ImageHeader, sections: usize, total: usize) -> wire::ImageHeader {
    let mut w = wire::ImageHeader::new_zeroed();
    w.magic = MAGIC;
    w.version.set(VERSION);
    w.header_len.set(HEADER_LEN as u16);
    w.section_count.set(sections as u16);
    w.function_kind = h.function.into();
    w.image_kind = h.kind.into();
    w.total_len.set(total as u64);
    w.session.set(h.session);
    w.seq.set(h.seq);
    w.base_seq.set(h.base_seq);
    w.dev_mem_size.set(h.dev_mem_size);
    w
}
