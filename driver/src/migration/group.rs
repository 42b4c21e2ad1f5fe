//! Moving several functions together, as a VMM moves the devices of one guest that may
//! DMA into each other (the reason VFIO has RUNNING_P2P).
//!
//! A device that is STOPped no longer accepts P2P DMA, and one that is RUNNING may
//! still issue it; so no member may reach STOP while another still issues DMA. The
//! group therefore steps every member through each *waypoint* before any member takes
//! the next one:
//!
//! * stop: all to RUNNING_P2P (PRE_COPY_P2P from PRE_COPY), then all to STOP
//!   (STOP_COPY when saving); the save of each member follows;
//! * resume: all RESUMING to STOP (each loads its stream), all to RUNNING_P2P, then all
//!   to RUNNING.
//!
//! Each waypoint is one [`MigrationDevice::set_state`] per member, in member order. If
//! one member fails, the members already moved at that waypoint are walked back to the
//! waypoint before (best effort, logged) and the failure is returned naming the member;
//! the failed member stays where its own arc left it (the kernel's rule: the original
//! state, or ERROR).

use super::{DataStream, MigError, MigState, MigrationDevice};

/// Why a group transition stopped.
#[derive(Debug, thiserror::Error)]
#[error("vf {vf} (vhca_id {vhca_id}) to {to}: {source}")]
pub struct GroupError {
    pub vf: u16,
    pub vhca_id: u16,
    pub to: MigState,
    #[source]
    pub source: MigError,
}

impl GroupError {
    /// The errno of the member's failure.
    pub fn errno(&self) -> i32 {
        self.source.errno()
    }
}

/// Functions that move together.
#[derive(Debug, Clone)]
pub struct MigrationGroup {
    members: Vec<MigrationDevice>,
}

impl MigrationGroup {
    pub fn new(members: Vec<MigrationDevice>) -> Self {
        MigrationGroup { members }
    }

    pub fn members(&self) -> &[MigrationDevice] {
        &self.members
    }

    /// Every member's state, in member order.
    pub fn states(&self) -> Vec<MigState> {
        self.members.iter().map(MigrationDevice::state).collect()
    }

    /// Takes every member to each state of `waypoints` in turn, all of them to one
    /// before any to the next. Returns the streams the last waypoint opened (one per
    /// member, in member order, `None` where none opened).
    pub fn walk(&self, waypoints: &[MigState]) -> Result<Vec<Option<DataStream>>, GroupError> {
        let mut opened = Vec::new();
        for (w, &to) in waypoints.iter().enumerate() {
            let before = self.states();
            opened.clear();
            for (i, m) in self.members.iter().enumerate() {
                let span = tracing::info_span!("group_step", vf = m.info().vf, %to);
                let _g = span.enter();
                match m.set_state(to) {
                    Ok(s) => opened.push(s),
                    Err(source) => {
                        let info = m.info();
                        tracing::warn!(vf = info.vf, %to, error = %source, "group step failed; undoing it for the members already moved");
                        drop(opened);
                        self.undo(&self.members[..i], &before[..i]);
                        return Err(GroupError {
                            vf: info.vf,
                            vhca_id: info.vhca_id,
                            to,
                            source,
                        });
                    }
                }
            }
            tracing::debug!(waypoint = w, %to, members = self.members.len(), "group reached waypoint");
        }
        Ok(opened)
    }

    /// Walks `members` back to `states` (best effort: a failure is logged).
    fn undo(&self, members: &[MigrationDevice], states: &[MigState]) {
        for (m, &s) in members.iter().zip(states).rev() {
            if m.state() == s {
                continue;
            }
            if let Err(e) = m.set_state(s) {
                tracing::warn!(vf = m.info().vf, to = %s, error = %e, "undo of a group step failed");
            }
        }
    }

    /// RUNNING to STOP: all to RUNNING_P2P, then all to STOP.
    pub fn stop(&self) -> Result<(), GroupError> {
        self.walk(&[MigState::RunningP2p, MigState::Stop]).map(drop)
    }

    /// RUNNING or PRE_COPY to STOP_COPY, opening (or continuing) each member's saving
    /// stream: all to RUNNING_P2P (PRE_COPY_P2P from PRE_COPY), then all to STOP (from
    /// PRE_COPY_P2P the kernel's arc to STOP_COPY is the stop), then each saves.
    pub fn stop_copy(&self) -> Result<Vec<Option<DataStream>>, GroupError> {
        if self.states().contains(&MigState::PreCopy) {
            self.walk(&[MigState::PreCopyP2p, MigState::StopCopy])
        } else {
            self.walk(&[MigState::RunningP2p, MigState::Stop, MigState::StopCopy])
        }
    }

    /// RESUMING (or STOP) to RUNNING: all to STOP (each loads its stream), all to
    /// RUNNING_P2P, then all to RUNNING.
    pub fn start(&self) -> Result<(), GroupError> {
        self.walk(&[MigState::Stop, MigState::RunningP2p, MigState::Running])
            .map(drop)
    }

    /// Every member to RESUMING; returns their resuming streams.
    pub fn resuming(&self) -> Result<Vec<DataStream>, GroupError> {
        let streams = self.walk(&[MigState::Resuming])?;
        Ok(streams.into_iter().flatten().collect())
    }
}
