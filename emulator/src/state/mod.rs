//! The VHCA state image: what SAVE_VHCA_STATE writes and LOAD_VHCA_STATE reads.
//!
//! The image is opaque to the driver (mlx5vf only wraps it in FW_DATA records) and is
//! hostile input to LOAD: [`validate`] checks everything — magic, version, lengths,
//! checksum, the section table, every count against its cap and the bytes left — before
//! anything is handed on, and decoding never panics — and then every value through the
//! validators the live commands use (`crate::firmware::checks`: SET_ISSI, SET_HCA_CAP,
//! INIT_HCA's pages, ALLOC_UAR/PD, MANAGE_PAGES, CREATE_EQ, CREATE_MKEY), so a restored
//! function holds only what those commands could have created, and a refusal names the
//! same reason the command would have given. Only what needs the target function
//! (its kind, its device-memory size, the session order) is left to LOAD.
//!
//! # Layout
//!
//! Little-endian; the header, the section table entry and the fixed sections are typed in
//! [`mlx5_prm::state_image`] (the one codec of the layout), the variable bodies are coded
//! here, one file per section: `header` (framing, checksum, table), `hca`, `iseg`,
//! `objects`, `dev_mem`. [`validate`] runs the header check, then each section's
//! validator, then the checks across sections.
//!
//! Sections: HCA (life cycle, ISSI, the GENERAL caps page as SET_HCA_CAP left it),
//! ISEG (the init-segment state the driver programmed: command queue address and
//! `nic_interface`, so the guest's queue keeps working after the move),
//! OBJECTS (UARs, PDs, EQs with their PAS lists and indices, the command EQ, mkeys with
//! their MTT lists, firmware pages), DEV_MEM (the page table of indices, zeros to a
//! 4 KiB image offset, then the pages, each on a 4 KiB boundary). A section flagged
//! mandatory that this version does not know refuses the image; an optional one is
//! skipped.
//!
//! A *base* image replaces the function: device memory becomes zeros and then the pages
//! it carries. A *delta* image applies on top of the image `base_seq` of the same
//! session: it replaces the HCA state and objects (they are small) and writes the pages
//! it carries. Incremental pre-copy rounds and stop-copy chunks are both deltas.

mod codec;
mod dev_mem;
mod hca;
mod header;
mod iseg;
mod objects;
mod sample;
pub mod sum;

use std::collections::BTreeSet;

use mlx5_prm::cmd::caps::HCA_CAP_SIZE;
pub use mlx5_prm::state_image::{
    ImageFunction, ImageKind, LifeCycle, SectionTag, CHECKSUM_LEN,
    DEV_MEM_HEAD_LEN as DEV_MEM_SECTION_FIXED, HEADER_LEN, ISEG_SECTION_LEN, MAGIC, MAX_SECTIONS,
    SECTION_ENTRY_LEN, SECTION_MANDATORY, VERSION,
};
use mlx5_prm::state_image::{SectionEntry, HCA_SECTION_HEAD_LEN, PAGE_ENTRY_HEAD_LEN};
use zerocopy::FromBytes;

use crate::devmem::{DEV_MEM_PAGE_SIZE, MAX_DEV_MEM_SIZE};
use crate::firmware::checks::{CapsError, EqError, HcaError, PageError, PdMkeyError, UarError};
use codec::W;
pub use iseg::{CMDQ_ADDRESS_ALIGN_MASK, NIC_INTERFACE_MAX};
pub use sample::sample_image;

