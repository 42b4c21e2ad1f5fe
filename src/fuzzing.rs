//! The bodies of the fuzz targets, one per parser. `fuzz/` (a cargo-fuzz workspace of
//! its own) calls them with libFuzzer's inputs; `tests/fuzz_corpus.rs` calls them with
//! every committed corpus input, so CI replays the corpus on the stable toolchain.
//!
//! Each body panics only when an invariant of the code under test breaks (a panic is
//! what libFuzzer reports as a crash); hostile input itself must be refused cleanly.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use mlx5_emulator::cmdq::mailbox::{self, Fetched};
use mlx5_emulator::cmdq::Host;
use mlx5_emulator::firmware::Cmd;
use mlx5_emulator::server::FunctionBackend;
use mlx5_emulator::Function;
use mlx5_prm::cmdq::block_count;
use mlx5vf::migration::stream::{RecordSink, ResumeParser, SinkError};
use vfu::uapi::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vfu::{Connection, Dma, ServerConfig};

use crate::Testbed;

/// IOVA of the guest memory every live-function target maps.
pub const GUEST_IOVA: u64 = 0x10_0000;
/// Its size.
pub const GUEST_SIZE: u64 = 0x10_0000;
const RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

struct Live {
    tb: Testbed,
    /// The PF's guest memory (as the driver's arena would be).
    mem: File,
}

thread_local! {
    static LIVE: RefCell<Option<&'static Live>> = const { RefCell::new(None) };
}

/// One adapter (a PF and a VF) per thread, started on first use and kept: the targets
/// reset the function they use before each input, so an input's outcome does not
/// depend on the inputs before it.
fn live() -> &'static Live {
    LIVE.with(|l| {
        *l.borrow_mut().get_or_insert_with(|| {
            let tb = Testbed::start(1);
            let mem = crate::mem::memfd("fuzz-guest", GUEST_SIZE);
            Box::leak(Box::new(Live { tb, mem }))
        })
    })
}

fn fresh(f: &Function, mem: &File) {
    f.reset();
    f.dma().unmap_all();
    f.dma()
        .map(GUEST_IOVA, GUEST_SIZE, mem.try_clone().expect("dup"), 0, RW)
        .expect("map the guest memory");
}

// ---------------------------------------------------------------- vfio-user

/// vfio-user message decode and dispatch against a live function (the VF of a running
/// adapter): the input is the byte stream a client sends, after the fds its first
/// byte picks (bit 0 a sealable memfd, bit 1 an eventfd, bit 2 the read end of a pipe,
/// bit 3 a socket), sent with the first message as SCM_RIGHTS.
pub fn vfu_message(data: &[u8]) {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let live = live();
    let vf = live.tb.vf(0);
    fresh(&vf, &live.mem);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let keep = hostile_fds(pick);
    let fds: Vec<RawFd> = keep.iter().map(|f| f.as_raw_fd()).collect();
    // Replies are drained by a thread so the server never blocks on a full socket.
    let reader = ours.try_clone().expect("dup");
    let drain = std::thread::spawn(move || {
        let mut r = reader;
        let mut sink = [0u8; 64 << 10];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    });
    let writer = ours.try_clone().expect("dup");
    let feed = {
        let stream = stream.to_vec();
        std::thread::spawn(move || {
            let (first, rest) = stream.split_at(stream.len().min(16));
            if send_with_fds(&writer, first, &fds) {
                let mut w = &writer;
                let _ = w.write_all(rest);
            }
            let _ = writer.shutdown(std::net::Shutdown::Write);
        })
    };
    let mut backend = FunctionBackend::new(Arc::clone(&vf));
    let _ = Connection::new(theirs, ServerConfig::default()).run(&mut backend, vf.dma());
    let _ = ours.shutdown(std::net::Shutdown::Both);
    feed.join().expect("feeder");
    drain.join().expect("drain");
    drop(keep);
}

