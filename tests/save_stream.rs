//! The saving stream in chunk mode (issue 11): image bytes copied from the SAVE's
//! buffer with no lock held, the next chunk's SAVE running on its own thread while the
//! reader drains the previous chunk. No chunk lost or reordered under any split of the
//! reads, a failure of a chunk SAVE returned by the read that meets it (ENODEV after),
//! and one end of stream, after the last chunk.

use std::time::Duration;

use mlx5_emulator::fault::{Plan, Rule};
use mlx5_prm::migration_stream::{TAG_FW_DATA, TAG_STOP_COPY_SIZE};
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::migrate::{load, records, Rig};
use mlx5_testbed::{init_tracing, AdapterConfig, Testbed};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::{DataStream, MigError};
use rand::{Rng, SeedableRng};

/// Device memory of four 8 MiB-class stop-copy chunks and then some.
const DEV_MEM: u64 = 32 << 20;

fn rig(plan: Option<Plan>) -> Rig {
    let mut b = Testbed::builder().dev_mem(DEV_MEM);
    if let Some(p) = plan {
        b = b.faults(p);
    }
    Rig::on(b.start())
}

fn destination() -> Rig {
    Rig::on(Testbed::start_with(AdapterConfig {
        vfs: 1,
        dev_mem: DEV_MEM,
        ..AdapterConfig::default()
    }))
}

/// STOP, then STOP_COPY: the saving stream.
fn stop_copy(r: &Rig) -> DataStream {
    r.dev.set_state(MigState::Stop).expect("STOP");
    r.dev
        .set_state(MigState::StopCopy)
        .expect("STOP_COPY")
        .expect("saving stream")
}

/// Reads exactly `n` bytes.
fn read_exact(s: &mut DataStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut at = 0;
    while at < n {
        let got = s.read_data(&mut v[at..]).expect("read");
        assert!(got > 0, "end of stream after {at} of {n} bytes");
        at += got;
    }
    v
}

/// The stream's records: the STOP_COPY_SIZE record first, then FW_DATA records whose
/// sizes add up to the rest of the stream exactly.
fn assert_well_formed(stream: &[u8]) -> usize {
    let recs = records(stream);
    assert_eq!(recs[0].1.tag.get(), TAG_STOP_COPY_SIZE);
    assert!(recs[1..].iter().all(|(_, h)| h.tag.get() == TAG_FW_DATA));
    let (last_at, last) = recs.last().expect("records");
    assert_eq!(
        last_at + 16 + last.record_size.get() as usize,
        stream.len(),
        "the records cover the stream exactly"
    );
    recs.len() - 1
}

#[test]
fn chunks_arrive_whole_and_in_order_under_any_split_of_the_reads_and_the_end_comes_once() {
    init_tracing();
    let src = rig(None);
    let data = src.fill(0x5717);
    let mut s = stop_copy(&src);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 3 << 20];
    let mut ends = 0;
    for _ in 0..1_000_000 {
        let want = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..17),
            1 => rng.gen_range(1..5000),
            _ => rng.gen_range(1..buf.len()),
        };
        let n = s.read_data(&mut buf[..want]).expect("read");
        if n == 0 {
            ends += 1;
            break;
        }
        stream.extend_from_slice(&buf[..n]);
    }
    assert_eq!(ends, 1, "the stream ended");
    // After the end, the end again: no late chunk.
    assert_eq!(s.read_data(&mut buf).expect("read after the end"), 0);
    let stats = src.dev.save_stats().expect("saving file");
    let images = assert_well_formed(&stream);
    assert_eq!(
        images as u64, stats.chunks,
        "one FW_DATA record per chunk SAVE"
    );
    assert!(stats.chunks >= 4, "{stats:?}: not chunked");
    src.dev.set_state(MigState::Stop).expect("STOP");
    let dst = destination();
    load(&dst.dev, &stream);
    assert!(dst.dev_mem() == data, "device memory differs");
}

