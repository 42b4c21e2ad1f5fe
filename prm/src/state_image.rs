//! The VHCA state image framing: what SAVE_VHCA_STATE writes into the buffer behind its
//! mkey and LOAD_VHCA_STATE reads back. The image is opaque to the driver (mlx5vf wraps
//! it in FW_DATA records); the device defines it, so, unlike the PRM, it is
//! little-endian. This module holds the fixed-size parts (header, section table entry,
//! the fixed sections and section heads); the emulator's `state` module validates them
//! and codes the variable-length section bodies.
//!
//! ```text
//! 0   magic "MLX5VHCA"          8
//! 8   version                   le16 (= VERSION)
//! 10  header_len                le16 (= HEADER_LEN)
//! 12  section_count             le16
//! 14  function_kind             u8   (ImageFunction)
//! 15  image_kind                u8   (ImageKind)
//! 16  total_len                 le64 (the whole image, checksum included)
//! 24  session                   le64 (which save session produced it)
//! 32  seq                       le32 (its number in the session, from 1)
//! 36  base_seq                  le32 (delta: the image it applies on; base: 0)
//! 40  dev_mem_size              le64
//! 48  flags, reserved           16 bytes, zero
//! 64  section table             section_count x SectionEntry (24 bytes)
//! ..  sections
//! end le64 checksum of everything before it (the body)
//! ```
//!
//! The checksum (since version 2): the CRC32C of each 4 KiB block of the body (at image
//! offsets k x 4096, the last block shorter), those CRCs as le32 values in order, and
//! xxh3-64 of them. Version 1 took xxh3-64 of the whole body; a version-1 image is
//! refused by its version number.
//!
//! The DEV_MEM section (version 3): [`DevMemHead`], then `count` [`PageEntryHead`]s
//! (the page table: each page's index), then zeros up to the next image offset that is
//! a multiple of 4096, then the `count` pages' bytes in the table's order. So every
//! page lies on a 4 KiB boundary of the image, is one checksum block by itself, and is
//! copied and summed straight from device memory into an aligned place of the buffer.
//! Version 2 put each page right after its head (4104-byte entries, no page aligned);
//! a version-2 image is refused by its version number.
//!
//! The OBJECTS section: the UAR list, the PD list (each a le32 count and le32 values),
//! [`CmdEqField`], the EQs (a count, then per EQ an [`EqEntryHead`], its event bitmask
//! and its PAS list), the mkeys (a count, then per mkey an [`MkeyEntryHead`] and its
//! MTT list), the firmware pages (a count and le64 addresses), then the CQs (a count,
//! then per CQ a [`CqEntryHead`] and its PAS list) and the RC QPs (a count, then per QP
//! a [`QpEntryHead`] and its PAS list). An OBJECTS section that ends after the firmware
//! pages holds no CQ and no QP.

