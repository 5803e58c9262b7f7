//! Who holds a store right now (nobody, a daemon that answers, or a daemon that is starting
//! or leaving), and waiting, bounded, for a daemon in between to settle.
//!
//! A store has one owner at a time (its `lock`). A daemon takes the lock before its control
//! socket answers and keeps it after it stops taking requests, while it commits what the last
//! mount left, so for a moment at each end of its life it holds the store without serving it.
//! A mount or command that arrives then (`umount MNT && mount MNT`) waits for it rather than
//! fail: the starting daemon comes to serve the request, the leaving one lets go.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kcache_store::PushProgress;
use kcache_store::Store;

use crate::control::{self, Reply, Request};

/// How long a command waits for a daemon that is starting or leaving: `KCACHE_SETTLE_TIMEOUT`
/// seconds, by default 60. A leaving daemon drains finished downloads for at most 20 s, then
/// commits open files; a minute covers that with room, and stays well within the stop
/// timeouts of the systemd units.
pub fn settle_bound() -> Duration {
    std::env::var("KCACHE_SETTLE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// What holds a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No process holds the store (or there is no store yet): a command may open it.
    Free,
    /// A daemon holds it and answers on its control socket.
    Daemon,
    /// A daemon holds it but does not serve requests: it is starting, or leaving. The text
    /// says which, for messages.
    Settling(&'static str),
}

/// Looks once.
pub fn probe(store: &Path) -> Holder {
    if !store.join("kcache.db").exists() {
        return Holder::Free;
    }
    // An error here (no lock file, no permission) is reported by whatever opens the store.
    if !matches!(Store::open_lock_probe(store), Ok(false)) {
        return Holder::Free;
    }
    match control::call(store, &Request::Mounts) {
        Ok(_) => Holder::Daemon,
        Err(e) if control::is_leaving(&e) => Holder::Settling("leaving"),
        // Held, and no socket answers: the daemon has not bound it yet, or has just removed
        // it on its way out.
        Err(_) => Holder::Settling("starting or leaving"),
    }
}

/// Waits until the store is free or served by a daemon that answers, at most until
/// `deadline`. Says once on stderr what it is waiting for, if that takes a while.
pub fn settle(store: &Path, deadline: Instant) -> Result<Holder> {
    let started = Instant::now();
    let mut told = false;
    loop {
        let state = probe(store);
        let Holder::Settling(what) = state else {
            return Ok(state);
        };
        if Instant::now() >= deadline {
            bail!(
                "store {} is held by a kcache daemon that is {what} and has not finished after \
                 {} s; see {} (the daemon's log)",
                store.display(),
                started.elapsed().as_secs(),
                store.join("kcache.log").display()
            );
        }
        if !told && started.elapsed() > Duration::from_secs(2) {
            told = true;
            let _ = writeln!(
                std::io::stderr(),
                "kcache: waiting for the daemon of store {} ({what})",
                store.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where a command on a store runs.
pub enum Route {
    /// The store's daemon serves it over the control socket.
    Daemon,
    /// The command opened the store itself.
    Offline(Box<Store>),
}

/// Where to run a command on `store`: its daemon if one serves it, else here on the store
/// opened with `open`. Waits for a daemon that is starting or leaving, and asks a daemon that
/// took the store between the look and the open.
pub fn route(store: &Path, deadline: Instant, open: &dyn Fn() -> Result<Store>) -> Result<Route> {
    loop {
        match settle(store, deadline)? {
            Holder::Daemon => return Ok(Route::Daemon),
            _ => match open() {
                Ok(s) => return Ok(Route::Offline(Box::new(s))),
                Err(e) if is_taken(&e) && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            },
        }
    }
}

/// True when opening failed because another process holds the store.
pub fn is_taken(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<kcache_store::Error>(),
            Some(kcache_store::Error::Locked { .. })
        )
    })
}

/// A command run on a store opened by the command itself; the second argument takes progress.
pub type Offline<'a> = dyn FnMut(Store, &mut dyn FnMut(&PushProgress)) -> Result<Reply> + 'a;

/// Runs `req` on the store's daemon, or, when none serves the store, `offline` on the store
/// opened with `open`. A request the daemon refused because it was leaving is sent again
/// once the store settles (the daemon did nothing with it); one whose connection was refused
/// was never sent.
pub fn run(
    store: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&PushProgress),
    open: &dyn Fn() -> Result<Store>,
    offline: &mut Offline<'_>,
) -> Result<Reply> {
    let deadline = Instant::now() + settle_bound();
    loop {
        match route(store, deadline, open)? {
            Route::Offline(s) => return offline(*s, progress),
            Route::Daemon => match control::call_with_progress(store, req, progress) {
                Err(e)
                    if (control::is_leaving(&e) || control::is_unanswered(&e))
                        && Instant::now() < deadline => {}
                res => return res,
            },
        }
    }
}
