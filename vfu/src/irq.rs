//! Interrupts: the decoded DEVICE_SET_IRQS request and a table of per-vector eventfds
//! with VFIO's mask/unmask/trigger semantics, for backends to use.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
};
use vmm_sys_util::eventfd::EventFd;

use crate::error::Errno;

/// What a SET_IRQS asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

/// The data a SET_IRQS carries.
#[derive(Debug)]
pub enum IrqData {
    None,
    Bool(Vec<bool>),
    /// One fd per vector from `start`; empty means de-assign `start..start+count`.
    Eventfds(Vec<File>),
}

/// A validated DEVICE_SET_IRQS request.
#[derive(Debug)]
pub struct SetIrqs {
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub action: IrqAction,
    pub data: IrqData,
}

impl SetIrqs {
    /// Splits and checks `flags`: exactly one data type and exactly one action.
    pub fn parse_flags(flags: u32) -> Result<(u32, IrqAction), Errno> {
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if flags & !known != 0 {
            return Err(Errno::EINVAL);
        }
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        if !matches!(
            data,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
        ) {
            return Err(Errno::EINVAL);
        }
        let action = match flags & VFIO_IRQ_SET_ACTION_TYPE_MASK {
            VFIO_IRQ_SET_ACTION_MASK => IrqAction::Mask,
            VFIO_IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            VFIO_IRQ_SET_ACTION_TRIGGER => IrqAction::Trigger,
            _ => return Err(Errno::EINVAL),
        };
        Ok((data, action))
    }
}

#[derive(Default)]
struct Vector {
    trigger: Option<Arc<EventFd>>,
    unmask: Option<EventFd>,
    masked: bool,
    pending: bool,
}

struct Index {
    count: u32,
    maskable: bool,
    vectors: Vec<Vector>,
}

/// Per-index, per-vector interrupt state of one function.
pub struct IrqTable {
    indices: Vec<Index>,
}

/// Shape of one IRQ index: its vector count and whether it can be masked through
/// SET_IRQS (MSI-X is masked in the table, which the VMM owns, so it is not).
#[derive(Debug, Clone, Copy)]
pub struct IrqIndexShape {
    pub count: u32,
    pub maskable: bool,
}

impl IrqTable {
    pub fn new(shapes: &[IrqIndexShape]) -> Self {
        IrqTable {
            indices: shapes
                .iter()
                .map(|s| Index {
                    count: s.count,
                    maskable: s.maskable,
                    vectors: (0..s.count).map(|_| Vector::default()).collect(),
                })
                .collect(),
        }
    }

    /// Applies a request the server already validated against the index's count.
    pub fn apply(&mut self, req: SetIrqs) -> Result<(), Errno> {
        for fd in self.apply_deferred(req)? {
            write_eventfd(&fd);
        }
        Ok(())
    }

