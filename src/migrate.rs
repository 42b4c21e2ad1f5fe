//! Moving a VF with mlx5vf's migration driver: pumping a saving stream (into a
//! resuming one), a whole pre-copy migration, a captured stop-copy stream, loading a
//! stream, and finding records in a stream.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlx5_emulator::{Function, MigState as FwState};

use mlx5_prm::migration_stream::{RecordHeader, RECORD_HEADER_LEN, TAG_FW_DATA};
use mlx5_prm::Opcode;
use mlx5vf::cmdif::{new_input, CmdIf, DmaArena};
use mlx5vf::hca::Hca;
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::{DataStream, MigError, MigrationDevice};

use crate::bringup::{exec, query_issi_in, shared_pf_up, CMD_TIMEOUT};
use crate::devmem;
use crate::testbed::Testbed;

/// The chunk size of stream reads and writes.
pub const CHUNK: usize = 64 << 10;

/// Reads a saving stream until ENOMSG (the pre-copy temporary end) or its end,
/// writing every byte into `dst` when there is one and appending it to `keep`.
/// Returns the bytes moved.
pub fn pump(src: &mut DataStream, dst: Option<&mut DataStream>, keep: &mut Vec<u8>) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut moved = 0;
    let mut dst = dst;
    for _ in 0..1_000_000 {
        match src.read_data(&mut buf) {
            Ok(0) | Err(MigError::NoMsg) => return moved,
            Ok(n) => {
                if let Some(d) = dst.as_deref_mut() {
                    let mut off = 0;
                    while off < n {
                        off += d.write_data(&buf[off..n]).expect("destination write");
                    }
                }
                keep.extend_from_slice(&buf[..n]);
                moved += n as u64;
            }
            Err(e) => panic!("source read: {e}"),
        }
    }
    panic!("the stream did not end");
}

/// Reads a saving stream into `keep` until ENOMSG or its end.
pub fn drain(s: &mut DataStream, keep: &mut Vec<u8>) {
    pump(s, None, keep);
}

/// Pre-copy until the dirty bytes fall to `threshold` (at most 20 rounds), then
/// `before_stop`, STOP_COPY on the source and RUNNING on the destination; the source
/// ends in STOP with its stream closed. Returns (bytes, rounds, downtime).
pub fn migrate(
    src: &MigrationDevice,
    dst: &MigrationDevice,
    threshold: u64,
    before_stop: impl FnOnce(),
) -> (u64, u32, Duration) {
    let mut out = dst
        .set_state(MigState::Resuming)
        .expect("RESUMING")
        .expect("resume stream");
    let mut input = src
        .set_state(MigState::PreCopy)
        .expect("PRE_COPY")
        .expect("save stream");
    let mut keep = Vec::new();
    let mut bytes = 0;
    let mut rounds = 0;
    loop {
        bytes += pump(&mut input, Some(&mut out), &mut keep);
        rounds += 1;
        let info = input.precopy_info().expect("precopy info");
        if (info.initial_bytes == 0 && info.dirty_bytes <= threshold) || rounds >= 20 {
            break;
        }
    }
    before_stop();
    let t = Instant::now();
    src.set_state(MigState::StopCopy).expect("STOP_COPY");
    bytes += pump(&mut input, Some(&mut out), &mut keep);
    dst.set_state(MigState::Running)
        .expect("destination RUNNING");
    let downtime = t.elapsed();
    src.set_state(MigState::Stop).expect("source STOP");
    // The stream is closed with the session.
    assert_eq!(
        input.read_data(&mut [0u8; 8]).unwrap_err().errno(),
        -libc::ENODEV
    );
    (bytes, rounds, downtime)
}

/// The full stop-copy stream of `dev` (from RUNNING: STOP, STOP_COPY, read to the
/// end, STOP, RUNNING); the device runs on afterwards.
pub fn capture(dev: &MigrationDevice) -> Vec<u8> {
    dev.set_state(MigState::Stop).expect("STOP");
    let mut s = dev
        .set_state(MigState::StopCopy)
        .expect("STOP_COPY")
        .expect("saving stream");
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read the stream");
    dev.set_state(MigState::Stop).expect("STOP");
    dev.set_state(MigState::Running).expect("RUNNING");
    v
}

/// [`capture`] that returns the first failure instead of panicking (the device is
/// left where the failure left it).
pub fn try_capture(dev: &MigrationDevice) -> Result<Vec<u8>, MigError> {
    dev.set_state(MigState::Stop)?;
    let mut s = dev.set_state(MigState::StopCopy)?.ok_or(MigError::NoDev)?;
    let mut v = Vec::new();
    s.read_to_end(&mut v).map_err(|_| MigError::NoDev)?;
    dev.set_state(MigState::Stop)?;
    dev.set_state(MigState::Running)?;
    Ok(v)
}

/// Writes `stream` in `chunk`-byte writes; the first refusal is returned.
pub fn write_in_chunks(w: &mut DataStream, stream: &[u8], chunk: usize) -> Result<(), MigError> {
    for part in stream.chunks(chunk) {
        w.write_data(part)?;
    }
    Ok(())
}

/// Loads `stream` into `dev` in `chunk`-byte writes (RESUMING, the writes, RUNNING).
pub fn load_in_chunks(dev: &MigrationDevice, stream: &[u8], chunk: usize) {
    let mut w = dev
        .set_state(MigState::Resuming)
        .expect("RESUMING")
        .expect("resuming stream");
    write_in_chunks(&mut w, stream, chunk).expect("write");
    dev.set_state(MigState::Running).expect("RUNNING");
}