/// fds of each kind `pick`'s bits name: bit 0 a sealable memfd, bit 1 an eventfd,
/// bit 2 the read end of a pipe, bit 3 a unix socket.
pub fn hostile_fds(pick: u8) -> Vec<File> {
    let mut v = Vec::new();
    if pick & 1 != 0 {
        v.push(crate::mem::memfd("fuzz-dma", 0x4000));
    }
    if pick & 2 != 0 {
        // SAFETY: eventfd takes no pointer; a non-negative result is a new fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: the fd is new and owned by nothing else.
            v.push(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }
    if pick & 4 != 0 {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
            // SAFETY: both fds are new and owned by nothing else.
            unsafe {
                v.push(<File as std::os::fd::FromRawFd>::from_raw_fd(p[0]));
                libc::close(p[1]);
            }
        }
    }
    if pick & 8 != 0 {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        v.push(File::from(std::os::fd::OwnedFd::from(a)));
    }
    v
}

/// sendmsg of `data` with `fds`; false if the peer is gone.
pub fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> bool {
    if data.is_empty() {
        return true;
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize }
    };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the fields that matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one header with the
        // fds (CMSG_SPACE above); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points at live buffers (iov, cbuf) for the duration of the call.
    unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) >= 0 }
}

// ---------------------------------------------------------------- command queue

/// Command entry and mailbox parsing: the input is guest memory (an entry at IOVA 0,
/// mailboxes wherever its pointers lead, inside one 64 KiB window). Whatever `prepare`
/// accepts must be consistent, and scattering an output into it must succeed.
pub fn cmdq_entry(data: &[u8]) {
    const SIZE: u64 = 64 << 10;
    let mem = crate::mem::memfd("fuzz-cmdq", SIZE);
    let n = data.len().min(SIZE as usize);
    (&mem).write_all(&data[..n]).expect("fill");
    let dma = Dma::new(4);
    dma.map(0, SIZE, mem, 0, RW).expect("map");
    let entry = match mailbox::fetch_entry(&dma, 0) {
        Ok(Fetched::Entry(e)) => e,
        Ok(Fetched::NotOwned) => return,
        Err(e) => panic!("a mapped entry could not be read: {e}"),
    };
    let Ok(p) = mailbox::prepare(&dma, &entry) else {
        return;
    };
    assert_eq!(p.input.len() as u64, u64::from(entry.inlen.get()));
    assert_eq!(p.out_blocks.len(), block_count(p.outlen));
    let out = vec![0xa5u8; p.outlen];
    mailbox::scatter(&dma, 0, &out, &p.out_blocks)
        .expect("an output chain accepted before execution takes the output");
    mailbox::complete(&dma, 0, mlx5_prm::cmdq::DeliveryStatus::Ok).expect("entry writable");
}

// ---------------------------------------------------------------- firmware

/// Firmware dispatch with arbitrary input boxes, against the live PF (its VF is the
/// `other_function` target of the migration commands): the input is up to 16 commands,
/// each `[len: u16 LE][outlen: u16 LE][len bytes of input box]`, executed in order on a
/// freshly reset PF. Every reply fits the output length it was given.
pub fn fw_dispatch(data: &[u8]) {
    let live = live();
    let pf = live.tb.pf();
    fresh(&pf, &live.mem);
    live.tb.vf(0).reset();
    let mut rest = data;
    for _ in 0..16 {
        if rest.len() < 4 {
            break;
        }
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let outlen = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
        rest = &rest[4..];
        let input = &rest[..len.min(rest.len())];
        rest = &rest[input.len()..];
        let mut boxed = input.to_vec();
        boxed.resize(boxed.len().max(16), 0);
        let cmd = Cmd::new(&boxed, outlen);
        let reply = Host::firmware(&*pf).execute(Host::env(&*pf), &cmd);
        assert!(
            reply.out.len() <= outlen.max(16),
            "reply of {} bytes for an outlen of {outlen}",
            reply.out.len()
        );
    }
}

// ---------------------------------------------------------------- state image

