//! `mlx5_ifc.h`-style bit fields over big-endian PRM messages.
//!
//! The kernel describes every firmware message as a C struct of `u8 name[width]` bit
//! arrays and accesses them with `MLX5_GET`/`MLX5_SET`. Bits are numbered like the PRM:
//! bit 0 is the most significant bit of byte 0, and a field's bits run towards the
//! least significant end, so a 32-bit field at bit 0x40 is the big-endian word at bytes
//! 8..12. A [`Field`] names such a range; [`get`] and [`set`] read and write it.
//!
//! Buffers come from the other side and are hostile: an access that does not fit the
//! buffer, or a field wider than 64 bits, never panics. [`get`] then returns 0 and [`set`]
//! does nothing (the semantics of reading/writing past a message's end: zero-filled,
//! dropped); [`try_get`] and [`try_set`] report it as an [`IfcError`].

/// A field of a PRM layout: `bits` bits starting at bit `bit_off` (MSB of byte 0 = bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Field {
    /// First bit, counted from the MSB of byte 0.
    pub bit_off: u32,
    /// Width in bits, 1..=64.
    pub bits: u32,
}

/// Why a field access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IfcError {
    /// The field does not lie inside the buffer.
    #[error("field at bit {bit_off:#x} of {bits} bits does not fit a {len}-byte buffer")]
    OutOfRange {
        /// The field's first bit.
        bit_off: u32,
        /// The field's width.
        bits: u32,
        /// The buffer length in bytes.
        len: usize,
    },
    /// The field is 0 bits or wider than 64 bits.
    #[error("field width {bits} is not in 1..=64")]
    BadWidth {
        /// The width that came.
        bits: u32,
    },
    /// A value does not fit the field.
    #[error("value {value:#x} does not fit a {bits}-bit field")]
    ValueTooWide {
        /// The value.
        value: u64,
        /// The field's width.
        bits: u32,
    },
}

impl Field {
    /// A field of `bits` bits at `bit_off`.
    pub const fn new(bit_off: u32, bits: u32) -> Self {
        Field { bit_off, bits }
    }

    /// The same field inside a structure that starts at bit `base` of the message
    /// (e.g. an `eqc` field inside `create_eq_in`). Panics only in const evaluation of a
    /// layout table on overflow, never on guest data.
    pub const fn offset(self, base: u32) -> Self {
        Field {
            bit_off: self.bit_off + base,
            bits: self.bits,
        }
    }

    /// Element `i` of an array of such fields laid end to end (e.g. `pas[i]`), or `None`
    /// if the bit offset would overflow.
    pub fn nth(self, i: usize) -> Option<Self> {
        let i = u32::try_from(i).ok()?;
        let bit_off = self.bits.checked_mul(i)?.checked_add(self.bit_off)?;
        Some(Field {
            bit_off,
            bits: self.bits,
        })
    }

    /// Byte holding the field's first bit.
    pub const fn byte_off(self) -> usize {
        (self.bit_off / 8) as usize
    }

    /// One past the last byte the field touches.
    pub const fn end_byte(self) -> usize {
        (self.bit_off as usize + self.bits as usize).div_ceil(8)
    }

    /// Largest value the field holds.
    pub const fn max_value(self) -> u64 {
        if self.bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }

    fn check(self, len: usize) -> Result<(), IfcError> {
        if self.bits == 0 || self.bits > 64 {
            return Err(IfcError::BadWidth { bits: self.bits });
        }
        if self.end_byte() > len {
            return Err(IfcError::OutOfRange {
                bit_off: self.bit_off,
                bits: self.bits,
                len,
            });
        }
        Ok(())
    }

    /// (first byte, byte count, right shift of the field inside those bytes).
    fn span(self) -> (usize, usize, u32) {
        let first = self.byte_off();
        let end = self.end_byte();
        let end_bit = self.bit_off as usize + self.bits as usize;
        let shift = (end * 8 - end_bit) as u32;
        (first, end - first, shift)
    }
}

/// Reads `f` from `buf`; 0 if the field does not fit `buf` or has a bad width.
pub fn get(buf: &[u8], f: Field) -> u64 {
    try_get(buf, f).unwrap_or(0)
}