/// Bytes one device-memory page adds to an image: its page-table entry (u32 index, u32
/// reserved) and its 4 KiB (the DEV_MEM section also has up to 4 KiB of padding).
pub const PAGE_ENTRY_LEN: usize = PAGE_ENTRY_HEAD_LEN + DEV_MEM_PAGE_SIZE as usize;
/// Largest objects section accepted (bounds every count below).
pub const MAX_OBJECTS_LEN: usize = 16 << 20;
/// Largest image: every device-memory page plus the objects and the framing.
pub const MAX_IMAGE_LEN: usize = HEADER_LEN
    + MAX_SECTIONS * SECTION_ENTRY_LEN
    + HCA_SECTION_LEN
    + ISEG_SECTION_LEN
    + MAX_OBJECTS_LEN
    + DEV_MEM_SECTION_FIXED
    + (MAX_DEV_MEM_SIZE / DEV_MEM_PAGE_SIZE) as usize * PAGE_ENTRY_LEN
    + DEV_MEM_PAGE_SIZE as usize
    + CHECKSUM_LEN;
/// Bytes of the HCA section.
pub const HCA_SECTION_LEN: usize = HCA_SECTION_HEAD_LEN + HCA_CAP_SIZE;
/// Sections a written image has, in the order written.
const SECTIONS_WRITTEN: [SectionTag; 4] = [
    SectionTag::Hca,
    SectionTag::Iseg,
    SectionTag::Objects,
    SectionTag::DevMem,
];

/// Why an image was refused. Every variant says what was expected and what came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("image of {len} bytes: expected {min}..={max}")]
    BadLength { len: usize, min: usize, max: usize },
    #[error("bad magic {got:02x?}: expected \"MLX5VHCA\"")]
    BadMagic { got: [u8; 8] },
    #[error(
        "image version {got}: this firmware reads version {want} (an image from another \
         mlx5-emu release: save and load with the same release)"
    )]
    BadVersion { got: u16, want: u16 },
    #[error("header field {field} is {got:#x}: expected {want}")]
    BadHeader {
        field: &'static str,
        got: u64,
        want: &'static str,
    },
    #[error("total_len says {claimed} bytes, {got} came")]
    LengthMismatch { claimed: u64, got: usize },
    #[error("checksum {got:#018x} does not match the contents ({want:#018x})")]
    Checksum { got: u64, want: u64 },
    #[error("section {index} (tag {tag}) at {offset:#x}+{len:#x} lies outside the payload {start:#x}..{end:#x}")]
    SectionBounds {
        index: usize,
        tag: u16,
        offset: u64,
        len: u64,
        start: usize,
        end: usize,
    },
    #[error("sections {a} and {b} overlap")]
    SectionOverlap { a: usize, b: usize },
    #[error("unknown mandatory section tag {tag}")]
    UnknownMandatory { tag: u16 },
    #[error("section tag {tag} appears twice")]
    DuplicateSection { tag: u16 },
    #[error("required section {name} is missing")]
    MissingSection { name: &'static str },
    #[error("section {section}: {what} needs {need} bytes, {have} left")]
    Truncated {
        section: &'static str,
        what: &'static str,
        need: u64,
        have: usize,
    },
    #[error("section {section}: {left} bytes after the last field")]
    Trailing { section: &'static str, left: usize },
    #[error("{what} is {got:#x}: expected {want}")]
    BadValue {
        what: &'static str,
        got: u64,
        want: &'static str,
    },
    #[error("HCA section: {0}")]
    Hca(HcaError),
    #[error("HCA section, GENERAL caps: {0}")]
    Caps(CapsError),
    #[error("OBJECTS section, UAR: {0}")]
    Uar(UarError),
    #[error("OBJECTS section, PD: {0}")]
    Pd(PdMkeyError),
    #[error("OBJECTS section, firmware pages: {0}")]
    FwPage(PageError),
    #[error("OBJECTS section, EQ {eqn}: {source}")]
    Eq { eqn: u8, source: EqError },
    #[error("OBJECTS section, mkey {index}: {source}")]
    Mkey { index: u32, source: PdMkeyError },
    #[error("OBJECTS section, {what} {id:#x}: {source}")]
    Queue {
        what: &'static str,
        id: u32,
        source: crate::firmware::QueueError,
    },
    #[error("image is for {image:#x} bytes of device memory, the function has {function:#x}")]
    DevMemSize { image: u64, function: u64 },
    #[error("image is for a {image}, this function is a {function}")]
    FunctionKind {
        image: &'static str,
        function: &'static str,
    },
}

/// The fixed header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub function: ImageFunction,
    pub kind: ImageKind,
    pub session: u64,
    pub seq: u32,
    pub base_seq: u32,
    pub dev_mem_size: u64,
}

