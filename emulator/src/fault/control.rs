//! The control socket of a running `mlx5-emu` (`--control PATH`): add, list and clear
//! fault rules and read the fault log while the adapter serves.
//!
//! One request per connection, one JSON line each way:
//!
//! | request | reply |
//! |---|---|
//! | `{"op":"add","plan":"<TOML: [[rule]] tables>"}` | `{"ok":true,"added":N}` |
//! | `{"op":"list"}` | `{"ok":true,"seed":S,"rules":[{"rule":{...},"matches":M,"fired":F}]}` |
//! | `{"op":"clear"}` or `{"op":"clear","name":"..."}` | `{"ok":true,"removed":N}` |
//! | `{"op":"log"}` | `{"ok":true,"log":"<the JSONL fault log>"}` |
//! | `{"op":"violations"}` | `{"ok":true,"violations":[{"seq":N,"kind":"P2pWrite","writer":"...","writer_vhca_id":W,"qpn":Q,"target_vhca_id":T,"address":A,"len":L,"at_unix_ms":M}],"violations_total":N}` |
//!
//! A refused request gets `{"ok":false,"error":"..."}`. A request is at most
//! [`MAX_REQUEST`] bytes and must arrive within [`IO_TIMEOUT`]; the socket file gets
//! the process umask's permissions (whoever may open it controls faults).
//! `mlx5-emu fault --control PATH add|list|clear|log|violations` is the client. The
//! violations are the writes the adapter's functions refused while responder-suspended
//! (P2P race violations among them, `crate::p2p`), oldest first by sequence.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Injector, Plan, RuleStatus};
use crate::firmware::Violation;

/// Where the control socket reads the adapter's violations: the log (every function's,
/// in sequence order) and the count ever recorded.
pub type ViolationSource = Arc<dyn Fn() -> (Vec<Violation>, u64) + Send + Sync>;

/// One violation as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRecord {
    pub seq: u64,
    pub kind: String,
    pub writer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_vhca_id: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qpn: Option<u32>,
    pub target_vhca_id: u16,
    pub address: u64,
    pub len: u64,
    pub at_unix_ms: u64,
}

impl From<&Violation> for ViolationRecord {
    fn from(v: &Violation) -> Self {
        ViolationRecord {
            seq: v.seq,
            kind: format!("{:?}", v.kind),
            writer: v.writer.clone(),
            writer_vhca_id: v.writer_vhca_id,
            qpn: v.qpn,
            target_vhca_id: v.target_vhca_id,
            address: v.address,
            len: v.len,
            at_unix_ms: v
                .at
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

impl std::fmt::Display for ViolationRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} {}: {} wrote {:#x} bytes at {:#x} of vhca {} while it was responder-suspended (refused)",
            self.seq, self.kind, self.writer, self.len, self.address, self.target_vhca_id
        )
    }
}

/// Largest request line.
pub const MAX_REQUEST: usize = 256 << 10;
/// Largest reply a client reads (the log is bounded by [`super::log::LOG_MEMORY_LINES`]).
pub const MAX_REPLY: usize = 64 << 20;
/// How long one request or reply may take on the wire.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the acceptor looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Add {
        plan: String,
    },
    List,
    Clear {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    Log,
    Violations,
}

/// A reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violations: Option<Vec<ViolationRecord>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violations_total: Option<u64>,
}

impl Reply {
    fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }
}

/// Why a control request failed on the client's side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the control socket {path}: {source} (is mlx5-emu running with --control {path}?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket sent a reply that is not JSON: {0}")]
    BadReply(String),
    #[error("mlx5-emu refused the request: {0}")]
    Refused(String),
}

/// Answers one request against `inj` (and `violations`, for that request).
pub fn answer(inj: &Injector, violations: Option<&ViolationSource>, req: Request) -> Reply {
    match req {
        Request::Violations => match violations {
            None => Reply::err("this control socket has no adapter behind it"),
            Some(source) => {
                let (log, total) = source();
                Reply {
                    ok: true,
                    violations: Some(log.iter().map(ViolationRecord::from).collect()),
                    violations_total: Some(total),
                    ..Reply::default()
                }
            }
        },
        Request::Add { plan } => match Plan::from_toml(&plan) {
            Err(e) => Reply::err(e),
            Ok(p) => match inj.add(&p.rules) {
                Ok(()) => Reply {
                    ok: true,
                    added: Some(p.rules.len()),
                    ..Reply::default()
                },
                Err(e) => Reply::err(e),
            },
        },
        Request::List => Reply {
            ok: true,
            seed: Some(inj.seed()),
            rules: Some(inj.rules()),
            ..Reply::default()
        },
        Request::Clear { name } => Reply {
            ok: true,
            removed: Some(inj.clear(name.as_deref())),
            ..Reply::default()
        },
        Request::Log => Reply {
            ok: true,
            log: Some(inj.log().text()),
            ..Reply::default()
        },
    }
}