use zerocopy::byteorder::{LittleEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::PrmError;

/// `magic`: "MLX5VHCA".
pub const MAGIC: [u8; 8] = *b"MLX5VHCA";
/// The image format version written and read (3: block CRCs, pages 4 KiB aligned).
pub const VERSION: u16 = 3;
/// Bytes of [`ImageHeader`].
pub const HEADER_LEN: usize = 64;
/// Bytes of one [`SectionEntry`].
pub const SECTION_ENTRY_LEN: usize = 24;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 8;
/// Most sections an image may list.
pub const MAX_SECTIONS: usize = 16;
/// [`SectionEntry::flags`] bit 0: a reader that does not know the tag must refuse the
/// image (an unknown optional section is skipped).
pub const SECTION_MANDATORY: u16 = 1 << 0;
/// Bytes of [`IsegSection`].
pub const ISEG_SECTION_LEN: usize = 16;
/// Bytes of [`HcaSectionHead`] (the capability page follows it).
pub const HCA_SECTION_HEAD_LEN: usize = 8;
/// Bytes of [`DevMemHead`] (the page table follows it).
pub const DEV_MEM_HEAD_LEN: usize = 8;
/// Bytes of [`PageEntryHead`] (one entry of the page table).
pub const PAGE_ENTRY_HEAD_LEN: usize = 8;
/// Bytes of [`CmdEqField`].
pub const CMD_EQ_FIELD_LEN: usize = 4;
/// Bytes of [`EqEntryHead`] (the event bitmask and PAS lists follow it).
pub const EQ_ENTRY_HEAD_LEN: usize = 32;
/// Bytes of [`MkeyEntryHead`] (the MTT list follows it).
pub const MKEY_ENTRY_HEAD_LEN: usize = 32;
/// Bytes of [`CqEntryHead`] (the PAS list follows it).
pub const CQ_ENTRY_HEAD_LEN: usize = 24;
/// Bytes of [`QpEntryHead`] (the PAS list follows it).
pub const QP_ENTRY_HEAD_LEN: usize = 48;
/// [`QpEntryHead::flags`]: the QP has a receive queue.
pub const QP_FLAG_RQ: u8 = 1 << 0;
/// [`QpEntryHead::flags`]: the QP has a send queue.
pub const QP_FLAG_SQ: u8 = 1 << 1;
/// [`QpEntryHead::flags`]: remote reads allowed (`rre`).
pub const QP_FLAG_RRE: u8 = 1 << 2;
/// [`QpEntryHead::flags`]: remote writes allowed (`rwe`).
pub const QP_FLAG_RWE: u8 = 1 << 3;
/// [`QpEntryHead::flags`]: the QP is connected (INIT2RTR named a peer).
pub const QP_FLAG_PEER: u8 = 1 << 4;
/// Every [`QpEntryHead::flags`] bit defined.
pub const QP_FLAGS_ALL: u8 = 0x1f;
/// Bytes of the count that opens every list (le32).
pub const LIST_COUNT_LEN: usize = 4;

/// The fixed image header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ImageHeader {
    /// 0x00 `magic`: [`MAGIC`].
    pub magic: [u8; 8],
    /// 0x08 `version`: [`VERSION`].
    pub version: U16<LittleEndian>,
    /// 0x0a `header_len`: [`HEADER_LEN`].
    pub header_len: U16<LittleEndian>,
    /// 0x0c `section_count`: entries in the section table.
    pub section_count: U16<LittleEndian>,
    /// 0x0e `function_kind`: [`ImageFunction`].
    pub function_kind: u8,
    /// 0x0f `image_kind`: [`ImageKind`].
    pub image_kind: u8,
    /// 0x10 `total_len`: the whole image, checksum included.
    pub total_len: U64<LittleEndian>,
    /// 0x18 `session`: the save session that produced the image.
    pub session: U64<LittleEndian>,
    /// 0x20 `seq`: the image's number in its session, from 1.
    pub seq: U32<LittleEndian>,
    /// 0x24 `base_seq`: the image a delta applies on; 0 in a base image.
    pub base_seq: U32<LittleEndian>,
    /// 0x28 `dev_mem_size`: device memory of the saved function, in bytes.
    pub dev_mem_size: U64<LittleEndian>,
    /// 0x30 flags and reserved: zero.
    pub reserved: [u8; 16],
}

impl ImageHeader {
    /// `function_kind`, typed.
    pub fn function(&self) -> Result<ImageFunction, PrmError> {
        ImageFunction::try_from(self.function_kind)
    }

    /// `image_kind`, typed.
    pub fn kind(&self) -> Result<ImageKind, PrmError> {
        ImageKind::try_from(self.image_kind)
    }
}

/// One section-table entry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SectionEntry {
    /// 0x00 `tag`: [`SectionTag`] (unknown tags are legal when not mandatory).
    pub tag: U16<LittleEndian>,
    /// 0x02 `flags`: [`SECTION_MANDATORY`], the other bits zero.
    pub flags: U16<LittleEndian>,
    /// 0x04 reserved.
    pub rsvd: U32<LittleEndian>,
    /// 0x08 `offset`: from the start of the image.
    pub offset: U64<LittleEndian>,
    /// 0x10 `length`: bytes of the section.
    pub length: U64<LittleEndian>,
}

impl SectionEntry {
    /// An entry for a mandatory section of `tag` at `offset`, `length` bytes.
    pub fn mandatory(tag: SectionTag, offset: u64, length: u64) -> Self {
        SectionEntry {
            tag: U16::new(tag.into()),
            flags: U16::new(SECTION_MANDATORY),
            rsvd: U32::new(0),
            offset: U64::new(offset),
            length: U64::new(length),
        }
    }

    /// `tag`, typed.
    pub fn section_tag(&self) -> Result<SectionTag, PrmError> {
        SectionTag::try_from(self.tag.get())
    }

