//! Server-to-client DMA: windows the client mapped without an fd, served with
//! DMA_READ / DMA_WRITE messages on the connection's socket.
//!
//! QEMU maps every part of the guest's address space the device may reach, and what it
//! cannot hand over as a file (guest RAM not backed by shared memory, another device's
//! mmapped BAR) arrives as a DMA_MAP without an fd. A device access to such a window
//! becomes a request to the client, and the accessing thread waits for the reply. The
//! connection thread, which reads the socket, hands replies to their waiters; it must
//! therefore never wait for one itself: an access from the connection thread fails at
//! once instead of deadlocking. Every wait is bounded ([`CLIENT_DMA_TIMEOUT`]); when the
//! client goes away, every waiter fails.
//!
//! The wire layout is QEMU's (see [`crate::proto::dma_rw`]).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::channel::{Channel, Message};
use crate::dma::{DmaError, DmaRoute, Initiator};
use crate::error::Errno;
use crate::proto::{dma_rw, Command, Header, FLAGS_TYPE_COMMAND, HEADER_SIZE};

/// How long a device access waits for the client's answer (QEMU's own default for its
/// requests, `x-msg-timeout`).
pub const CLIENT_DMA_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests to the client waiting at once; more wait for room (bounded by the timeout).
pub const MAX_CLIENT_DMA_PENDING: usize = 64;

/// A waiter's slot: empty until its reply (or the end of the connection) arrives.
type Slot = Option<Result<Vec<u8>, String>>;

struct Pending {
    next_id: u16,
    waiting: HashMap<u16, Slot>,
    /// False once the connection ended: every access fails.
    alive: bool,
}

/// The connection's server-to-client requests. Shared by every window it serves.
pub struct ClientDma {
    chan: Channel,
    /// Most bytes per request, as the client announced (`max_data_xfer_size`).
    max_xfer: usize,
    conn_thread: ThreadId,
    pending: Mutex<Pending>,
    cv: Condvar,
    timeout: Duration,
}

