//! Keeping the store within its limits: a quota on stored bytes and a minimum of free space
//! on the store's disk, enforced by one evictor thread that removes least-recently-used files.
//!
//! Requests never evict themselves. A commit that takes usage past the quota, or a write that
//! finds the disk full, wakes the evictor and waits for one pass; reads and writes of other
//! files go on meanwhile. Waiters are released as soon as the store has shrunk, before the
//! kernel is told about the vanished names: that notification can wait on kernel locks held
//! by requests that are themselves queued behind busy request threads.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use kcache_store::{EvictPolicy, Evicted, Limits};

use crate::core::{lock, KcacheFs};
use crate::error::{Errno, Result};

/// Free space always kept on the store's disk, so that the database can still record
/// deletions when everything else is full.
pub const HEADROOM: u64 = 4 << 20;

/// How long a request waits for the evictor before giving up (ENOSPC, or a commit over quota).
const WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Passes {
    /// Pass requests so far.
    requested: u64,
    /// Requests served: the value of `requested` when the last finished pass started (a
    /// pass serves every request made before it started).
    served: u64,
    /// Largest extra free space asked for by waiting writers.
    room: u64,
    /// Whether the last pass freed anything.
    progress: bool,
}

/// The quota state shared by the evictor thread and the requests that wait for it.
pub(crate) struct QuotaState {
    limits: Mutex<Limits>,
    passes: Mutex<Passes>,
    wake: Condvar,
    done: Condvar,
    running: AtomicBool,
}

impl QuotaState {
    pub(crate) fn new(limits: Limits) -> QuotaState {
        QuotaState {
            limits: Mutex::new(limits),
            passes: Mutex::new(Passes::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            running: AtomicBool::new(false),
        }
    }
}

/// Where usage stands against the limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub used: u64,
    pub disk_available: u64,
    pub min_free: u64,
}

impl KcacheFs {
    pub fn limits(&self) -> Limits {
        *lock(&self.shared.quota.limits)
    }

    /// Changes the limits (persisted in the store) and lets the evictor act on them.
    pub fn set_limits(&self, l: Limits) -> Result<()> {
        self.store.set_limits(&l)?;
        *lock(&self.shared.quota.limits) = l;
        tracing::info!(quota = ?l.quota, low_watermark_pct = l.low_watermark_pct, min_free = %l.min_free, "limits changed");
        self.kick_evictor(0);
        Ok(())
    }

    /// Bytes that must go for the store to be within its limits, with `room` extra bytes of
    /// free disk wanted by a writer.
    fn bytes_to_free(&self, room: u64) -> Result<(u64, Usage)> {
        let l = self.limits();
        let used = self.store.stored_bytes()?;
        let disk = self.store.disk_space()?;
        let usage = Usage {
            used,
            disk_available: disk.available_bytes(),
            min_free: l.min_free.bytes(&disk),
        };
        let mut need = 0;
        if let (Some(q), Some(low)) = (l.quota, l.low_watermark()) {
            if used > q {
                need = used - low;
            }
        }
        // Below the disk's minimum: free what is missing plus a tenth, so that eviction does
        // not restart at the next written byte.
        let want = usage.min_free.max(room.saturating_add(HEADROOM));
        if usage.disk_available < want {
            need = need.max(want - usage.disk_available + want / 10);
        }
        Ok((need, usage))
    }

