//! The daemon's control socket (`<store>/control.sock`): maintenance commands on a live
//! mount, one JSON request and one JSON answer per connection. The same `handle` serves an
//! unmounted store in the command's own process, so both paths behave the same.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};
use kcache_fs::KcacheFs;

use crate::daemon::Daemon;
use kcache_store::{EvictPolicy, Limits, MinFree, Store};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Requests larger than this are refused (paths and a few numbers fit easily).
const MAX_REQUEST: u64 = 1 << 20;

pub fn socket_path(store: &Path) -> PathBuf {
    store.join("control.sock")
}

/// The store's limits on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimitsMsg {
    pub quota: Option<u64>,
    pub low_watermark_pct: u8,
    /// "10%" or a byte count.
    pub min_free: String,
}

impl From<Limits> for LimitsMsg {
    fn from(l: Limits) -> LimitsMsg {
        LimitsMsg {
            quota: l.quota,
            low_watermark_pct: l.low_watermark_pct,
            min_free: l.min_free.to_string(),
        }
    }
}

impl TryFrom<LimitsMsg> for Limits {
    type Error = String;
    fn try_from(m: LimitsMsg) -> Result<Limits, String> {
        if !(1..=100).contains(&m.low_watermark_pct) {
            return Err(format!(
                "invalid low watermark {}% (1-100)",
                m.low_watermark_pct
            ));
        }
        Ok(Limits {
            quota: m.quota.filter(|q| *q > 0),
            low_watermark_pct: m.low_watermark_pct,
            min_free: m.min_free.parse::<MinFree>()?,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Stats,
    /// Show the limits, or replace them.
    Limits {
        set: Option<LimitsMsg>,
    },
    Evict {
        to: Option<u64>,
        older_than_secs: Option<u64>,
    },
    Gc,
    /// `volume`: None means the mounted one.
    Clear {
        volume: Option<String>,
        path: String,
    },
    Pin {
        volume: Option<String>,
        paths: Vec<String>,
    },
    Unpin {
        volume: Option<String>,
        paths: Vec<String>,
    },
    Pins {
        volume: Option<String>,
    },
    Du {
        volume: Option<String>,
        path: String,
        depth: u32,
    },
    VolumeCreate {
        name: String,
    },
    VolumeList,
    VolumeRm {
        name: String,
    },
    VolumeClone {
        src: String,
        dst: String,
    },
    Push {
        volume: String,
        upstream: String,
        tag: String,
        /// Secret signing key, hex (the socket is the daemon user's only).
        sign: Option<Secret>,
        /// The command's AWS settings (variables), for an s3:// upstream.
        #[serde(default)]
        env: Vec<(String, Secret)>,
    },
    Pull {
        volume: String,
        upstream: String,
        tag: String,
        trusted_keys: Vec<String>,
        #[serde(default)]
        env: Vec<(String, Secret)>,
    },
    /// Mount one more volume (daemon only).
    Mount {
        volume: String,
        mountpoint: PathBuf,
        options: Vec<String>,
    },
    /// The daemon's mounts.
    Mounts,
}

/// A mount as the daemon reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub volume: String,
    pub dev: u64,
}

/// The volume a request names, if any.
fn volume_of(req: &Request) -> Option<&str> {
    match req {
        Request::Clear { volume, .. }
        | Request::Pin { volume, .. }
        | Request::Unpin { volume, .. }
        | Request::Pins { volume }
        | Request::Du { volume, .. } => volume.as_deref(),
        _ => None,
    }
}

fn errno_msg(path: &str, e: kcache_fs::Errno) -> String {
    format!("{path}: {}", std::io::Error::from_raw_os_error(e.0))
}

/// Carries out one request. `reader` is a connection for long read-only queries, so they do
/// not hold up the filesystem's own connection (the daemon passes a read-only store; an
/// unmounted store passes itself). Long requests report how far they are to `progress`.
pub fn handle(
    fs: &KcacheFs,
    reader: &Store,
    mounted: &[String],
    req: Request,
    progress: &mut dyn FnMut(Value),
) -> Result<Value, String> {
    let check_volume = |v: &Option<String>| -> Result<(), String> {
        match v {
            Some(v) if *v != fs.volume().name => Err(format!(
                "this store is mounted with volume '{}', not '{v}'; use its mountpoint or that volume",
                fs.volume().name
            )),
            _ => Ok(()),
        }
    };
    let store = fs.store();
    match req {
        Request::Stats => {
            store.flush_accesses().map_err(|e| e.to_string())?;
            let st = reader.stats().map_err(|e| e.to_string())?;
            let usage = fs.usage().map_err(|e| errno_msg("usage", e))?;
            let mut v = serde_json::to_value(st).map_err(|e| e.to_string())?;
            v["disk_available_bytes"] = json!(usage.disk_available);
            v["min_free_bytes"] = json!(usage.min_free);
            v["volume"] = json!(fs.volume().name);
            Ok(v)
        }
        Request::Limits { set } => {
            if let Some(m) = set {
                let l = Limits::try_from(m)?;
                fs.set_limits(l).map_err(|e| errno_msg("limits", e))?;
            }
            Ok(serde_json::to_value(LimitsMsg::from(fs.limits())).map_err(|e| e.to_string())?)
        }
        Request::Evict {
            to,
            older_than_secs,
        } => {
            if to.is_none() && older_than_secs.is_none() {
                return Err("nothing to evict by: give a target size or an age".into());
            }
            let used_before = older_than_secs.map(|s| {
                kcache_store::now_ns().saturating_sub((s as i64).saturating_mul(1_000_000_000))
            });
            let ev = fs
                .evict(EvictPolicy {
                    target: to,
                    used_before,
                })
                .map_err(|e| errno_msg("evict", e))?;
            let left = store.stored_bytes().map_err(|e| e.to_string())?;
            Ok(
                json!({"blobs": ev.blobs, "bytes": ev.bytes, "names": ev.names.len(), "usage_bytes": left}),
            )
        }
        Request::Gc => {
            let r = fs.gc().map_err(|e| errno_msg("gc", e))?;
            Ok(serde_json::to_value(r).map_err(|e| e.to_string())?)
        }
        Request::Clear { volume, path } => {
            check_volume(&volume)?;
            let n = fs.clear(&path).map_err(|e| errno_msg(&path, e))?;
            Ok(json!({"removed": n}))
        }
        Request::Pin { volume, paths } => {
            check_volume(&volume)?;
            let mut pinned = 0;
            for p in &paths {
                let ino = fs.resolve(p).map_err(|e| errno_msg(p, e))?;
                pinned = store.pin(ino).map_err(|e| format!("{p}: {e}"))?;
            }
            Ok(json!({"pinned_bytes": pinned}))
        }
        Request::Unpin { volume, paths } => {
            check_volume(&volume)?;
            for p in &paths {
                fs.unpin(p).map_err(|e| match e.0 {
                    libc::ENOENT => format!("{p}: not pinned (or no such path)"),
                    _ => errno_msg(p, e),
                })?;
            }
            Ok(json!({"unpinned": paths.len()}))
        }
        Request::Pins { volume } => {
            check_volume(&volume)?;
            let pins = fs.pins().map_err(|e| errno_msg("pins", e))?;
            let bytes = reader.pinned_blobs().map_err(|e| e.to_string())?.1;
            Ok(json!({"pins": pins, "pinned_bytes": bytes}))
        }
        Request::Du {
            volume,
            path,
            depth,
        } => {
            check_volume(&volume)?;
            let ino = reader
                .resolve(fs.volume().root, &path)
                .map_err(|e| format!("{path}: {e}"))?;
            let rows = reader.du(ino, depth).map_err(|e| e.to_string())?;
            Ok(serde_json::to_value(rows).map_err(|e| e.to_string())?)
        }
        Request::VolumeCreate { name } => {
            if store.volume(&name, false, 0, 0).is_ok() {
                return Err(format!("volume '{name}' already exists"));
            }
            // The new volume's root belongs to the store's owner (the daemon's user).
            // SAFETY: getuid/getgid have no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            store
                .volume(&name, true, uid, gid)
                .map_err(|e| format!("creating volume '{name}': {e}"))?;
            Ok(json!({"created": name}))
        }
        Request::VolumeList => {
            let v = reader.volume_summaries().map_err(|e| e.to_string())?;
            Ok(serde_json::to_value(v).map_err(|e| e.to_string())?)
        }
        Request::VolumeRm { name } => {
            if mounted.contains(&name) {
                return Err(format!(
                    "volume '{name}' is mounted; unmount it before removing it"
                ));
            }
            let files = store
                .remove_volume(&name)
                .map_err(|e| format!("removing volume '{name}': {e}"))?;
            Ok(json!({"removed": name, "files": files}))
        }
        Request::VolumeClone { src, dst } => {
            let t = std::time::Instant::now();
            store.clone_volume(&src, &dst).map_err(|e| match e {
                kcache_store::Error::Exists => format!("volume '{dst}' already exists"),
                e => format!("cloning volume '{src}' to '{dst}': {e}"),
            })?;
            Ok(json!({"cloned": src, "to": dst, "seconds": t.elapsed().as_secs_f64()}))
        }
        Request::Push {
            volume,
            upstream,
            tag,
            sign,
            env,
        } => {
            let up = kcache_store::Upstream::parse_with(
                &upstream,
                kcache_store::FetchConfig::default().timeout,
                command_env(&env).as_deref(),
            )?;
            let mut report = |p: &kcache_store::PushProgress| {
                progress(serde_json::to_value(p).unwrap_or(Value::Null))
            };
            let r = store
                .push(
                    &up,
                    &volume,
                    &tag,
                    sign.as_ref().map(|s| &s.0[..]),
                    &mut report,
                )
                .map_err(|e| format!("pushing volume '{volume}' to {upstream}: {e}"))?;
            Ok(serde_json::to_value(r).map_err(|e| e.to_string())?)
        }
        Request::Pull {
            volume,
            upstream,
            tag,
            trusted_keys,
            env,
        } => {
            if mounted.contains(&volume) {
                return Err(format!(
                    "volume '{volume}' is mounted; unmount it (or pull into another volume)"
                ));
            }
            let up = kcache_store::Upstream::parse_with(
                &upstream,
                kcache_store::FetchConfig::default().timeout,
                command_env(&env).as_deref(),
            )?;
            let remote = kcache_store::Remote::new(vec![up], Default::default())
                .map_err(|e| e.to_string())?;
            // Keys given now are remembered: once a store trusts a key, it never again takes
            // an unsigned snapshot.
            for k in &trusted_keys {
                store.add_trusted_key(k).map_err(|e| e.to_string())?;
            }
            let trusted = store.trusted_keys().map_err(|e| e.to_string())?;
            let r = store
                .pull(&remote, &tag, &volume, &trusted)
                .map_err(|e| format!("pulling {upstream}:{tag} into volume '{volume}': {e}"))?;
            store
                .add_upstream_setting(&upstream)
                .map_err(|e| e.to_string())?;
            Ok(serde_json::to_value(r).map_err(|e| e.to_string())?)
        }
        Request::Mount { .. } | Request::Mounts => {
            Err("the store is not mounted (no daemon to ask)".into())
        }
    }
}

/// The daemon's end of the control socket: a thread that takes connections and a thread per
/// connection. `close` ends it so that no client that reached the socket goes unanswered.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Connections taken and not yet answered.
    open: Arc<(Mutex<usize>, Condvar)>,
    acceptor: std::thread::JoinHandle<UnixListener>,
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
    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new((Mutex::new(0), Condvar::new()));
    let (stop2, open2) = (stop.clone(), open.clone());
    let acceptor = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                let conn = listener.accept();
                if stop2.load(Ordering::SeqCst) {
                    // Woken by `close`; this connection (and any behind it) is answered
                    // there.
                    if let Ok((conn, _)) = conn {
                        answer_leaving(&conn);
                    }
                    break;
                }
                let Ok((conn, _)) = conn else { continue };
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
    })
}