/// The state image validator: whatever it accepts re-encodes to an image it accepts
/// again, decoding to the same thing. The first byte's low bit asks for the checksum
/// (the image's last 8 bytes) to be recomputed first, so mutations reach the section
/// decoders instead of stopping at the checksum.
pub fn state_image(data: &[u8]) {
    use mlx5_emulator::state::CHECKSUM_LEN;
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let resealed = (mode & 1 != 0 && bytes.len() >= CHECKSUM_LEN).then(|| {
        let mut b = bytes.to_vec();
        let end = b.len() - CHECKSUM_LEN;
        let sum = xxhash_rust::xxh3::xxh3_64(&b[..end]);
        b[end..].copy_from_slice(&sum.to_le_bytes());
        b
    });
    let bytes = resealed.as_deref().unwrap_or(bytes);
    let Ok(image) = mlx5_emulator::state::validate(bytes) else {
        return;
    };
    let again = image.to_bytes();
    let back = mlx5_emulator::state::validate(&again)
        .unwrap_or_else(|e| panic!("an accepted image re-encoded is refused: {e}"));
    assert_eq!(back, image, "an accepted image does not round-trip");
}

// ---------------------------------------------------------------- resume stream

/// A sink that checks what the parser hands it: image bytes only inside the record
/// announced, a LOAD only of a record complete.
#[derive(Default)]
struct CheckSink {
    record: Option<(u64, u64)>,
}

impl RecordSink for CheckSink {
    fn prepare(&mut self, size: u64, _prep_size: u64) -> Result<(), SinkError> {
        self.record = Some((size, 0));
        Ok(())
    }

    fn image_bytes(&mut self, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        let (size, got) = self.record.as_mut().expect("image bytes before prepare");
        assert_eq!(offset, *got, "image bytes out of order");
        *got += data.len() as u64;
        assert!(*got <= *size, "image bytes past the record");
        Ok(())
    }

    fn load(&mut self, size: u64) -> Result<(), SinkError> {
        let (want, got) = self.record.take().expect("LOAD before prepare");
        assert_eq!((size, got), (want, want), "LOAD of an incomplete record");
        Ok(())
    }
}

/// The driver's resume stream parser: the stream (after a first byte that picks the
/// size of the writes it arrives in) fed to `ResumeParser` as mlx5vf's `write()`s.
pub fn resume_stream(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut p = ResumeParser::new();
    let mut sink = CheckSink::default();
    for piece in stream.chunks(chunk) {
        match p.write(piece, &mut sink) {
            Ok(n) => assert_eq!(n, piece.len(), "a write accepted in part"),
            Err(_) => {
                assert!(
                    p.write(b"x", &mut sink).is_err(),
                    "a failed stream accepts more"
                );
                return;
            }
        }
    }
    let _ = p.check_complete();
}

// ---------------------------------------------------------------- seeds

/// The seeds of a target, as (name, input): small, well-formed inputs that reach deep
/// into the parser, so the fuzzer starts from there. `tests/fuzz_corpus.rs` checks that
/// `fuzz/corpus/<target>/seed-<name>` holds each (and writes them with
/// `MLX5_WRITE_SEEDS=1`).
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "vfu_message" => vfu_seeds(),
        "cmdq_entry" => cmdq_seeds(),
        "fw_dispatch" => fw_seeds(),
        "state_image" => state_seeds(),
        "resume_stream" => resume_seeds(),
        "wqe_ring" => wqe_seeds(),
        other => panic!("no fuzz target {other}"),
    }
}

/// The fuzz targets, by name.
pub const TARGETS: [&str; 6] = [
    "vfu_message",
    "cmdq_entry",
    "fw_dispatch",
    "state_image",
    "resume_stream",
    "wqe_ring",
];

