//! The VHCA state image: what SAVE_VHCA_STATE writes and LOAD_VHCA_STATE reads.
//!
//! The image is opaque to the driver (mlx5vf only wraps it in FW_DATA records) and is
//! hostile input to LOAD: [`validate`] checks everything — magic, version, lengths,
//! checksum, the section table, every count against its cap and the bytes left — before
//! anything is handed on, and decoding never panics. The firmware then checks the
//! objects' values against the same limits its commands enforce
//! (`Firmware::from_image`) before it swaps anything in.
//!
//! # Layout (little-endian)
//!
//! ```text
//! 0   magic "MLX5VHCA"          8
//! 8   version                   u16 (= VERSION)
//! 10  header_len                u16 (= HEADER_LEN)
//! 12  section_count             u16
//! 14  function_kind             u8  (0 PF, 1 VF)
//! 15  image_kind                u8  (0 base, 1 delta)
//! 16  total_len                 u64 (the whole image, checksum included)
//! 24  session                   u64 (which save session produced it)
//! 32  seq                       u32 (its number in the session, from 1)
//! 36  base_seq                  u32 (delta: the image it applies on; base: 0)
//! 40  dev_mem_size              u64
//! 48  flags, reserved           16 bytes, zero
//! 64  section table             section_count x 24: tag u16, flags u16, rsvd u32,
//!                               offset u64, length u64
//! ..  sections
//! end xxh3-64 of everything before it
//! ```
//!
//! Sections: HCA (life cycle, ISSI, the GENERAL caps page as SET_HCA_CAP left it),
//! ISEG (the init-segment state the driver programmed: command queue address and
//! `nic_interface`, so the guest's queue keeps working after the move),
//! OBJECTS (UARs, PDs, EQs with their PAS lists and indices, the command EQ, mkeys with
//! their MTT lists, firmware pages), DEV_MEM (pages: index + 4 KiB). A section flagged
//! mandatory that this version does not know refuses the image; an optional one is
//! skipped.
//!
//! A *base* image replaces the function: device memory becomes zeros and then the pages
//! it carries. A *delta* image applies on top of the image `base_seq` of the same
//! session: it replaces the HCA state and objects (they are small) and writes the pages
//! it carries. Incremental pre-copy rounds and stop-copy chunks are both deltas.

use std::collections::BTreeSet;

use mlx5_prm::cmd::caps::HCA_CAP_SIZE;
use mlx5_prm::cmd::eq::CREATE_EQ_IN_EVENT_BITMASK_WORDS;
use xxhash_rust::xxh3::xxh3_64;

use crate::devmem::{DEV_MEM_PAGE_SIZE, MAX_DEV_MEM_SIZE};

/// "MLX5VHCA".
pub const MAGIC: [u8; 8] = *b"MLX5VHCA";
/// Image format version this firmware writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Bytes of one section-table entry.
pub const SECTION_ENTRY_LEN: usize = 24;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 8;
/// Most sections an image may list.
pub const MAX_SECTIONS: usize = 16;
/// Bytes of one device-memory page entry: u32 index, u32 reserved, the page.
pub const PAGE_ENTRY_LEN: usize = 8 + DEV_MEM_PAGE_SIZE as usize;
/// Bytes before the first page entry of the DEV_MEM section (page size, count).
pub const DEV_MEM_SECTION_FIXED: usize = 8;
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
    + CHECKSUM_LEN;
/// Bytes of the HCA section.
pub const HCA_SECTION_LEN: usize = 8 + HCA_CAP_SIZE;
/// Bytes of the ISEG section.
pub const ISEG_SECTION_LEN: usize = 16;
/// Sections a written image has.
const SECTIONS_WRITTEN: usize = 4;
/// Low bits of the command queue address that must be zero (4 KiB aligned).
pub const CMDQ_ADDRESS_ALIGN_MASK: u64 = 0xfff;
/// Largest `nic_interface` value (3 bits).
pub const NIC_INTERFACE_MAX: u8 = 7;

