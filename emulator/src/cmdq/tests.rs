//! The engine on a fake host: real (memfd) guest memory and a real firmware, no
//! function, no sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mlx5_prm::cmd::eq::{EQE_CMD_VECTOR, EQE_SIZE, EQE_TYPE, EVENT_TYPE_CMD};
use mlx5_prm::cmdq::{CmdLayout, CMD_OWNER_HW, CMD_STATUS_OWN_OFFSET, MLX5_PCI_CMD_XPORT};
use mlx5_prm::ifc::{get, hdr, set};
use mlx5_prm::Opcode;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use zerocopy::{FromZeros, IntoBytes};

use super::*;
use crate::firmware::test_support::{populated, FakeEnv};
use crate::firmware::{syndrome, Firmware, FunctionId};

/// IOVA of the queue.
const QUEUE: u64 = 0x10_0000;
/// IOVA of EQ 1's page in [`populated`] firmware.
const EQ_PAGE: u64 = 0x9000;

/// A function reduced to what the engine needs: guest memory through a fake
/// environment, a firmware, a command log, a count of ended admissions and one command
/// delay.
struct FakeHost {
    env: FakeEnv,
    fw: FwCell,
    log: Mutex<Vec<CmdRecord>>,
    done: AtomicUsize,
    delay: Mutex<Option<(u16, Duration)>>,
}

impl FakeHost {
    fn new(fw: Firmware) -> Arc<Self> {
        let env = FakeEnv::new(FunctionId::vf(0));
        let _ = env.map(QUEUE, 0x1000);
        let _ = env.map(EQ_PAGE, 0x1000);
        Arc::new(FakeHost {
            env,
            fw: FwCell::from(fw),
            log: Mutex::new(Vec::new()),
            done: AtomicUsize::new(0),
            delay: Mutex::new(None),
        })
    }

    /// Posts a 16-byte inline command with `opcode` in `slot`, owned by hardware.
    fn post(&self, slot: u8, opcode: Opcode) {
        let mut e = CmdLayout::new_zeroed();
        e.type_ = MLX5_PCI_CMD_XPORT;
        e.token = 0x11;
        e.status_own = CMD_OWNER_HW;
        e.inlen.set(16);
        e.outlen.set(16);
        set(&mut e.in_, hdr::OPCODE, u64::from(u16::from(opcode)));
        let bytes: &[u8; 64] = e.as_bytes().try_into().unwrap();
        e.sig = mlx5_prm::cmdq::entry_signature(bytes);
        self.env
            .dma
            .write(QUEUE + u64::from(slot) * CMDQ_STRIDE, e.as_bytes())
            .unwrap();
    }

    fn status_own(&self, slot: u8) -> u8 {
        let mut b = [0u8];
        let at = QUEUE + u64::from(slot) * CMDQ_STRIDE + CMD_STATUS_OWN_OFFSET as u64;
        self.env.dma.read(at, &mut b).unwrap();
        b[0]
    }

    fn work(&self, mask: u32, events: bool) -> Work {
        Work {
            mask,
            cmdq: QUEUE,
            events,
            epoch: self.env.epoch(),
        }
    }
}

impl Host for FakeHost {
    fn dma(&self) -> &Dma {
        &self.env.dma
    }

    fn env(&self) -> &dyn Env {
        &self.env
    }

    fn firmware(&self) -> &FwCell {
        &self.fw
    }

    fn command_faults(&self, cmd: &Cmd<'_>) -> (u64, CmdFaults) {
        let mut d = self.delay.lock().unwrap();
        let delay = match *d {
            Some((op, delay)) if op == cmd.opcode => {
                *d = None;
                Some(delay)
            }
            _ => None,
        };
        (
            0,
            CmdFaults {
                delay,
                ..CmdFaults::default()
            },
        )
    }

    fn fatal(&self, _fatal: Fatal) {}

    fn flr(&self) {}

    fn record(&self, r: CmdRecord) {
        self.log.lock().unwrap().push(r);
    }

    fn work_done(&self) {
        self.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// Every span's fields as text, by span name (one span per name is enough here).
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<String, HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().to_string(), format!("{v:?}"));
    }

    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), v.to_string());
    }
}

impl<S> Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let name = ctx.span(id).unwrap().name().to_string();
        let mut all = self.0.lock().unwrap();
        attrs.record(&mut Fields(all.entry(name).or_default()));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let name = ctx.span(id).unwrap().name().to_string();
        let mut all = self.0.lock().unwrap();
        values.record(&mut Fields(all.entry(name).or_default()));
    }
}

#[test]
fn a_command_runs_in_a_span_that_records_its_status_and_syndrome() {
    let h = FakeHost::new(Firmware::new(FunctionId::vf(0)));
    h.post(3, Opcode::QueryIssi);
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    tracing::subscriber::with_default(subscriber, || run_slot(&*h, &h.work(1 << 3, false), 3));
    // A disabled HCA refuses QUERY_ISSI.
    let all = spans.0.lock().unwrap();
    let s = &all["firmware_command"];
    assert_eq!(s["opcode"], "QUERY_ISSI");
    assert_eq!(s["op_mod"], "0");
    assert_eq!(s["vhca_id"], "1");
    assert_eq!(s["target_vhca_id"], "1");
    assert_eq!(s["slot"], "3");
    assert_eq!(s["status"], "BAD_SYS_STATE_ERR");
    assert_eq!(s["syndrome"], format!("{:#x}", syndrome::WRONG_STATE));
    let log = h.log.lock().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, CmdStatus::BadSysStateErr);
    assert_eq!(log[0].syndrome, syndrome::WRONG_STATE);
    assert_eq!(h.status_own(3) & CMD_OWNER_HW, 0, "slot back to software");
}