    /// Whether a reader that does not know the tag must refuse the image.
    pub fn is_mandatory(&self) -> bool {
        self.flags.get() & SECTION_MANDATORY != 0
    }
}

/// The ISEG section: the init-segment state the driver programmed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IsegSection {
    /// 0x0 `cmdq_addr_h:l` as written (4 KiB aligned).
    pub cmdq_address: U64<LittleEndian>,
    /// 0x8 `nic_interface` ([`crate::NicInterface`]).
    pub nic_interface: u8,
    /// 0x9 reserved.
    pub rsvd: [u8; 7],
}

/// The head of the HCA section; `caps_len` bytes of the GENERAL capability page follow.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct HcaSectionHead {
    /// 0x0 `life_cycle`: [`LifeCycle`].
    pub life_cycle: u8,
    /// 0x1 reserved.
    pub rsvd: u8,
    /// 0x2 `issi`.
    pub issi: U16<LittleEndian>,
    /// 0x4 `caps_len`: bytes of the capability page.
    pub caps_len: U32<LittleEndian>,
}

/// The head of the DEV_MEM section; the page table (`count` [`PageEntryHead`]s), the
/// padding to a 4 KiB image offset and the pages follow.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DevMemHead {
    /// 0x0 `page_size`: bytes of each page.
    pub page_size: U32<LittleEndian>,
    /// 0x4 `count`: page entries that follow.
    pub count: U32<LittleEndian>,
}

/// One entry of the DEV_MEM page table: which page of device memory the table's
/// `k`-th page of bytes is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct PageEntryHead {
    /// 0x0 `index`: the page number in device memory.
    pub index: U32<LittleEndian>,
    /// 0x4 reserved.
    pub rsvd: U32<LittleEndian>,
}

/// The OBJECTS section's command-EQ field (after the UAR and PD lists).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmdEqField {
    /// 0x0 `present`: 1 if the function has a command EQ, else 0.
    pub present: u8,
    /// 0x1 `eqn`: its EQ number (0 when absent).
    pub eqn: u8,
    /// 0x2 reserved.
    pub rsvd: [u8; 2],
}

/// The head of one EQ of the OBJECTS section; the event bitmask (count, le64 words)
/// and the PAS list (count, le64 addresses) follow it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct EqEntryHead {
    /// 0x00 `eqn`.
    pub eqn: u8,
    /// 0x01 `armed`: 0 or 1.
    pub armed: u8,
    /// 0x02 `intr`: MSI-X vector.
    pub intr: U16<LittleEndian>,
    /// 0x04 `uar`: UAR index of its doorbell page.
    pub uar: U32<LittleEndian>,
    /// 0x08 `log_size`: log2 of the entries.
    pub log_size: U32<LittleEndian>,
    /// 0x0c `page_size`: bytes of each EQ page.
    pub page_size: U64<LittleEndian>,
    /// 0x14 `pi`: next EQE to fill.
    pub pi: U32<LittleEndian>,
    /// 0x18 `written`: EQEs written to guest memory.
    pub written: U32<LittleEndian>,
    /// 0x1c `ci`: consumer index of the last doorbell.
    pub ci: U32<LittleEndian>,
}

/// The head of one mkey of the OBJECTS section; the MTT list (count, le64 addresses)
/// follows it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct MkeyEntryHead {
    /// 0x00 `index`: the mkey index (the key's upper 24 bits).
    pub index: U32<LittleEndian>,
    /// 0x04 `variant`: `mkey_7_0`.
    pub variant: u8,
    /// 0x05 reserved.
    pub rsvd: [u8; 3],
    /// 0x08 `pd`.
    pub pd: U32<LittleEndian>,
    /// 0x0c `start`: start of the virtual range.
    pub start: U64<LittleEndian>,
    /// 0x14 `len`: length of the range.
    pub len: U64<LittleEndian>,
    /// 0x1c `log_page_size`.
    pub log_page_size: U32<LittleEndian>,
}

/// One CQ of the OBJECTS section, before its PAS list.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CqEntryHead {
    /// 0x00 `cqn`.
    pub cqn: U32<LittleEndian>,
    /// 0x04 `log_size`: 2^this CQEs.
    pub log_size: u8,
    /// 0x05 `log_page_size` of the ring's pages (4 KiB << this).
    pub log_page_size: u8,
    /// 0x06 `status` (cqc `status`).
    pub status: u8,
    /// 0x07 `eqn`: the EQ of its completion events.
    pub eqn: u8,
    /// 0x08 `uar`.
    pub uar: U32<LittleEndian>,
    /// 0x0c `pi`: CQEs written (24-bit producer counter).
    pub pi: U32<LittleEndian>,
    /// 0x10 `dbr`: IOVA of the doorbell record.
    pub dbr: U64<LittleEndian>,
}

