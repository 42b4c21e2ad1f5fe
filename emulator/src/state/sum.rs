//! The image checksum (since format version 2): CRC32C of every 4 KiB block of the image
//! body, then xxh3-64 of those block CRCs.
//!
//! Version 1 took xxh3-64 of the whole body. On the machines this runs on a copy that
//! is then hashed that way runs at about half the speed of a memcpy (xxh3 is compute
//! bound there, as fast as the copy on its own), which is where SAVE and LOAD spent
//! half their time. CRC32C has an instruction (SSE4.2 `crc32`) with one result per
//! cycle and a latency of three: the blocks are independent, so three of them are
//! summed interleaved and the instruction's throughput, not its latency, sets the
//! speed — faster than the copy, and run on bytes still in cache from it. Folding the
//! block CRCs with xxh3 costs one 4-byte value per 4 KiB. docs/PERFORMANCE.md has the
//! measurements that chose this.
//!
//! Blocks are the body's bytes at image offsets `k × 4096 .. (k + 1) × 4096` (the last
//! one shorter), whatever the sections are; [`Sum`] takes the body in pieces of any
//! size, in order.

use xxhash_rust::xxh3::Xxh3Default;

/// Bytes of a checksum block.
pub const BLOCK: usize = 4096;

/// Block CRCs gathered before they are folded into the xxh3 state.
const FOLD: usize = 64;

/// The streaming checksum of an image body.
pub struct Sum {
    /// Bytes of a block not yet complete (`fill` of them).
    partial: Box<[u8; BLOCK]>,
    fill: usize,
    crcs: [u32; FOLD],
    ncrcs: usize,
    fold: Xxh3Default,
    hw: bool,
}

impl Default for Sum {
    fn default() -> Self {
        Self::new()
    }
}

impl Sum {
    pub fn new() -> Self {
        Sum {
            partial: Box::new([0; BLOCK]),
            fill: 0,
            crcs: [0; FOLD],
            ncrcs: 0,
            fold: Xxh3Default::new(),
            hw: hw(),
        }
    }

    /// Adds the next `b.len()` bytes of the body.
    pub fn update(&mut self, mut b: &[u8]) {
        if self.fill > 0 {
            let n = (BLOCK - self.fill).min(b.len());
            self.partial[self.fill..self.fill + n].copy_from_slice(&b[..n]);
            self.fill += n;
            b = &b[n..];
            if self.fill < BLOCK {
                return;
            }
            let c = crc32c(self.hw, &self.partial[..]);
            self.push(c);
            self.fill = 0;
        }
        let mut groups = b.chunks_exact(3 * BLOCK);
        for g in &mut groups {
            let (x, y, z) = crc32c_3(self.hw, g);
            self.push(x);
            self.push(y);
            self.push(z);
        }
        let mut blocks = groups.remainder().chunks_exact(BLOCK);
        for blk in &mut blocks {
            let c = crc32c(self.hw, blk);
            self.push(c);
        }
        let rest = blocks.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.fill = rest.len();
    }

    /// Adds the CRCs of whole blocks that come next, summed elsewhere ([`copy3`]). The
    /// body so far must be a whole number of blocks (the pages of an image start on a
    /// block boundary).
    pub fn blocks(&mut self, crcs: &[u32]) {
        assert_eq!(self.fill, 0, "block CRCs added in the middle of a block");
        for &c in crcs {
            self.push(c);
        }
    }

    /// The block CRCs of three whole blocks (summed here, three interleaved).
    pub fn crc3(&self, a: &[u8], b: &[u8], c: &[u8]) -> [u32; 3] {
        if a.len() == BLOCK && b.len() == BLOCK && c.len() == BLOCK {
            #[cfg(target_arch = "x86_64")]
            if self.hw {
                // SAFETY: `hw` is true only when the CPU has SSE4.2 (`self::hw`).
                let (x, y, z) = unsafe { x86::crc_hw_3(a, b, c) };
                return [!x, !y, !z];
            }
        }
        [crc32c(self.hw, a), crc32c(self.hw, b), crc32c(self.hw, c)]
    }

