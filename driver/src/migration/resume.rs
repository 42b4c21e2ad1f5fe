//! The resuming migration file: the stream parser of [`super::stream`] feeding one DMA
//! buffer and issuing one LOAD_VHCA_STATE per complete FW_DATA record
//! (`mlx5vf_resume_write`).

use super::fw::{Fw, MigBuf};
use super::stream::{RecordSink, ResumeParser, SinkError, StreamError};
use super::MigError;

/// A resuming migration file.
#[derive(Debug)]
pub struct ResumeFile {
    pd: u32,
    parser: ResumeParser,
    buf: Option<MigBuf>,
    loads: u64,
}

struct Sink<'a, 'b> {
    fw: &'a Fw<'b>,
    pd: u32,
    buf: &'a mut Option<MigBuf>,
    loads: &'a mut u64,
}

/// A command that failed with INT_ERR: the firmware started it and failed inside,
/// unlike a refusal (BAD_PARAM, BAD_RES_STATE, ...) that changes nothing.
fn failed_inside_firmware(e: &MigError) -> bool {
    matches!(e, MigError::Cmd { source, .. } if source.status() == Some(mlx5_prm::CmdStatus::IntErr))
}

fn sink_err(e: MigError, fatal: bool) -> SinkError {
    SinkError {
        errno: e.errno(),
        fatal: fatal || e.is_fatal(),
        unreachable: e.unreachable(),
        message: e.to_string(),
    }
}

impl RecordSink for Sink<'_, '_> {
    fn prepare(&mut self, size: u64, prep_size: u64) -> Result<(), SinkError> {
        if self.buf.as_ref().is_some_and(|b| b.size() >= size) {
            return Ok(());
        }
        if let Some(old) = self.buf.take() {
            old.free(self.fw);
        }
        // Pre-size once to the announced stop-copy size when the arena has room
        // (the announcement is the other side's word, so it is only a hint).
        if prep_size > size {
            if let Ok(b) = MigBuf::alloc(self.fw, self.pd, prep_size) {
                *self.buf = Some(b);
                return Ok(());
            }
        }
        *self.buf = Some(MigBuf::alloc(self.fw, self.pd, size).map_err(|e| sink_err(e, false))?);
        Ok(())
    }

    fn image_bytes(&mut self, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        let buf = self.buf.as_ref().ok_or_else(|| SinkError {
            errno: -libc::EINVAL,
            message: "image bytes before the buffer was prepared".into(),
            fatal: false,
            unreachable: false,
        })?;
        buf.write(self.fw.hca.cmd().arena(), offset, data)
            .map_err(|e| sink_err(e, false))
    }

    fn load(&mut self, size: u64) -> Result<(), SinkError> {
        let buf = self.buf.as_ref().ok_or_else(|| SinkError {
            errno: -libc::EINVAL,
            message: "LOAD before the buffer was prepared".into(),
            fatal: false,
            unreachable: false,
        })?;
        match self.fw.load(buf, size) {
            Ok(()) => {
                *self.loads += 1;
                Ok(())
            }
            // A LOAD refused after another one applied leaves the function part-way;
            // so does one the firmware failed internally (INT_ERR): it may have
            // applied part of the image before it failed.
            Err(e) => {
                let partway = *self.loads > 0 || failed_inside_firmware(&e);
                Err(sink_err(e, partway))
            }
        }
    }
}

impl ResumeFile {
    /// STOP → RESUMING: a PD for the file; buffers come with the first record.
    pub fn open(fw: &Fw<'_>) -> Result<ResumeFile, MigError> {
        Ok(ResumeFile {
            pd: fw.alloc_pd()?,
            parser: ResumeParser::new(),
            buf: None,
            loads: 0,
        })
    }

    /// One write of any part of the stream.
    pub fn write(&mut self, fw: &Fw<'_>, data: &[u8]) -> Result<usize, MigError> {
        let mut sink = Sink {
            fw,
            pd: self.pd,
            buf: &mut self.buf,
            loads: &mut self.loads,
        };
        Ok(self.parser.write(data, &mut sink)?)
    }

    /// RESUMING → STOP: the stream must have been accepted whole. A stream refused
    /// earlier, or one that stops inside a record, fails the arc; the failure is
    /// fatal (ERROR) when some record was already loaded.
    pub fn check_complete(&self) -> Result<(), MigError> {
        let bytes = self.parser.stats().bytes;
        let r = self.parser.check_complete().and_then(|()| {
            if bytes > 0 && self.loads == 0 {
                return Err(StreamError::Truncated {
                    what: "FW_DATA record",
                    missing: 1,
                    offset: bytes,
                });
            }
            Ok(())
        });
        r.map_err(|e| MigError::Incomplete {
            loaded: self.loads,
            source: e,
        })
    }

    pub fn loads(&self) -> u64 {
        self.loads
    }

    pub fn bytes(&self) -> u64 {
        self.parser.stats().bytes
    }

    pub fn close(mut self, fw: &Fw<'_>) {
        if let Some(b) = self.buf.take() {
            b.free(fw);
        }
        fw.dealloc_pd(self.pd);
    }
}
