//! The device complex: one PF and N VFs, each served on its own vfio-user socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vfu::{Listener, ServerConfig, UnsealedFiles, VfuError};

use crate::fabric::Fabric;
use crate::fault::control::ControlServer;
use crate::fault::{FaultLog, Injector, Plan, PlanError};
use crate::function::{Function, FunctionError, FunctionId};
use crate::server::FunctionBackend;

/// Most VFs one adapter offers (ConnectX VFs per PF are bounded similarly).
pub const MAX_VFS: u16 = 127;

/// How to build an adapter.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Directory holding `pf.sock` and `vfN.sock`.
    pub dir: PathBuf,
    /// Number of VFs.
    pub vfs: u16,
    /// Device memory (BAR2) of every function in bytes: a power of two,
    /// [`crate::devmem::MIN_DEV_MEM_SIZE`]..=[`crate::devmem::MAX_DEV_MEM_SIZE`].
    pub dev_mem: u64,
    /// Accept DMA_MAP of files that cannot be sealed against shrinking (QEMU's
    /// `memory-backend-file`); refused by default, see [`vfu::UnsealedFiles`].
    pub allow_unsealed_dma: bool,
    /// The fault plan the adapter starts with (rules may be added and cleared later
    /// through [`Adapter::faults`]).
    pub faults: Option<Plan>,
    /// Where the fault log is also written (JSON lines; created or truncated).
    pub fault_log: Option<PathBuf>,
    /// Serve the fault control socket here ([`crate::fault::control`]).
    pub control: Option<PathBuf>,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            dir: PathBuf::from("mlx5-emu"),
            vfs: 1,
            dev_mem: crate::devmem::DEFAULT_DEV_MEM_SIZE,
            allow_unsealed_dma: false,
            faults: None,
            fault_log: None,
            control: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("--vfs {got}: expected 0..={max}")]
    TooManyVfs { got: u16, max: u16 },
    #[error("cannot create socket directory {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
    #[error("cannot serve {socket}: {source}")]
    Socket { socket: String, source: VfuError },
    #[error("cannot build a function: {0}")]
    Function(#[from] FunctionError),
    #[error("cannot start a server thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Faults(#[from] PlanError),
    #[error("cannot create the fault log {path}: {source}")]
    FaultLog {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot serve the fault control socket {path}: {source}")]
    Control {
        path: String,
        source: std::io::Error,
    },
}

/// A running adapter. Dropping it stops the servers and removes the sockets.
pub struct Adapter {
    functions: Vec<Arc<Function>>,
    listeners: Vec<Arc<Listener>>,
    threads: Vec<JoinHandle<()>>,
    dir: PathBuf,
    faults: Arc<Injector>,
    control: Option<ControlServer>,
}

impl Adapter {
    /// Binds every socket first (so a live socket fails the start before anything is
    /// served), then serves each function on its own thread.
    pub fn start(cfg: &AdapterConfig) -> Result<Adapter, AdapterError> {
        if cfg.vfs > MAX_VFS {
            return Err(AdapterError::TooManyVfs {
                got: cfg.vfs,
                max: MAX_VFS,
            });
        }
        crate::devmem::check_size(cfg.dev_mem)
            .map_err(|e| AdapterError::Function(FunctionError::DevMem(e)))?;
        std::fs::create_dir_all(&cfg.dir).map_err(|source| AdapterError::Dir {
            dir: cfg.dir.display().to_string(),
            source,
        })?;
        let ids: Vec<FunctionId> = std::iter::once(FunctionId::pf())
            .chain((0..cfg.vfs).map(FunctionId::vf))
            .collect();
        let plan = cfg.faults.clone().unwrap_or_default();
        plan.check()?;
        let log = match &cfg.fault_log {
            None => FaultLog::memory(),
            Some(p) => FaultLog::to_file(p).map_err(|source| AdapterError::FaultLog {
                path: p.display().to_string(),
                source,
            })?,
        };
        let faults = Arc::new(Injector::new(plan.seed, log));
        let fabric = Arc::new(Fabric::with_faults(Arc::clone(&faults)));
        let mut functions = Vec::new();
        let mut listeners = Vec::new();
        for id in ids {
            let path = cfg.dir.join(id.socket_name());
            let l = Listener::bind(&path).map_err(|source| AdapterError::Socket {
                socket: path.display().to_string(),
                source,
            })?;
            let total_vfs = match id.kind {
                crate::pci::FunctionKind::Pf => cfg.vfs,
                crate::pci::FunctionKind::Vf => 0,
            };
            functions.push(Function::with_vfs(
                id,
                Arc::clone(&fabric),
                cfg.dev_mem,
                total_vfs,
            )?);
            listeners.push(Arc::new(l));
        }
        let server_cfg = ServerConfig {
            unsealed_dma: if cfg.allow_unsealed_dma {
                UnsealedFiles::Allow
            } else {
                UnsealedFiles::Refuse
            },
            ..ServerConfig::default()
        };
        // Installed once every function exists, so an immediate fatal finds its target.
        faults.set_plan(&plan)?;
        let control = match &cfg.control {
            None => None,
            Some(p) => {
                // Held weakly: the control thread never keeps a function alive.
                let fs: Vec<std::sync::Weak<Function>> =
                    functions.iter().map(Arc::downgrade).collect();
                let source: crate::fault::control::ViolationSource = Arc::new(move || {
                    let live: Vec<_> = fs.iter().filter_map(std::sync::Weak::upgrade).collect();
                    let total = live.iter().map(|f| f.violations_total()).sum();
                    let mut v: Vec<_> = live.iter().flat_map(|f| f.violations()).collect();
                    v.sort_by_key(|v| v.seq);
                    (v, total)
                });
                Some(
                    ControlServer::start(p, Arc::clone(&faults), Some(source)).map_err(
                        |source| AdapterError::Control {
                            path: p.display().to_string(),
                            source,
                        },
                    )?,
                )
            }
        };
        let mut threads = Vec::new();
        for (f, l) in functions.iter().zip(&listeners) {
            let (f, l) = (Arc::clone(f), Arc::clone(l));
            let name = format!("vfu-{}", f.id.socket_name().trim_end_matches(".sock"));
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let dma = f.dma().clone();
                    let mut backend = FunctionBackend::new(Arc::clone(&f));
                    if let Err(e) = l.serve(&mut backend, &dma, server_cfg) {
                        tracing::error!(socket = %l.path().display(), error = %e, "server stopped");
                    }
                })
                .map_err(AdapterError::Thread)?;
            threads.push(t);
        }
        Ok(Adapter {
            functions,
            listeners,
            threads,
            dir: cfg.dir.clone(),
            faults,
            control,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pf(&self) -> &Arc<Function> {
        &self.functions[0]
    }

    /// VF `n`, if the adapter has it.
    pub fn vf(&self, n: u16) -> Option<&Arc<Function>> {
        self.functions.get(n as usize + 1)
    }

    /// Every violation the adapter's functions recorded (writes refused while a
    /// function was responder-suspended, P2P writes included), in the order they were
    /// refused.
    pub fn violations(&self) -> Vec<crate::Violation> {
        let mut v: Vec<_> = self
            .functions()
            .iter()
            .flat_map(|f| f.violations())
            .collect();
        v.sort_by_key(|v| v.seq);
        v
    }

    /// The fault plan: add and clear rules, read the log, while the adapter runs.
    pub fn faults(&self) -> &Arc<Injector> {
        &self.faults
    }

    /// Where the fault control socket is served, if it is.
    pub fn control_socket(&self) -> Option<&Path> {
        self.control.as_ref().map(ControlServer::path)
    }

    pub fn functions(&self) -> &[Arc<Function>] {
        &self.functions
    }

    /// Socket paths, PF first.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.listeners
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect()
    }

    /// Stops serving and removes the sockets.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.control = None;
        for l in &self.listeners {
            l.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for l in &self.listeners {
            let _ = std::fs::remove_file(l.path());
        }
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.shutdown();
    }
}