    /// [`IrqTable::apply`] without the eventfd writes: the eventfds of the vectors the
    /// request fires (trigger actions, an unmask of a pending vector), which the caller
    /// writes after releasing its locks.
    #[must_use = "the interrupts are delivered only when the eventfds are written"]
    pub fn apply_deferred(&mut self, req: SetIrqs) -> Result<Vec<Arc<EventFd>>, Errno> {
        let mut fired = Vec::new();
        let idx = self
            .indices
            .get_mut(req.index as usize)
            .ok_or(Errno::EINVAL)?;
        let start = req.start as usize;
        let count = req.count as usize;
        if start
            .checked_add(count)
            .is_none_or(|e| e > idx.count as usize)
        {
            return Err(Errno::EINVAL);
        }
        let range = start..start + count;
        match (req.action, req.data) {
            (IrqAction::Trigger, IrqData::None) if count == 0 => {
                for v in &mut idx.vectors {
                    *v = Vector::default();
                }
            }
            (IrqAction::Trigger, IrqData::None) => {
                for i in range {
                    fired.extend(Self::prepare(&mut idx.vectors[i]));
                }
            }
            (IrqAction::Trigger, IrqData::Bool(b)) => {
                for (i, on) in range.zip(b) {
                    if on {
                        fired.extend(Self::prepare(&mut idx.vectors[i]));
                    }
                }
            }
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                if fds.is_empty() {
                    for i in range {
                        idx.vectors[i].trigger = None;
                    }
                } else {
                    if fds.len() != count {
                        return Err(Errno::EINVAL);
                    }
                    for (i, f) in range.zip(fds) {
                        idx.vectors[i].trigger = Some(Arc::new(eventfd_from_file(f)));
                        idx.vectors[i].pending = false;
                    }
                }
            }
            (IrqAction::Mask | IrqAction::Unmask, _) if !idx.maskable => return Err(Errno::EINVAL),
            (IrqAction::Mask, IrqData::Eventfds(_)) => return Err(Errno::EINVAL),
            (IrqAction::Mask, data) => {
                let sel = Self::selection(count, data)?;
                for (i, on) in range.zip(sel) {
                    if on {
                        idx.vectors[i].masked = true;
                    }
                }
            }
            (IrqAction::Unmask, IrqData::Eventfds(fds)) => {
                if !fds.is_empty() && fds.len() != count {
                    return Err(Errno::EINVAL);
                }
                let mut fds = fds.into_iter();
                for i in range {
                    idx.vectors[i].unmask = fds.next().map(eventfd_from_file);
                }
            }
            (IrqAction::Unmask, data) => {
                let sel = Self::selection(count, data)?;
                for (i, on) in range.zip(sel) {
                    if on {
                        let v = &mut idx.vectors[i];
                        v.masked = false;
                        if v.pending {
                            v.pending = false;
                            fired.extend(Self::prepare(v));
                        }
                    }
                }
            }
        }
        Ok(fired)
    }

    fn selection(count: usize, data: IrqData) -> Result<Vec<bool>, Errno> {
        match data {
            IrqData::None => Ok(vec![true; count]),
            IrqData::Bool(b) if b.len() == count => Ok(b),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The eventfd to write for `v`, or `None` with `v` marked pending when it is
    /// masked or has no eventfd.
    fn prepare(v: &mut Vector) -> Option<Arc<EventFd>> {
        match (&v.trigger, v.masked) {
            (Some(fd), false) => Some(Arc::clone(fd)),
            _ => {
                v.pending = true;
                None
            }
        }
    }

    /// Raises `vector` of `index`: writes 1 to its eventfd, or marks it pending when it
    /// is masked or has no eventfd. Returns whether it was delivered.
    pub fn trigger(&mut self, index: u32, vector: u32) -> bool {
        match self.prepare_trigger(index, vector) {
            Some(fd) => {
                write_eventfd(&fd);
                true
            }
            None => false,
        }
    }

    /// [`IrqTable::trigger`] without the write: the eventfd the caller must write 1 to
    /// (so it can do so after releasing its locks), or `None` with the vector marked
    /// pending when it is masked or has no eventfd.
    pub fn prepare_trigger(&mut self, index: u32, vector: u32) -> Option<Arc<EventFd>> {
        let v = self
            .indices
            .get_mut(index as usize)
            .and_then(|i| i.vectors.get_mut(vector as usize))?;
        Self::prepare(v)
    }

    /// Whether `vector` waits undelivered (the MSI-X PBA bit).
    pub fn pending(&self, index: u32, vector: u32) -> bool {
        self.indices
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.pending)
    }

    /// Clears a pending bit (the device no longer needs the interrupt).
    pub fn clear_pending(&mut self, index: u32, vector: u32) {
        if let Some(v) = self
            .indices
            .get_mut(index as usize)
            .and_then(|i| i.vectors.get_mut(vector as usize))
        {
            v.pending = false;
        }
    }

    /// Whether `vector` has a trigger eventfd.
    pub fn has_eventfd(&self, index: u32, vector: u32) -> bool {
        self.indices
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.trigger.is_some())
    }

    /// Number of vectors with a trigger eventfd, over all indices.
    pub fn eventfd_count(&self) -> usize {
        self.indices
            .iter()
            .flat_map(|i| &i.vectors)
            .filter(|v| v.trigger.is_some() || v.unmask.is_some())
            .count()
    }

    /// Drops every eventfd and mask/pending state (client disconnect, reset).
    pub fn clear(&mut self) {
        for i in &mut self.indices {
            for v in &mut i.vectors {
                *v = Vector::default();
            }
        }
    }
}

/// Interrupt writes that found their eventfd full (counter at its maximum), process-wide.
static FULL_EVENTFD_WRITES: AtomicU64 = AtomicU64::new(0);

/// How many interrupt writes found their eventfd full and were counted, not waited on.
pub fn full_eventfd_writes() -> u64 {
    FULL_EVENTFD_WRITES.load(Ordering::Relaxed)
}

/// Writes 1 to an interrupt eventfd. The fd is non-blocking (see [`check_eventfd`]): a
/// full eventfd (`EAGAIN`; its reader has an interrupt pending already) is counted
/// and logged at the first and every power-of-two occurrence, never waited on. Any
/// other failure is logged: the interrupt is lost, as a VMM that closed its end would
/// lose it.
pub fn write_eventfd(fd: &EventFd) {
    match fd.write(1) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let n = FULL_EVENTFD_WRITES.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    full_writes = n,
                    "interrupt eventfd full: interrupt coalesced, not waited for"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "eventfd write failed"),
    }
}