/// One RC QP of the OBJECTS section, before its PAS list: the context and the device's
/// counters, so that posted-but-unstarted WQEs (between `sq_ci` and the doorbell
/// record, in guest memory) run on the destination.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct QpEntryHead {
    /// 0x00 `qpn`.
    pub qpn: U32<LittleEndian>,
    /// 0x04 `state` (qpc `state`).
    pub state: u8,
    /// 0x05 `flags`: `QP_FLAG_*`.
    pub flags: u8,
    /// 0x06 `log_msg_max`.
    pub log_msg_max: u8,
    /// 0x07 `log_rq_size`.
    pub log_rq_size: u8,
    /// 0x08 `log_rq_stride`.
    pub log_rq_stride: u8,
    /// 0x09 `log_sq_size`.
    pub log_sq_size: u8,
    /// 0x0a `log_page_size` of the buffer's pages.
    pub log_page_size: u8,
    /// 0x0b reserved.
    pub rsvd: u8,
    /// 0x0c `pd`.
    pub pd: U32<LittleEndian>,
    /// 0x10 `uar`.
    pub uar: U32<LittleEndian>,
    /// 0x14 `cqn_snd`.
    pub cqn_snd: U32<LittleEndian>,
    /// 0x18 `cqn_rcv`.
    pub cqn_rcv: U32<LittleEndian>,
    /// 0x1c `dbr`: IOVA of the doorbell record.
    pub dbr: U64<LittleEndian>,
    /// 0x24 `peer_vhca_id`: the peer's function (with `QP_FLAG_PEER`).
    pub peer_vhca_id: U16<LittleEndian>,
    /// 0x26 `sq_ci`: send basic blocks consumed (`hw_sq_wqebb_counter`).
    pub sq_ci: U16<LittleEndian>,
    /// 0x28 `peer_qpn`.
    pub peer_qpn: U32<LittleEndian>,
    /// 0x2c `rq_ci`: receive WQEs consumed (`hw_rq_counter`).
    pub rq_ci: U32<LittleEndian>,
}

wire_enum! {
    /// `function_kind`: which kind of function the image was saved from.
    pub enum ImageFunction: u8, field = "function_kind" {
        /// A physical function.
        Pf = 0 => "PF",
        /// A virtual function.
        Vf = 1 => "VF",
    }
}

wire_enum! {
    /// `image_kind`: a base image replaces the function, a delta applies on the image
    /// `base_seq` of the same session.
    pub enum ImageKind: u8, field = "image_kind" {
        /// Replaces everything.
        Base = 0 => "base",
        /// Applies on the previous image.
        Delta = 1 => "delta",
    }
}

wire_enum! {
    /// Section tags.
    pub enum SectionTag: u16, field = "section tag" {
        /// Life cycle, ISSI, the GENERAL capability page.
        Hca = 1 => "HCA",
        /// UARs, PDs, EQs, mkeys, firmware pages.
        Objects = 2 => "OBJECTS",
        /// Device-memory pages.
        DevMem = 3 => "DEV_MEM",
        /// Init-segment state (command queue address, nic_interface).
        Iseg = 4 => "ISEG",
    }
}

wire_enum! {
    /// `life_cycle` of the HCA section: the function's ENABLE/INIT_HCA state.
    pub enum LifeCycle: u8, field = "life_cycle" {
        /// Before ENABLE_HCA, or after DISABLE_HCA.
        Disabled = 0 => "disabled",
        /// After ENABLE_HCA (or TEARDOWN_HCA).
        Enabled = 1 => "enabled",
        /// After INIT_HCA.
        Initialized = 2 => "initialized",
    }
}

