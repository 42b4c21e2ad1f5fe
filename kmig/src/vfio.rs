//! The VFIO system calls: a type1 container, a group, a device and its migration data
//! fd. Ioctl numbers are the uAPI's `_IO(VFIO_TYPE, VFIO_BASE + n)`; the argument
//! structs come from `vfio-bindings`.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vfio_bindings::bindings::vfio as uapi;

use crate::{Error, Result, State};

/// `_IO(';', VFIO_BASE + nr)`.
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((uapi::VFIO_TYPE as u32) << 8 | (uapi::VFIO_BASE + nr)) as libc::c_ulong
}

/// VFIO_GET_API_VERSION.
pub const GET_API_VERSION: libc::c_ulong = vfio_io(0);
/// VFIO_CHECK_EXTENSION.
pub const CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
/// VFIO_SET_IOMMU.
pub const SET_IOMMU: libc::c_ulong = vfio_io(2);
/// VFIO_GROUP_GET_STATUS.
pub const GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
/// VFIO_GROUP_SET_CONTAINER.
pub const GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
/// VFIO_GROUP_GET_DEVICE_FD.
pub const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
/// VFIO_DEVICE_GET_REGION_INFO.
pub const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
/// VFIO_DEVICE_RESET.
pub const DEVICE_RESET: libc::c_ulong = vfio_io(11);
/// VFIO_DEVICE_FEATURE.
pub const DEVICE_FEATURE: libc::c_ulong = vfio_io(17);
/// VFIO_MIG_GET_PRECOPY_INFO (on the data fd).
pub const MIG_GET_PRECOPY_INFO: libc::c_ulong = vfio_io(21);

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> libc::c_int {
    // SAFETY: every caller passes a request whose argument is a `T` the kernel reads
    // and writes within its size (argsz is set from size_of), and `arg` points to a
    // live, exclusively borrowed `T`.
    unsafe { libc::ioctl(fd, req, arg) }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: these requests take an integer argument (or none) and touch no memory of
    // ours.
    unsafe { libc::ioctl(fd, req, arg) }
}

fn open_path(path: &str, flags: libc::c_int) -> Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| Error::check(format!("path {path:?} has a NUL")))?;
    // SAFETY: `c` is a valid NUL-terminated string; open returns a new fd or -1.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Error::last_os("open", path, None));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A type1 container (`/dev/vfio/vfio`).
#[derive(Debug)]
pub struct Container {
    fd: OwnedFd,
    iommu_set: bool,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    pub fn open() -> Result<Container> {
        let path = "/dev/vfio/vfio";
        let fd = open_path(path, libc::O_RDWR)?;
        let v = ioctl_val(fd.as_raw_fd(), GET_API_VERSION, 0);
        if v != uapi::VFIO_API_VERSION as libc::c_int {
            return Err(Error::check(format!(
                "{path}: VFIO API version {v}, expected {}",
                uapi::VFIO_API_VERSION
            )));
        }
        let ext = ioctl_val(
            fd.as_raw_fd(),
            CHECK_EXTENSION,
            uapi::VFIO_TYPE1v2_IOMMU.into(),
        );
        if ext <= 0 {
            return Err(Error::check(format!(
                "{path}: no VFIO_TYPE1v2_IOMMU (CHECK_EXTENSION returned {ext}); load vfio_iommu_type1, behind an IOMMU"
            )));
        }
        Ok(Container {
            fd,
            iommu_set: false,
        })
    }
}

/// A VFIO group (`/dev/vfio/N`) set into a container.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
    /// The group number.
    pub number: u32,
}

impl Group {
    /// The IOMMU group of PCI device `bdf`, from sysfs.
    pub fn number_of(bdf: &str) -> Result<u32> {
        let link = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
        let target = fs::read_link(&link).map_err(|e| Error::Sys {
            call: "readlink".into(),
            on: link.clone(),
            state: None,
            errno: e.raw_os_error().unwrap_or(0),
        })?;
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        name.parse()
            .map_err(|_| Error::check(format!("{link} -> {target:?}: not a group number")))
    }