/// Section tags.
pub mod tag {
    /// Life cycle, ISSI, GENERAL caps.
    pub const HCA: u16 = 1;
    /// UARs, PDs, EQs, mkeys, firmware pages.
    pub const OBJECTS: u16 = 2;
    /// Device-memory pages.
    pub const DEV_MEM: u16 = 3;
    /// Init-segment state (command queue address, nic_interface).
    pub const ISEG: u16 = 4;
}
/// Section flag: a reader that does not know the tag must refuse the image.
pub const SECTION_MANDATORY: u16 = 1 << 0;

/// Why an image was refused. Every variant says what was expected and what came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("image of {len} bytes: expected {min}..={max}")]
    BadLength { len: usize, min: usize, max: usize },
    #[error("bad magic {got:02x?}: expected \"MLX5VHCA\"")]
    BadMagic { got: [u8; 8] },
    #[error("image version {got}: this firmware reads version {want}")]
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
    #[error("image is for {image:#x} bytes of device memory, the function has {function:#x}")]
    DevMemSize { image: u64, function: u64 },
    #[error("image is for a {image}, this function is a {function}")]
    FunctionKind {
        image: &'static str,
        function: &'static str,
    },
}

/// Which kind of function an image was saved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFunction {
    Pf = 0,
    Vf = 1,
}

impl ImageFunction {
    pub fn name(self) -> &'static str {
        match self {
            ImageFunction::Pf => "PF",
            ImageFunction::Vf => "VF",
        }
    }
}

/// Base (replaces everything) or delta (applies on the previous image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Base = 0,
    Delta = 1,
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
    /// Life cycle: 0 disabled, 1 enabled, 2 initialized.
    pub life_cycle: u8,
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
pub use crate::firmware::{EqState as EqImage, Mkey as MkeyImage};

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

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn count(&mut self, n: usize) -> &mut Self {
        // Counts are bounded by the firmware's tables, far below u32::MAX.
        self.u32(n as u32)
    }
}

fn encode_hca(h: &HcaImage) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(HCA_SECTION_LEN));
    w.u8(h.life_cycle).u8(0).u16(h.issi).count(h.caps.len());
    w.bytes(&h.caps);
    w.0
}

fn encode_objects(o: &ObjectsImage) -> Vec<u8> {
    let mut w = W(Vec::new());
    w.count(o.uars.len());
    o.uars.iter().for_each(|&u| {
        w.u32(u);
    });
    w.count(o.pds.len());
    o.pds.iter().for_each(|&p| {
        w.u32(p);
    });
    w.u8(u8::from(o.cmd_eq.is_some()))
        .u8(o.cmd_eq.unwrap_or(0))
        .u16(0);
    w.count(o.eqs.len());
    for e in &o.eqs {
        w.u8(e.eqn).u8(u8::from(e.armed)).u16(e.intr).u32(e.uar);
        w.u32(e.log_size).u64(e.page_size);
        w.u32(e.pi).u32(e.written).u32(e.ci);
        w.count(e.event_bitmask.len());
        e.event_bitmask.iter().for_each(|&m| {
            w.u64(m);
        });
        w.count(e.pas.len());
        e.pas.iter().for_each(|&a| {
            w.u64(a);
        });
    }
    w.count(o.mkeys.len());
    for m in &o.mkeys {
        w.u32(m.index).u8(m.variant).u8(0).u16(0).u32(m.pd);
        w.u64(m.start).u64(m.len).u32(m.log_page_size);
        w.count(m.mtt.len());
        m.mtt.iter().for_each(|&a| {
            w.u64(a);
        });
    }
    w.count(o.fw_pages.len());
    o.fw_pages.iter().for_each(|&a| {
        w.u64(a);
    });
    w.0
}

/// Bytes of an image whose objects section is `objects_len` bytes and that carries
/// `pages` device-memory pages.
pub fn image_len(objects_len: usize, pages: usize) -> usize {
    HEADER_LEN
        + SECTIONS_WRITTEN * SECTION_ENTRY_LEN
        + HCA_SECTION_LEN
        + ISEG_SECTION_LEN
        + objects_len
        + DEV_MEM_SECTION_FIXED
        + pages * PAGE_ENTRY_LEN
        + CHECKSUM_LEN
}