/// Checks that `f` is an eventfd (the only fd kind SET_IRQS takes; a pipe or a socket
/// could block or misbehave when written) and makes it non-blocking, so that an
/// interrupt write never waits. `O_NONBLOCK` lives in the open file description, which
/// the client shares; a VMM reads its interrupt eventfds without blocking anyway.
pub fn check_eventfd(f: &File) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let kind = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| {
        tracing::warn!(error = %e, "cannot tell the kind of an interrupt fd: refused");
        Errno::EINVAL
    })?;
    if kind.as_os_str() != "anon_inode:[eventfd]" {
        tracing::warn!(
            kind = %kind.display(),
            "SET_IRQS fd is not an eventfd: refused (EINVAL)"
        );
        return Err(Errno::EINVAL);
    }
    // SAFETY: fcntl(F_GETFL) on an fd we own; it takes no pointer.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: fcntl(F_SETFL) on an fd we own with an integer argument.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot make an interrupt eventfd non-blocking: refused"
        );
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn eventfd_from_file(f: File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released from a `File` that owned it, so the EventFd takes
    // sole ownership; the server admits only eventfds (`check_eventfd`), and any other
    // fd only makes later writes fail, which we log.
    unsafe { EventFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn efd_pair() -> (EventFd, File) {
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new fd owned by the File.
        let f = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        (e, f)
    }

    #[test]
    fn trigger_mask_unmask_pending() {
        let mut t = IrqTable::new(&[IrqIndexShape {
            count: 2,
            maskable: true,
        }]);
        let (e, f) = efd_pair();
        t.apply(SetIrqs {
            index: 0,
            start: 1,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(vec![f]),
        })
        .unwrap();
        assert!(t.trigger(0, 1));
        assert_eq!(e.read().unwrap(), 1);
        t.apply(SetIrqs {
            index: 0,
            start: 1,
            count: 1,
            action: IrqAction::Mask,
            data: IrqData::None,
        })
        .unwrap();
        assert!(!t.trigger(0, 1));
        assert!(t.pending(0, 1));
        t.apply(SetIrqs {
            index: 0,
            start: 1,
            count: 1,
            action: IrqAction::Unmask,
            data: IrqData::None,
        })
        .unwrap();
        assert!(!t.pending(0, 1));
        assert_eq!(e.read().unwrap(), 1);
        // Vector 0 has no eventfd: pending.
        assert!(!t.trigger(0, 0));
        assert!(t.pending(0, 0));
        assert!(t
            .apply(SetIrqs {
                index: 0,
                start: 1,
                count: 2,
                action: IrqAction::Trigger,
                data: IrqData::None,
            })
            .is_err());
    }

    #[test]
    fn flags_need_one_data_type_and_one_action() {
        assert!(SetIrqs::parse_flags(0x24).is_ok());
        assert!(SetIrqs::parse_flags(0x21).is_ok());
        assert_eq!(SetIrqs::parse_flags(0x25), Err(Errno::EINVAL));
        assert_eq!(SetIrqs::parse_flags(0x64), Err(Errno::EINVAL));
        assert_eq!(SetIrqs::parse_flags(0x04), Err(Errno::EINVAL));
        assert_eq!(SetIrqs::parse_flags(0x124), Err(Errno::EINVAL));
    }

    #[test]
    fn a_full_eventfd_is_counted_not_waited_on_and_other_fds_are_refused() {
        // A blocking eventfd at its maximum count: a blocking write would wait for a
        // reader that never comes.
        let e = EventFd::new(0).unwrap();
        e.write(u64::MAX - 1).unwrap();
        // SAFETY: dup returns a new fd owned by the File.
        let f = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        check_eventfd(&f).unwrap();
        let mut t = IrqTable::new(&[IrqIndexShape {
            count: 1,
            maskable: false,
        }]);
        t.apply(SetIrqs {
            index: 0,
            start: 0,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(vec![f]),
        })
        .unwrap();
        let before = full_eventfd_writes();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            t.trigger(0, 0);
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("the interrupt write waited on a full eventfd");
        assert!(full_eventfd_writes() > before);
        // A pipe is not an eventfd.
        let mut p = [0; 2];
        // SAFETY: pipe writes two fds into the array; the Files own them.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds from pipe(2), each owned by one File.
        let (r, w) = unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
        assert_eq!(check_eventfd(&w), Err(Errno::EINVAL));
        assert_eq!(check_eventfd(&r), Err(Errno::EINVAL));
    }
}