/// A vfio-user command message: header (`id`, `cmd`, size, command flags) and payload.
pub fn vfu_msg(id: u16, cmd: vfu::proto::Command, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&(cmd as u16).to_le_bytes());
    m.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
    m.extend_from_slice(&vfu::proto::FLAGS_TYPE_COMMAND.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Little-endian u32s, as vfio-user's fixed parts are laid out.
pub fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vfu_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use vfu::proto::Command as C;
    let mut version = Vec::new();
    version.extend_from_slice(&vfu::proto::VERSION_MAJOR.to_le_bytes());
    version.extend_from_slice(&vfu::proto::VERSION_MINOR.to_le_bytes());
    version.extend_from_slice(&vfu::caps::Capabilities::default().to_json());
    let hello = vfu_msg(0, C::Version, &version);
    // REGION_READ/WRITE: offset, region, count, then the data of a write.
    let region_rw = |index: u32, offset: u64, count: u32, data: &[u8]| {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(data);
        p
    };
    let mut talk = vec![0u8];
    talk.extend(&hello);
    talk.extend(vfu_msg(1, C::DeviceGetInfo, &words(&[16, 0, 0, 0])));
    talk.extend(vfu_msg(
        2,
        C::DeviceGetRegionInfo,
        &words(&[32, 0, 2, 0, 0, 0, 0, 0]),
    ));
    talk.extend(vfu_msg(3, C::DeviceGetIrqInfo, &words(&[16, 0, 2, 0])));
    talk.extend(vfu_msg(4, C::RegionRead, &region_rw(7, 0, 4, &[])));
    // cmd_dbell of BAR0 and a BAR2 store.
    talk.extend(vfu_msg(
        6,
        C::RegionWrite,
        &region_rw(0, 0x18, 4, &[1, 0, 0, 0]),
    ));
    talk.extend(vfu_msg(7, C::RegionWrite, &region_rw(2, 0x40, 4, b"seed")));
    talk.extend(vfu_msg(8, C::DeviceReset, &[]));

    // A DMA map carrying the memfd of the first byte's pick, an unmap, SET_IRQS of an
    // eventfd.
    let mut dma = vec![1u8 | 2];
    dma.extend(&hello);
    let mut map = words(&[32, 3]);
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&0x10_0000u64.to_le_bytes());
    map.extend_from_slice(&0x4000u64.to_le_bytes());
    dma.extend(vfu_msg(1, C::DmaMap, &map));
    let mut unmap = words(&[32, 0]);
    unmap.extend_from_slice(&0x10_0000u64.to_le_bytes());
    unmap.extend_from_slice(&0x4000u64.to_le_bytes());
    dma.extend(vfu_msg(2, C::DmaUnmap, &unmap));
    // SET_IRQS: argsz, flags (DATA_EVENTFD | ACTION_TRIGGER), index MSI-X, start, count.
    dma.extend(vfu_msg(3, C::DeviceSetIrqs, &words(&[20, 0x24, 2, 0, 1])));
    vec![("talk", talk), ("dma-irq", dma)]
}

fn cmdq_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::rawq::{encode_block, input, Entry, TOKEN};
    use mlx5_prm::Opcode;
    // One entry at 0, an input chain of two blocks at 0x1000 and 0x2000, an output
    // chain of one block at 0x3000.
    let msg = input(Opcode::QueryHcaCap, 1, 16 + 512 + 100);
    let mut e = Entry::new(&msg, 16 + 300);
    e.in_ptr = 0x1000;
    e.out_ptr = 0x3000;
    let mut mem = vec![0u8; 0x3000 + mlx5_prm::cmdq::MAILBOX_BLOCK_SIZE];
    mem[..64].copy_from_slice(&e.encode());
    let b0 = encode_block(&msg[16..16 + 512], 0, TOKEN, 0x2000);
    mem[0x1000..0x1000 + b0.len()].copy_from_slice(&b0);
    let b1 = encode_block(&msg[16 + 512..], 1, TOKEN, 0);
    mem[0x2000..0x2000 + b1.len()].copy_from_slice(&b1);
    let o = encode_block(&[], 0, TOKEN, 0);
    mem[0x3000..0x3000 + o.len()].copy_from_slice(&o);
    let inline = Entry::new(&msg[..16], 16).encode().to_vec();
    vec![("chains", mem), ("inline", inline)]
}

fn fw_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use mlx5_prm::Opcode;
    let mut seq = Vec::new();
    let mut push = |m: Vec<u8>, outlen: u16| {
        seq.extend_from_slice(&(m.len() as u16).to_le_bytes());
        seq.extend_from_slice(&outlen.to_le_bytes());
        seq.extend_from_slice(&m);
    };
    push(crate::rawq::input(Opcode::QueryIssi, 0, 16), 0x70);
    push(crate::rawq::input(Opcode::EnableHca, 0, 16), 16);
    push(crate::rawq::input(Opcode::QueryPages, 1, 16), 16);
    push(crate::rawq::input(Opcode::QueryHcaCap, 1, 16), 0x1010);
    push(crate::rawq::input(Opcode::AllocPd, 0, 16), 16);
    push(crate::rawq::input(Opcode::InitHca, 0, 16), 16);
    let vf = 1;
    for op in [Opcode::SuspendVhca, Opcode::QueryVhcaMigrationState] {
        push(crate::bringup::vhca_input(op, 0, 16, vf), 16);
    }
    vec![("bringup-and-migration", seq)]
}