/// Bytes the objects section of `o` takes.
pub fn objects_len(o: &ObjectsImage) -> usize {
    encode_objects(o).len()
}

impl Image {
    /// The image's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let hca = encode_hca(&self.hca);
        let mut iseg = W(Vec::with_capacity(ISEG_SECTION_LEN));
        iseg.u64(self.iseg.cmdq_address)
            .u8(self.iseg.nic_interface)
            .bytes(&[0; 7]);
        let iseg = iseg.0;
        let objects = encode_objects(&self.objects);
        let total = image_len(objects.len(), self.pages.len());
        let mut w = W(Vec::with_capacity(total));
        let h = &self.header;
        w.bytes(&MAGIC)
            .u16(VERSION)
            .u16(HEADER_LEN as u16)
            .u16(SECTIONS_WRITTEN as u16)
            .u8(h.function as u8)
            .u8(h.kind as u8)
            .u64(total as u64)
            .u64(h.session)
            .u32(h.seq)
            .u32(h.base_seq)
            .u64(h.dev_mem_size)
            .bytes(&[0; 16]);
        let mut at = (HEADER_LEN + SECTIONS_WRITTEN * SECTION_ENTRY_LEN) as u64;
        let dev_len = DEV_MEM_SECTION_FIXED + self.pages.len() * PAGE_ENTRY_LEN;
        for (t, len) in [
            (tag::HCA, hca.len()),
            (tag::ISEG, iseg.len()),
            (tag::OBJECTS, objects.len()),
            (tag::DEV_MEM, dev_len),
        ] {
            w.u16(t)
                .u16(SECTION_MANDATORY)
                .u32(0)
                .u64(at)
                .u64(len as u64);
            at += len as u64;
        }
        w.bytes(&hca).bytes(&iseg).bytes(&objects);
        w.u32(DEV_MEM_PAGE_SIZE as u32).count(self.pages.len());
        for p in &self.pages {
            w.u32(p.index).u32(0).bytes(&p.data);
        }
        let sum = xxh3_64(&w.0);
        w.u64(sum);
        debug_assert_eq!(w.0.len(), total);
        w.0
    }
}

// ---------------------------------------------------------------- decoding

/// A bounded little-endian reader over one section.
struct R<'a> {
    b: &'a [u8],
    section: &'static str,
}

impl<'a> R<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], StateError> {
        let have = self.b.len();
        let n_usize = usize::try_from(n).ok().filter(|&n| n <= have);
        let Some(n) = n_usize else {
            return Err(StateError::Truncated {
                section: self.section,
                what,
                need: n,
                have,
            });
        };
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count of elements of `elem` bytes each, checked against the bytes left before
    /// anything is allocated for it.
    fn count(&mut self, elem: usize, what: &'static str) -> Result<usize, StateError> {
        let n = self.u32(what)?;
        let need = u64::from(n).saturating_mul(elem as u64);
        if need > self.b.len() as u64 {
            return Err(StateError::Truncated {
                section: self.section,
                what,
                need,
                have: self.b.len(),
            });
        }
        Ok(n as usize)
    }
    fn u64s(&mut self, what: &'static str) -> Result<Vec<u64>, StateError> {
        let n = self.count(8, what)?;
        (0..n).map(|_| self.u64(what)).collect()
    }
    fn u32s(&mut self, what: &'static str) -> Result<Vec<u32>, StateError> {
        let n = self.count(4, what)?;
        (0..n).map(|_| self.u32(what)).collect()
    }
    fn zero(&mut self, n: u64, what: &'static str) -> Result<(), StateError> {
        let b = self.take(n, what)?;
        if let Some(&x) = b.iter().find(|&&x| x != 0) {
            return Err(bad(what, u64::from(x), "0 (reserved)"));
        }
        Ok(())
    }
    fn end(&self) -> Result<(), StateError> {
        if !self.b.is_empty() {
            return Err(StateError::Trailing {
                section: self.section,
                left: self.b.len(),
            });
        }
        Ok(())
    }
}

