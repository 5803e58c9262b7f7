//! `kcache mount`: checks, daemonizing, running the FUSE session, clean shutdown on signals.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kcache_fs::session::{MountOptions, Session, SessionConfig, UringChoice};
use kcache_fs::KcacheFs;
use kcache_store::Store;

use crate::cli::{default_store, MountArgs, MountOpts};
use crate::holder::Holder;
use crate::mountinfo;

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains NUL", p.display()))
}

/// True when `mp` is a FUSE mount whose daemon is gone. statfs always goes to the daemon (a
/// plain stat may be answered from the kernel's attribute cache), so it tells.
fn is_dead_fuse_mount(mp: &Path) -> bool {
    fuse_mount_state(mp).is_err_and(|e| is_dead_errno(e.raw_os_error()))
}

/// What statvfs(2) of a FUSE mountpoint says: a live daemon answers, a dead one's mount
/// fails with ENOTCONN or ECONNABORTED.
fn fuse_mount_state(mp: &Path) -> std::io::Result<()> {
    let c = cpath(mp).map_err(std::io::Error::other)?;
    // SAFETY: statvfs fills a zeroed struct for a valid C path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a request to a FUSE mount whose daemon died returns: ENOTCONN once the kernel has
/// aborted the connection, ECONNABORTED for a request that was queued on an io_uring queue
/// while the dead daemon's ring was being torn down.
fn is_dead_errno(e: Option<i32>) -> bool {
    matches!(e, Some(libc::ENOTCONN) | Some(libc::ECONNABORTED))
}

fn detach(mp: &Path) -> Result<()> {
    let c = cpath(mp)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "mountpoint {} is a dead FUSE mount and could not be detached: {err}",
            mp.display()
        );
    }
    tracing::warn!(mountpoint = %mp.display(), "detached a dead mount left by a crashed daemon");
    Ok(())
}

/// Who is preparing a mountpoint for a store's first mount.
#[derive(Clone, Copy)]
enum Starting<'a> {
    /// A running daemon adding a mount: any mount already there is refused.
    No,
    /// `kcache mount` before it starts the daemon for store `dir` (canonical): a mount of
    /// that store left there is for the daemon to judge.
    Parent(&'a Path),
    /// The daemon of store `dir`, holding the store's owner lock and nothing mounted yet:
    /// a mount of that store left there has no daemon any more (only the lock holder serves
    /// a store), whatever the kernel answers for it yet.
    Owner(&'a Path),
}

/// Checks the mountpoint, recovering one left dead by a crashed daemon
/// ("Transport endpoint is not connected").
fn prepare_mountpoint(mp: &Path, starting: Starting<'_>) -> Result<PathBuf> {
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("mountpoint {} is not a directory", mp.display()),
        Err(e) if is_dead_errno(e.raw_os_error()) => detach(mp)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {} does not exist", mp.display())
        }
        Err(e) => bail!("cannot use mountpoint {}: {e}", mp.display()),
    }
    let mp = mp
        .canonicalize()
        .with_context(|| format!("resolving mountpoint {}", mp.display()))?;
    while let Some(m) = mountinfo::mount_at(&mp) {
        if m.fstype.starts_with("fuse") && is_dead_fuse_mount(&mp) {
            detach(&mp)?;
            continue;
        }
        // After kill -9, the kernel may not have aborted the dead daemon's connection yet
        // (io_uring rings are torn down asynchronously), so the check above can miss it.
        let ours = |dir: &Path| m.fstype == "fuse.kcache" && Path::new(&m.source) == dir;
        match starting {
            Starting::Owner(dir) if ours(dir) => {
                detach(&mp)?;
                continue;
            }
            Starting::Parent(dir) if ours(dir) => break,
            _ => {}
        }
        if mp != Path::new("/") {
            let state = match fuse_mount_state(&mp) {
                Ok(()) => "it answers".to_owned(),
                Err(e) => format!("statvfs: {e}"),
            };
            bail!(
                "mountpoint {} is busy: {} ({}) is already mounted there ({state})",
                mp.display(),
                m.source,
                m.fstype
            );
        }
        break;
    }
    Ok(mp)
}

