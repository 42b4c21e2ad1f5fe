//! The adapter's functions as the firmware sees them: how a PF finds a VF by
//! `vhca_id` (QUERY_HCA_CAP with `other_function`, and later the migration commands).
//!
//! The fabric knows functions only as the firmware's [`Peer`]s. Functions are held weakly: the fabric never keeps a function alive, and a function
//! holds the fabric, so there is no reference cycle.

use std::sync::{Arc, RwLock, Weak};

use crate::fault::Injector;
use crate::firmware::Peer;

/// Every function of one adapter, by `vhca_id`, and the adapter's fault plan.
#[derive(Default)]
pub struct Fabric {
    /// A leaf lock: held to look a function up by its id or to add one; no other lock
    /// is taken under it (a PF's firmware lock may be held while it is taken).
    functions: RwLock<Vec<Weak<dyn Peer>>>,
    /// The fault plan every function of the adapter consults.
    faults: Arc<Injector>,
}

impl Fabric {
    pub fn new() -> Self {
        Fabric::default()
    }

    /// A fabric whose functions consult `faults`.
    pub fn with_faults(faults: Arc<Injector>) -> Self {
        Fabric {
            functions: RwLock::default(),
            faults,
        }
    }

    /// The adapter's fault plan.
    pub fn faults(&self) -> &Arc<Injector> {
        &self.faults
    }

    /// Adds a function (the adapter does this once per function at start).
    pub fn register(&self, f: &Arc<dyn Peer>) {
        let mut v = self.functions.write().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(f));
    }

    /// The function whose `vhca_id` is `vhca_id` (PF 0, VF n = n + 1), if it is alive.
    pub fn by_vhca_id(&self, vhca_id: u16) -> Option<Arc<dyn Peer>> {
        let v = self.functions.read().unwrap_or_else(|p| p.into_inner());
        v.iter()
            .filter_map(Weak::upgrade)
            .find(|f| f.id().vhca_id == vhca_id)
    }

    /// The first live function for which `pred` holds.
    pub fn find(&self, pred: impl Fn(&dyn Peer) -> bool) -> Option<Arc<dyn Peer>> {
        let v = self.functions.read().unwrap_or_else(|p| p.into_inner());
        v.iter()
            .filter_map(Weak::upgrade)
            .find(|f| pred(f.as_ref()))
    }

    /// Every live function.
    pub fn all(&self) -> Vec<Arc<dyn Peer>> {
        let v = self.functions.read().unwrap_or_else(|p| p.into_inner());
        v.iter().filter_map(Weak::upgrade).collect()
    }

    /// Number of live functions.
    pub fn len(&self) -> usize {
        let v = self.functions.read().unwrap_or_else(|p| p.into_inner());
        v.iter().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