/// The HCA section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcaImage {
    /// Life cycle (ENABLE/INIT_HCA state).
    pub life_cycle: LifeCycle,
    pub issi: u16,
    /// The GENERAL capability page (CUR), [`HCA_CAP_SIZE`] bytes.
    pub caps: Box<[u8]>,
}

/// The ISEG section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IsegImage {
    /// `cmdq_addr_h:l` as the driver wrote it (4 KiB aligned).
    pub cmdq_address: u64,
    /// `nic_interface` (3 bits).
    pub nic_interface: u8,
}

/// An EQ and an mkey travel in the image exactly as the firmware keeps them: the
/// image codec below reads and writes their fields, and loading re-validates them.
pub use crate::firmware::{Cq as CqImage, EqState as EqImage, Mkey as MkeyImage, Qp as QpImage};

/// The OBJECTS section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectsImage {
    pub uars: Vec<u32>,
    pub pds: Vec<u32>,
    pub cmd_eq: Option<u8>,
    pub eqs: Vec<EqImage>,
    pub mkeys: Vec<MkeyImage>,
    /// Firmware pages (MANAGE_PAGES), by DMA address.
    pub fw_pages: Vec<u64>,
    /// CQs, with their producer counters.
    pub cqs: Vec<CqImage>,
    /// RC QPs, with their state, peer and consumer counters.
    pub qps: Vec<QpImage>,
}

/// One device-memory page.
#[derive(Clone, PartialEq, Eq)]
pub struct PageImage {
    pub index: u32,
    pub data: Box<[u8]>,
}

impl std::fmt::Debug for PageImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageImage({})", self.index)
    }
}

/// A whole image, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub header: ImageHeader,
    pub hca: HcaImage,
    pub iseg: IsegImage,
    pub objects: ObjectsImage,
    pub pages: Vec<PageImage>,
}

// ---------------------------------------------------------------- encoding

/// Bytes of an image whose objects section is `objects_len` bytes and that carries
/// `pages` device-memory pages.
pub fn image_len(objects_len: usize, pages: usize) -> usize {
    let dev_start = HEADER_LEN
        + SECTIONS_WRITTEN.len() * SECTION_ENTRY_LEN
        + HCA_SECTION_LEN
        + ISEG_SECTION_LEN
        + objects_len;
    dev_mem::layout(dev_start, pages).2 + CHECKSUM_LEN
}

/// The most pages an image whose objects section is `objects_len` bytes can carry in
/// `size` bytes (0 when not even the image without pages fits).
pub fn pages_fitting(objects_len: usize, size: usize) -> usize {
    let fixed = image_len(objects_len, 0);
    if size < fixed {
        return 0;
    }
    // Each page adds PAGE_ENTRY_LEN bytes, the padding moves by less than a page: the
    // answer is within one of this estimate.
    let mut n = (size - fixed) / PAGE_ENTRY_LEN + 1;
    while n > 0 && image_len(objects_len, n) > size {
        n -= 1;
    }
    n
}

/// A digest of the function state an image carries besides its pages (the HCA,
/// ISEG and OBJECTS sections as they would be encoded): equal digests, equal state.
pub fn state_digest(hca: &HcaImage, iseg: &IsegImage, objects: &ObjectsImage) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(&hca::encode(hca));
    h.update(&iseg::encode(iseg));
    h.update(&objects::encode(objects));
    h.digest()
}

/// Bytes the objects section of `o` takes.
pub fn objects_len(o: &ObjectsImage) -> usize {
    objects::encode(o).len()
}

/// Bytes [`encode_into`] hands a sink that copies each run on (a DMA write through
/// the IOVA space) at a time; the last run may be shorter.
pub const ENCODE_RUN: usize = 256 << 10;

