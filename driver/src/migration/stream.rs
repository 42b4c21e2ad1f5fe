//! The migration stream mlx5vf writes on its saving fd and parses on its resuming fd
//! (`kernel-mlx5vf.md` §3.4).
//!
//! ```text
//! record := header(16) payload(record_size)
//! header := le64 record_size | le32 flags (0 MANDATORY, 1 OPTIONAL) | le32 tag
//! stream := {8, OPTIONAL, STOP_COPY_SIZE} le64 stop_copy_size    (24 bytes, first)
//!           {N, MANDATORY, FW_DATA} N opaque firmware-image bytes (one per SAVE) ...
//! ```
//!
//! The resume side is hostile input: [`ResumeParser`] accepts any split of the stream
//! into writes (byte by byte included), keeps only a 16-byte header and an 8-byte
//! STOP_COPY_SIZE payload of its own, and hands image bytes to a [`RecordSink`] as they
//! come; the sink issues one LOAD per complete FW_DATA record. It refuses a record
//! larger than `MAX_LOAD_SIZE` (ENOMEM) and an unknown mandatory tag (EOPNOTSUPP), and
//! skips unknown optional records. The first error is sticky: every later write
//! returns ENODEV, as mlx5vf's migf in `MLX5_MIGF_STATE_ERROR`.

use mlx5_prm::cmd::migration::MAX_LOAD_SIZE;
pub use mlx5_prm::migration_stream::RecordHeader;
use mlx5_prm::migration_stream::{
    RECORD_HEADER_LEN, STOP_COPY_SIZE_PAYLOAD_LEN as STOP_COPY_SIZE_PAYLOAD, TAG_FW_DATA,
    TAG_STOP_COPY_SIZE,
};

/// The complete STOP_COPY_SIZE record (24 bytes) announcing `size`.
pub fn stop_copy_size_record(size: u64) -> Vec<u8> {
    let mut v = RecordHeader::stop_copy_size().to_bytes().to_vec();
    v.extend_from_slice(&size.to_le_bytes());
    v
}

/// A failure of the sink (buffer allocation, DMA write, LOAD).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// Negative errno.
    pub errno: i32,
    pub message: String,
    /// The device can no longer be trusted (a LOAD failed after another one applied,
    /// or a command never completed): the device goes to ERROR.
    pub fatal: bool,
    /// The firmware cannot be reached (a command never completed, the transport or
    /// the PF's health failed): the file is dropped without firmware cleanup.
    pub unreachable: bool,
}

/// Why the resume side refused the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error(
        "record of {size} bytes exceeds MAX_LOAD_SIZE ({MAX_LOAD_SIZE}) at stream offset {offset}"
    )]
    TooLarge { size: u64, offset: u64 },
    #[error("unknown mandatory record tag {tag:#x} (flags {flags:#x}) at stream offset {offset}")]
    UnknownMandatoryTag { tag: u32, flags: u32, offset: u64 },
    #[error("STOP_COPY_SIZE record of {size} bytes, expected at least {STOP_COPY_SIZE_PAYLOAD}, at stream offset {offset}")]
    BadStopCopySize { size: u64, offset: u64 },
    #[error("empty FW_DATA record at stream offset {offset}")]
    EmptyImage { offset: u64 },
    #[error(
        "stream ends inside a record: {missing} bytes of {what} missing at stream offset {offset}"
    )]
    Truncated {
        what: &'static str,
        missing: u64,
        offset: u64,
    },
    #[error("loading the record at stream offset {offset}: {source}")]
    Sink {
        offset: u64,
        #[source]
        source: SinkError,
    },
    #[error("the resuming file failed earlier ({first}); later writes are refused until the device is reset")]
    Closed { first: Box<StreamError> },
}

impl StreamError {
    /// The negative errno mlx5vf returns for it.
    pub fn errno(&self) -> i32 {
        match self {
            StreamError::TooLarge { .. } => -libc::ENOMEM,
            StreamError::UnknownMandatoryTag { .. } => -libc::EOPNOTSUPP,
            StreamError::BadStopCopySize { .. }
            | StreamError::EmptyImage { .. }
            | StreamError::Truncated { .. } => -libc::EINVAL,
            StreamError::Sink { source, .. } => source.errno,
            StreamError::Closed { .. } => -libc::ENODEV,
        }
    }

    /// Whether the device can no longer be trusted.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StreamError::Sink { source, .. } if source.fatal)
    }
}

