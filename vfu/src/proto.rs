//! Wire format of vfio-user messages (QEMU `docs/interop/vfio-user.rst`).
//!
//! Every field is host endian (little endian on the machines we run on). Wire
//! structures hold integers only; decoding checks lengths and returns a typed error.

use crate::error::Errno;

/// Size of the header that starts every message.
pub const HEADER_SIZE: usize = 16;

/// `flags` bits 0-3: message type.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Message type: command.
pub const FLAGS_TYPE_COMMAND: u32 = 0;
/// Message type: reply.
pub const FLAGS_TYPE_REPLY: u32 = 1;
/// `flags` bit 4: the sender wants no reply.
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// `flags` bit 5: the reply carries an errno in `error`.
pub const FLAGS_ERROR: u32 = 1 << 5;

/// The protocol major version we speak.
pub const VERSION_MAJOR: u16 = 0;
/// The highest minor version we implement.
pub const VERSION_MINOR: u16 = 0;

/// Command numbers (spec section "Commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    /// The command for a wire number, or `None` for a number the spec does not define.
    pub fn from_u16(v: u16) -> Option<Self> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }

    /// The spec's name, for logs.
    pub fn name(self) -> &'static str {
        use Command::*;
        match self {
            Version => "VERSION",
            DmaMap => "DMA_MAP",
            DmaUnmap => "DMA_UNMAP",
            DeviceGetInfo => "DEVICE_GET_INFO",
            DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
            DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
            DeviceSetIrqs => "DEVICE_SET_IRQS",
            RegionRead => "REGION_READ",
            RegionWrite => "REGION_WRITE",
            DmaRead => "DMA_READ",
            DmaWrite => "DMA_WRITE",
            DeviceReset => "DEVICE_RESET",
            RegionWriteMulti => "REGION_WRITE_MULTI",
            DeviceFeature => "DEVICE_FEATURE",
            MigDataRead => "MIG_DATA_READ",
            MigDataWrite => "MIG_DATA_WRITE",
        }
    }
}

/// Name of a raw command number, for logs (unknown numbers included).
pub fn command_name(v: u16) -> &'static str {
    Command::from_u16(v).map_or("UNKNOWN", Command::name)
}

/// The 16-byte header of every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    pub msg_size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        Header {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            msg_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// The header of the successful reply to `self` carrying `payload_len` bytes.
    pub fn reply(&self, payload_len: usize) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        }
    }

    /// The header-only error reply to `self` (flags 0x21, a non-zero errno).
    pub fn error_reply(&self, errno: Errno) -> Header {
        Header {
            msg_size: HEADER_SIZE as u32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: errno.raw() as u32,
            ..self.reply(0)
        }
    }

    pub fn msg_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }
}

/// A little-endian reader over a payload with bounds checks that yield `EINVAL`.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        let end = self.pos.checked_add(n).ok_or(Errno::EINVAL)?;
        let s = self.buf.get(self.pos..end).ok_or(Errno::EINVAL)?;
        self.pos = end;
        Ok(s)
    }

    pub fn u16(&mut self) -> Result<u16, Errno> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Errno> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn u64(&mut self) -> Result<u64, Errno> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// A little-endian writer building a payload.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Declares a fixed-size wire structure of little-endian integers with its `SIZE`,
/// `decode` (a short payload is `EINVAL`) and `encode`.
macro_rules! wire_struct {
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $(pub $field: $ty),*
        }

        impl $name {
            pub const SIZE: usize = 0 $(+ std::mem::size_of::<$ty>())*;

            pub fn decode(p: &[u8]) -> Result<Self, Errno> {
                let mut r = Reader::new(p);
                Ok($name { $($field: r.$ty()?),* })
            }

            pub fn encode(&self) -> Vec<u8> {
                let mut w = Writer::new();
                $(w.$ty(self.$field);)*
                w.finish()
            }
        }
    };
}

wire_struct! {
    /// DMA_MAP request (32 bytes, plus 0 or 1 fd).
    DmaMap { argsz: u32, flags: u32, offset: u64, address: u64, size: u64 }
}