impl ClientDma {
    /// Requests go out on `chan` (a clone of the connection's channel, sharing its send
    /// lock), at most `max_xfer` bytes each; `conn_thread` is the thread that reads the
    /// socket.
    pub fn new(chan: Channel, max_xfer: u32, conn_thread: ThreadId) -> Arc<Self> {
        Arc::new(ClientDma {
            chan,
            max_xfer: (max_xfer as usize).max(1),
            conn_thread,
            pending: Mutex::new(Pending {
                // Server-side ids start high, away from the client's, for readable logs
                // (ids belong to their sender; nothing depends on this).
                next_id: 0x8000,
                waiting: HashMap::new(),
                alive: true,
            }),
            cv: Condvar::new(),
            timeout: CLIENT_DMA_TIMEOUT,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection thread received a reply to DMA_READ/DMA_WRITE: hands it to its
    /// waiter. A reply nobody waits for (late, after a timeout) is dropped with a log.
    pub fn deliver(&self, msg: Message) {
        let h = msg.header;
        let result = if h.is_error() {
            Err(format!("client answered {}", Errno::new(h.error as i32)))
        } else {
            Ok(msg.payload)
        };
        let mut p = self.lock();
        match p.waiting.get_mut(&h.msg_id) {
            Some(slot @ None) => {
                *slot = Some(result);
                self.cv.notify_all();
            }
            _ => {
                // A client can send these at will: one line a second, counted.
                static STRAY: crate::ratelimit::RateLimit =
                    crate::ratelimit::RateLimit::per_second();
                crate::warn_limited!(
                    STRAY,
                    id = h.msg_id,
                    cmd = h.command,
                    "reply to a DMA request nobody waits for: dropped"
                );
            }
        }
    }

    /// The connection ended: every waiter fails, every later access fails.
    pub fn close(&self) {
        let mut p = self.lock();
        p.alive = false;
        for slot in p.waiting.values_mut() {
            if slot.is_none() {
                *slot = Some(Err("the client disconnected".into()));
            }
        }
        self.cv.notify_all();
    }

    /// Fails every request waiting now (a window is being unmapped: the connection
    /// thread will not read replies until the unmap is done).
    pub fn fail_pending(&self, why: &str) {
        let mut p = self.lock();
        for slot in p.waiting.values_mut() {
            if slot.is_none() {
                *slot = Some(Err(why.to_string()));
            }
        }
        self.cv.notify_all();
    }

    /// Sends one request and waits for its reply payload.
    fn round_trip(
        &self,
        cmd: Command,
        payload: &[u8],
        iova: u64,
        len: u64,
    ) -> Result<Vec<u8>, DmaError> {
        let op = cmd.name();
        let fail = |why: String| DmaError::Client { iova, len, op, why };
        if std::thread::current().id() == self.conn_thread {
            return Err(fail(
                "issued from the thread that reads the client's socket, which could never see the reply".into(),
            ));
        }
        let deadline = Instant::now() + self.timeout;
        let id = {
            let mut p = self.lock();
            loop {
                if !p.alive {
                    return Err(fail("the client disconnected".into()));
                }
                if p.waiting.len() < MAX_CLIENT_DMA_PENDING {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(fail("too many requests waiting for the client".into()));
                }
                p = self
                    .cv
                    .wait_timeout(p, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let mut id = p.next_id;
            while p.waiting.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            p.next_id = id.wrapping_add(1);
            p.waiting.insert(id, None);
            id
        };
        let h = Header {
            msg_id: id,
            command: cmd as u16,
            msg_size: (HEADER_SIZE + payload.len()) as u32,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        };
        if let Err(e) = self.chan.send(&h, payload, &[]) {
            self.lock().waiting.remove(&id);
            self.cv.notify_all();
            return Err(fail(format!("cannot send the request: {e}")));
        }
        let mut p = self.lock();
        loop {
            if let Some(Some(_)) = p.waiting.get(&id) {
                let r = p.waiting.remove(&id).flatten().expect("checked above");
                self.cv.notify_all();
                return r.map_err(fail);
            }
            let now = Instant::now();
            if now >= deadline {
                p.waiting.remove(&id);
                self.cv.notify_all();
                return Err(fail(format!("no reply within {:?}", self.timeout)));
            }
            p = self
                .cv
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads `buf.len()` bytes at `iova` from the client, in requests of at most
    /// `max_xfer` bytes.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        for (i, chunk) in buf.chunks_mut(self.max_xfer).enumerate() {
            let at = iova + (i * self.max_xfer) as u64;
            let n = chunk.len() as u64;
            let reply = self.round_trip(
                Command::DmaRead,
                &dma_rw::encode_read(at, chunk.len() as u32),
                at,
                n,
            )?;
            match dma_rw::decode(&reply) {
                Some((a, c, data)) if a == at && c as usize == chunk.len() => {
                    chunk.copy_from_slice(data)
                }
                _ => {
                    return Err(DmaError::Client {
                        iova: at,
                        len: n,
                        op: "DMA_READ",
                        why: format!(
                            "malformed reply ({} bytes; expected address {at:#x}, count {n}, data at offset {})",
                            reply.len(),
                            dma_rw::DATA_OFFSET
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `iova` through the client.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        for (i, chunk) in data.chunks(self.max_xfer).enumerate() {
            let at = iova + (i * self.max_xfer) as u64;
            self.round_trip(
                Command::DmaWrite,
                &dma_rw::encode_write(at, chunk),
                at,
                chunk.len() as u64,
            )?;
        }
        Ok(())
    }
}

/// How [`ClientWindow::describe`] names a window served by the client.
pub const CLIENT_WINDOW: &str = "client (DMA_READ/DMA_WRITE)";

/// A window served by the client.
pub struct ClientWindow(pub Arc<ClientDma>);

impl DmaRoute for ClientWindow {
    fn read(&self, iova: u64, _offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.0.read(iova, buf)
    }

    fn write(
        &self,
        iova: u64,
        _offset: u64,
        data: &[u8],
        _initiator: Initiator,
    ) -> Result<(), DmaError> {
        self.0.write(iova, data)
    }

    fn describe(&self) -> String {
        CLIENT_WINDOW.into()
    }
}