/// Bytes [`encode_into`] hands a sink that stores each run in place into the buffer
/// (a [`vfu::Direct`] piece) at a time: twelve checksum blocks (summed three at a
/// time), small enough that the run is gathered, summed and streamed out while it is
/// in the first-level cache (runs from 24 KiB to 192 KiB measured alike here; 768 KiB,
/// past the second-level cache, took twice as long).
pub const DIRECT_RUN: usize = 12 * sum::BLOCK;

/// The parts of an image, borrowed: what [`encode_into`] writes. `pages` are
/// (index, 4 KiB of bytes) pairs.
#[derive(Debug, Clone, Copy)]
pub struct ImageParts<'a> {
    pub header: &'a ImageHeader,
    pub hca: &'a HcaImage,
    pub iseg: &'a IsegImage,
    pub objects: &'a ObjectsImage,
    pub pages: &'a [(u32, &'a [u8])],
}

/// Where [`encode_into`] writes an image, in order.
pub trait ImageSink {
    type Error;

    /// Writes the next `b.len()` bytes of the image.
    fn put(&mut self, b: &[u8]) -> Result<(), Self::Error>;

    /// Whether the sink writes in place, so that [`put_pages3`](ImageSink::put_pages3)
    /// is worth trying (else every byte goes through [`put`](ImageSink::put) in whole
    /// runs: a sink that copies on wants few, large writes).
    fn in_place(&self) -> bool {
        false
    }

    /// Writes the next three pages of the image (each [`sum::BLOCK`] bytes, the first
    /// on a 4 KiB image offset) in place, summing them as they are copied
    /// ([`sum::copy3`]), and returns their block CRCs; `Ok(None)` (nothing written)
    /// where it cannot: then they are [`put`](ImageSink::put).
    fn put_pages3(&mut self, pages: [&[u8]; 3]) -> Result<Option<[u32; 3]>, Self::Error> {
        let _ = pages;
        Ok(None)
    }
}

/// A plain write function is a sink that takes bytes only.
impl<E, F: FnMut(&[u8]) -> Result<(), E>> ImageSink for F {
    type Error = E;
    fn put(&mut self, b: &[u8]) -> Result<(), E> {
        self(b)
    }
}

/// The image as it is encoded: bytes gathered into runs of exactly `run` bytes (the
/// last one shorter), each summed and handed to the sink in turn.
struct Runs<'s, S: ImageSink> {
    buf: Vec<u8>,
    run: usize,
    sum: sum::Sum,
    done: usize,
    sink: &'s mut S,
}