fn state_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use mlx5_emulator::state::{sample_image, ImageKind};
    let image = sample_image();
    let mut delta = image.clone();
    delta.header.kind = ImageKind::Delta;
    delta.header.seq = 2;
    delta.header.base_seq = 1;
    delta.pages.clear();
    let framed = |m: u8, b: Vec<u8>| [vec![m], b].concat();
    vec![
        ("base", framed(0, image.to_bytes())),
        ("delta", framed(0, delta.to_bytes())),
        ("base-resealed", framed(1, image.to_bytes())),
    ]
}

fn resume_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use mlx5_prm::migration_stream::RecordHeader;
    let mut s = vec![7u8];
    s.extend(mlx5vf::migration::stream::stop_copy_size_record(300));
    s.extend(RecordHeader::fw_data(40).to_bytes());
    s.extend([0x5a; 40]);
    s.extend(RecordHeader::fw_data(20).to_bytes());
    s.extend([0xa5; 20]);
    vec![("two-records", s)]
}

// ---------------------------------------------------------------- DMA engine

/// Bytes of the data buffer behind the WQE target's mkey.
const WQE_DATA: u64 = 2 << 20;
/// Longest the engine may take over one rung ring before the target calls it stuck.
const WQE_STUCK: std::time::Duration = std::time::Duration::from_secs(5);
/// `flags` bit: write this QP's number into the control segment of every basic block
/// (so mutated WQEs get past the QPN check).
const WQE_PATCH_QPN: u8 = 1;
/// `flags` bit: ring with the counter the input names instead of the one posted.
const WQE_RAW_COUNTER: u8 = 2;
/// `flags` bit: post one receive (4 KiB) on the peer QP first, for SENDs.
const WQE_POST_RECV: u8 = 4;

struct WqeLive {
    _tb: Testbed,
    node: crate::dma::DmaNode,
}

thread_local! {
    static WQE_LIVE: RefCell<Option<&'static WqeLive>> = const { RefCell::new(None) };
}

fn wqe_live() -> &'static WqeLive {
    WQE_LIVE.with(|l| {
        *l.borrow_mut().get_or_insert_with(|| {
            let tb = Testbed::start(1);
            let node = crate::dma::node(&tb.vf_socket(0), WQE_DATA);
            Box::leak(Box::new(WqeLive { _tb: tb, node }))
        })
    })
}

