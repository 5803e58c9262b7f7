//! Mount guards for the kcache target and the reference targets (bindfs, libfuse's
//! passthrough_hp), plus the scratch run directory.
//!
//! Every mount is owned by a guard whose `Drop` unmounts it, so an error or a panic in
//! a workload never leaves a FUSE mount behind.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Long enough for a daemon that has to open a large store, short enough that a hung
/// helper does not stall the benchmark forever.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long we keep polling for a mount to appear after its helper returned.
const MOUNT_APPEAR_TIMEOUT: Duration = Duration::from_secs(10);

/// `-o io_uring` or `-o noio_uring` for every kcache mount, or neither (the default choice).
static TRANSPORT_OPTION: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();

/// A directory of scratch space under the base dir, removed on drop unless a mount
/// inside it could not be unmounted (deleting through a live mount would be wrong, and
/// walking a dead one can hang).
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates a fresh `run-<pid>[-n]` directory under `base`.
    pub fn create(base: &Path) -> Result<Self> {
        fs::create_dir_all(base)
            .with_context(|| format!("creating base dir {}", base.display()))?;
        let base = base
            .canonicalize()
            .with_context(|| format!("resolving {}", base.display()))?;
        let pid = std::process::id();
        for n in 0..1000 {
            let name = if n == 0 {
                format!("run-{pid}")
            } else {
                format!("run-{pid}-{n}")
            };
            let path = base.join(name);
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!("could not create a fresh run dir under {}", base.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (empty) subdirectory `name` and returns its path.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Only direct children can be mountpoints: that is where we put them.
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if is_mountpoint(&entry.path()) {
                    eprintln!(
                        "warning: {} is still mounted; leaving {} in place",
                        entry.path().display(),
                        self.path.display()
                    );
                    return;
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
        // The time of this mass delete, for the next run's `settle` (best effort).
        if let Some(base) = self.path.parent() {
            let _ = fs::write(base.join(CLEANUP_MARK), b"");
        }
    }
}

/// Touched in the base dir when a run's scratch dir is deleted.
const CLEANUP_MARK: &str = ".kcache-bench-cleanup";

/// Waits until `secs` have passed since the last run under `base` deleted its scratch dir.
/// Right after a mass delete, creating files on ext4 is several times slower for minutes
/// (new inodes skip recently deleted ones: `recently_deleted`, 60 s, or 360 s while their
/// inode table block is dirty; measured here: 20,000 native creates took 3.9–4.5 s after a
/// delete and 0.56 s without one), which would make native, and so every create ratio,
/// look slow.
pub fn settle_after_last_cleanup(base: &Path, secs: u64) {
    let Ok(age) = fs::metadata(base.join(CLEANUP_MARK))
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default())
    else {
        return;
    };
    let want = std::time::Duration::from_secs(secs);
    if age < want {
        let left = want - age;
        println!(
            "  settle:  the last run deleted its files {} s ago; waiting {} s, as creates on ext4 stay slow for minutes after a mass delete (--settle 0 skips this)",
            age.as_secs(),
            left.as_secs()
        );
        std::thread::sleep(left);
    }
}

enum Kind {
    Kcache {
        bin: PathBuf,
    },
    /// A reference file system, unmounted with umount(8).
    Reference,
}

/// A live FUSE mount; unmounted explicitly with [`Mount::unmount`] or else on drop.
pub struct Mount {
    kind: Kind,
    mountpoint: PathBuf,
    log: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `kcache mount --store STORE [--quota BYTES] [--metrics ADDR] MNT`: the CLI daemonizes
    /// and returns once the mount answers, so we only double-check that the mountpoint changed
    /// device.
    /// The `-o` option every kcache mount of this run gets (`--transport`).
    pub fn set_transport_option(opt: Option<&'static str>) {
        let _ = TRANSPORT_OPTION.set(opt);
    }

    pub fn kcache(
        bin: &Path,
        store: &Path,
        mountpoint: &Path,
        log: &Path,
        quota: Option<u64>,
        metrics: Option<&str>,
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("mount").arg("--store").arg(store);
        if let Some(bytes) = quota {
            cmd.arg("--quota").arg(bytes.to_string());
        }
        if let Some(addr) = metrics {
            cmd.arg("--metrics").arg(addr);
        }
        if let Some(Some(o)) = TRANSPORT_OPTION.get() {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(mountpoint);
        let mount = Self::start(
            Kind::Kcache {
                bin: bin.to_path_buf(),
            },
            cmd,
            mountpoint,
            log,
        )?;
        Ok(mount)
    }

    /// `bindfs SRC MNT`: a plain FUSE passthrough, as a yardstick for "any FUSE fs".
    pub fn bindfs(src: &Path, mountpoint: &Path, log: &Path) -> Result<Self> {
        let mut cmd = Command::new("bindfs");
        cmd.arg(src).arg(mountpoint);
        Self::start(Kind::Reference, cmd, mountpoint, log)
    }

    /// `PASSTHROUGH_HP [-o io_uring] SRC MNT`: libfuse's C reference file system, which
    /// daemonizes once mounted.
    pub fn passthrough_hp(
        bin: &Path,
        src: &Path,
        mountpoint: &Path,
        log: &Path,
        io_uring: bool,
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        if io_uring {
            cmd.arg("-o").arg("io_uring");
        }
        cmd.arg(src).arg(mountpoint);
        Self::start(Kind::Reference, cmd, mountpoint, log)
    }

    fn start(kind: Kind, mut cmd: Command, mountpoint: &Path, log: &Path) -> Result<Self> {
        let what = describe(&cmd);
        let status = run_logged(&mut cmd, log)?;
        if !status.success() {
            bail!("`{what}` failed ({status}){}", log_tail(log));
        }
        // From here on the guard owns the mount, so even a failed check unmounts it.
        let mount = Self {
            kind,
            mountpoint: mountpoint.to_path_buf(),
            log: log.to_path_buf(),
            mounted: true,
        };
        let start = Instant::now();
        while !is_mountpoint(mountpoint) {
            if start.elapsed() > MOUNT_APPEAR_TIMEOUT {
                bail!(
                    "`{what}` exited 0 but {} is not a mountpoint after {:?}{}",
                    mountpoint.display(),
                    MOUNT_APPEAR_TIMEOUT,
                    log_tail(log)
                );
            }
            sleep(Duration::from_millis(20));
        }
        if matches!(mount.kind, Kind::Kcache { .. }) && start.elapsed() > Duration::from_millis(20)
        {
            // The CLI contract says the mount answers when `kcache mount` returns.
            eprintln!(
                "warning: kcache mount returned {:?} before {} became a mountpoint",
                start.elapsed(),
                mountpoint.display()
            );
        }
        Ok(mount)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts via the target's own tool; on failure falls back to a lazy unmount so
    /// nothing stays attached, but still reports the failure.
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let mut cmd = match &self.kind {
            Kind::Kcache { bin } => {
                let mut c = Command::new(bin);
                c.arg("umount").arg(&self.mountpoint);
                c
            }
            Kind::Reference => {
                let mut c = Command::new("umount");
                c.arg(&self.mountpoint);
                c
            }
        };
        let what = describe(&cmd);
        let result = match run_logged(&mut cmd, &self.log) {
            Ok(s) if s.success() && !is_mountpoint(&self.mountpoint) => return Ok(()),
            Ok(s) if s.success() => Err(anyhow::anyhow!(
                "`{what}` exited 0 but {} is still a mountpoint",
                self.mountpoint.display()
            )),
            Ok(s) => Err(anyhow::anyhow!(
                "`{what}` failed ({s}){}",
                log_tail(&self.log)
            )),
            Err(e) => Err(e),
        };
        self.force_unmount();
        result
    }

    fn force_unmount(&self) {
        let attempts: [(&str, &[&str]); 2] = [("fusermount3", &["-u", "-z"]), ("umount", &["-l"])];
        for (prog, args) in attempts {
            if !is_mountpoint(&self.mountpoint) {
                return;
            }
            let _ = Command::new(prog)
                .args(args)
                .arg(&self.mountpoint)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if is_mountpoint(&self.mountpoint) {
            eprintln!(
                "warning: could not unmount {}; run `umount -l {}`",
                self.mountpoint.display(),
                self.mountpoint.display()
            );
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("warning: unmounting {}: {e:#}", self.mountpoint.display());
        }
    }
}

/// A FUSE mount shows up as a different `st_dev` than its parent directory.
pub fn is_mountpoint(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        // A dead FUSE daemon makes stat fail with ENOTCONN: still attached.
        (Err(e), Ok(_)) => e.raw_os_error() == Some(libc::ENOTCONN),
        _ => false,
    }
}

/// Runs a helper with its output appended to `log` rather than a pipe: a daemonizing
/// child may keep inherited pipe ends open forever, which would block us.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<ExitStatus> {
    run_to_file(cmd, log, COMMAND_TIMEOUT)
}

/// Runs `cmd` with stdout and stderr appended to `log`, killing it after `timeout`.
/// Polls every millisecond, so the caller can time the command to within about that.
pub fn run_to_file(cmd: &mut Command, log: &Path, timeout: Duration) -> Result<ExitStatus> {
    let what = describe(cmd);
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` did not finish within {timeout:?}{}",
                log_tail(log)
            );
        }
        sleep(Duration::from_millis(1));
    }
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The last lines a helper printed, to put into an error message.
pub fn log_tail(log: &Path) -> String {
    let mut text = String::new();
    if File::open(log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
        || text.trim().is_empty()
    {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    format!("\n--- output ({}) ---\n{}", log.display(), tail.join("\n"))
}
