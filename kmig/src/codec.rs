//! The pure parts shared by the guest tool and the host tests: the records of the
//! mlx5 migration stream, base64 for carrying bytes over the serial console, and the
//! device-memory pattern and digest both sides compute.
//!
//! Everything here takes hostile bytes (a stream read from a kernel, a console line)
//! and answers with a typed error, never a panic; nothing allocates more than its
//! input's size.

use std::fmt;

pub use mlx5_prm::migration_stream::{
    RecordHeader, FLAGS_TAG_OPTIONAL as FLAG_OPTIONAL, RECORD_HEADER_LEN, TAG_FW_DATA,
    TAG_STOP_COPY_SIZE,
};

/// One record of an mlx5 migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Offset of the record's header in the stream.
    pub offset: usize,
    /// Payload bytes after the header.
    pub size: u64,
    /// The header's flags.
    pub flags: u32,
    /// The header's tag.
    pub tag: u32,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.tag {
            TAG_FW_DATA => "FW_DATA".to_string(),
            TAG_STOP_COPY_SIZE => "STOP_COPY_SIZE".to_string(),
            t => format!("{t:#x}"),
        };
        write!(
            f,
            "@{} tag={tag} flags={:#x} size={}",
            self.offset, self.flags, self.size
        )
    }
}

/// Why a stream or a console payload does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The stream ends inside a record header.
    ShortHeader {
        /// Where the header starts.
        offset: usize,
        /// Bytes left.
        left: usize,
    },
    /// A record's payload runs past the end of the stream.
    ShortPayload {
        /// The record.
        record: Record,
        /// Bytes left after its header.
        left: usize,
    },
    /// A mandatory record of a tag no mlx5vf reader knows.
    UnknownMandatory(Record),
    /// A character outside the base64 alphabet, or misplaced padding.
    Base64 {
        /// Its position in the text.
        at: usize,
    },
    /// The console's data lines of one name are out of order or missing.
    Sequence {
        /// The name.
        name: String,
        /// The sequence number expected next.
        want: u64,
        /// The one found.
        got: u64,
    },
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::ShortHeader { offset, left } => write!(
                f,
                "stream ends inside the record header at {offset}: {left} of {RECORD_HEADER_LEN} bytes"
            ),
            CodecError::ShortPayload { record, left } => write!(
                f,
                "record {record} runs past the end of the stream: {left} payload bytes left"
            ),
            CodecError::UnknownMandatory(r) => {
                write!(f, "record {r}: unknown tag and not optional (mlx5vf refuses it with EOPNOTSUPP)")
            }
            CodecError::Base64 { at } => write!(f, "base64: invalid character or padding at {at}"),
            CodecError::Sequence { name, want, got } => write!(
                f,
                "console data {name}: line {got} where {want} was expected (lines lost or reordered)"
            ),
        }
    }
}

impl std::error::Error for CodecError {}

/// The records of `stream`, checked as mlx5vf's resume parser checks them: whole
/// headers and payloads, and no mandatory record of an unknown tag.
pub fn records(stream: &[u8]) -> Result<Vec<Record>, CodecError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < stream.len() {
        let left = stream.len() - at;
        let Some(h) = RecordHeader::parse(&stream[at..]) else {
            return Err(CodecError::ShortHeader { offset: at, left });
        };
        let size = h.record_size.get();
        let record = Record {
            offset: at,
            size,
            flags: h.flags.get(),
            tag: h.tag.get(),
        };
        let after = left - RECORD_HEADER_LEN;
        if size > after as u64 {
            return Err(CodecError::ShortPayload {
                record,
                left: after,
            });
        }
        if !matches!(record.tag, TAG_FW_DATA | TAG_STOP_COPY_SIZE) && !h.is_optional() {
            return Err(CodecError::UnknownMandatory(record));
        }
        out.push(record);
        at += RECORD_HEADER_LEN + size as usize;
    }
    Ok(out)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = u32::from(c[0]) << 16
            | u32::from(*c.get(1).unwrap_or(&0)) << 8
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes [`base64_encode`]'s output (padding required, no whitespace).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, CodecError> {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(4) {
        return Err(CodecError::Base64 { at: b.len() });
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (q, quad) in b.chunks(4).enumerate() {
        let last = q + 1 == b.len() / 4;
        let mut n = 0u32;
        let mut pad = 0;
        for (i, &ch) in quad.iter().enumerate() {
            let at = q * 4 + i;
            let v = match ch {
                b'A'..=b'Z' => ch - b'A',
                b'a'..=b'z' => ch - b'a' + 26,
                b'0'..=b'9' => ch - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' if last && i >= 2 => {
                    pad += 1;
                    0
                }
                _ => return Err(CodecError::Base64 { at }),
            };
            if pad > 0 && ch != b'=' {
                return Err(CodecError::Base64 { at });
            }
            n = n << 6 | u32::from(v);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Ok(out)
}

/// Bytes of payload per console data line (1024 base64 characters).
pub const CONSOLE_CHUNK: usize = 768;
/// The marker of a console data line: `MLX5EMU-KMIG-DATA name=N seq=S b64=...`.
pub const DATA_MARKER: &str = "MLX5EMU-KMIG-DATA";

/// `data` as console lines named `name` (no spaces in it), then an end line
/// `MLX5EMU-KMIG-DATA-END name=N lines=L bytes=B digest=D`.
pub fn console_lines(name: &str, data: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = data
        .chunks(CONSOLE_CHUNK)
        .enumerate()
        .map(|(i, c)| format!("{DATA_MARKER} name={name} seq={i} b64={}", base64_encode(c)))
        .collect();
    out.push(format!(
        "{DATA_MARKER}-END name={name} lines={} bytes={} digest={:016x}",
        out.len(),
        data.len(),
        digest(data)
    ));
    out
}