/// The DMA engine's send-queue parsing, against a live VF: the input is
/// `[flags: u8][counter: u16 LE][basic blocks...]`, up to 64 blocks of 64 bytes written
/// raw into the send ring of a fresh loopback QP pair, then rung. Whatever the ring
/// holds, the engine must finish with it in bounded time (every basic block consumed,
/// or the QP in ERR), write no more CQEs than blocks, and keep serving: a NOP on
/// another fresh QP pair completes afterwards. The data buffer's mkey (the same on
/// every run) is the only key the WQEs can name.
pub fn wqe_ring(data: &[u8]) {
    use mlx5_prm::cmd::qp::QpState;
    use mlx5vf::dma::{DmaQueues, QpSizes, SendWr};

    use crate::dma::loopback_pair;

    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (counter, blocks) = match rest {
        [a, b, tail @ ..] => (u16::from_le_bytes([*a, *b]), tail),
        _ => (0, &[][..]),
    };
    let live = wqe_live();
    let n = &live.node;
    let q = DmaQueues::new(&n.hca).expect("queues on a live VF");
    let sizes = QpSizes::default();
    let (mut a, mut b) = loopback_pair(&q);
    if flags & WQE_POST_RECV != 0 {
        let s = mlx5vf::dma::Sge {
            lkey: n.key,
            addr: 1 << 20,
            len: 4096,
        };
        q.post_recv(&mut b.qp, &[s]).expect("one receive");
    }
    let qpn = a.qp.qpn;
    let nblocks = blocks.len().div_ceil(64).min(1usize << sizes.log_sq);
    for bb in blocks.chunks(64).take(nblocks) {
        let mut block = [0u8; 64];
        block[..bb.len()].copy_from_slice(bb);
        if flags & WQE_PATCH_QPN != 0 {
            let ds = block[7] & 0x3f;
            block[4..8].copy_from_slice(&((qpn << 8) | u32::from(ds)).to_be_bytes());
        }
        q.write_wqe(&mut a.qp, &block).expect("room for 64 blocks");
    }
    let rung = if flags & WQE_RAW_COUNTER != 0 {
        q.ring_counter(&mut a.qp, counter).expect("ring");
        counter
    } else {
        q.ring(&mut a.qp).expect("ring");
        a.qp.sq_pi()
    };
    let deadline = std::time::Instant::now() + WQE_STUCK;
    let mut cqes = 0usize;
    loop {
        while let Some(_c) = q.poll(&mut a.cq, Some(&mut a.qp)).expect("poll") {
            cqes += 1;
        }
        let (state, consumed, _) = q.query_qp(qpn).expect("QUERY_QP on a live VF");
        if state == QpState::Err || consumed == rung {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the engine is stuck on a rung ring: consumed {consumed:#x} of {rung:#x}, state {state:?}"
        );
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    // Flushes go out when a QP errs: a ring of 64 blocks completes at most 64 WQEs.
    std::thread::sleep(std::time::Duration::from_millis(1));
    while let Some(_c) = q.poll(&mut a.cq, Some(&mut a.qp)).expect("poll") {
        cqes += 1;
    }
    assert!(cqes <= 64, "{cqes} CQEs for a ring of 64 basic blocks");
    // Still serving: a NOP on a fresh pair completes.
    let (mut c, d) = loopback_pair(&q);
    q.post_send(&mut c.qp, &SendWr::Nop, true).expect("NOP");
    q.ring(&mut c.qp).expect("ring");
    let done = q
        .poll_wait(&mut c.cq, Some(&mut c.qp), WQE_STUCK)
        .expect("the engine still completes a NOP");
    assert!(done.is_ok(), "{done:?}");
    for e in [a, b, c, d] {
        q.destroy_qp(e.qp).expect("destroy QP");
        q.destroy_cq(e.cq).expect("destroy CQ");
    }
    q.close().expect("close queues");
}

fn wqe_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use mlx5_prm::wqe::{CtrlSeg, DataSeg, RaddrSeg, WqeOpcode};
    use zerocopy::IntoBytes;

    let key = wqe_live().node.key;
    let wqe = |op: WqeOpcode, ds: u8, raddr: Option<u64>, len: u32| {
        let mut v = CtrlSeg::new(op, 0, 0, ds, true).as_bytes().to_vec();
        if let Some(r) = raddr {
            let mut seg = RaddrSeg::default();
            seg.raddr.set(r);
            seg.rkey.set(key);
            v.extend_from_slice(seg.as_bytes());
        }
        if ds > u8::from(raddr.is_some()) + 1 {
            let mut seg = DataSeg::default();
            seg.byte_count.set(len);
            seg.lkey.set(key);
            seg.addr.set(0);
            v.extend_from_slice(seg.as_bytes());
        }
        v.resize(64, 0);
        v
    };
    let input = |flags: u8, blocks: &[Vec<u8>]| {
        let mut v = vec![flags, 0, 0];
        for b in blocks {
            v.extend_from_slice(b);
        }
        v
    };
    vec![
        (
            "nop",
            input(WQE_PATCH_QPN, &[wqe(WqeOpcode::Nop, 1, None, 0)]),
        ),
        (
            "rdma-write",
            input(
                WQE_PATCH_QPN,
                &[wqe(WqeOpcode::RdmaWrite, 3, Some(4096), 512)],
            ),
        ),
        (
            "rdma-read",
            input(
                WQE_PATCH_QPN,
                &[wqe(WqeOpcode::RdmaRead, 3, Some(8192), 64)],
            ),
        ),
        (
            "send",
            input(
                WQE_PATCH_QPN | WQE_POST_RECV,
                &[wqe(WqeOpcode::Send, 2, None, 100)],
            ),
        ),
        ("overrun", vec![WQE_PATCH_QPN | WQE_RAW_COUNTER, 0xf0, 0xff]),
    ]
}
