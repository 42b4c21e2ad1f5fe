//! The server side: a listening socket, one client at a time, every message decoded,
//! validated and dispatched to a [`Backend`].
//!
//! The server owns framing, negotiation, DMA maps and all bounds checks; a backend
//! sees only requests that already fit its regions and IRQ indices. Every backend
//! method has a default that answers "not supported", so a backend implements only
//! what its device has.

use crate::ratelimit::RateLimit;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use crate::caps::{Capabilities, MAX_VERSION_JSON, SERVER_MAX_DATA_XFER, SERVER_MAX_MSG_FDS};
use crate::channel::{Channel, Incoming, Message};
use crate::client_dma::{ClientDma, ClientWindow};
use crate::dma::{Dma, DmaRoute, DmaWindow, UnsealedFiles};
use crate::error::{Errno, VfuError};
use crate::irq::{IrqAction, IrqData, SetIrqs};
use crate::proto::*;

/// Most entries in one REGION_WRITE_MULTI (QEMU batches at most 200).
pub const MAX_WRITE_MULTI: u64 = 1024;
/// How long a refused client has, in total, to send its first message.
pub const REFUSE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a new client has, in total, to complete VERSION.
pub const HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Refused clients answered at once; more are closed unanswered.
pub const MAX_REFUSALS: usize = 4;
/// Room for the fixed part of any message on top of the data cap.
const FIXED_OVERHEAD: usize = 4096;

/// How a region's memory may be mmapped by the client.
#[derive(Debug, Clone)]
pub struct RegionMmap {
    /// The fd sent with the region info; the backend keeps it open.
    pub fd: RawFd,
    /// File offset of the region's start.
    pub offset: u64,
    /// Mappable areas (offset, size) inside the region; empty means all of it.
    pub sparse_areas: Vec<(u64, u64)>,
}

/// One region as the backend describes it.
#[derive(Debug, Clone, Default)]
pub struct RegionDesc {
    /// `VFIO_REGION_INFO_FLAG_READ | _WRITE` (MMAP and CAPS are added by the server).
    pub flags: u32,
    pub size: u64,
    pub mmap: Option<RegionMmap>,
    /// `VFIO_REGION_INFO_CAP_TYPE` (type, subtype), for device-specific regions.
    pub type_cap: Option<(u32, u32)>,
}

/// One IRQ index as the backend describes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct IrqDesc {
    pub flags: u32,
    pub count: u32,
}

/// What a DMA_MAP brings with it.
#[derive(Debug, Clone, Copy)]
pub enum MapSource<'a> {
    /// A file, mapped from `offset`.
    File { file: &'a File, offset: u64 },
    /// No fd: the client keeps the memory (QEMU's ROM ranges, guest RAM that is not
    /// shared memory, another device's mmapped BAR).
    NoFd,
}

/// Who connected, as the kernel tells it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo {
    pub pid: Option<i32>,
}

/// The device behind a socket. Requests arrive validated: region accesses lie inside
/// the region and respect its READ/WRITE flags, IRQ ranges lie inside the index.
pub trait Backend {
    /// `VFIO_DEVICE_FLAGS_*` for DEVICE_GET_INFO.
    fn device_flags(&self) -> u32 {
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    }
    fn num_regions(&self) -> u32 {
        0
    }
    fn region(&self, _index: u32) -> Option<RegionDesc> {
        None
    }
    fn num_irqs(&self) -> u32 {
        0
    }
    fn irq(&self, _index: u32) -> Option<IrqDesc> {
        None
    }
    fn region_read(&mut self, _index: u32, _offset: u64, _data: &mut [u8]) -> Result<(), Errno> {
        Err(Errno::ENOTSUP)
    }
    fn region_write(&mut self, _index: u32, _offset: u64, _data: &[u8]) -> Result<(), Errno> {
        Err(Errno::ENOTSUP)
    }
    fn set_irqs(&mut self, _req: SetIrqs) -> Result<(), Errno> {
        Err(Errno::ENOTSUP)
    }
    fn reset(&mut self) -> Result<(), Errno> {
        Err(Errno::ENOTSUP)
    }
    /// DEVICE_GET_REGION_IO_FDS: the reply payload after the 16-byte fixed part, and fds.
    fn region_io_fds(&mut self, _index: u32, _argsz: u32) -> Result<(Vec<u8>, Vec<RawFd>), Errno> {
        Err(Errno::ENOTSUP)
    }
    /// DEVICE_FEATURE: `ops` is GET/SET/PROBE bits; returns the reply data that follows
    /// the 8-byte fixed part.
    fn device_feature(
        &mut self,
        _feature: u32,
        _ops: u32,
        _data: &[u8],
        _argsz: u32,
    ) -> Result<Vec<u8>, Errno> {
        Err(Errno::ENOTSUP)
    }
    /// MIG_DATA_READ: at most `max` bytes; fewer means the end of the data.
    fn mig_data_read(&mut self, _max: u32) -> Result<Vec<u8>, Errno> {
        Err(Errno::ENOTSUP)
    }
    fn mig_data_write(&mut self, _data: &[u8]) -> Result<(), Errno> {
        Err(Errno::ENOTSUP)
    }
    /// A DMA_MAP is about to add `window`. A backend that serves such a window
    /// itself (it recognises the memory as its own, such as another function's device
    /// memory) returns the route; `None` leaves it to the server, which maps a file
    /// and serves a window without an fd through DMA_READ/DMA_WRITE to the client.
    fn dma_route(
        &mut self,
        _window: DmaWindow,
        _source: MapSource<'_>,
    ) -> Option<std::sync::Arc<dyn DmaRoute>> {
        None
    }
    /// A client connected (before its first message is read).
    fn connected(&mut self, _client: ClientInfo) {}
    /// A window was added to the DMA space.
    fn dma_mapped(&mut self, _window: DmaWindow) {}
    /// A window is about to leave the DMA space; the device must stop using it.
    fn dma_unmapping(&mut self, _window: DmaWindow) {}
    /// The client went away: drop its IRQ fds, keep device state.
    fn disconnected(&mut self) {}

