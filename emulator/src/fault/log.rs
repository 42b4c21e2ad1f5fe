//! The fault log: one JSON line per fault that fired, in the order they fired.
//!
//! ```json
//! {"rule":"save fails once","seed":1,"effect":"status","site":"command","function":0,"vhca_id":1,"opcode":"SAVE_VHCA_STATE","op_mod":0,"seq":14,"match":1}
//! ```
//!
//! `function` is the function whose queue (or DMA, or connection) the fault hit,
//! `vhca_id` the one the command acts on, `seq` the function's command (DMA, message)
//! sequence number and `match` the rule's match number. No wall-clock time and no
//! address: the same seed and the same command sequence give the same file, byte for
//! byte.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// Lines kept in memory (for `log` on the control socket and for tests); the file
/// keeps them all.
pub const LOG_MEMORY_LINES: usize = 65536;

/// One fired fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    pub rule: String,
    pub seed: u64,
    pub effect: &'static str,
    pub site: &'static str,
    pub function: u16,
    pub vhca_id: u16,
    pub opcode: Option<&'static str>,
    pub op_mod: u16,
    pub seq: u64,
    #[serde(rename = "match")]
    pub matched: u64,
}

struct Sink {
    lines: VecDeque<String>,
    total: u64,
    file: Option<File>,
}

/// Where fired faults are written: memory, and a file when one is given.
pub struct FaultLog {
    sink: Mutex<Sink>,
}

impl FaultLog {
    /// A log kept in memory only.
    pub fn memory() -> Self {
        FaultLog {
            sink: Mutex::new(Sink {
                lines: VecDeque::new(),
                total: 0,
                file: None,
            }),
        }
    }

    /// A log also written to `path` (created or truncated).
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let f = File::create(path)?;
        let log = FaultLog::memory();
        log.lock().file = Some(f);
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one entry (a line of JSON; the file is written at once).
    pub fn push(&self, e: LogEntry) {
        let line = serde_json::to_string(&e).unwrap_or_default();
        let mut s = self.lock();
        if let Some(f) = s.file.as_mut() {
            if let Err(err) = f.write_all(format!("{line}\n").as_bytes()) {
                tracing::warn!(error = %err, "cannot write the fault log; it stays in memory only");
                s.file = None;
            }
        }
        if s.lines.len() == LOG_MEMORY_LINES {
            s.lines.pop_front();
        }
        s.lines.push_back(line);
        s.total += 1;
    }

    /// The lines kept in memory, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.iter().cloned().collect()
    }

    /// The log as the file holds it (the lines in memory, each ended by a newline).
    pub fn text(&self) -> String {
        self.lock().lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Faults fired since the start.
    pub fn total(&self) -> u64 {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_one_json_line_each_in_a_fixed_field_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let log = FaultLog::to_file(&path).unwrap();
        log.push(LogEntry {
            rule: "save fails once".into(),
            seed: 1,
            effect: "status",
            site: "command",
            function: 0,
            vhca_id: 1,
            opcode: Some("SAVE_VHCA_STATE"),
            op_mod: 0,
            seq: 14,
            matched: 1,
        });
        let want = "{\"rule\":\"save fails once\",\"seed\":1,\"effect\":\"status\",\"site\":\"command\",\"function\":0,\"vhca_id\":1,\"opcode\":\"SAVE_VHCA_STATE\",\"op_mod\":0,\"seq\":14,\"match\":1}\n";
        assert_eq!(std::fs::read_to_string(&path).unwrap(), want);
        assert_eq!(log.text(), want);
        assert_eq!(log.total(), 1);
    }
}
