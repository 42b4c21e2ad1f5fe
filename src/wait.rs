//! Bounded waits: every wait in a test has a limit, and a hang fails the test with a
//! message instead of stalling the run.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(2);

/// Runs `body` on its own thread and fails if it does not finish within `limit` (for
/// calls that have no timeout of their own, or that must not hang). A panic inside
/// `body` is re-raised here with its own message.
pub fn bounded<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let worker = thread::Builder::new()
        .name("bounded".into())
        .spawn(move || {
            let out = body();
            let _ = done_tx.send(());
            out
        })
        .expect("spawn a bounded body");
    match done_rx.recv_timeout(limit) {
        // Disconnected: the body panicked and dropped the sender; join reports it.
        Ok(()) | Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(RecvTimeoutError::Timeout) => panic!("no answer within {limit:?}: the call is blocked"),
    }
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= limit {
            return false;
        }
        thread::sleep(POLL);
    }
    true
}

/// Polls `cond` until it holds; fails naming `what` if it has not after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, limit, || cond().then_some(()));
}

/// Polls `f` until it yields a value and returns it; fails naming `what` if it has
/// not after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(POLL);
    }
}
