//! One VF's whole live migration as a VMM drives it, from a source [`MigrationDevice`]
//! to a destination one: the destination to RESUMING, pre-copy rounds (read the saving
//! stream to its temporary end, write it into the resuming one, ask PRECOPY_INFO) until
//! the initial image is drained and the dirty bytes are at most a threshold (or a round
//! limit is reached), then STOP_COPY, the rest of the stream, and the destination to
//! RUNNING. Downtime runs from the source leaving PRE_COPY (or RUNNING, without
//! pre-copy) to the destination reaching RUNNING.
//!
//! The [`LiveReport`] keeps each round's figures, which `mlx5vf migrate --report` draws;
//! an [`Observer`] sees the bytes as they move (a progress bar) and each round's end
//! (where a benchmark dirties the source's memory).

use std::time::{Duration, Instant};

use super::fsm::MigState;
use super::{DataStream, MigError, MigrationDevice};

/// Reads one transfer phase makes at most (1 TiB in 256 KiB reads).
const MAX_PUMP_READS: u64 = 1 << 22;

/// How the migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveOptions {
    /// Pre-copy first (else STOP_COPY straight from RUNNING).
    pub pre_copy: bool,
    /// Switch over once the initial bytes are drained and the dirty bytes are at most this.
    pub threshold: u64,
    /// Pre-copy rounds at most before STOP_COPY regardless.
    pub max_rounds: u32,
    /// Bytes per read of the saving stream.
    pub chunk: usize,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            pre_copy: true,
            threshold: 64 << 10,
            max_rounds: 16,
            chunk: 1 << 20,
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Stream bytes moved in the round.
    pub bytes: u64,
    /// PRECOPY_INFO at the round's end: initial bytes still to come.
    pub initial_bytes: u64,
    /// PRECOPY_INFO at the round's end: dirty bytes still to come.
    pub dirty_bytes: u64,
    /// Since the migration started, at the round's end.
    pub at: Duration,
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveReport {
    pub rounds: Vec<Round>,
    /// Stream bytes moved after STOP_COPY.
    pub stop_copy_bytes: u64,
    /// Stream bytes moved in all.
    pub bytes: u64,
    /// From the source leaving PRE_COPY (or RUNNING) to the destination in RUNNING.
    pub downtime: Duration,
    pub total: Duration,
}

/// Sees a migration as it goes.
pub trait Observer {
    /// `n` more stream bytes reached the destination.
    fn moved(&mut self, _n: u64) {}
    /// Pre-copy round `round` (from 1) drained the stream; PRECOPY_INFO comes next.
    fn round_drained(&mut self, _round: u32) {}
    /// The round's figures.
    fn round(&mut self, _r: &Round) {}
    /// STOP_COPY is next.
    fn stop_copy(&mut self) {}
}

/// An observer that looks at nothing.
impl Observer for () {}

/// Why a migration failed: the step, and the driver's error.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("{what}: {source}")]
    Mig {
        what: &'static str,
        #[source]
        source: MigError,
    },
    #[error("{what} opened no data stream (a driver bug)")]
    NoStream { what: &'static str },
    #[error("the destination accepted no bytes of a {len}-byte write")]
    Stalled { len: usize },
    #[error("the saving stream did not end within {MAX_PUMP_READS} reads")]
    TooLong,
}

impl LiveError {
    /// The driver's error, if the failure was one.
    pub fn mig(&self) -> Option<&MigError> {
        match self {
            LiveError::Mig { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The negative errno.
    pub fn errno(&self) -> i32 {
        match self {
            LiveError::Mig { source, .. } => source.errno(),
            LiveError::NoStream { .. } | LiveError::TooLong => -libc::EIO,
            LiveError::Stalled { .. } => -libc::EPIPE,
        }
    }
}

fn at(what: &'static str) -> impl FnOnce(MigError) -> LiveError {
    move |source| LiveError::Mig { what, source }
}

/// Copies the saving stream into the resuming one until the temporary end (ENOMSG,
/// pre-copy) or the end (0, stop-copy). Returns the bytes moved.
pub fn pump(
    src: &mut DataStream,
    dst: &mut DataStream,
    buf: &mut [u8],
    obs: &mut dyn Observer,
) -> Result<u64, LiveError> {
    let mut moved = 0u64;
    for _ in 0..MAX_PUMP_READS {
        let n = match src.read_data(buf) {
            Ok(0) | Err(MigError::NoMsg) => return Ok(moved),
            Ok(n) => n,
            Err(e) => return Err(at("reading the source stream")(e)),
        };
        let mut off = 0;
        while off < n {
            let w = dst
                .write_data(&buf[off..n])
                .map_err(at("writing the destination stream"))?;
            if w == 0 {
                return Err(LiveError::Stalled { len: n - off });
            }
            off += w;
        }
        moved += n as u64;
        obs.moved(n as u64);
    }
    Err(LiveError::TooLong)
}

/// Migrates `src` (RUNNING) into `dst` (RUNNING, STOP or RUNNING_P2P); on success
/// the source is in STOP with its stream closed and the destination in RUNNING. On
/// failure the devices stay where the failure left them (the caller aborts).
pub fn migrate(
    src: &MigrationDevice,
    dst: &MigrationDevice,
    opts: &LiveOptions,
    obs: &mut dyn Observer,
) -> Result<LiveReport, LiveError> {
    let start = Instant::now();
    let mut report = LiveReport::default();
    let mut buf = vec![0u8; opts.chunk.max(4096)];
    let mut out = dst
        .set_state(MigState::Resuming)
        .map_err(at("destination to RESUMING"))?
        .ok_or(LiveError::NoStream { what: "RESUMING" })?;
    let (mut input, stop) = if opts.pre_copy {
        let mut input = src
            .set_state(MigState::PreCopy)
            .map_err(at("source to PRE_COPY"))?
            .ok_or(LiveError::NoStream { what: "PRE_COPY" })?;
        for round in 1..=opts.max_rounds.max(1) {
            let bytes = pump(&mut input, &mut out, &mut buf, obs)?;
            obs.round_drained(round);
            let info = input.precopy_info().map_err(at("PRECOPY_INFO"))?;
            let r = Round {
                bytes,
                initial_bytes: info.initial_bytes,
                dirty_bytes: info.dirty_bytes,
                at: start.elapsed(),
            };
            tracing::info!(
                round,
                bytes,
                initial = info.initial_bytes,
                dirty = info.dirty_bytes,
                "pre-copy round"
            );
            obs.round(&r);
            report.bytes += bytes;
            report.rounds.push(r);
            if info.initial_bytes == 0 && info.dirty_bytes <= opts.threshold {
                break;
            }
        }
        obs.stop_copy();
        let stop = Instant::now();
        src.set_state(MigState::StopCopy)
            .map_err(at("source to STOP_COPY"))?;
        (input, stop)
    } else {
        obs.stop_copy();
        let stop = Instant::now();
        let input = src
            .set_state(MigState::StopCopy)
            .map_err(at("source to STOP_COPY"))?
            .ok_or(LiveError::NoStream { what: "STOP_COPY" })?;
        (input, stop)
    };
    report.stop_copy_bytes = pump(&mut input, &mut out, &mut buf, obs)?;
    report.bytes += report.stop_copy_bytes;
    dst.set_state(MigState::Running)
        .map_err(at("destination to RUNNING"))?;
    report.downtime = stop.elapsed();
    src.set_state(MigState::Stop)
        .map_err(at("source to STOP"))?;
    report.total = start.elapsed();
    Ok(report)
}