/// Reads `f` from `buf`.
pub fn try_get(buf: &[u8], f: Field) -> Result<u64, IfcError> {
    f.check(buf.len())?;
    let (first, n, shift) = f.span();
    // At most 9 bytes (a 64-bit field starting mid-byte): fits a u128.
    let acc = buf[first..first + n]
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    Ok(((acc >> shift) as u64) & f.max_value())
}

/// Writes the low `f.bits` bits of `v` into `f` of `buf`; does nothing if the field
/// does not fit `buf` or has a bad width. Bits of `v` above the width are dropped, as
/// `MLX5_SET` does.
pub fn set(buf: &mut [u8], f: Field, v: u64) {
    let _ = try_set(buf, f, v & f.max_value());
}

/// Writes `v` into `f` of `buf`; refuses a value wider than the field.
pub fn try_set(buf: &mut [u8], f: Field, v: u64) -> Result<(), IfcError> {
    f.check(buf.len())?;
    if v > f.max_value() {
        return Err(IfcError::ValueTooWide {
            value: v,
            bits: f.bits,
        });
    }
    let (first, n, shift) = f.span();
    let bytes = &mut buf[first..first + n];
    let mut acc = bytes
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    let mask = u128::from(f.max_value()) << shift;
    acc = (acc & !mask) | (u128::from(v) << shift);
    for (i, b) in bytes.iter_mut().rev().enumerate() {
        *b = (acc >> (8 * i)) as u8;
    }
    Ok(())
}

/// The command input header fields every command shares [IFC `mbox_in`], as [`Field`]s
/// for `get`/`set` on whole messages. Their places come from [`CmdInHeader`] and
/// [`CmdOutHeader`] (the one codec of the headers).
///
/// [`CmdInHeader`]: crate::CmdInHeader
/// [`CmdOutHeader`]: crate::CmdOutHeader
pub mod hdr {
    use super::Field;
    use crate::cmd::header::{CmdInHeader, CmdOutHeader, CMD_HEADER_SIZE};
    use core::mem::offset_of;

    /// The bit offset of a header byte offset.
    const fn at(byte: usize) -> u32 {
        (byte * 8) as u32
    }

    /// `opcode`, bytes 0–1.
    pub const OPCODE: Field = Field::new(at(offset_of!(CmdInHeader, opcode)), 16);
    /// `uid`, bytes 2–3.
    pub const UID: Field = Field::new(at(offset_of!(CmdInHeader, uid)), 16);
    /// `op_mod`, bytes 6–7.
    pub const OP_MOD: Field = Field::new(at(offset_of!(CmdInHeader, op_mod)), 16);
    /// Output `status`, byte 0 [IFC `mbox_out`].
    pub const STATUS: Field = Field::new(at(offset_of!(CmdOutHeader, status)), 8);
    /// Output `syndrome`, bytes 4–7.
    pub const SYNDROME: Field = Field::new(at(offset_of!(CmdOutHeader, syndrome)), 32);
    /// Length of either header.
    pub const HDR_LEN: usize = CMD_HEADER_SIZE;

    const _: () = {
        assert!(OPCODE.bit_off == 0x00 && UID.bit_off == 0x10 && OP_MOD.bit_off == 0x30);
        assert!(STATUS.bit_off == 0x00 && SYNDROME.bit_off == 0x20);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first_numbering_matches_mlx5_get() {
        let buf = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11];
        assert_eq!(get(&buf, Field::new(0, 8)), 0x12);
        assert_eq!(get(&buf, Field::new(0, 32)), 0x1234_5678);
        assert_eq!(get(&buf, Field::new(0, 1)), 0);
        assert_eq!(get(&buf, Field::new(3, 1)), 1); // 0x12 = 0001_0010
        assert_eq!(get(&buf, Field::new(4, 8)), 0x23);
        assert_eq!(get(&buf, Field::new(0, 64)), 0x1234_5678_9abc_def0);
        assert_eq!(get(&buf, Field::new(4, 64)), 0x2345_6789_abcd_ef01);
        assert_eq!(get(&buf, Field::new(0x44, 4)), 0x1);
        assert_eq!(get(&buf, Field::new(0x3c, 4)), 0x0);
        assert_eq!(get(&buf, Field::new(0x38, 4)), 0xf);
    }