/// The second chunk's SAVE is held 3 s in the firmware (a deliberate hold): the first
/// chunk is read whole while it runs, and the read after waits for it.
#[test]
fn the_next_chunk_is_saved_while_the_reader_drains_the_previous_one() {
    init_tracing();
    let hold = Rule::new("hold chunk 2", "delay")
        .opcode(Opcode::SaveVhcaState)
        .nth(2)
        .delay(Duration::from_secs(3));
    let src = rig(Some(Plan::new(1).rule(hold)));
    let data = src.fill(0x5718);
    let mut s = stop_copy(&src);
    // STOP_COPY_SIZE record, then the first chunk's header and image.
    let mut stream = read_exact(&mut s, 24 + 16);
    let first = records(&stream)[1].1.record_size.get() as usize;
    stream.extend(read_exact(&mut s, first));
    let stats = src.dev.save_stats().expect("saving file");
    assert_eq!(
        (stats.saves, stats.chunks),
        (1, 1),
        "the first chunk was read while the second SAVE was held"
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut rest).expect("the rest");
    stream.extend(rest);
    assert!(src.dev.save_stats().expect("saving file").chunks >= 4);
    assert_well_formed(&stream);
    src.dev.set_state(MigState::Stop).expect("STOP");
    let dst = destination();
    load(&dst.dev, &stream);
    assert!(dst.dev_mem() == data, "device memory differs");
}

/// The third chunk's SAVE is refused: the read that meets it returns the firmware's
/// status (EINVAL, BAD_PARAM with its syndrome), after bytes of the chunks before it
/// (the second one perhaps cut short: the stream is broken); every later read is ENODEV; the device is not in ERROR and moves on.
#[test]
fn a_failed_chunk_save_is_returned_by_the_read_and_later_reads_get_enodev() {
    init_tracing();
    let refuse = Rule::new("refuse chunk 3", "status")
        .opcode(Opcode::SaveVhcaState)
        .nth(3)
        .status(CmdStatus::BadParamErr, 0x3c3c);
    let src = rig(Some(Plan::new(1).rule(refuse)));
    src.fill(0x5719);
    let mut s = stop_copy(&src);
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let e = loop {
        match s.read_data(&mut buf) {
            Ok(0) => panic!("the stream ended although a chunk SAVE failed"),
            Ok(n) => stream.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(e.errno(), -libc::EINVAL, "{e}");
    assert!(
        e.to_string().contains(CmdStatus::BadParamErr.name()) && e.to_string().contains("0x3c3c"),
        "{e}"
    );
    // As mlx5vf's reader, the failure is returned as soon as it is known: the
    // bytes before it are a prefix of the stream (the first chunk whole, the second
    // perhaps cut short), never a byte of the refused chunk.
    let recs = records(&stream);
    assert_eq!(recs[0].1.tag.get(), TAG_STOP_COPY_SIZE);
    assert!(recs[1..].iter().all(|(_, h)| h.tag.get() == TAG_FW_DATA));
    let (first_at, first) = recs[1];
    assert!(
        first_at + 16 + first.record_size.get() as usize <= stream.len(),
        "the first chunk arrived whole before the failure"
    );
    assert!(
        (2..=3).contains(&recs.len()),
        "{} records: only the chunks before the failure",
        recs.len()
    );
    let (last_at, last) = recs.last().expect("records");
    assert!(last_at + 16 + last.record_size.get() as usize >= stream.len());
    assert!(matches!(s.read_data(&mut buf), Err(MigError::NoDev)));
    assert!(matches!(s.read_data(&mut buf), Err(MigError::NoDev)));
    assert_eq!(src.dev.state(), MigState::StopCopy);
    src.dev.set_state(MigState::Stop).expect("STOP");
    assert!(matches!(s.read_data(&mut buf), Err(MigError::NoDev)));
    src.dev.set_state(MigState::Running).expect("RUNNING");
    src.assert_stops_and_runs("after the failed chunk");
}

/// STOP_COPY → STOP while the next chunk's SAVE is held: the arc waits for it before
/// the buffers go, and the stream is closed (ENODEV); a new stop-copy is whole.
#[test]
fn closing_the_stream_while_a_chunk_save_runs_waits_for_it() {
    init_tracing();
    let hold = Rule::new("hold chunk 2", "delay")
        .opcode(Opcode::SaveVhcaState)
        .nth(2)
        .delay(Duration::from_millis(500));
    let src = rig(Some(Plan::new(1).rule(hold)));
    let data = src.fill(0x571a);
    let mut s = stop_copy(&src);
    read_exact(&mut s, 100);
    src.dev.set_state(MigState::Stop).expect("STOP");
    assert!(matches!(s.read_data(&mut [0u8; 64]), Err(MigError::NoDev)));
    let mut s = src
        .dev
        .set_state(MigState::StopCopy)
        .expect("STOP_COPY")
        .expect("saving stream");
    let mut stream = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut stream).expect("read");
    assert_well_formed(&stream);
    src.dev.set_state(MigState::Stop).expect("STOP");
    let dst = destination();
    load(&dst.dev, &stream);
    assert!(dst.dev_mem() == data, "device memory differs");
}