    /// Opens group `number`, checks that it is viable (every device in it bound to a
    /// VFIO driver or none) and sets it into `container` (choosing type1v2 for the
    /// container with its first group).
    pub fn open(number: u32, container: &mut Container) -> Result<Group> {
        let path = format!("/dev/vfio/{number}");
        let fd = open_path(&path, libc::O_RDWR)?;
        let mut status = uapi::vfio_group_status {
            argsz: std::mem::size_of::<uapi::vfio_group_status>() as u32,
            flags: 0,
        };
        if ioctl_ptr(fd.as_raw_fd(), GROUP_GET_STATUS, &mut status) < 0 {
            return Err(Error::last_os("VFIO_GROUP_GET_STATUS", &path, None));
        }
        if status.flags & uapi::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::check(format!(
                "{path}: group not viable (flags {:#x}): a device of group {number} is bound to a non-VFIO driver; see /sys/kernel/iommu_groups/{number}/devices",
                status.flags
            )));
        }
        let mut cfd = container.fd.as_raw_fd();
        if ioctl_ptr(fd.as_raw_fd(), GROUP_SET_CONTAINER, &mut cfd) < 0 {
            return Err(Error::last_os("VFIO_GROUP_SET_CONTAINER", &path, None));
        }
        if !container.iommu_set {
            if ioctl_val(
                container.fd.as_raw_fd(),
                SET_IOMMU,
                uapi::VFIO_TYPE1v2_IOMMU.into(),
            ) < 0
            {
                return Err(Error::last_os(
                    "VFIO_SET_IOMMU(TYPE1v2)",
                    "/dev/vfio/vfio",
                    None,
                ));
            }
            container.iommu_set = true;
        }
        Ok(Group { fd, number })
    }
}

/// How a read of the data fd ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// End of the stream (read returned 0): the STOP_COPY stream is complete.
    Eof,
    /// `ENOMSG`: the temporary end of the pre-copy data.
    NoMsg,
}

/// A migration data fd (saving: read; resuming: write).
#[derive(Debug)]
pub struct DataFd {
    fd: OwnedFd,
    on: String,
}

impl DataFd {
    /// `VFIO_MIG_GET_PRECOPY_INFO`: (initial_bytes, dirty_bytes). `state` is the
    /// device's state, for the error.
    pub fn precopy_info(&self, state: State) -> Result<(u64, u64)> {
        let mut info = uapi::vfio_precopy_info {
            argsz: std::mem::size_of::<uapi::vfio_precopy_info>() as u32,
            ..Default::default()
        };
        if ioctl_ptr(self.fd.as_raw_fd(), MIG_GET_PRECOPY_INFO, &mut info) < 0 {
            return Err(Error::last_os(
                "VFIO_MIG_GET_PRECOPY_INFO",
                &self.on,
                Some(state),
            ));
        }
        Ok((info.initial_bytes, info.dirty_bytes))
    }

    /// Reads into `out` until the end named by [`ReadEnd`], or until `limit` bytes
    /// were read in this call (then `Ok(None)`).
    pub fn read_until_end(
        &self,
        out: &mut Vec<u8>,
        limit: usize,
        state: State,
    ) -> Result<Option<ReadEnd>> {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0usize;
        while got < limit {
            let want = buf.len().min(limit - got);
            // SAFETY: `buf` is valid for `want` bytes of writes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
            if n < 0 {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if errno == libc::ENOMSG {
                    return Ok(Some(ReadEnd::NoMsg));
                }
                if errno == libc::EINTR {
                    continue;
                }
                return Err(Error::Sys {
                    call: format!("read(data fd, {want}) after {} bytes", out.len()),
                    on: self.on.clone(),
                    state: Some(state),
                    errno,
                });
            }
            if n == 0 {
                return Ok(Some(ReadEnd::Eof));
            }
            out.extend_from_slice(&buf[..n as usize]);
            got += n as usize;
        }
        Ok(None)
    }

    /// Writes all of `data`, in pieces of at most `piece` bytes (the stream's split
    /// need not follow its records).
    pub fn write_all(&self, data: &[u8], piece: usize, state: State) -> Result<()> {
        let mut at = 0usize;
        while at < data.len() {
            let n = piece.max(1).min(data.len() - at);
            // SAFETY: `data[at..at + n]` is valid for reads.
            let w = unsafe { libc::write(self.fd.as_raw_fd(), data[at..].as_ptr().cast(), n) };
            if w < 0 {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if errno == libc::EINTR {
                    continue;
                }
                return Err(Error::Sys {
                    call: format!("write(data fd, {n}) at stream offset {at}"),
                    on: self.on.clone(),
                    state: Some(state),
                    errno,
                });
            }
            if w == 0 {
                return Err(Error::check(format!(
                    "{}: write at stream offset {at} wrote nothing",
                    self.on
                )));
            }
            at += w as usize;
        }
        Ok(())
    }
}

