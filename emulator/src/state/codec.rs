//! Little-endian writer and bounded reader for the section bodies of the image.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::StateError;

/// Appends little-endian fields.
pub(super) struct W(pub(super) Vec<u8>);

impl W {
    pub(super) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A fixed-layout struct from `mlx5_prm::state_image`.
    pub(super) fn put<T: IntoBytes + Immutable>(&mut self, v: &T) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub(super) fn count(&mut self, n: usize) -> &mut Self {
        // Counts are bounded by the firmware's tables, far below u32::MAX.
        self.u32(n as u32)
    }
}

/// A bounded little-endian reader over one section: every read is checked against the
/// bytes left, and every count against them before anything is allocated for it.
pub(super) struct R<'a> {
    pub(super) b: &'a [u8],
    pub(super) section: &'static str,
}

impl<'a> R<'a> {
    pub(super) fn new(b: &'a [u8], section: &'static str) -> Self {
        R { b, section }
    }
    pub(super) fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], StateError> {
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
    /// A fixed-layout struct from `mlx5_prm::state_image`.
    pub(super) fn get<T: FromBytes + KnownLayout + Immutable>(
        &mut self,
        what: &'static str,
    ) -> Result<T, StateError> {
        let b = self.take(size_of::<T>() as u64, what)?;
        // `take` returned exactly size_of::<T>() bytes.
        T::read_from_bytes(b).map_err(|_| StateError::Truncated {
            section: self.section,
            what,
            need: size_of::<T>() as u64,
            have: b.len(),
        })
    }
    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count of elements of `elem` bytes each, checked against the bytes left before
    /// anything is allocated for it.
    pub(super) fn count(&mut self, elem: usize, what: &'static str) -> Result<usize, StateError> {
        let n = self.u32(what)?;
        self.fits(n, elem, what)
    }
    /// `n` elements of `elem` bytes each fit in the bytes left.
    pub(super) fn fits(
        &self,
        n: u32,
        elem: usize,
        what: &'static str,
    ) -> Result<usize, StateError> {
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
    pub(super) fn u64s(&mut self, what: &'static str) -> Result<Vec<u64>, StateError> {
        let n = self.count(8, what)?;
        (0..n).map(|_| self.u64(what)).collect()
    }
    pub(super) fn u32s(&mut self, what: &'static str) -> Result<Vec<u32>, StateError> {
        let n = self.count(4, what)?;
        (0..n).map(|_| self.u32(what)).collect()
    }
    /// Whether every byte was read.
    pub(super) fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
    pub(super) fn end(&self) -> Result<(), StateError> {
        if !self.b.is_empty() {
            return Err(StateError::Trailing {
                section: self.section,
                left: self.b.len(),
            });
        }
        Ok(())
    }
}

/// Reserved bytes must be zero.
pub(super) fn zeroed(b: &[u8], what: &'static str) -> Result<(), StateError> {
    match b.iter().find(|&&x| x != 0) {
        Some(&x) => Err(bad(what, u64::from(x), "0 (reserved)")),
        None => Ok(()),
    }
}

pub(super) fn bad(what: &'static str, got: u64, want: &'static str) -> StateError {
    StateError::BadValue { what, got, want }
}

pub(super) fn flag(v: u8, what: &'static str) -> Result<bool, StateError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad(what, v.into(), "0 or 1")),
    }
}