wire_struct! {
    /// DMA_UNMAP request and reply (24 bytes).
    DmaUnmap { argsz: u32, flags: u32, address: u64, size: u64 }
}

wire_struct! {
    /// DEVICE_GET_INFO request and reply (`struct vfio_device_info`, 16 bytes).
    DeviceInfo { argsz: u32, flags: u32, num_regions: u32, num_irqs: u32 }
}

wire_struct! {
    /// DEVICE_GET_REGION_INFO request and fixed reply part (`struct vfio_region_info`).
    RegionInfoWire { argsz: u32, flags: u32, index: u32, cap_offset: u32, size: u64, offset: u64 }
}

wire_struct! {
    /// DEVICE_GET_IRQ_INFO request and reply (`struct vfio_irq_info`), and the same
    /// 16-byte shape of DEVICE_GET_REGION_IO_FDS (argsz, flags, index, count).
    IrqInfoWire { argsz: u32, flags: u32, index: u32, count: u32 }
}

wire_struct! {
    /// DEVICE_SET_IRQS fixed part (`struct vfio_irq_set`, 20 bytes).
    IrqSetWire { argsz: u32, flags: u32, index: u32, start: u32, count: u32 }
}

wire_struct! {
    /// REGION_READ / REGION_WRITE fixed part (16 bytes).
    RegionAccess { offset: u64, region: u32, count: u32 }
}

/// One entry of REGION_WRITE_MULTI (24 bytes: offset, region, count, `data[8]`).
pub const WRITE_MULTI_ENTRY_SIZE: usize = 24;
/// Largest data of one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_DATA_MAX: usize = 8;

wire_struct! {
    /// DEVICE_FEATURE fixed part (`struct vfio_device_feature`, 8 bytes).
    DeviceFeatureWire { argsz: u32, flags: u32 }
}

wire_struct! {
    /// MIG_DATA_READ / MIG_DATA_WRITE fixed part (8 bytes).
    MigData { argsz: u32, size: u32 }
}

/// Size of `struct vfio_region_sparse_mmap_area` (offset u64, size u64).
pub const SPARSE_AREA_SIZE: usize = 16;
/// Size of a capability header (id u16, version u16, next u32).
pub const CAP_HEADER_SIZE: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            msg_id: 0x1234,
            command: 5,
            msg_size: 48,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: 22,
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER_SIZE);
        assert_eq!(Header::decode(&b), h);
        assert_eq!(&b[8..12], &0x21u32.to_le_bytes());
    }

    #[test]
    fn wire_sizes_match_spec() {
        let m = DmaMap {
            argsz: 32,
            flags: 3,
            offset: 1,
            address: 2,
            size: 3,
        };
        assert_eq!(m.encode().len(), DmaMap::SIZE);
        assert_eq!(DmaMap::decode(&m.encode()).unwrap(), m);
        let u = DmaUnmap {
            argsz: 24,
            flags: 0,
            address: 4,
            size: 5,
        };
        assert_eq!(u.encode().len(), DmaUnmap::SIZE);
        assert_eq!(DeviceInfo::default().encode().len(), DeviceInfo::SIZE);
        assert_eq!(
            RegionInfoWire::default().encode().len(),
            RegionInfoWire::SIZE
        );
        assert_eq!(IrqInfoWire::default().encode().len(), IrqInfoWire::SIZE);
        assert_eq!(IrqSetWire::default().encode().len(), IrqSetWire::SIZE);
        assert_eq!(RegionAccess::default().encode().len(), RegionAccess::SIZE);
        assert_eq!(
            (DmaMap::SIZE, DmaUnmap::SIZE, RegionInfoWire::SIZE),
            (32, 24, 32)
        );
        assert_eq!(
            (DeviceInfo::SIZE, IrqSetWire::SIZE, RegionAccess::SIZE),
            (16, 20, 16)
        );
        assert_eq!((DeviceFeatureWire::SIZE, MigData::SIZE), (8, 8));
    }

    #[test]
    fn short_payload_is_einval() {
        assert_eq!(DmaMap::decode(&[0u8; 31]), Err(Errno::EINVAL));
    }

    #[test]
    fn command_numbers_round_trip() {
        for n in 0..32u16 {
            if let Some(c) = Command::from_u16(n) {
                assert_eq!(c as u16, n);
            }
        }
        assert!(Command::from_u16(14).is_none());
        assert!(Command::from_u16(0).is_none());
    }
}