/// A region of a device: its offset in the device fd and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Offset in the device fd.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// VFIO_REGION_INFO_FLAG_*.
    pub flags: u32,
}

/// An open VFIO device with migration.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
    /// Its PCI address.
    pub bdf: String,
    /// Keeps the group (and so the device) open.
    _group: Group,
}

impl Device {
    /// Opens `bdf` through its group in `container`.
    pub fn open(bdf: &str, container: &mut Container) -> Result<Device> {
        let group = Group::open(Group::number_of(bdf)?, container)?;
        let name = CString::new(bdf).map_err(|_| Error::check(format!("{bdf:?} has a NUL")))?;
        // SAFETY: the request takes a NUL-terminated device name, which `name` is.
        let fd = unsafe { libc::ioctl(group.fd.as_raw_fd(), GROUP_GET_DEVICE_FD, name.as_ptr()) };
        if fd < 0 {
            return Err(Error::last_os(
                "VFIO_GROUP_GET_DEVICE_FD",
                format!("{bdf} (group {})", group.number),
                None,
            ));
        }
        Ok(Device {
            // SAFETY: a new fd from the kernel, owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            bdf: bdf.to_string(),
            _group: group,
        })
    }

    /// VFIO_DEVICE_FEATURE with `flags` and `payload` (in and out).
    fn feature(
        &self,
        flags: u32,
        payload: &mut [u8],
        what: &str,
        state: Option<State>,
    ) -> Result<()> {
        // u64 words keep the payload 8-byte aligned, as the uAPI structs need.
        let mut buf = vec![0u64; 1 + payload.len().div_ceil(8)];
        let argsz = (8 + payload.len()) as u32;
        let bytes_len = buf.len() * 8;
        // SAFETY: `buf` is `bytes_len` bytes of initialised memory we own exclusively.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), bytes_len) };
        bytes[..4].copy_from_slice(&argsz.to_ne_bytes());
        bytes[4..8].copy_from_slice(&flags.to_ne_bytes());
        bytes[8..8 + payload.len()].copy_from_slice(payload);
        if ioctl_ptr(self.fd.as_raw_fd(), DEVICE_FEATURE, bytes.as_mut_ptr()) < 0 {
            return Err(Error::last_os(
                format!("VFIO_DEVICE_FEATURE({what})"),
                &self.bdf,
                state,
            ));
        }
        payload.copy_from_slice(&bytes[8..8 + payload.len()]);
        Ok(())
    }

    /// VFIO_DEVICE_FEATURE GET MIGRATION: the migration flags.
    pub fn migration_flags(&self) -> Result<u64> {
        let mut p = [0u8; 8];
        self.feature(
            uapi::VFIO_DEVICE_FEATURE_GET | uapi::VFIO_DEVICE_FEATURE_MIGRATION,
            &mut p,
            "GET MIGRATION",
            None,
        )?;
        Ok(u64::from_ne_bytes(p))
    }

    /// VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE.
    pub fn state(&self) -> Result<State> {
        let mut p = [0u8; 8];
        self.feature(
            uapi::VFIO_DEVICE_FEATURE_GET | uapi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &mut p,
            "GET MIG_DEVICE_STATE",
            None,
        )?;
        let raw = u32::from_ne_bytes(p[..4].try_into().expect("4 bytes"));
        State::from_raw(raw).ok_or_else(|| {
            Error::check(format!(
                "{}: the kernel reports migration state {raw}, not a uAPI state",
                self.bdf
            ))
        })
    }