/// Where the parser puts image bytes: mlx5vf's resume data buffer and LOAD.
pub trait RecordSink {
    /// A FW_DATA record of `size` bytes starts; `prep_size` is the STOP_COPY_SIZE the
    /// stream announced (capped at MAX_LOAD_SIZE), 0 if none (PREP_IMAGE).
    fn prepare(&mut self, size: u64, prep_size: u64) -> Result<(), SinkError>;
    /// Bytes `offset..offset + data.len()` of the current record's image.
    fn image_bytes(&mut self, offset: u64, data: &[u8]) -> Result<(), SinkError>;
    /// The current record is complete: LOAD its `size` bytes (LOAD_IMAGE).
    fn load(&mut self, size: u64) -> Result<(), SinkError>;
}

/// mlx5vf's `load_state`, with the bytes gathered so far.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// READ_HEADER: `have` of 16 header bytes.
    Header {
        buf: [u8; RECORD_HEADER_LEN],
        have: usize,
    },
    /// READ_HEADER_DATA of STOP_COPY_SIZE: the first 8 payload bytes are kept, the
    /// rest (if any) skipped.
    StopCopySize {
        size: u64,
        got: u64,
        value: [u8; STOP_COPY_SIZE_PAYLOAD],
    },
    /// READ_HEADER_DATA of an unknown optional record: skipped.
    Skip { size: u64, got: u64 },
    /// READ_IMAGE.
    Image { size: u64, got: u64 },
    /// A write failed; everything after is refused.
    Failed { first: Box<StreamError> },
}

/// Counters of what the parser has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParserStats {
    /// Bytes accepted.
    pub bytes: u64,
    /// FW_DATA records loaded.
    pub images_loaded: u64,
    /// Optional records skipped (STOP_COPY_SIZE included).
    pub optional_records: u64,
}

/// The resume-side stream parser (`mlx5vf_resume_write`).
#[derive(Debug, Clone)]
pub struct ResumeParser {
    phase: Phase,
    /// Start offset of the record being parsed.
    record_start: u64,
    stop_copy_prep_size: u64,
    stats: ParserStats,
}

impl Default for ResumeParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ResumeParser {
    pub fn new() -> Self {
        ResumeParser {
            phase: Phase::Header {
                buf: [0; RECORD_HEADER_LEN],
                have: 0,
            },
            record_start: 0,
            stop_copy_prep_size: 0,
            stats: ParserStats::default(),
        }
    }

    pub fn stats(&self) -> ParserStats {
        self.stats
    }

    /// The STOP_COPY_SIZE the stream announced (capped at MAX_LOAD_SIZE).
    pub fn stop_copy_prep_size(&self) -> u64 {
        self.stop_copy_prep_size
    }

    /// Whether a write failed.
    pub fn is_failed(&self) -> bool {
        matches!(self.phase, Phase::Failed { .. })
    }

    /// Whether the stream so far ends on a record boundary. At RESUMING → STOP a
    /// stream that does not is incomplete (the uAPI asks the driver to fail then).
    pub fn check_complete(&self) -> Result<(), StreamError> {
        let offset = self.stats.bytes;
        let t = |what, missing| {
            Err(StreamError::Truncated {
                what,
                missing,
                offset,
            })
        };
        match &self.phase {
            Phase::Header { have: 0, .. } => Ok(()),
            Phase::Header { have, .. } => t("record header", (RECORD_HEADER_LEN - have) as u64),
            Phase::StopCopySize { size, got, .. } | Phase::Skip { size, got } => {
                t("optional record", size - got)
            }
            Phase::Image { size, got } => t("FW_DATA image", size - got),
            Phase::Failed { first } => Err(StreamError::Closed {
                first: first.clone(),
            }),
        }
    }

    /// Consumes `data` (any split of the stream). Returns the bytes accepted, which is
    /// all of them on success. The first error makes every later write fail.
    pub fn write(&mut self, data: &[u8], sink: &mut dyn RecordSink) -> Result<usize, StreamError> {
        if let Phase::Failed { first } = &self.phase {
            return Err(StreamError::Closed {
                first: first.clone(),
            });
        }
        match self.consume(data, sink) {
            Ok(()) => Ok(data.len()),
            Err(e) => {
                self.phase = Phase::Failed {
                    first: Box::new(e.clone()),
                };
                Err(e)
            }
        }
    }