#[test]
fn completion_by_event_writes_the_eqe_then_raises_the_armed_vector_once() {
    // Command EQ 1: one page at EQ_PAGE, producer index 3, armed, vector 0.
    let h = FakeHost::new(populated(FunctionId::vf(0)));
    h.post(5, Opcode::QueryIssi);
    run_slot(&*h, &h.work(1 << 5, true), 5);
    let mut eqe = [0u8; EQE_SIZE];
    h.env
        .dma
        .read(EQ_PAGE + 3 * EQE_SIZE as u64, &mut eqe)
        .unwrap();
    assert_eq!(get(&eqe, EQE_TYPE), u64::from(EVENT_TYPE_CMD));
    assert_eq!(get(&eqe, EQE_CMD_VECTOR), 1 << 5);
    assert_eq!(*h.env.raised.lock().unwrap(), vec![0]);
    // The EQ is disarmed now: the next EQE is written, no interrupt raised.
    h.post(6, Opcode::QueryIssi);
    run_slot(&*h, &h.work(1 << 6, true), 6);
    h.env
        .dma
        .read(EQ_PAGE + 4 * EQE_SIZE as u64, &mut eqe)
        .unwrap();
    assert_eq!(get(&eqe, EQE_CMD_VECTOR), 1 << 6);
    assert_eq!(*h.env.raised.lock().unwrap(), vec![0]);
    assert_eq!(h.fw.lock().eq(1).unwrap().pi, 5);
}

#[test]
fn slots_of_one_doorbell_run_concurrently_and_its_admission_ends_with_the_last() {
    let h = FakeHost::new(Firmware::new(FunctionId::vf(0)));
    *h.delay.lock().unwrap() = Some((u16::from(Opcode::EnableHca), Duration::from_millis(400)));
    h.post(0, Opcode::EnableHca);
    h.post(1, Opcode::QueryIssi);
    let engine = Engine::new("fw-test".into());
    let weak: Weak<dyn Host> = Arc::downgrade(&h) as _;
    engine.attach(weak);
    // Returns at once: each slot runs on its own executor.
    engine.ring(h.work(0b11, false));
    let start = Instant::now();
    while h.status_own(1) & CMD_OWNER_HW != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slot 1 never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Slot 1 is done while slot 0 is held: the doorbell's work is still in flight.
    assert_eq!(
        h.status_own(0) & CMD_OWNER_HW,
        CMD_OWNER_HW,
        "slot 0 still held"
    );
    assert_eq!(h.done.load(Ordering::Acquire), 0, "admission ended early");
    while h.done.load(Ordering::Acquire) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slot 0 never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.status_own(0) & CMD_OWNER_HW, 0);
    assert_eq!(
        h.done.load(Ordering::Acquire),
        1,
        "one admission per doorbell"
    );
    let log = h.log.lock().unwrap();
    let order: Vec<u8> = log.iter().map(|r| r.slot).collect();
    assert_eq!(order, vec![1, 0], "the short command completed first");
    assert_eq!(h.fw.lock().state(), crate::firmware::HcaState::Enabled);
    drop(engine);
}

#[test]
fn a_full_slot_queue_holds_the_ringer_until_the_executor_takes_one_and_a_closed_one_refuses() {
    let h = FakeHost::new(Firmware::new(FunctionId::vf(0)));
    let weak: Weak<dyn Host> = Arc::downgrade(&h) as _;
    let job = || SlotJob {
        work: h.work(1, false),
        slot: 0,
        _admitted: Arc::new(Admitted(weak.clone())),
    };
    let q = Arc::new(SlotQueue::default());
    for _ in 0..SLOT_BACKLOG {
        assert!(q.push(job()).is_ok());
    }
    let ringer = {
        let q = Arc::clone(&q);
        let j = job();
        std::thread::spawn(move || q.push(j).is_ok())
    };
    // The ringer waits for room: it is still waiting while the queue stays full.
    let start = Instant::now();
    while q.lock().waiting_for_room == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the ringer never waited"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(q.lock().jobs.len(), SLOT_BACKLOG);
    assert!(q.pop().is_some());
    assert!(
        ringer.join().unwrap(),
        "the ringer queued its job once there was room"
    );
    assert_eq!(q.lock().jobs.len(), SLOT_BACKLOG);
    // Closed: what is queued is still handed out, new doorbells are refused.
    q.close();
    assert!(q.push(job()).is_err());
    let mut left = 0;
    while q.pop().is_some() {
        left += 1;
    }
    assert_eq!(left, SLOT_BACKLOG);
    // Each dropped job ended its own admission.
    assert_eq!(h.done.load(Ordering::Acquire), SLOT_BACKLOG + 2);
}