    /// Called after the connection's `seq`-th message (1 for the first) was answered;
    /// returning false closes the connection there, as a client that vanished would
    /// (a fault-injection point; the default keeps it).
    fn after_message(&mut self, _seq: u64) -> bool {
        true
    }
}

/// Limits of a server.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    pub max_msg_fds: u32,
    pub max_data_xfer_size: u32,
    /// DMA_MAP of a file that cannot be sealed against shrinking: refused with `EPERM`
    /// by default; `Allow` (`mlx5-emu --allow-unsealed-dma`) is for VMMs whose guest
    /// RAM is a plain shared file (QEMU's `memory-backend-file,share=on`), and trusts
    /// the client not to truncate it.
    pub unsealed_dma: UnsealedFiles,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_msg_fds: SERVER_MAX_MSG_FDS,
            max_data_xfer_size: SERVER_MAX_DATA_XFER,
            unsealed_dma: UnsealedFiles::Refuse,
        }
    }
}

/// A listening vfio-user socket that removes its file when dropped.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// A handle on the connection being served, so `shutdown` can end it.
    current: Mutex<Option<UnixStream>>,
    stopping: AtomicBool,
    /// Refusals under way, each on a thread of its own.
    refusing: AtomicUsize,
}

impl Listener {
    /// Binds `path`. A stale socket file (nobody accepts on it) is replaced; a live one
    /// is an error.
    pub fn bind(path: &Path) -> Result<Self, VfuError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(VfuError::Io(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                )));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(VfuError::SocketInUse(path.display().to_string()));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        Ok(Listener {
            listener,
            path: path.to_path_buf(),
            current: Mutex::new(None),
            stopping: AtomicBool::new(false),
            refusing: AtomicUsize::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients one at a time until [`Listener::shutdown`] (then `Ok`) or until
    /// `accept` fails. A VFIO device has one owner: while a client is attached, another
    /// one gets `EBUSY` in answer to its VERSION and is closed.
    pub fn serve<B: Backend>(
        &self,
        backend: &mut B,
        dma: &Dma,
        cfg: ServerConfig,
    ) -> Result<(), VfuError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<UnixStream>(1);
        std::thread::scope(|scope| {
            let acceptor = scope.spawn(move || self.accept_loop(scope, tx));
            for stream in rx {
                tracing::info!(socket = %self.path.display(), "client connected");
                let r = Connection::new(stream, cfg).run(backend, dma);
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
                match r {
                    Ok(()) => tracing::info!(socket = %self.path.display(), "client disconnected"),
                    Err(e) => {
                        tracing::warn!(socket = %self.path.display(), error = %e, "connection ended")
                    }
                }
            }
            acceptor.join().unwrap_or(Ok(()))
        })
    }

    /// Accepts clients. One that arrives while the device is attached is handed to a
    /// short-lived thread of its own (at most [`MAX_REFUSALS`] at once; beyond that it is
    /// closed at once), which waits out the previous connection's teardown or refuses
    /// it under a total deadline, so no client can hold the acceptor.
    fn accept_loop<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        tx: std::sync::mpsc::SyncSender<UnixStream>,
    ) -> Result<(), VfuError> {
        let refusing = &self.refusing;
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut failures = 0u64;
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    s
                }
                Err(_) if self.stopping.load(Ordering::SeqCst) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if !accept_error_is_fatal(&e) => {
                    // EMFILE, ENFILE, ECONNABORTED, ENOBUFS, ENOMEM...: the listener
                    // stays; the next accept is tried after a growing pause.
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(socket = %self.path.display(), error = %e, failures, "accept failed; retrying");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match self.claim(stream, &tx, false) {
                Claim::Served => {}
                Claim::Stop => return Ok(()),
                Claim::Busy(stream) => {
                    if refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSALS {
                        refusing.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(socket = %self.path.display(), "client closed unanswered: too many refusals under way");
                        continue;
                    }
                    let tx = tx.clone();
                    let spawned = std::thread::Builder::new()
                        .name("vfu-refuse".into())
                        .spawn_scoped(scope, move || {
                            if let Claim::Busy(stream) = self.claim(stream, &tx, true) {
                                tracing::warn!(socket = %self.path.display(), "second client refused: the device is attached");
                                refuse_busy(stream);
                            }
                            refusing.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        refusing.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(socket = %self.path.display(), "client closed unanswered: cannot start a thread");
                    }
                }
            }
        }
    }

    /// Makes `stream` the connection served if none is (after waiting up to
    /// [`BUSY_GRACE`] for the previous one's teardown when `grace`).
    fn claim(
        &self,
        stream: UnixStream,
        tx: &std::sync::mpsc::SyncSender<UnixStream>,
        grace: bool,
    ) -> Claim {
        let start = std::time::Instant::now();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        while grace && cur.is_some() && start.elapsed() < BUSY_GRACE {
            drop(cur);
            std::thread::sleep(std::time::Duration::from_millis(2));
            cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        }
        // Checked and stored under one lock, so `shutdown` either sees this
        // connection or stops us before we serve it.
        if self.stopping.load(Ordering::SeqCst) {
            return Claim::Stop;
        }
        if cur.is_some() {
            return Claim::Busy(stream);
        }
        *cur = stream.try_clone().ok();
        drop(cur);
        if tx.send(stream).is_err() {
            return Claim::Stop;
        }
        Claim::Served
    }
}

