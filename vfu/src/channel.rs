//! Framing: whole messages over a unix stream socket, fds by SCM_RIGHTS.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::VfuError;
use crate::proto::{Header, HEADER_SIZE};

/// Most fds the kernel passes in one message (`SCM_MAX_FD`); we always offer room for
/// this many so that an over-eager peer is detected (and its fds closed) instead of
/// truncating the control data and losing sync.
pub const SCM_MAX_FD: usize = 253;

/// Whether a socket read failed because its timeout expired.
fn is_timeout(errno: i32) -> bool {
    errno == libc::EAGAIN || errno == libc::EWOULDBLOCK
}

/// The error of a receive whose deadline passed.
fn timed_out() -> VfuError {
    VfuError::DeadlinePassed
}

/// Chunk used to discard an oversized payload.
const DRAIN_CHUNK: usize = 64 * 1024;

/// A received message: header, payload (size - 16 bytes), and the fds that came with it.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
    /// fds beyond the receive cap: closed as they arrived, counted so that the message
    /// is refused.
    pub fds_dropped: usize,
    /// The kernel could not hand over every fd that came with the message (`MSG_CTRUNC`:
    /// this process's fd table is full). Its bytes arrived, so the stream stays in sync;
    /// the message is refused with `EMFILE`.
    pub fds_lost: bool,
}

/// What came off the socket.
#[derive(Debug)]
pub enum Incoming {
    /// A whole message within the size cap.
    Message(Message),
    /// A message larger than the cap: its payload was read and discarded.
    Oversized(Header),
    /// A size field smaller than the header: the stream cannot be trusted any more.
    Undersized(Header),
}

/// The fds of a message being received: those kept (at most `max`) and how many
/// more were closed on arrival.
struct Fds {
    kept: Vec<File>,
    max: usize,
    dropped: usize,
    lost: bool,
}

/// What one `recvmsg` gave: bytes read, fds received (in the array passed), and whether
/// the kernel had to drop control data (`MSG_CTRUNC`).
struct Received {
    bytes: usize,
    fds: usize,
    truncated: bool,
}

/// Control-message room for [`SCM_MAX_FD`] fds.
const CMSG_ROOM: usize = 8 * (SCM_MAX_FD + 8);