fn check_fuse_device() -> Result<()> {
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("/dev/fuse does not exist: load the fuse module (modprobe fuse) or pass --device /dev/fuse to the container")
        }
        Err(e) => bail!("cannot open /dev/fuse: {e}"),
    }
}

/// Entry point of `kcache mount`.
pub fn mount(args: MountArgs) -> Result<ExitCode> {
    let mut args = args;
    let mut opts = MountOpts::parse(&args.options).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(v) = opts.volume.take() {
        args.volume = v;
    }
    if args.quota.is_some() {
        opts.quota = args.quota;
    }
    if args.min_free.is_some() {
        opts.min_free = args.min_free;
    }
    if args.low_watermark.is_some() {
        opts.low_watermark = args.low_watermark;
    }
    if args.metrics.is_some() {
        opts.metrics.clone_from(&args.metrics);
    }
    let store_dir = args.store.clone().unwrap_or_else(default_store);
    if args.foreground {
        // Started by `kcache mount` (which has already waited for the store to settle) or by
        // a service manager, which restarts a service that fails.
        if crate::holder::probe(&store_dir) == Holder::Daemon {
            bail!(
                "store {} is already served by a running kcache daemon; mount without \
                 --foreground to add this mount to it",
                store_dir.display()
            );
        }
        init_logging();
        let ready_fd = args.ready_fd;
        let res = serve(&args, &opts, &store_dir, ready_fd);
        if let Err(e) = &res {
            tracing::error!("mount failed: {e:#}");
            if let Some(fd) = ready_fd {
                // Another daemon of the store started first: the parent mounts through it.
                let taken = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<kcache_store::Error>(),
                        Some(kcache_store::Error::Locked { .. })
                    )
                });
                report(
                    fd,
                    &if taken {
                        BUSY.into()
                    } else {
                        format!("error: {e:#}")
                    },
                );
            }
        }
        return res.map(|_| ExitCode::SUCCESS);
    }
    // A store has one daemon; a second mount of it (another volume, or another place) is
    // added to the running daemon. A daemon that is starting is waited for and then asked; one
    // that is leaving is waited out and a new one started. Two mounts racing to start the
    // store's daemon: the one that loses asks the one that won.
    let deadline = Instant::now() + crate::holder::settle_bound();
    loop {
        match crate::holder::settle(&store_dir, deadline)? {
            Holder::Daemon => match add_to_running(&args, &opts, &store_dir) {
                Err(e)
                    if (crate::control::is_leaving(&e) || crate::control::is_unanswered(&e))
                        && Instant::now() < deadline => {}
                res => return res,
            },
            _ => match daemonize(&args, &store_dir) {
                Err(e) if e.is::<StoreTaken>() && Instant::now() < deadline => {}
                res => return res,
            },
        }
    }
}

/// What a daemon reports on its ready pipe when another process took the store first.
const BUSY: &str = "busy";

/// The daemon we started found the store taken by another that started at the same time.
#[derive(Debug)]
struct StoreTaken;

impl std::fmt::Display for StoreTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("another kcache daemon took the store first")
    }
}

impl std::error::Error for StoreTaken {}