    fn push(&mut self, crc: u32) {
        self.crcs[self.ncrcs] = crc;
        self.ncrcs += 1;
        if self.ncrcs == FOLD {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let mut b = [0u8; FOLD * 4];
        for (o, c) in b.chunks_exact_mut(4).zip(&self.crcs[..self.ncrcs]) {
            o.copy_from_slice(&c.to_le_bytes());
        }
        self.fold.update(&b[..self.ncrcs * 4]);
        self.ncrcs = 0;
    }

    /// The checksum of everything added.
    pub fn finish(mut self) -> u64 {
        if self.fill > 0 {
            let c = crc32c(self.hw, &self.partial[..self.fill]);
            self.push(c);
        }
        self.flush();
        self.fold.digest()
    }
}

/// Whether [`copy3`] can run here (x86_64 with SSE4.2 and AVX2).
pub fn can_copy3() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sse4.2") && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Copies three blocks of [`BLOCK`] bytes, `src`, to `dst`, `dst + BLOCK` and
/// `dst + 2 × BLOCK` and returns their block CRCs, in one pass: each 32 bytes are
/// loaded once, stored past the cache (non-temporal: the consumer is the client) and
/// summed, the three blocks interleaved so the CRC unit and the memory system both
/// stay busy. Returns `None` (nothing done) where [`can_copy3`] is false, `dst` is not
/// 32-byte aligned or a block is not [`BLOCK`] bytes.
///
/// # Safety
/// `dst .. dst + 3 × BLOCK` must be writable and must not overlap the sources.
pub unsafe fn copy3(dst: *mut u8, src: [&[u8]; 3]) -> Option<[u32; 3]> {
    if !can_copy3() || !(dst as usize).is_multiple_of(32) || src.iter().any(|b| b.len() != BLOCK) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has SSE4.2 and AVX2 (checked above); the caller's contract
        // covers `dst`; the sources are whole blocks (checked above).
        let (x, y, z) = unsafe { x86::copy_crc_3(dst, src[0], src[1], src[2]) };
        Some([!x, !y, !z])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dst;
        None
    }
}

/// The checksum of a whole body at once.
pub fn checksum(body: &[u8]) -> u64 {
    let mut s = Sum::new();
    s.update(body);
    s.finish()
}

/// Whether the CPU has the CRC32C instruction (detected once; std caches it).
fn hw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sse4.2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// CRC32C (Castagnoli, reflected, init and final xor all ones) of `b`.
fn crc32c(hw: bool, b: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if hw {
        // SAFETY: `hw` is true only when the CPU has SSE4.2 (`self::hw`).
        return !unsafe { x86::crc_hw(!0, b) };
    }
    let _ = hw;
    !crc_table(!0, b)
}