impl Server {
    /// Ends the socket as the daemon leaves: no new connection is taken, every connection
    /// already made is answered (requests that came in while the daemon was leaving were
    /// told so), and requests still running get up to `bound` to finish. The socket file
    /// goes last but one (the store lock goes with the process).
    pub fn close(self, bound: std::time::Duration) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor with a connection of our own; it then hands back the listener.
        let _ = UnixStream::connect(&self.path);
        let listener = self.acceptor.join().ok();
        let _ = std::fs::remove_file(&self.path);
        // Connections that queued up before the file went.
        if let Some(l) = listener {
            if l.set_nonblocking(true).is_ok() {
                while let Ok((conn, _)) = l.accept() {
                    let _ = conn.set_nonblocking(false);
                    answer_leaving(&conn);
                }
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
    let line = format!(
        "{}\n",
        json!({"ok": false, "leaving": true, "error": Leaving.to_string()})
    );
    let mut w = conn;
    let _ = w.write_all(line.as_bytes());
}

fn daemon_request(
    daemon: &Arc<Daemon>,
    reader: &Store,
    req: Request,
    progress: &mut dyn FnMut(Value),
) -> Result<Value, Refusal> {
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
            Ok(json!({"mounted": mountpoint, "volume": volume}))
        }
        Request::Mounts => {
            let list: Vec<MountInfo> = daemon
                .list()
                .into_iter()
                .map(|(mountpoint, volume, dev)| MountInfo {
                    mountpoint,
                    volume,
                    dev,
                })
                .collect();
            Ok(serde_json::to_value(list).map_err(|e| e.to_string())?)
        }
        req => {
            let fs = daemon.fs_for(volume_of(&req))?;
            let mounted: Vec<String> = daemon.list().into_iter().map(|m| m.1).collect();
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
            Ok(_) if daemon.is_leaving() => json!({
                "ok": false,
                "leaving": true,
                "error": Leaving.to_string(),
            }),
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
                let mut progress = |v: Value| {
                    let _ = writeln!(w, "{}", json!({ "progress": v }));
                };
                match daemon_request(daemon, reader, req, &mut progress) {
                    Ok(v) => json!({"ok": true, "result": v}),
                    Err(Refusal::Failed(e)) => json!({"ok": false, "error": e}),
                    Err(Refusal::Leaving) => {
                        json!({"ok": false, "leaving": true, "error": Leaving.to_string()})
                    }
                }
            }
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("reading request: {e}")}),
    };
    // One write, so a client never sees half an answer.
    let mut w = &conn;
    let _ = w.write_all(format!("{answer}\n").as_bytes());
}