fn bad(what: &'static str, got: u64, want: &'static str) -> StateError {
    StateError::BadValue { what, got, want }
}

fn flag(v: u8, what: &'static str) -> Result<bool, StateError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad(what, v.into(), "0 or 1")),
    }
}

fn decode_hca(b: &[u8]) -> Result<HcaImage, StateError> {
    let mut r = R { b, section: "HCA" };
    let life_cycle = r.u8("life_cycle")?;
    r.zero(1, "HCA reserved")?;
    let issi = r.u16("issi")?;
    let caps_len = r.u32("caps length")?;
    if caps_len as usize != HCA_CAP_SIZE {
        return Err(bad("caps length", caps_len.into(), "4096"));
    }
    let caps = r.take(u64::from(caps_len), "caps")?.into();
    r.end()?;
    Ok(HcaImage {
        life_cycle,
        issi,
        caps,
    })
}

fn decode_iseg(b: &[u8]) -> Result<IsegImage, StateError> {
    let mut r = R { b, section: "ISEG" };
    let cmdq_address = r.u64("cmdq address")?;
    if cmdq_address & CMDQ_ADDRESS_ALIGN_MASK != 0 {
        return Err(bad("cmdq address", cmdq_address, "4 KiB aligned"));
    }
    let nic_interface = r.u8("nic_interface")?;
    if nic_interface > NIC_INTERFACE_MAX {
        return Err(bad("nic_interface", nic_interface.into(), "0..=7"));
    }
    r.zero(7, "ISEG reserved")?;
    r.end()?;
    Ok(IsegImage {
        cmdq_address,
        nic_interface,
    })
}

fn decode_objects(b: &[u8]) -> Result<ObjectsImage, StateError> {
    let mut r = R {
        b,
        section: "OBJECTS",
    };
    let uars = r.u32s("UAR list")?;
    let pds = r.u32s("PD list")?;
    let has_cmd_eq = flag(r.u8("cmd_eq present")?, "cmd_eq present")?;
    let cmd_eq_n = r.u8("cmd_eq")?;
    r.zero(2, "OBJECTS reserved")?;
    let cmd_eq = has_cmd_eq.then_some(cmd_eq_n);
    // The smallest EQ entry: fixed fields + two empty lists.
    let neq = r.count(36, "EQ list")?;
    let mut eqs = Vec::with_capacity(neq);
    for _ in 0..neq {
        let eqn = r.u8("eqn")?;
        let armed = flag(r.u8("EQ armed")?, "EQ armed")?;
        let intr = r.u16("EQ intr")?;
        let uar = r.u32("EQ uar")?;
        let log_size = r.u32("EQ log_size")?;
        let page_size = r.u64("EQ page_size")?;
        let pi = r.u32("EQ pi")?;
        let written = r.u32("EQ written")?;
        let ci = r.u32("EQ ci")?;
        let words = r.u32("EQ event_bitmask words")?;
        if words as usize != CREATE_EQ_IN_EVENT_BITMASK_WORDS {
            return Err(bad(
                "EQ event_bitmask words",
                words.into(),
                "CREATE_EQ_IN_EVENT_BITMASK_WORDS",
            ));
        }
        let mut event_bitmask = [0u64; CREATE_EQ_IN_EVENT_BITMASK_WORDS];
        for m in &mut event_bitmask {
            *m = r.u64("EQ event_bitmask")?;
        }
        let pas = r.u64s("EQ PAS list")?;
        eqs.push(EqImage {
            eqn,
            uar,
            intr,
            log_size,
            page_size,
            pas,
            event_bitmask,
            pi,
            written,
            ci,
            armed,
        });
    }
    let nmkeys = r.count(36, "mkey list")?;
    let mut mkeys = Vec::with_capacity(nmkeys);
    for _ in 0..nmkeys {
        let index = r.u32("mkey index")?;
        let variant = r.u8("mkey variant")?;
        r.zero(3, "mkey reserved")?;
        let pd = r.u32("mkey pd")?;
        let start = r.u64("mkey start")?;
        let len = r.u64("mkey len")?;
        let log_page_size = r.u32("mkey log_page_size")?;
        let mtt = r.u64s("mkey MTT")?;
        mkeys.push(MkeyImage {
            index,
            variant,
            pd,
            start,
            len,
            log_page_size,
            mtt,
        });
    }
    let fw_pages = r.u64s("firmware page list")?;
    r.end()?;
    Ok(ObjectsImage {
        uars,
        pds,
        cmd_eq,
        eqs,
        mkeys,
        fw_pages,
    })
}