    /// Runs the evictor until `stop` is set: one pass when woken, and at least once a second
    /// (the disk can fill up from outside the store).
    pub fn run_evictor(&self, stop: &AtomicBool) {
        self.shared.quota.running.store(true, Ordering::SeqCst);
        let mut seen = 0;
        while !stop.load(Ordering::Relaxed) {
            let room = {
                let mut p = lock(&self.shared.quota.passes);
                // `stop_evictor` sets the flag under this lock, so it is never missed here.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if p.requested == seen {
                    p = self
                        .shared
                        .quota
                        .wake
                        .wait_timeout(p, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                seen = p.requested;
                std::mem::take(&mut p.room)
            };
            let evicted = match self.evict_for_limits(room) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::error!(errno = e.0, "eviction failed");
                    Evicted::default()
                }
            };
            {
                let mut p = lock(&self.shared.quota.passes);
                p.served = seen;
                p.progress = evicted.blobs > 0;
            }
            self.shared.quota.done.notify_all();
            self.forget_names(&evicted);
        }
        self.shared.quota.running.store(false, Ordering::SeqCst);
        self.shared.quota.done.notify_all();
    }

    /// Ends `run_evictor` now rather than at its next one-second tick, so that a daemon
    /// lets go of its store promptly after the last unmount.
    pub fn stop_evictor(&self, stop: &AtomicBool) {
        let _p = lock(&self.shared.quota.passes);
        stop.store(true, Ordering::Relaxed);
        self.shared.quota.wake.notify_all();
    }

    fn evict_for_limits(&self, room: u64) -> Result<Evicted> {
        let (need, usage) = self.bytes_to_free(room)?;
        if need == 0 {
            return Ok(Evicted::default());
        }
        let target = usage.used.saturating_sub(need);
        let ev = self.evict_claimed(EvictPolicy {
            target: Some(target),
            used_before: None,
        })?;
        if ev.bytes < need {
            tracing::warn!(
                needed = need,
                freed = ev.bytes,
                used = usage.used,
                disk_available = usage.disk_available,
                "cannot get within limits: the rest is open or pinned"
            );
        } else {
            tracing::info!(
                blobs = ev.blobs,
                bytes = ev.bytes,
                "evicted least-recently-used files"
            );
        }
        Ok(ev)
    }

    /// Evicts by `policy`, skipping blobs held open by this mount.
    pub(crate) fn evict_claimed(&self, policy: EvictPolicy) -> Result<Evicted> {
        // The gate is held from the in-use check through the eviction of each blob.
        Ok(self.store.lru().evict(policy, |h| {
            let gate = self
                .shared
                .evict_gate
                .write()
                .unwrap_or_else(|p| p.into_inner());
            (!self.blob_in_use_anywhere(h)).then_some(gate)
        })?)
    }

    /// Tells the kernel that evicted names are gone, in every mount: names of other volumes
    /// are unknown to a mount, which the kernel answers with ENOENT, ignored.
    pub(crate) fn forget_names(&self, ev: &Evicted) {
        let mut peers = self.peers();
        if peers.is_empty() {
            self.forget_own_names(ev);
        }
        for p in peers.drain(..) {
            p.forget_own_names(ev);
        }
    }

    fn forget_own_names(&self, ev: &Evicted) {
        let kc = lock(&self.kernel_cache).clone();
        if let Some(kc) = kc {
            for (parent, name, ino) in &ev.names {
                kc.name_gone(self.kino(*parent), OsStr::from_bytes(name), self.kino(*ino));
            }
        }
    }

    /// Evicts by `policy` now, on the caller's thread (maintenance commands), and tells the
    /// kernel. Open files are skipped.
    pub fn evict(&self, policy: EvictPolicy) -> Result<Evicted> {
        let ev = self.evict_claimed(policy)?;
        self.forget_names(&ev);
        if ev.blobs > 0 {
            tracing::info!(blobs = ev.blobs, bytes = ev.bytes, "evicted on request");
        }
        Ok(ev)
    }

    /// Evicts until at most `target` bytes are stored. Returns (blobs, bytes) evicted.
    pub fn evict_to(&self, target: u64) -> Result<(u64, u64)> {
        let ev = self.evict(EvictPolicy {
            target: Some(target),
            used_before: None,
        })?;
        Ok((ev.blobs, ev.bytes))
    }

    fn kick_evictor(&self, room: u64) -> u64 {
        let mut p = lock(&self.shared.quota.passes);
        p.requested += 1;
        p.room = p.room.max(room);
        self.shared.quota.wake.notify_one();
        p.requested
    }

    /// Wakes the evictor and waits until a pass that started after this call has finished.
    /// Returns whether that pass freed anything (false at once when no evictor runs).
    fn wait_for_pass(&self, room: u64) -> bool {
        if !self.shared.quota.running.load(Ordering::SeqCst) {
            return false;
        }
        let ticket = self.kick_evictor(room);
        let deadline = std::time::Instant::now() + WAIT;
        let mut p = lock(&self.shared.quota.passes);
        loop {
            let now = std::time::Instant::now();
            if !self.shared.quota.running.load(Ordering::SeqCst) || now >= deadline {
                return false;
            }
            if p.served >= ticket {
                return p.progress;
            }
            p = self
                .shared
                .quota
                .done
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// After a commit: over the quota, wait for the evictor so that stored bytes stay within
    /// the quota plus the files being written right now.
    pub(crate) fn after_commit(&self) {
        let Some(q) = self.limits().quota else {
            return;
        };
        for _ in 0..3 {
            match self.store.stored_bytes() {
                Ok(used) if used > q => {
                    if !self.wait_for_pass(0) {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Makes sure `bytes` more can be written: checks the quota (a file larger than the quota
    /// can never be stored) and the disk, evicting and retrying once before ENOSPC.
    pub(crate) fn make_room(&self, bytes: u64, file_size: u64) -> Result<()> {
        if self.limits().quota.is_some_and(|q| file_size > q) {
            return Err(Errno(libc::ENOSPC));
        }
        for attempt in 0..3 {
            if self.store.disk_space()?.available_bytes() >= bytes.saturating_add(HEADROOM) {
                return Ok(());
            }
            if attempt == 2 || !self.wait_for_pass(bytes) {
                break;
            }
        }
        Err(Errno(libc::ENOSPC))
    }

    /// Where usage stands (for statistics).
    pub fn usage(&self) -> Result<Usage> {
        Ok(self.bytes_to_free(0)?.1)
    }
}