/// The daemon answered that it is shutting down: it did nothing with the request, which may
/// be sent again once the store has settled (see `holder`).
#[derive(Debug)]
pub struct Leaving;

impl std::fmt::Display for Leaving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the store's daemon is shutting down")
    }
}

impl std::error::Error for Leaving {}

/// No daemon took the connection: the request was never sent.
#[derive(Debug)]
pub struct Unanswered {
    socket: PathBuf,
    err: std::io::Error,
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connecting to the daemon at {} (is the store mounted?): {}",
            self.socket.display(),
            self.err
        )
    }
}

impl std::error::Error for Unanswered {}

/// True when `e` says the daemon is shutting down (the request was not carried out).
pub fn is_leaving(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Leaving>().is_some()
}

/// True when `e` says no daemon took the connection (the request was not sent).
pub fn is_unanswered(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unanswered>().is_some()
}

/// Sends one request to the daemon of `store` and returns its result.
pub fn call(store: &Path, req: &Request) -> Result<Value> {
    call_with_progress(store, req, &mut |_| {})
}

/// Like `call`, passing the daemon's progress reports to `progress` as they arrive.
pub fn call_with_progress(
    store: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&Value),
) -> Result<Value> {
    let path = socket_path(store);
    let conn = UnixStream::connect(&path).map_err(|err| Unanswered {
        socket: path.clone(),
        err,
    })?;
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(req)?)?;
    let mut r = BufReader::new(&conn);
    let v = loop {
        let mut line = String::new();
        r.read_line(&mut line)
            .context("reading the daemon's answer")?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("the daemon answered something unreadable: {line:?}"))?;
        match v.get("progress") {
            Some(p) => progress(p),
            None => break v,
        }
    };
    if v["ok"] == json!(true) {
        return Ok(v["result"].clone());
    }
    if v["leaving"] == json!(true) {
        return Err(Leaving.into());
    }
    bail!(
        "{}",
        v["error"]
            .as_str()
            .unwrap_or("the daemon reported an unknown error")
    )
}