/// Loads `stream` into `dev` in 4 KiB writes and runs the device.
pub fn load(dev: &MigrationDevice, stream: &[u8]) {
    load_in_chunks(dev, stream, 4096);
}

/// Every record of `stream`: (offset of its header, its header).
pub fn records(stream: &[u8]) -> Vec<(usize, RecordHeader)> {
    let mut v = Vec::new();
    let mut at = 0;
    while let Some(h) = stream.get(at..).and_then(RecordHeader::parse) {
        v.push((at, h));
        let size = usize::try_from(h.record_size.get()).expect("record size fits usize");
        at = match (at + RECORD_HEADER_LEN).checked_add(size) {
            Some(next) => next,
            None => break,
        };
    }
    v
}

/// (offset of the payload, length) of every FW_DATA record.
pub fn fw_data_records(stream: &[u8]) -> Vec<(usize, usize)> {
    records(stream)
        .into_iter()
        .filter(|(_, h)| h.tag.get() == TAG_FW_DATA)
        .map(|(at, h)| (at + RECORD_HEADER_LEN, h.record_size.get() as usize))
        .collect()
}

/// Offset of the first FW_DATA record's header.
pub fn first_fw_data(stream: &[u8]) -> usize {
    fw_data_records(stream)
        .first()
        .map(|&(payload, _)| payload - RECORD_HEADER_LEN)
        .expect("no FW_DATA record")
}

/// The errno of an expected failure.
pub fn errno_of<T: std::fmt::Debug>(r: Result<T, MigError>) -> i32 {
    r.expect_err("expected an error").errno()
}

/// Moves a guest's command queue (its DMA arena) to the VF behind `dst_vf` and runs
/// commands there: the migrated function keeps working.
pub fn keeps_working(arena: DmaArena, dst_vf: &Path) {
    let client = vfu::Client::connect(dst_vf).expect("destination VF");
    let cmd = CmdIf::attach(client, arena, CMD_TIMEOUT).expect("attach");
    let m = new_input(Opcode::AllocPd, 0, 16);
    cmd.exec(&m, 16).expect("ALLOC_PD on the migrated function");
    exec(&cmd, query_issi_in()).expect("QUERY_ISSI on the migrated function");
}

/// An adapter with one VF, its PF brought up, and the VF's migration driver.
pub struct Rig {
    pub tb: Testbed,
    pub pf: Arc<Hca>,
    pub dev: MigrationDevice,
}

impl Rig {
    pub fn start() -> Rig {
        Rig::on(Testbed::start(1))
    }

    /// The rig on an adapter already started (with a fault plan, say); VF 0 migrates.
    pub fn on(tb: Testbed) -> Rig {
        let pf = shared_pf_up(&tb.pf_socket());
        let dev = MigrationDevice::new(pf.clone(), 0).expect("migration device");
        Rig { tb, pf, dev }
    }

    /// The VF as the emulator holds it.
    pub fn vf(&self) -> Arc<Function> {
        self.tb.vf(0)
    }

    /// The PF as the emulator holds it.
    pub fn pf_fn(&self) -> Arc<Function> {
        self.tb.pf()
    }

    /// The VF's migration state as the firmware holds it.
    pub fn fw_state(&self) -> FwState {
        self.tb.vf(0).migration_state()
    }

    /// The PF command interface's timeout.
    pub fn set_timeout(&self, t: Duration) {
        self.pf.cmd().set_timeout(t);
    }

    /// The VF still moves: STOP suspends it in the firmware (responder), RUNNING
    /// resumes it. `when` names the moment in a failure.
    pub fn assert_stops_and_runs(&self, when: &str) {
        self.dev
            .set_state(MigState::Stop)
            .unwrap_or_else(|e| panic!("STOP {when}: {e}"));
        assert_eq!(self.fw_state(), FwState::ResponderSuspended, "STOP {when}");
        self.dev
            .set_state(MigState::Running)
            .unwrap_or_else(|e| panic!("RUNNING {when}: {e}"));
        assert_eq!(self.fw_state(), FwState::Running, "RUNNING {when}");
    }

    /// Fills the VF's device memory with a seeded pattern.
    pub fn fill(&self, seed: u64) -> Vec<u8> {
        devmem::fill(&self.vf(), seed)
    }

    pub fn dev_mem(&self) -> Vec<u8> {
        devmem::dev_mem(&self.vf())
    }

    /// The full stop-copy stream; the device is back in RUNNING afterwards.
    pub fn capture(&self) -> Vec<u8> {
        capture(&self.dev)
    }

    /// Loads `stream` in 4 KiB writes and runs the device.
    pub fn load(&self, stream: &[u8]) {
        load(&self.dev, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_walk_headers_and_stop_at_a_truncated_one() {
        let mut s = RecordHeader::new(3, 1, 0x77).to_bytes().to_vec();
        s.extend(b"xyz");
        s.extend(RecordHeader::fw_data(5).to_bytes());
        s.extend([9u8; 5]);
        s.extend(&RecordHeader::fw_data(1).to_bytes()[..7]);
        let r = records(&s);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[0].1.tag.get()), (0, 0x77));
        assert_eq!(fw_data_records(&s), vec![(2 * RECORD_HEADER_LEN + 3, 5)]);
        assert_eq!(first_fw_data(&s), RECORD_HEADER_LEN + 3);
    }
}