const _: () = {
    assert!(core::mem::size_of::<ImageHeader>() == HEADER_LEN);
    assert!(core::mem::size_of::<SectionEntry>() == SECTION_ENTRY_LEN);
    assert!(core::mem::size_of::<IsegSection>() == ISEG_SECTION_LEN);
    assert!(core::mem::size_of::<HcaSectionHead>() == HCA_SECTION_HEAD_LEN);
    assert!(core::mem::size_of::<DevMemHead>() == DEV_MEM_HEAD_LEN);
    assert!(core::mem::size_of::<PageEntryHead>() == PAGE_ENTRY_HEAD_LEN);
    assert!(core::mem::size_of::<CmdEqField>() == CMD_EQ_FIELD_LEN);
    assert!(core::mem::size_of::<EqEntryHead>() == EQ_ENTRY_HEAD_LEN);
    assert!(core::mem::size_of::<MkeyEntryHead>() == MKEY_ENTRY_HEAD_LEN);
    assert!(core::mem::size_of::<CqEntryHead>() == CQ_ENTRY_HEAD_LEN);
    assert!(core::mem::size_of::<QpEntryHead>() == QP_ENTRY_HEAD_LEN);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use zerocopy::FromZeros;

    #[test]
    fn header_and_entry_sizes_and_offsets_match_the_layout() {
        assert_eq!(size_of::<ImageHeader>(), 64);
        assert_eq!(size_of::<SectionEntry>(), 24);
        assert_eq!(size_of::<IsegSection>(), 16);
        assert_eq!(size_of::<HcaSectionHead>(), 8);
        assert_eq!(size_of::<DevMemHead>(), 8);
        assert_eq!(size_of::<PageEntryHead>(), 8);
        assert_eq!(size_of::<CmdEqField>(), 4);
        assert_eq!(size_of::<EqEntryHead>(), 32);
        assert_eq!(size_of::<MkeyEntryHead>(), 32);
        assert_eq!(offset_of!(EqEntryHead, page_size), 12);
        assert_eq!(offset_of!(EqEntryHead, ci), 28);
        assert_eq!(offset_of!(MkeyEntryHead, pd), 8);
        assert_eq!(offset_of!(MkeyEntryHead, log_page_size), 28);
        assert_eq!(offset_of!(ImageHeader, version), 8);
        assert_eq!(offset_of!(ImageHeader, section_count), 12);
        assert_eq!(offset_of!(ImageHeader, function_kind), 14);
        assert_eq!(offset_of!(ImageHeader, image_kind), 15);
        assert_eq!(offset_of!(ImageHeader, total_len), 16);
        assert_eq!(offset_of!(ImageHeader, seq), 32);
        assert_eq!(offset_of!(ImageHeader, dev_mem_size), 40);
        assert_eq!(offset_of!(ImageHeader, reserved), 48);
        assert_eq!(offset_of!(SectionEntry, offset), 8);
        assert_eq!(offset_of!(SectionEntry, length), 16);
    }

    #[test]
    fn fields_are_little_endian() {
        let mut h = ImageHeader::new_zeroed();
        h.magic = MAGIC;
        h.version.set(VERSION);
        h.total_len.set(0x0102_0304_0506_0708);
        let b = h.as_bytes();
        assert_eq!(&b[..10], b"MLX5VHCA\x03\x00");
        assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        let e = SectionEntry::mandatory(SectionTag::Iseg, 0x100, 16);
        assert_eq!(&e.as_bytes()[..4], &[4, 0, 1, 0]);
        assert!(e.is_mandatory());
        assert_eq!(e.section_tag(), Ok(SectionTag::Iseg));
    }

    #[test]
    fn enumerated_fields_round_trip_and_reject_unknown_values() {
        for &f in ImageFunction::ALL {
            assert_eq!(ImageFunction::try_from(u8::from(f)), Ok(f));
        }
        for &k in ImageKind::ALL {
            assert_eq!(ImageKind::try_from(u8::from(k)), Ok(k));
        }
        for &t in SectionTag::ALL {
            assert_eq!(SectionTag::try_from(u16::from(t)), Ok(t));
        }
        for &l in LifeCycle::ALL {
            assert_eq!(LifeCycle::try_from(u8::from(l)), Ok(l));
        }
        let mut h = ImageHeader::new_zeroed();
        h.function_kind = 2;
        h.image_kind = 9;
        assert_eq!(
            h.function(),
            Err(PrmError::UnknownValue {
                field: "function_kind",
                value: 2
            })
        );
        assert_eq!(
            h.kind(),
            Err(PrmError::UnknownValue {
                field: "image_kind",
                value: 9
            })
        );
        assert!(SectionTag::try_from(0).is_err());
        assert!(LifeCycle::try_from(3).is_err());
    }
}