/// DMA_READ / DMA_WRITE (server to client), in the layout QEMU's client uses
/// (`VFIOUserDMARW` in QEMU's `hw/vfio-user/protocol.h`: address u64, count u32, then
/// the data, the struct padded to 32 bytes). The spec puts a u64 count and the data at
/// payload offset 16; QEMU reads the count from the low half of that (the same bytes
/// on little-endian machines) but its data sits at payload offset 12, and its size
/// checks want the message to be at least `32 + count` bytes. So every DMA_WRITE we
/// send has its data at offset 12 and 4 bytes of padding after it, and a DMA_READ
/// reply is read from offset 12. A DMA_READ request (no data) is the same 16 bytes in
/// both layouts.
pub mod dma_rw {
    /// Offset of the data in the payload (after the 16-byte header).
    pub const DATA_OFFSET: usize = 12;
    /// Bytes after the data that make the message `32 + count` long.
    pub const TRAILER: usize = 4;
    /// Payload of a DMA_READ request.
    pub const READ_REQUEST_SIZE: usize = 16;

    /// The payload of a DMA_WRITE request carrying `data` to `address`.
    pub fn encode_write(address: u64, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(DATA_OFFSET + data.len() + TRAILER);
        p.extend_from_slice(&address.to_le_bytes());
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p.extend_from_slice(data);
        p.extend_from_slice(&[0; TRAILER]);
        p
    }

    /// The payload of a DMA_READ request for `count` bytes at `address`.
    pub fn encode_read(address: u64, count: u32) -> Vec<u8> {
        let mut p = Vec::with_capacity(READ_REQUEST_SIZE);
        p.extend_from_slice(&address.to_le_bytes());
        p.extend_from_slice(&u64::from(count).to_le_bytes());
        p
    }

    /// `(address, count, data)` of a DMA_WRITE request or a DMA_READ reply; `None` if
    /// the payload is shorter than its count says.
    pub fn decode(p: &[u8]) -> Option<(u64, u32, &[u8])> {
        let address = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
        let count = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
        let data = p.get(DATA_OFFSET..DATA_OFFSET.checked_add(count as usize)?)?;
        Some((address, count, data))
    }

    /// `(address, count)` of a DMA_READ request.
    pub fn decode_read(p: &[u8]) -> Option<(u64, u32)> {
        let address = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
        let count = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
        Some((address, count))
    }
}

#[cfg(test)]
mod dma_rw_tests {
    use super::dma_rw::*;
    use super::HEADER_SIZE;

    #[test]
    fn dma_write_is_laid_out_as_qemu_reads_it() {
        // QEMU's VFIOUserDMARW: header, offset u64 at 16, count u32 at 24, data at 28,
        // sizeof 32; it wants size >= 32 + count.
        let p = encode_write(0x1122_3344_5566_7788, &[0xaa, 0xbb, 0xcc]);
        let msg_size = HEADER_SIZE + p.len();
        assert_eq!(msg_size, 32 + 3);
        assert_eq!(&p[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&p[8..12], &3u32.to_le_bytes());
        assert_eq!(HEADER_SIZE + DATA_OFFSET, 28);
        assert_eq!(&p[12..15], &[0xaa, 0xbb, 0xcc]);
        assert_eq!(
            decode(&p),
            Some((0x1122_3344_5566_7788, 3, &[0xaa, 0xbb, 0xcc][..]))
        );
        // A read request is 32 bytes, its count readable as u32 or u64.
        let r = encode_read(0x1000, 4096);
        assert_eq!(HEADER_SIZE + r.len(), 32);
        assert_eq!(decode_read(&r), Some((0x1000, 4096)));
        // Short payloads are refused, never read past.
        assert_eq!(decode(&p[..13]), None);
        assert_eq!(decode_read(&r[..11]), None);
    }
}
