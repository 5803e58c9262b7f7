//! The daemon's end of the control socket (`<store>/control.sock`, mode 0600): takes
//! connections, reads one request from each, hands it to the daemon or the handler, and writes
//! the answer; and at shutdown answers every connection already made before it goes. What a
//! request does is in `handler`; the messages are in `protocol`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use kcache_store::{PushProgress, Store};

use super::client::is_leaving;
use super::handler::{handle, volume_of};
use super::protocol::{Answer, MountInfo, ProgressLine, Reply, Request};
use super::socket_path;
use crate::daemon::Daemon;

/// Requests larger than this are refused (paths and a few numbers fit easily).
const MAX_REQUEST: u64 = 1 << 20;

/// The daemon's end of the control socket: a thread that takes connections and a thread per
/// connection. `close` ends it so that no client that reached the socket goes unanswered.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Connections taken and not yet answered.
    open: Arc<(Mutex<usize>, Condvar)>,
    acceptor: std::thread::JoinHandle<UnixListener>,
    /// Wakes the acceptor at `close` (an eventfd it polls beside the listener).
    wake: Arc<OwnedFd>,
}

/// Counts a taken connection until it has been answered.
struct Answering(Arc<(Mutex<usize>, Condvar)>);

impl Answering {
    fn new(open: &Arc<(Mutex<usize>, Condvar)>) -> Answering {
        *lock(&open.0) += 1;
        Answering(open.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        *lock(&self.0 .0) -= 1;
        self.0 .1.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves the control socket on threads of its own. Only the daemon's user may connect
/// (the socket is mode 0600).
pub fn serve(daemon: Arc<Daemon>, reader: Arc<Store>, store_dir: &Path) -> Result<Server> {
    let path = socket_path(store_dir);
    // We hold the store's lock, so a socket file left here belongs to a dead daemon.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    // Non-blocking, so a connection that poll reported and that is gone by the accept does
    // not hold up the acceptor.
    listener
        .set_nonblocking(true)
        .with_context(|| format!("setting up {}", path.display()))?;
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("creating the control socket's wake-up");
    }
    // SAFETY: efd was just created and is owned by nothing else.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new((Mutex::new(0), Condvar::new()));
    let (stop2, open2, wake2) = (stop.clone(), open.clone(), wake.clone());
    let acceptor = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                // Wait for a connection or for `close`. The wake-up is an eventfd, not a
                // connection of our own to the socket: that fails once the socket file is
                // gone (the store directory removed while the daemon leaves), and the
                // daemon then waited for this thread forever.
                if !wait_readable(&listener, &wake2) {
                    continue;
                }
                if stop2.load(Ordering::SeqCst) {
                    // Connections queued behind are answered by `close`.
                    break;
                }
                let conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(_) => continue,
                };
                // Accepted sockets are blocking on Linux; make sure of it, requests block.
                let _ = conn.set_nonblocking(false);
                // Counted before this thread takes the next one, so `close` sees it.
                let answering = Answering::new(&open2);
                let (daemon, reader) = (daemon.clone(), reader.clone());
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let _answering = answering;
                        serve_one(&daemon, &reader, conn);
                    });
            }
            listener
        })?;
    Ok(Server {
        path,
        stop,
        open,
        acceptor,
        wake,
    })
}

/// Waits until the listener has a connection or `wake` was written; false when woken for
/// nothing (EINTR), so the caller looks again.
fn wait_readable(listener: &UnixListener, wake: &OwnedFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two live pollfds; no timeout (`close` writes `wake`).
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            // Not expected with two valid descriptors; do not spin on it.
            tracing::warn!(error = %e, "waiting on the control socket");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        return false;
    }
    true
}