/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// An accept error that means the listening socket itself is unusable (every other
/// one, fd exhaustion first, is transient).
fn accept_error_is_fatal(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EINVAL | libc::EFAULT)
    )
}

/// What became of an accepted client.
enum Claim {
    Served,
    Busy(UnixStream),
    Stop,
}

/// How long a new client waits for the previous connection's teardown.
const BUSY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Answers a refused client's first message with `EBUSY`, then closes; the whole
/// exchange (a claimed payload's drain included) has [`REFUSE_DEADLINE`].
fn refuse_busy(stream: UnixStream) {
    let chan = Channel::new(stream);
    let deadline = std::time::Instant::now() + REFUSE_DEADLINE;
    match chan.recv_by(MAX_VERSION_JSON, 0, Some(deadline)) {
        Ok(Incoming::Message(m)) => {
            let h = m.header.error_reply(Errno::EBUSY);
            let _ = chan.stream().set_write_timeout(Some(REFUSE_DEADLINE));
            let _ = chan.send(&h, &[], &[]);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "refused client hung up on"),
    }
}

impl Listener {
    /// Stops `serve`: wakes the accept and ends the connection being served.
    pub fn shutdown(&self) {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a socket fd we own; it only changes the socket's state.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(s) = cur.as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The span of one vfio-user message: its command, message id and size; `fds` and the
/// `reply` size or the `errno` are recorded as the message is handled.
fn message_span(h: &Header) -> tracing::Span {
    tracing::debug_span!(
        "vfio-user",
        cmd = command_name(h.command),
        id = h.msg_id,
        size = h.msg_size,
        fds = tracing::field::Empty,
        reply = tracing::field::Empty,
        errno = tracing::field::Empty,
    )
}

/// The reply to one message: a payload and fds to send, or an errno.
type Reply = Result<(Vec<u8>, Vec<RawFd>), Errno>;

fn ok(payload: Vec<u8>) -> Reply {
    Ok((payload, Vec::new()))
}

/// One client connection.
pub struct Connection {
    chan: Channel,
    cfg: ServerConfig,
    client: Option<Capabilities>,
    /// Requests to the client for windows mapped without an fd (made at the first).
    client_dma: Option<std::sync::Arc<ClientDma>>,
}

/// The process at the other end of `stream`.
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into `cred`, which
    // lives for the call; the fd is the stream's own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

impl Connection {
    pub fn new(stream: UnixStream, cfg: ServerConfig) -> Self {
        Connection {
            chan: Channel::new(stream),
            cfg,
            client: None,
            client_dma: None,
        }
    }

    /// The connection's server-to-client requests, made on first use.
    fn client_dma(&mut self) -> Result<std::sync::Arc<ClientDma>, Errno> {
        if let Some(c) = &self.client_dma {
            return Ok(std::sync::Arc::clone(c));
        }
        let chan = self.chan.try_clone().map_err(|e| Errno::from_io(&e))?;
        // Requests no larger than the client accepts nor than we read back.
        let max = self
            .client
            .as_ref()
            .map_or(crate::caps::DEFAULT_MAX_DATA_XFER, |c| c.max_data_xfer_size)
            .min(self.cfg.max_data_xfer_size);
        let c = ClientDma::new(chan, max, std::thread::current().id());
        self.client_dma = Some(std::sync::Arc::clone(&c));
        Ok(c)
    }

    fn max_payload(&self) -> usize {
        self.cfg.max_data_xfer_size as usize + FIXED_OVERHEAD.max(MAX_VERSION_JSON)
    }

    /// Serves until the client disconnects; then drops every DMA map and tells the
    /// backend (which drops IRQ fds and keeps device state).
    pub fn run<B: Backend>(mut self, backend: &mut B, dma: &Dma) -> Result<(), VfuError> {
        backend.connected(ClientInfo {
            pid: peer_pid(self.chan.stream()),
        });
        let r = self.serve(backend, dma);
        if let Some(c) = &self.client_dma {
            c.close();
        }
        for w in dma.windows() {
            backend.dma_unmapping(w);
        }
        let n = dma.unmap_all();
        backend.disconnected();
        tracing::debug!(dma_maps_dropped = n, "connection state released");
        match r {
            Err(VfuError::Disconnected) => Ok(()),
            other => other,
        }
    }

    fn serve<B: Backend>(&mut self, backend: &mut B, dma: &Dma) -> Result<(), VfuError> {
        let handshake = std::time::Instant::now() + HANDSHAKE_DEADLINE;
        let mut seq = 0u64;
        loop {
            if seq > 0 && !backend.after_message(seq) {
                tracing::warn!(messages = seq, "connection closed by the backend");
                return Err(VfuError::Disconnected);
            }
            seq += 1;
            // Until VERSION is negotiated every message must arrive before the
            // handshake deadline: a client that connects and stalls does not keep the
            // device's owner out.
            let deadline = self.client.is_none().then_some(handshake);
            let max_fds = self.cfg.max_msg_fds as usize;
            match self.chan.recv_by(self.max_payload(), max_fds, deadline)? {
                Incoming::Message(msg) if self.is_dma_reply(&msg) => {
                    if let Some(c) = &self.client_dma {
                        c.deliver(msg);
                    }
                }
                Incoming::Message(msg) => self.handle(msg, backend, dma)?,
                Incoming::Oversized(h) => {
                    let span = message_span(&h);
                    let _g = span.enter();
                    static OVERSIZED: RateLimit = RateLimit::per_second();
                    crate::warn_limited!(
                        OVERSIZED,
                        "message above the size cap, payload discarded"
                    );
                    self.reply_err(&span, &h, Errno::E2BIG)?;
                }
                Incoming::Undersized(h) => {
                    let span = message_span(&h);
                    let _g = span.enter();
                    tracing::warn!(
                        "message size below the header: closing, the stream cannot be resynchronised"
                    );
                    self.reply_err(&span, &h, Errno::EINVAL)?;
                    return Err(VfuError::BadMessageSize {
                        size: h.msg_size,
                        min: HEADER_SIZE,
                        max: HEADER_SIZE + self.max_payload(),
                    });
                }
            }
        }
    }

    /// A reply to one of our DMA_READ/DMA_WRITE requests (the only requests a server
    /// sends).
    fn is_dma_reply(&self, msg: &Message) -> bool {
        let h = &msg.header;
        h.msg_type() == crate::proto::FLAGS_TYPE_REPLY
            && (h.command == Command::DmaRead as u16 || h.command == Command::DmaWrite as u16)
            && self.client_dma.is_some()
    }

    /// Sends the error reply for `h` (none for a posted request) and records the errno
    /// on the message's span.
    fn reply_err(&self, span: &tracing::Span, h: &Header, errno: Errno) -> Result<(), VfuError> {
        span.record("errno", errno.raw());
        if h.no_reply() {
            return Ok(());
        }
        let rh = h.error_reply(errno);
        self.chan.send(&rh, &[], &[])
    }

    /// Handles one message inside its span: the backend's own events nest in it, and
    /// the errno (if any) is recorded on it when the reply goes out.
    fn handle<B: Backend>(
        &mut self,
        msg: Message,
        backend: &mut B,
        dma: &Dma,
    ) -> Result<(), VfuError> {
        let h = msg.header;
        let span = message_span(&h);
        let _g = span.enter();
        let nfds = msg.fds.len();
        span.record("fds", nfds);
        let reply = self.dispatch(msg, backend, dma);
        match reply {
            Ok((payload, fds)) => {
                span.record("reply", payload.len());
                tracing::debug!("ok");
                if h.no_reply() {
                    return Ok(());
                }
                let rh = h.reply(payload.len());
                self.chan.send(&rh, &payload, &fds)
            }
            Err(errno) => {
                if h.no_reply() {
                    static POSTED: RateLimit = RateLimit::per_second();
                    crate::warn_limited!(POSTED, %errno, "posted request failed (no reply sent)");
                } else {
                    tracing::debug!(%errno, "error reply");
                }
                self.reply_err(&span, &h, errno)
            }
        }
    }

    fn dispatch<B: Backend>(&mut self, msg: Message, backend: &mut B, dma: &Dma) -> Reply {
        let h = msg.header;
        if h.msg_type() != FLAGS_TYPE_COMMAND {
            return Err(Errno::EINVAL);
        }
        if msg.fds_lost {
            // Logged once by the channel as it happened; the fds that did arrive close
            // with the message.
            return Err(Errno::EMFILE);
        }
        if msg.fds_dropped > 0 || msg.fds.len() > self.cfg.max_msg_fds as usize {
            static TOO_MANY_FDS: RateLimit = RateLimit::per_second();
            crate::warn_limited!(
                TOO_MANY_FDS,
                kept = msg.fds.len(),
                closed = msg.fds_dropped,
                max = self.cfg.max_msg_fds,
                "message with more fds than negotiated: refused, the excess closed on arrival"
            );
            return Err(Errno::EINVAL);
        }
        let Some(cmd) = Command::from_u16(h.command) else {
            return Err(Errno::ENOSYS);
        };
        let takes_fds = matches!(cmd, Command::DmaMap | Command::DeviceSetIrqs);
        if !takes_fds && !msg.fds.is_empty() {
            return Err(Errno::EINVAL);
        }
        if cmd == Command::Version {
            return self.version(&msg.payload);
        }
        if self.client.is_none() {
            // The spec has VERSION first; anything else before it is a protocol error.
            return Err(Errno::EINVAL);
        }
        let p = &msg.payload[..];
        match cmd {
            Command::Version => unreachable!("handled above"),
            Command::DmaMap => self.dma_map(p, msg.fds, backend, dma),
            Command::DmaUnmap => self.dma_unmap(p, backend, dma),
            Command::DeviceGetInfo => {
                let req = DeviceInfo::decode(p)?;
                if (req.argsz as usize) < DeviceInfo::SIZE {
                    return Err(Errno::EINVAL);
                }
                ok(DeviceInfo {
                    argsz: DeviceInfo::SIZE as u32,
                    flags: backend.device_flags(),
                    num_regions: backend.num_regions(),
                    num_irqs: backend.num_irqs(),
                }
                .encode())
            }
            Command::DeviceGetRegionInfo => self.region_info(p, backend),
            Command::DeviceGetRegionIoFds => {
                let req = IrqInfoWire::decode(p)?; // same 16-byte shape: argsz, flags, index, count
                if (req.argsz as usize) < 16 || req.index >= backend.num_regions() {
                    return Err(Errno::EINVAL);
                }
                let (tail, fds) = backend.region_io_fds(req.index, req.argsz)?;
                let mut out = req.encode();
                out.extend_from_slice(&tail);
                Ok((out, fds))
            }
            Command::DeviceGetIrqInfo => {
                let req = IrqInfoWire::decode(p)?;
                if (req.argsz as usize) < IrqInfoWire::SIZE {
                    return Err(Errno::EINVAL);
                }
                let irq = (req.index < backend.num_irqs())
                    .then(|| backend.irq(req.index))
                    .flatten()
                    .ok_or(Errno::EINVAL)?;
                ok(IrqInfoWire {
                    argsz: IrqInfoWire::SIZE as u32,
                    flags: irq.flags,
                    index: req.index,
                    count: irq.count,
                }
                .encode())
            }
            Command::DeviceSetIrqs => self.set_irqs(p, msg.fds, backend),
            Command::RegionRead => {
                let req = RegionAccess::decode(p)?;
                if p.len() != RegionAccess::SIZE {
                    return Err(Errno::EINVAL);
                }
                self.check_access(
                    backend,
                    req.region,
                    req.offset,
                    req.count as u64,
                    VFIO_REGION_INFO_FLAG_READ,
                )?;
                let mut out = req.encode();
                out.resize(RegionAccess::SIZE + req.count as usize, 0);
                backend.region_read(req.region, req.offset, &mut out[RegionAccess::SIZE..])?;
                ok(out)
            }
            Command::RegionWrite => {
                let req = RegionAccess::decode(p)?;
                let data = &p[RegionAccess::SIZE..];
                if data.len() != req.count as usize {
                    return Err(Errno::EINVAL);
                }
                self.check_access(
                    backend,
                    req.region,
                    req.offset,
                    req.count as u64,
                    VFIO_REGION_INFO_FLAG_WRITE,
                )?;
                backend.region_write(req.region, req.offset, data)?;
                ok(req.encode())
            }
            // Server-to-client commands have no meaning in this direction.
            Command::DmaRead | Command::DmaWrite => Err(Errno::EINVAL),
            Command::DeviceReset => {
                if !p.is_empty() {
                    return Err(Errno::EINVAL);
                }
                backend.reset()?;
                ok(Vec::new())
            }
            Command::RegionWriteMulti => self.write_multi(p, backend),
            Command::DeviceFeature => {
                let mut r = Reader::new(p);
                let argsz = r.u32()?;
                let flags = r.u32()?;
                let ops = flags & !VFIO_DEVICE_FEATURE_MASK;
                let all =
                    VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE;
                if ops & !all != 0 || ops == 0 {
                    return Err(Errno::EINVAL);
                }
                let get_set = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET;
                if ops & get_set == get_set && ops & VFIO_DEVICE_FEATURE_PROBE == 0 {
                    return Err(Errno::EINVAL);
                }
                if (argsz as usize) < DeviceFeatureWire::SIZE {
                    return Err(Errno::EINVAL);
                }
                let data = r.rest();
                let tail =
                    backend.device_feature(flags & VFIO_DEVICE_FEATURE_MASK, ops, data, argsz)?;
                let mut w = Writer::new();
                w.u32((DeviceFeatureWire::SIZE + tail.len()) as u32)
                    .u32(flags)
                    .bytes(&tail);
                ok(w.finish())
            }
            Command::MigDataRead => {
                let mut r = Reader::new(p);
                let _argsz = r.u32()?;
                let size = r.u32()?;
                if r.remaining() != 0 || size > self.cfg.max_data_xfer_size {
                    return Err(Errno::EINVAL);
                }
                let data = backend.mig_data_read(size)?;
                if data.len() > size as usize {
                    tracing::error!(
                        asked = size,
                        got = data.len(),
                        "backend returned more migration data than asked"
                    );
                    return Err(Errno::EIO);
                }
                let mut w = Writer::new();
                w.u32((MigData::SIZE + data.len()) as u32)
                    .u32(data.len() as u32)
                    .bytes(&data);
                ok(w.finish())
            }
            Command::MigDataWrite => {
                let mut r = Reader::new(p);
                let _argsz = r.u32()?;
                let size = r.u32()?;
                let data = r.rest();
                if data.len() != size as usize || size > self.cfg.max_data_xfer_size {
                    return Err(Errno::EINVAL);
                }
                backend.mig_data_write(data)?;
                ok(Vec::new())
            }
        }
    }

    fn version(&mut self, p: &[u8]) -> Reply {
        if self.client.is_some() {
            return Err(Errno::EINVAL);
        }
        let mut r = Reader::new(p);
        let major = r.u16()?;
        let minor = r.u16()?;
        if major != VERSION_MAJOR {
            return Err(Errno::ENOTSUP);
        }
        let client = Capabilities::parse(r.rest())?;
        if client.max_msg_fds == 0 {
            return Err(Errno::EINVAL);
        }
        let ours = Capabilities::server_reply(&client);
        tracing::info!(
            major,
            minor,
            client_max_fds = client.max_msg_fds,
            client_max_xfer = client.max_data_xfer_size,
            migration = client.migration,
            "version negotiated"
        );
        self.client = Some(client);
        // Never above the client's proposal (today we implement minor 0 only).
        #[allow(clippy::unnecessary_min_or_max)]
        let minor = minor.min(VERSION_MINOR);
        let mut w = Writer::new();
        w.u16(VERSION_MAJOR).u16(minor).bytes(&ours.to_json());
        ok(w.finish())
    }

    fn check_access<B: Backend>(
        &self,
        backend: &B,
        index: u32,
        offset: u64,
        count: u64,
        need: u32,
    ) -> Result<(), Errno> {
        if index >= backend.num_regions() {
            return Err(Errno::EINVAL);
        }
        let r = backend.region(index).ok_or(Errno::EINVAL)?;
        if r.flags & need == 0 || count > self.cfg.max_data_xfer_size as u64 {
            return Err(Errno::EINVAL);
        }
        let end = offset.checked_add(count).ok_or(Errno::EINVAL)?;
        if end > r.size {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    fn dma_map<B: Backend>(
        &mut self,
        p: &[u8],
        fds: Vec<File>,
        backend: &mut B,
        dma: &Dma,
    ) -> Reply {
        let req = DmaMap::decode(p)?;
        if p.len() != DmaMap::SIZE || (req.argsz as usize) < DmaMap::SIZE {
            return Err(Errno::EINVAL);
        }
        if fds.len() > 1 {
            return Err(Errno::EINVAL);
        }
        let w = DmaWindow {
            iova: req.address,
            size: req.size,
            flags: req.flags,
        };
        let file = fds.into_iter().next();
        let source = match &file {
            Some(f) => MapSource::File {
                file: f,
                offset: req.offset,
            },
            None => MapSource::NoFd,
        };
        if let Some(route) = backend.dma_route(w, source) {
            let what = route.describe();
            dma.map_routed(w.iova, w.size, w.flags, route)?;
            tracing::info!(
                iova = w.iova,
                size = w.size,
                flags = w.flags,
                served_by = %what,
                "DMA window routed"
            );
            backend.dma_mapped(w);
            return ok(Vec::new());
        }
        let Some(file) = file else {
            // No fd: the client keeps the memory, and the device reaches it with
            // DMA_READ/DMA_WRITE requests (slow, but what the protocol offers).
            let route = ClientWindow(self.client_dma()?);
            dma.map_routed(w.iova, w.size, w.flags, std::sync::Arc::new(route))?;
            tracing::info!(
                iova = w.iova,
                size = w.size,
                flags = w.flags,
                "DMA window without an fd: served through DMA_READ/DMA_WRITE to the client"
            );
            backend.dma_mapped(w);
            return ok(Vec::new());
        };
        dma.map_with(
            req.address,
            req.size,
            file,
            req.offset,
            req.flags,
            self.cfg.unsealed_dma,
        )?;
        tracing::debug!(iova = w.iova, size = w.size, flags = w.flags, "dma mapped");
        backend.dma_mapped(w);
        ok(Vec::new())
    }

    fn dma_unmap<B: Backend>(&self, p: &[u8], backend: &mut B, dma: &Dma) -> Reply {
        // An unmap waits for the accesses holding its windows; one waiting for a reply
        // from the client would never get it while this thread waits, so the requests
        // waiting now fail when a window the client serves goes.
        if let Some(c) = &self.client_dma {
            let (address, size) = DmaUnmap::decode(p).map(|r| (r.address, r.size))?;
            let client_served = |w: &DmaWindow| {
                dma.describe(w.iova).as_deref() == Some(crate::client_dma::CLIENT_WINDOW)
            };
            let all = dma.windows();
            let hit = if size == 0 {
                all.iter().any(client_served)
            } else {
                all.iter()
                    .filter(|w| w.iova < address.saturating_add(size) && w.iova + w.size > address)
                    .any(client_served)
            };
            if hit {
                c.fail_pending("the window is being unmapped");
            }
        }
        let req = DmaUnmap::decode(p)?;
        if p.len() != DmaUnmap::SIZE || (req.argsz as usize) < DmaUnmap::SIZE {
            return Err(Errno::EINVAL);
        }
        if req.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(Errno::ENOTSUP);
        }
        if req.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(Errno::EINVAL);
        }
        if req.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            if req.address != 0 || req.size != 0 {
                return Err(Errno::EINVAL);
            }
            for w in dma.windows() {
                backend.dma_unmapping(w);
            }
            dma.unmap_all();
        } else {
            // Linux type1: every window the range covers whole goes, a range covering
            // none succeeds, a window cut in part refuses the whole unmap (EINVAL).
            let covered = dma.covered(req.address, req.size)?;
            for &w in &covered {
                backend.dma_unmapping(w);
            }
            let gone = dma.unmap(req.address, req.size)?;
            tracing::debug!(
                iova = req.address,
                size = req.size,
                windows = gone.len(),
                "dma unmapped"
            );
        }
        ok(DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            ..req
        }
        .encode())
    }