    fn consume(&mut self, data: &[u8], sink: &mut dyn RecordSink) -> Result<(), StreamError> {
        let mut rest = data;
        // Each pass consumes at least one byte or finishes a record (which needs at
        // least one byte, the header's last one): bounded by 2 * len + 1.
        let mut budget = data.len().saturating_mul(2).saturating_add(2);
        while budget > 0 {
            budget -= 1;
            let offset = self.stats.bytes;
            match &mut self.phase {
                Phase::Failed { .. } => return Ok(()),
                Phase::Header { buf, have } => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    let n = (RECORD_HEADER_LEN - *have).min(rest.len());
                    buf[*have..*have + n].copy_from_slice(&rest[..n]);
                    *have += n;
                    rest = &rest[n..];
                    self.stats.bytes += n as u64;
                    if *have == RECORD_HEADER_LEN {
                        let h: RecordHeader = zerocopy::transmute!(*buf);
                        self.record_start = offset + n as u64 - RECORD_HEADER_LEN as u64;
                        self.phase = self.next_phase(h, sink)?;
                    }
                }
                Phase::StopCopySize { size, got, value } => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    let n = (*size - *got).min(rest.len() as u64) as usize;
                    let kept_from = *got as usize;
                    if kept_from < STOP_COPY_SIZE_PAYLOAD {
                        let k = (STOP_COPY_SIZE_PAYLOAD - kept_from).min(n);
                        value[kept_from..kept_from + k].copy_from_slice(&rest[..k]);
                    }
                    *got += n as u64;
                    rest = &rest[n..];
                    self.stats.bytes += n as u64;
                    if *got == *size {
                        self.stop_copy_prep_size = u64::from_le_bytes(*value).min(MAX_LOAD_SIZE);
                        self.stats.optional_records += 1;
                        self.phase = Self::header();
                    }
                }
                Phase::Skip { size, got } => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    let n = (*size - *got).min(rest.len() as u64) as usize;
                    *got += n as u64;
                    rest = &rest[n..];
                    self.stats.bytes += n as u64;
                    if *got == *size {
                        self.stats.optional_records += 1;
                        self.phase = Self::header();
                    }
                }
                Phase::Image { size, got } => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    let size = *size;
                    let n = (size - *got).min(rest.len() as u64) as usize;
                    let at = *got;
                    sink.image_bytes(at, &rest[..n])
                        .map_err(|source| StreamError::Sink {
                            offset: self.record_start,
                            source,
                        })?;
                    rest = &rest[n..];
                    self.stats.bytes += n as u64;
                    let got = at + n as u64;
                    self.phase = Phase::Image { size, got };
                    if got == size {
                        sink.load(size).map_err(|source| StreamError::Sink {
                            offset: self.record_start,
                            source,
                        })?;
                        self.stats.images_loaded += 1;
                        self.phase = Self::header();
                    }
                }
            }
        }
        Ok(())
    }

    fn header() -> Phase {
        Phase::Header {
            buf: [0; RECORD_HEADER_LEN],
            have: 0,
        }
    }

    /// READ_HEADER's decision once 16 bytes are in.
    fn next_phase(
        &mut self,
        h: RecordHeader,
        sink: &mut dyn RecordSink,
    ) -> Result<Phase, StreamError> {
        let offset = self.record_start;
        let (record_size, flags) = (h.record_size.get(), h.flags.get());
        if record_size > MAX_LOAD_SIZE {
            return Err(StreamError::TooLarge {
                size: record_size,
                offset,
            });
        }
        match h.tag.get() {
            TAG_FW_DATA => {
                if record_size == 0 {
                    return Err(StreamError::EmptyImage { offset });
                }
                sink.prepare(record_size, self.stop_copy_prep_size)
                    .map_err(|source| StreamError::Sink { offset, source })?;
                Ok(Phase::Image {
                    size: record_size,
                    got: 0,
                })
            }
            TAG_STOP_COPY_SIZE => {
                if record_size < STOP_COPY_SIZE_PAYLOAD as u64 {
                    return Err(StreamError::BadStopCopySize {
                        size: record_size,
                        offset,
                    });
                }
                Ok(Phase::StopCopySize {
                    size: record_size,
                    got: 0,
                    value: [0; STOP_COPY_SIZE_PAYLOAD],
                })
            }
            tag if h.is_optional() => {
                tracing::debug!(
                    tag,
                    size = record_size,
                    offset,
                    "skipping an optional record"
                );
                if record_size == 0 {
                    self.stats.optional_records += 1;
                    return Ok(Self::header());
                }
                Ok(Phase::Skip {
                    size: record_size,
                    got: 0,
                })
            }
            tag => Err(StreamError::UnknownMandatoryTag { tag, flags, offset }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx5_prm::migration_stream::FLAGS_TAG_OPTIONAL;
    use rand::{Rng, SeedableRng};

    /// A sink that keeps every loaded image.
    #[derive(Default)]
    struct VecSink {
        cur: Vec<u8>,
        loaded: Vec<Vec<u8>>,
        prepared: Vec<(u64, u64)>,
        fail_load_at: Option<usize>,
    }

    impl RecordSink for VecSink {
        fn prepare(&mut self, size: u64, prep: u64) -> Result<(), SinkError> {
            self.prepared.push((size, prep));
            self.cur = vec![0xee; size as usize];
            Ok(())
        }
        fn image_bytes(&mut self, offset: u64, data: &[u8]) -> Result<(), SinkError> {
            let o = offset as usize;
            self.cur[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn load(&mut self, size: u64) -> Result<(), SinkError> {
            assert_eq!(size as usize, self.cur.len());
            if self.fail_load_at == Some(self.loaded.len()) {
                return Err(SinkError {
                    errno: -libc::EINVAL,
                    message: "LOAD refused".into(),
                    fatal: false,
                    unreachable: false,
                });
            }
            self.loaded.push(std::mem::take(&mut self.cur));
            Ok(())
        }
    }

    fn record(h: RecordHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn sample_stream(rng: &mut impl Rng) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut s = stop_copy_size_record(1 << 20);
        let mut images = Vec::new();
        for i in 0..rng.gen_range(1..5) {
            let len = rng.gen_range(1..3000);
            let img: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            s.extend(record(RecordHeader::fw_data(len as u64), &img));
            images.push(img);
            if i == 1 {
                // An unknown optional record in the middle is skipped.
                s.extend(record(
                    RecordHeader::new(5, FLAGS_TAG_OPTIONAL, 0x40),
                    b"hello",
                ));
            }
        }
        (s, images)
    }

    fn feed(stream: &[u8], splits: &[usize]) -> (ResumeParser, VecSink) {
        let mut p = ResumeParser::new();
        let mut sink = VecSink::default();
        let mut at = 0;
        for &n in splits {
            let end = (at + n).min(stream.len());
            assert_eq!(p.write(&stream[at..end], &mut sink), Ok(end - at));
            at = end;
        }
        assert_eq!(p.write(&stream[at..], &mut sink), Ok(stream.len() - at));
        (p, sink)
    }

    #[test]
    fn whole_stream_in_one_write_loads_every_image_in_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (s, images) = sample_stream(&mut rng);
        let (p, sink) = feed(&s, &[]);
        assert_eq!(sink.loaded, images);
        assert_eq!(p.stop_copy_prep_size(), 1 << 20);
        assert!(sink.prepared.iter().all(|&(_, prep)| prep == 1 << 20));
        assert_eq!(p.stats().bytes, s.len() as u64);
        assert!(p.check_complete().is_ok());
    }

    #[test]
    fn byte_by_byte_writes_give_the_same_loads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (s, images) = sample_stream(&mut rng);
        let (p, sink) = feed(&s, &vec![1; s.len()]);
        assert_eq!(sink.loaded, images);
        assert_eq!(p.stats().images_loaded, images.len() as u64);
        assert_eq!(p.stats().optional_records, 1 + u64::from(images.len() > 1));
    }

    #[test]
    fn random_splits_give_the_same_loads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..300 {
            let (s, images) = sample_stream(&mut rng);
            let mut splits = Vec::new();
            let mut total = 0;
            while total < s.len() {
                let n = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => 1,
                    2 => rng.gen_range(1..20),
                    _ => rng.gen_range(1..4000),
                };
                splits.push(n);
                total += n;
            }
            let (_, sink) = feed(&s, &splits);
            assert_eq!(sink.loaded, images);
        }
    }

    #[test]
    fn oversized_record_is_refused_with_enomem_and_later_writes_get_enodev() {
        let mut p = ResumeParser::new();
        let mut sink = VecSink::default();
        let h = RecordHeader::fw_data(MAX_LOAD_SIZE + 1).to_bytes();
        // Split inside the header: nothing happens before the 16th byte.
        assert_eq!(p.write(&h[..7], &mut sink), Ok(7));
        let e = p.write(&h[7..], &mut sink).unwrap_err();
        assert_eq!(e.errno(), -libc::ENOMEM);
        assert!(e.to_string().contains("MAX_LOAD_SIZE"), "{e}");
        assert!(sink.prepared.is_empty());
        let e = p.write(b"x", &mut sink).unwrap_err();
        assert_eq!(e.errno(), -libc::ENODEV);
        assert!(p.is_failed());
    }

    #[test]
    fn max_load_size_itself_is_accepted() {
        let mut p = ResumeParser::new();
        struct Lazy;
        impl RecordSink for Lazy {
            fn prepare(&mut self, size: u64, _: u64) -> Result<(), SinkError> {
                assert_eq!(size, MAX_LOAD_SIZE);
                Ok(())
            }
            fn image_bytes(&mut self, _: u64, _: &[u8]) -> Result<(), SinkError> {
                Ok(())
            }
            fn load(&mut self, _: u64) -> Result<(), SinkError> {
                unreachable!("never complete")
            }
        }
        let h = RecordHeader::fw_data(MAX_LOAD_SIZE).to_bytes();
        assert_eq!(p.write(&h, &mut Lazy), Ok(16));
        assert!(p.check_complete().is_err());
    }

    #[test]
    fn unknown_mandatory_tag_is_eopnotsupp_and_optional_is_skipped() {
        let mut p = ResumeParser::new();
        let mut sink = VecSink::default();
        let opt = record(RecordHeader::new(3, FLAGS_TAG_OPTIONAL, 7), b"abc");
        assert_eq!(p.write(&opt, &mut sink), Ok(opt.len()));
        let bad = RecordHeader::new(3, 0, 7).to_bytes();
        let e = p.write(&bad, &mut sink).unwrap_err();
        assert_eq!(e.errno(), -libc::EOPNOTSUPP);
        assert!(e.to_string().contains("0x7"), "{e}");
    }

    #[test]
    fn a_failed_load_fails_the_file() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (s, _) = sample_stream(&mut rng);
        let mut p = ResumeParser::new();
        let mut sink = VecSink {
            fail_load_at: Some(0),
            ..Default::default()
        };
        let e = p.write(&s, &mut sink).unwrap_err();
        assert_eq!(e.errno(), -libc::EINVAL);
        assert_eq!(p.write(&[], &mut sink).unwrap_err().errno(), -libc::ENODEV);
    }

    #[test]
    fn truncation_is_reported_by_check_complete() {
        let img = [1u8; 100];
        let mut s = stop_copy_size_record(100);
        s.extend(record(RecordHeader::fw_data(100), &img));
        for cut in [1, 20, 30, 40, s.len() - 1] {
            let mut p = ResumeParser::new();
            let mut sink = VecSink::default();
            p.write(&s[..cut], &mut sink).unwrap();
            let e = p.check_complete().unwrap_err();
            assert_eq!(e.errno(), -libc::EINVAL, "cut {cut}");
            assert!(sink.loaded.is_empty());
        }
    }

    #[test]
    fn stop_copy_size_is_capped_and_short_ones_refused() {
        let mut p = ResumeParser::new();
        let mut sink = VecSink::default();
        p.write(&stop_copy_size_record(u64::MAX), &mut sink)
            .unwrap();
        assert_eq!(p.stop_copy_prep_size(), MAX_LOAD_SIZE);
        let mut p = ResumeParser::new();
        let short = RecordHeader::new(4, FLAGS_TAG_OPTIONAL, TAG_STOP_COPY_SIZE);
        let e = p.write(&record(short, &[0; 4]), &mut sink).unwrap_err();
        assert_eq!(e.errno(), -libc::EINVAL);
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..500 {
            let len = rng.gen_range(0..200);
            let mut g: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Keep sizes small often enough to reach the image path.
            if g.len() >= 16 && rng.gen_bool(0.5) {
                g[1..8].fill(0);
                g[0] %= 64;
            }
            let mut p = ResumeParser::new();
            let mut sink = VecSink::default();
            for part in g.chunks(rng.gen_range(1..17)) {
                if p.write(part, &mut sink).is_err() {
                    break;
                }
            }
        }
    }
}