/// The control socket, served on its own thread until dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (a stale socket file there is replaced; a live one is refused) and
    /// serves `inj` (and the violations `violations` reads) on it.
    pub fn start(
        path: &Path,
        inj: Arc<Injector>,
        violations: Option<ViolationSource>,
    ) -> std::io::Result<ControlServer> {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("fault-control".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match l.accept() {
                        Ok((c, _)) => serve_one(&inj, violations.as_ref(), c),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(POLL)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            std::thread::sleep(POLL);
                        }
                    }
                }
            })?;
        tracing::info!(socket = %path.display(), "fault control socket");
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(inj: &Injector, violations: Option<&ViolationSource>, c: UnixStream) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(IO_TIMEOUT));
    let _ = c.set_write_timeout(Some(IO_TIMEOUT));
    let mut line = Vec::new();
    let read = read_line(&c, &mut line);
    let reply = match read {
        Err(e) => Reply::err(format!("reading the request: {e}")),
        Ok(_) if line.len() > MAX_REQUEST => Reply::err(format!(
            "request longer than {MAX_REQUEST} bytes"
        )),
        Ok(_) => match serde_json::from_slice::<Request>(&line) {
            Ok(req) => answer(inj, violations, req),
            Err(e) => Reply::err(format!(
                "not a control request ({e}); expected one JSON line with op add, list, clear, log or violations"
            )),
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    if let Err(e) = (&c).write_all(&out) {
        tracing::debug!(error = %e, "control reply not delivered");
    }
}

/// Reads one request line (at most [`MAX_REQUEST`] + 1 bytes) within [`IO_TIMEOUT`]
/// in all: a client that sends a byte now and then cannot hold the socket longer.
fn read_line(c: &UnixStream, line: &mut Vec<u8>) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut chunk = [0u8; 4096];
    while !line.contains(&b'\n') && line.len() <= MAX_REQUEST {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no whole request line within {IO_TIMEOUT:?}"),
            ));
        }
        c.set_read_timeout(Some(left))?;
        let n = (&*c).read(&mut chunk)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&chunk[..n]);
    }
    if let Some(end) = line.iter().position(|&b| b == b'\n') {
        line.truncate(end + 1);
    }
    Ok(())
}

/// Sends `req` to the control socket at `path` and returns its reply (a refusal as
/// [`ControlError::Refused`]).
pub fn request(path: &Path, req: &Request) -> Result<Reply, ControlError> {
    let c = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
    line.push(b'\n');
    (&c).write_all(&line)?;
    let mut buf = Vec::new();
    BufReader::new(&c)
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut buf)?;
    let reply: Reply =
        serde_json::from_slice(&buf).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if !reply.ok {
        return Err(ControlError::Refused(reply.error.unwrap_or_default()));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::Rule;

    #[test]
    fn add_list_clear_and_log_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let inj = Arc::new(Injector::default());
        let srv = ControlServer::start(&path, Arc::clone(&inj), None).unwrap();
        let plan = "[[rule]]\nname = \"h\"\nopcode = \"QUERY_ISSI\"\neffect = \"hang\"\n";
        let r = request(&path, &Request::Add { plan: plan.into() }).unwrap();
        assert_eq!(r.added, Some(1));
        let r = request(&path, &Request::List).unwrap();
        let rules = r.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].rule,
            Rule {
                opcode: Some("QUERY_ISSI".into()),
                ..Rule::new("h", "hang")
            }
        );
        let e = request(
            &path,
            &Request::Add {
                plan: "[[rule]]\nname='x'\neffect='nope'\n".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        // Garbage gets an error line, not a hang.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"hello\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.contains("\"ok\":false"), "{s}");
        // A request that never ends its line is answered within IO_TIMEOUT, and the
        // socket serves the next client.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{\"op\":").unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT * 3)).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.contains("\"ok\":false") && s.contains("request"), "{s}");
        let r = request(&path, &Request::Clear { name: None }).unwrap();
        assert_eq!(r.removed, Some(1));
        assert_eq!(
            request(&path, &Request::Log).unwrap().log.as_deref(),
            Some("")
        );
        drop(srv);
        assert!(!path.exists());
    }
}