/// Asks the store's running daemon to mount one more volume; returns once it answers.
fn add_to_running(args: &MountArgs, opts: &MountOpts, store_dir: &Path) -> Result<ExitCode> {
    if opts.metrics.is_some() {
        bail!("--metrics belongs to the store's first mount; the running daemon serves the store's metrics");
    }
    let mp = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    let mut options = args.options.clone();
    if let Some(q) = args.quota {
        options.push(format!("quota={q}"));
    }
    if let Some(m) = args.min_free {
        options.push(format!("min_free={m}"));
    }
    if let Some(p) = args.low_watermark {
        options.push(format!("low_watermark={p}"));
    }
    crate::control::call(
        store_dir,
        &crate::control::Request::Mount {
            volume: args.volume.clone(),
            mountpoint: mp,
            options,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (a daemonized mount logs to its store, whose disk
    // can be full) is dropped. tracing-subscriber would otherwise report it with
    // `eprintln!`, which panics when stderr (the same full file) fails too: on a ring thread
    // that panic hung every request of its queue.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .log_internal_errors(false)
        .try_init();
}

fn report(fd: RawFd, msg: &str) {
    // SAFETY: the fd was handed to us by the parent for exactly this message; we own it now.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = writeln!(f, "{msg}");
}

/// Starts the daemon as a child (a fresh exec, not a bare fork: SQLite and threads do not
/// survive fork) and waits until it reports that the mount answers.
fn daemonize(args: &MountArgs, store_dir: &Path) -> Result<ExitCode> {
    // Fail fast, with the message on the user's terminal, for what can be checked here.
    check_fuse_device()?;
    std::fs::create_dir_all(store_dir)
        .with_context(|| format!("creating store directory {}", store_dir.display()))?;
    let canonical = store_dir
        .canonicalize()
        .unwrap_or_else(|_| store_dir.to_owned());
    let mountpoint = prepare_mountpoint(&args.mountpoint, Starting::Parent(&canonical))?;
    // The daemon runs from "/" (it must not pin the caller's working directory), so it gets
    // absolute paths.
    let store_dir = &store_dir
        .canonicalize()
        .with_context(|| format!("resolving store directory {}", store_dir.display()))?;
    let log_path = store_dir.join("kcache.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;

    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (rfd, wfd) = (fds[0], fds[1]);
    const CHILD_FD: RawFd = 3;

    let exe = std::env::current_exe().context("locating the kcache executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg("--foreground")
        .arg("--ready-fd")
        .arg(CHILD_FD.to_string())
        .arg("--store")
        .arg(store_dir)
        .arg("--volume")
        .arg(&args.volume);
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    if let Some(q) = args.quota {
        cmd.arg("--quota").arg(q.to_string());
    }
    if let Some(m) = args.min_free {
        cmd.arg("--min-free").arg(m.to_string());
    }
    if let Some(p) = args.low_watermark {
        cmd.arg("--low-watermark").arg(p.to_string());
    }
    if let Some(a) = &args.metrics {
        cmd.arg("--metrics").arg(a);
    }
    cmd.arg(&mountpoint).current_dir("/");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(wfd, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the kcache daemon")?;
    // SAFETY: closing our copy of the write end so EOF arrives when the child closes its own.
    unsafe { libc::close(wfd) };
    let mut reader = unsafe { std::fs::File::from_raw_fd(rfd) };
    let mut msg = String::new();
    let _ = reader.read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "ready" {
        return Ok(ExitCode::SUCCESS);
    }
    if msg == BUSY {
        let _ = child.wait();
        return Err(StoreTaken.into());
    }
    let status = child.try_wait().ok().flatten();
    if let Some(err) = msg.strip_prefix("error: ") {
        bail!("{err}");
    }
    let _ = child.wait();
    bail!(
        "the daemon exited before the mount was ready ({}); see {}",
        status.map_or("still running".into(), |s| s.to_string()),
        log_path.display()
    )
}

/// Owner and mode of a volume's root from uid=, gid=, umask=.
fn apply_root_owner(store: &Store, root: kcache_store::Ino, opts: &MountOpts) -> Result<()> {
    if opts.uid.is_some() || opts.gid.is_some() || opts.umask.is_some() {
        store
            .ns()
            .setattr(
                root,
                &kcache_store::SetAttr {
                    uid: opts.uid,
                    gid: opts.gid,
                    mode: opts.umask.map(|m| 0o777 & !m),
                    ctime: Some(kcache_store::now_ns()),
                    ..Default::default()
                },
            )
            .context("setting the owner and mode of the volume root")?;
    }
    Ok(())
}

/// Where one mount fetches remote-only blobs from: its upstream= options, else the upstreams
/// remembered from pulls. For that mount only (its `KcacheFs` holds it): another mount's
/// options never change it, and the downloads themselves are the store's, shared by all.
fn mount_remote(store: &Store, opts: &MountOpts) -> Result<Option<Arc<kcache_store::Remote>>> {
    let mut urls = if opts.upstreams.is_empty() {
        store.upstream_settings()?
    } else {
        opts.upstreams.clone()
    };
    // What a mount pushes to or follows it can also fetch from: content evicted after its
    // upload, and names a follow merged in, come back from there.
    for u in [
        opts.push.as_ref().map(|p| &p.0),
        opts.follow.as_ref().map(|f| &f.0),
    ]
    .into_iter()
    .flatten()
    {
        if !urls.contains(u) {
            urls.push(u.clone());
        }
    }
    if urls.is_empty() {
        return Ok(None);
    }
    let mut config = kcache_store::FetchConfig::default();
    if let Some(s) = opts.fetch_timeout {
        config.timeout = Duration::from_secs(s);
    }
    let ups = urls
        .iter()
        .map(|u| {
            kcache_store::Upstream::parse_with(u, config.timeout, None)
                .map_err(|e| anyhow::anyhow!(e))
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(upstreams = ?urls, timeout_s = config.timeout.as_secs(), "fetching remote blobs");
    Ok(Some(Arc::new(kcache_store::Remote::new(ups, config)?)))
}

/// Applies the store-wide limits given as mount options (they are kept in the store).
fn apply_limits(fs: &KcacheFs, opts: &MountOpts) -> Result<()> {
    let mut limits = fs.limits();
    if let Some(q) = opts.quota {
        limits.quota = (q > 0).then_some(q);
    }
    if let Some(m) = opts.min_free {
        limits.min_free = m;
    }
    if let Some(p) = opts.low_watermark {
        limits.low_watermark_pct = p;
    }
    if limits != fs.limits() {
        fs.set_limits(limits)
            .map_err(|e| anyhow::anyhow!("recording the limits: errno {}", e.0))?;
    }
    Ok(())
}

/// One mounted volume.
struct MountRec {
    id: u64,
    mountpoint: PathBuf,
    volume: String,
    /// Device number of the mount (st_dev), which identifies it through bind mounts.
    dev: u64,
    fs: Arc<KcacheFs>,
    /// The kernel has ended the session; what it left staged is being committed.
    ending: bool,
}

/// The daemon of one store: every mounted volume of it, served by this one process. One
/// process per store keeps one owner of the database and one evictor that sees every open
/// file; more mounts are added over the control socket.
pub struct Daemon {
    store_dir: PathBuf,
    primary: Arc<KcacheFs>,
    mounts: Mutex<Vec<MountRec>>,
    /// Sessions still running, and mounts being added; the daemon ends when it drops to zero.
    live: Mutex<usize>,
    ended: Condvar,
    /// Set (under `live`) once it has dropped to zero: the daemon takes no more requests and
    /// answers that it is leaving, so a client waits for it to let go of the store.
    leaving: AtomicBool,
}

impl Daemon {
    /// Mounts `fs` at `mountpoint` and serves it on threads of its own; returns once the
    /// mount answers.
    fn start_session(
        self: &Arc<Self>,
        fs: Arc<KcacheFs>,
        mountpoint: &Path,
        opts: &MountOpts,
    ) -> Result<()> {
        let mount = MountOptions {
            fsname: self.store_dir.display().to_string(),
            // /proc/mounts says "fuse.kcache".
            subtype: "kcache".into(),
            read_only: opts.read_only,
            allow_other: opts.allow_other,
            default_permissions: true,
            nosuid: opts.nosuid,
            nodev: opts.nodev,
            noexec: opts.noexec,
            noatime: true,
        };
        // Request threads of the classic transport: KCACHE_THREADS overrides (for tuning);
        // default one per core, at least 2.
        let threads = std::env::var("KCACHE_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| *n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .max(2)
            });
        let config = SessionConfig {
            mount,
            threads,
            uring: match opts.uring {
                None => UringChoice::Auto,
                Some(true) => UringChoice::Force,
                Some(false) => UringChoice::Off,
            },
            passthrough: opts.passthrough,
        };
        let session = Session::mount(fs.clone(), mountpoint, config)
            .with_context(|| format!("mounting at {}", mountpoint.display()))?;
        fs.set_kernel_cache(Arc::new(session.notifier()));
        fs.register();
        // Recorded before the session runs (so a volume being mounted counts as mounted) and
        // removed by its own id when the session ends (a lazily detached old session at the
        // same path must not remove a newer mount's record).
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock(&self.mounts).push(MountRec {
            id,
            mountpoint: mountpoint.to_owned(),
            volume: fs.volume().name.clone(),
            dev: 0,
            fs: fs.clone(),
            ending: false,
        });
        // Background push and follow run while the session does; push publishes once more
        // after the session's last commits.
        let syncers = match crate::sync::Syncers::start(&fs, opts) {
            Ok(s) => s,
            Err(e) => {
                lock(&self.mounts).retain(|m| m.id != id);
                return Err(e.context("starting push= / follow="));
            }
        };
        *lock(&self.live) += 1;
        let me = self.clone();
        let run_fs = fs.clone();
        let mp = mountpoint.to_owned();
        let spawned = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                // Handler panics are answered EIO inside the session; one anywhere else in it
                // must still not skip what follows, or `live` never reaches zero and the
                // daemon never leaves.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.run()));
                match run {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(mountpoint = %mp.display(), error = %e, "fuse session failed")
                    }
                    Err(_) => {
                        tracing::error!(mountpoint = %mp.display(), "fuse session panicked")
                    }
                }
                if let Some(m) = lock(&me.mounts).iter_mut().find(|m| m.id == id) {
                    m.ending = true;
                }
                // Commit what is still staged before the mount counts as gone, and the
                // group it joined.
                run_fs.flush_all();
                if let Err(e) = run_fs.store().commit_group() {
                    tracing::error!(error = %e, "committing at unmount failed");
                }
                syncers.stop();
                lock(&me.mounts).retain(|m| m.id != id);
                tracing::info!(mountpoint = %mp.display(), "unmounted");
                *lock(&me.live) -= 1;
                me.ended.notify_all();
            });
        if let Err(e) = spawned {
            lock(&self.mounts).retain(|m| m.id != id);
            *lock(&self.live) -= 1;
            self.ended.notify_all();
            return Err(e.into());
        }

        // The mount answers once a stat of the root goes through the new session.
        let deadline = Instant::now() + Duration::from_secs(30);
        let dev = loop {
            match std::fs::metadata(mountpoint) {
                Ok(m) => break std::os::unix::fs::MetadataExt::dev(&m),
                Err(e) if Instant::now() > deadline => {
                    // Detach it: the session then ends and cleans up after itself.
                    let _ = unmount_path(mountpoint, true);
                    bail!("mount at {} does not answer: {e}", mountpoint.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        tracing::info!(
            mountpoint = %mountpoint.display(),
            store = %self.store_dir.display(),
            volume = %fs.volume().name,
            "mounted"
        );
        if let Some(m) = lock(&self.mounts).iter_mut().find(|m| m.id == id) {
            m.dev = dev;
        }
        Ok(())
    }

    /// True once the last mount has ended: the daemon is on its way out.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// Another volume (or the same one again) at another mountpoint, asked for over the
    /// control socket by `kcache mount`.
    pub fn add_mount(
        self: &Arc<Self>,
        volume: &str,
        mountpoint: &Path,
        options: &[String],
    ) -> Result<()> {
        // Counted as live while it is being added, so the daemon cannot decide to leave
        // under a mount it is making; refused once it has decided.
        let _adding = Adding::enter(self)?;
        let opts = MountOpts::parse(options).map_err(|e| anyhow::anyhow!(e))?;
        // Each mounted volume has one filesystem: its per-file locks and staged writes must
        // not be split between two. A second place gets a bind mount of the first. A mount
        // of the volume that the kernel has ended (`umount MNT && mount MNT`) is waited for
        // while it commits what it left.
        // `umount` returns before the session sees it, so a mount no longer in the mount
        // table counts as ending too; one detached lazily with files still open keeps being
        // served, and is reported as such once the wait is over.
        let deadline = Instant::now() + crate::holder::settle_bound();
        let going = |m: &MountRec| m.ending || (m.dev != 0 && !mountinfo::is_attached(m.dev));
        while lock(&self.mounts)
            .iter()
            .any(|m| m.volume == volume && going(m))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(m) = lock(&self.mounts).iter().find(|m| m.volume == volume) {
            if going(m) {
                bail!(
                    "volume '{volume}' is still served by its mount detached from {} \
                     (files are still open there); close them and mount again",
                    m.mountpoint.display()
                );
            }
            bail!(
                "volume '{volume}' is already mounted at {}; bind-mount that (mount --bind {} {})",
                m.mountpoint.display(),
                m.mountpoint.display(),
                mountpoint.display()
            );
        }
        let mountpoint = prepare_mountpoint(mountpoint, Starting::No)?;
        let store = self.primary.store();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let info = store
            .volume(volume, true, uid, gid)
            .with_context(|| format!("opening volume {volume}"))?;
        apply_root_owner(store, info.root, &opts)?;
        apply_limits(&self.primary, &opts)?;
        let remote = mount_remote(store, &opts)?;
        let fs = Arc::new(
            self.primary
                .sibling(info, opts.read_only)
                .with_remote(remote),
        );
        self.start_session(fs, &mountpoint, &opts)
    }

    /// (mountpoint, volume, device) of every mount.
    pub fn list(&self) -> Vec<(PathBuf, String, u64)> {
        lock(&self.mounts)
            .iter()
            .map(|m| (m.mountpoint.clone(), m.volume.clone(), m.dev))
            .collect()
    }

    /// The filesystem for `volume`: a mounted one, or (for a volume not mounted here) one
    /// that serves only maintenance requests. `None` means the first mount's volume.
    pub fn fs_for(&self, volume: Option<&str>) -> Result<Arc<KcacheFs>, String> {
        let Some(v) = volume else {
            return Ok(self.primary.clone());
        };
        if let Some(m) = lock(&self.mounts).iter().find(|m| m.volume == v) {
            return Ok(m.fs.clone());
        }
        let info = self
            .primary
            .store()
            .volume(v, false, 0, 0)
            .map_err(|e| format!("{e}"))?;
        Ok(Arc::new(self.primary.sibling(info, false)))
    }
}

/// A mount being added, counted among the daemon's live sessions until it is done.
struct Adding<'a>(&'a Daemon);

impl<'a> Adding<'a> {
    fn enter(d: &'a Daemon) -> Result<Adding<'a>> {
        let mut live = lock(&d.live);
        if d.is_leaving() {
            return Err(crate::control::Leaving.into());
        }
        *live += 1;
        Ok(Adding(d))
    }
}

impl Drop for Adding<'_> {
    fn drop(&mut self) {
        *lock(&self.0.live) -= 1;
        self.0.ended.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the filesystem until every mount of the store is unmounted or a signal asks us to
/// stop.
fn serve(
    args: &MountArgs,
    opts: &MountOpts,
    store_dir: &Path,
    ready_fd: Option<RawFd>,
) -> Result<()> {
    // Block the stop signals in every thread; one thread below waits for them.
    let sigs = stop_signals();
    // SAFETY: sigset initialised by stop_signals.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };

    check_fuse_device()?;
    // The store first: holding its owner lock tells a mount of it left at the mountpoint by
    // a crashed daemon from a live one.
    let store =
        Store::open(store_dir).with_context(|| format!("opening store {}", store_dir.display()))?;
    let canonical = store_dir
        .canonicalize()
        .unwrap_or_else(|_| store_dir.to_owned());
    let mountpoint = prepare_mountpoint(&args.mountpoint, Starting::Owner(&canonical))?;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let volume = store
        .volume(&args.volume, true, uid, gid)
        .with_context(|| format!("opening volume {}", args.volume))?;
    apply_root_owner(&store, volume.root, opts)?;
    let remote = mount_remote(&store, opts)?;
    let store = Arc::new(store);
    // Namespace changes are committed in groups (see ARCHITECTURE.md, crash contract).
    store.start_group_commit(kcache_store::GROUP_COMMIT_INTERVAL);
    let fs = Arc::new(KcacheFs::new(store.clone(), volume, opts.read_only).with_remote(remote));
    apply_limits(&fs, opts)?;
    // Long read-only queries (stats, du, metrics) use a connection of their own.
    let reader = Arc::new(
        Store::open_with(
            store_dir,
            &kcache_store::OpenOptionsStore { read_only: true },
        )
        .with_context(|| format!("opening store {} for reading", store_dir.display()))?,
    );
    let daemon = Arc::new(Daemon {
        store_dir: store_dir
            .canonicalize()
            .unwrap_or_else(|_| store_dir.to_owned()),
        primary: fs.clone(),
        mounts: Mutex::new(Vec::new()),
        live: Mutex::new(0),
        ended: Condvar::new(),
        leaving: AtomicBool::new(false),
    });
    let control = crate::control::serve(daemon.clone(), reader.clone(), store_dir)?;
    if let Some(addr) = &opts.metrics {
        crate::metrics::serve(addr, fs.clone(), reader.clone())?;
    }
    daemon.start_session(fs.clone(), &mountpoint, opts)?;
    if let Some(fd) = ready_fd {
        report(fd, "ready");
    }
    // Under systemd (Type=notify) the service is up only now that the mount answers.
    let status = format!("mounted at {}", mountpoint.display());
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
    ) {
        tracing::warn!(error = %e, "telling systemd we are ready failed");
    }

    // Accesses are noted in memory; write them about once a second so that a crash loses at
    // most the last second of LRU order.
    let flusher_store = store.clone();
    std::thread::Builder::new()
        .name("access-flush".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            if let Err(e) = flusher_store.lru().flush_accesses() {
                tracing::warn!(error = %e, "recording accesses failed");
            }
        })?;

    // Limits (quota, free disk space) are kept by a thread of its own, off the request path,
    // for every mount of the store.
    static STOP_EVICTOR: AtomicBool = AtomicBool::new(false);
    let evict_fs = fs.clone();
    let evictor = std::thread::Builder::new()
        .name("evict".into())
        .spawn(move || evict_fs.run_evictor(&STOP_EVICTOR))?;
    let l = fs.limits();
    tracing::info!(quota = ?l.quota, low_watermark_pct = l.low_watermark_pct, min_free = %l.min_free, "limits enforced by LRU eviction");

    // Stop on SIGTERM/SIGINT by unmounting everything; the sessions then drain and end.
    // The thread keeps waiting after the first signal (the signals stay blocked, so once it
    // ended a later SIGTERM did nothing), and the first signal also arms a deadline: a
    // daemon still there after STOP_BOUND ends anyway, as a crash would (the crash contract
    // keeps what was committed), so SIGTERM always ends it.
    let sig_daemon = daemon.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut armed = false;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait on the blocked set.
                if unsafe { libc::sigwait(&sigs, &mut sig) } != 0 {
                    continue;
                }
                if !armed {
                    armed = true;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                    let spawned = std::thread::Builder::new()
                        .name("stop-deadline".into())
                        .spawn(|| {
                            std::thread::sleep(STOP_BOUND);
                            tracing::error!(
                                bound_s = STOP_BOUND.as_secs(),
                                "still running long after a stop signal; exiting now"
                            );
                            // SAFETY: _exit ends the process without running anything that
                            // could wait on what is stuck.
                            unsafe { libc::_exit(1) }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "no thread for the stop deadline");
                    }
                }
                for (mp, _, _) in sig_daemon.list() {
                    tracing::info!(signal = sig, mountpoint = %mp.display(), "unmounting on signal");
                    if let Err(e) = unmount_path(&mp, false) {
                        tracing::warn!("clean unmount failed ({e}); detaching lazily");
                        let _ = unmount_path(&mp, true);
                    }
                }
            }
        })?;

    {
        let mut live = lock(&daemon.live);
        while *live > 0 {
            live = daemon.ended.wait(live).unwrap_or_else(|p| p.into_inner());
        }
        // No mount is left: from here on the control socket answers "leaving" to every
        // request (decided under `live`, so no mount is being added now).
        daemon.leaving.store(true, Ordering::SeqCst);
    }
    fs.stop_evictor(&STOP_EVICTOR);
    let _ = evictor.join();
    // A download whose bytes all arrived is being synced and kept; let it finish (bounded,
    // well within the stop timeouts of the systemd units, which include the unmount) rather
    // than throw away what was fetched.
    let left = store.drain_fetches(Duration::from_secs(20));
    if left > 0 {
        tracing::warn!(
            downloads = left,
            "leaving with downloads not yet kept; their staging files go at the next start"
        );
    }
    fs.flush_all();
    if let Err(e) = store.lru().flush_accesses() {
        tracing::warn!(error = %e, "recording the last accesses failed");
    }
    // Everything above (downloads kept, last commits, accesses) joined the open group; the
    // process may end before the store is dropped, so commit it here.
    if let Err(e) = store.commit_group() {
        tracing::error!(error = %e, "committing the last group failed");
    }
    // Staged content still armed now is content the daemon could not commit (a halted
    // store, a commit failing at the unmount): synced, it survives a reboot too, and the
    // next start commits it.
    match store.keep_staging_across_reboot() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            files = n,
            "content that could not be committed is kept in the store's staging directory; the next start commits it"
        ),
        Err(e) => tracing::error!(error = %e, "syncing content that could not be committed failed"),
    }
    // Last, so that while the daemon holds the store its socket answers (if only "leaving");
    // the lock goes with the process a moment later.
    control.close(Duration::from_secs(30));
    tracing::info!(store = %store_dir.display(), "daemon done");
    Ok(())
}

/// How long a daemon may take to leave after a stop signal: the unmount, the drain of
/// downloads (20 s), the last commits and the control socket's close (30 s), within the
/// systemd units' TimeoutStopSec (120 s).
const STOP_BOUND: Duration = Duration::from_secs(90);

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGTERM);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGHUP);
        s
    }
}

pub fn unmount_path(mp: &Path, lazy: bool) -> Result<()> {
    let c = cpath(mp)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // Unprivileged mounts go through the setuid helper.
        let mut cmd = Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let st = cmd.arg(mp).status().context("running fusermount3")?;
        if st.success() {
            return Ok(());
        }
    }
    if err.raw_os_error() == Some(libc::EBUSY) {
        bail!(
            "{} is busy (files are open there); close them or use --lazy",
            mp.display()
        );
    }
    bail!("unmounting {}: {err}", mp.display())
}