    #[test]
    fn set_touches_only_the_field() {
        let mut buf = [0xffu8; 4];
        set(&mut buf, Field::new(4, 8), 0);
        assert_eq!(buf, [0xf0, 0x0f, 0xff, 0xff]);
        set(&mut buf, Field::new(4, 8), 0xa5);
        assert_eq!(buf, [0xfa, 0x5f, 0xff, 0xff]);
        let mut buf = [0u8; 12];
        set(&mut buf, Field::new(0x20, 64), 0x0102_0304_0506_0708);
        assert_eq!(&buf[4..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut buf = [0u8; 10];
        set(&mut buf, Field::new(5, 64), u64::MAX);
        assert_eq!(get(&buf, Field::new(5, 64)), u64::MAX);
        assert_eq!(get(&buf, Field::new(0, 5)), 0);
        assert_eq!(get(&buf, Field::new(69, 11)), 0);
    }

    #[test]
    fn set_truncates_like_mlx5_set_but_try_set_refuses() {
        let mut buf = [0u8; 2];
        set(&mut buf, Field::new(0, 4), 0x1f);
        assert_eq!(buf, [0xf0, 0]);
        assert_eq!(
            try_set(&mut buf, Field::new(0, 4), 0x10),
            Err(IfcError::ValueTooWide {
                value: 0x10,
                bits: 4
            })
        );
    }

    #[test]
    fn out_of_range_and_bad_widths_never_panic() {
        let mut buf = [0xffu8; 4];
        assert_eq!(get(&buf, Field::new(0x18, 16)), 0);
        assert_eq!(
            try_get(&buf, Field::new(0x18, 16)),
            Err(IfcError::OutOfRange {
                bit_off: 0x18,
                bits: 16,
                len: 4
            })
        );
        assert_eq!(get(&buf, Field::new(0, 65)), 0);
        assert_eq!(get(&buf, Field::new(0, 0)), 0);
        assert_eq!(get(&buf, Field::new(u32::MAX, 64)), 0);
        assert_eq!(get(&[], Field::new(0, 1)), 0);
        set(&mut buf, Field::new(0x1f, 2), 0);
        set(&mut buf, Field::new(u32::MAX - 3, 64), 0);
        assert_eq!(buf, [0xff; 4]);
        assert_eq!(Field::new(0x80, 64).nth(usize::MAX), None);
        assert_eq!(Field::new(u32::MAX, 64).nth(1), None);
    }

    #[test]
    fn arrays_and_sub_structures() {
        let pas = Field::new(0x880, 64);
        assert_eq!(pas.nth(0), Some(pas));
        assert_eq!(pas.nth(2).unwrap().byte_off(), 0x110 + 16);
        assert_eq!(Field::new(0x63, 5).offset(0x80).byte_off(), 0x1c);
        assert_eq!(Field::new(0x60, 32).end_byte(), 16);
        assert_eq!(Field::new(0x61, 1).end_byte(), 13);
    }

    #[test]
    fn header_fields_match_the_zerocopy_headers() {
        use crate::cmd::{CmdInHeader, CmdOutHeader, CmdStatus};
        use crate::Opcode;
        use zerocopy::IntoBytes;
        let mut h = CmdInHeader::new(Opcode::QueryHcaCap, 0x41);
        h.uid.set(7);
        let b = h.as_bytes();
        assert_eq!(get(b, hdr::OPCODE), 0x100);
        assert_eq!(get(b, hdr::UID), 7);
        assert_eq!(get(b, hdr::OP_MOD), 0x41);
        let o = CmdOutHeader::new(CmdStatus::BadOpErr, 0xdead_beef);
        assert_eq!(get(o.as_bytes(), hdr::STATUS), 2);
        assert_eq!(get(o.as_bytes(), hdr::SYNDROME), 0xdead_beef);
    }
}
