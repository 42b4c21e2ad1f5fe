//! An adapter on sockets in a fresh temporary directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlx5_emulator::fault::{Injector, Plan};
use mlx5_emulator::{Adapter, AdapterConfig, Function};

/// Where an adapter serves: `pf.sock` and `vf<N>.sock` in one directory. Both the
/// in-process [`Testbed`] and a child `mlx5-emu` ([`crate::child::ChildAdapter`]) have it.
pub trait Sockets {
    fn dir(&self) -> &Path;

    fn pf_socket(&self) -> PathBuf {
        self.dir().join("pf.sock")
    }

    fn vf_socket(&self, n: u16) -> PathBuf {
        self.dir().join(format!("vf{n}.sock"))
    }

    /// A negotiated client of VF `n`.
    fn vf_client(&self, n: u16) -> vfu::Client {
        vfu::Client::connect(&self.vf_socket(n)).expect("connect to VF")
    }

    /// A negotiated client of the PF.
    fn pf_client(&self) -> vfu::Client {
        vfu::Client::connect(&self.pf_socket()).expect("connect to PF")
    }
}

/// An adapter serving on sockets in a fresh temporary directory, removed on drop.
pub struct Testbed {
    pub adapter: Adapter,
    dir: tempfile::TempDir,
}

/// How to start a [`Testbed`]: `Testbed::builder().vfs(2).faults(plan).start()`.
#[derive(Debug, Clone)]
pub struct TestbedBuilder {
    cfg: AdapterConfig,
}

impl TestbedBuilder {
    /// Number of VFs (1 by default).
    pub fn vfs(mut self, n: u16) -> Self {
        self.cfg.vfs = n;
        self
    }

    /// Device memory per function in bytes.
    pub fn dev_mem(mut self, bytes: u64) -> Self {
        self.cfg.dev_mem = bytes;
        self
    }

    /// The fault plan the adapter starts with; [`Testbed::faults`] adds and clears
    /// rules while it runs.
    pub fn faults(mut self, plan: Plan) -> Self {
        self.cfg.faults = Some(plan);
        self
    }

    /// Also write the fault log to `path`.
    pub fn fault_log(mut self, path: &Path) -> Self {
        self.cfg.fault_log = Some(path.to_path_buf());
        self
    }

    /// Serve the fault control socket at `control.sock` in the testbed's directory.
    pub fn control(mut self) -> Self {
        self.cfg.control = Some(PathBuf::from("control.sock"));
        self
    }

    pub fn start(self) -> Testbed {
        Testbed::start_with(self.cfg)
    }
}

impl Testbed {
    /// A builder of a testbed with one VF and no fault rule.
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder {
            cfg: AdapterConfig::default(),
        }
    }

    /// The adapter's fault plan (add and clear rules, read the log).
    pub fn faults(&self) -> &Arc<Injector> {
        self.adapter.faults()
    }

    /// The fault control socket, when the builder asked for one.
    pub fn control_socket(&self) -> PathBuf {
        self.dir().join("control.sock")
    }

    /// Starts an adapter with `vfs` VFs and the default device memory.
    pub fn start(vfs: u16) -> Testbed {
        Testbed::start_with(AdapterConfig {
            vfs,
            ..AdapterConfig::default()
        })
    }

    /// Starts an adapter from `cfg`; its `dir` is replaced by a fresh temporary one.
    pub fn start_with(cfg: AdapterConfig) -> Testbed {
        let dir = tempfile::Builder::new()
            .prefix("mlx5-emu-test")
            .tempdir()
            .expect("temp dir");
        // A relative control socket lives in the testbed's directory.
        let control = cfg.control.as_ref().map(|c| dir.path().join(c));
        let adapter = Adapter::start(&AdapterConfig {
            dir: dir.path().to_path_buf(),
            control,
            ..cfg
        })
        .expect("start adapter");
        Testbed { adapter, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pf_socket(&self) -> PathBuf {
        Sockets::pf_socket(self)
    }

    pub fn vf_socket(&self, n: u16) -> PathBuf {
        Sockets::vf_socket(self, n)
    }

    /// A negotiated client of VF `n`.
    pub fn vf_client(&self, n: u16) -> vfu::Client {
        Sockets::vf_client(self, n)
    }

    /// A negotiated client of the PF.
    pub fn pf_client(&self) -> vfu::Client {
        Sockets::pf_client(self)
    }

    /// The PF, as the emulator holds it.
    pub fn pf(&self) -> Arc<Function> {
        self.adapter.pf().clone()
    }

    /// VF `n`, as the emulator holds it.
    pub fn vf(&self, n: u16) -> Arc<Function> {
        self.adapter
            .vf(n)
            .unwrap_or_else(|| panic!("the adapter has no VF {n}"))
            .clone()
    }
}

impl Sockets for Testbed {
    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts `tracing` output for a test once (level from `RUST_LOG`, default warn).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// The seed of a randomized test: `MLX5_EMU_SEED` when set (to replay a failure),
/// else the test's own `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("MLX5_EMU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