    fn region_info<B: Backend>(&self, p: &[u8], backend: &B) -> Reply {
        let req = RegionInfoWire::decode(p)?;
        if (req.argsz as usize) < RegionInfoWire::SIZE || req.index >= backend.num_regions() {
            return Err(Errno::EINVAL);
        }
        let r = backend.region(req.index).ok_or(Errno::EINVAL)?;
        let mut flags = r.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE);
        // Capability chain; offsets count from the start of vfio_region_info.
        let mut caps: Vec<(u16, Vec<u8>)> = Vec::new();
        if let Some(m) = &r.mmap {
            flags |= VFIO_REGION_INFO_FLAG_MMAP;
            if !m.sparse_areas.is_empty() {
                let mut w = Writer::new();
                w.u32(m.sparse_areas.len() as u32).u32(0);
                for &(off, size) in &m.sparse_areas {
                    w.u64(off).u64(size);
                }
                caps.push((VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16, w.finish()));
            }
        }
        if let Some((ty, sub)) = r.type_cap {
            let mut w = Writer::new();
            w.u32(ty).u32(sub);
            caps.push((VFIO_REGION_INFO_CAP_TYPE as u16, w.finish()));
        }
        let caps_len: usize = caps.iter().map(|(_, b)| CAP_HEADER_SIZE + b.len()).sum();
        let needed = RegionInfoWire::SIZE + caps_len;
        let fits = req.argsz as usize >= needed;
        let mut info = RegionInfoWire {
            argsz: needed as u32,
            flags,
            index: req.index,
            cap_offset: 0,
            size: r.size,
            offset: r.mmap.as_ref().map_or(0, |m| m.offset),
        };
        // CAPS only with the chain itself: QEMU's vfio-user client refuses CAPS with a
        // cap_offset of 0 (EINVAL) instead of retrying; argsz alone asks it to retry.
        if fits && !caps.is_empty() {
            info.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        }
        let mut out = Vec::new();
        if fits && !caps.is_empty() {
            info.cap_offset = RegionInfoWire::SIZE as u32;
            out = info.encode();
            let mut at = RegionInfoWire::SIZE;
            let n = caps.len();
            for (i, (id, body)) in caps.into_iter().enumerate() {
                let next_at = at + CAP_HEADER_SIZE + body.len();
                let next = if i + 1 < n { next_at as u32 } else { 0 };
                let mut w = Writer::new();
                w.u16(id).u16(1).u32(next).bytes(&body);
                out.extend_from_slice(&w.finish());
                at = next_at;
            }
        } else {
            out.extend_from_slice(&info.encode());
        }
        // The fd goes with the reply that carries the whole description.
        let fds = match &r.mmap {
            Some(m) if fits => vec![m.fd],
            _ => Vec::new(),
        };
        Ok((out, fds))
    }

    fn set_irqs<B: Backend>(&self, p: &[u8], fds: Vec<File>, backend: &mut B) -> Reply {
        let req = IrqSetWire::decode(p)?;
        if (req.argsz as usize) < IrqSetWire::SIZE {
            return Err(Errno::EINVAL);
        }
        let (data_type, action) = SetIrqs::parse_flags(req.flags)?;
        let irq = (req.index < backend.num_irqs())
            .then(|| backend.irq(req.index))
            .flatten()
            .ok_or(Errno::EINVAL)?;
        let disable_all =
            data_type == VFIO_IRQ_SET_DATA_NONE && action == IrqAction::Trigger && req.count == 0;
        let end = req.start.checked_add(req.count).ok_or(Errno::EINVAL)?;
        if end > irq.count || (req.count == 0 && !disable_all) {
            return Err(Errno::EINVAL);
        }
        let tail = &p[IrqSetWire::SIZE..];
        let data = match data_type {
            VFIO_IRQ_SET_DATA_NONE => {
                if !tail.is_empty() || !fds.is_empty() {
                    return Err(Errno::EINVAL);
                }
                IrqData::None
            }
            VFIO_IRQ_SET_DATA_BOOL => {
                if tail.len() != req.count as usize
                    || !fds.is_empty()
                    || tail.iter().any(|&b| b > 1)
                {
                    return Err(Errno::EINVAL);
                }
                IrqData::Bool(tail.iter().map(|&b| b == 1).collect())
            }
            VFIO_IRQ_SET_DATA_EVENTFD => {
                if !tail.is_empty() || !(fds.is_empty() || fds.len() == req.count as usize) {
                    return Err(Errno::EINVAL);
                }
                for f in &fds {
                    crate::irq::check_eventfd(f)?;
                }
                IrqData::Eventfds(fds)
            }
            _ => return Err(Errno::EINVAL),
        };
        backend.set_irqs(SetIrqs {
            index: req.index,
            start: req.start,
            count: req.count,
            action,
            data,
        })?;
        ok(Vec::new())
    }

    fn write_multi<B: Backend>(&self, p: &[u8], backend: &mut B) -> Reply {
        let mut r = Reader::new(p);
        let n = r.u64()?;
        if n == 0
            || n > MAX_WRITE_MULTI
            || r.remaining() as u64 != n * WRITE_MULTI_ENTRY_SIZE as u64
        {
            return Err(Errno::EINVAL);
        }
        // Validate every entry before applying any, so a bad batch changes nothing.
        let mut writes = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let a = RegionAccess::decode(r.bytes(RegionAccess::SIZE)?)?;
            let data = r.bytes(WRITE_MULTI_DATA_MAX)?;
            if a.count as usize > WRITE_MULTI_DATA_MAX {
                return Err(Errno::EINVAL);
            }
            self.check_access(
                backend,
                a.region,
                a.offset,
                a.count as u64,
                VFIO_REGION_INFO_FLAG_WRITE,
            )?;
            writes.push((a, &data[..a.count as usize]));
        }
        for (a, data) in writes {
            backend.region_write(a.region, a.offset, data)?;
        }
        let mut w = Writer::new();
        w.u64(n);
        ok(w.finish())
    }
}

#[cfg(test)]
mod tests;