/// CRC32C of three consecutive blocks of `g` (`3 × BLOCK` bytes), each on its own.
fn crc32c_3(hw: bool, g: &[u8]) -> (u32, u32, u32) {
    let (a, rest) = g.split_at(BLOCK);
    let (b, c) = rest.split_at(BLOCK);
    #[cfg(target_arch = "x86_64")]
    if hw {
        // SAFETY: `hw` is true only when the CPU has SSE4.2 (`self::hw`).
        let (x, y, z) = unsafe { x86::crc_hw_3(a, b, c) };
        return (!x, !y, !z);
    }
    (crc32c(hw, a), crc32c(hw, b), crc32c(hw, c))
}

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Byte-wise CRC32C update (no pre or post inversion), for CPUs without the instruction.
fn crc_table(mut c: u32, b: &[u8]) -> u32 {
    for &x in b {
        c = TABLE[((c ^ u32::from(x)) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_crc32_u64, _mm_crc32_u8,
    };

    /// Copies three [`super::BLOCK`]-byte blocks to `dst` (32-byte aligned), one after
    /// the other, with non-temporal stores, and returns their CRC32C updates (from all
    /// ones, no post inversion), in one pass.
    ///
    /// # Safety
    /// The CPU must have SSE4.2 and AVX2; `dst .. dst + 3 × BLOCK` writable, 32-byte
    /// aligned and not overlapping the blocks, each of which is `BLOCK` bytes.
    #[target_feature(enable = "sse4.2,avx2")]
    pub(super) unsafe fn copy_crc_3(dst: *mut u8, a: &[u8], b: &[u8], c: &[u8]) -> (u32, u32, u32) {
        const B: usize = super::BLOCK;
        debug_assert!(a.len() == B && b.len() == B && c.len() == B);
        let (mut x, mut y, mut z) = (u64::from(!0u32), u64::from(!0u32), u64::from(!0u32));
        let (pa, pb, pc) = (a.as_ptr(), b.as_ptr(), c.as_ptr());
        let mut i = 0;
        while i < B {
            // SAFETY: `i + 32 <= B`, inside each block and inside `dst`'s three blocks
            // (the caller's contract); unaligned loads, aligned streaming stores.
            unsafe {
                let va = _mm256_loadu_si256(pa.add(i).cast::<__m256i>());
                let vb = _mm256_loadu_si256(pb.add(i).cast::<__m256i>());
                let vc = _mm256_loadu_si256(pc.add(i).cast::<__m256i>());
                _mm256_stream_si256(dst.add(i).cast::<__m256i>(), va);
                _mm256_stream_si256(dst.add(B + i).cast::<__m256i>(), vb);
                _mm256_stream_si256(dst.add(2 * B + i).cast::<__m256i>(), vc);
                for k in (0..32).step_by(8) {
                    x = _mm_crc32_u64(x, pa.add(i + k).cast::<u64>().read_unaligned());
                    y = _mm_crc32_u64(y, pb.add(i + k).cast::<u64>().read_unaligned());
                    z = _mm_crc32_u64(z, pc.add(i + k).cast::<u64>().read_unaligned());
                }
            }
            i += 32;
        }
        (x as u32, y as u32, z as u32)
    }

    fn word(b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    }

    /// CRC32C update of `b` (no pre or post inversion).
    ///
    /// # Safety
    /// The CPU must have SSE4.2.
    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn crc_hw(c: u32, b: &[u8]) -> u32 {
        let mut c = u64::from(c);
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            c = _mm_crc32_u64(c, word(w));
        }
        let mut c = c as u32;
        for &x in words.remainder() {
            c = _mm_crc32_u8(c, x);
        }
        c
    }

    /// CRC32C updates (from all ones, no post inversion) of three equal-length blocks,
    /// interleaved so the instruction's latency overlaps.
    ///
    /// # Safety
    /// The CPU must have SSE4.2.
    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn crc_hw_3(a: &[u8], b: &[u8], c: &[u8]) -> (u32, u32, u32) {
        debug_assert!(a.len() == b.len() && b.len() == c.len() && a.len().is_multiple_of(8));
        let (mut x, mut y, mut z) = (u64::from(!0u32), u64::from(!0u32), u64::from(!0u32));
        for ((p, q), r) in a
            .chunks_exact(8)
            .zip(b.chunks_exact(8))
            .zip(c.chunks_exact(8))
        {
            x = _mm_crc32_u64(x, word(p));
            y = _mm_crc32_u64(y, word(q));
            z = _mm_crc32_u64(z, word(r));
        }
        (x as u32, y as u32, z as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value (RFC 3720's polynomial): "123456789".
        assert_eq!(crc32c(false, b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(hw(), b"123456789"), 0xe306_9283);
    }

    #[test]
    fn hardware_and_table_agree_and_pieces_do_not_matter() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..5 * BLOCK + 1234)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let g = &data[..3 * BLOCK];
        let soft = (
            crc32c(false, &g[..BLOCK]),
            crc32c(false, &g[BLOCK..2 * BLOCK]),
            crc32c(false, &g[2 * BLOCK..]),
        );
        assert_eq!(crc32c_3(hw(), g), soft);
        assert_eq!(crc32c_3(false, g), soft);
        let whole = checksum(&data);
        for cut in [
            1usize,
            7,
            4095,
            4096,
            4097,
            3 * BLOCK,
            3 * BLOCK + 5,
            20_000,
        ] {
            let mut s = Sum::new();
            for piece in data.chunks(cut) {
                s.update(piece);
            }
            assert_eq!(s.finish(), whole, "pieces of {cut}");
        }
        let mut soft_sum = Sum::new();
        soft_sum.hw = false;
        soft_sum.update(&data);
        assert_eq!(soft_sum.finish(), whole);
        // Every block counts, and so does where it ends.
        let mut flip = data.clone();
        flip[4 * BLOCK + 3] ^= 1;
        assert_ne!(checksum(&flip), whole);
        assert_ne!(checksum(&data[..data.len() - 1]), whole);
        assert_ne!(checksum(&[]), checksum(&[0]));
        // The fused copy: the same bytes land, the same CRCs come out.
        if can_copy3() {
            #[repr(align(32))]
            struct Dst([u8; 3 * BLOCK]);
            let mut dst = Box::new(Dst([0; 3 * BLOCK]));
            let src = [
                &data[1..=BLOCK],
                &data[BLOCK..2 * BLOCK],
                &data[7..BLOCK + 7],
            ];
            // SAFETY: `dst` is 3 blocks of our own, 32-byte aligned, apart from `data`.
            let crcs = unsafe { copy3(dst.0.as_mut_ptr(), src) }.unwrap();
            assert_eq!(
                crcs,
                [
                    crc32c(false, src[0]),
                    crc32c(false, src[1]),
                    crc32c(false, src[2])
                ]
            );
            assert_eq!(&dst.0[..BLOCK], src[0]);
            assert_eq!(&dst.0[2 * BLOCK..], src[2]);
            // SAFETY: as above; a misaligned destination is refused, nothing written.
            assert!(unsafe { copy3(dst.0.as_mut_ptr().add(8), src) }.is_none());
        }
    }
}