fn decode_dev_mem(b: &[u8], dev_mem_size: u64) -> Result<Vec<PageImage>, StateError> {
    let mut r = R {
        b,
        section: "DEV_MEM",
    };
    let page_size = r.u32("page size")?;
    if u64::from(page_size) != DEV_MEM_PAGE_SIZE {
        return Err(bad("device-memory page size", page_size.into(), "4096"));
    }
    let n = r.count(PAGE_ENTRY_LEN, "page list")?;
    let npages = dev_mem_size / DEV_MEM_PAGE_SIZE;
    let mut seen = BTreeSet::new();
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let index = r.u32("page index")?;
        r.zero(4, "page reserved")?;
        if u64::from(index) >= npages {
            return Err(bad("page index", index.into(), "below the page count"));
        }
        if !seen.insert(index) {
            return Err(bad("page index", index.into(), "each page once"));
        }
        let data = r.take(DEV_MEM_PAGE_SIZE, "page")?.into();
        pages.push(PageImage { index, data });
    }
    r.end()?;
    Ok(pages)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks an image completely and decodes it. Nothing outside `bytes` is touched.
pub fn validate(bytes: &[u8]) -> Result<Image, StateError> {
    let min = HEADER_LEN + CHECKSUM_LEN;
    if bytes.len() < min || bytes.len() > MAX_IMAGE_LEN {
        return Err(StateError::BadLength {
            len: bytes.len(),
            min,
            max: MAX_IMAGE_LEN,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != MAGIC {
        return Err(StateError::BadMagic { got: magic });
    }
    let version = le16(bytes, 8);
    if version != VERSION {
        return Err(StateError::BadVersion {
            got: version,
            want: VERSION,
        });
    }
    let header_len = le16(bytes, 10);
    if usize::from(header_len) != HEADER_LEN {
        return Err(StateError::BadHeader {
            field: "header_len",
            got: header_len.into(),
            want: "64",
        });
    }
    let total = le64(bytes, 16);
    if total != bytes.len() as u64 {
        return Err(StateError::LengthMismatch {
            claimed: total,
            got: bytes.len(),
        });
    }
    let body_end = bytes.len() - CHECKSUM_LEN;
    let want = xxh3_64(&bytes[..body_end]);
    let got = le64(bytes, body_end);
    if got != want {
        return Err(StateError::Checksum { got, want });
    }
    let function = match bytes[14] {
        0 => ImageFunction::Pf,
        1 => ImageFunction::Vf,
        v => {
            return Err(StateError::BadHeader {
                field: "function_kind",
                got: v.into(),
                want: "0 (PF) or 1 (VF)",
            })
        }
    };
    let kind = match bytes[15] {
        0 => ImageKind::Base,
        1 => ImageKind::Delta,
        v => {
            return Err(StateError::BadHeader {
                field: "image_kind",
                got: v.into(),
                want: "0 (base) or 1 (delta)",
            })
        }
    };
    if let Some(&x) = bytes[48..64].iter().find(|&&x| x != 0) {
        return Err(StateError::BadHeader {
            field: "flags/reserved",
            got: x.into(),
            want: "0",
        });
    }
    let header = ImageHeader {
        function,
        kind,
        session: le64(bytes, 24),
        seq: le32(bytes, 32),
        base_seq: le32(bytes, 36),
        dev_mem_size: le64(bytes, 40),
    };
    if header.seq == 0 {
        return Err(StateError::BadHeader {
            field: "seq",
            got: 0,
            want: "1 or more",
        });
    }
    match kind {
        ImageKind::Base if header.base_seq != 0 => {
            return Err(StateError::BadHeader {
                field: "base_seq",
                got: header.base_seq.into(),
                want: "0 in a base image",
            })
        }
        ImageKind::Delta if header.base_seq == 0 || header.base_seq >= header.seq => {
            return Err(StateError::BadHeader {
                field: "base_seq",
                got: header.base_seq.into(),
                want: "1..seq in a delta image",
            })
        }
        _ => {}
    }
    if !header.dev_mem_size.is_power_of_two() || header.dev_mem_size > MAX_DEV_MEM_SIZE {
        return Err(StateError::BadHeader {
            field: "dev_mem_size",
            got: header.dev_mem_size,
            want: "a power of two up to MAX_DEV_MEM_SIZE",
        });
    }
    let count = usize::from(le16(bytes, 12));
    if count > MAX_SECTIONS {
        return Err(StateError::BadHeader {
            field: "section_count",
            got: count as u64,
            want: "at most MAX_SECTIONS",
        });
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
    // (tag, mandatory, start, end) of each entry, checked against the payload.
    let mut entries: Vec<(usize, u16, bool, usize, usize)> = Vec::with_capacity(count);
    for i in 0..count {
        let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
        let t = le16(bytes, at);
        let flags = le16(bytes, at + 2);
        let rsvd = le32(bytes, at + 4);
        let offset = le64(bytes, at + 8);
        let len = le64(bytes, at + 16);
        if flags & !SECTION_MANDATORY != 0 || rsvd != 0 {
            return Err(StateError::BadHeader {
                field: "section flags/reserved",
                got: u64::from(flags) << 32 | u64::from(rsvd),
                want: "only the MANDATORY flag",
            });
        }
        let end = offset.checked_add(len);
        let ok = offset >= payload_start as u64 && end.is_some_and(|e| e <= body_end as u64);
        if !ok {
            return Err(StateError::SectionBounds {
                index: i,
                tag: t,
                offset,
                len,
                start: payload_start,
                end: body_end,
            });
        }
        // Both fit in body_end, a usize.
        entries.push((
            i,
            t,
            flags & SECTION_MANDATORY != 0,
            offset as usize,
            (offset + len) as usize,
        ));
    }
    let mut by_offset = entries.clone();
    by_offset.sort_by_key(|e| (e.3, e.4));
    for w in by_offset.windows(2) {
        if w[1].3 < w[0].4 {
            return Err(StateError::SectionOverlap {
                a: w[0].0,
                b: w[1].0,
            });
        }
    }
    let mut hca = None;
    let mut iseg = None;
    let mut objects = None;
    let mut pages = None;
    let mut seen = BTreeSet::new();
    for &(_, t, mandatory, start, end) in &entries {
        if !seen.insert(t) {
            return Err(StateError::DuplicateSection { tag: t });
        }
        let b = &bytes[start..end];
        match t {
            tag::HCA => hca = Some(decode_hca(b)?),
            tag::ISEG => iseg = Some(decode_iseg(b)?),
            tag::OBJECTS => {
                if b.len() > MAX_OBJECTS_LEN {
                    return Err(bad(
                        "OBJECTS length",
                        b.len() as u64,
                        "at most MAX_OBJECTS_LEN",
                    ));
                }
                objects = Some(decode_objects(b)?)
            }
            tag::DEV_MEM => pages = Some(decode_dev_mem(b, header.dev_mem_size)?),
            _ if mandatory => return Err(StateError::UnknownMandatory { tag: t }),
            _ => {}
        }
    }
    Ok(Image {
        header,
        hca: hca.ok_or(StateError::MissingSection { name: "HCA" })?,
        iseg: iseg.ok_or(StateError::MissingSection { name: "ISEG" })?,
        objects: objects.ok_or(StateError::MissingSection { name: "OBJECTS" })?,
        pages: pages.ok_or(StateError::MissingSection { name: "DEV_MEM" })?,
    })
}

#[cfg(test)]
mod tests;