/// The data named `name` from console text made of [`console_lines`] output (other
/// lines, and other names, ignored; a marker may follow other text on its line).
/// `None` if no end line of that name was found.
pub fn from_console(text: &str, name: &str) -> Result<Option<Vec<u8>>, CodecError> {
    let mut data = Vec::new();
    let mut want = 0u64;
    for line in text.lines() {
        let Some(at) = line.find(DATA_MARKER) else {
            continue;
        };
        let mut words = line[at..].split_whitespace();
        let kind = words.next().unwrap_or("");
        let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
        let get = |k: &str| fields.iter().find(|(kk, _)| *kk == k).map(|(_, v)| *v);
        if get("name") != Some(name) {
            continue;
        }
        let num = |k: &str| {
            get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        if kind == DATA_MARKER {
            let got = num("seq");
            if got != want {
                return Err(CodecError::Sequence {
                    name: name.into(),
                    want,
                    got,
                });
            }
            data.extend(base64_decode(get("b64").unwrap_or(""))?);
            want += 1;
        } else if kind == format!("{DATA_MARKER}-END") {
            let lines = num("lines");
            if lines != want {
                return Err(CodecError::Sequence {
                    name: name.into(),
                    want: lines,
                    got: want,
                });
            }
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// A 64-bit FNV-1a digest of `data` (to compare device memory across the console).
pub fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `len` bytes of a pattern determined by `seed` (xorshift64; a zero seed is
/// replaced, it would give zeros), to write into device memory on one side and
/// recompute on the other. The host tests' `mlx5_testbed::devmem::pattern` is this.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = if seed == 0 {
        0x9e37_79b9_7f4a_7c15
    } else {
        seed
    };
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(size: u64, flags: u32, tag: u32) -> Vec<u8> {
        let mut v = RecordHeader::new(size, flags, tag).to_bytes().to_vec();
        v.extend(std::iter::repeat_n(0xa5, size as usize));
        v
    }

    #[test]
    fn records_walk_what_mlx5vf_writes() {
        let mut s = rec(8, FLAG_OPTIONAL, TAG_STOP_COPY_SIZE);
        s.extend(rec(100, 0, TAG_FW_DATA));
        s.extend(rec(3, FLAG_OPTIONAL, 0x40));
        s.extend(rec(0, 0, TAG_FW_DATA));
        let r = records(&s).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.offset, r.size, r.tag))
                .collect::<Vec<_>>(),
            [(0, 8, 1), (24, 100, 0), (140, 3, 0x40), (159, 0, 0)]
        );
        assert_eq!(records(&[]).unwrap(), []);
        assert!(r[1].to_string().contains("tag=FW_DATA"));
    }

    #[test]
    fn records_refuse_truncated_and_unknown_mandatory() {
        let s = rec(100, 0, TAG_FW_DATA);
        assert_eq!(
            records(&s[..10]),
            Err(CodecError::ShortHeader {
                offset: 0,
                left: 10
            })
        );
        assert!(matches!(
            records(&s[..50]),
            Err(CodecError::ShortPayload { left: 34, .. })
        ));
        assert!(matches!(
            records(&rec(1, 0, 7)),
            Err(CodecError::UnknownMandatory(Record { tag: 7, .. }))
        ));
        // A size near u64::MAX neither overflows nor allocates.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend([0; 8]);
        assert!(matches!(
            records(&huge),
            Err(CodecError::ShortPayload { .. })
        ));
    }

    #[test]
    fn base64_round_trips_and_refuses_junk() {
        for len in 0..40 {
            let d = pattern(len, len as u64);
            let e = base64_encode(&d);
            assert_eq!(e.len() % 4, 0);
            assert_eq!(base64_decode(&e).unwrap(), d);
        }
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64_decode("Zm9"), Err(CodecError::Base64 { at: 3 }));
        assert_eq!(base64_decode("Zm9v!g=="), Err(CodecError::Base64 { at: 4 }));
        assert_eq!(base64_decode("Zm=vYg=="), Err(CodecError::Base64 { at: 2 }));
        assert_eq!(base64_decode("Zg=a"), Err(CodecError::Base64 { at: 3 }));
    }

    #[test]
    fn console_lines_carry_data_among_other_output() {
        let d = pattern(3 * CONSOLE_CHUNK + 5, 9);
        let mut text = String::from("boot noise\n");
        for l in console_lines("stream", &d) {
            text.push_str("[  1.0] kernel says hi ");
            text.push_str(&l);
            text.push('\n');
        }
        text.push_str(&console_lines("other", b"x").join("\n"));
        assert_eq!(from_console(&text, "stream").unwrap(), Some(d.clone()));
        assert_eq!(from_console(&text, "other").unwrap(), Some(b"x".to_vec()));
        assert_eq!(from_console(&text, "missing").unwrap(), None);
        // A lost line is named.
        let lines = console_lines("s", &d);
        let lossy: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| !l.contains("seq=1 "))
            .collect();
        assert_eq!(
            from_console(&lossy.join("\n"), "s"),
            Err(CodecError::Sequence {
                name: "s".into(),
                want: 1,
                got: 2
            })
        );
        assert!(console_lines("e", b"").len() == 1);
        assert_eq!(
            from_console(&console_lines("e", b"").join("\n"), "e").unwrap(),
            Some(vec![])
        );
    }

    #[test]
    fn pattern_and_digest_are_deterministic() {
        assert_eq!(pattern(4096, 1), pattern(4096, 1));
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_eq!(&pattern(4096, 1)[..100], &pattern(100, 1)[..]);
        assert!(pattern(4096, 0).chunks(8).all(|c| c != [0; 8]));
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(digest(&pattern(64, 1)), digest(&pattern(64, 2)));
    }
}