    /// VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE to `to` from `from` (the state the
    /// caller knows, for errors): the data fd the arc opened, if any.
    pub fn set_state(&self, from: State, to: State) -> Result<Option<DataFd>> {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&(to as u32).to_ne_bytes());
        p[4..].copy_from_slice(&(-1i32).to_ne_bytes());
        self.feature(
            uapi::VFIO_DEVICE_FEATURE_SET | uapi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &mut p,
            &format!("SET MIG_DEVICE_STATE -> {to}"),
            Some(from),
        )?;
        let fd = i32::from_ne_bytes(p[4..].try_into().expect("4 bytes"));
        if fd < 0 {
            return Ok(None);
        }
        Ok(Some(DataFd {
            // SAFETY: the kernel installed `fd` for us; nobody else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            on: format!("{} ({from} -> {to} data fd)", self.bdf),
        }))
    }

    /// VFIO_DEVICE_FEATURE GET MIG_DATA_SIZE: the estimated STOP_COPY length.
    pub fn data_size(&self, state: State) -> Result<u64> {
        let mut p = [0u8; 8];
        self.feature(
            uapi::VFIO_DEVICE_FEATURE_GET | uapi::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            &mut p,
            "GET MIG_DATA_SIZE",
            Some(state),
        )?;
        Ok(u64::from_ne_bytes(p))
    }

    /// VFIO_DEVICE_RESET.
    pub fn reset(&self, state: State) -> Result<()> {
        if ioctl_val(self.fd.as_raw_fd(), DEVICE_RESET, 0) < 0 {
            return Err(Error::last_os("VFIO_DEVICE_RESET", &self.bdf, Some(state)));
        }
        Ok(())
    }

    /// VFIO_DEVICE_GET_REGION_INFO of region `index`.
    pub fn region(&self, index: u32) -> Result<Region> {
        let mut info = uapi::vfio_region_info {
            argsz: std::mem::size_of::<uapi::vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        if ioctl_ptr(self.fd.as_raw_fd(), DEVICE_GET_REGION_INFO, &mut info) < 0 {
            return Err(Error::last_os(
                format!("VFIO_DEVICE_GET_REGION_INFO({index})"),
                &self.bdf,
                None,
            ));
        }
        Ok(Region {
            offset: info.offset,
            size: info.size,
            flags: info.flags,
        })
    }

    /// Reads `out.len()` bytes at `at` of `region`.
    pub fn region_read(&self, region: &Region, at: u64, out: &mut [u8]) -> Result<()> {
        self.region_io(region, at, out.len(), |fd, pos, done| {
            // SAFETY: `out[done..]` is valid for writes of its length.
            unsafe { libc::pread(fd, out[done..].as_mut_ptr().cast(), out.len() - done, pos) }
        })
    }

    /// Writes `data` at `at` of `region`.
    pub fn region_write(&self, region: &Region, at: u64, data: &[u8]) -> Result<()> {
        self.region_io(region, at, data.len(), |fd, pos, done| {
            // SAFETY: `data[done..]` is valid for reads of its length.
            unsafe { libc::pwrite(fd, data[done..].as_ptr().cast(), data.len() - done, pos) }
        })
    }

    fn region_io(
        &self,
        region: &Region,
        at: u64,
        len: usize,
        mut op: impl FnMut(RawFd, libc::off_t, usize) -> isize,
    ) -> Result<()> {
        if at
            .checked_add(len as u64)
            .is_none_or(|end| end > region.size)
        {
            return Err(Error::check(format!(
                "{}: {len} bytes at {at:#x} do not fit the region of {:#x} bytes",
                self.bdf, region.size
            )));
        }
        let mut done = 0usize;
        while done < len {
            let pos = (region.offset + at + done as u64) as libc::off_t;
            let n = op(self.fd.as_raw_fd(), pos, done);
            if n <= 0 {
                return Err(Error::last_os(
                    format!("region access at {:#x} (+{done} of {len})", at),
                    &self.bdf,
                    None,
                ));
            }
            done += n as usize;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers Linux's vfio.h gives (`_IO(';', 100 + n)`).
    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(GET_API_VERSION, 0x3b64);
        assert_eq!(SET_IOMMU, 0x3b66);
        assert_eq!(GROUP_GET_STATUS, 0x3b67);
        assert_eq!(GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(DEVICE_RESET, 0x3b6f);
        assert_eq!(DEVICE_FEATURE, 0x3b75);
        assert_eq!(MIG_GET_PRECOPY_INFO, 0x3b79);
    }

    /// Without VFIO the tool names what is missing rather than failing obscurely.
    #[test]
    fn a_missing_device_names_the_sysfs_path() {
        let e = Group::number_of("0000:ff:1f.7").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/sys/bus/pci/devices/0000:ff:1f.7/iommu_group"),
            "{s}"
        );
        assert!(s.contains("ENOENT"), "{s}");
    }
}