/// `recvmsg` into `buf`, fds into `out` (close-on-exec). Unlike a receive that fails on
/// truncated control data, the bytes read are always reported: a message whose fds
/// could not all be installed is still consumed whole and can be refused in sync.
fn recv_fds(
    sock: RawFd,
    buf: &mut [u8],
    out: &mut [RawFd; SCM_MAX_FD],
) -> std::io::Result<Received> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CMSG_ROOM / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at one iovec into `buf` and at `control`, both alive and
    // writable for the call and sized as declared.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut got = 0;
    let mut extra = false;
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG_* helpers walk
    // only within it, and each SCM_RIGHTS payload holds whole c_ints.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = data.add(i).read_unaligned();
                    if got < out.len() {
                        out[got] = fd;
                        got += 1;
                    } else {
                        // Cannot happen with CMSG_ROOM sized for SCM_MAX_FD; closed
                        // rather than leaked if it does.
                        libc::close(fd);
                        extra = true;
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds: got,
        truncated: extra || msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// One end of a vfio-user connection.
///
/// Sends are whole messages under a lock that every clone of the channel shares, so
/// two threads sending on one connection (the server's replies and its DMA requests)
/// never interleave their bytes.
pub struct Channel {
    stream: UnixStream,
    send_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Self {
        Channel {
            stream,
            send_lock: Default::default(),
        }
    }

    /// Another handle on the same connection, sharing the send lock.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Channel {
            stream: self.stream.try_clone()?,
            send_lock: std::sync::Arc::clone(&self.send_lock),
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads exactly `buf.len()` bytes, collecting any fds that arrive on the way.
    /// `Ok(false)` means the peer closed the connection before the first byte.
    fn read_exact_fds(
        &self,
        buf: &mut [u8],
        fds: &mut Fds,
        deadline: Option<Instant>,
    ) -> Result<bool, VfuError> {
        let mut got = 0;
        while got < buf.len() {
            self.arm(deadline)?;
            let mut raw = [-1 as RawFd; SCM_MAX_FD];
            let r = recv_fds(self.stream.as_raw_fd(), &mut buf[got..], &mut raw);
            let (n, nfds) = match r {
                Ok(v) => {
                    if v.truncated && !fds.lost {
                        tracing::warn!(
                            received = v.fds,
                            "a message's fds could not all be received (this process's fd \
                             table is full): the message will be refused with EMFILE"
                        );
                    }
                    fds.lost |= v.truncated;
                    (v.bytes, v.fds)
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if deadline.is_some() && e.raw_os_error().is_some_and(is_timeout) => {
                    return Err(timed_out())
                }
                Err(e) => return Err(VfuError::Io(e)),
            };
            for fd in &raw[..nfds] {
                // SAFETY: recvmsg handed us ownership of these freshly received fds.
                let f = unsafe { File::from_raw_fd(*fd) };
                if fds.kept.len() < fds.max {
                    fds.kept.push(f);
                } else {
                    // Over the cap: closed here, as it arrives, never held for the
                    // rest of the message.
                    drop(f);
                    fds.dropped += 1;
                }
            }
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(VfuError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            got += n;
        }
        Ok(true)
    }

    /// Receives one message. A payload above `max_payload` is drained and reported as
    /// `Oversized`, so the stream stays in sync. `Err(Disconnected)` on a clean EOF.
    pub fn recv(&self, max_payload: usize) -> Result<Incoming, VfuError> {
        self.recv_by(max_payload, SCM_MAX_FD, None)
    }

    /// [`Channel::recv`] that gives up with `Timeout` once `deadline` passes, however
    /// the peer trickles its bytes: a total deadline over the whole message, its
    /// drain included, not a per-read timeout. The socket's read timeout is cleared
    /// afterwards.
    /// At most `max_fds` of the fds that come with the message are kept; the others
    /// are closed as they arrive and counted in [`Message::fds_dropped`].
    pub fn recv_by(
        &self,
        max_payload: usize,
        max_fds: usize,
        deadline: Option<Instant>,
    ) -> Result<Incoming, VfuError> {
        let r = self.recv_inner(max_payload, max_fds, deadline);
        if deadline.is_some() {
            let _ = self.stream.set_read_timeout(None);
        }
        r
    }

    /// Sets the socket's read timeout to what is left before `deadline`.
    fn arm(&self, deadline: Option<Instant>) -> Result<(), VfuError> {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        Ok(())
    }

    fn recv_inner(
        &self,
        max_payload: usize,
        max_fds: usize,
        deadline: Option<Instant>,
    ) -> Result<Incoming, VfuError> {
        let mut hb = [0u8; HEADER_SIZE];
        let mut fds = Fds {
            kept: Vec::new(),
            max: max_fds,
            dropped: 0,
            lost: false,
        };
        if !self.read_exact_fds(&mut hb, &mut fds, deadline)? {
            return Err(VfuError::Disconnected);
        }
        let header = Header::decode(&hb);
        let size = header.msg_size as usize;
        if size < HEADER_SIZE {
            return Ok(Incoming::Undersized(header));
        }
        let len = size - HEADER_SIZE;
        if len > max_payload {
            self.drain(len, deadline)?;
            return Ok(Incoming::Oversized(header));
        }
        let mut payload = vec![0u8; len];
        if len > 0 && !self.read_exact_fds(&mut payload, &mut fds, deadline)? {
            return Err(VfuError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(Incoming::Message(Message {
            header,
            payload,
            fds: fds.kept,
            fds_dropped: fds.dropped,
            fds_lost: fds.lost,
        }))
    }

    fn drain(&self, mut len: usize, deadline: Option<Instant>) -> Result<(), VfuError> {
        let mut chunk = vec![0u8; DRAIN_CHUNK.min(len)];
        let mut s = &self.stream;
        while len > 0 {
            self.arm(deadline)?;
            let n = chunk.len().min(len);
            let got = match s.read(&mut chunk[..n]) {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if deadline.is_some() && e.raw_os_error().is_some_and(is_timeout) => {
                    return Err(timed_out())
                }
                Err(e) => return Err(e.into()),
            };
            if got == 0 {
                return Err(VfuError::Disconnected);
            }
            len -= got;
        }
        Ok(())
    }

    /// Sends one message, `fds` attached to its first byte.
    pub fn send(&self, header: &Header, payload: &[u8], fds: &[RawFd]) -> Result<(), VfuError> {
        let hb = header.encode();
        let mut whole = Vec::with_capacity(HEADER_SIZE + payload.len());
        whole.extend_from_slice(&hb);
        whole.extend_from_slice(payload);
        let _one_at_a_time = self.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = 0;
        if !fds.is_empty() {
            loop {
                match self.stream.send_with_fds(&[&whole[..]], fds) {
                    Ok(n) => {
                        sent = n;
                        break;
                    }
                    Err(e) if e.errno() == libc::EINTR => continue,
                    Err(e) => return Err(VfuError::Io(e.into())),
                }
            }
        }
        (&self.stream).write_all(&whole[sent..])?;
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfds(n: usize) -> Vec<File> {
        (0..n)
            .map(|_| {
                // SAFETY: eventfd has no pointer arguments; the File owns the new fd.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                assert!(fd >= 0);
                // SAFETY: a fresh fd from eventfd(2), owned by this File alone.
                unsafe { File::from_raw_fd(fd) }
            })
            .collect()
    }

    #[test]
    fn fds_over_the_cap_are_closed_as_they_arrive() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = (Channel::new(a), Channel::new(b));
        let h = Header {
            msg_id: 1,
            command: 1,
            msg_size: (HEADER_SIZE + 8) as u32,
            flags: 0,
            error: 0,
        };
        let first = eventfds(SCM_MAX_FD);
        let second = eventfds(SCM_MAX_FD);
        let raw = |v: &[File]| v.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>();
        // The header with one full load of fds, the payload with another.
        tx.stream()
            .send_with_fds(&[&h.encode()[..]], &raw(&first))
            .unwrap();
        tx.stream()
            .send_with_fds(&[&[0u8; 8][..]], &raw(&second))
            .unwrap();
        let Incoming::Message(m) = rx.recv_by(64, 16, None).unwrap() else {
            panic!("a whole message")
        };
        assert_eq!(m.fds.len(), 16);
        assert_eq!(m.fds_dropped, 2 * SCM_MAX_FD - 16);
    }
}
