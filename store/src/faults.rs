//! Fault injection: every step of the store's protocols that touches the disk or commits a
//! transaction passes through `Faults::check`, so tests can make exactly that step fail with
//! an errno (EIO, ENOSPC, ...) or simulate a crash there (the process exits on the spot, no
//! destructor runs), then reopen the store and check what survived. Nothing is armed in
//! normal operation, where a check costs one relaxed atomic load.
//!
//! Faults are armed by the number of the check (the n-th step the store takes from now on),
//! so a test first records the steps of a protocol with `record`, then replays it once per
//! step with a fault at that step: the whole matrix, without naming each site by hand.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The kinds of step a protocol is made of (see docs/commit-protocol.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// fsync of a file's data (staged content, a downloaded blob, a deduplicated blob file).
    SyncData,
    /// Making a file read-only before it becomes a blob.
    Seal,
    /// Creating a `blobs/xx` directory.
    CreateDir,
    /// The rename of a complete file into `blobs/`.
    Rename,
    /// The hard link of a staging file into `blobs/` (a commit). EPERM or EOPNOTSUPP here
    /// is a filesystem that refuses hard links: the commit falls back to a rename.
    Link,
    /// fsync of a `blobs/xx` directory, so the rename survives a power loss.
    SyncDir,
    /// The commit of a database transaction.
    DbCommit,
    /// The commit of the daemon's open group of transactions (`Store::start_group_commit`).
    /// A failure rolls the whole group back, as SQLite does when a COMMIT fails.
    GroupCommit,
    /// Deleting a blob file whose row went away (dead blobs, eviction).
    Unlink,
    /// Reading an inode's row (the filesystem's "which blob is this" and "is it unlinked").
    ReadInode,
}

impl Step {
    fn is_db(self) -> bool {
        matches!(self, Step::DbCommit | Step::GroupCommit | Step::ReadInode)
    }
}

/// What an armed step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The step fails with this errno, as the disk or SQLite would report it.
    Errno(i32),
    /// The process exits at once with `CRASH_EXIT` (a simulated kill -9 or power cut of the
    /// process: nothing after this step happens, no destructor runs).
    Crash,
}

/// Exit status of a process that crashed on purpose at an armed step.
pub const CRASH_EXIT: i32 = 86;

#[derive(Default)]
struct Plan {
    /// Fault at the check numbered `.0` (counting from 0 since the plan was set).
    at: Option<(u64, Fault)>,
    /// Faults at every check of a kind, as long as they stay armed.
    always: Vec<(Step, Fault)>,
    /// Steps seen while recording.
    seen: Option<Vec<Step>>,
}

/// The store's fault plan (`Store::faults`).
#[derive(Default)]
pub struct Faults {
    armed: AtomicBool,
    count: AtomicU64,
    plan: Mutex<Plan>,
}

impl Faults {
    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rearm(&self, p: &Plan) {
        let on = p.at.is_some() || !p.always.is_empty() || p.seen.is_some();
        self.armed.store(on, Ordering::SeqCst);
    }

    /// Injects `fault` at the `n`-th step from now (0: the next one).
    pub fn at(&self, n: u64, fault: Fault) {
        let mut p = self.plan();
        self.count.store(0, Ordering::SeqCst);
        p.at = Some((n, fault));
        self.rearm(&p);
    }

    /// Injects `fault` at every step of kind `step` until `clear`.
    pub fn always(&self, step: Step, fault: Fault) {
        let mut p = self.plan();
        p.always.push((step, fault));
        self.rearm(&p);
    }

    /// Starts recording the steps taken (see `recorded`).
    pub fn record(&self) {
        let mut p = self.plan();
        p.seen = Some(Vec::new());
        self.rearm(&p);
    }

    /// The steps taken since `record`, in order; recording stops.
    pub fn recorded(&self) -> Vec<Step> {
        let mut p = self.plan();
        let seen = p.seen.take().unwrap_or_default();
        self.rearm(&p);
        seen
    }

    /// Disarms everything.
    pub fn clear(&self) {
        let mut p = self.plan();
        *p = Plan::default();
        self.rearm(&p);
    }

    /// Called by the store before each step: the armed fault, if any.
    pub(crate) fn check(&self, step: Step) -> Result<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let fault = {
            let mut p = self.plan();
            if let Some(seen) = &mut p.seen {
                seen.push(step);
            }
            let n = self.count.fetch_add(1, Ordering::SeqCst);
            let mut fault = p.always.iter().find(|(s, _)| *s == step).map(|(_, f)| *f);
            if let Some((at, f)) = p.at {
                if at == n {
                    fault = Some(f);
                    p.at = None;
                    self.rearm(&p);
                }
            }
            fault
        };
        match fault {
            None => Ok(()),
            Some(Fault::Crash) => {
                // SAFETY: _exit ends the process without running anything else, which is the
                // point: a crash at exactly this step.
                unsafe { libc::_exit(CRASH_EXIT) }
            }
            Some(Fault::Errno(e)) => Err(injected(step, e)),
        }
    }
}

/// The error a real failure of `step` would give.
fn injected(step: Step, errno: i32) -> Error {
    if step.is_db() {
        let code = match errno {
            libc::ENOSPC => rusqlite::ffi::SQLITE_FULL,
            _ => rusqlite::ffi::SQLITE_IOERR,
        };
        return Error::Db(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some(format!("injected at {step:?}")),
        ));
    }
    Error::io(
        format!("{step:?} (injected)"),
        std::io::Error::from_raw_os_error(errno),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_at_the_armed_step_only_and_map_to_the_errno() {
        let f = Faults::default();
        assert!(f.check(Step::Rename).is_ok());
        f.at(1, Fault::Errno(libc::ENOSPC));
        assert!(f.check(Step::SyncData).is_ok());
        let e = f.check(Step::Rename).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(f.check(Step::Rename).is_ok(), "one shot");

        f.always(Step::ReadInode, Fault::Errno(libc::EIO));
        assert_eq!(f.check(Step::ReadInode).unwrap_err().errno(), libc::EIO);
        assert!(f.check(Step::DbCommit).is_ok());
        f.clear();
        assert!(f.check(Step::ReadInode).is_ok());

        f.record();
        f.check(Step::Seal).unwrap();
        f.check(Step::DbCommit).unwrap();
        assert_eq!(f.recorded(), vec![Step::Seal, Step::DbCommit]);
        assert!(!f.armed.load(Ordering::Relaxed));
    }

    #[test]
    fn injected_database_errors_look_like_sqlite_ones() {
        let full = injected(Step::DbCommit, libc::ENOSPC);
        assert_eq!(full.errno(), libc::ENOSPC);
        let io = injected(Step::ReadInode, libc::EIO);
        assert_eq!(io.errno(), libc::EIO);
        assert!(io.to_string().contains("injected at ReadInode"), "{io}");
    }
}
