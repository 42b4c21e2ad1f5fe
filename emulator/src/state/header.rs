//! The image header and section table (`mlx5_prm::state_image::{ImageHeader,
//! SectionEntry}`): checked completely — length, magic, version, checksum, every
//! enumerated field, the table's bounds and overlaps — before any section is read.
//! [`framing`] checks all of it but the checksum from the image's first bytes, for a
//! reader that takes the image in pieces and checks the sum as the pieces pass.

use mlx5_prm::state_image::{
    self as wire, SectionEntry, CHECKSUM_LEN, HEADER_LEN, MAGIC, MAX_SECTIONS, SECTION_ENTRY_LEN,
    SECTION_MANDATORY, VERSION,
};
use zerocopy::{FromBytes, FromZeros};

use super::{ImageHeader, ImageKind, StateError, MAX_IMAGE_LEN};
use crate::devmem::MAX_DEV_MEM_SIZE;

/// One entry of the section table, checked to lie inside the payload.
#[derive(Debug, Clone, Copy)]
pub(super) struct Section<'a> {
    /// The raw tag (an unknown optional tag is legal).
    pub tag: u16,
    pub mandatory: bool,
    /// Image offset of the section's first byte.
    pub start: usize,
    pub bytes: &'a [u8],
}

/// Where a section lies: a [`Section`] without its bytes (an image read in pieces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub index: usize,
    pub tag: u16,
    pub mandatory: bool,
    pub start: usize,
    pub len: usize,
}

/// The header and section table of an image, checked against its length.
#[derive(Debug, Clone)]
pub(super) struct Framing {
    pub header: ImageHeader,
    pub spans: Vec<Span>,
    /// Where the body ends and the checksum starts.
    pub body_end: usize,
}

/// Bytes of an image of `len` bytes that [`framing`] reads: the header and the largest
/// section table, as far as the image goes.
pub(super) fn prefix_len(len: usize) -> usize {
    len.min(HEADER_LEN + MAX_SECTIONS * SECTION_ENTRY_LEN)
}

fn bad_header(field: &'static str, got: u64, want: &'static str) -> StateError {
    StateError::BadHeader { field, got, want }
}

/// The fixed header of an image of `len` bytes whose first bytes are `prefix`: length,
/// magic, version, header length and total length checked.
fn fixed(prefix: &[u8], len: usize) -> Result<wire::ImageHeader, StateError> {
    let min = HEADER_LEN + CHECKSUM_LEN;
    let bad_len = StateError::BadLength {
        len,
        min,
        max: MAX_IMAGE_LEN,
    };
    if len < min || len > MAX_IMAGE_LEN {
        return Err(bad_len);
    }
    let (h, _) = wire::ImageHeader::read_from_prefix(prefix).map_err(|_| bad_len)?;
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
    if h.total_len.get() != len as u64 {
        return Err(StateError::LengthMismatch {
            claimed: h.total_len.get(),
            got: len,
        });
    }
    Ok(h)
}

/// Checks the framing of an image of `len` bytes from its first [`prefix_len`] bytes,
/// everything but the checksum (which needs the whole body: [`super::sum::Sum`]).
pub(super) fn framing(prefix: &[u8], len: usize) -> Result<Framing, StateError> {
    let h = fixed(prefix, len)?;
    let body_end = len - CHECKSUM_LEN;
    let header = decode(&h)?;
    let spans = table(prefix, &h, body_end)?;
    Ok(Framing {
        header,
        spans,
        body_end,
    })
}

/// Checks the framing of `bytes` and returns the decoded header and the section table.
pub(super) fn check(bytes: &[u8]) -> Result<(ImageHeader, Vec<Section<'_>>), StateError> {
    fixed(bytes, bytes.len())?;
    let body_end = bytes.len() - CHECKSUM_LEN;
    let want = super::sum::checksum(&bytes[..body_end]);
    let got = stored_sum(&bytes[body_end..]);
    if got != want {
        return Err(StateError::Checksum { got, want });
    }
    let f = framing(&bytes[..prefix_len(bytes.len())], bytes.len())?;
    let sections = f
        .spans
        .iter()
        .map(|s| Section {
            tag: s.tag,
            mandatory: s.mandatory,
            start: s.start,
            bytes: &bytes[s.start..s.start + s.len],
        })
        .collect();
    Ok((f.header, sections))
}

/// The checksum an image carries in its last [`CHECKSUM_LEN`] bytes.
pub(super) fn stored_sum(tail: &[u8]) -> u64 {
    let mut sum = [0u8; CHECKSUM_LEN];
    sum.copy_from_slice(&tail[..CHECKSUM_LEN]);
    u64::from_le_bytes(sum)
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
fn table(prefix: &[u8], h: &wire::ImageHeader, body_end: usize) -> Result<Vec<Span>, StateError> {
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
    // payload_start <= body_end and the prefix covers the largest table or the image.
    let raw = &prefix[HEADER_LEN..payload_start];
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
        sections.push(Span {
            index,
            tag,
            mandatory: e.is_mandatory(),
            start,
            len: end - start,
        });
    }
    let mut by_offset = sections.clone();
    by_offset.sort_by_key(|s| (s.start, s.start + s.len));
    for w in by_offset.windows(2) {
        if w[1].start < w[0].start + w[0].len {
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