impl Server {
    /// Ends the socket as the daemon leaves: no new connection is taken, every connection
    /// already made is answered (requests that came in while the daemon was leaving were
    /// told so), and requests still running get up to `bound` to finish. The socket file
    /// goes last but one (the store lock goes with the process).
    pub fn close(self, bound: std::time::Duration) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor; it then hands back the listener.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let listener = self.acceptor.join().ok();
        let _ = std::fs::remove_file(&self.path);
        // Connections that queued up before the file went (the listener is non-blocking).
        if let Some(l) = listener {
            while let Ok((conn, _)) = l.accept() {
                let _ = conn.set_nonblocking(false);
                answer_leaving(&conn);
            }
        }
        let deadline = std::time::Instant::now() + bound;
        let mut n = lock(&self.open.0);
        while *n > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(requests = *n, "leaving with control requests still running");
                break;
            }
            n = self
                .open
                .1
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Tells a client the daemon is leaving, without reading its request: it did nothing with it.
fn answer_leaving(conn: &UnixStream) {
    let mut w = conn;
    let _ = w.write_all(Answer::leaving().line().as_bytes());
}

fn daemon_request(
    daemon: &Arc<Daemon>,
    reader: &Store,
    req: Request,
    progress: &mut dyn FnMut(&PushProgress),
) -> Result<Reply, Refusal> {
    match req {
        Request::Mount {
            volume,
            mountpoint,
            options,
        } => {
            daemon
                .add_mount(&volume, &mountpoint, &options)
                .map_err(|e| {
                    if is_leaving(&e) {
                        Refusal::Leaving
                    } else {
                        Refusal::Failed(format!("{e:#}"))
                    }
                })?;
            Ok(Reply::Mounted {
                mounted: mountpoint,
                volume,
            })
        }
        Request::Mounts => Ok(Reply::Mounts(
            daemon
                .list()
                .into_iter()
                .map(|(mountpoint, volume, dev)| MountInfo {
                    mountpoint,
                    volume,
                    dev,
                })
                .collect(),
        )),
        req => {
            let mounted: Vec<String> = daemon.list().into_iter().map(|m| m.1).collect();
            // A pull into a mounted volume runs on that volume's filesystem, which tells its
            // kernel about the names that changed.
            let volume = match &req {
                Request::Pull { volume, .. } if mounted.contains(volume) => Some(volume.as_str()),
                req => volume_of(req),
            };
            let fs = daemon.fs_for(volume)?;
            Ok(handle(&fs, reader, &mounted, req, progress)?)
        }
    }
}

/// Why the daemon did not carry out a request.
enum Refusal {
    /// It is shutting down and did nothing.
    Leaving,
    /// The request failed; the text says why.
    Failed(String),
}

impl From<String> for Refusal {
    fn from(e: String) -> Refusal {
        Refusal::Failed(e)
    }
}

fn serve_one(daemon: &Arc<Daemon>, reader: &Store, conn: UnixStream) {
    let mut line = String::new();
    let mut r = BufReader::new((&conn).take(MAX_REQUEST));
    let answer = match r.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            // Past the last unmount the daemon only commits and leaves; the client waits
            // for it to let go of the store and then acts on the store itself.
            Ok(_) if daemon.is_leaving() => Answer::leaving(),
            Ok(req) => {
                // Changes are logged; questions (polled by `kcache umount`) only at debug.
                match req {
                    Request::Stats
                    | Request::Mounts
                    | Request::VolumeList
                    | Request::Pins { .. }
                    | Request::Du { .. }
                    | Request::Limits { set: None } => tracing::debug!(?req, "control request"),
                    _ => tracing::info!(?req, "control request"),
                }
                // Progress lines go out as they come; a client that left just stops them.
                let mut w = &conn;
                let mut progress = |p: &PushProgress| {
                    if let Ok(mut s) = serde_json::to_string(&ProgressLine {
                        progress: p.clone(),
                    }) {
                        s.push('\n');
                        let _ = w.write_all(s.as_bytes());
                    }
                };
                match daemon_request(daemon, reader, req, &mut progress) {
                    Ok(r) => Answer::ok(&r),
                    Err(Refusal::Failed(e)) => Answer::failed(e),
                    Err(Refusal::Leaving) => Answer::leaving(),
                }
            }
            Err(e) => Answer::failed(format!("bad request: {e}")),
        },
        Err(e) => Answer::failed(format!("reading request: {e}")),
    };
    // One write, so a client never sees half an answer.
    let mut w = &conn;
    let _ = w.write_all(answer.line().as_bytes());
}