impl<S: ImageSink> Runs<'_, S> {
    fn put(&mut self, mut b: &[u8]) -> Result<(), S::Error> {
        while !b.is_empty() {
            let n = (self.run - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.buf.len() == self.run {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Sums and hands on what is gathered (a run cut short: what follows goes to the
    /// sink in place).
    fn flush(&mut self) -> Result<(), S::Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.sum.update(&self.buf);
        self.sink.put(&self.buf)?;
        self.done += self.buf.len();
        self.buf.clear();
        Ok(())
    }

    /// Three pages written and summed in place by the sink, if it can (whatever was
    /// gathered goes out first); else gathered.
    fn pages3(&mut self, pages: [&[u8]; 3]) -> Result<(), S::Error> {
        self.flush()?;
        if let Some(crcs) = self.sink.put_pages3(pages)? {
            self.sum.blocks(&crcs);
            self.done += 3 * sum::BLOCK;
            return Ok(());
        }
        for p in pages {
            self.put(p)?;
        }
        Ok(())
    }

    /// The last run, with the checksum after it; the image's length.
    fn finish(mut self) -> Result<usize, S::Error> {
        self.sum.update(&self.buf);
        let sum = std::mem::take(&mut self.sum).finish();
        self.buf.extend_from_slice(&sum.to_le_bytes());
        self.sink.put(&self.buf)?;
        Ok(self.done + self.buf.len())
    }
}

/// Encodes an image straight into `sink`, in order, the checksum computed in the same
/// pass ([`sum`]): no buffer of the whole image, no allocation per page. The framing,
/// the small sections and the page table go out in runs of exactly `run` bytes
/// ([`ENCODE_RUN`] or [`DIRECT_RUN`]), each summed before it goes out; the pages, which
/// start on a 4 KiB image offset, go three at a time from device memory straight into
/// the sink where it writes in place ([`ImageSink::put_pages3`]: copied and summed in
/// one pass), else through the runs too. Returns the image's length, which is
/// [`image_len`] of the objects' length and the page count.
///
/// With `digests`, each page's xxh3-64 is taken of the bytes as they went out (a copy,
/// not the source, which may change meanwhile) and pushed there.
pub fn encode_into<S: ImageSink>(
    parts: &ImageParts<'_>,
    mut digests: Option<&mut Vec<(u32, u64)>>,
    run: usize,
    sink: &mut S,
) -> Result<usize, S::Error> {
    let hca = hca::encode(parts.hca);
    let iseg = iseg::encode(parts.iseg);
    let objects = objects::encode(parts.objects);
    let total = image_len(objects.len(), parts.pages.len());
    let dev_start = HEADER_LEN
        + SECTIONS_WRITTEN.len() * SECTION_ENTRY_LEN
        + hca.len()
        + iseg.len()
        + objects.len();
    let (_, data_start, dev_end) = dev_mem::layout(dev_start, parts.pages.len());
    let dev_len = dev_end - dev_start;
    let mut w = W(Vec::with_capacity(data_start));
    w.put(&header::encode(parts.header, SECTIONS_WRITTEN.len(), total));
    let mut at = (HEADER_LEN + SECTIONS_WRITTEN.len() * SECTION_ENTRY_LEN) as u64;
    let lens = [hca.len(), iseg.len(), objects.len(), dev_len];
    for (t, len) in SECTIONS_WRITTEN.into_iter().zip(lens) {
        w.put(&SectionEntry::mandatory(t, at, len as u64));
        at += len as u64;
    }
    w.bytes(&hca).bytes(&iseg).bytes(&objects);
    dev_mem::encode_head(&mut w, parts.pages.iter().map(|p| p.0));
    debug_assert_eq!(w.0.len(), data_start);
    let run = run.max(sum::BLOCK);
    let mut out = Runs {
        buf: Vec::with_capacity(run + CHECKSUM_LEN),
        run,
        sum: sum::Sum::new(),
        done: 0,
        sink,
    };
    out.put(&w.0)?;
    let page = DEV_MEM_PAGE_SIZE as usize;
    let mut copy = digests.is_some().then(|| vec![0u8; page]);
    let mut rest = parts.pages;
    if copy.is_none() && out.sink.in_place() {
        while let [a, b, c, more @ ..] = rest {
            if a.1.len() != page || b.1.len() != page || c.1.len() != page {
                break;
            }
            out.pages3([a.1, b.1, c.1])?;
            rest = more;
        }
    }
    for &(index, data) in rest {
        match (&mut copy, digests.as_deref_mut()) {
            (Some(c), Some(d)) if c.len() == data.len() => {
                c.copy_from_slice(data);
                d.push((index, crate::devmem::page_digest(c)));
                out.put(c)?;
            }
            _ => out.put(data)?,
        }
    }
    let done = out.finish()?;
    debug_assert_eq!(done, total);
    Ok(done)
}

impl Image {
    /// The image's bytes ([`encode_into`] a Vec).
    pub fn to_bytes(&self) -> Vec<u8> {
        let pages: Vec<(u32, &[u8])> = self.pages.iter().map(|p| (p.index, &*p.data)).collect();
        let mut out = Vec::new();
        let parts = ImageParts {
            header: &self.header,
            hca: &self.hca,
            iseg: &self.iseg,
            objects: &self.objects,
            pages: &pages,
        };
        let mut sink = |b: &[u8]| {
            out.extend_from_slice(b);
            Ok::<(), std::convert::Infallible>(())
        };
        let done = encode_into(&parts, None, ENCODE_RUN, &mut sink);
        debug_assert_eq!(done.ok(), Some(out.len()));
        out
    }
}

// ---------------------------------------------------------------- decoding

/// Checks an image completely and decodes it. Nothing outside `bytes` is touched.
pub fn validate(bytes: &[u8]) -> Result<Image, StateError> {
    let (header, sections) = header::check(bytes)?;
    let mut hca = None;
    let mut iseg = None;
    let mut objects = None;
    let mut pages = None;
    let mut seen = BTreeSet::new();
    for s in &sections {
        if !seen.insert(s.tag) {
            return Err(StateError::DuplicateSection { tag: s.tag });
        }
        match SectionTag::try_from(s.tag) {
            Ok(SectionTag::Hca) => hca = Some(hca::decode(s.bytes)?),
            Ok(SectionTag::Iseg) => iseg = Some(iseg::decode(s.bytes)?),
            Ok(SectionTag::Objects) => {
                if s.bytes.len() > MAX_OBJECTS_LEN {
                    return Err(codec::bad(
                        "OBJECTS length",
                        s.bytes.len() as u64,
                        "at most MAX_OBJECTS_LEN",
                    ));
                }
                objects = Some(objects::decode(s.bytes)?)
            }
            Ok(SectionTag::DevMem) => {
                pages = Some(dev_mem::decode(s.bytes, s.start, header.dev_mem_size)?)
            }
            Err(_) if s.mandatory => return Err(StateError::UnknownMandatory { tag: s.tag }),
            Err(_) => {}
        }
    }
    let missing = |t: SectionTag| StateError::MissingSection { name: t.name() };
    let image = Image {
        header,
        hca: hca.ok_or(missing(SectionTag::Hca))?,
        iseg: iseg.ok_or(missing(SectionTag::Iseg))?,
        objects: objects.ok_or(missing(SectionTag::Objects))?,
        pages: pages.ok_or(missing(SectionTag::DevMem))?,
    };
    // The values, through the live commands' validators.
    hca::check(&image.hca, &image.objects)?;
    objects::check(&image.objects)?;
    Ok(image)
}

// ---------------------------------------------------------------- streaming

/// Why an image read in pieces was not accepted: the image, or reading it.
#[derive(Debug)]
pub enum StreamError<E> {
    Image(StateError),
    Read(E),
}

impl<E> From<StateError> for StreamError<E> {
    fn from(e: StateError) -> Self {
        StreamError::Image(e)
    }
}

/// Bytes [`Staged::pages`] reads at a time: 64 pages, 256 KiB (the piece is summed
/// and its pages handed on while it is still in cache).
pub const STREAM_RUN: usize = 64 * DEV_MEM_PAGE_SIZE as usize;

/// An image read in pieces (LOAD reads it from the buffer behind the mkey, without a
/// copy of the whole image): [`Staged::open`] reads the framing and the small sections
/// and checks everything but the checksum and the page entries; [`Staged::pages`] then
/// reads the image once, in order, checking the checksum as the pieces pass and each
/// page entry as it comes, and hands each page on. A caller that applies the pages as
/// they come must undo them if `pages` fails: it fails on the first bad entry, and on
/// the checksum only at the end.
///
/// `read(offset, buf)` reads `buf.len()` bytes of the image at `offset`. Only the
/// bytes checked are used: a section read twice (once to decode, once to sum) and
/// changed in between makes a wrong checksum at worst, never an unchecked value.
#[derive(Debug)]
pub struct Staged {
    pub header: ImageHeader,
    pub hca: HcaImage,
    pub iseg: IsegImage,
    pub objects: ObjectsImage,
    /// Pages the DEV_MEM section carries.
    pub pages: usize,
    len: usize,
    body_end: usize,
    /// Where the DEV_MEM section lies.
    dev_start: usize,
    dev_len: usize,
}

impl Staged {
    /// Reads and checks the framing (all but the checksum) and the HCA, ISEG and
    /// OBJECTS sections of an image of `len` bytes, and the DEV_MEM section's head.
    pub fn open<E>(
        len: usize,
        read: &mut impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Staged, StreamError<E>> {
        let mut prefix = vec![0u8; header::prefix_len(len)];
        read(0, &mut prefix).map_err(StreamError::Read)?;
        let f = header::framing(&prefix, len)?;
        let mut fetch = |start: usize, n: usize| -> Result<Vec<u8>, StreamError<E>> {
            let mut b = vec![0u8; n];
            read(start, &mut b).map_err(StreamError::Read)?;
            Ok(b)
        };
        let (mut hca, mut iseg, mut objects, mut dev) = (None, None, None, None);
        let mut seen = BTreeSet::new();
        for s in &f.spans {
            if !seen.insert(s.tag) {
                return Err(StateError::DuplicateSection { tag: s.tag }.into());
            }
            match SectionTag::try_from(s.tag) {
                Ok(SectionTag::Hca) => hca = Some(hca::decode(&fetch(s.start, s.len)?)?),
                Ok(SectionTag::Iseg) => iseg = Some(iseg::decode(&fetch(s.start, s.len)?)?),
                Ok(SectionTag::Objects) => {
                    if s.len > MAX_OBJECTS_LEN {
                        return Err(codec::bad(
                            "OBJECTS length",
                            s.len as u64,
                            "at most MAX_OBJECTS_LEN",
                        )
                        .into());
                    }
                    objects = Some(objects::decode(&fetch(s.start, s.len)?)?)
                }
                Ok(SectionTag::DevMem) => {
                    let head = fetch(s.start, s.len.min(DEV_MEM_SECTION_FIXED))?;
                    dev = Some((s.start, s.len, dev_mem::head(&head, s.start, s.len)?));
                }
                Err(_) if s.mandatory => {
                    return Err(StateError::UnknownMandatory { tag: s.tag }.into())
                }
                Err(_) => {}
            }
        }
        let missing = |t: SectionTag| StateError::MissingSection { name: t.name() };
        let hca = hca.ok_or(missing(SectionTag::Hca))?;
        let iseg = iseg.ok_or(missing(SectionTag::Iseg))?;
        let objects = objects.ok_or(missing(SectionTag::Objects))?;
        let (dev_start, dev_len, pages) = dev.ok_or(missing(SectionTag::DevMem))?;
        hca::check(&hca, &objects)?;
        objects::check(&objects)?;
        Ok(Staged {
            header: f.header,
            hca,
            iseg,
            objects,
            pages,
            len,
            body_end: f.body_end,
            dev_start,
            dev_len,
        })
    }

    /// Reads the image once, in order: sums every byte, checks each page entry and
    /// hands the pages of each piece to `pages` as (index, 4 KiB) pairs, then checks
    /// the checksum. Returns the pages handed on.
    ///
    /// Where `src` can show a piece in place ([`ImageSource::view`]: the buffer is
    /// memory the client shared) nothing is copied: the piece is summed there and its
    /// pages handed on as slices of it. The client may change those bytes meanwhile;
    /// each entry's head is copied before it is checked and its index used, so what is
    /// used is what was checked, and page bytes changed after they were summed are
    /// opaque data (any image could have carried them).
    pub fn pages<S: ImageSource>(
        &self,
        src: &mut S,
        mut pages: impl FnMut(&[(u32, &[u8])]),
    ) -> Result<usize, StreamError<S::Error>> {
        let mut buf = vec![0u8; STREAM_RUN];
        let mut sum = sum::Sum::new();
        let pass = |src: &mut S, sum: &mut sum::Sum, buf: &mut [u8], from: usize, to: usize| {
            let mut at = from;
            while at < to {
                let n = (to - at).min(buf.len());
                if src
                    .view(at, n, |b| sum.update(b))
                    .map_err(StreamError::Read)?
                    .is_none()
                {
                    src.read(at, &mut buf[..n]).map_err(StreamError::Read)?;
                    sum.update(&buf[..n]);
                }
                at += n;
            }
            Ok::<(), StreamError<S::Error>>(())
        };
        let page = DEV_MEM_PAGE_SIZE as usize;
        let table = self.dev_start + DEV_MEM_SECTION_FIXED;
        let (table_end, data, dev_end) = dev_mem::layout(self.dev_start, self.pages);
        // `open` checked that the table, padding and pages fill the section exactly.
        debug_assert_eq!(dev_end, self.dev_start + self.dev_len);
        pass(src, &mut sum, &mut buf, 0, table)?;
        // The page table, copied (at most 8 bytes a page of a 32-bit image: 8 MiB),
        // summed and checked; what is used is the copy that was summed and checked.
        let mut tab = vec![0u8; table_end - table];
        src.read(table, &mut tab).map_err(StreamError::Read)?;
        sum.update(&tab);
        let mut seen = dev_mem::Seen::new(self.header.dev_mem_size);
        let mut indices = Vec::with_capacity(self.pages);
        for e in tab.chunks_exact(PAGE_ENTRY_HEAD_LEN) {
            let Ok(head) = mlx5_prm::state_image::PageEntryHead::read_from_bytes(e) else {
                return Err(codec::bad("page table entry", 0, "8 bytes").into());
            };
            indices.push(seen.entry(&head)?);
        }
        drop(tab);
        let pad = &mut buf[..data - table_end];
        src.read(table_end, pad).map_err(StreamError::Read)?;
        dev_mem::padding(pad)?;
        sum.update(pad);
        // The pages, 4 KiB aligned: each piece summed (three blocks interleaved) and
        // handed on while it is in cache, in place where the source shows it so.
        let mut piece = |b: &[u8], first: usize, sum: &mut sum::Sum| {
            sum.update(b);
            // One list per piece (64 pages), not an allocation per page.
            let list: Vec<(u32, &[u8])> = indices[first..]
                .iter()
                .copied()
                .zip(b.chunks_exact(page))
                .collect();
            pages(&list);
            list.len()
        };
        let mut at = data;
        let mut count = 0usize;
        while at < dev_end {
            let n = (dev_end - at).min(STREAM_RUN);
            let first = (at - data) / page;
            let done = match src
                .view(at, n, |b| piece(b, first, &mut sum))
                .map_err(StreamError::Read)?
            {
                Some(k) => k,
                None => {
                    src.read(at, &mut buf[..n]).map_err(StreamError::Read)?;
                    piece(&buf[..n], first, &mut sum)
                }
            };
            count += done;
            at += n;
        }
        pass(src, &mut sum, &mut buf, dev_end, self.body_end)?;
        let want = sum.finish();
        let mut tail = [0u8; CHECKSUM_LEN];
        src.read(self.body_end, &mut tail)
            .map_err(StreamError::Read)?;
        let got = header::stored_sum(&tail);
        if got != want {
            return Err(StateError::Checksum { got, want }.into());
        }
        debug_assert_eq!(self.body_end + CHECKSUM_LEN, self.len);
        Ok(count)
    }
}

/// Where [`Staged::pages`] reads an image from.
pub trait ImageSource {
    type Error;

    /// Copies `buf.len()` bytes of the image at `at` into `buf`.
    fn read(&mut self, at: usize, buf: &mut [u8]) -> Result<(), Self::Error>;

    /// Runs `f` on the `n` bytes of the image at `at` in place, when they can be
    /// reached so; `Ok(None)` (and `f` not run) when not: then they are [`read`].
    ///
    /// [`read`]: ImageSource::read
    fn view<T>(
        &mut self,
        at: usize,
        n: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, Self::Error> {
        let _ = (at, n, f);
        Ok(None)
    }
}

/// A plain read function is a source that copies.
impl<E, F: FnMut(usize, &mut [u8]) -> Result<(), E>> ImageSource for F {
    type Error = E;
    fn read(&mut self, at: usize, buf: &mut [u8]) -> Result<(), E> {
        self(at, buf)
    }
}

#[cfg(test)]
mod tests;
