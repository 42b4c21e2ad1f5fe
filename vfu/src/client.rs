//! The client side: the same messages from the other end. Used by the mlx5vf driver
//! and by tests. Requests are synchronous; a reply is matched by message id.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_TYPE,
    VFIO_REGION_INFO_FLAG_CAPS,
};

use crate::caps::Capabilities;
use crate::channel::{Channel, Incoming, Message};
use crate::error::{Errno, VfuError};
use crate::proto::*;

/// How long a request waits for its reply by default (QEMU's `x-msg-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest capability chain we fetch for a region.
const MAX_REGION_INFO: u32 = 64 * 1024;

/// A region as the server describes it.
#[derive(Debug)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    pub offset: u64,
    pub sparse_areas: Vec<(u64, u64)>,
    pub type_cap: Option<(u32, u32)>,
    pub fd: Option<File>,
}

/// The result of a raw request: the reply, or the server's errno.
pub type RawReply = Result<Message, Errno>;

/// A device access the server asks the client to do (DMA_READ / DMA_WRITE).
#[derive(Debug, PartialEq, Eq)]
pub enum DmaRequest<'a> {
    Read { address: u64, count: u32 },
    Write { address: u64, data: &'a [u8] },
}

/// Serves the server's DMA requests from the client's memory: the read data, or
/// nothing for a write; an errno refuses the request.
pub type DmaHandler = Box<dyn FnMut(DmaRequest<'_>) -> Result<Vec<u8>, Errno> + Send>;

/// A vfio-user client connection.
pub struct Client {
    chan: Channel,
    next_id: u16,
    server: Capabilities,
    version: (u16, u16),
    /// Serves DMA_READ / DMA_WRITE from the server; without one they get ENOTSUP.
    dma: Option<DmaHandler>,
}

impl std::os::fd::AsRawFd for Client {
    /// The connection's socket, to wait for the server hanging up (POLLRDHUP) beside
    /// other fds; reading or writing it directly would desynchronise the protocol.
    fn as_raw_fd(&self) -> RawFd {
        self.chan.raw_fd()
    }
}

impl Client {
    /// Connects to `path` and negotiates the version.
    pub fn connect(path: &Path) -> Result<Self, VfuError> {
        Self::from_stream(UnixStream::connect(path)?)
    }

    /// Negotiates over an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self, VfuError> {
        let mut c = Self::unnegotiated(stream)?;
        c.negotiate(&Capabilities::client_proposal())?;
        Ok(c)
    }

    /// A connection that has not sent VERSION yet (tests drive it by hand).
    pub fn unnegotiated(stream: UnixStream) -> Result<Self, VfuError> {
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            chan: Channel::new(stream),
            next_id: 0,
            server: Capabilities::default(),
            version: (0, 0),
            dma: None,
        })
    }

    /// Serves the server's DMA_READ / DMA_WRITE requests (for windows mapped without an
    /// fd) with `handler`, whenever this client reads the socket: while it waits for a
    /// reply, or in [`Client::serve_requests`].
    pub fn set_dma_handler(&mut self, handler: DmaHandler) {
        self.dma = Some(handler);
    }

    /// Answers one request from the server (QEMU's layout, `proto::dma_rw`).
    fn answer(&mut self, msg: &Message) -> Result<(), VfuError> {
        let h = msg.header;
        let result = match (Command::from_u16(h.command), self.dma.as_mut()) {
            (Some(Command::DmaRead), Some(f)) => match dma_rw::decode_read(&msg.payload) {
                Some((address, count)) if count <= self.server.max_data_xfer_size.max(1 << 20) => {
                    f(DmaRequest::Read { address, count }).and_then(|data| {
                        if data.len() != count as usize {
                            return Err(Errno::EIO);
                        }
                        let mut p = dma_rw::encode_write(address, &data);
                        p.truncate(dma_rw::DATA_OFFSET + data.len() + dma_rw::TRAILER);
                        Ok(p)
                    })
                }
                Some(_) => Err(Errno::E2BIG),
                None => Err(Errno::EINVAL),
            },
            (Some(Command::DmaWrite), Some(f)) => match dma_rw::decode(&msg.payload) {
                Some((address, _, data)) => {
                    f(DmaRequest::Write { address, data }).map(|_| Vec::new())
                }
                None => Err(Errno::EINVAL),
            },
            _ => Err(Errno::ENOTSUP),
        };
        if h.no_reply() {
            return Ok(());
        }
        match result {
            Ok(payload) => self.chan.send(&h.reply(payload.len()), &payload, &[]),
            Err(e) => self.chan.send(&h.error_reply(e), &[], &[]),
        }
    }

    /// Reads the socket until `deadline` or until `count` requests from the server have
    /// been answered; returns how many were. A reply to nothing is an error.
    pub fn serve_requests(
        &mut self,
        count: usize,
        deadline: std::time::Instant,
    ) -> Result<usize, VfuError> {
        let mut served = 0;
        while served < count {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            self.chan.stream().set_read_timeout(Some(deadline - now))?;
            let r = self.chan.recv(self.max_reply());
            self.chan.stream().set_read_timeout(Some(DEFAULT_TIMEOUT))?;
            let msg = match r {
                Ok(Incoming::Message(m)) => m,
                Ok(Incoming::Oversized(h) | Incoming::Undersized(h)) => {
                    return Err(Self::malformed(
                        "request size",
                        self.max_reply(),
                        h.msg_size,
                    ))
                }
                Err(VfuError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e),
            };
            if msg.header.msg_type() != FLAGS_TYPE_COMMAND {
                return Err(Self::malformed("message", "a request", "a reply"));
            }
            self.answer(&msg)?;
            served += 1;
        }
        Ok(served)
    }

    /// Sends VERSION with `caps` and records the server's answer.
    pub fn negotiate(&mut self, caps: &Capabilities) -> Result<(), VfuError> {
        let mut w = Writer::new();
        w.u16(VERSION_MAJOR)
            .u16(VERSION_MINOR)
            .bytes(&caps.to_json());
        let reply = self.request(Command::Version, &w.finish(), &[])?;
        let mut r = Reader::new(&reply.payload);
        let major = r
            .u16()
            .map_err(|_| VfuError::Version("short reply".into()))?;
        let minor = r
            .u16()
            .map_err(|_| VfuError::Version("short reply".into()))?;
        if major != VERSION_MAJOR || minor > VERSION_MINOR {
            return Err(VfuError::Version(format!(
                "server answered {major}.{minor}"
            )));
        }
        self.server = Capabilities::parse(r.rest())
            .map_err(|e| VfuError::Version(format!("server capabilities: {e}")))?;
        self.version = (major, minor);
        Ok(())
    }

    /// What the server announced.
    pub fn server_caps(&self) -> &Capabilities {
        &self.server
    }

    pub fn set_timeout(&self, t: Duration) -> Result<(), VfuError> {
        self.chan.stream().set_read_timeout(Some(t))?;
        Ok(())
    }

    fn max_reply(&self) -> usize {
        self.server.max_data_xfer_size as usize + MAX_REGION_INFO as usize
    }

    /// Sends any command number with any flags and payload and returns the reply (or
    /// `None` for a No_reply request). For tests of hostile input.
    pub fn send_raw(
        &mut self,
        command: u16,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Option<RawReply>, VfuError> {
        let size =
            u32::try_from(HEADER_SIZE + payload.len()).map_err(|_| VfuError::BadMessageSize {
                size: u32::MAX,
                min: HEADER_SIZE,
                max: u32::MAX as usize,
            })?;
        self.send_with_size(command, flags, size, payload, fds)
    }

    /// Like `send_raw` but with a size field that may lie.
    pub fn send_with_size(
        &mut self,
        command: u16,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Option<RawReply>, VfuError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            msg_id: id,
            command,
            msg_size: size,
            flags,
            error: 0,
        };
        self.chan.send(&h, payload, fds)?;
        if flags & FLAGS_NO_REPLY != 0 {
            return Ok(None);
        }
        self.wait_reply(id, command).map(Some)
    }

    fn wait_reply(&mut self, id: u16, command: u16) -> Result<RawReply, VfuError> {
        loop {
            let msg = match self.chan.recv(self.max_reply()) {
                Ok(Incoming::Message(m)) => m,
                Ok(Incoming::Oversized(h) | Incoming::Undersized(h)) => {
                    return Err(VfuError::Malformed {
                        what: "reply size",
                        expected: format!("at most {}", self.max_reply()),
                        got: h.msg_size.to_string(),
                    })
                }
                Err(VfuError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(VfuError::Timeout(DEFAULT_TIMEOUT))
                }
                Err(e) => return Err(e),
            };
            let h = msg.header;
            if h.msg_type() == FLAGS_TYPE_COMMAND {
                // The server asked us something (DMA_READ/WRITE): served by the DMA
                // handler, if there is one, else refused.
                self.answer(&msg)?;
                continue;
            }
            if h.msg_id != id || h.command != command {
                return Err(VfuError::Malformed {
                    what: "reply",
                    expected: format!("id {id} command {command}"),
                    got: format!("id {} command {}", h.msg_id, h.command),
                });
            }
            if h.is_error() {
                return Ok(Err(Errno::new(h.error as i32)));
            }
            return Ok(Ok(msg));
        }
    }

    /// Sends `cmd` and returns the successful reply; an error reply becomes `Remote`.
    pub fn request(
        &mut self,
        cmd: Command,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Message, VfuError> {
        match self.send_raw(cmd as u16, FLAGS_TYPE_COMMAND, payload, fds)? {
            Some(Ok(m)) => Ok(m),
            Some(Err(errno)) => Err(VfuError::Remote {
                command: cmd.name(),
                errno,
            }),
            None => unreachable!("replies were requested"),
        }
    }

    fn malformed(what: &'static str, expected: impl ToString, got: impl ToString) -> VfuError {
        VfuError::Malformed {
            what,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub fn device_info(&mut self) -> Result<DeviceInfo, VfuError> {
        let req = DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            ..Default::default()
        };
        let m = self.request(Command::DeviceGetInfo, &req.encode(), &[])?;
        DeviceInfo::decode(&m.payload)
            .map_err(|_| Self::malformed("DEVICE_GET_INFO reply", 16, m.payload.len()))
    }

    /// Region info with its capability chain (asking again with the size the server
    /// needs) and the mmap fd if the server sent one.
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, VfuError> {
        let mut argsz = RegionInfoWire::SIZE as u32;
        loop {
            let req = RegionInfoWire {
                argsz,
                index,
                ..Default::default()
            };
            let m = self.request(Command::DeviceGetRegionInfo, &req.encode(), &[])?;
            let info = RegionInfoWire::decode(&m.payload).map_err(|_| {
                Self::malformed("DEVICE_GET_REGION_INFO reply", 32, m.payload.len())
            })?;
            if info.argsz > argsz {
                if info.argsz > MAX_REGION_INFO {
                    return Err(Self::malformed(
                        "region info argsz",
                        MAX_REGION_INFO,
                        info.argsz,
                    ));
                }
                argsz = info.argsz;
                continue;
            }
            let mut out = RegionInfo {
                index,
                flags: info.flags,
                size: info.size,
                offset: info.offset,
                sparse_areas: Vec::new(),
                type_cap: None,
                fd: m.fds.into_iter().next(),
            };
            if info.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && info.cap_offset != 0 {
                Self::parse_caps(&m.payload, info.cap_offset, &mut out)?;
            }
            return Ok(out);
        }
    }

    fn parse_caps(p: &[u8], mut at: u32, out: &mut RegionInfo) -> Result<(), VfuError> {
        // Each hop must move forward, so the walk ends within the payload.
        let mut last = 0u32;
        while at != 0 {
            if at <= last || at as usize + CAP_HEADER_SIZE > p.len() {
                return Err(Self::malformed(
                    "capability offset",
                    "inside the reply, increasing",
                    at,
                ));
            }
            let mut r = Reader::new(&p[at as usize..]);
            let id = r.u16().expect("checked");
            let _ver = r.u16().expect("checked");
            let next = r.u32().expect("checked");
            let bad = |_| Self::malformed("capability", "complete body", "truncated");
            match id as u32 {
                VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                    let n = r.u32().map_err(bad)?;
                    let _ = r.u32().map_err(bad)?;
                    if n as usize > r.remaining() / SPARSE_AREA_SIZE {
                        return Err(Self::malformed("sparse area count", "fits the reply", n));
                    }
                    for _ in 0..n {
                        let off = r.u64().map_err(bad)?;
                        let size = r.u64().map_err(bad)?;
                        out.sparse_areas.push((off, size));
                    }
                }
                VFIO_REGION_INFO_CAP_TYPE => {
                    let t = r.u32().map_err(bad)?;
                    let s = r.u32().map_err(bad)?;
                    out.type_cap = Some((t, s));
                }
                _ => {}
            }
            last = at;
            at = next;
        }
        Ok(())
    }

    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfoWire, VfuError> {
        let req = IrqInfoWire {
            argsz: IrqInfoWire::SIZE as u32,
            index,
            ..Default::default()
        };
        let m = self.request(Command::DeviceGetIrqInfo, &req.encode(), &[])?;
        IrqInfoWire::decode(&m.payload)
            .map_err(|_| Self::malformed("DEVICE_GET_IRQ_INFO reply", 16, m.payload.len()))
    }

    /// Reads `buf.len()` bytes of a region, in transfers no larger than the server's cap.
    pub fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), VfuError> {
        let chunk = self.server.max_data_xfer_size.max(1) as usize;
        let mut done = 0;
        while done < buf.len() || buf.is_empty() {
            let n = (buf.len() - done).min(chunk);
            let req = RegionAccess {
                offset: offset + done as u64,
                region: index,
                count: n as u32,
            };
            let m = self.request(Command::RegionRead, &req.encode(), &[])?;
            if m.payload.len() != RegionAccess::SIZE + n {
                return Err(Self::malformed(
                    "REGION_READ reply",
                    RegionAccess::SIZE + n,
                    m.payload.len(),
                ));
            }
            buf[done..done + n].copy_from_slice(&m.payload[RegionAccess::SIZE..]);
            done += n;
            if buf.is_empty() {
                break;
            }
        }
        Ok(())
    }

    fn region_write_msg(index: u32, offset: u64, data: &[u8]) -> Vec<u8> {
        let req = RegionAccess {
            offset,
            region: index,
            count: data.len() as u32,
        };
        let mut p = req.encode();
        p.extend_from_slice(data);
        p
    }

    /// Writes a region and waits for the reply.
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfuError> {
        let chunk = self.server.max_data_xfer_size.max(1) as usize;
        for (i, part) in data.chunks(chunk).enumerate() {
            let p = Self::region_write_msg(index, offset + (i * chunk) as u64, part);
            self.request(Command::RegionWrite, &p, &[])?;
        }
        Ok(())
    }

    /// A posted write (No_reply), as QEMU sends MMIO writes.
    pub fn region_write_posted(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VfuError> {
        let p = Self::region_write_msg(index, offset, data);
        self.send_raw(Command::RegionWrite as u16, FLAGS_NO_REPLY, &p, &[])?;
        Ok(())
    }

    /// REGION_WRITE_MULTI of small writes: (region, offset, data of at most 8 bytes).
    pub fn region_write_multi(&mut self, writes: &[(u32, u64, &[u8])]) -> Result<(), VfuError> {
        let mut w = Writer::new();
        w.u64(writes.len() as u64);
        for (region, offset, data) in writes {
            let mut d = [0u8; WRITE_MULTI_DATA_MAX];
            let n = data.len().min(WRITE_MULTI_DATA_MAX);
            d[..n].copy_from_slice(&data[..n]);
            w.bytes(
                &RegionAccess {
                    offset: *offset,
                    region: *region,
                    count: data.len() as u32,
                }
                .encode(),
            )
            .bytes(&d);
        }
        self.request(Command::RegionWriteMulti, &w.finish(), &[])?;
        Ok(())
    }

    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: RawFd,
        offset: u64,
        flags: u32,
    ) -> Result<(), VfuError> {
        let req = DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags,
            offset,
            address: iova,
            size,
        };
        self.request(Command::DmaMap, &req.encode(), &[fd])?;
        Ok(())
    }

    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), VfuError> {
        let req = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: 0,
            address: iova,
            size,
        };
        self.request(Command::DmaUnmap, &req.encode(), &[])?;
        Ok(())
    }

    pub fn dma_unmap_all(&mut self) -> Result<(), VfuError> {
        let req = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: VFIO_DMA_UNMAP_FLAG_ALL,
            address: 0,
            size: 0,
        };
        self.request(Command::DmaUnmap, &req.encode(), &[])?;
        Ok(())
    }

    /// DEVICE_SET_IRQS; `data` is the bool array for DATA_BOOL, empty otherwise.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[RawFd],
    ) -> Result<(), VfuError> {
        let req = IrqSetWire {
            argsz: (IrqSetWire::SIZE + data.len()) as u32,
            flags,
            index,
            start,
            count,
        };
        let mut p = req.encode();
        p.extend_from_slice(data);
        self.request(Command::DeviceSetIrqs, &p, fds)?;
        Ok(())
    }

    pub fn reset(&mut self) -> Result<(), VfuError> {
        self.request(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    /// DEVICE_FEATURE: returns the reply data after the 8-byte fixed part.
    pub fn device_feature(
        &mut self,
        flags: u32,
        data: &[u8],
        argsz: u32,
    ) -> Result<Vec<u8>, VfuError> {
        let mut w = Writer::new();
        w.u32(argsz).u32(flags).bytes(data);
        let m = self.request(Command::DeviceFeature, &w.finish(), &[])?;
        if m.payload.len() < DeviceFeatureWire::SIZE {
            return Err(Self::malformed("DEVICE_FEATURE reply", 8, m.payload.len()));
        }
        Ok(m.payload[DeviceFeatureWire::SIZE..].to_vec())
    }

    /// MIG_DATA_READ of at most `max` bytes; fewer means the end of the data.
    pub fn mig_data_read(&mut self, max: u32) -> Result<Vec<u8>, VfuError> {
        let mut w = Writer::new();
        w.u32(MigData::SIZE as u32 + max).u32(max);
        let m = self.request(Command::MigDataRead, &w.finish(), &[])?;
        let mut r = Reader::new(&m.payload);
        let _argsz = r
            .u32()
            .map_err(|_| Self::malformed("MIG_DATA_READ reply", 8, m.payload.len()))?;
        let size = r
            .u32()
            .map_err(|_| Self::malformed("MIG_DATA_READ reply", 8, m.payload.len()))?;
        let data = r.rest();
        if data.len() != size as usize || size > max {
            return Err(Self::malformed("MIG_DATA_READ size", size, data.len()));
        }
        Ok(data.to_vec())
    }

    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), VfuError> {
        let mut w = Writer::new();
        w.u32((MigData::SIZE + data.len()) as u32)
            .u32(data.len() as u32)
            .bytes(data);
        self.request(Command::MigDataWrite, &w.finish(), &[])?;
        Ok(())
    }

    /// Closes the connection.
    pub fn shutdown(&self) {
        let _ = self.chan.stream().shutdown(std::net::Shutdown::Both);
    }
}