/// The AWS settings a command sent with its request; a request without any (an older client)
/// is served with the daemon's own environment.
fn command_env(env: &[(String, Secret)]) -> Option<Vec<(String, String)>> {
    (!env.is_empty()).then(|| env.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
}

/// A value sent over the socket that must never reach a log line (requests are logged with
/// `Debug`): signing keys, AWS secrets.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The variables of this process that S3 settings come from, for the daemon acting for it.
pub fn command_settings() -> Vec<(String, Secret)> {
    kcache_store::s3::settings_env()
        .into_iter()
        .map(|(k, v)| (k, Secret(v)))
        .collect()
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn requests_log_without_their_secrets_and_still_carry_them() {
        let req = Request::Push {
            volume: "v".into(),
            upstream: "s3://b/p".into(),
            tag: "t".into(),
            sign: Some(Secret("signing-key-hex".into())),
            env: vec![("AWS_SECRET_ACCESS_KEY".into(), Secret("hunter2".into()))],
        };
        let logged = format!("{req:?}");
        assert!(
            !logged.contains("hunter2") && !logged.contains("signing-key-hex"),
            "{logged}"
        );
        assert!(logged.contains("AWS_SECRET_ACCESS_KEY"), "{logged}");
        let wire = serde_json::to_string(&req).unwrap();
        let Request::Push { sign, env, .. } = serde_json::from_str(&wire).unwrap() else {
            panic!("not a push: {wire}");
        };
        assert_eq!(sign.unwrap().0, "signing-key-hex");
        assert_eq!(
            command_env(&env).unwrap(),
            vec![("AWS_SECRET_ACCESS_KEY".to_string(), "hunter2".to_string())]
        );
        assert!(command_env(&[]).is_none());
    }
}
